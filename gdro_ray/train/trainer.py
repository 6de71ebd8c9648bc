"""Ray Train wiring: the group dataset, workers, failure handling and the exported LoRA.

    TorchTrainer(train_worker) over datasets={"train": ranked groups, read a shard at a time}
      ScalingConfig(num_workers or (min, max) for elastic runs, cpus_per_worker and a GPU each), FailureConfig
      RunConfig(storage_path, name): rerunning the same name resumes from its latest checkpoint
    -> run_directory/lora (the EMA LoRA, diffusers' format) and run_directory/config.yaml
"""

import contextlib
import dataclasses
import functools
import json
import shutil
from pathlib import Path

import ray
import ray.train
from ray.train.torch import TorchTrainer

from gdro_ray.config import RunConfig, TrainConfig, save_yaml
from gdro_ray.console import StageConsole
from gdro_ray.data.shards import shard_paths
from gdro_ray.resource_plan import cluster_ready_for, read_capacity, training_plan, uses_gpus, worker_resources
from gdro_ray.train.groups import (
    Ranking, check_enough_groups, check_reference_cache, ranked_prompt_ids, read_ranked_groups, resolve_ranking,
    training_columns,
)
from gdro_ray.train.worker import Evaluator, train_worker


def group_dataset(config: TrainConfig) -> tuple[ray.data.Dataset, dict]:
    """The groups that carry a ranking, as a Ray Dataset of the columns training reads.

    One read task at a time, each a shard, asking for no CPU of its own: the training plan leaves reader_cpus free
    for it. A task that asked for CPUs would wait on Ray Data's budget, which is what Ray's autoscaling coordinator
    reserves for it: what it last asked for, plus a whole-CPU share of what the workers leave on a node. Beside 2
    workers of 0.75 CPU on 2 CPUs that share rounds down to none, and once Ray Data stopped asking (its reads ran
    ahead of training), its budget fell to zero and training waited for data forever (after 16 steps of a
    5,000-group dataset). read_parquet would also list the files in a task of one whole CPU.
    """
    check_reference_cache(config)
    ids, counts = ranked_prompt_ids(config.data, config.k, Ranking.of(config))
    check_enough_groups(len(ids), config.max_workers or config.num_workers, config.groups_per_step)
    shards = ray.data.from_items([{"path": str(path)} for path in shard_paths(config.data)])
    dataset = shards.map_batches(read_ranked_groups, batch_size=1, num_cpus=0, concurrency=1,
                                 fn_kwargs={"prompt_ids": ids, "columns": training_columns(config)})
    return dataset, counts


def run_training(config: TrainConfig, evaluator: Evaluator | None = None, callbacks: list | None = None, log=print,
                 wait_for_cluster: bool = True, console: bool = True) -> ray.train.Result:
    """Train (or resume) config.name. evaluator: held-out scoring every eval_every steps (the recipe's); callbacks
    join the RunConfig (a Tune trial passes TuneReportCallback); console: a progress bar and metric lines here
    (a sweep's trials have none). First makes sure the cluster holds the training plan
    (resource_plan.cluster_ready_for), unless told not to."""
    config = resolve_ranking(config)
    dataset, counts = group_dataset(config)
    log(f"[train] dataset {config.data}: {json.dumps(counts)}")
    return fit(train_worker, config, evaluator, callbacks, log, wait_for_cluster, console, datasets={"train": dataset})


def fit(worker_loop, config: RunConfig, evaluator: Evaluator | None = None, callbacks: list | None = None, log=print,
        wait_for_cluster: bool = True, console: bool = True, **trainer_options) -> ray.train.Result:
    """Run worker_loop(values, evaluator, progress) on the run's workers with Ray Train (resuming config.name from
    its latest checkpoint), then export its LoRA. trainer_options: the TorchTrainer's datasets, if any."""
    use_gpu = uses_gpus(config.use_gpu, read_capacity())
    workers = config.num_workers if config.max_workers is None else (config.num_workers, config.max_workers)
    progress = StageConsole(config.steps, "train", "step") if console else None
    worker = functools.partial(worker_loop, evaluator=evaluator if config.eval_every else None,
                               progress=progress.remote if progress else None)
    trainer = TorchTrainer(
        worker,
        train_loop_config=dataclasses.asdict(config),
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                               resources_per_worker=worker_resources(config, use_gpu),
                                               elastic_resize_monitor_interval_s=config.resize_check_s),
        run_config=ray.train.RunConfig(
            name=config.name,
            storage_path=str(Path(config.storage_path).resolve()),
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures, controller_failure_limit=3),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
        ),
        **trainer_options,
    )
    plan = training_plan(config, use_gpu)
    with cluster_ready_for(plan, log) if wait_for_cluster else contextlib.nullcontext(), \
            progress or contextlib.nullcontext():
        result = trainer.fit()
    export_lora(result.checkpoint, config)
    return result


def export_lora(checkpoint: ray.train.Checkpoint, config: RunConfig, out: Path | None = None) -> Path:
    """Copy the (EMA) LoRA out of a checkpoint, with the config used beside it (default: RUN/lora)."""
    out = out or config.run_directory / "lora"
    with checkpoint.as_directory() as directory:
        source = Path(directory) / ("ema_lora" if config.ema_decay > 0 else "lora")
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(source, out)
    save_yaml(config, out / "config.yaml")
    return out
