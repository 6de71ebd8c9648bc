"""Train a LoRA with GDRO on an offline group dataset, on Ray Train with DeepSpeed.

    python jobs/train.py --data runs/ocr-groups --task ocr --preset paper --steps 100 --num-workers 2
    python jobs/train.py --config my.yaml --beta 6          # YAML, then flags on top

Every TrainConfig field is a flag (see --help). Rerunning with the same --name and --storage-path
resumes from the latest checkpoint. The EMA LoRA lands in STORAGE/NAME/lora in diffusers' format.
With --eval-set (an evaluation set directory, as the align job writes in RUN/eval_set) and --eval-every,
held-out scores are measured during training.
"""

import argparse
import sys

from gdro_ray.config import add_arguments, config_from_arguments
from gdro_ray.console import add_verbose_argument, set_verbose
from gdro_ray.data.manifest import read_dataset_manifest
from gdro_ray.periodic_eval import PeriodicEvaluator
from gdro_ray.ray_session import init_ray
from gdro_ray.resource_plan import ResourcePlanError
from gdro_ray.train.trainer import run_training


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    add_verbose_argument(parser)
    args = parser.parse_args(argv)
    try:
        config = config_from_arguments(args)
        if not config.data:
            raise ValueError("--data (a group dataset directory) is required")
        images_per_prompt = read_dataset_manifest(config.data)["identity"]["k"]
        if config.k > images_per_prompt:
            raise ValueError(f"k ({config.k}) is larger than the {images_per_prompt} images per prompt of the "
                             f"dataset in {config.data!r}: lower --k")
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    set_verbose(args.verbose)
    init_ray()
    evaluator = PeriodicEvaluator(config.eval_set) if config.eval_set and config.eval_every else None
    try:
        result = run_training(config, evaluator=evaluator)
    except ResourcePlanError as error:
        sys.exit(f"train: {error}")
    print(f"finished at step {result.metrics['step']}; LoRA: {config.run_directory / 'lora'}")


if __name__ == "__main__":
    main()
