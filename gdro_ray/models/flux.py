"""FLUX.1 behind the FlowModel interface, on diffusers' FluxPipeline and FluxTransformer2DModel.

Works the same for a real checkpoint (a local directory or a hub id; bf16 on GPU) and the embedded
tiny FLUX (fp32 on CPU).
"""

import numpy as np
import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from gdro_ray.models.base import GeneratedGroup, ModelFamily, PromptEmbeddings, SamplerSettings
from gdro_ray.models.diffusers_model import JOINT_ATTENTION_TARGETS, DiffusersFlowModel
from gdro_ray.presets import PAPER_ONLINE_PRESETS, task_presets


class FluxModel(DiffusersFlowModel):
    PIPELINE = FluxPipeline
    # FLUX's attention and feed-forward projections, in the double-stream and single-stream blocks.
    LORA_TARGETS = JOINT_ATTENTION_TARGETS + (
        "ff.net.0.proj",
        "ff.net.2",
        "ff_context.net.0.proj",
        "ff_context.net.2",
        "proj_mlp",
    )

    def __init__(self, pipeline: FluxPipeline, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__(pipeline, device, dtype)
        # T5 length: 512 on FLUX.1, the tokenizer's own length on small models (None: loaded without text encoders).
        self.max_sequence_length = None if pipeline.tokenizer_2 is None else min(512, pipeline.tokenizer_2.model_max_length)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeddings:
        if self.max_sequence_length is None:
            raise RuntimeError("this model was loaded without its text encoders (text_encoders=False)")
        sequence, pooled, text_ids = self.pipeline.encode_prompt(
            prompt=list(prompts), prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length
        )
        return PromptEmbeddings(sequence, pooled, text_ids)

    # FLUX packs each 2x2 patch of latents into one token of 4C channels.
    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        return FluxPipeline._pack_latents(latents, *latents.shape)

    def unpack(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return FluxPipeline._unpack_latents(tokens, height, width, self.vae_scale_factor)

    def velocity(
        self, latents: torch.Tensor, t: torch.Tensor, prompts: PromptEmbeddings, sampler: SamplerSettings
    ) -> torch.Tensor:
        batch, height, width = latents.shape[0], sampler.height, sampler.width
        if len(prompts) != batch:
            raise ValueError(f"got {len(prompts)} prompt embeddings for {batch} latents; select() them per latent")
        image_ids = FluxPipeline._prepare_latent_image_ids(
            batch, height // (self.vae_scale_factor * 2), width // (self.vae_scale_factor * 2), self.device, self.dtype
        )
        guidance = None
        if self.transformer.config.guidance_embeds:  # guidance-distilled models (FLUX.1-dev)
            guidance = torch.full((batch,), sampler.guidance_scale, device=self.device, dtype=torch.float32)
        prompts = prompts.to(self.device, self.dtype)
        return self.transformer(
            hidden_states=latents.to(self.device, self.dtype),
            timestep=t.to(self.device, self.dtype),  # FLUX's transformer takes t in [0, 1] (pipeline: sigma*1000/1000)
            guidance=guidance,
            pooled_projections=prompts.pooled,
            encoder_hidden_states=prompts.sequence,
            txt_ids=prompts.text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]

    @torch.no_grad()
    def generate(
        self, prompt: PromptEmbeddings, seeds: list[int], sampler: SamplerSettings,
        unconditional: PromptEmbeddings | None = None,
    ) -> GeneratedGroup:
        # One CPU generator per image: the same seed gives the same noise on any device and in any batch.
        generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]
        group, guided = self.group_conditioning(prompt, len(seeds), sampler, unconditional)
        if guided:  # FluxPipeline's true_cfg_scale: against the empty prompt, twice the cost
            guided["true_cfg_scale"] = sampler.cfg_scale
        latents = self.pipeline(
            prompt_embeds=group.sequence,
            pooled_prompt_embeds=group.pooled,
            height=sampler.height,
            width=sampler.width,
            num_inference_steps=sampler.num_steps,
            guidance_scale=sampler.guidance_scale,
            generator=generators,
            output_type="latent",
            return_dict=False,
            **guided,
        )[0]
        images = self.decode_latents(latents, sampler.height, sampler.width)
        return GeneratedGroup(latents, images, [int(s) for s in seeds])

    def initial_noise(self, seeds: list[int], sampler: SamplerSettings) -> torch.Tensor:
        generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]
        latents, _ = self.pipeline.prepare_latents(len(seeds), self.transformer.config.in_channels // 4, sampler.height,
                                                   sampler.width, self.dtype, self.device, generators)
        return latents

    def sampling_sigmas(self, sampler: SamplerSettings) -> torch.Tensor:
        # FluxPipeline's own schedule: linspace(1, 1/N, N) moved by the resolution's shift, then a final 0.
        scheduler = self.pipeline.scheduler
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / sampler.num_steps, sampler.num_steps).tolist(),
                                mu=self.timestep_shift_mu(sampler.height, sampler.width), device="cpu")
        return scheduler.sigmas.float().clone()

    def timestep_shift_mu(self, height: int, width: int) -> float:
        config = self.pipeline.scheduler.config
        tokens = (height // (self.vae_scale_factor * 2)) * (width // (self.vae_scale_factor * 2))
        return calculate_shift(
            tokens,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )


FAMILY = ModelFamily(
    name="flux",
    pipeline_class="FluxPipeline",
    hub_names=r"(?i)flux",
    model=FluxModel,
    sampler=SamplerSettings(height=512, width=512, num_steps=28),  # FLUX.1-dev's 28 Euler steps
    preset="paper",
    # Ours, not the paper's (its summary gives no schedule): steps, learning rate, alpha = rank; the EMA decay
    # is TrainConfig's default, 0.99.
    presets=task_presets({"ocr": dict(steps=300, lr=3e-4, lora_alpha=32.0),
                          "geneval": dict(steps=700, lr=3e-4, lora_alpha=32.0)}),
    online_presets=PAPER_ONLINE_PRESETS,
    source="the GDRO paper's tau, gamma, beta, k and rank (it trained FLUX.1-dev); steps, lr and alpha ours; "
           "the online baseline Flow-GRPO's published configs",
)
