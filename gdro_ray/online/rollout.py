"""Sampling with the SDE form of the model's own Euler sampler, recording every transition for Flow-GRPO.

The rollout steps through the sigmas generate() uses, from the noise generate() starts from, so with
noise_level 0 it is generate()'s ODE sampler. Each image's transition noise comes from its own seed, so a
rollout repeats exactly.
"""

from dataclasses import dataclass

import torch

from gdro_ray.flow import sde_transition, transition_log_prob
from gdro_ray.models import FlowModel, PromptEmbeddings, SamplerSettings

NOISE_SEED_OFFSET = 1_000_003  # the transition noise's generator seed: the image's seed moved away from its start


@dataclass
class Rollout:
    """k trajectories of one prompt: states (k, S + 1, N, C) at sigmas (S + 1,) from noise to image, the
    log-probability of each sampled transition (k, S) under the sampling policy, float32 on the CPU."""

    states: torch.Tensor
    log_probs: torch.Tensor
    sigmas: torch.Tensor
    seeds: list[int]

    @property
    def final(self) -> torch.Tensor:
        return self.states[:, -1]


def guided_velocity(model: FlowModel, latents: torch.Tensor, sigma: torch.Tensor, prompts: PromptEmbeddings,
                    sampler: SamplerSettings, unconditional: PromptEmbeddings | None) -> torch.Tensor:
    """The velocity generate() steps with: with classifier-free guidance against the empty prompt when
    sampler.cfg_scale > 1 (two forwards)."""
    times = sigma.expand(latents.shape[0])
    velocity = model.velocity(latents, times, prompts, sampler).float()
    if sampler.cfg_scale == 1:
        return velocity
    if unconditional is None:
        raise ValueError("classifier-free guidance (cfg_scale > 1) needs the empty prompt's embeddings")
    empty = model.velocity(latents, times, unconditional.select([0] * latents.shape[0]), sampler).float()
    return empty + sampler.cfg_scale * (velocity - empty)


@torch.no_grad()
def sde_rollout(model: FlowModel, prompt: PromptEmbeddings, seeds: list[int], sampler: SamplerSettings,
                noise_level: float, unconditional: PromptEmbeddings | None = None) -> Rollout:
    """One trajectory per seed for a single prompt, sampled with transition noise noise_level."""
    if len(prompt) != 1:
        raise ValueError(f"sde_rollout() takes the embeddings of one prompt, got {len(prompt)}")
    prompts = prompt.select([0] * len(seeds))
    sigmas = model.sampling_sigmas(sampler)
    generators = [torch.Generator().manual_seed(int(seed) + NOISE_SEED_OFFSET) for seed in seeds]
    x = model.initial_noise(seeds, sampler).float().cpu()
    states, log_probs = [x], []
    for step in range(len(sigmas) - 1):
        velocity = guided_velocity(model, x, sigmas[step], prompts, sampler, unconditional).cpu()
        mean, std, _ = sde_transition(x, velocity, sigmas[step], sigmas[step + 1], noise_level, float(sigmas[1]))
        noise = torch.stack([torch.randn(x.shape[1:], generator=generator) for generator in generators])
        x = mean + std * noise
        states.append(x)
        log_probs.append(transition_log_prob(x, mean, std) if noise_level > 0 else torch.zeros(len(seeds)))
    return Rollout(torch.stack(states, 1), torch.stack(log_probs, 1), sigmas, [int(s) for s in seeds])
