"""One Parquet row per prompt group, and how tensors and images travel in it.

A row holds everything training needs without the text encoders or the VAE: the k_gen latents, the
cached prompt embeddings, the rewards; plus the PNG images, seeds and reward details for people.
Tensors are stored as raw bytes with their shape and dtype (bfloat16 included), so a row reads back
bit-exactly on any machine.
"""

import io

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

GROUP_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("prompt", pa.string()),
        ("task", pa.string()),
        ("metadata", pa.string()),  # JSON: the task metadata (GenEval clauses, OCR target, ...)
        ("seeds", pa.list_(pa.int64())),
        ("images", pa.list_(pa.binary())),  # PNG bytes, one per member
        ("latents", pa.binary()),  # (k_gen, tokens, channels), packed as the transformer consumes them
        ("latents_shape", pa.list_(pa.int64())),
        ("latents_dtype", pa.string()),
        ("prompt_embeds", pa.binary()),  # T5 sequence embeddings (tokens, dim)
        ("prompt_embeds_shape", pa.list_(pa.int64())),
        ("pooled_embeds", pa.binary()),  # pooled CLIP embedding (dim,)
        ("pooled_embeds_shape", pa.list_(pa.int64())),
        ("embeds_dtype", pa.string()),
        ("rewards", pa.list_(pa.float64())),
        ("reward_details", pa.list_(pa.string())),  # JSON per member
        ("sampler", pa.string()),  # JSON: height, width, steps, guidance
        ("compute", pa.string()),  # JSON: what making and scoring the group cost (gdro_ray.meter)
        # The reference cache (gdro_ray.data.reference_cache), null in a dataset made without one.
        ("reference_timesteps", pa.list_(pa.float64())),
        ("reference_noise_seeds", pa.list_(pa.int64())),
        ("reference_velocities", pa.binary()),  # (M, k_gen, tokens, channels) float16
        ("reference_shape", pa.list_(pa.int64())),
    ]
)

# numpy has no bfloat16: such tensors travel as their int16 bit patterns.
_BIT_VIEWS = {torch.bfloat16: torch.int16}


def tensor_to_bytes(tensor: torch.Tensor) -> tuple[bytes, list[int], str]:
    tensor = tensor.detach().cpu().contiguous()
    dtype = tensor.dtype
    array = tensor.view(_BIT_VIEWS[dtype]).numpy() if dtype in _BIT_VIEWS else tensor.numpy()
    return array.tobytes(), list(tensor.shape), str(dtype).removeprefix("torch.")


def tensor_from_bytes(data: bytes, shape, dtype: str) -> torch.Tensor:
    torch_dtype = getattr(torch, dtype)
    storage_dtype = _BIT_VIEWS.get(torch_dtype, torch_dtype)
    numpy_dtype = torch.empty(0, dtype=storage_dtype).numpy().dtype
    array = np.frombuffer(data, dtype=numpy_dtype).reshape([int(s) for s in shape])
    tensor = torch.from_numpy(array.copy())
    return tensor.view(torch_dtype) if storage_dtype != torch_dtype else tensor


def tensor_to_image(image: torch.Tensor) -> Image.Image:
    """A (3, H, W) float image in [0, 1] -> an 8-bit RGB PIL image."""
    pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(pixels)


def image_to_png(image: torch.Tensor) -> bytes:
    """A (3, H, W) float image in [0, 1] -> PNG bytes."""
    buffer = io.BytesIO()
    tensor_to_image(image).save(buffer, format="PNG")
    return buffer.getvalue()


def png_to_image(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")
