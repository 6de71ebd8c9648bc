"""Align a FLUX model with GDRO, fully offline: generate and score groups, train a LoRA, evaluate.

    python jobs/align.py --task ocr                                  # the embedded tiny FLUX, local Ray
    python jobs/align.py --task geneval --steps 200 --beta 8         # any training field as a flag
    ray job submit --working-dir . -- python jobs/align.py --task geneval \\
        --model black-forest-labs/FLUX.1-dev --num-workers 8 --judge-model CodeGoat24/UnifiedReward-qwen-7b

Everything lands in one run directory (--out, default runs/align-TASK); rerunning the same command
skips the stages whose output is complete and resumes the one that is not. Training settings come
from the preset (default: "tiny" on the embedded model, "paper" otherwise), then --config YAML, then flags.
"""

import argparse
import dataclasses

from gdro_ray.align import AlignSettings, default_preset, run_align
from gdro_ray.config import add_arguments, config_from_arguments
from gdro_ray.data.generation import parse_pool
from gdro_ray.evaluate import format_table
from gdro_ray.models import TINY
from gdro_ray.ray_session import init_ray

TASKS = ("ocr", "geneval")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    defaults = AlignSettings()
    group = parser.add_argument_group("dataset and evaluation")
    group.add_argument("--out", default="", help="run directory (default: runs/align-TASK)")
    group.add_argument("--num-prompts", type=int, default=defaults.num_prompts, help="training prompts")
    group.add_argument("--k-gen", type=int, default=defaults.k_gen, help="images generated per training prompt")
    group.add_argument("--sample-steps", type=int, default=None, help="sampler steps (default: 8 tiny, 28 otherwise)")
    group.add_argument("--size", type=int, default=None, help="image size (default: 32 tiny, 512 otherwise)")
    group.add_argument("--cfg-scale", type=float, default=defaults.cfg_scale, help="classifier-free guidance (1: off)")
    group.add_argument("--eval-prompts", type=int, default=defaults.eval_prompts, help="held-out prompts at the end")
    group.add_argument("--eval-images-per-prompt", type=int, default=defaults.eval_images_per_prompt)
    group.add_argument("--train-eval-prompts", type=int, default=defaults.train_eval_prompts,
                       help="held-out prompts evaluated every --eval-every steps during training")
    group.add_argument("--judge-url", default=None, help="a quality judge server (gdro_ray/rewards/http_judge.py)")
    group.add_argument("--judge-token-env", default=None, help="environment variable holding the judge's token")
    group.add_argument("--judge-model", default=None, help="a vision-language judge: hub id or local directory")
    group.add_argument("--generation-actors", type=parse_pool, default=defaults.generation_actors, help="MIN,MAX")
    group.add_argument("--scoring-actors", type=parse_pool, default=defaults.scoring_actors, help="MIN,MAX")
    args = parser.parse_args(argv)
    task, model = args.task or "ocr", args.model or TINY
    if task not in TASKS:
        parser.error(f"--task must be one of {TASKS}, got {task!r}")
    args.task, args.model = task, model
    args.preset = args.preset or default_preset(model)
    try:
        train = config_from_arguments(args)
        settings = AlignSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(AlignSettings)})
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    return train, settings


def main(argv=None) -> dict:
    train, settings = parse_args(argv)
    init_ray()
    summary = run_align(train, settings)
    print(format_table(summary))
    print("pictures:", *summary["pictures"])
    return summary


if __name__ == "__main__":
    main()
