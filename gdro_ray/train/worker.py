"""The training loop that runs on every Ray Train worker, in the order a reader follows it:

    setup     the model with a fresh LoRA, optimiser, schedule, DeepSpeed or DDP, EMA of the LoRA
    restore   the latest checkpoint's weights, optimiser, EMA, step and random state, if there is one
    step      per micro-batch: B groups from this worker's shard, k members drawn per group, one (t, eps)
              per group, policy and reference velocities, the objective's loss in float32; a non-finite
              loss on any worker skips the micro-batch on all of them (collectives stay in step), and
              max_nonfinite_steps in a row stop the run before the LoRA is corrupted
    evaluate  with an evaluator handed in by the recipe, rank 0 scores the EMA LoRA on held-out prompts
              every eval_every steps (and at step 0: the base model), unmetered
    report    every log_every steps: metrics to Ray Train, TensorBoard and the console, with the compute meter's
              totals over all workers and attempts (gdro_ray.meter); a checkpoint every checkpoint_every
              steps and at the end
"""

import contextlib
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import ray.train
import torch
import torch.distributed as dist
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch.utils.tensorboard import SummaryWriter

from gdro_ray.config import RunConfig, TrainConfig
from gdro_ray.console import StageProgress, quiet_libraries
from gdro_ray.meter import ComputeMeter
from gdro_ray.models import FlowModel, LoraSpec, load_flow_model
from gdro_ray.profiles import profile_for
from gdro_ray.train.groups import Ranking, group_batch, training_columns
from gdro_ray.train.metrics import ranking_agreement
from gdro_ray.train.step import GroupBatch, LossConfig, group_batch_loss
from gdro_ray.train.strategies import DataParallelStrategy, DeepSpeedStrategy

Evaluator = Callable[[FlowModel], dict]  # model -> {"eval_reward": ..., ...}


class NonFiniteLossError(RuntimeError):
    pass


def train_worker(values: dict, evaluator: Evaluator | None = None, progress: StageProgress | None = None) -> None:
    config = TrainConfig(**values)
    run, console, step, writer, last_eval = start(config, evaluator, progress)
    attempt_start = step
    batches = _batches(ray.train.get_dataset_shard("train"), config, run.generator)
    guard, window = NonFiniteGuard(config.max_nonfinite_steps), _Window(run.world)
    end = config.stop_at or config.steps  # a round of the align job ends before the schedule does
    while step < end:
        with run.meter.stage("training"):
            stepped = micro_step(run, next(batches), guard, window, console, step)
        if not stepped:
            continue
        step += 1
        evaluating = evaluator is not None and (step % config.eval_every == 0 or step == end)
        if evaluating:
            last_eval = evaluate(run, evaluator, step, writer)
        checkpointing = step % config.checkpoint_every == 0 or step == end
        if checkpointing or evaluating or step % config.log_every == 0:
            metrics = {"step": step, "attempt_start_step": attempt_start, **window.flush(),
                       "grad_norm": run.strategy.grad_norm(), "lr": run.scheduler.get_last_lr()[0],
                       "skipped_nonfinite": guard.skipped, **largest_worker_memory(run.device), **last_eval}
            report(run, metrics, writer, console, checkpoint=checkpointing)
    if writer is not None:
        writer.close()


def start(config: RunConfig, evaluator: Evaluator | None, progress: StageProgress | None):
    """What every training loop begins with: the run set up and restored, rank 0's console and TensorBoard writer,
    and the latest held-out scores, carried in every later report so schedulers always see them: the base model's
    on a fresh run, the restored checkpoint's on a resumed one (a retried sweep trial's first report must hold its
    metric too). Returns (run, console, step, writer, last_eval)."""
    quiet_libraries()
    run = setup(config)
    console = (progress or StageProgress()) if run.rank == 0 else StageProgress(silent=True)
    step = restore(run, console)
    writer = SummaryWriter(str(config.run_directory / "tensorboard")) if run.rank == 0 else None
    if evaluator is None:
        last_eval = {}
    else:
        last_eval = evaluate(run, evaluator, 0, writer) if step == 0 else run.eval_before
    return run, console, step, writer, last_eval


@dataclass
class WorkerRun:
    """Everything one worker trains with."""

    config: RunConfig
    rank: int
    world: int
    device: torch.device
    model: FlowModel
    trainable: list
    strategy: DeepSpeedStrategy | DataParallelStrategy
    scheduler: object
    ema: EMAModel | None
    generator: torch.Generator
    meter: ComputeMeter  # this worker's work since it started
    metered_before: dict = field(default_factory=dict)  # all workers' totals at the restored checkpoint
    eval_before: dict = field(default_factory=dict)  # the held-out scores the restored checkpoint's report carried
    loss_config: LossConfig | None = None  # made on the first batch: FLUX's timestep shift needs its size


def setup(config: RunConfig) -> WorkerRun:
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    bf16 = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")
    if device.type == "cuda":
        # cuDNN's fused attention failed in backward (illegal address, then a failed mha_graph) for
        # FLUX's bf16 attention on an H200 with torch 2.11; the flash and efficient kernels train fine.
        torch.backends.cuda.enable_cudnn_sdp(False)
    torch.manual_seed(config.seed)  # the same fresh LoRA on every worker
    model = load_flow_model(profile_for(config.model).weights, device=device, revision=config.revision,
                            text_encoders=False)
    model.add_lora(LoraSpec(rank=config.lora_rank, alpha=config.lora_alpha))
    model.set_gradient_checkpointing(config.gradient_checkpointing)
    model.transformer.train()
    trainable = model.trainable_parameters()
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = get_scheduler(config.lr_schedule, optimizer, num_warmup_steps=config.warmup_steps,
                              num_training_steps=config.steps)
    if config.strategy == "deepspeed":
        strategy = DeepSpeedStrategy(model.transformer, optimizer, scheduler, config, bf16)
    else:
        strategy = DataParallelStrategy(model.transformer, optimizer, scheduler, config)
    model.dtype = next(model.transformer.parameters()).dtype  # DeepSpeed's bf16 casts the module
    with strategy.full_parameters():
        ema = EMAModel(trainable, decay=config.ema_decay) if config.ema_decay > 0 else None
    if ema is not None:
        ema.to(device=device, dtype=torch.float32)  # an EMA kept in bf16 would lose its small updates
    generator = torch.Generator().manual_seed(config.seed * 1000 + rank)
    meter = ComputeMeter()
    meter.watch(model.transformer)
    return WorkerRun(config, rank, world, device, model, trainable, strategy, scheduler, ema, generator, meter)


def restore(run: WorkerRun, console: StageProgress) -> int:
    """Load the latest checkpoint into the run; the step to go on from (0 on a fresh run)."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as directory:
        client_state = run.strategy.load(Path(directory))
        if run.ema is not None:
            run.ema.load_state_dict(client_state["ema"])
            run.ema.to(device=run.device, dtype=torch.float32)
        run.metered_before = client_state.get("meter") or {}
        run.eval_before = client_state.get("eval") or {}
        rng_file = Path(directory) / f"rng-{run.rank}.pt"
        if rng_file.exists():  # absent when an elastic restart has more workers than before
            run.generator.set_state(torch.load(rng_file, weights_only=True))
    resized_from = run.strategy.resized_from
    console.message(f"resumed at step {client_state['step']} on {run.world} worker{'s' if run.world > 1 else ''} "
                    f"from {checkpoint.path}"
                    + (f" (saved by {resized_from}: the optimiser's moments start afresh)" if resized_from else ""))
    return client_state["step"]


def micro_step(run: WorkerRun, batch: GroupBatch, guard: "NonFiniteGuard", window: "_Window",
               console: StageProgress, step: int) -> bool:
    """Forward and backward of one micro-batch; True when it completed an optimiser step."""
    if run.loss_config is None:
        config = run.config
        run.loss_config = LossConfig(objective=config.objective, beta=config.beta, tau=config.tau,
                                     gamma=config.gamma, kl=config.kl, reduction=config.reduction,
                                     timesteps=run.model.training_timesteps(config.timesteps, batch.sampler))
    result = group_batch_loss(run.model, batch, run.loss_config, run.generator)
    if not finite_everywhere(result.loss, run.device):
        guard.skip(step)
        console.message(f"step {step}: non-finite loss, micro-batch skipped ({guard.in_a_row} in a row)")
        return False
    guard.reset()
    run.strategy.backward(result.loss)
    run.meter.backward(batch.latents.shape[0] * batch.latents.shape[1])
    window.add(result, batch)
    if not run.strategy.micro_step():
        return False
    if run.ema is not None:
        with run.strategy.full_parameters():
            run.ema.step(run.trainable)
    return True


def evaluate(run: WorkerRun, evaluator: Evaluator, step: int, writer) -> dict:
    """Rank 0 scores the EMA LoRA (every rank takes part in gathering ZeRO-3's parameters)."""
    with run.strategy.full_parameters():
        if run.rank != 0:
            return {}
        with _ema_weights(run.ema, run.trainable), run.meter.paused():
            run.model.transformer.eval()
            scores = evaluator(run.model)
            run.model.transformer.train()
    for name, value in scores.items():
        writer.add_scalar(f"eval/{name.removeprefix('eval_')}", value, step)
    return scores


def report(run: WorkerRun, metrics: dict, writer, console: StageProgress, checkpoint: bool) -> None:
    metered = _metered(run)
    metrics = {**metrics, **metered.metrics()}
    step = metrics["step"]
    if writer is not None:
        for name, value in metrics.items():
            writer.add_scalar(f"train/{name}", value, step)
    console.metrics(step, run.config.steps, metrics)
    if not checkpoint:
        ray.train.report(metrics)
        return
    # Every rank writes its part (DeepSpeed: its optimiser shard) into one checkpoint; rank 0 adds the LoRA
    # and its EMA in diffusers' format, ready to load with the pipeline's load_lora_weights.
    with tempfile.TemporaryDirectory() as directory:
        directory = Path(directory)
        scores = {name: value for name, value in metrics.items() if name.startswith("eval_")}
        run.strategy.save(directory, {"step": step, "ema": run.ema.state_dict() if run.ema is not None else None,
                                      "meter": metered.as_dict(), "eval": scores})
        torch.save(run.generator.get_state(), directory / f"rng-{run.rank}.pt")
        with run.strategy.full_parameters():
            if run.rank == 0:
                run.model.save_lora(directory / "lora")
                if run.ema is not None:
                    with _ema_weights(run.ema, run.trainable):
                        run.model.save_lora(directory / "ema_lora")
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(directory)))


@contextlib.contextmanager
def _ema_weights(ema, trainable):
    """Within this context the LoRA holds its EMA (the weights that get exported), if there is one."""
    if ema is None:
        yield
        return
    ema.store(trainable)
    ema.copy_to(trainable)
    try:
        yield
    finally:
        ema.restore(trainable)


def _batches(shard, config: TrainConfig, generator: torch.Generator):
    """Endless micro-batches of this worker's groups, epoch after epoch, in the first epoch's order. A shard that
    fits in --replay-limit-mb is replayed from memory after the first epoch (restarting a Ray Data stream costs
    seconds, several steps of a small model); a larger one streams every epoch and nothing is kept."""
    columns, cached, ranking = training_columns(config), config.reference == "cached", Ranking.of(config)
    limit = config.replay_limit_mb * 2**20

    def epoch():
        tables = shard.iter_batches(batch_size=config.groups_per_step, batch_format="pyarrow", drop_last=True)
        return (table.select(columns) for table in tables)

    kept, kept_bytes = [], 0
    for table in epoch():
        kept_bytes += table.nbytes
        if kept is not None:
            kept = kept + [table] if kept_bytes <= limit else None  # over the limit: let go of what was kept
        yield group_batch(table.to_pylist(), config.k, generator, cached, ranking)
    while True:
        for table in kept if kept is not None else epoch():
            yield group_batch(table.to_pylist(), config.k, generator, cached, ranking)


def _metered(run: WorkerRun) -> ComputeMeter:
    """The meter's totals: every worker's counts summed, the stages' wall seconds those of the slowest worker (they
    run in lockstep), on top of the totals of the attempts before the restored checkpoint."""
    stages = sorted(run.meter.seconds)
    counts = torch.tensor([run.meter.forward_passes, run.meter.reward_calls], dtype=torch.float64, device=run.device)
    seconds = torch.tensor([run.meter.seconds[name] for name in stages], dtype=torch.float64, device=run.device)
    if dist.is_initialized():
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    now = ComputeMeter(int(counts[0]), int(counts[1]), dict(zip(stages, seconds.tolist())))
    return now.add(run.metered_before) if run.metered_before else now


def largest_worker_memory(device: torch.device) -> dict[str, float]:
    """The largest memory of any worker process, in MiB: resident (worker_rss_mb) and private (worker_private_mb:
    resident less its shared pages). Reading a streamed batch maps its block from Ray's object store, and those
    pages count in the resident size until the store reuses them: the private memory is what the worker holds."""
    memory = psutil.Process().memory_info()
    largest = torch.tensor([memory.rss, memory.rss - memory.shared], dtype=torch.float64, device=device) / 2**20
    if dist.is_initialized():
        dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    return {"worker_rss_mb": float(largest[0]), "worker_private_mb": float(largest[1])}


def finite_everywhere(loss: torch.Tensor, device: torch.device) -> bool:
    finite = torch.tensor([float(torch.isfinite(loss).item())], device=device)
    if dist.is_initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


@dataclass
class NonFiniteGuard:
    """Counts skipped micro-batches; too many in a row stop the run."""

    limit: int
    in_a_row: int = 0
    skipped: int = 0

    def skip(self, step: int) -> None:
        self.in_a_row, self.skipped = self.in_a_row + 1, self.skipped + 1
        if self.in_a_row >= self.limit:
            raise NonFiniteLossError(
                f"{self.in_a_row} non-finite losses in a row at step {step}: stopping before the LoRA is "
                "corrupted. Lower beta or the learning rate, or check the dataset's latents and rewards."
            )

    def reset(self) -> None:
        self.in_a_row = 0


@dataclass
class _Window:
    """Metrics averaged over the micro-batches since the last report."""

    workers: int
    sums: dict = field(default_factory=dict)
    count: int = 0
    samples: int = 0
    started: float = field(default_factory=time.perf_counter)

    def add(self, result, batch) -> None:
        values = {"loss": result.loss.item(), "loss_group": result.group.item(), "loss_top1": result.top1.item()}
        if result.scores is not None:
            values |= ranking_agreement(result.scores.cpu(), batch.rewards, batch.mask)
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
        self.count += 1
        self.samples += batch.latents.shape[0] * batch.latents.shape[1]

    def flush(self) -> dict:
        seconds = time.perf_counter() - self.started
        metrics = {name: total / max(self.count, 1) for name, total in self.sums.items()}
        # Images through the objective per second, all workers together (they run in lockstep).
        metrics["samples_per_second"] = self.workers * self.samples / seconds if seconds > 0 else 0.0
        self.sums, self.count, self.samples, self.started = {}, 0, 0, time.perf_counter()
        return metrics
