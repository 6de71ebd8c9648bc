"""Model adapters behind one interface (FlowModel), one module per model family, and the loader of a
checkpoint.

Model names ("tiny", a directory, a hub id) are resolved into weights by gdro_ray.profiles; this package
only ever sees a diffusers directory or a hub id.
"""

import torch

from gdro_ray.models.base import (
    LORA_WEIGHTS, FlowModel, GeneratedGroup, LoraSpec, ModelFamily, PromptEmbeddings, SamplerSettings,
)
from gdro_ray.models.families import check_model_source, family_of, model_families
from gdro_ray.models.flux import FluxModel

__all__ = [
    "FlowModel",
    "FluxModel",
    "GeneratedGroup",
    "LORA_WEIGHTS",
    "LoraSpec",
    "ModelFamily",
    "PromptEmbeddings",
    "SamplerSettings",
    "check_model_source",
    "family_of",
    "load_flow_model",
    "model_families",
]


def load_flow_model(
    weights: str, device: str | torch.device | None = None, revision: str | None = None, text_encoders: bool = True
) -> FlowModel:
    """A diffusers directory or a hub id of any known family. text_encoders=False leaves the text encoders out
    (training reads cached embeddings)."""
    return family_of(weights, revision).model.from_pretrained(weights, device=device, revision=revision,
                                                              text_encoders=text_encoders)
