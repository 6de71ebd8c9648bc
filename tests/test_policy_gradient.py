"""The online baseline's math: the SDE step's Gaussian, the clipped policy ratio, the KL penalty."""

import pytest
import torch

from conftest import sampler
from gdro_ray.flow import sde_transition, transition_log_prob
from gdro_ray.online.rollout import sde_rollout
from gdro_ray.policy_gradient import clipped_policy_loss, transition_kl


def test_the_sde_steps_log_probability_is_the_closed_form_gaussian():
    generator = torch.Generator().manual_seed(0)
    x, velocity = torch.randn(3, 16, 4, generator=generator), torch.randn(3, 16, 4, generator=generator)
    sigma, sigma_next = torch.tensor([1.0, 0.7, 0.3]), torch.tensor([0.9, 0.6, 0.2])
    mean, std, scale = sde_transition(x, velocity, sigma, sigma_next, noise_level=0.7, sigma_cap=0.9)
    sample = mean + std * torch.randn(mean.shape, generator=generator)
    normal = torch.distributions.Normal(mean, std.expand_as(mean))
    expected = normal.log_prob(sample).flatten(1).mean(1)
    torch.testing.assert_close(transition_log_prob(sample, mean, std), expected)
    # By hand for the middle member: sigma_t = 0.7 sqrt(0.7 / 0.3), std = sigma_t sqrt(0.1).
    assert scale[1].item() == pytest.approx(0.7 * (0.7 / 0.3) ** 0.5)
    assert std[1].item() == pytest.approx(0.7 * (0.7 / 0.3) ** 0.5 * 0.1**0.5)
    assert scale[0].item() == pytest.approx(0.7 * (1 / (1 - 0.9)) ** 0.5)  # sigma = 1 capped


def test_without_noise_the_sde_step_is_the_euler_step():
    x, velocity = torch.randn(2, 8, 4), torch.randn(2, 8, 4)
    mean, std, _ = sde_transition(x, velocity, torch.tensor(0.6), torch.tensor(0.5), noise_level=0.0, sigma_cap=0.9)
    torch.testing.assert_close(mean, x - 0.1 * velocity)
    assert (std == 0).all()


def test_the_policy_ratio_is_one_and_unclipped_when_the_policy_sampled_itself():
    log_prob = torch.tensor([-1.2, -0.3, -2.0], requires_grad=True)
    advantages = torch.tensor([1.0, -0.5, 2.0])
    loss, ratio = clipped_policy_loss(log_prob, log_prob.detach(), advantages, clip_range=1e-4)
    assert torch.equal(ratio, torch.ones(3))
    torch.testing.assert_close(loss, -advantages)
    loss.sum().backward()
    torch.testing.assert_close(log_prob.grad, -advantages)  # d(-A ratio)/d log_prob at ratio 1


def test_the_clip_stops_the_gradient_beyond_the_trust_region():
    old = torch.zeros(2)
    log_prob = torch.tensor([0.5, -0.5], requires_grad=True)  # ratios e^0.5 and e^-0.5
    loss, _ = clipped_policy_loss(log_prob, old, torch.tensor([1.0, -1.0]), clip_range=0.2)
    loss.sum().backward()
    assert (log_prob.grad == 0).all()  # both moved past the clip in the advantage's direction


def test_the_kl_penalty_is_zero_at_the_reference_and_grows_with_the_gap():
    mean = torch.randn(2, 8, 4)
    assert torch.equal(transition_kl(mean, mean, torch.tensor(0.5)), torch.zeros(2))
    gap = transition_kl(mean + 0.1, mean, torch.tensor([[[0.5]], [[1.0]]]))
    torch.testing.assert_close(gap, torch.tensor([0.01 / 0.5, 0.01 / 2]))


def test_a_noiseless_rollout_is_the_models_own_sampler(tiny_flux):
    prompt = tiny_flux.encode_prompts(["A"])
    settings = sampler(4)
    rollout = sde_rollout(tiny_flux, prompt, [3, 4], settings, noise_level=0.0)
    torch.testing.assert_close(rollout.final, tiny_flux.generate(prompt, [3, 4], settings).latents.float(),
                               atol=1e-5, rtol=1e-4)
    assert rollout.states.shape[:2] == (2, 5) and rollout.sigmas[0] == 1 and rollout.sigmas[-1] == 0


def test_a_noisy_rollout_repeats_from_its_seeds_and_records_its_log_probabilities(tiny_flux):
    prompt = tiny_flux.encode_prompts(["A"])
    first = sde_rollout(tiny_flux, prompt, [3, 4], sampler(3), noise_level=0.7)
    again = sde_rollout(tiny_flux, prompt, [3, 4], sampler(3), noise_level=0.7)
    torch.testing.assert_close(first.states, again.states)
    assert not torch.allclose(first.final, sde_rollout(tiny_flux, prompt, [3, 4], sampler(3), 0.0).final)
    assert first.log_probs.shape == (2, 3) and torch.isfinite(first.log_probs).all()
