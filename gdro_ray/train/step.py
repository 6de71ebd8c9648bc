"""One loss evaluation on a batch of groups: the bridge between a FlowModel and gdro_ray.objective.

    x_t = (1 - t) x0 + t eps with one (t, eps) per group      (gdro_ray.flow; or a cached draw)
    s   = -beta (||v - v_theta||^2 - ||v - v_ref||^2)          v_ref: the LoRA disabled, no grad, or cached
    L   = L_group(s, r) + gamma * ||v - v_theta||^2 on each group's top-1 member + kl * ||v_theta - v_ref||^2

L_group is the objective's: GDRO's soft Plackett-Luce (tau), the hard one, Diffusion-DPO on the best and worst
member, or DGPO. The objective "sft" is the top-1 term alone at weight 1: no reference pass, no implicit rewards.
Every objective sees the same groups, members and (t, eps), so runs differ in the loss only.
"""

from dataclasses import dataclass, field

import torch

from gdro_ray.flow import TimestepSampler, noise_groups, sample_group_noise
from gdro_ray.models.base import FlowModel, PromptEmbeddings, SamplerSettings
from gdro_ray.objective import (
    OBJECTIVES, REDUCTIONS, group_loss, implicit_reward, reference_regulariser, top1_regulariser, velocity_error,
)


@dataclass(frozen=True)
class LossConfig:
    """The objective and its settings. beta belongs to ``reduction``: the same implicit rewards take a beta N times
    larger with "mean" over latent elements than with "sum" (the squared norm), N the latent's element count:
    65,536 for a 512x512 FLUX latent (1,024 tokens x 64 channels), 1,024 for the tiny model's 32x32."""

    objective: str = "gdro"
    beta: float = 12.0
    tau: float = 0.05
    gamma: float = 0.5
    kl: float = 0.0
    reduction: str = "mean"
    timesteps: TimestepSampler = field(default_factory=TimestepSampler)

    def __post_init__(self):
        for name in ("beta", "tau"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("gamma", "kl"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.objective == "sft" and self.kl > 0:
            raise ValueError("the sft objective runs no reference, so it takes no kl term: set kl to 0")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")


@dataclass
class GroupBatch:
    """B groups of k members: latents (B, k, N, C), rewards and mask (B, k), one prompt per group, and the
    sampler they were generated with (its size and distilled guidance condition the velocities). From a dataset
    with a reference cache (gdro_ray.data.reference_cache): each group's cached draw, t (B,) and eps (B, N, C),
    and its members' reference velocities there (B, k, N, C); without one the loss draws (t, eps) itself."""

    latents: torch.Tensor
    rewards: torch.Tensor
    prompts: PromptEmbeddings
    sampler: SamplerSettings
    mask: torch.Tensor | None = None
    draws: tuple[torch.Tensor, torch.Tensor] | None = None
    reference: torch.Tensor | None = None


@dataclass
class BatchLoss:
    loss: torch.Tensor  # scalar, differentiable
    group: torch.Tensor  # the parts, detached, for logging (group: 0 under "sft")
    top1: torch.Tensor
    scores: torch.Tensor | None  # implicit rewards (B, k), detached; None under "sft"


def group_batch_loss(
    model: FlowModel, batch: GroupBatch, config: LossConfig, generator: torch.Generator | None = None
) -> BatchLoss:
    groups, k = batch.rewards.shape
    t, eps = batch.draws or sample_group_noise(groups, tuple(batch.latents.shape[2:]), config.timesteps, generator)
    latents = batch.latents.float()
    if batch.mask is not None:  # padding may hold anything; zeros keep its (unused) gradients finite
        latents = latents.masked_fill(~batch.mask.view(groups, k, *[1] * (latents.dim() - 2)), 0.0)
    x_t, target = noise_groups(latents, t, eps)
    # All B*k members in one forward; member i of group b sees its group's prompt and t.
    x_t, target = x_t.flatten(0, 1), target.flatten(0, 1)
    times = t.repeat_interleave(k)
    members = batch.prompts.select(torch.arange(groups).repeat_interleave(k))
    policy = model.velocity(x_t, times, members, batch.sampler)
    target = target.to(policy.device)
    policy_error = velocity_error(policy, target, config.reduction).view(groups, k)
    rewards = batch.rewards.to(policy.device)
    mask = None if batch.mask is None else batch.mask.to(policy.device)
    top1 = top1_regulariser(policy_error, rewards, mask)
    if config.objective == "sft":
        return BatchLoss(top1.mean(), torch.zeros(()), top1.mean().detach(), None)

    if batch.reference is None:
        with torch.no_grad(), model.reference():
            reference = model.velocity(x_t, times, members, batch.sampler)
    else:
        reference = batch.reference.flatten(0, 1).to(policy.device)
    reference_error = velocity_error(reference, target, config.reduction).view(groups, k)
    scores = implicit_reward(policy_error, reference_error, config.beta)
    ranking = group_loss(config.objective, scores, rewards, config.tau, mask)
    loss = ranking + config.gamma * top1
    if config.kl > 0:
        distance = velocity_error(policy, reference.to(policy.dtype), config.reduction).view(groups, k)
        loss = loss + config.kl * reference_regulariser(distance, mask)
    loss = loss.mean()
    return BatchLoss(loss, ranking.mean().detach(), top1.mean().detach(), scores.detach())
