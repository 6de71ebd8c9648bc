"""Train a LoRA with GDRO on an offline group dataset, on Ray Train with DeepSpeed.

    python jobs/train.py --data runs/ocr-groups --task ocr --preset paper --steps 100 --num-workers 2
    python jobs/train.py --config my.yaml --beta 6          # YAML, then flags on top

Every TrainConfig field is a flag (see --help). Rerunning with the same --name and --storage-path
resumes from the latest checkpoint. The EMA LoRA lands in STORAGE/NAME/lora in diffusers' format.
"""

import argparse
import sys

from gdro_ray.config import add_arguments, config_from_arguments
from gdro_ray.ray_session import init_ray
from gdro_ray.resource_plan import ResourcePlanError
from gdro_ray.train.trainer import run_training


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    config = config_from_arguments(parser.parse_args(argv))
    if not config.data:
        parser.error("--data (a group dataset directory) is required")
    init_ray()
    try:
        result = run_training(config)
    except ResourcePlanError as error:
        sys.exit(f"train: {error}")
    print(f"[gdro train] finished at step {result.metrics['step']}; LoRA: {config.run_directory / 'lora'}")


if __name__ == "__main__":
    main()
