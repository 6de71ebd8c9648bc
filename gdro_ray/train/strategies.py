"""How gradients become optimiser steps across workers: DeepSpeed ZeRO, or plain data parallelism.

Both wrap the same pieces (the transformer, an AdamW over the LoRA, a learning-rate schedule) behind
the calls the training loop makes per micro-batch: backward(loss), then micro_step(), which returns
True when an optimiser step happened (every grad_accumulation micro-batches). The model is still
called directly, so the adapter's velocity() works unchanged under both.
"""

import contextlib
from pathlib import Path

import torch
import torch.distributed as dist

from gdro_ray.config import RunConfig

STATE_TAG = "state"


class DeepSpeedStrategy:
    """ZeRO stage 2 (default) or 3, bf16 on GPUs; on CPUs it runs over gloo with a torch AdamW."""

    def __init__(self, module, optimizer, scheduler, config: RunConfig, bf16: bool):
        import deepspeed

        ds_config = {
            "train_micro_batch_size_per_gpu": config.micro_batch,
            "gradient_accumulation_steps": config.accumulation,
            "zero_optimization": {"stage": config.zero_stage},
            "bf16": {"enabled": bf16},
            "zero_allow_untested_optimizer": True,  # a torch AdamW: DeepSpeed's CPU Adam needs a compiler
            "steps_per_print": 2**31 - 1,
        }
        if config.max_grad_norm > 0:
            ds_config["gradient_clipping"] = config.max_grad_norm
        self.stage = config.zero_stage
        self.resized_from: int | None = None  # the workers of a checkpoint saved by another number of them
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
        )
        self.parameters = [p for p in module.parameters() if p.requires_grad]

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def micro_step(self) -> bool:
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        return boundary

    def grad_norm(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def full_parameters(self):
        """Within this context the LoRA parameters hold their full values (ZeRO-3 partitions them)."""
        if self.stage == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(self.parameters, modifier_rank=0)
        return contextlib.nullcontext()

    def save(self, directory: Path, client_state: dict) -> None:
        self.engine.save_checkpoint(str(directory), tag=STATE_TAG, client_state=client_state)

    def load(self, directory: Path) -> dict:
        """The checkpoint's state. ZeRO partitions the optimiser's moments by worker, so an elastic restart on
        another number of workers loads the LoRA, the schedule and the client state, and the moments start afresh
        (resized_from names the workers that saved them); ZeRO-3 also partitions the weights, and refuses."""
        saved = len(list((Path(directory) / STATE_TAG).glob("zero_pp_rank_*_optim_states.pt")))
        world = dist.get_world_size() if dist.is_initialized() else 1
        self.resized_from = saved if saved != world else None
        if self.resized_from and self.stage == 3:
            raise RuntimeError(f"{directory} holds ZeRO-3 state of {saved} workers, which cannot resume on {world}: "
                               f"rerun with --num-workers {saved}, or train elastic runs with --zero-stage 2")
        _, client_state = self.engine.load_checkpoint(str(directory), tag=STATE_TAG,
                                                      load_optimizer_states=self.resized_from is None)
        return client_state


class DataParallelStrategy:
    """Each worker holds the whole model; LoRA gradients are averaged with one all-reduce per step."""

    resized_from = None  # its checkpoint holds the whole state, whatever the number of workers

    def __init__(self, module, optimizer, scheduler, config: RunConfig):
        self.module, self.optimizer, self.scheduler = module, optimizer, scheduler
        self.parameters = [p for p in module.parameters() if p.requires_grad]
        self.accumulation, self.max_grad_norm = config.accumulation, config.max_grad_norm
        self.micro_steps, self.last_norm = 0, float("nan")

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulation).backward()

    def micro_step(self) -> bool:
        self.micro_steps += 1
        if self.micro_steps % self.accumulation:
            return False
        if dist.is_initialized() and dist.get_world_size() > 1:
            for parameter in self.parameters:
                if parameter.grad is not None:
                    dist.all_reduce(parameter.grad)
                    parameter.grad /= dist.get_world_size()
        limit = self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
        self.last_norm = float(torch.nn.utils.clip_grad_norm_(self.parameters, limit))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def grad_norm(self) -> float:
        return self.last_norm

    def full_parameters(self):
        return contextlib.nullcontext()

    def save(self, directory: Path, client_state: dict) -> None:
        if not dist.is_initialized() or dist.get_rank() == 0:
            state = {
                "trainable": [p.detach().cpu() for p in self.parameters],
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "micro_steps": self.micro_steps,
                "client_state": client_state,
            }
            torch.save(state, Path(directory) / f"{STATE_TAG}.pt")

    def load(self, directory: Path) -> dict:
        state = torch.load(Path(directory) / f"{STATE_TAG}.pt", map_location="cpu", weights_only=False)
        with torch.no_grad():
            for parameter, saved in zip(self.parameters, state["trainable"], strict=True):
                parameter.copy_(saved)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.micro_steps = state["micro_steps"]
        return state["client_state"]
