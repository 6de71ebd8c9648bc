"""Flow-GRPO's objective (Liu et al., 2025), pure torch: the online baseline's loss over SDE transitions.

Each sampled image is a chain of Gaussian transitions x_j -> x_{j+1} (gdro_ray.flow.sde_transition). With the
log-probabilities of the sampling policy recorded at rollout and A the image's group-relative advantage
(gdro_ray.objective.group_advantages over the images of its prompt):

    ratio  = exp(log p_theta(x_{j+1} | x_j) - log p_old(x_{j+1} | x_j))
    L_clip = max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps))                    (PPO's clipped surrogate)
    L_KL   = mean over latent elements of (mean_theta - mean_ref)^2 / (2 sigma_t^2)
    L      = L_clip + beta_kl L_KL

mean_ref is the transition's mean under the reference (the LoRA disabled); sigma_t the noise scale per unit time
of the step, as Flow-GRPO's code divides by it.
"""

import torch


def clipped_policy_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                        clip_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per transition (B,) and the policy ratio (B,), detached."""
    if not clip_range > 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")
    ratio = torch.exp(log_prob - old_log_prob.to(log_prob.dtype))
    advantages = advantages.to(log_prob.dtype)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    return torch.maximum(unclipped, clipped), ratio.detach()


def transition_kl(mean: torch.Tensor, reference_mean: torch.Tensor, noise_scale: torch.Tensor) -> torch.Tensor:
    """Flow-GRPO's KL penalty per transition (B,): the squared difference of the means over 2 sigma_t^2."""
    squared = (mean - reference_mean.to(mean.dtype)) ** 2 / (2 * noise_scale.to(mean.dtype) ** 2)
    return squared.flatten(1).mean(dim=1)
