"""Pretraining the embedded tiny FLUX on shapes and glyphs renders, on a CPU, resumably.

Two stages on the same diffusers classes as FLUX.1: (1) the AutoencoderKL learns to encode 32x32
renders into 16x16x4 latents; its latent mean and spread become FLUX's shift and scaling factors;
(2) the FluxTransformer2DModel and both text encoders learn rectified flow on those latents.

The captions are noisy on purpose, as web captions are: some renders show another count, colour or
text than their prompt says. A base trained to convergence on such data errs in ways the task rewards
measure, which is what lets GDRO show a gain (docs/results.md, "Making alignment visible").
Held-out prompts (data.prompts.is_heldout with the same seed) never appear in pretraining.
"""

import copy
import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import FluxPipeline
from diffusers.training_utils import EMAModel, compute_density_for_timestep_sampling

from gdro_ray.data.prompts import NUMBER_WORDS, is_heldout
from gdro_ray.flow import noisy_latents, velocity_target
from gdro_ray.tiny_world.model import TinyFluxConfig, build_tiny_flux_pipeline
from gdro_ray.tiny_world.glyphs import GLYPH_ALPHABET, GLYPH_LENGTHS, random_glyph_prompt, render_glyphs
from gdro_ray.tiny_world.shapes import COUNTS, SHAPE_CLASSES, SHAPE_COLORS, shapes_stream, render_shapes

# The shipped model's sizes: about 2M transformer parameters, 64 image tokens of 16 channels.
TINY_WORLD_MODEL = TinyFluxConfig(
    num_layers=2, num_single_layers=2, num_attention_heads=4, attention_head_dim=32,
    axes_dims_rope=(8, 12, 12), text_dim=64, vae_channels=(32, 64),
)  # fmt: skip


@dataclass
class PretrainConfig:
    seed: int = 0
    heldout_fraction: float = 0.1  # as data.prompts.load_prompts: its held-out prompts stay unseen
    batch_size: int = 64
    vae_steps: int = 600
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    steps: int = 6000
    lr: float = 1e-3
    warmup_steps: int = 200
    wrong_count_rate: float = 0.25  # shapes renders showing another count than the prompt says
    wrong_color_rate: float = 0.15
    wrong_text_rate: float = 0.1  # glyph renders showing another text
    glyph_fraction: float = 0.55  # the share of glyph renders in a batch; the rest are shapes scenes
    # Shapes scenes drawn tag by tag, each GenEval tag as often as the others (as in GenEval's own prompt
    # set), instead of prompt by prompt, where the 59 attribute-binding prompts take half the scenes and
    # the 3 single-object prompts 3%.
    shapes_by_tag: bool = False
    glyph_lengths: tuple[int, ...] = GLYPH_LENGTHS  # text lengths of glyph renders, drawn uniformly
    # The text encoders' learning rate, relative to lr. They learn from scratch beside the transformer; at 3x they
    # ran together the words it did not use yet (shape classes and counts: caption_word_similarity 0.91 and 0.92),
    # which no LoRA on the transformer could then learn to follow. At 0.3x those words stay apart (0.59, 0.65).
    text_lr_scale: float = 0.3
    prompt_dropout: float = 0.1  # captions replaced by "": the model also learns p(x), for guided sampling
    ema_decay: float = 0.0  # > 0: export this moving average of the trained weights instead of the last ones
    checkpoint_every: int = 200
    time_limit_minutes: float = 58.0  # stop (and export) when reached, whatever the step

    def __post_init__(self):
        if not self.glyph_lengths or not all(1 <= length <= 3 for length in self.glyph_lengths):
            raise ValueError(f"glyph_lengths must hold text lengths of 1 to 3 letters, got {self.glyph_lengths}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) (0: export the last weights), got {self.ema_decay}")


def noisy_shapes_metadata(metadata: dict, rng: random.Random, config: PretrainConfig) -> dict:
    """The metadata a render will show: the prompt's, or with a count or a colour changed."""
    shown = copy.deepcopy(metadata)
    clause = rng.choice(shown["include"])
    if rng.random() < config.wrong_count_rate:
        clause["count"] = rng.choice([n for n in (1, 2, 3, 4) if n != clause["count"]])
    if "color" in clause and rng.random() < config.wrong_color_rate:
        clause["color"] = rng.choice([c for c in SHAPE_COLORS if c != clause["color"]])
    return shown


def noisy_text(text: str, rng: random.Random, config: PretrainConfig) -> str:
    if rng.random() >= config.wrong_text_rate:
        return text
    position = rng.randrange(len(text))
    return text[:position] + rng.choice(GLYPH_ALPHABET.replace(text[position], "")) + text[position + 1 :]


class RenderedPrompts:
    """Endless (prompt, noisy render) pairs from the training split of both tiny tasks."""

    def __init__(self, config: PretrainConfig):
        self.config = config
        keep = lambda record: not is_heldout(record.prompt_id, config.seed, config.heldout_fraction)  # noqa: E731
        self.shapes = [record for record in shapes_stream(config.seed) if keep(record)]
        self.shapes_per_tag = [[r for r in self.shapes if r.metadata["tag"] == tag]
                               for tag in sorted({r.metadata["tag"] for r in self.shapes})]
        self.keep = keep

    def batch(self, size: int, rng: random.Random) -> tuple[list[str], torch.Tensor]:
        prompts, images = [], []
        for _ in range(size):
            if rng.random() < self.config.glyph_fraction:
                # Drawn with replacement: a distinct-prompt stream would run dry of short texts.
                draw = lambda: random_glyph_prompt(rng, self.config.glyph_lengths)  # noqa: E731
                record = next(r for r in iter(draw, None) if self.keep(r))
                image = render_glyphs(noisy_text(record.metadata["text"], rng, self.config), rng)
            else:
                pool = rng.choice(self.shapes_per_tag) if self.config.shapes_by_tag else self.shapes
                record = rng.choice(pool)
                image = render_shapes(noisy_shapes_metadata(record.metadata, rng, self.config), rng)
            prompts.append("" if rng.random() < self.config.prompt_dropout else record.prompt)
            images.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1))
        return prompts, torch.stack(images)


def pretrain(work_dir: Path, out_dir: Path, config: PretrainConfig, device: str = "cpu", log=print) -> dict:
    """Run (or resume) both stages in ``work_dir``; export the pipeline to ``out_dir``; return the recipe.

    The recipe is the same on any device; a GPU only runs it faster (in float32, as on the CPU).
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    pipeline = build_tiny_flux_pipeline(TINY_WORLD_MODEL, seed=config.seed).to(device)
    data = RenderedPrompts(config)
    rng = random.Random(config.seed)
    state = _load_checkpoint(work_dir, pipeline)
    if state is not None:
        rng.setstate(state["python_rng"])
        torch.set_rng_state(state["torch_rng"])
        log(f"resumed: stage {state['stage']}, step {state['step']}, {state['seconds']:.0f} s so far")
    seconds_before = state["seconds"] if state else 0.0
    started = time.perf_counter()
    elapsed = lambda: seconds_before + time.perf_counter() - started  # noqa: E731

    stage = state["stage"] if state else "vae"
    if stage == "vae":
        _train_vae(pipeline, data, rng, config, work_dir, state, elapsed, log)
        state = None
    probes = prompt_reliance_probes(config)
    transformer_losses = _train_transformer(pipeline, data, rng, config, work_dir, state, elapsed, log, probes)

    pipeline.to("cpu").save_pretrained(out_dir, safe_serialization=True)
    recipe = {"config": dataclasses.asdict(config), "model": dataclasses.asdict(TINY_WORLD_MODEL),
              "seconds": round(elapsed()), "final_loss": transformer_losses[-1] if transformer_losses else None,
              "prompt_reliance": {task: round(prompt_reliance(pipeline, *probe), 4)
                                  for task, probe in probes.items()},
              "caption_word_similarity": {kind: round(value, 4)
                                          for kind, value in caption_word_similarity(pipeline).items()},
              "device": torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu, {torch.get_num_threads()} threads",
              "torch": torch.__version__}
    (out_dir / "recipe.json").write_text(json.dumps(recipe, indent=2))
    return recipe


def encode_renders(pipeline: FluxPipeline, images: torch.Tensor) -> torch.Tensor:
    """Renders in [0, 1] (B, 3, H, W) -> FLUX's packed, shifted and scaled latents (B, tokens, channels)."""
    vae = pipeline.vae
    with torch.no_grad():
        z = vae.encode(images.to(vae.device) * 2 - 1).latent_dist.mode()
    z = (z - vae.config.shift_factor) * vae.config.scaling_factor
    return FluxPipeline._pack_latents(z, *z.shape)


def flow_loss(pipeline: FluxPipeline, prompts: list[str], x0: torch.Tensor, t: torch.Tensor,
              eps: torch.Tensor) -> torch.Tensor:
    """The rectified-flow loss of the transformer on packed latents x0 with their captions."""
    device = pipeline.transformer.device
    sequence, pooled, text_ids = pipeline.encode_prompt(prompts, None, device=device,
                                                        max_sequence_length=pipeline.tokenizer_2.model_max_length)
    side = int(x0.shape[1] ** 0.5)
    image_ids = FluxPipeline._prepare_latent_image_ids(1, side, side, device, x0.dtype)
    prediction = pipeline.transformer(hidden_states=noisy_latents(x0, eps, t), timestep=t, pooled_projections=pooled,
                                      encoder_hidden_states=sequence, txt_ids=text_ids, img_ids=image_ids,
                                      return_dict=False)[0]
    return F.mse_loss(prediction, velocity_target(x0, eps))


def prompt_reliance_probes(config: PretrainConfig, size: int = 128) -> dict[str, tuple[list[str], torch.Tensor]]:
    """Fixed renders of each task with true captions (no caption noise, no empty captions)."""
    clean = dict(wrong_count_rate=0.0, wrong_color_rate=0.0, wrong_text_rate=0.0, prompt_dropout=0.0)
    return {task: RenderedPrompts(dataclasses.replace(config, glyph_fraction=fraction, **clean))
            .batch(size, random.Random(f"reliance-{task}"))
            for task, fraction in (("glyphs", 1.0), ("shapes", 0.0))}


def prompt_reliance(pipeline: FluxPipeline, prompts: list[str], images: torch.Tensor) -> float:
    """How much the model draws from its prompt: the rise of the flow loss when each render is given the next
    render's caption, relative to that loss. Near 0 the model paints these renders from the noise alone and no
    reward on them can teach it to follow a prompt; the shipped model reads glyph captions far more than shapes."""
    generator = torch.Generator().manual_seed(0)  # the same noise levels and noise for both captions
    x0 = encode_renders(pipeline, images)
    t = (0.1 + 0.8 * torch.rand(len(prompts), generator=generator)).to(x0.device)
    eps = torch.randn(x0.shape, generator=generator).to(x0.device)
    modules = (pipeline.transformer, pipeline.text_encoder, pipeline.text_encoder_2)
    modes = [module.training for module in modules]
    for module in modules:
        module.eval()  # T5's dropout would make the two losses differ by chance
    try:
        with torch.no_grad():
            true = flow_loss(pipeline, prompts, x0, t, eps).item()
            shuffled = flow_loss(pipeline, prompts[1:] + prompts[:1], x0, t, eps).item()
    finally:
        for module, mode in zip(modules, modes):
            module.train(mode)
    return (shuffled - true) / shuffled


# Captions that differ in one word, by the kind of word a tiny-world caption turns on: (template, words).
CAPTION_WORDS = {
    "colour": ("a photo of a {} square", tuple(SHAPE_COLORS)),
    "class": ("a photo of a red {}", SHAPE_CLASSES),
    "count": ("a photo of {} triangles", tuple(NUMBER_WORDS[count] for count in COUNTS)),
    "letter": ('a sign that says "{}"', tuple(GLYPH_ALPHABET)),
}


def caption_word_similarity(pipeline: FluxPipeline) -> dict[str, float]:
    """How alike the T5 encoder's outputs are at a word of each kind (colours, shape classes, counts, letters) in
    captions that differ only there: the mean cosine over pairs of words. Near 1 the encoder no longer tells those
    words apart, and no training of the transformer alone (a LoRA, as in alignment) can teach it to follow them."""
    encoder, tokenizer = pipeline.text_encoder_2, pipeline.tokenizer_2
    mode = encoder.training
    encoder.eval()  # T5's dropout would blur the comparison
    similarity = {}
    try:
        for kind, (template, words) in CAPTION_WORDS.items():
            ids = tokenizer([template.format(word) for word in words], padding="max_length", truncation=True,
                            max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
            differing = (ids != ids[0]).any(dim=0).nonzero().flatten()
            if len(differing) != 1:
                raise ValueError(f"the {kind} captions must differ in one token, they differ in {len(differing)}")
            with torch.no_grad():
                at_word = encoder(ids.to(encoder.device))[0][:, differing[0]].cpu()
            unit = F.normalize(at_word, dim=1)
            cosines = unit @ unit.T
            pairs = len(words) * (len(words) - 1)
            similarity[kind] = ((cosines.sum() - cosines.diagonal().sum()) / pairs).item()
    finally:
        encoder.train(mode)
    return similarity


def _train_vae(pipeline, data, rng, config, work_dir, state, elapsed, log) -> None:
    vae = pipeline.vae
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr)
    step = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
    while step < config.vae_steps:
        _, images = data.batch(config.batch_size, rng)
        pixels = images.to(vae.device) * 2 - 1
        posterior = vae.encode(pixels).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(reconstruction, pixels) + config.vae_kl_weight * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        if step % 50 == 0:
            log(f"vae step {step}/{config.vae_steps} loss {loss.item():.4f} ({elapsed():.0f} s)")
        if step % config.checkpoint_every == 0 and step < config.vae_steps:
            _save_checkpoint(work_dir, pipeline, "vae", step, optimizer, rng, elapsed())
    vae.eval()
    # FLUX's convention: latents = (z - shift) * scale have zero mean and unit spread.
    with torch.no_grad():
        _, images = data.batch(512, rng)
        latents = vae.encode(images.to(vae.device) * 2 - 1).latent_dist.mode()
    vae.register_to_config(shift_factor=latents.mean().item(), scaling_factor=1 / latents.std().item())
    vae.requires_grad_(False)
    _save_checkpoint(work_dir, pipeline, "transformer", 0, None, rng, elapsed())


def _train_transformer(pipeline, data, rng, config, work_dir, state, elapsed, log, probes) -> list[float]:
    vae, transformer = pipeline.vae, pipeline.transformer
    vae.requires_grad_(False)
    vae.eval()
    trained = [transformer, pipeline.text_encoder, pipeline.text_encoder_2]
    for module in trained:
        module.train()
    parameters = [p for module in trained for p in module.parameters()]
    text_lr = config.lr * config.text_lr_scale
    optimizer = torch.optim.AdamW([{"params": list(transformer.parameters())},
                                   {"params": [p for m in trained[1:] for p in m.parameters()], "lr": text_lr}],
                                  lr=config.lr)
    schedule = lambda step: min(1.0, (step + 1) / config.warmup_steps) * (  # noqa: E731
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step, config.steps) / config.steps)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    ema = EMAModel(parameters, decay=config.ema_decay) if config.ema_decay > 0 else None
    step = 0
    if state is not None and state.get("optimizer") is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = state["step"]
        if ema is not None:
            ema.load_state_dict(state["ema"])
    losses = []
    while step < config.steps and elapsed() < config.time_limit_minutes * 60:
        prompts, images = data.batch(config.batch_size, rng)
        x0 = encode_renders(pipeline, images)
        t = compute_density_for_timestep_sampling("logit_normal", config.batch_size, logit_mean=0.0, logit_std=1.0)
        loss = flow_loss(pipeline, prompts, x0, t.to(x0.device), torch.randn_like(x0))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.step(parameters)
        step += 1
        losses.append(loss.item())
        if step % 50 == 0:
            log(f"transformer step {step}/{config.steps} loss {sum(losses[-50:]) / 50:.4f} "
                f"lr {scheduler.get_last_lr()[0]:.2e} ({elapsed():.0f} s)")
        if step % config.checkpoint_every == 0:
            _save_checkpoint(work_dir, pipeline, "transformer", step, optimizer, rng, elapsed(), scheduler, ema)
            reliance = {task: prompt_reliance(pipeline, *probe) for task, probe in probes.items()}
            log(f"transformer step {step}: prompt reliance " + ", ".join(f"{k} {v:.3f}" for k, v in reliance.items())
                + "; caption word similarity "
                + ", ".join(f"{k} {v:.3f}" for k, v in caption_word_similarity(pipeline).items()))
    if ema is not None:
        ema.copy_to(parameters)
    for module in trained:
        module.eval()
    return losses


def _save_checkpoint(work_dir, pipeline, stage, step, optimizer, rng, seconds, scheduler=None, ema=None) -> None:
    state = {
        "stage": stage, "step": step, "seconds": seconds,
        "modules": {name: getattr(pipeline, name).state_dict()
                    for name in ("vae", "transformer", "text_encoder", "text_encoder_2")},
        "vae_config": {"shift_factor": pipeline.vae.config.shift_factor,
                       "scaling_factor": pipeline.vae.config.scaling_factor},
        "optimizer": optimizer.state_dict() if optimizer else None,
        "scheduler": scheduler.state_dict() if scheduler else None,
        "ema": ema.state_dict() if ema else None,
        "python_rng": rng.getstate(), "torch_rng": torch.get_rng_state(),
    }  # fmt: skip
    partial = work_dir / "checkpoint.pt.tmp"
    torch.save(state, partial)
    partial.replace(work_dir / "checkpoint.pt")


def _load_checkpoint(work_dir, pipeline) -> dict | None:
    path = work_dir / "checkpoint.pt"
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    for name, weights in state["modules"].items():
        getattr(pipeline, name).load_state_dict(weights)
    pipeline.vae.register_to_config(**state["vae_config"])
    return state
