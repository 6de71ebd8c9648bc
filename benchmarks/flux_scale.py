"""FLUX.1-dev at full size on one GPU, from random weights (nothing is downloaded).

Builds the transformer and the VAE with FLUX.1-dev's configurations (12B parameters, bf16) and measures:
  generation    images/s at 512x512 and 28 steps (transformer and VAE decode; prompts as random T5/CLIP
                embeddings, since encoding a prompt is once per group)
  GDRO step     samples/s of the training step with a rank-32 LoRA in bf16 under DeepSpeed ZeRO-2, with the live
                reference and with the cached one (gdro_ray.data.reference_cache), and each one's peak memory
  MFU           model FLOPs per second (matmuls of the forward, backward counted twice, the live reference's
                forward once) over the card's dense bf16 peak

    python benchmarks/flux_scale.py                          # on a CUDA GPU; a CPU is refused
    python benchmarks/flux_scale.py --groups 1 --k 4 --steps 5

The numbers go in docs/benchmarks.md with the card's name.
"""

import argparse
import os
import socket
import sys
import time

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

from gdro_ray.config import TrainConfig
from gdro_ray.data.reference_cache import cached_draw, reference_draws
from gdro_ray.models import FluxModel, LoraSpec, PromptEmbeddings, SamplerSettings
from gdro_ray.train.step import GroupBatch, LossConfig, group_batch_loss
from gdro_ray.train.strategies import DeepSpeedStrategy

# black-forest-labs/FLUX.1-dev: transformer/config.json, vae/config.json, scheduler/scheduler_config.json
FLUX_DEV_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                            guidance_embeds=True, axes_dims_rope=(16, 56, 56))
FLUX_DEV_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                    layers_per_block=2, latent_channels=16, norm_num_groups=32, sample_size=1024,
                    scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
FLUX_DEV_SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                          num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
T5_TOKENS = 512
# Dense bf16 tensor-core peaks, from the vendors' data sheets (SXM parts).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "B200": 2250e12}


def random_flux(device: torch.device, transformer: dict = FLUX_DEV_TRANSFORMER, vae: dict = FLUX_DEV_VAE) -> FluxModel:
    """A FluxModel of the given configurations with random bf16 weights, built on the device (no fp32 copy)."""
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            pipeline = FluxPipeline(FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER), AutoencoderKL(**vae),
                                    None, None, None, None, FluxTransformer2DModel(**transformer))
    finally:
        torch.set_default_dtype(default)
    return FluxModel(pipeline, device, torch.bfloat16)


def random_prompts(model: FluxModel, count: int) -> PromptEmbeddings:
    config = model.transformer.config
    generator = torch.Generator().manual_seed(1)
    return PromptEmbeddings(torch.randn(count, T5_TOKENS, config.joint_attention_dim, generator=generator),
                            torch.randn(count, config.pooled_projection_dim, generator=generator)).to(model.device)


def synchronised(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else float("nan")


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def forward_flops(model: FluxModel, sampler: SamplerSettings, text_tokens: int) -> float:
    """Matmul FLOPs of one transformer forward of one sample: 2 per weight per token, plus attention's two
    (tokens x tokens) products in every block."""
    image_tokens = (sampler.height // (model.vae_scale_factor * 2)) * (sampler.width // (model.vae_scale_factor * 2))
    tokens = image_tokens + text_tokens
    config = model.transformer.config
    hidden = config.num_attention_heads * config.attention_head_dim
    weights = sum(p.numel() for name, p in model.transformer.named_parameters() if "lora_" not in name)
    attention = 4 * tokens * tokens * hidden * (config.num_layers + config.num_single_layers)
    return 2 * weights * tokens + attention


def measure_generation(model: FluxModel, sampler: SamplerSettings, images: int, repeats: int) -> dict:
    prompt = random_prompts(model, 1)
    model.generate(prompt, list(range(images)), sampler)  # warm-up: kernels, allocator
    synchronised(model.device)
    reset_peak(model.device)
    started = time.perf_counter()
    for repeat in range(repeats):
        model.generate(prompt, list(range(repeat * images, (repeat + 1) * images)), sampler)
    synchronised(model.device)
    seconds = time.perf_counter() - started
    return {"images_per_second": repeats * images / seconds, "peak_bytes": peak_memory(model.device)}


def measure_training(model: FluxModel, strategy: DeepSpeedStrategy, sampler: SamplerSettings, args,
                     variant: str) -> dict:
    """Samples/s and peak memory of the GDRO step under DeepSpeed ZeRO-2, reference live or cached."""
    groups, k = args.groups, args.k
    prompts = random_prompts(model, groups)
    generator = torch.Generator().manual_seed(2)
    tokens = (sampler.height // (model.vae_scale_factor * 2)) * (sampler.width // (model.vae_scale_factor * 2))
    latents = torch.randn(groups, k, tokens, model.transformer.config.in_channels, generator=generator)
    batch = GroupBatch(latents, torch.rand(groups, k, generator=generator), prompts.to("cpu"), sampler)
    rows, cache = [], {}
    if variant == "cached":
        timesteps = model.training_timesteps("logit_normal", sampler)
        with model.reference():
            synchronised(model.device)
            started = time.perf_counter()
            rows = [reference_draws(model, latents[g].to(model.device), prompts.select([g]), sampler, timesteps, g,
                                    list(range(args.draws))) for g in range(groups)]
            synchronised(model.device)
        cache = {"cache_seconds_per_group": (time.perf_counter() - started) / groups,
                 "cache_bytes_per_group": len(rows[0]["reference_velocities"])}
    loss_config = LossConfig(timesteps=model.training_timesteps("logit_normal", sampler))

    def step():
        if rows:  # a cached draw per group, as the training reader picks them
            draws = [cached_draw(row, torch.arange(k), generator) for row in rows]
            batch.draws = torch.stack([t for t, _, _ in draws]), torch.stack([eps for _, eps, _ in draws])
            batch.reference = torch.stack([reference for _, _, reference in draws])
        strategy.backward(group_batch_loss(model, batch, loss_config, generator).loss)
        strategy.micro_step()

    for _ in range(args.warmup):
        step()
    synchronised(model.device)
    reset_peak(model.device)
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronised(model.device)
    seconds = time.perf_counter() - started
    samples = args.steps * groups * k
    passes = 3 if variant == "cached" else 4  # forward + backward (2), and the live reference's forward
    flops = samples * passes * forward_flops(model, sampler, T5_TOKENS) / seconds
    return {"samples_per_second": samples / seconds, "peak_bytes": peak_memory(model.device), "flops": flops,
            **cache}


def deepspeed_lora(model: FluxModel, args) -> DeepSpeedStrategy:
    """The training workers' setup: a rank-R LoRA, AdamW, ZeRO-2 in bf16, in a one-process group."""
    import deepspeed

    with socket.socket() as probe:  # a free port of our own: an inherited MASTER_PORT may be another group's
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    deepspeed.init_distributed(dist_backend="nccl" if model.device.type == "cuda" else "gloo")
    model.add_lora(LoraSpec(rank=args.rank, alpha=args.rank))
    model.set_gradient_checkpointing(not args.no_gradient_checkpointing)
    model.transformer.train()
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    config = TrainConfig(groups_per_step=args.groups, k=args.k, zero_stage=2)
    strategy = DeepSpeedStrategy(model.transformer, optimizer, scheduler, config, bf16=model.device.type == "cuda")
    model.dtype = next(model.transformer.parameters()).dtype
    return strategy


def card_peak(device: torch.device) -> tuple[str, float | None]:
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    return name, next((peak for card, peak in PEAK_BF16_FLOPS.items() if card in name), None)


def run(device: torch.device, args, transformer: dict = FLUX_DEV_TRANSFORMER, vae: dict = FLUX_DEV_VAE) -> dict:
    model = random_flux(device, transformer, vae)
    sampler = SamplerSettings(args.size, args.size, num_steps=args.sample_steps)
    results = {"generation": measure_generation(model, sampler, args.k, args.repeats)}
    strategy = deepspeed_lora(model, args)
    for variant in ("live", "cached"):
        results[variant] = measure_training(model, strategy, sampler, args, variant)
    return results


def report(results: dict, args, device: torch.device) -> None:
    name, peak = card_peak(device)
    gib = 2**30
    generation = results["generation"]
    print(f"FLUX.1-dev configuration, random bf16 weights, {args.size}x{args.size}, on {name}")
    print(f"generation: {generation['images_per_second']:.2f} images/s at {args.sample_steps} steps "
          f"({args.k} images a batch), peak {generation['peak_bytes'] / gib:.1f} GiB")
    print(f"GDRO step, LoRA rank {args.rank}, DeepSpeed ZeRO-2 bf16, {args.groups} group(s) x k={args.k}, "
          f"gradient checkpointing {'off' if args.no_gradient_checkpointing else 'on'}:")
    print(f"{'reference':12}{'samples/s':>12}{'peak GiB':>10}{'TFLOP/s':>10}{'MFU':>8}")
    for variant in ("live", "cached"):
        result = results[variant]
        mfu = f"{result['flops'] / peak:.1%}" if peak else "n/a"
        print(f"{variant:12}{result['samples_per_second']:>12.2f}{result['peak_bytes'] / gib:>10.1f}"
              f"{result['flops'] / 1e12:>10.1f}{mfu:>8}")
    cached = results["cached"]
    print(f"ratio cached / live: {cached['samples_per_second'] / results['live']['samples_per_second']:.2f}x")
    print(f"reference cache: {cached['cache_bytes_per_group'] / 2**20:.1f} MiB per group of {args.k} "
          f"({args.draws} draws, float16), {cached['cache_seconds_per_group']:.2f} s per group to make, against "
          f"{args.k / generation['images_per_second']:.2f} s to generate the group")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--sample-steps", type=int, default=28)
    parser.add_argument("--groups", type=int, default=1, help="groups per training micro-batch")
    parser.add_argument("--k", type=int, default=4, help="members per group, and images per generation batch")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--draws", type=int, default=8, help="cached (t, eps) draws per group")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="timed generation batches")
    parser.add_argument("--no-gradient-checkpointing", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("flux_scale.py measures FLUX.1-dev at full size and needs a CUDA GPU with about 60 GiB free; "
                 "this machine has none. On a CPU, benchmarks/train_step_throughput.py measures the tiny model.")
    device = torch.device("cuda")
    torch.backends.cuda.enable_cudnn_sdp(False)  # as the training workers do (gdro_ray.train.worker)
    report(run(device, args), args, device)


if __name__ == "__main__":
    main()
