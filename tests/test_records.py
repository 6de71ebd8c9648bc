import pytest
import torch

from gdro_ray.data.records import image_to_png, png_to_image, tensor_from_bytes, tensor_to_bytes
from gdro_ray.data.shards import shard_paths, write_shard


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_tensors_round_trip_bit_exactly(dtype):
    tensor = torch.randn(3, 5, 2).to(dtype)
    restored = tensor_from_bytes(*tensor_to_bytes(tensor))
    assert restored.dtype == dtype and torch.equal(restored, tensor)


def test_png_round_trip_keeps_8_bit_pixels():
    image = torch.rand(3, 8, 6)
    restored = torch.tensor(list(png_to_image(image_to_png(image)).getdata()), dtype=torch.float32)
    expected = (image * 255).round().permute(1, 2, 0).reshape(-1, 3)
    assert torch.equal(restored, expected)


def test_a_rewritten_batch_replaces_its_shard_instead_of_duplicating(tmp_path):
    row = dict(prompt_id="a", prompt="p", task="ocr", metadata="{}", seeds=[1], images=[b""], latents=b"",
               latents_shape=[0], latents_dtype="float32", prompt_embeds=b"", prompt_embeds_shape=[0],
               pooled_embeds=b"", pooled_embeds_shape=[0], embeds_dtype="float32", rewards=[0.5],
               reward_details=["{}"], sampler="{}")
    first = write_shard([row, {**row, "prompt_id": "b"}], tmp_path)
    second = write_shard([{**row, "prompt_id": "b"}, row], tmp_path)  # a retry, in another order
    assert first == second and shard_paths(tmp_path) == [first]
    assert not list(tmp_path.glob(".*.tmp"))
