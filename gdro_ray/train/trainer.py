"""Ray Train wiring: the group dataset, workers, failure handling and the exported LoRA.

    TorchTrainer(train_worker) over datasets={"train": ranked groups, read at reader_cpus}
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
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

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

    Every Ray Data task of it asks for reader_cpus: read_parquet would also list the files in a task of one
    whole CPU, which a cluster whose CPUs the workers hold never gets.
    """
    check_reference_cache(config)
    ids, counts = ranked_prompt_ids(config.data, config.k, Ranking.of(config))
    check_enough_groups(len(ids), config.max_workers or config.num_workers, config.groups_per_step)
    shards = ray.data.from_items([{"path": str(path)} for path in shard_paths(config.data)])
    dataset = shards.map_batches(read_ranked_groups, batch_size=1, num_cpus=config.reader_cpus,
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
    with reserved_reader(dataset, config.reader_cpus, reader_object_store(config.data)):
        return fit(train_worker, config, evaluator, callbacks, log, wait_for_cluster, console,
                   datasets={"train": dataset})


def reader_object_store(data: str | Path) -> int:
    """Bytes of object store for the reader: room for a few of the largest shards (Ray Data budgets half of it),
    and 64 MiB at least, which small data keeps within the 150 MiB object store of Ray's simulated nodes."""
    largest = max(path.stat().st_size for path in shard_paths(data))
    return max(64 * 2**20, 4 * largest)


@contextlib.contextmanager
def reserved_reader(dataset: ray.data.Dataset, cpus: float, object_store: int):
    """The dataset's tasks run in a placement group of the reader's CPUs, held while training runs.

    Left to itself, Ray Data sizes its budget by what Ray's autoscaling coordinator reserves for it: the
    resources it last asked for (while it wants to scale up) and a whole-unit share of what the other requesters
    (training's workers) leave. On a node whose workers leave a fraction of a CPU (2 CPUs, 2 workers of 0.75)
    that share rounds down to none, and once the reader stopped asking, its budget fell to zero mid-epoch and
    training waited for data forever (seen after 16 steps of a 5,000-group dataset). A placement group is a
    budget of its own that nothing takes back. Its bundle also holds some object store (logical accounting only):
    Ray Data takes its memory budget from the same bundle, and with none it reads nothing.
    """
    reader = placement_group([{"CPU": cpus, "object_store_memory": object_store}])
    strategy = PlacementGroupSchedulingStrategy(reader)
    dataset.context.scheduling_strategy = dataset.context.scheduling_strategy_large_args = strategy
    try:
        yield
    finally:
        remove_placement_group(reader)


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
