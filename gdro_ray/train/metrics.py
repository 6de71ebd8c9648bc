"""How well the implicit rewards s rank each group against the explicit rewards r (pure torch).

Logged every step: if the LoRA learns the ranking, top-1 agreement rises from chance (1/k) and
Kendall's tau from 0.
"""

import torch

from gdro_ray.objective import rank_by_reward


def ranking_agreement(scores: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
    """Means over groups: top1 (the highest s belongs to the highest r), kendall_tau (tau-a over the
    valid pairs) and margin (s of the best member minus s of the worst)."""
    mask = torch.ones_like(rewards, dtype=torch.bool) if mask is None else mask
    order = rank_by_reward(rewards, mask)
    best, worst = order[:, 0], order.gather(-1, (mask.sum(-1, keepdim=True) - 1).clamp(min=0)).squeeze(-1)
    top_scorer = scores.masked_fill(~mask, float("-inf")).argmax(-1)
    pairs = mask.unsqueeze(-1) & mask.unsqueeze(-2)
    pairs = pairs & torch.ones_like(pairs[0]).triu(diagonal=1)
    concordance = (scores.unsqueeze(-1) - scores.unsqueeze(-2)).sign() * (rewards.unsqueeze(-1) - rewards.unsqueeze(-2)).sign()
    kendall = (concordance * pairs).sum((-1, -2)) / pairs.sum((-1, -2)).clamp(min=1)
    margin = scores.gather(-1, best[:, None]) - scores.gather(-1, worst[:, None])
    return {
        "top1_agreement": (top_scorer == best).float().mean().item(),
        "kendall_tau": kendall.float().mean().item(),
        "implicit_margin": margin.float().mean().item(),
    }
