"""The GDRO objective: implicit rewards and group ranking losses. Pure torch, no model code.

Shapes: a batch holds B groups of k members. ``scores`` (implicit rewards s), ``rewards``
(explicit rewards r) and ``mask`` are (B, k); ``mask`` is True for real members, so groups
with fewer than k members are padded and masked. Every loss returns one value per group (B,);
the caller averages.

Equations follow the GDRO paper (CVPR 2026): with rewards sorted r_1 >= ... >= r_k,

    q_i(j) = softmax_{j >= i}(r_j / tau)
    L_GDRO = sum_{i=1}^{k-1} ( logsumexp_{m >= i} s_m - sum_{j >= i} q_i(j) s_j )        (GDRO eq. 6)
    L_rank = sum_{i=1}^{k-1} ( logsumexp_{m >= i} s_m - s_i )    (hard Plackett-Luce, tau -> 0)
    L_DPO  = -log sigmoid(s_w - s_l)            (Diffusion-DPO; here on each group's best and worst member)
    L_DGPO = -log sigmoid( (1/k) sum_i A_i s_i ),  A_i = (r_i - mean r) / (std r + 1e-4), clipped to +-5
                                         (DGPO, Luo et al. ICLR 2026: the positives, A > 0, preferred as a group
                                          to the negatives, each member weighted by its advantage)
    L_reg  = ||v - v_theta||^2 on the top-1 member only           (GDRO's stabiliser)
    L_KL   = ||v_theta - v_ref||^2 over each group's members         (DGPO's KL term to the reference)

GROUP_LOSSES names each group loss; OBJECTIVES adds "sft", which is L_reg alone (rejection-sampling fine-tuning
on each group's best member, RAFT-style) and needs no implicit rewards.
"""

import torch
import torch.nn.functional as F

REDUCTIONS = ("mean", "sum")


def velocity_error(prediction: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Squared velocity error per sample, reduced over all dims but the first, in float32 or wider.

    ``reduction`` decides the scale beta lives on: "mean" over latent elements (our presets) or
    "sum" (the paper's squared L2 norm). Low precision breaks beta * (e_theta - e_ref), hence the cast.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    dtype = torch.promote_types(prediction.dtype, torch.float32)
    squared = (prediction.to(dtype) - target.to(dtype)).pow(2).flatten(1)
    return squared.mean(dim=1) if reduction == "mean" else squared.sum(dim=1)


def implicit_reward(policy_error: torch.Tensor, reference_error: torch.Tensor, beta: float) -> torch.Tensor:
    """s = -beta * (||v - v_theta||^2 - ||v - v_ref||^2), elementwise over per-image errors."""
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    return -beta * (policy_error - reference_error)


def rank_by_reward(rewards: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Member order (B, k) by decreasing reward; masked members go last.

    Ties keep their original member order (a stable sort), so equal rewards rank deterministically.
    """
    rewards, mask = _checked_group(rewards, mask)
    keyed = rewards.masked_fill(~mask, float("-inf"))
    return torch.sort(keyed, dim=-1, descending=True, stable=True).indices


def gdro_loss(scores: torch.Tensor, rewards: torch.Tensor, tau: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """GDRO soft group loss per group (B,): cross-entropy to softmax(r / tau) over each remaining set."""
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    scores, rewards, remaining = _sorted_groups(scores, rewards, mask)
    logits = (rewards / tau).unsqueeze(-2).expand_as(remaining).masked_fill(~remaining, float("-inf"))
    targets = torch.softmax(logits, dim=-1)
    return _ranked_cross_entropy(scores, targets, remaining)


def plackett_luce_loss(scores: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Negative log-likelihood (B,) of the reward ranking under a Plackett-Luce model scored by s."""
    scores, _, remaining = _sorted_groups(scores, rewards, mask)
    k = scores.shape[-1]
    targets = torch.eye(k, dtype=scores.dtype, device=scores.device).expand_as(remaining)
    return _ranked_cross_entropy(scores, targets, remaining)


def dpo_loss(winner_scores: torch.Tensor, loser_scores: torch.Tensor) -> torch.Tensor:
    """Diffusion-DPO: -log sigmoid(s_w - s_l), elementwise."""
    return -F.logsigmoid(winner_scores - loser_scores)


def best_worst_dpo_loss(scores: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Diffusion-DPO per group (B,) with its best member the winner and its worst the loser; 0 where they tie."""
    rewards, mask = _checked_group(rewards, mask)
    order = rank_by_reward(rewards, mask)
    best, worst = order[:, :1], order.gather(-1, (mask.sum(-1, keepdim=True) - 1).clamp(min=0))
    loss = dpo_loss(scores.gather(-1, best), scores.gather(-1, worst)).squeeze(-1)
    decided = (rewards.gather(-1, best) > rewards.gather(-1, worst)).squeeze(-1)
    return torch.where(decided, loss, torch.zeros_like(loss))


ADVANTAGE_CLIP = 5.0  # Flow-GRPO's and DGPO's adv_clip_max


def group_advantages(rewards: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """GRPO's advantages (B, k): rewards normalised over each group's members (population std + 1e-4, as Flow-GRPO's
    per-prompt statistics), clipped to +-ADVANTAGE_CLIP; 0 on padding."""
    rewards, mask = _checked_group(rewards, mask)
    count = mask.sum(-1, keepdim=True).clamp(min=1)
    rewards = rewards.masked_fill(~mask, 0.0)
    mean = rewards.sum(-1, keepdim=True) / count
    std = ((rewards - mean).pow(2).masked_fill(~mask, 0.0).sum(-1, keepdim=True) / count).sqrt()
    advantages = ((rewards - mean) / (std + 1e-4)).clamp(-ADVANTAGE_CLIP, ADVANTAGE_CLIP)
    return advantages.masked_fill(~mask, 0.0)


def dgpo_loss(scores: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """DGPO's group preference per group (B,): -log sigmoid of the advantage-weighted mean implicit reward; 0 for a
    group without a spread of rewards (no positives against negatives).

    Since the advantages sum to zero, (1/k) sum_i A_i s_i is R(G+) - R(G-): the positives' weighted implicit
    reward against the negatives'. DGPO's own code applies the gradient of this loss in a detached-weight
    form; the gradients agree up to its constant factor.
    """
    rewards, mask = _checked_group(rewards, mask)
    advantages = group_advantages(rewards, mask).to(scores.dtype)
    margin = (advantages * scores.masked_fill(~mask, 0.0)).sum(-1) / mask.sum(-1).clamp(min=1)
    loss = -F.logsigmoid(margin)
    return torch.where(advantages.ne(0).any(-1), loss, torch.zeros_like(loss))


def group_loss(objective: str, scores: torch.Tensor, rewards: torch.Tensor, tau: float,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """The named group loss per group (B,) over implicit rewards s."""
    if objective == "gdro":
        return gdro_loss(scores, rewards, tau, mask)
    if objective not in GROUP_LOSSES:
        raise ValueError(f"no group loss named {objective!r}; known: {sorted(GROUP_LOSSES)}")
    return GROUP_LOSSES[objective](scores, rewards, mask)


def top1_regulariser(policy_errors: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The policy's velocity error on each group's highest-reward member (B,)."""
    top = rank_by_reward(rewards, mask)[:, :1]
    return policy_errors.gather(-1, top).squeeze(-1)


def reference_regulariser(distances: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The mean over each group's members (B,) of their velocity distance to the reference (B, k)."""
    if mask is None:
        return distances.mean(-1)
    return distances.masked_fill(~mask, 0.0).sum(-1) / mask.sum(-1).clamp(min=1)


def _checked_group(rewards: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if rewards.dim() != 2 or rewards.shape[-1] < 2:
        raise ValueError(f"rewards must have shape (groups, k) with k >= 2, got {tuple(rewards.shape)}")
    if mask is None:
        mask = torch.ones_like(rewards, dtype=torch.bool)
    elif mask.shape != rewards.shape or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor of shape {tuple(rewards.shape)}, got {mask.dtype} {tuple(mask.shape)}")
    bad = torch.isnan(rewards) & mask
    if bad.any():
        group, member = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"rewards contain NaN (group {group}, member {member}); score or drop that image first")
    return rewards, mask


def _sorted_groups(scores: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor | None):
    """Scores and rewards in rank order, and the (B, k, k) mask of each rank's remaining set.

    remaining[b, i, j] is True when member j (in rank order) is still in the set at rank i. Ranks with
    fewer than two members left (the last rank, and padding) get an all-False row.
    """
    if scores.shape != rewards.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and rewards {tuple(rewards.shape)} must have the same shape")
    rewards, mask = _checked_group(rewards, mask)
    order = rank_by_reward(rewards, mask)
    valid = mask.gather(-1, order)
    # Zero the padding so a NaN score in a masked slot cannot leak into gradients.
    scores = scores.gather(-1, order).masked_fill(~valid, 0.0)
    rewards = rewards.gather(-1, order).masked_fill(~valid, 0.0)
    k = scores.shape[-1]
    later = torch.ones(k, k, dtype=torch.bool, device=scores.device).triu()  # j >= i
    remaining = later & valid.unsqueeze(-2)
    has_rival = remaining.sum(-1, keepdim=True) >= 2
    return scores, rewards, remaining & has_rival


def _ranked_cross_entropy(scores: torch.Tensor, targets: torch.Tensor, remaining: torch.Tensor) -> torch.Tensor:
    """sum_i [ logsumexp_{m in R_i} s_m - sum_{j in R_i} targets[i, j] s_j ] over the active ranks."""
    active = remaining.any(-1)
    # Inactive rows see every score so logsumexp stays finite; their terms are zeroed below.
    visible = remaining | ~active.unsqueeze(-1)
    row_scores = scores.unsqueeze(-2).expand_as(remaining)
    log_norm = torch.logsumexp(row_scores.masked_fill(~visible, float("-inf")), dim=-1)
    expected = (targets.masked_fill(~remaining, 0.0) * row_scores).sum(-1)
    return torch.where(active, log_norm - expected, torch.zeros_like(log_norm)).sum(-1)


GROUP_LOSSES = {"gdro": gdro_loss, "pl": plackett_luce_loss, "dpo": best_worst_dpo_loss, "dgpo": dgpo_loss}
OBJECTIVES = (*GROUP_LOSSES, "sft")
