"""Evaluate base against aligned on held-out prompts: task reward, quality, corrected score, a picture.

    python jobs/evaluate.py --task geneval --lora runs/gdro/lora --out runs/gdro/eval
    python jobs/evaluate.py --task ocr --model /data/FLUX.1-dev --lora runs/ocr/lora --judge-url http://judge:8000/score

Both models see the same prompts and seeds. Writes base.json/.csv, aligned.json/.csv, summary.json and
comparison.png (each row a prompt: base images left, aligned right).
"""

import argparse
from pathlib import Path

from gdro_ray.evaluate import default_judge, evaluate_lora, format_table
from gdro_ray.models import TINY


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="ocr", help="ocr or geneval (the tiny world's on the tiny model)")
    parser.add_argument("--model", default=TINY, help="'tiny', a diffusers FLUX directory, or a hub id")
    parser.add_argument("--lora", type=Path, required=True, help="the aligned LoRA (diffusers format)")
    parser.add_argument("--eval-prompts", type=int, default=32, help="held-out prompts")
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0, help="dataset seed: decides the held-out split")
    parser.add_argument("--size", type=int, default=None, help="image size (default: 32 tiny, 512 otherwise)")
    parser.add_argument("--num-steps", type=int, default=None, help="sampler steps (default: 20 tiny, 28 otherwise)")
    parser.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance (1: off)")
    parser.add_argument("--judge-url", default=None, help="an HTTP quality judge (see gdro_ray/rewards/http_judge.py)")
    parser.add_argument("--judge-token-env", default=None, help="environment variable holding the judge's token")
    parser.add_argument("--judge-model", default=None, help="a vision-language judge: hub id or local directory")
    parser.add_argument("--out", type=Path, default=Path("runs/eval"))
    args = parser.parse_args(argv)
    summary = evaluate_lora(args.task, args.model, args.lora, args.out,
                            default_judge(args.model, args.judge_url, args.judge_token_env, args.judge_model),
                            num_prompts=args.eval_prompts, images_per_prompt=args.images_per_prompt,
                            seed=args.seed, size=args.size, num_steps=args.num_steps, cfg_scale=args.cfg_scale)
    print(format_table(summary))
    return summary


if __name__ == "__main__":
    main()
