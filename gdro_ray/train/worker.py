"""The GDRO training loop that runs on every Ray Train worker.

Per optimiser step, for each of grad_accumulation micro-batches: B groups from this worker's dataset
shard, k members drawn per group, one (t, eps) per group, policy velocities of all B*k latents in one
forward, reference velocities with the LoRA off under no_grad, L_GDRO + gamma * L_reg in float32. A
non-finite loss on any worker skips that micro-batch on all of them (so collectives stay in step);
max_nonfinite_steps in a row stop the run before the LoRA is corrupted. With an evaluation set, rank 0
samples held-out prompts with the EMA LoRA every eval_every steps (and at step 0, the base model).
"""

import contextlib
import dataclasses
import tempfile
import time
from pathlib import Path

import ray.train
import torch
import torch.distributed as dist
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch.utils.tensorboard import SummaryWriter

from gdro_ray.config import TrainConfig
from gdro_ray.flow import TimestepSampler
from gdro_ray.models import LoraSpec, load_flow_model
from gdro_ray.train.groups import TRAINING_COLUMNS, group_batch
from gdro_ray.train.metrics import ranking_agreement
from gdro_ray.train.periodic_eval import PeriodicEvaluator, load_eval_set
from gdro_ray.train.step import GDROLossConfig, gdro_batch_loss
from gdro_ray.train.strategies import DataParallelStrategy, DeepSpeedStrategy


class NonFiniteLossError(RuntimeError):
    pass


def train_worker(values: dict) -> None:
    config = TrainConfig(**values)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    bf16 = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")
    if device.type == "cuda":
        # cuDNN's fused attention failed in backward (illegal address, then a failed mha_graph) for
        # FLUX's bf16 attention on an H200 with torch 2.11; the flash and efficient kernels train fine.
        torch.backends.cuda.enable_cudnn_sdp(False)
    torch.manual_seed(config.seed)  # the same fresh LoRA on every worker

    model = load_flow_model(config.model, device=device, revision=config.revision, text_encoders=False)
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
    step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            client_state = strategy.load(Path(directory))
            step = client_state["step"]
            if ema is not None:
                ema.load_state_dict(client_state["ema"])
                ema.to(device=device, dtype=torch.float32)
            rng_file = Path(directory) / f"rng-{rank}.pt"
            if rng_file.exists():  # absent when an elastic restart has more workers than before
                generator.set_state(torch.load(rng_file, weights_only=True))
        _log(rank, f"resumed at step {step} from {checkpoint.path}")
    start_step = step

    loss_config = None
    writer = SummaryWriter(str(config.run_directory / "tensorboard")) if rank == 0 else None
    evaluator = PeriodicEvaluator(load_eval_set(config.eval_set)) if config.eval_set and config.eval_every else None
    last_eval = {}  # carried in every later report, so schedulers always see the latest held-out score

    def evaluate(at_step: int) -> dict:
        with strategy.full_parameters():
            if rank != 0:
                return {}
            with _ema_weights(ema, trainable):
                model.transformer.eval()
                scores = evaluator(model)
                model.transformer.train()
        for name, value in scores.items():
            writer.add_scalar(f"eval/{name.removeprefix('eval_')}", value, at_step)
        _log(rank, f"step {at_step}: " + " ".join(f"{k}={v:.4g}" for k, v in scores.items()))
        return scores

    if evaluator is not None and step == 0:
        last_eval = evaluate(0)
    batches = _batches(ray.train.get_dataset_shard("train"), config, generator)
    nonfinite_in_a_row, skipped_total = 0, 0
    window = _Window(world)
    while step < config.steps:
        batch = next(batches)
        if loss_config is None:  # FLUX's timestep shift depends on the dataset's image size
            loss_config = GDROLossConfig(beta=config.beta, tau=config.tau, gamma=config.gamma,
                                         reduction=config.reduction, timesteps=_sampler(config, model, batch))
        result = gdro_batch_loss(model, batch, loss_config, generator)
        if not _finite_everywhere(result.loss, device):
            nonfinite_in_a_row, skipped_total = nonfinite_in_a_row + 1, skipped_total + 1
            _log(rank, f"step {step}: non-finite loss, micro-batch skipped ({nonfinite_in_a_row} in a row)")
            if nonfinite_in_a_row >= config.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"{nonfinite_in_a_row} non-finite losses in a row at step {step}: stopping before the LoRA is "
                    "corrupted. Lower beta or the learning rate, or check the dataset's latents and rewards."
                )
            continue
        nonfinite_in_a_row = 0
        strategy.backward(result.loss)
        window.add(result, batch)
        if not strategy.micro_step():
            continue
        step += 1
        if ema is not None:
            with strategy.full_parameters():
                ema.step(trainable)
        evaluating = evaluator is not None and (step % config.eval_every == 0 or step == config.steps)
        if evaluating:
            last_eval = evaluate(step)
        if step % config.log_every and step % config.checkpoint_every and step != config.steps and not evaluating:
            continue
        metrics = {"step": step, "attempt_start_step": start_step, **window.flush(), "grad_norm": strategy.grad_norm(),
                   "lr": scheduler.get_last_lr()[0], "skipped_nonfinite": skipped_total, **last_eval}
        if writer is not None:
            for name, value in metrics.items():
                writer.add_scalar(f"train/{name}", value, step)
            _log(rank, " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
        if step % config.checkpoint_every == 0 or step == config.steps:
            _report_with_checkpoint(metrics, strategy, model, ema, trainable, generator, step, rank)
        else:
            ray.train.report(metrics)
    if writer is not None:
        writer.close()


def _report_with_checkpoint(metrics, strategy, model, ema, trainable, generator, step, rank) -> None:
    """Every rank writes its part (DeepSpeed: its optimiser shard) into one checkpoint; rank 0 adds the
    LoRA and its EMA in diffusers' format, ready to load with FluxPipeline.load_lora_weights."""
    with tempfile.TemporaryDirectory() as directory:
        directory = Path(directory)
        client_state = {"step": step, "ema": ema.state_dict() if ema is not None else None}
        strategy.save(directory, client_state)
        torch.save(generator.get_state(), directory / f"rng-{rank}.pt")
        with strategy.full_parameters():
            if rank == 0:
                model.save_lora(directory / "lora")
                if ema is not None:
                    with _ema_weights(ema, trainable):
                        model.save_lora(directory / "ema_lora")
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


# A worker whose shard fits in this much memory replays it after the first epoch instead of streaming it
# again: restarting a Ray Data stream costs seconds, several training steps of a small model.
REPLAY_LIMIT_BYTES = 2 * 2**30


def _batches(shard, config: TrainConfig, generator: torch.Generator, replay_limit_bytes: int = REPLAY_LIMIT_BYTES):
    """Endless micro-batches of this worker's groups, epoch after epoch, in the first epoch's order."""

    def epoch():
        tables = shard.iter_batches(batch_size=config.groups_per_step, batch_format="pyarrow", drop_last=True)
        return (table.select(TRAINING_COLUMNS) for table in tables)

    kept, kept_bytes = [], 0
    for table in epoch():
        kept_bytes += table.nbytes
        if kept_bytes <= replay_limit_bytes:
            kept.append(table)
        yield group_batch(table.to_pylist(), config.k, generator)
    replay = kept_bytes <= replay_limit_bytes
    while True:
        for table in kept if replay else epoch():
            yield group_batch(table.to_pylist(), config.k, generator)


def _sampler(config: TrainConfig, model, batch) -> TimestepSampler:
    if config.timesteps == "flux_shift":
        return TimestepSampler("flux_shift", shift_mu=model.timestep_shift_mu(batch.height, batch.width))
    return TimestepSampler(config.timesteps)


def _finite_everywhere(loss: torch.Tensor, device: torch.device) -> bool:
    finite = torch.tensor([float(torch.isfinite(loss).item())], device=device)
    if dist.is_initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def _log(rank: int, message: str) -> None:
    if rank == 0:
        print(f"[gdro train] {message}", flush=True)


@dataclasses.dataclass
class _Window:
    """Metrics averaged over the micro-batches since the last report."""

    workers: int
    sums: dict = dataclasses.field(default_factory=dict)
    count: int = 0
    samples: int = 0
    started: float = dataclasses.field(default_factory=time.perf_counter)

    def add(self, result, batch) -> None:
        values = {"loss": result.loss.item(), "loss_gdro": result.gdro.item(), "loss_top1": result.top1.item(),
                  **ranking_agreement(result.scores.cpu(), batch.rewards, batch.mask)}
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
