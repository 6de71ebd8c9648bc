"""Where a tiny-world pretraining step spends its time, phase by phase, on this machine's CPU or a GPU.

One step of jobs/pretrain_tiny.py's transformer stage, split into what the host does (render the batch,
tokenize the captions) and what the models do (text encoders, VAE encoding, the transformer's forward,
the backward pass, the optimizer), each timed on its own (the GPU synchronised around it) and averaged over
several steps after a warm-up. The tokenizers run as diffusers' encode_prompt runs them: twice each, the
second time untruncated to warn of truncation.

    python benchmarks/pretrain_step_phases.py --batch-size 64
    python benchmarks/pretrain_step_phases.py --batch-size 1024 --device cuda
"""

import argparse
import random
import time

import torch
from diffusers.training_utils import compute_density_for_timestep_sampling

from gdro_ray.tiny_world.model import build_tiny_flux_pipeline
from gdro_ray.tiny_world.pretrain import TINY_WORLD_MODEL, PretrainConfig, RenderedPrompts, encode_renders, flow_loss


def timed(device: str, work) -> tuple[object, float]:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    result = work()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return result, time.perf_counter() - started


def tokenize_as_diffusers(pipeline, prompts: list[str]) -> None:
    for tokenizer, length in ((pipeline.tokenizer, pipeline.tokenizer.model_max_length),
                              (pipeline.tokenizer_2, pipeline.tokenizer_2.model_max_length)):
        tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        tokenizer(prompts, padding="longest", return_tensors="pt")


def step_phases(pipeline, data: RenderedPrompts, optimizer, batch_size: int, device: str, rng) -> dict[str, float]:
    seconds = {}
    (prompts, images), seconds["render the batch"] = timed(device, lambda: data.batch(batch_size, rng))
    _, seconds["tokenize (as encode_prompt)"] = timed(device, lambda: tokenize_as_diffusers(pipeline, prompts))
    length = pipeline.tokenizer_2.model_max_length
    _, encode = timed(device, lambda: pipeline.encode_prompt(prompts, None, device=device, max_sequence_length=length))
    seconds["text encoders forward"] = max(encode - seconds["tokenize (as encode_prompt)"], 0.0)
    x0, seconds["VAE encode"] = timed(device, lambda: encode_renders(pipeline, images))
    t = compute_density_for_timestep_sampling("logit_normal", batch_size, logit_mean=0.0, logit_std=1.0).to(device)

    def forward_backward():
        optimizer.zero_grad()
        flow_loss(pipeline, prompts, x0, t, torch.randn_like(x0)).backward()

    _, whole = timed(device, forward_backward)
    seconds["transformer forward, all backward"] = max(whole - encode, 0.0)  # flow_loss encodes the prompts again
    _, seconds["optimizer step"] = timed(device, optimizer.step)
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="timed steps, after one warm-up step")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    pipeline = build_tiny_flux_pipeline(TINY_WORLD_MODEL, seed=0).to(args.device)
    trained = [pipeline.transformer, pipeline.text_encoder, pipeline.text_encoder_2]
    for module in trained:
        module.train()
    optimizer = torch.optim.AdamW([p for module in trained for p in module.parameters()], lr=1e-4)
    data, rng = RenderedPrompts(PretrainConfig()), random.Random(0)
    step_phases(pipeline, data, optimizer, args.batch_size, args.device, rng)
    totals = {}
    for _ in range(args.steps):
        for phase, seconds in step_phases(pipeline, data, optimizer, args.batch_size, args.device, rng).items():
            totals[phase] = totals.get(phase, 0.0) + seconds / args.steps
    step = sum(totals.values())
    print(f"batch {args.batch_size} on {args.device}: {step * 1000:.0f} ms a step ({1 / step:.1f} steps/s), "
          f"mean of {args.steps} steps")
    for phase, seconds in totals.items():
        print(f"  {phase:32}{seconds * 1000:>9.1f} ms{seconds / step:>8.1%}")


if __name__ == "__main__":
    main()
