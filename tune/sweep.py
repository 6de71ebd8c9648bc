"""Search GDRO's beta, tau, gamma, k and learning rate for a task with Ray Tune, stopping bad trials early.

    python tune/sweep.py --task ocr                                   # tiny world, local Ray
    python tune/sweep.py --task geneval --num-samples 16 --max-concurrent-trials 4 --beta-range 2,30
    ray job submit --working-dir . -- python tune/sweep.py --task geneval --model black-forest-labs/FLUX.1-dev \\
        --num-workers 1 --max-concurrent-trials 8 --judge-model CodeGoat24/UnifiedReward-qwen-7b
    python jobs/align.py --task ocr --config runs/sweep-ocr/best.yaml                # use the winner

The first trial is the preset (or --config / flags); the others sample the ranges. The dataset flags
are jobs/align.py's; --out defaults to runs/sweep-TASK. Rerun the same command to resume a stopped sweep.
"""

import argparse
import sys

from gdro_ray.align import add_align_arguments, align_from_arguments
from gdro_ray.cli import add_dataclass_arguments, from_arguments
from gdro_ray.console import add_verbose_argument, set_verbose
from gdro_ray.ray_session import init_ray
from gdro_ray.resource_plan import ResourcePlanError
from gdro_ray.sweep import SweepSettings, run_sweep


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_align_arguments(parser)
    add_dataclass_arguments(parser.add_argument_group("sweep"), SweepSettings)
    add_verbose_argument(parser)
    args = parser.parse_args(argv)
    set_verbose(args.verbose)
    train, align = align_from_arguments(parser, args)
    if not args.out:
        align.out = f"runs/sweep-{train.task}"
    try:
        sweep = from_arguments(args, SweepSettings)
        align.check_group_size(max(sweep.k_choices))
    except ValueError as error:
        parser.error(str(error))
    return train, align, sweep


def main(argv=None) -> dict:
    train, align, sweep = parse_args(argv)
    init_ray(dashboard=True)
    try:
        best = run_sweep(train, align, sweep)
    except ResourcePlanError as error:
        sys.exit(f"sweep: {error}")
    print(f"best settings ({align.out}/best.yaml): {best}")
    return best


if __name__ == "__main__":
    main()
