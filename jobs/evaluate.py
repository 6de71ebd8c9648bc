"""Evaluate base against aligned on held-out prompts: task reward, quality, corrected score, a picture.

    python jobs/evaluate.py --task geneval --lora runs/gdro/lora --out runs/gdro/eval
    python jobs/evaluate.py --task ocr --model /data/FLUX.1-dev --lora runs/ocr/lora --judge-url http://judge:8000/score

Both models see the same prompts and seeds. Writes base.json/.csv, aligned.json/.csv, summary.json and
comparison.png (each row a prompt: base images left, aligned right).
"""

import argparse
import json
from pathlib import Path

from gdro_ray.data.prompts import load_prompts
from gdro_ray.evaluate import comparison_grid, generate_images, score_images, summarise, write_results
from gdro_ray.models import TINY, load_flow_model
from gdro_ray.rewards import build_reward
from gdro_ray.rewards.http_judge import HTTPJudge
from gdro_ray.tasks import prompt_set, reward_for_task


def quality_judge(model: str, judge_url: str | None, token_env: str | None):
    if judge_url:
        return HTTPJudge(judge_url, token_env=token_env)
    if model == TINY:
        from gdro_ray.tiny_world.judge import TinyWorldJudge

        return TinyWorldJudge()
    raise ValueError("a real model needs a quality judge: pass --judge-url (a scoring server, see README)")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="ocr", help="ocr or geneval (the tiny world's on the tiny model)")
    parser.add_argument("--model", default=TINY, help="'tiny', a diffusers FLUX directory, or a hub id")
    parser.add_argument("--lora", type=Path, required=True, help="the aligned LoRA (diffusers format)")
    parser.add_argument("--num-prompts", type=int, default=32, help="held-out prompts")
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0, help="dataset seed: decides the held-out split")
    parser.add_argument("--size", type=int, default=None, help="image size (default: 32 tiny, 512 otherwise)")
    parser.add_argument("--num-steps", type=int, default=None, help="sampler steps (default: 8 tiny, 28 otherwise)")
    parser.add_argument("--judge-url", default=None, help="an HTTP quality judge (see gdro_ray/rewards/http_judge.py)")
    parser.add_argument("--judge-token-env", default=None, help="environment variable holding the judge's token")
    parser.add_argument("--out", type=Path, default=Path("runs/eval"))
    args = parser.parse_args(argv)
    size = args.size or (32 if args.model == TINY else 512)
    steps = args.num_steps or (8 if args.model == TINY else 28)

    judge = quality_judge(args.model, args.judge_url, args.judge_token_env)
    reward = build_reward(reward_for_task(args.task, args.model))
    prompts = load_prompts(prompt_set(args.task, args.model), num_prompts=args.num_prompts, seed=args.seed,
                           split="heldout")
    seeds = list(range(10_000, 10_000 + args.images_per_prompt))
    model = load_flow_model(args.model)
    images = {"base": generate_images(model, prompts, seeds, size, size, steps)}
    model.load_lora(args.lora)
    images["aligned"] = generate_images(model, prompts, seeds, size, size, steps)

    summary = {}
    for name, rows in images.items():
        scores = score_images(reward, judge, prompts, seeds, rows, args.task)
        summary[name] = summarise(scores)
        write_results(args.out, name, scores, summary[name])
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    comparison_grid(images["base"], images["aligned"]).save(args.out / "comparison.png")
    for name, result in summary.items():
        print(f"{name:8} reward {result['reward']:.3f}  quality {result['quality']:.2f}  "
              f"corrected {result['corrected']:.3f}")
    return summary


if __name__ == "__main__":
    main()
