"""Model adapters behind one interface (FlowModel), and the loader that picks one from a model name."""

import torch

from gdro_ray.models.base import FLUX_LORA_TARGETS, FlowModel, GeneratedGroup, LoraSpec, PromptEmbeddings
from gdro_ray.models.flux import FluxModel
from gdro_ray.models.tiny_flux import TinyFluxConfig, build_tiny_flux_pipeline

TINY = "tiny"


def default_image_size(model: str) -> int:
    return 32 if model == TINY else 512


def default_sampler_steps(model: str) -> int:
    """Euler steps: FLUX.1-dev's 28, and 20 on the tiny model (at 8 its shapes come out visibly softer)."""
    return 20 if model == TINY else 28

__all__ = [
    "FLUX_LORA_TARGETS",
    "FlowModel",
    "FluxModel",
    "GeneratedGroup",
    "LoraSpec",
    "PromptEmbeddings",
    "TINY",
    "TinyFluxConfig",
    "build_tiny_flux_pipeline",
    "default_image_size",
    "default_sampler_steps",
    "load_flow_model",
]


def load_flow_model(
    model: str = TINY, device: str | torch.device | None = None, revision: str | None = None, text_encoders: bool = True
) -> FlowModel:
    """``tiny`` (the tiny FLUX shipped in the package), a diffusers FLUX directory, or a hub id.

    text_encoders=False leaves the text encoders out of a real checkpoint (training needs none).
    """
    if model == TINY:
        from gdro_ray.tiny_world import PRETRAINED_DIR  # the tiny world builds on this package

        if not (PRETRAINED_DIR / "model_index.json").is_file():  # a checkout before its first pretraining
            return FluxModel(build_tiny_flux_pipeline(), device=device)
        model = str(PRETRAINED_DIR)
    return FluxModel.from_pretrained(model, device=device, revision=revision, text_encoders=text_encoders)
