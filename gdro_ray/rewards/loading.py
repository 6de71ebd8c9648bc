"""Reward models from a local directory or a hub id: safetensors weights only, never remote code; and the
tensors of a published pickle, read once for conversion without running any of its code."""

from pathlib import Path

import torch
from PIL import Image

from gdro_ray.rewards.base import Reward, RewardResult


def load_pretrained(model_class, processor_class, source: str, revision: str | None = None,
                    processor_source: str | None = None):
    """A transformers model and its processor (from processor_source when the model's repository has none); an
    error that names the source otherwise."""
    options = {"trust_remote_code": False} | ({"revision": revision} if revision else {})
    loading = source
    try:
        model = model_class.from_pretrained(source, use_safetensors=True, **options)
        loading = processor_source or source
        processor = processor_class.from_pretrained(loading, **({"trust_remote_code": False} if processor_source
                                                                 else options))
    except OSError as error:
        raise OSError(
            f"could not load {loading!r}: it is not a local model directory, and its hub copy is neither "
            f"cached nor reachable (no network?), or has no safetensors weights: {error}"
        ) from error
    return model, processor


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a .pt/.pth checkpoint (its "state_dict" when it has one), read without running any of its
    code."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    return checkpoint.get("state_dict", checkpoint)


class BatchedModelReward(Reward):
    """A reward computed by a model: built on first use (load() or the first batch) on the scoring actor's device,
    it scores batch_size images at a time. A subclass builds the model and scores one batch."""

    batch_size: int = 16
    _model: torch.nn.Module | None = None

    def build(self) -> torch.nn.Module:
        """The model (its processors kept on self), its tensors on self._device."""
        raise NotImplementedError

    def score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        """One reward per image of RGB images."""
        raise NotImplementedError

    def load(self) -> None:
        if self._model is None:
            self._device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            self._model = self.build().to(self._device).eval()

    @torch.no_grad()
    def score(self, images: list[Image.Image], metadata: list[dict]) -> list[RewardResult]:
        self.load()
        values = []
        for start in range(0, len(images), self.batch_size):
            batch = [image.convert("RGB") for image in images[start:start + self.batch_size]]
            prompts = [meta["prompt"] for meta in metadata[start:start + self.batch_size]]
            values += self.score_batch(batch, prompts).float().tolist()
        return [RewardResult(value) for value in values]
