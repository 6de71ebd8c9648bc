"""Reward models from a local directory or a hub id: safetensors weights only, never remote code; and the
tensors of a published pickle, read once for conversion without running any of its code."""

from pathlib import Path

import torch


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
