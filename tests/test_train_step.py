import math

import pytest
import torch

from conftest import sampler
from gdro_ray.flow import TimestepSampler, noise_groups, sample_group_noise
from gdro_ray.models import LoraSpec
from gdro_ray.objective import OBJECTIVES, velocity_error
from gdro_ray.train.step import GroupBatch, LossConfig, group_batch_loss


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
    config = LossConfig(beta=10.0, gamma=0.0, timesteps=TimestepSampler("uniform"))
    result = group_batch_loss(tiny_flux, batch, config, torch.Generator().manual_seed(1))
    assert torch.equal(result.scores, torch.zeros(2, 3))
    assert result.group.item() == pytest.approx(math.log(6))
    assert result.loss.item() == pytest.approx(math.log(6))
    result.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tiny_flux.trainable_parameters())


@pytest.mark.parametrize("objective, expected", [("pl", math.log(6)), ("dpo", math.log(2)), ("dgpo", math.log(2))])
def test_each_group_loss_starts_from_its_value_at_equal_scores(tiny_flux, objective, expected):
    tiny_flux.add_lora(LoraSpec(rank=4, alpha=4))
    config = LossConfig(objective=objective, beta=10.0, gamma=0.0)
    result = group_batch_loss(tiny_flux, group_batch(tiny_flux), config, torch.Generator().manual_seed(1))
    assert result.group.item() == pytest.approx(expected)


def test_sft_is_the_best_members_flow_matching_loss_without_a_reference(tiny_flux, monkeypatch):
    tiny_flux.add_lora(LoraSpec(rank=4, alpha=4))
    batch = group_batch(tiny_flux)
    monkeypatch.setattr(type(tiny_flux), "reference", lambda self: pytest.fail("sft ran the reference"))
    result = group_batch_loss(tiny_flux, batch, LossConfig(objective="sft", gamma=0.0),
                              torch.Generator().manual_seed(3))
    assert result.scores is None
    # By hand: the same (t, eps) draw, the best member of each group only.
    t, eps = sample_group_noise(2, tuple(batch.latents.shape[2:]), LossConfig().timesteps,
                                torch.Generator().manual_seed(3))
    best = batch.rewards.argmax(-1)
    x0 = batch.latents[torch.arange(2), best].unsqueeze(1)
    x_t, target = noise_groups(x0, t, eps)
    prediction = tiny_flux.velocity(x_t.flatten(0, 1), t, batch.prompts, batch.sampler)
    torch.testing.assert_close(result.loss, velocity_error(prediction, target.flatten(0, 1)).mean())


def test_the_kl_term_is_zero_at_the_reference_and_adds_its_weighted_distance_after(tiny_flux):
    tiny_flux.add_lora(LoraSpec(rank=4, alpha=4))
    batch = group_batch(tiny_flux)

    def loss(kl):
        config = LossConfig(objective="dgpo", gamma=0.0, kl=kl)
        return group_batch_loss(tiny_flux, batch, config, torch.Generator().manual_seed(4)).loss

    assert loss(0.5).item() == pytest.approx(loss(0.0).item())  # a fresh LoRA is the reference
    with torch.no_grad():
        for parameter in tiny_flux.trainable_parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    extra = loss(0.5) - loss(0.0)
    assert extra.item() > 0 and (loss(1.0) - loss(0.0)).item() == pytest.approx(2 * extra.item(), rel=1e-3)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_padded_members_do_not_touch_the_loss(tiny_flux, objective):
    tiny_flux.add_lora(LoraSpec(rank=4, alpha=4))
    batch = group_batch(tiny_flux, k=4)
    with torch.no_grad():
        for parameter in tiny_flux.trainable_parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    config = LossConfig(objective=objective, beta=10.0, gamma=0.5)
    full = group_batch_loss(tiny_flux, GroupBatch(batch.latents[:, :3], batch.rewards[:, :3], batch.prompts,
                                                  sampler()), config, torch.Generator().manual_seed(2))
    mask = torch.tensor([[True, True, True, False]] * 2)
    batch.latents[:, 3] = float("nan")  # whatever sits in the padding
    batch.mask = mask
    padded = group_batch_loss(tiny_flux, batch, config, torch.Generator().manual_seed(2))
    torch.testing.assert_close(padded.loss, full.loss)
    padded.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in tiny_flux.trainable_parameters())


@pytest.mark.parametrize("field, value", [("beta", 0.0), ("tau", -0.1), ("gamma", -1.0), ("reduction", "max"),
                                          ("objective", "ppo"), ("kl", -0.1)])
def test_loss_config_refuses_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        LossConfig(**{field: value})
