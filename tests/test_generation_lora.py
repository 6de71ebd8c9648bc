"""Groups generated with a LoRA (a later round's policy): the LoRA reaches the actor once, its images are the
merged model's, and the reference cache stays the base model's."""

import json

import pytest
import torch
from diffusers import FluxPipeline

from conftest import sampler
from gdro_ray.data.records import tensor_from_bytes
from gdro_ray.data.reference_cache import reference_draws
from gdro_ray.generation import GenerationConfig, GroupGenerator, derive_seed
from gdro_ray.models import FluxModel, LoraSpec


@pytest.fixture(scope="module")
def lora_dir(tiny_flux_dir, tmp_path_factory):
    """A LoRA of the tiny FLUX away from zero, saved in diffusers' format."""
    model = FluxModel(FluxPipeline.from_pretrained(tiny_flux_dir), device="cpu")
    model.add_lora(LoraSpec(rank=4, alpha=4))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.trainable_parameters():
            parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    directory = tmp_path_factory.mktemp("lora")
    model.save_lora(directory)
    return directory


def generate(config: GenerationConfig) -> tuple[GroupGenerator, dict]:
    generator = GroupGenerator(config)
    prompt = config.prompts()[0]
    table = generator({"prompt_id": [prompt.prompt_id], "prompt": [prompt.prompt],
                       "metadata": [json.dumps(prompt.metadata)]})
    return generator, table.to_pylist()[0]


def test_a_lora_generates_what_the_merged_model_generates(tiny_flux_dir, lora_dir, tmp_path):
    settings = dict(task="ocr", model=str(tiny_flux_dir), k=3, sampler=sampler(3), num_prompts=1, out=str(tmp_path))
    actor, row = generate(GenerationConfig(**settings, lora=str(lora_dir)))
    latents = tensor_from_bytes(row["latents"], row["latents_shape"], row["latents_dtype"])
    merged = FluxPipeline.from_pretrained(tiny_flux_dir)
    merged.load_lora_weights(lora_dir)
    merged.fuse_lora()
    merged.unload_lora_weights()  # the LoRA now lives in the base weights only
    model = FluxModel(merged, device="cpu")
    expected = model.generate(model.encode_prompts([row["prompt"]]), row["seeds"], sampler(3)).latents
    torch.testing.assert_close(latents, expected, atol=1e-4, rtol=1e-4)
    _, base = generate(GenerationConfig(**settings))
    assert not torch.allclose(latents, tensor_from_bytes(base["latents"], base["latents_shape"], base["latents_dtype"]),
                              atol=1e-3)  # the LoRA made a difference
    assert row["seeds"] == [derive_seed(0, row["prompt_id"], i) for i in range(3)]


def test_the_cache_of_groups_made_with_a_lora_is_the_base_models(tiny_flux_dir, lora_dir, tmp_path):
    config = GenerationConfig(task="ocr", model=str(tiny_flux_dir), k=3, sampler=sampler(2), num_prompts=1,
                              out=str(tmp_path), lora=str(lora_dir), reference_draws=2)
    assert config.identity()["lora"]["name"] == "pytorch_lora_weights.safetensors"
    actor, row = generate(config)
    latents = tensor_from_bytes(row["latents"], row["latents_shape"], row["latents_dtype"])
    base = FluxModel(FluxPipeline.from_pretrained(tiny_flux_dir), device="cpu")
    prompt = base.encode_prompts([row["prompt"]])
    timestep_seed = derive_seed(0, f"{row['prompt_id']}/reference", 0)  # the draws the actor made, with the base
    expected = reference_draws(base, latents, prompt, sampler(2), actor.timesteps, timestep_seed,
                               row["reference_noise_seeds"])
    torch.testing.assert_close(tensor_from_bytes(row["reference_velocities"], row["reference_shape"], "float16"),
                               tensor_from_bytes(expected["reference_velocities"], expected["reference_shape"],
                                                 "float16"), atol=2e-3, rtol=2e-3)


def test_a_later_round_can_take_the_next_prompts_and_bad_settings_are_named(tmp_path):
    first = GenerationConfig(task="ocr", num_prompts=3, out=str(tmp_path)).prompts()
    later = GenerationConfig(task="ocr", num_prompts=3, first_prompt=3, out=str(tmp_path)).prompts()
    both = GenerationConfig(task="ocr", num_prompts=6, out=str(tmp_path)).prompts()
    assert first + later == both
    with pytest.raises(FileNotFoundError, match="holds no pytorch_lora_weights.safetensors"):
        GenerationConfig(task="ocr", lora=str(tmp_path), out=str(tmp_path))
    with pytest.raises(ValueError, match="no prompts after its first 100000"):
        GenerationConfig(task="ocr", first_prompt=100000, out=str(tmp_path)).prompts()


def test_the_cache_can_hold_the_loras_own_velocities_instead(tiny_flux_dir, lora_dir, tmp_path):
    settings = dict(task="ocr", model=str(tiny_flux_dir), k=3, sampler=sampler(2), num_prompts=1, out=str(tmp_path),
                    lora=str(lora_dir), reference_draws=2)
    _, base = generate(GenerationConfig(**settings))
    config = GenerationConfig(**settings, reference_policy="lora")
    assert config.identity()["reference_cache"]["lora"] == config.identity()["lora"]  # whose velocities, by hash
    _, policy = generate(config)
    assert policy["latents"] == base["latents"] and policy["reference_noise_seeds"] == base["reference_noise_seeds"]
    cached = [tensor_from_bytes(row["reference_velocities"], row["reference_shape"], "float16") for row in (base, policy)]
    assert not torch.allclose(*cached, atol=1e-2)  # the LoRA's velocities, not the base's
    with pytest.raises(ValueError, match="give both --lora and --reference-draws"):
        GenerationConfig(**{**settings, "reference_draws": 0}, reference_policy="lora")
