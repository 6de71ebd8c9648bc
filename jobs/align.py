"""Align a FLUX model with GDRO, offline: generate groups once, score them, train a LoRA on them.

Preview of the end-to-end job: until the task datasets, rewards and the tiny world land, it aligns the
model to a pixel-brightness reward (the mean intensity of an image), in one process. It shows the whole
loop work on the embedded tiny FLUX in about a minute on a CPU:

    python jobs/align.py                      # tiny FLUX, built offline
    python jobs/align.py --model /path/to/FLUX.1-dev --size 512 --k 6
"""

import argparse
import json
from pathlib import Path

import torch
from tqdm import tqdm

from gdro_ray.flow import TimestepSampler
from gdro_ray.models import TINY, LoraSpec, load_flow_model
from gdro_ray.train.step import GDROLossConfig, GroupBatch, gdro_batch_loss

PROMPTS = [f"a photo of {n} {thing}" for n in ("one", "two", "three") for thing in ("cube", "ball", "star")]


def brightness(images: torch.Tensor) -> torch.Tensor:
    return images.mean(dim=(1, 2, 3))


def mean_reward(model, prompts, seeds, args) -> float:
    images = [model.generate(prompts.select([i]), seeds, args.size, args.size, args.sample_steps).images
              for i in range(len(prompts))]
    return brightness(torch.cat(images)).mean().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=TINY, help="'tiny', a diffusers FLUX directory, or a hub id")
    parser.add_argument("--size", type=int, default=32, help="image height and width in pixels")
    parser.add_argument("--k", type=int, default=6, help="images generated per prompt (the group size)")
    parser.add_argument("--sample-steps", type=int, default=8, help="Euler steps per generated image")
    parser.add_argument("--steps", type=int, default=150, help="training steps")
    parser.add_argument("--groups-per-step", type=int, default=4)
    parser.add_argument("--beta", type=float, default=100.0, help="implicit-reward scale (mean over latent elements)")
    parser.add_argument("--tau", type=float, default=0.002, help="brightness differs by thousandths")
    parser.add_argument("--gamma", type=float, default=0.5)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/align-preview"))
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    model = load_flow_model(args.model)
    prompts = model.encode_prompts(PROMPTS)
    held_out_seeds = list(range(10_000, 10_000 + args.k))
    before = mean_reward(model, prompts, held_out_seeds, args)

    # Offline groups: k images per prompt, generated and scored once, before any training.
    groups = [model.generate(prompts.select([i]), [1000 * i + j for j in range(args.k)], args.size, args.size,
                             args.sample_steps) for i in tqdm(range(len(PROMPTS)), desc="generating groups")]
    latents = torch.stack([group.latents for group in groups]).cpu()
    rewards = torch.stack([brightness(group.images) for group in groups])

    model.add_lora(LoraSpec(rank=args.rank, alpha=args.rank))
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=args.lr)
    config = GDROLossConfig(beta=args.beta, tau=args.tau, gamma=args.gamma, timesteps=TimestepSampler("uniform"))
    generator = torch.Generator().manual_seed(args.seed)
    for _ in (progress := tqdm(range(args.steps), desc="training")):
        pick = torch.randperm(len(PROMPTS), generator=generator)[: args.groups_per_step]
        batch = GroupBatch(latents[pick], rewards[pick], prompts.select(pick), args.size, args.size)
        result = gdro_batch_loss(model, batch, config, generator)
        optimizer.zero_grad()
        result.loss.backward()
        optimizer.step()
        progress.set_postfix(loss=f"{result.loss.item():.3f}", gdro=f"{result.gdro.item():.3f}")

    after = mean_reward(model, prompts, held_out_seeds, args)
    model.save_lora(args.out / "lora")
    summary = {"reward": "brightness", "before": round(before, 4), "after": round(after, 4), "lora": str(args.out / "lora")}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
