"""The online baseline in the same framework: Flow-GRPO on the same model adapter, rewards, prompts and Ray Train
workers as the align job, with the same checkpoints, EMA, metrics, evaluations and compute meter.

    python jobs/online.py --method flow-grpo --task ocr                   # the embedded tiny FLUX, local Ray
    ray job submit --working-dir . -- python jobs/online.py --method flow-grpo --task geneval \\
        --model black-forest-labs/FLUX.1-dev --num-workers 8 --judge-model CodeGoat24/UnifiedReward-qwen-7b

Each worker samples its prompts' groups with the current LoRA through the SDE sampler, scores them with the task
reward and trains on the sampled transitions (Flow-GRPO's clipped policy ratio and KL to the reference). Settings
come from Flow-GRPO's published configs (the preset), then --config YAML, then flags. One run directory (--out,
default runs/online-TASK); rerun the same command to resume.
"""

import argparse
import sys

from gdro_ray.cli import add_dataclass_arguments, from_arguments, values_given
from gdro_ray.config import OnlineConfig, add_arguments, config_from_arguments
from gdro_ray.console import add_verbose_argument, set_verbose
from gdro_ray.evaluate import format_table
from gdro_ray.models import SamplerSettings
from gdro_ray.online.recipe import OnlineSettings, run_online
from gdro_ray.profiles import TASKS, profile_for
from gdro_ray.ray_session import init_ray
from gdro_ray.resource_plan import ResourcePlanError


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, OnlineConfig)
    add_dataclass_arguments(parser.add_argument_group("sampler of evaluations (default: the model's own)"),
                            SamplerSettings)
    add_dataclass_arguments(parser.add_argument_group("prompts and evaluation"), OnlineSettings, skip=("sampler",))
    add_verbose_argument(parser)
    args = parser.parse_args(argv)
    set_verbose(args.verbose)
    if args.task not in (None, *TASKS):
        parser.error(f"--task must be one of {TASKS}, got {args.task!r}")
    try:
        config = config_from_arguments(args, OnlineConfig)
        sampler = profile_for(config.model).sampler.with_overrides(**values_given(args, SamplerSettings))
        settings = from_arguments(args, OnlineSettings, skip=("sampler",), sampler=sampler)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    return config, settings


def main(argv=None) -> dict:
    config, settings = parse_args(argv)
    init_ray()
    try:
        summary = run_online(config, settings)
    except ResourcePlanError as error:
        sys.exit(f"online: {error}")
    print(format_table(summary))
    print("compute:", summary["compute"]["total"])
    return summary


if __name__ == "__main__":
    main()
