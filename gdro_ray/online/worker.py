"""The Flow-GRPO loop on every Ray Train worker. Setup, restore, held-out evaluation, reports and checkpoints are
the offline loop's (gdro_ray.train.worker); each step here is

    sample    prompts_per_step prompts of the worker's draw, images_per_prompt images each, with the current
              LoRA through the SDE sampler (gdro_ray.online.rollout), every transition's log-probability kept
    score     the task reward of each image; advantages normalised within each prompt's group
    train     for a random train_fraction of each rollout's transitions: the policy's log-probability of the
              sampled transition (one forward with gradients), the reference's transition mean (one forward,
              LoRA off) when kl_beta > 0, the clipped policy loss plus the KL; one optimiser step over them all

The meter times the three stages and counts every forward; the reward calls are counted as they happen.
"""

import torch

from gdro_ray.config import OnlineConfig
from gdro_ray.console import StageProgress
from gdro_ray.data.records import tensor_to_image
from gdro_ray.flow import sde_transition, transition_log_prob
from gdro_ray.objective import group_advantages
from gdro_ray.online.rollout import Rollout, guided_velocity, sde_rollout
from gdro_ray.periodic_eval import EvalSet, load_eval_set
from gdro_ray.policy_gradient import clipped_policy_loss, transition_kl
from gdro_ray.rewards import build_reward
from gdro_ray.rewards.base import score_safely
from gdro_ray.train.worker import (
    Evaluator, NonFiniteGuard, WorkerRun, evaluate, finite_everywhere, report, start,
)


def online_worker(values: dict, evaluator: Evaluator | None = None, progress: StageProgress | None = None) -> None:
    config = OnlineConfig(**values)
    run, console, step, writer, last_eval = start(config, evaluator, progress)
    attempt_start = step
    prompts = load_eval_set(config.prompt_set)
    reward = build_reward(prompts.held_out.reward)
    reward.load()
    guard = NonFiniteGuard(config.max_nonfinite_steps)
    while step < config.steps:
        picked = draw_prompts(config, step, run.rank, len(prompts.prompts))
        with run.meter.stage("generation"):
            rollouts = [sde_rollout(run.model, prompts.embeddings.select([index]),
                                    image_seeds(config, step, run.rank, index), prompts.held_out.sampler,
                                    config.noise_level, prompts.unconditional) for index in picked]
        with run.meter.stage("scoring"):
            rewards = [score_rollout(run, reward, prompts, index, rollout) for index, rollout in zip(picked, rollouts)]
        with run.meter.stage("training"):
            stepped, metrics = train_on_rollouts(run, prompts, picked, rollouts, rewards, guard, console, step)
        if not stepped:
            continue
        step += 1
        evaluating = evaluator is not None and (step % config.eval_every == 0 or step == config.steps)
        if evaluating:
            last_eval = evaluate(run, evaluator, step, writer)
        checkpointing = step % config.checkpoint_every == 0 or step == config.steps
        if checkpointing or evaluating or step % config.log_every == 0:
            metrics = {"step": step, "attempt_start_step": attempt_start, **metrics,
                       "grad_norm": run.strategy.grad_norm(), "lr": run.scheduler.get_last_lr()[0],
                       "skipped_nonfinite": guard.skipped, **last_eval}
            report(run, metrics, writer, console, checkpoint=checkpointing)
    if writer is not None:
        writer.close()


def draw_prompts(config: OnlineConfig, step: int, rank: int, available: int) -> list[int]:
    """The prompt indices of a worker's step: each step a fresh shuffle of the set, cut into the workers' shares
    (a set smaller than a step's share is drawn from again)."""
    order = torch.randperm(available, generator=torch.Generator().manual_seed(config.seed * 1_000_003 + step))
    share = config.prompts_per_step
    return [int(order[(rank * share + i) % available]) for i in range(share)]


def image_seeds(config: OnlineConfig, step: int, rank: int, index: int) -> list[int]:
    """Seeds no other image of the run shares (sets under 1,013 prompts): by run seed, step, worker and prompt."""
    first = (((config.seed * 100_003 + step) * 1_009 + rank) * 1_013 + index) * config.images_per_prompt
    return [first + i for i in range(config.images_per_prompt)]


def score_rollout(run: WorkerRun, reward, prompts: EvalSet, index: int, rollout: Rollout) -> torch.Tensor:
    """The rewards of a rollout's images (NaN where scoring failed)."""
    sampler = prompts.held_out.sampler
    images = [tensor_to_image(image) for image in run.model.decode_latents(rollout.final, sampler.height, sampler.width)]
    prompt = prompts.prompts[index]
    results = score_safely(reward, images, [{**prompt.metadata, "prompt": prompt.prompt}] * len(images))
    run.meter.scored(len(images))
    return torch.tensor([float("nan") if r.reward is None else r.reward for r in results], dtype=torch.float32)


def train_on_rollouts(run: WorkerRun, prompts: EvalSet, picked: list[int], rollouts: list[Rollout],
                      rewards: list[torch.Tensor], guard: NonFiniteGuard, console: StageProgress,
                      step: int) -> tuple[bool, dict]:
    """Every micro-batch of one step (a prompt's images at one transition); True when an optimiser step happened,
    and the step's metrics."""
    config, sampler, sums, count, stepped = run.config, prompts.held_out.sampler, {}, 0, False
    for index, rollout, group_rewards in zip(picked, rollouts, rewards):
        scored = ~torch.isnan(group_rewards)
        advantages = group_advantages(group_rewards.nan_to_num(0.0).unsqueeze(0), scored.unsqueeze(0))[0]
        members = prompts.embeddings.select([index] * len(rollout.seeds))
        transitions = torch.randperm(len(rollout.sigmas) - 1, generator=run.generator)[:config.trained_transitions]
        for j in transitions.tolist():
            loss, parts = transition_loss(run, rollout, j, members, sampler, prompts, advantages.to(run.device))
            if not finite_everywhere(loss, run.device):
                guard.skip(step)
                console.message(f"step {step}: non-finite loss, micro-batch skipped ({guard.in_a_row} in a row)")
                continue
            guard.reset()
            run.strategy.backward(loss)
            run.meter.backward(len(rollout.seeds) * (2 if sampler.cfg_scale > 1 else 1))
            stepped |= run.strategy.micro_step()
            for name, value in {"loss": loss.item(), **parts}.items():
                sums[name] = sums.get(name, 0.0) + value
            count += 1
    if stepped and run.ema is not None:
        with run.strategy.full_parameters():
            run.ema.step(run.trainable)
    scored = torch.cat(rewards)
    scored = scored[~torch.isnan(scored)]
    rollout_reward = {"rollout_reward": float(scored.mean())} if len(scored) else {}
    return stepped, {**{name: value / max(count, 1) for name, value in sums.items()}, **rollout_reward}


def transition_loss(run: WorkerRun, rollout: Rollout, j: int, members, sampler, prompts: EvalSet,
                    advantages: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Flow-GRPO's loss on transition j of a rollout's images (mean over the images), and its parts."""
    config, sigmas = run.config, rollout.sigmas
    x, sampled = rollout.states[:, j].to(run.device), rollout.states[:, j + 1].to(run.device)
    velocity = guided_velocity(run.model, x, sigmas[j], members, sampler, prompts.unconditional)
    mean, std, scale = sde_transition(x, velocity, sigmas[j], sigmas[j + 1], config.noise_level, float(sigmas[1]))
    log_prob = transition_log_prob(sampled, mean, std)
    policy, ratio = clipped_policy_loss(log_prob, rollout.log_probs[:, j].to(run.device), advantages,
                                        config.clip_range)
    loss, parts = policy.mean(), {"policy_loss": policy.mean().item(), "ratio": ratio.mean().item(),
                                  "clipped": ((ratio - 1).abs() > config.clip_range).float().mean().item()}
    if config.kl_beta > 0:
        with torch.no_grad(), run.model.reference():
            reference = guided_velocity(run.model, x, sigmas[j], members, sampler, prompts.unconditional)
            reference_mean, _, _ = sde_transition(x, reference, sigmas[j], sigmas[j + 1], config.noise_level,
                                                  float(sigmas[1]))
        kl = transition_kl(mean, reference_mean, scale).mean()
        loss = loss + config.kl_beta * kl
        parts["kl"] = kl.item()
    return loss, parts
