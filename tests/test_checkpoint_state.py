"""Saving and loading training state restores it exactly: LoRA weights, optimiser moments, schedule."""

import os

import pytest
import torch
import torch.distributed as dist
from diffusers.optimization import get_scheduler

from conftest import free_port, sampler
from gdro_ray.config import TrainConfig
from gdro_ray.models import FluxModel, LoraSpec
from gdro_ray.train.strategies import DataParallelStrategy, DeepSpeedStrategy


@pytest.fixture(scope="module")
def process_group():
    """A one-process gloo group, as Ray Train sets up on each CPU worker."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def make_strategy(kind, tiny_flux_dir, config):
    model = FluxModel.from_pretrained(str(tiny_flux_dir), device="cpu")
    torch.manual_seed(0)
    model.add_lora(LoraSpec(rank=4, alpha=4))
    trainable = model.trainable_parameters()
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=2, num_training_steps=10)
    if kind == "deepspeed":
        return model, DeepSpeedStrategy(model.transformer, optimizer, scheduler, config, bf16=False)
    return model, DataParallelStrategy(model.transformer, optimizer, scheduler, config)


def train_steps(model, strategy, steps):
    generator = torch.Generator().manual_seed(1)
    prompts = model.encode_prompts(["a red cube"])
    for _ in range(steps):
        latents = torch.randn(2, 64, 16, generator=generator)
        loss = model.velocity(latents, torch.rand(2, generator=generator), prompts.select([0, 0]), sampler()).square().mean()
        strategy.backward(loss)
        strategy.micro_step()


def optimizer_state(strategy):
    optimizer = getattr(strategy.optimizer, "optimizer", strategy.optimizer)  # DeepSpeed wraps it
    return [{k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for s in optimizer.state.values()]


@pytest.mark.parametrize("kind", ["deepspeed", "ddp"])
def test_saved_state_loads_back_identically(process_group, tiny_flux_dir, tmp_path, kind):
    config = TrainConfig(groups_per_step=2, zero_stage=2, max_grad_norm=1.0)
    model, strategy = make_strategy(kind, tiny_flux_dir, config)
    train_steps(model, strategy, 3)
    strategy.save(tmp_path, {"step": 3})

    fresh_model, fresh = make_strategy(kind, tiny_flux_dir, config)
    assert not all(torch.equal(a, b) for a, b in zip(fresh_model.trainable_parameters(), model.trainable_parameters()))
    assert fresh.load(tmp_path)["step"] == 3
    for saved, loaded in zip(model.trainable_parameters(), fresh_model.trainable_parameters(), strict=True):
        assert torch.equal(saved, loaded)
    for saved, loaded in zip(optimizer_state(strategy), optimizer_state(fresh), strict=True):
        assert saved.keys() == loaded.keys()
        for key in saved:
            assert torch.equal(torch.as_tensor(saved[key]), torch.as_tensor(loaded[key])), key
    assert fresh.scheduler.get_last_lr() == strategy.scheduler.get_last_lr()

    # And both continue identically.
    train_steps(model, strategy, 1)
    train_steps(fresh_model, fresh, 1)
    for a, b in zip(model.trainable_parameters(), fresh_model.trainable_parameters()):
        assert torch.equal(a, b)
