"""The one small interface every model family implements for gdro-ray.

Latents are "packed": (batch, tokens, channels), the layout the transformer consumes. Images are float
tensors (batch, 3, H, W) in [0, 1]. Time t follows gdro_ray.flow: t = 1 is noise, t = 0 data.
"""

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gdro_ray.flow import TimestepSampler

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the weights file of a LoRA directory in diffusers' format

@dataclass(frozen=True)
class LoraSpec:
    """A LoRA adapter: rank, scale alpha (the update is scaled by alpha / rank) and target modules,
    named as module-name suffixes of the transformer (empty: the model family's own)."""

    rank: int = 32
    alpha: float = 32.0
    target_modules: tuple[str, ...] = ()
    dropout: float = 0.0

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")


@dataclass(frozen=True)
class SamplerSettings:
    """How images are sampled: size, Euler steps, FLUX.1-dev's distilled guidance, and classifier-free
    guidance against the empty prompt (cfg_scale > 1 doubles the cost). Generation records it in every
    group row; evaluation samples with it and training uses its size and guidance."""

    height: int = field(metadata={"help": "image height in pixels"})
    width: int = field(metadata={"help": "image width in pixels"})
    num_steps: int = field(metadata={"help": "Euler steps of the sampler"})
    guidance_scale: float = field(default=3.5, metadata={"help": "distilled guidance of FLUX.1-dev"})
    cfg_scale: float = field(default=1.0, metadata={"help": "classifier-free guidance (1: off; > 1 doubles the cost)"})

    def __post_init__(self):
        for name in ("height", "width", "num_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"sampler {name} must be >= 1, got {getattr(self, name)}")
        if self.cfg_scale < 1:
            raise ValueError(f"cfg_scale must be >= 1 (1: no classifier-free guidance), got {self.cfg_scale}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "SamplerSettings":
        return cls(**values)

    def with_overrides(self, **values) -> "SamplerSettings":
        """These settings with the given ones replaced, None meaning "keep"."""
        return dataclasses.replace(self, **{name: value for name, value in values.items() if value is not None})


@dataclass
class PromptEmbeddings:
    """Text conditioning, computed once per prompt and reused: sequence embeddings (B, L, D), the pooled
    embedding (B, P) and FLUX's text position ids (L, 3; zeros for families without them)."""

    sequence: torch.Tensor
    pooled: torch.Tensor
    text_ids: torch.Tensor = field(default=None)

    def __post_init__(self):
        if self.text_ids is None:
            self.text_ids = torch.zeros(self.sequence.shape[1], 3, dtype=self.sequence.dtype)

    def __len__(self) -> int:
        return self.sequence.shape[0]

    def select(self, index: torch.Tensor | list[int]) -> "PromptEmbeddings":
        """Rows by index, e.g. repeat_interleave'd to give every member of a group its prompt."""
        index = torch.as_tensor(index, device=self.sequence.device)
        return PromptEmbeddings(self.sequence[index], self.pooled[index], self.text_ids)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "PromptEmbeddings":
        return PromptEmbeddings(
            self.sequence.to(device, dtype), self.pooled.to(device, dtype), self.text_ids.to(device, dtype)
        )


@dataclass
class GeneratedGroup:
    """k samples of one prompt: packed latents (k, N, C), images (k, 3, H, W) in [0, 1], their seeds."""

    latents: torch.Tensor
    images: torch.Tensor
    seeds: list[int]


class FlowModel(ABC):
    """A rectified-flow text-to-image model with a LoRA on its denoiser."""

    device: torch.device
    dtype: torch.dtype

    @abstractmethod
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeddings: ...

    @abstractmethod
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] -> packed latents (B, N, C)."""

    @abstractmethod
    def decode_latents(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Packed latents -> images (B, 3, H, W) in [0, 1], float32 on the CPU."""

    @abstractmethod
    def velocity(
        self, latents: torch.Tensor, t: torch.Tensor, prompts: PromptEmbeddings, sampler: SamplerSettings
    ) -> torch.Tensor:
        """The denoiser's velocity v(x_t, t, c) for packed latents (B, N, C) at times t (B,), for images of
        the sampler's size under its distilled guidance."""

    @abstractmethod
    def generate(
        self, prompt: PromptEmbeddings, seeds: list[int], sampler: SamplerSettings,
        unconditional: PromptEmbeddings | None = None,
    ) -> GeneratedGroup:
        """One image per seed for a single prompt; the same seeds give the same images. unconditional: the
        empty prompt's embeddings for classifier-free guidance (default: encoded on first use)."""

    @abstractmethod
    def initial_noise(self, seeds: list[int], sampler: SamplerSettings) -> torch.Tensor:
        """The packed starting noise (k, N, C) that generate() draws from these seeds, on the model's device."""

    @abstractmethod
    def sampling_sigmas(self, sampler: SamplerSettings) -> torch.Tensor:
        """The noise levels generate() steps through, from 1 to 0 (num_steps + 1,), float32 on the CPU."""

    @abstractmethod
    def timestep_shift_mu(self, height: int, width: int) -> float:
        """The resolution-dependent shift the model's sampler uses at this image size."""

    def training_timesteps(self, kind: str, sampler: SamplerSettings) -> TimestepSampler:
        """How training draws t for images of the sampler's size ("flux_shift": at the model's shift for it)."""
        if kind == "flux_shift":
            return TimestepSampler(kind, shift_mu=self.timestep_shift_mu(sampler.height, sampler.width))
        return TimestepSampler(kind)

    @abstractmethod
    def add_lora(self, spec: LoraSpec) -> None:
        """Attach a fresh LoRA (a zero update, so policy == reference) and freeze everything else."""

    @abstractmethod
    def reference(self) -> AbstractContextManager:
        """Within this context the LoRA is off: the model is the reference policy."""

    @abstractmethod
    def trainable_parameters(self) -> list[torch.nn.Parameter]: ...

    @abstractmethod
    def set_gradient_checkpointing(self, enabled: bool) -> None: ...

    @abstractmethod
    def lora_state_dict(self) -> dict[str, torch.Tensor]: ...

    @abstractmethod
    def save_lora(self, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Save the LoRA (or the given LoRA weights, e.g. an EMA) in the model family's standard format."""

    @abstractmethod
    def load_lora(self, directory: str | Path) -> None: ...


@dataclass(frozen=True)
class ModelFamily:
    """What a model family is: how a checkpoint is recognised, its adapter, and how it samples and trains by
    default. A family module (gdro_ray/models/*.py) declares one as FAMILY; gdro_ray.models.families finds it."""

    name: str
    pipeline_class: str  # model_index.json's _class_name of its diffusers checkpoints
    hub_names: str  # a regular expression that recognises its hub ids without the network
    model: type  # its FlowModel subclass, with from_pretrained(source, device, revision, text_encoders)
    sampler: SamplerSettings  # how its checkpoints sample when nothing else is asked
    preset: str  # the name of its training presets (--preset)
    presets: dict  # task -> TrainConfig values
    online_presets: dict  # task -> OnlineConfig values
    source: str  # where the numbers come from, in a sentence
