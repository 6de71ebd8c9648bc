"""Stable Diffusion 3 and 3.5 (Medium, Large) behind the FlowModel interface, on diffusers'
StableDiffusion3Pipeline and SD3Transformer2DModel.

Three text encoders (CLIP-L, CLIP-G, T5) give the sequence and pooled embeddings, cached as FLUX's are.
Latents are packed into the same token layout as FLUX's (each patch of the transformer's patch size one
token), so every stage of gdro-ray sees (batch, tokens, channels). Sampling uses real classifier-free
guidance (SamplerSettings.cfg_scale); the distilled guidance_scale means nothing to SD3. Training's
velocity is the conditional one, the online baseline's rollouts guide it (gdro_ray/online/rollout.py).
"""

import math

import torch
from diffusers import StableDiffusion3Pipeline

from gdro_ray.models.base import GeneratedGroup, ModelFamily, PromptEmbeddings, SamplerSettings
from gdro_ray.models.diffusers_model import JOINT_ATTENTION_TARGETS, DiffusersFlowModel
from gdro_ray.presets import PAPER_ONLINE_PRESETS, task_presets

TIMESTEP_SCALE = 1000.0  # SD3's transformer takes the noise level times 1000


class SD3Model(DiffusersFlowModel):
    PIPELINE = StableDiffusion3Pipeline
    LORA_TARGETS = JOINT_ATTENTION_TARGETS  # Flow-GRPO's SD3.5 LoRA targets

    def __init__(self, pipeline: StableDiffusion3Pipeline, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__(pipeline, device, dtype)
        if pipeline.tokenizer is None:
            self.max_sequence_length = None  # loaded without its text encoders
        else:  # T5's 256 tokens on SD3.5 (its pipeline's default); a small tokenizer's own length
            t5 = pipeline.tokenizer_3
            self.max_sequence_length = 256 if t5 is None else min(256, t5.model_max_length)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeddings:
        if self.max_sequence_length is None:
            raise RuntimeError("this model was loaded without its text encoders (text_encoders=False)")
        sequence, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=list(prompts), prompt_2=None, prompt_3=None, device=self.device, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return PromptEmbeddings(sequence, pooled)

    @property
    def patch_size(self) -> int:
        return self.transformer.config.patch_size

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = latents.shape
        p = self.patch_size
        patches = latents.view(batch, channels, height // p, p, width // p, p).permute(0, 2, 4, 1, 3, 5)
        return patches.reshape(batch, (height // p) * (width // p), channels * p * p)

    def unpack(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        batch, p = tokens.shape[0], self.patch_size
        rows, columns = height // self.vae_scale_factor // p, width // self.vae_scale_factor // p
        channels = tokens.shape[-1] // (p * p)
        patches = tokens.view(batch, rows, columns, channels, p, p).permute(0, 3, 1, 4, 2, 5)
        return patches.reshape(batch, channels, rows * p, columns * p)

    def velocity(
        self, latents: torch.Tensor, t: torch.Tensor, prompts: PromptEmbeddings, sampler: SamplerSettings
    ) -> torch.Tensor:
        batch = latents.shape[0]
        if len(prompts) != batch:
            raise ValueError(f"got {len(prompts)} prompt embeddings for {batch} latents; select() them per latent")
        prompts = prompts.to(self.device, self.dtype)
        velocity = self.transformer(
            hidden_states=self.unpack(latents.to(self.device, self.dtype), sampler.height, sampler.width),
            timestep=(t * TIMESTEP_SCALE).to(self.device, self.dtype),
            encoder_hidden_states=prompts.sequence,
            pooled_projections=prompts.pooled,
            return_dict=False,
        )[0]
        return self.pack(velocity)

    @torch.no_grad()
    def generate(
        self, prompt: PromptEmbeddings, seeds: list[int], sampler: SamplerSettings,
        unconditional: PromptEmbeddings | None = None,
    ) -> GeneratedGroup:
        # Guided against the empty prompt (twice the cost) when cfg_scale > 1.
        group, guided = self.group_conditioning(prompt, len(seeds), sampler, unconditional)
        latents = self.pipeline(
            prompt_embeds=group.sequence,
            pooled_prompt_embeds=group.pooled,
            height=sampler.height,
            width=sampler.width,
            num_inference_steps=sampler.num_steps,
            guidance_scale=sampler.cfg_scale,  # 1: no guidance
            latents=self.unpack(self.initial_noise(seeds, sampler), sampler.height, sampler.width),
            output_type="latent",
            return_dict=False,
            **guided,
        )[0]
        tokens = self.pack(latents)
        images = self.decode_latents(tokens, sampler.height, sampler.width)
        return GeneratedGroup(tokens, images, [int(s) for s in seeds])

    def initial_noise(self, seeds: list[int], sampler: SamplerSettings) -> torch.Tensor:
        # One CPU generator per image: the same seed gives the same noise on any device and in any batch.
        generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]
        latents = self.pipeline.prepare_latents(len(seeds), self.transformer.config.in_channels, sampler.height,
                                                sampler.width, self.dtype, self.device, generators)
        return self.pack(latents)

    def sampling_sigmas(self, sampler: SamplerSettings) -> torch.Tensor:
        # StableDiffusion3Pipeline's own schedule: the scheduler's statically shifted grid, then a final 0.
        scheduler = self.pipeline.scheduler
        scheduler.set_timesteps(sampler.num_steps, device="cpu")
        return scheduler.sigmas.float().clone()

    def timestep_shift_mu(self, height: int, width: int) -> float:
        # A static shift s moves t to s t / (1 + (s - 1) t), FLUX's exponential shift at mu = log(s).
        return math.log(self.pipeline.scheduler.config.shift)


FAMILY = ModelFamily(
    name="sd3",
    pipeline_class="StableDiffusion3Pipeline",
    hub_names=r"(?i)stable-diffusion-3",
    model=SD3Model,
    # Flow-GRPO's SD3.5-Medium evaluation sampler: 512 px, 40 steps, classifier-free guidance 4.5.
    sampler=SamplerSettings(height=512, width=512, num_steps=40, cfg_scale=4.5),
    preset="sd3.5",
    # GDRO's values from the paper; the LoRA's alpha 64 and lr 3e-4 from Flow-GRPO's SD3.5 configs; steps ours.
    presets=task_presets({"ocr": dict(steps=300, lr=3e-4, lora_alpha=64.0),
                          "geneval": dict(steps=700, lr=3e-4, lora_alpha=64.0)}),
    online_presets=PAPER_ONLINE_PRESETS,
    source="the GDRO paper's tau, gamma, beta, k and rank; Flow-GRPO's SD3.5-Medium sampler, LoRA alpha and lr; "
           "steps ours; the online baseline Flow-GRPO's published configs (made on SD3.5-Medium)",
)
