"""Align a rectified-flow model (FLUX, SD3) with GDRO, fully offline: generate and score groups, train a LoRA, evaluate.

    python jobs/align.py --task ocr                                  # the embedded tiny FLUX, local Ray
    python jobs/align.py --task geneval --steps 200 --beta 8         # any training field as a flag
    ray job submit --working-dir . -- python jobs/align.py --task geneval \\
        --model black-forest-labs/FLUX.1-dev --num-workers 8 --judge-model CodeGoat24/UnifiedReward-qwen-7b

Everything lands in one run directory (--out, default runs/align-TASK); rerunning the same command
skips the stages whose output is complete and resumes the one that is not. Training settings come
from the preset (default: "tiny" on the embedded model, "paper" otherwise), then --config YAML, then flags.
"""

import argparse
import sys

from gdro_ray.align import add_align_arguments, align_from_arguments, run_align
from gdro_ray.console import add_verbose_argument, set_verbose
from gdro_ray.evaluate import format_table
from gdro_ray.ray_session import init_ray
from gdro_ray.resource_plan import ResourcePlanError


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_align_arguments(parser)
    add_verbose_argument(parser)
    args = parser.parse_args(argv)
    set_verbose(args.verbose)
    return align_from_arguments(parser, args)


def main(argv=None) -> dict:
    train, settings = parse_args(argv)
    init_ray()
    try:
        summary = run_align(train, settings)
    except ResourcePlanError as error:
        sys.exit(f"align: {error}")
    print(format_table(summary))
    print("pictures:", *summary["pictures"])
    return summary


if __name__ == "__main__":
    main()
