"""Rectified-flow conventions of FLUX (diffusers): noising, velocity targets, timestep sampling.

    x_t = (1 - t) * x0 + t * eps,   v = dx_t/dt = eps - x0,   t in (0, 1), t = 1 is pure noise.

A sampler integrates from t = 1 to 0 with x_{t'} = x_t + (t' - t) * v. GDRO compares the members of a
group at one shared (t, eps), so the noise here is drawn per group and broadcast over its members.
"""

import math
from dataclasses import dataclass

import torch

TIMESTEP_SAMPLERS = ("uniform", "logit_normal", "flux_shift")


@dataclass(frozen=True)
class TimestepSampler:
    """How training draws t.

    kind: "uniform" (t ~ U(0, 1)), "logit_normal" (t = sigmoid(N(mean, std)), SD3's choice), or
    "flux_shift" (t ~ U(0, 1) moved by FLUX's resolution-dependent shift ``shift_mu``, the same
    shift FLUX's scheduler applies to its sampling sigmas).
    """

    kind: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift_mu: float | None = None

    def __post_init__(self):
        if self.kind not in TIMESTEP_SAMPLERS:
            raise ValueError(f"timestep sampler kind must be one of {TIMESTEP_SAMPLERS}, got {self.kind!r}")
        if self.kind == "flux_shift" and self.shift_mu is None:
            raise ValueError("the flux_shift sampler needs shift_mu (the model adapter computes it from the image size)")
        if self.logit_std <= 0:
            raise ValueError(f"logit_std must be > 0, got {self.logit_std}")


def noisy_latents(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t eps, with t (B,) broadcast over the trailing dims of x0."""
    t = _broadcast_like(t, x0)
    return (1 - t) * x0 + t * eps


def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The rectified-flow velocity v = eps - x0."""
    return eps - x0


def time_shift(t: torch.Tensor, mu: float) -> torch.Tensor:
    """FLUX's exponential time shift: e^mu / (e^mu + 1/t - 1); mu > 0 moves t towards noise."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1))


def sample_timesteps(n: int, sampler: TimestepSampler, generator: torch.Generator | None = None) -> torch.Tensor:
    """n timesteps in (0, 1), float32 on the CPU (move them with the latents)."""
    if sampler.kind == "logit_normal":
        normal = torch.randn(n, generator=generator) * sampler.logit_std + sampler.logit_mean
        return torch.sigmoid(normal)
    # Keep uniform draws off the endpoints, where the shift's 1/t is undefined.
    t = torch.rand(n, generator=generator).clamp(1e-5, 1 - 1e-5)
    return time_shift(t, sampler.shift_mu) if sampler.kind == "flux_shift" else t


def sample_group_noise(
    groups: int, latent_shape: tuple[int, ...], sampler: TimestepSampler, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One (t, eps) per group: t (groups,) and eps (groups, *latent_shape), float32 on the CPU."""
    t = sample_timesteps(groups, sampler, generator)
    eps = torch.randn(groups, *latent_shape, generator=generator)
    return t, eps


def noise_groups(x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise every member of each group with its group's (t, eps).

    x0: (B, k, *latent) member latents; t: (B,); eps: (B, *latent).
    Returns x_t and the velocity target v, both (B, k, *latent).
    """
    eps = eps.unsqueeze(1).expand_as(x0).to(x0.dtype)
    t = t.to(x0.dtype).unsqueeze(1).expand(x0.shape[:2])
    return noisy_latents(x0, eps, t), velocity_target(x0, eps)


def sde_transition(x: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
                   noise_level: float, sigma_cap: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flow-GRPO's SDE form of one Euler step from sigma to sigma_next (< sigma): the Gaussian transition
    x_next ~ N(mean, std^2) with the same marginals as the ODE. Returns (mean, std, sigma_t), std the transition's
    and sigma_t = noise_level * sqrt(sigma / (1 - sigma)) its noise scale per unit time (sigma = 1 taken as
    sigma_cap, the sampler's next sigma, where the formula divides by zero). sigma, sigma_next: (B,) or scalars.

        mean = x (1 + sigma_t^2 dt / (2 sigma)) + v (1 + sigma_t^2 (1 - sigma) / (2 sigma)) dt,  dt = sigma_next - sigma
        std  = sigma_t sqrt(-dt)

    As noise_level -> 0 the mean is the Euler step x + v dt and std -> 0. Computed in float32 or wider.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    x, velocity = x.to(dtype), velocity.to(dtype)
    sigma, sigma_next = _broadcast_like(sigma, x), _broadcast_like(sigma_next, x)
    dt = sigma_next - sigma
    noise_scale = noise_level * torch.sqrt(sigma / (1 - torch.where(sigma >= 1, torch.full_like(sigma, sigma_cap), sigma)))
    mean = (x * (1 + noise_scale**2 / (2 * sigma) * dt)
            + velocity * (1 + noise_scale**2 * (1 - sigma) / (2 * sigma)) * dt)
    return mean, noise_scale * torch.sqrt(-dt), noise_scale


def transition_log_prob(sample: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """The Gaussian log-density of sample under N(mean, std^2), averaged over all dims but the first (B,), as
    Flow-GRPO averages it (a per-element log-probability keeps ratios on one scale for any image size)."""
    std = std.expand_as(mean)
    log_density = -((sample.to(mean.dtype) - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return log_density.flatten(1).mean(dim=1)


def _broadcast_like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    return t.reshape(t.shape + (1,) * (x.dim() - t.dim()))
