"""Evaluate base against aligned on held-out prompts: task reward, quality, corrected score, a picture.

    python jobs/evaluate.py --data runs/ocr-groups --lora runs/gdro/lora --out runs/gdro/eval
    python jobs/evaluate.py --task ocr --model /data/FLUX.1-dev --lora runs/ocr/lora --judge-url http://judge:8000/score

With --data (the group dataset the LoRA was trained on) the evaluation uses what the dataset was made with:
its model, its reward (a dataset made with --reward or from a --prompt-file is scored the same way), its
sampler, and the held-out split of its prompts. Without it, the task's defaults on --model. Both models see
the same prompts and seeds. Writes base.json/.csv, aligned.json/.csv, summary.json and comparison.png (each
row a prompt: its text, base images left, aligned right).
"""

import argparse
from dataclasses import replace
from pathlib import Path

from gdro_ray.cli import add_dataclass_arguments, values_given
from gdro_ray.console import add_verbose_argument, set_verbose
from gdro_ray.evaluate import HeldOut, evaluate_lora, format_table
from gdro_ray.models import SamplerSettings
from gdro_ray.profiles import DEFAULT_MODEL, TASKS, quality_judge


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="the group dataset the LoRA was trained on")
    parser.add_argument("--task", default="ocr", choices=TASKS, help="without --data: the task")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="without --data: 'tiny', a FLUX directory or hub id")
    parser.add_argument("--seed", type=int, default=0, help="without --data: dataset seed, decides the held-out split")
    parser.add_argument("--lora", type=Path, required=True, help="the aligned LoRA (diffusers format)")
    parser.add_argument("--eval-prompts", type=int, default=32, help="held-out prompts")
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--judge-url", default=None, help="an HTTP quality judge (see gdro_ray/rewards/http_judge.py)")
    parser.add_argument("--judge-token-env", default=None, help="environment variable holding the judge's token")
    parser.add_argument("--judge-model", default=None, help="a vision-language judge: hub id or local directory")
    parser.add_argument("--out", type=Path, default=Path("runs/eval"))
    add_dataclass_arguments(parser.add_argument_group("sampler (default: the dataset's, or the model's)"),
                            SamplerSettings)
    add_verbose_argument(parser)
    args = parser.parse_args(argv)
    set_verbose(args.verbose)
    try:
        held_out = HeldOut.of_dataset(args.data) if args.data else HeldOut.of_task(args.task, args.model, args.seed)
        held_out = replace(held_out, sampler=held_out.sampler.with_overrides(**values_given(args, SamplerSettings)))
        judge = quality_judge(held_out.model, args.judge_url, args.judge_token_env, args.judge_model)
        if not args.lora.is_dir():
            raise FileNotFoundError(f"LoRA directory {str(args.lora)!r} does not exist")
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    summary = evaluate_lora(held_out, args.lora, args.out, judge, num_prompts=args.eval_prompts,
                            images_per_prompt=args.images_per_prompt)
    print(format_table(summary))
    return summary


if __name__ == "__main__":
    main()
