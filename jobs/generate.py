"""Generate and score the offline group dataset: k images per prompt, their rewards, Parquet shards.

    python jobs/generate.py --task ocr --num-prompts 32 --k 16 --out runs/ocr-groups          # local Ray
    RAY_ADDRESS=auto python jobs/generate.py --task geneval --model black-forest-labs/FLUX.1-dev \\
        --generation-actors 1,8 --out s3://...                                                  # a cluster

Rerunning the same command resumes: prompts already written are skipped.
"""

import argparse
import json
import sys

from gdro_ray.cli import add_dataclass_arguments, from_arguments, values_given
from gdro_ray.console import add_verbose_argument, set_verbose
from gdro_ray.generation import GenerationConfig, generate_groups
from gdro_ray.models import SamplerSettings
from gdro_ray.profiles import profile_for
from gdro_ray.ray_session import init_ray
from gdro_ray.resource_plan import ResourcePlanError


def parse_args(argv=None) -> tuple[GenerationConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_arguments(parser, GenerationConfig, skip=("sampler",))
    add_dataclass_arguments(parser.add_argument_group("sampler (default: the model's own)"), SamplerSettings)
    parser.add_argument("--overwrite", action="store_true", help="delete a dataset made with other settings")
    parser.add_argument("--no-progress", action="store_true")
    add_verbose_argument(parser)
    args = parser.parse_args(argv)
    try:
        model = args.model or GenerationConfig.model
        sampler = profile_for(model).sampler.with_overrides(**values_given(args, SamplerSettings))
        config = from_arguments(args, GenerationConfig, skip=("sampler",), sampler=sampler)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    return config, args


def main(argv=None):
    config, args = parse_args(argv)
    set_verbose(args.verbose)
    init_ray()
    try:
        manifest = generate_groups(config, overwrite=args.overwrite, progress=not args.no_progress)
    except ResourcePlanError as error:
        sys.exit(f"generate: {error}")
    print(json.dumps({"out": config.out, **manifest["counts"]}, indent=2))


if __name__ == "__main__":
    main()
