"""Compare objectives on one group dataset and one evaluation: GDRO against hard Plackett-Luce, Diffusion-DPO,
top-1 fine-tuning and DGPO, several seeds each, and the ablations of a setting varied one at a time.

    python jobs/compare.py --task ocr                                         # every method, 3 seeds, tiny world
    python jobs/compare.py --task ocr --methods gdro --seeds 2 --grid k=2,4,8 --grid gamma=0,1 --grid beta=5,20
    ray job submit --working-dir . -- python jobs/compare.py --task geneval \\
        --model black-forest-labs/FLUX.1-dev --num-workers 8 --judge-model CodeGoat24/UnifiedReward-qwen-7b

The dataset and evaluation flags are jobs/align.py's, the training flags apply to every method over its own
preset (--objective is --methods here). --out defaults to runs/compare-TASK; rerunning a command (or another
with more methods, settings or seeds, into the same --out) reads finished runs back and adds the rest.
Writes results.csv, results.md (mean and standard error over seeds) and curves.png.
"""

import argparse
import sys
from pathlib import Path

from gdro_ray.align import add_align_arguments, align_from_arguments
from gdro_ray.cli import add_dataclass_arguments, from_arguments
from gdro_ray.compare import CompareSettings, plan_runs, run_compare, run_config
from gdro_ray.config import config_from_arguments
from gdro_ray.console import add_verbose_argument, set_verbose
from gdro_ray.ray_session import init_ray
from gdro_ray.resource_plan import ResourcePlanError


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_align_arguments(parser)
    group = parser.add_argument_group("comparison")
    add_dataclass_arguments(group, CompareSettings, skip=("grid",))
    group.add_argument("--grid", action="append", default=[], metavar="FIELD=V1,V2,...",
                       help=CompareSettings.__dataclass_fields__["grid"].metadata["help"])
    add_verbose_argument(parser)
    args = parser.parse_args(argv)
    set_verbose(args.verbose)
    if args.objective is not None:
        parser.error("the compare job trains the objectives of --methods; --objective belongs to jobs/align.py")
    first, align = align_from_arguments(parser, args)
    if not args.out:
        align.out = f"runs/compare-{first.task}"
    try:
        settings = from_arguments(args, CompareSettings, skip=("grid",), grid=tuple(args.grid))
        configs = {method: config_from_arguments(argparse.Namespace(**{**vars(args), "objective": method}))
                   for method in settings.methods}
        align.check_group_size(max(run_config(configs, spec).k for spec in plan_runs(configs, settings)))
    except ValueError as error:
        parser.error(str(error))
    return configs, align, settings


def main(argv=None) -> list[dict]:
    configs, align, settings = parse_args(argv)
    init_ray()
    try:
        rows = run_compare(configs, align, settings)
    except ResourcePlanError as error:
        sys.exit(f"compare: {error}")
    print((Path(align.out) / "results.md").read_text())
    return rows


if __name__ == "__main__":
    main()
