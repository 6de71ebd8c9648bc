"""FLUX.1 behind the FlowModel interface, on diffusers' FluxPipeline and FluxTransformer2DModel.

Works the same for a real checkpoint (a local directory or a hub id; bf16 on GPU) and the embedded
tiny FLUX (fp32 on CPU). The reference policy is the same transformer with its LoRA disabled, so
there is one copy of the base weights.
"""

import re
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from gdro_ray.models.base import FlowModel, GeneratedGroup, LoraSpec, PromptEmbeddings, SamplerSettings

ADAPTER_NAME = "default"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def check_model_source(source: str) -> None:
    """Refuse, before any work starts, a model that is neither a diffusers directory nor a hub id."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ValueError(f"model path {source!r} is not a diffusers pipeline: it has no model_index.json")
    elif path.exists() or not HUB_ID.match(source):
        raise FileNotFoundError(
            f"model {source!r} is neither a diffusers pipeline directory nor a hub id like 'black-forest-labs/FLUX.1-dev'"
        )


def load_flux_pipeline(
    source: str, dtype: torch.dtype, revision: str | None = None, text_encoders: bool = True
) -> FluxPipeline:
    """A FluxPipeline from a local diffusers directory or a hub id, safetensors only, no remote code.

    text_encoders=False skips CLIP and T5 (about 10 GB on FLUX.1): training reads cached embeddings.
    """
    check_model_source(source)
    skipped = {} if text_encoders else dict(text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None)
    path = Path(source).expanduser()
    if path.is_dir():
        return FluxPipeline.from_pretrained(path, dtype=dtype, use_safetensors=True, **skipped)
    try:
        return FluxPipeline.from_pretrained(source, dtype=dtype, revision=revision, use_safetensors=True, **skipped)
    except OSError as error:
        raise OSError(
            f"could not load {source!r} from the hub (no local directory of that name exists; gated FLUX.1 "
            f"checkpoints need `hf auth login` and network): {error}"
        ) from error


class FluxModel(FlowModel):
    def __init__(
        self,
        pipeline: FluxPipeline,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype or default_dtype(self.device)
        if pipeline.transformer.dtype != self.dtype:
            pipeline.to(dtype=self.dtype)
        self.pipeline = pipeline.to(self.device)
        # Inference mode everywhere (a pipeline built from configs starts in train mode, with T5's
        # dropout on); a training loop switches the transformer back with train().
        for component in pipeline.components.values():
            if isinstance(component, torch.nn.Module):
                component.eval()
        self.pipeline.set_progress_bar_config(disable=True)
        self.transformer = pipeline.transformer
        self.empty_prompt: PromptEmbeddings | None = None  # for classifier-free guidance, encoded on first use
        # T5 length: 512 on FLUX.1, the tokenizer's own length on small models (None: loaded without text encoders).
        self.max_sequence_length = None if pipeline.tokenizer_2 is None else min(512, pipeline.tokenizer_2.model_max_length)

    @classmethod
    def from_pretrained(
        cls, source: str, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
        revision: str | None = None, text_encoders: bool = True,
    ) -> "FluxModel":
        target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or default_dtype(target)
        return cls(load_flux_pipeline(source, dtype, revision, text_encoders), target, dtype)

    @property
    def vae_scale_factor(self) -> int:
        return self.pipeline.vae_scale_factor

    # -- text and images -------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeddings:
        if self.max_sequence_length is None:
            raise RuntimeError("this model was loaded without its text encoders (text_encoders=False)")
        sequence, pooled, text_ids = self.pipeline.encode_prompt(
            prompt=list(prompts), prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length
        )
        return PromptEmbeddings(sequence, pooled, text_ids)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        vae = self.pipeline.vae
        pixels = images.to(self.device, self.dtype) * 2 - 1
        latents = vae.encode(pixels).latent_dist.mode()  # the mean: deterministic
        latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
        batch, channels, height, width = latents.shape
        return FluxPipeline._pack_latents(latents, batch, channels, height, width)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        vae = self.pipeline.vae
        latents = FluxPipeline._unpack_latents(latents.to(self.device, self.dtype), height, width, self.vae_scale_factor)
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        images = vae.decode(latents, return_dict=False)[0]
        return (images.float().cpu() / 2 + 0.5).clamp(0, 1)

    # -- the denoiser ----------------------------------------------------------------------

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
        if len(prompt) != 1:
            raise ValueError(f"generate() takes the embeddings of one prompt, got {len(prompt)}")
        # One CPU generator per image: the same seed gives the same noise on any device and in any batch.
        generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]
        group = prompt.select([0] * len(seeds)).to(self.device, self.dtype)
        guided = {}
        if sampler.cfg_scale > 1:  # FluxPipeline's true_cfg_scale: against the empty prompt, twice the cost
            if unconditional is None:
                self.empty_prompt = self.empty_prompt or self.encode_prompts([""])
                unconditional = self.empty_prompt
            empty = unconditional.select([0] * len(seeds)).to(self.device, self.dtype)
            guided = dict(negative_prompt_embeds=empty.sequence, negative_pooled_prompt_embeds=empty.pooled,
                          true_cfg_scale=sampler.cfg_scale)
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

    # -- LoRA ------------------------------------------------------------------------------

    def add_lora(self, spec: LoraSpec) -> None:
        if self.has_lora:
            raise ValueError("this model already has a LoRA attached")
        names = [name for name, _ in self.transformer.named_modules()]
        for target in spec.target_modules:
            if not any(name == target or name.endswith("." + target) for name in names):
                raise ValueError(
                    f"unknown LoRA target module {target!r}: no module of {type(self.transformer).__name__} "
                    f"is named so (e.g. {', '.join(sorted({n.split('.', 2)[-1] for n in names if '.attn.' in n})[:6])})"
                )
        self.transformer.requires_grad_(False)
        config = LoraConfig(
            r=spec.rank,
            lora_alpha=spec.alpha,
            lora_dropout=spec.dropout,
            target_modules=list(spec.target_modules),
            init_lora_weights="gaussian",  # B = 0: the LoRA starts as a zero update
        )
        self.transformer.add_adapter(config, adapter_name=ADAPTER_NAME)

    @property
    def has_lora(self) -> bool:
        return bool(getattr(self.transformer, "peft_config", None))

    @contextmanager
    def reference(self):
        if not self.has_lora:
            raise RuntimeError("the reference policy is the model with its LoRA disabled; attach a LoRA first")
        self.transformer.disable_adapters()
        try:
            yield self
        finally:
            self.transformer.enable_adapters()

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.transformer.parameters() if p.requires_grad]

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        if enabled:
            self.transformer.enable_gradient_checkpointing()
        else:
            self.transformer.disable_gradient_checkpointing()

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        return get_peft_model_state_dict(self.transformer, adapter_name=ADAPTER_NAME)

    def save_lora(self, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Diffusers' LoRA format: FluxPipeline.load_lora_weights(directory) accepts it."""
        if not self.has_lora:
            raise RuntimeError("no LoRA attached to save")
        state_dict = self.lora_state_dict() if state_dict is None else state_dict
        FluxPipeline.save_lora_weights(
            directory,
            transformer_lora_layers={k: v.detach().cpu().contiguous() for k, v in state_dict.items()},
            transformer_lora_adapter_metadata=self.transformer.peft_config[ADAPTER_NAME].to_dict(),
        )

    def load_lora(self, directory: str | Path) -> None:
        """Attach the LoRA saved in ``directory`` (diffusers' format) to this model."""
        if self.has_lora:
            raise ValueError("this model already has a LoRA attached; load into a model without one")
        if not Path(directory).is_dir():
            raise FileNotFoundError(f"LoRA directory {str(directory)!r} does not exist")
        self.pipeline.load_lora_weights(directory, adapter_name=ADAPTER_NAME)
        # As after add_lora: the LoRA trains, the base stays frozen.
        for name, parameter in self.transformer.named_parameters():
            parameter.requires_grad_("lora_" in name)
