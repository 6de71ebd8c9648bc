"""GDRO training-step throughput against a plain flow-matching fine-tuning step, and peak memory.

Same model, LoRA, optimiser and batch (B groups x k images). The flow-matching step is one policy
forward and backward; the live GDRO step adds the reference forward (LoRA off, no grad) that the implicit
reward needs, so its throughput should sit near 0.75 of the plain step's (a backward costs about
two forwards). The cached GDRO step reads the reference velocities that generation stored
(gdro_ray.data.reference_cache) and should run at the plain step's speed; its cost moves to generation,
printed as the cache's bytes per group and its seconds against generating the group. Each variant runs in
its own process so that peak memory is its own.

    python benchmarks/train_step_throughput.py                       # tiny FLUX on the CPU
    python benchmarks/train_step_throughput.py --model black-forest-labs/FLUX.1-dev --size 512 --groups 1
"""

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from gdro_ray.data.reference_cache import cached_draw, reference_draws
from gdro_ray.flow import TimestepSampler, noise_groups, sample_group_noise
from gdro_ray.models import LoraSpec, SamplerSettings, load_flow_model
from gdro_ray.objective import velocity_error
from gdro_ray.profiles import profile_for
from gdro_ray.train.step import GroupBatch, LossConfig, group_batch_loss

VARIANTS = ("flow_matching", "gdro", "gdro_cached")


def flow_matching_loss(model, batch: GroupBatch, generator) -> torch.Tensor:
    groups, k = batch.rewards.shape
    t, eps = sample_group_noise(groups, tuple(batch.latents.shape[2:]), TimestepSampler(), generator)
    x_t, target = noise_groups(batch.latents, t, eps)
    members = batch.prompts.select(torch.arange(groups).repeat_interleave(k))
    prediction = model.velocity(x_t.flatten(0, 1), t.repeat_interleave(k), members, batch.sampler)
    return velocity_error(prediction, target.flatten(0, 1).to(prediction.device)).mean()


def cache_groups(model, latents, prompts, sampler, draws: int) -> tuple[list[dict], dict]:
    """Each group's cache, made as generation makes it, and what it cost against generating the group."""
    timesteps = model.training_timesteps("logit_normal", sampler)
    started = time.perf_counter()
    rows = [reference_draws(model, latents[g], prompts.select([g]), sampler, timesteps, g, list(range(draws)))
            for g in range(len(latents))]
    seconds = (time.perf_counter() - started) / len(latents)
    started = time.perf_counter()
    model.generate(prompts.select([0]), list(range(latents.shape[1])), sampler)
    cost = {"cache_bytes_per_group": len(rows[0]["reference_velocities"]), "cache_seconds_per_group": seconds,
            "generation_seconds_per_group": time.perf_counter() - started}
    return rows, cost


def measure(variant: str, args) -> dict:
    model = load_flow_model(profile_for(args.model).weights, text_encoders=True)
    model.add_lora(LoraSpec(rank=args.rank, alpha=args.rank))
    model.set_gradient_checkpointing(args.gradient_checkpointing)
    model.transformer.train()
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    tokens = (args.size // (model.vae_scale_factor * 2)) ** 2
    latents = torch.randn(args.groups, args.k, tokens, model.transformer.config.in_channels, generator=generator)
    prompts = model.encode_prompts(["a photo of a red cube"] * args.groups)
    sampler = SamplerSettings(args.size, args.size, num_steps=args.sample_steps)
    batch = GroupBatch(latents, torch.rand(args.groups, args.k, generator=generator), prompts, sampler)
    config, extra = LossConfig(), {}
    if variant == "gdro_cached":
        with model.reference():
            rows, extra = cache_groups(model, latents, prompts, sampler, args.draws)

    def step():
        if variant == "gdro_cached":  # a draw per group, as training's group_batch picks it
            draws = [cached_draw(row, torch.arange(args.k), generator) for row in rows]
            batch.draws = torch.stack([t for t, _, _ in draws]), torch.stack([eps for _, eps, _ in draws])
            batch.reference = torch.stack([reference for _, _, reference in draws])
        loss = flow_matching_loss(model, batch, generator) if variant == "flow_matching" else \
            group_batch_loss(model, batch, config, generator).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for _ in range(args.warmup):
        step()
    synchronise = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    if model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    synchronise()
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronise()
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() if model.device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the process's peak resident set
    return {"samples_per_second": args.steps * args.groups * args.k / seconds, "peak_bytes": peak,
            "device": str(model.device), **extra}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--k", type=int, default=6)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--draws", type=int, default=8, help="cached (t, eps) draws per group")
    parser.add_argument("--sample-steps", type=int, default=20, help="sampler steps of the generation compared")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:  # a child process: measure one variant, print JSON
        print(json.dumps(measure(args.variant, args)))
        return

    results = {}
    for variant in VARIANTS:
        child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--variant", variant],
                               capture_output=True, text=True, check=True)
        results[variant] = json.loads(child.stdout.strip().splitlines()[-1])
    device = results["gdro"]["device"]
    memory = "peak GPU memory" if device.startswith("cuda") else "peak resident memory"
    print(f"model {args.model}, {args.size}px, {args.groups} groups x k={args.k}, LoRA rank {args.rank}, {device}")
    print(f"{'step':16}{'samples/s':>12}{memory:>24}")
    for variant, result in results.items():
        print(f"{variant:16}{result['samples_per_second']:>12.1f}{result['peak_bytes'] / 2**20:>20.0f} MiB")
    for variant in ("gdro", "gdro_cached"):
        ratio = results[variant]["samples_per_second"] / results["flow_matching"]["samples_per_second"]
        print(f"ratio {variant} / flow matching: {ratio:.2f}x throughput "
              f"({results[variant]['peak_bytes'] / results['flow_matching']['peak_bytes']:.2f}x memory)")
    cache = results["gdro_cached"]
    print(f"reference cache: {cache['cache_bytes_per_group'] / 2**10:.0f} KiB per group of {args.k} "
          f"({args.draws} draws, float16), {cache['cache_seconds_per_group']:.3f} s per group against "
          f"{cache['generation_seconds_per_group']:.3f} s to generate it at {args.sample_steps} steps "
          f"(+{cache['cache_seconds_per_group'] / cache['generation_seconds_per_group']:.0%})")


if __name__ == "__main__":
    main()
