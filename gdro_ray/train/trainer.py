"""Ray Train wiring: the group dataset, workers, failure handling and the exported LoRA.

    TorchTrainer(train_worker) over datasets={"train": ranked groups}
      ScalingConfig(num_workers or (min, max) for elastic runs), FailureConfig(max_failures)
      RunConfig(storage_path, name): rerunning the same name resumes from its latest checkpoint
    -> run_directory/lora (the EMA LoRA, diffusers' format) and run_directory/config.yaml
"""

import dataclasses
import json
import shutil
from pathlib import Path

import ray
import ray.train
from ray.data.expressions import col
from ray.train.torch import TorchTrainer

from gdro_ray.config import TrainConfig, save_yaml
from gdro_ray.data.shards import shard_paths
from gdro_ray.train.groups import TRAINING_COLUMNS, check_enough_groups, ranked_prompt_ids
from gdro_ray.train.worker import train_worker


def group_dataset(config: TrainConfig) -> tuple[ray.data.Dataset, dict]:
    """The groups that carry a ranking, as a Ray Dataset of the columns training reads."""
    ids, counts = ranked_prompt_ids(config.data, config.k)
    check_enough_groups(len(ids), config.max_workers or config.num_workers, config.groups_per_step)
    paths = [str(path) for path in shard_paths(config.data)]
    dataset = ray.data.read_parquet(paths, columns=TRAINING_COLUMNS).filter(expr=col("prompt_id").is_in(ids))
    return dataset, counts


def run_training(config: TrainConfig, callbacks: list | None = None) -> ray.train.Result:
    """Train (or resume) config.name; callbacks join the RunConfig (a Tune trial passes TuneReportCallback)."""
    dataset, counts = group_dataset(config)
    print(f"[gdro train] dataset {config.data}: {json.dumps(counts)}", flush=True)
    use_gpu = config.use_gpu if config.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    workers = config.num_workers if config.max_workers is None else (config.num_workers, config.max_workers)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=dataclasses.asdict(config),
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu),
        run_config=ray.train.RunConfig(
            name=config.name,
            storage_path=str(Path(config.storage_path).resolve()),
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures, controller_failure_limit=3),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
        ),
        datasets={"train": dataset},
    )
    result = trainer.fit()
    export_lora(result.checkpoint, config)
    return result


def export_lora(checkpoint: ray.train.Checkpoint, config: TrainConfig, out: Path | None = None) -> Path:
    """Copy the (EMA) LoRA out of a checkpoint, with the config used beside it (default: RUN/lora)."""
    out = out or config.run_directory / "lora"
    with checkpoint.as_directory() as directory:
        source = Path(directory) / ("ema_lora" if config.ema_decay > 0 else "lora")
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(source, out)
    save_yaml(config, out / "config.yaml")
    return out
