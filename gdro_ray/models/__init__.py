"""Model adapters behind one interface (FlowModel), and the loader of a checkpoint.

Model names ("tiny", a directory, a hub id) are resolved into weights by gdro_ray.profiles; this package
only ever sees a diffusers directory or a hub id.
"""

import torch

from gdro_ray.models.base import (
    FLUX_LORA_TARGETS, LORA_WEIGHTS, FlowModel, GeneratedGroup, LoraSpec, PromptEmbeddings, SamplerSettings,
)
from gdro_ray.models.flux import FluxModel, check_model_source

__all__ = [
    "FLUX_LORA_TARGETS",
    "FlowModel",
    "FluxModel",
    "GeneratedGroup",
    "LORA_WEIGHTS",
    "LoraSpec",
    "PromptEmbeddings",
    "SamplerSettings",
    "check_model_source",
    "load_flow_model",
]


def load_flow_model(
    weights: str, device: str | torch.device | None = None, revision: str | None = None, text_encoders: bool = True
) -> FlowModel:
    """A diffusers FLUX directory or a hub id. text_encoders=False leaves the text encoders out (training
    reads cached embeddings)."""
    return FluxModel.from_pretrained(weights, device=device, revision=revision, text_encoders=text_encoders)
