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
from gdro_ray.ray_session import init_ray
from gdro_ray.resource_plan import ResourcePlanError
from gdro_ray.sweep import SweepSettings, run_sweep

RANGES = ("beta", "tau", "gamma", "lr")


def numbers(kind):
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(part) for part in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}") from None
    return parse


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_align_arguments(parser)
    defaults = SweepSettings()
    group = parser.add_argument_group("sweep")
    group.add_argument("--num-samples", type=int, default=defaults.num_samples, help="trials, the preset's included")
    group.add_argument("--max-concurrent-trials", type=int, default=defaults.max_concurrent_trials)
    group.add_argument("--grace-period", type=int, default=defaults.grace_period, help="steps before a trial may stop")
    group.add_argument("--reduction-factor", type=int, default=defaults.reduction_factor)
    for name in RANGES:
        group.add_argument(f"--{name}-range", type=numbers(float), default=getattr(defaults, name), metavar="LOW,HIGH")
    group.add_argument("--k-choices", type=numbers(int), default=defaults.k, metavar="K,K,...")
    group.add_argument("--sweep-seed", type=int, default=defaults.seed)
    args = parser.parse_args(argv)
    train, align = align_from_arguments(parser, args)
    if not args.out:
        align.out = f"runs/sweep-{train.task}"
    try:
        sweep = SweepSettings(num_samples=args.num_samples, max_concurrent_trials=args.max_concurrent_trials,
                              grace_period=args.grace_period, reduction_factor=args.reduction_factor,
                              k=args.k_choices, seed=args.sweep_seed,
                              **{name: getattr(args, f"{name}_range") for name in RANGES})
        align.check_group_size(max(sweep.k))
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
