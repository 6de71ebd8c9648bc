"""Rewards on a CLIP model (transformers): CLIPScore and PickScore (text-image agreement), and the LAION
aesthetic predictor (an MLP on the image embedding alone).

Both embed the image and its prompt with a CLIP model and score their cosine similarity c:
  clipscore   2.5 * max(c, 0)                 Hessel et al. 2021, on openai/clip-vit-large-patch14 (as Flow-GRPO)
  pickscore   exp(logit_scale) * c            Kirstain et al. 2023, PickScore_v1 (a fine-tuned CLIP-H) with the
                                              processor of laion/CLIP-ViT-H-14-laion2B-s32B-b79K; about 18-24
  hpsv2       c                               HPSv2.1 (Wu et al. 2023), an OpenCLIP ViT-H-14 fine-tuned on human
                                              preferences, converted once to transformers' layout
                                              (gdro_ray/rewards/open_clip_weights.py); about 0.25-0.35
  aesthetic   LAION's improved aesthetic predictor (sac+logos+ava1-l14-linearMSE) on CLIP ViT-L/14's unit image
              embedding, about 1-10; its head is published as a pickle (.pth), so it is given here as a
              safetensors file converted from it (README)
Weights load lazily (on load() or the first batch) as safetensors from a hub id or a local directory, on the GPU
when the scoring actor has one, and images are scored batch_size at a time.
"""

from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoProcessor, CLIPModel

from gdro_ray.rewards.loading import BatchedModelReward, load_pretrained


class CLIPTextImageReward(BatchedModelReward):
    """Embeds each image and its prompt; a subclass says how their cosine becomes the reward."""

    def __init__(self, model: str | None, processor: str | None = None, revision: str | None = None,
                 batch_size: int = 16):
        self.source, self.processor_source, self.revision, self.batch_size = model, processor, revision, batch_size

    def from_cosine(self, cosine: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def build(self) -> CLIPModel:
        if self.source is None:
            raise ValueError(f"the {self.name} reward needs \"model\": its weights as a transformers CLIP "
                             "directory (HPSv2.1: python -m gdro_ray.rewards.open_clip_weights, see its help)")
        model, self._processor = load_pretrained(CLIPModel, AutoProcessor, self.source, self.revision,
                                                 self.processor_source)
        return model

    def score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        inputs = self._processor(text=prompts, images=images, return_tensors="pt", padding=True, truncation=True)
        outputs = self._model(**inputs.to(self._device))
        cosine = (outputs.image_embeds * outputs.text_embeds).sum(dim=-1)  # both unit vectors
        return self.from_cosine(cosine.float(), self._model.logit_scale.float())


class CLIPScore(CLIPTextImageReward):
    name = "clipscore"

    def from_cosine(self, cosine: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        return 2.5 * cosine.clamp(min=0)


class PickScore(CLIPTextImageReward):
    name = "pickscore"

    def from_cosine(self, cosine: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        return logit_scale.exp() * cosine


class HPSv2(CLIPTextImageReward):
    name = "hpsv2"

    def from_cosine(self, cosine: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        return cosine


# The predictor's MLP (Linear, Dropout, ...): the indices of its linear layers in its published state dict.
AESTHETIC_LAYERS = (0, 2, 4, 6, 7)


class AestheticReward(BatchedModelReward):
    name = "aesthetic"

    def __init__(self, model: str, head: str | None, revision: str | None = None, batch_size: int = 16):
        self.source, self.head_path, self.revision, self.batch_size = model, head, revision, batch_size

    def build(self) -> CLIPModel:
        if self.head_path is None or not Path(self.head_path).is_file():
            raise FileNotFoundError(f"aesthetic head {self.head_path!r} does not exist: expected a safetensors file "
                                    "of the predictor's MLP (README: how to convert the published .pth)")
        weights = load_file(self.head_path)
        expected = {f"layers.{index}.{kind}" for index in AESTHETIC_LAYERS for kind in ("weight", "bias")}
        if set(weights) != expected:
            raise ValueError(f"aesthetic head {self.head_path!r} holds {sorted(weights)}, expected {sorted(expected)}")
        model, self._processor = load_pretrained(CLIPModel, AutoProcessor, self.source, self.revision)
        self._head = [(weights[f"layers.{i}.weight"].to(self._device).float(),
                       weights[f"layers.{i}.bias"].to(self._device).float()) for i in AESTHETIC_LAYERS]
        return model

    def score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        pixels = self._processor(images=images, return_tensors="pt")["pixel_values"].to(self._device)
        hidden = self._model.get_image_features(pixel_values=pixels).pooler_output
        hidden = torch.nn.functional.normalize(hidden.float(), dim=-1)
        for weight, bias in self._head:  # dropout is off at inference: the MLP is its linear layers
            hidden = torch.nn.functional.linear(hidden, weight, bias)
        return hidden.squeeze(-1)
