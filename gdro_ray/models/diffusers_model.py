"""What every diffusers model family shares behind the FlowModel interface: loading a pipeline (safetensors
only, no remote code), the VAE's scaling, and the LoRA on the transformer through peft, whose reference
policy is the same transformer with the LoRA disabled (one copy of the base weights).

A family (flux.py, sd3.py) adds its text encoding, how its latents become tokens, its denoiser call and its
sampler.
"""

import inspect
from abc import abstractmethod
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from gdro_ray.models.base import FlowModel, LoraSpec, PromptEmbeddings, SamplerSettings

ADAPTER_NAME = "default"
# The image and text projections of an MM-DiT's joint attention (FLUX's and SD3's blocks name them alike).
JOINT_ATTENTION_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def text_components(pipeline_class: type[DiffusionPipeline]) -> list[str]:
    """The pipeline's text encoders and tokenizers, by their argument names."""
    names = inspect.signature(pipeline_class.__init__).parameters
    return [name for name in names if name.startswith(("text_encoder", "tokenizer"))]


def load_pipeline(
    pipeline_class: type[DiffusionPipeline], source: str, dtype: torch.dtype, revision: str | None = None,
    text_encoders: bool = True,
) -> DiffusionPipeline:
    """A pipeline from a local diffusers directory or a hub id, safetensors only, no remote code.

    text_encoders=False skips the text encoders (about 10 GB on FLUX.1): training reads cached embeddings.
    """
    skipped = {} if text_encoders else dict.fromkeys(text_components(pipeline_class))
    path = Path(source).expanduser()
    if path.is_dir():
        return pipeline_class.from_pretrained(path, dtype=dtype, use_safetensors=True, **skipped)
    try:
        return pipeline_class.from_pretrained(source, dtype=dtype, revision=revision, use_safetensors=True, **skipped)
    except OSError as error:
        raise OSError(
            f"could not load {source!r} from the hub (no local directory of that name exists; gated checkpoints "
            f"such as FLUX.1-dev and SD3.5 need `hf auth login` and network): {error}"
        ) from error


class DiffusersFlowModel(FlowModel):
    """A family's adapter over its diffusers pipeline. Subclasses set PIPELINE and LORA_TARGETS and implement
    the latent layout (pack, unpack), the text encoding, the denoiser call and the sampler."""

    PIPELINE: type[DiffusionPipeline]
    LORA_TARGETS: tuple[str, ...]  # the default LoRA target modules, as module-name suffixes

    def __init__(self, pipeline: DiffusionPipeline, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None):
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
        self.empty_prompt = None  # for classifier-free guidance, encoded on first use

    @classmethod
    def from_pretrained(
        cls, source: str, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
        revision: str | None = None, text_encoders: bool = True,
    ) -> "DiffusersFlowModel":
        target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or default_dtype(target)
        return cls(load_pipeline(cls.PIPELINE, source, dtype, revision, text_encoders), target, dtype)

    @property
    def vae_scale_factor(self) -> int:
        return self.pipeline.vae_scale_factor

    @abstractmethod
    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """The VAE's latents (B, C, h, w) -> the tokens (B, N, C') this interface passes around."""

    @abstractmethod
    def unpack(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The inverse of pack() for images of this size."""

    def group_conditioning(self, prompt: PromptEmbeddings, count: int, sampler: SamplerSettings,
                           unconditional: PromptEmbeddings | None = None) -> tuple[PromptEmbeddings, dict]:
        """One prompt's embeddings for a group of `count` images, and the pipeline's negative-prompt arguments:
        the empty prompt's embeddings (given, or encoded on first use) when the sampler guides (cfg_scale > 1)."""
        if len(prompt) != 1:
            raise ValueError(f"generate() takes the embeddings of one prompt, got {len(prompt)}")
        group = prompt.select([0] * count).to(self.device, self.dtype)
        if sampler.cfg_scale <= 1:  # guidance only above 1, as the pipelines apply it
            return group, {}
        if unconditional is None:
            self.empty_prompt = self.empty_prompt or self.encode_prompts([""])
            unconditional = self.empty_prompt
        empty = unconditional.select([0] * count).to(self.device, self.dtype)
        return group, dict(negative_prompt_embeds=empty.sequence, negative_pooled_prompt_embeds=empty.pooled)

    # -- images ----------------------------------------------------------------------------

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        vae = self.pipeline.vae
        pixels = images.to(self.device, self.dtype) * 2 - 1
        latents = vae.encode(pixels).latent_dist.mode()  # the mean: deterministic
        return self.pack((latents - vae.config.shift_factor) * vae.config.scaling_factor)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        vae = self.pipeline.vae
        latents = self.unpack(latents.to(self.device, self.dtype), height, width)
        images = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]
        return (images.float().cpu() / 2 + 0.5).clamp(0, 1)

    # -- LoRA ------------------------------------------------------------------------------

    def add_lora(self, spec: LoraSpec) -> None:
        if self.has_lora:
            raise ValueError("this model already has a LoRA attached")
        targets = spec.target_modules or self.LORA_TARGETS
        names = [name for name, _ in self.transformer.named_modules()]
        for target in targets:
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
            target_modules=list(targets),
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
        """Diffusers' LoRA format: the family's pipeline loads it with load_lora_weights(directory)."""
        if not self.has_lora:
            raise RuntimeError("no LoRA attached to save")
        state_dict = self.lora_state_dict() if state_dict is None else state_dict
        self.PIPELINE.save_lora_weights(
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
