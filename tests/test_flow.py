import pytest
import torch

from gdro_ray.flow import TimestepSampler, noise_groups, noisy_latents, sample_group_noise, sample_timesteps, velocity_target


def test_noising_endpoints_and_velocity():
    generator = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 2, 8, 4, generator=generator)
    torch.testing.assert_close(noisy_latents(x0, eps, torch.zeros(2)), x0)
    torch.testing.assert_close(noisy_latents(x0, eps, torch.ones(2)), eps)
    # v is dx_t/dt: a finite difference in t recovers it exactly (x_t is linear in t).
    t = torch.tensor([0.3, 0.7])
    step = (noisy_latents(x0, eps, t + 0.1) - noisy_latents(x0, eps, t)) / 0.1
    torch.testing.assert_close(step, velocity_target(x0, eps), atol=1e-5, rtol=1e-5)


def test_group_members_share_one_t_and_eps():
    x0 = torch.randn(3, 5, 16, 4)
    t, eps = sample_group_noise(3, (16, 4), TimestepSampler("uniform"), torch.Generator().manual_seed(1))
    x_t, v = noise_groups(x0, t, eps)
    assert x_t.shape == v.shape == x0.shape
    # Removing each member's own signal leaves the same t * eps for every member of a group.
    shared = x_t - (1 - t).view(3, 1, 1, 1) * x0
    torch.testing.assert_close(shared, (t.view(3, 1, 1) * eps).unsqueeze(1).expand_as(x0))
    torch.testing.assert_close(v + x0, eps.unsqueeze(1).expand_as(x0))
    assert not torch.allclose(eps[0], eps[1])


def test_timestep_samplers_have_their_distributions():
    generator = torch.Generator().manual_seed(2)
    uniform = sample_timesteps(20000, TimestepSampler("uniform"), generator)
    logit_normal = sample_timesteps(20000, TimestepSampler("logit_normal"), generator)
    shifted = sample_timesteps(20000, TimestepSampler("flux_shift", shift_mu=1.0), generator)
    for t in (uniform, logit_normal, shifted):
        assert ((t > 0) & (t < 1)).all()
    assert uniform.mean().item() == pytest.approx(0.5, abs=0.01)
    assert logit_normal.median().item() == pytest.approx(0.5, abs=0.01)
    assert logit_normal.std() < uniform.std()  # mass concentrated in the middle
    assert shifted.median().item() == pytest.approx(torch.sigmoid(torch.tensor(1.0)).item(), abs=0.01)


def test_sampler_settings_are_checked():
    with pytest.raises(ValueError, match="kind must be one of"):
        TimestepSampler("cosine")
    with pytest.raises(ValueError, match="needs shift_mu"):
        TimestepSampler("flux_shift")
