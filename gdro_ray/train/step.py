"""One GDRO loss evaluation on a batch of groups: the bridge between a FlowModel and gdro_ray.objective.

    x_t = (1 - t) x0 + t eps with one (t, eps) per group      (gdro_ray.flow)
    s   = -beta (||v - v_theta||^2 - ||v - v_ref||^2)          v_ref: the LoRA disabled, no grad
    L   = L_GDRO(s, r; tau) + gamma * ||v - v_theta||^2 on each group's top-1 member
"""

from dataclasses import dataclass, field

import torch

from gdro_ray.flow import TimestepSampler, noise_groups, sample_group_noise
from gdro_ray.models.base import FlowModel, PromptEmbeddings, SamplerSettings
from gdro_ray.objective import REDUCTIONS, gdro_loss, implicit_reward, top1_regulariser, velocity_error


@dataclass(frozen=True)
class GDROLossConfig:
    """The objective's settings. beta belongs to ``reduction``: the same implicit rewards take a beta N times
    larger with "mean" over latent elements than with "sum" (the squared norm), N the latent's element count:
    65,536 for a 512x512 FLUX latent (1,024 tokens x 64 channels), 1,024 for the tiny model's 32x32."""

    beta: float = 12.0
    tau: float = 0.05
    gamma: float = 0.5
    reduction: str = "mean"
    timesteps: TimestepSampler = field(default_factory=TimestepSampler)

    def __post_init__(self):
        for name in ("beta", "tau"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {self.gamma}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")


@dataclass
class GroupBatch:
    """B groups of k members: latents (B, k, N, C), rewards and mask (B, k), one prompt per group, and the
    sampler they were generated with (its size and distilled guidance condition the velocities)."""

    latents: torch.Tensor
    rewards: torch.Tensor
    prompts: PromptEmbeddings
    sampler: SamplerSettings
    mask: torch.Tensor | None = None


@dataclass
class GDROLoss:
    loss: torch.Tensor  # scalar, differentiable
    gdro: torch.Tensor  # the parts, detached, for logging
    top1: torch.Tensor
    scores: torch.Tensor  # implicit rewards (B, k), detached


def gdro_batch_loss(
    model: FlowModel, batch: GroupBatch, config: GDROLossConfig, generator: torch.Generator | None = None
) -> GDROLoss:
    groups, k = batch.rewards.shape
    t, eps = sample_group_noise(groups, tuple(batch.latents.shape[2:]), config.timesteps, generator)
    latents = batch.latents.float()
    if batch.mask is not None:  # padding may hold anything; zeros keep its (unused) gradients finite
        latents = latents.masked_fill(~batch.mask.view(groups, k, *[1] * (latents.dim() - 2)), 0.0)
    x_t, target = noise_groups(latents, t, eps)
    # All B*k members in one forward; member i of group b sees its group's prompt and t.
    x_t, target = x_t.flatten(0, 1), target.flatten(0, 1)
    times = t.repeat_interleave(k)
    members = batch.prompts.select(torch.arange(groups).repeat_interleave(k))
    policy = model.velocity(x_t, times, members, batch.sampler)
    with torch.no_grad(), model.reference():
        reference = model.velocity(x_t, times, members, batch.sampler)
    target = target.to(policy.device)
    policy_error = velocity_error(policy, target, config.reduction).view(groups, k)
    reference_error = velocity_error(reference, target, config.reduction).view(groups, k)

    rewards = batch.rewards.to(policy.device)
    mask = None if batch.mask is None else batch.mask.to(policy.device)
    scores = implicit_reward(policy_error, reference_error, config.beta)
    group_loss = gdro_loss(scores, rewards, config.tau, mask)
    top1 = top1_regulariser(policy_error, rewards, mask)
    loss = (group_loss + config.gamma * top1).mean()
    return GDROLoss(loss, group_loss.mean().detach(), top1.mean().detach(), scores.detach())
