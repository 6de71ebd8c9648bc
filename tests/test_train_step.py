import math

import pytest
import torch

from conftest import sampler
from gdro_ray.flow import TimestepSampler
from gdro_ray.models import LoraSpec
from gdro_ray.train.step import GDROLossConfig, GroupBatch, gdro_batch_loss


def group_batch(model, groups=2, k=3):
    prompts = model.encode_prompts([f"prompt {i}" for i in range(groups)])
    latents = torch.stack(
        [
            model.generate(prompts.select([g]), list(range(10 * g, 10 * g + k)), sampler(2)).latents
            for g in range(groups)
        ]
    )
    rewards = torch.rand(groups, k, generator=torch.Generator().manual_seed(0))
    return GroupBatch(latents, rewards, prompts, sampler())


def test_fresh_lora_gives_zero_scores_and_the_uniform_ranking_loss(tiny_flux):
    # With policy == reference every s is 0, so each rank i costs log |R_i|: L_GDRO = log 3 + log 2 = log 3!.
    tiny_flux.add_lora(LoraSpec(rank=4, alpha=4))
    batch = group_batch(tiny_flux)
    config = GDROLossConfig(beta=10.0, gamma=0.0, timesteps=TimestepSampler("uniform"))
    result = gdro_batch_loss(tiny_flux, batch, config, torch.Generator().manual_seed(1))
    assert torch.equal(result.scores, torch.zeros(2, 3))
    assert result.gdro.item() == pytest.approx(math.log(6))
    assert result.loss.item() == pytest.approx(math.log(6))
    result.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tiny_flux.trainable_parameters())


def test_padded_members_do_not_touch_the_loss(tiny_flux):
    tiny_flux.add_lora(LoraSpec(rank=4, alpha=4))
    batch = group_batch(tiny_flux, k=4)
    with torch.no_grad():
        for parameter in tiny_flux.trainable_parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    config = GDROLossConfig(beta=10.0, gamma=0.5)
    full = gdro_batch_loss(tiny_flux, GroupBatch(batch.latents[:, :3], batch.rewards[:, :3], batch.prompts,
                                                  sampler()), config, torch.Generator().manual_seed(2))
    mask = torch.tensor([[True, True, True, False]] * 2)
    batch.latents[:, 3] = float("nan")  # whatever sits in the padding
    batch.mask = mask
    padded = gdro_batch_loss(tiny_flux, batch, config, torch.Generator().manual_seed(2))
    torch.testing.assert_close(padded.loss, full.loss)
    padded.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in tiny_flux.trainable_parameters())


@pytest.mark.parametrize("field, value", [("beta", 0.0), ("tau", -0.1), ("gamma", -1.0), ("reduction", "max")])
def test_loss_config_refuses_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        GDROLossConfig(**{field: value})
