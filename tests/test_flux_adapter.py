import json

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from diffusers.pipelines.flux.pipeline_flux import retrieve_timesteps

from conftest import IMAGE_SIZE, sampler
from gdro_ray.flow import TimestepSampler, time_shift
from gdro_ray.models import FluxModel, LoraSpec, load_flow_model
from gdro_ray.profiles import profile_for
from gdro_ray.train.step import GroupBatch, LossConfig, group_batch_loss

PROMPTS = ["a photo of a red cube", 'a sign that says "GDRO"']
SMALL_LORA = LoraSpec(rank=4, alpha=4)


def probe_inputs(model, batch=2, seed=0):
    """Fixed noisy latents, times and prompts to compare velocities on."""
    generator = torch.Generator().manual_seed(seed)
    prompts = model.encode_prompts(PROMPTS[:batch])
    tokens = (IMAGE_SIZE // (model.vae_scale_factor * 2)) ** 2
    channels = model.transformer.config.in_channels
    latents = torch.randn(batch, tokens, channels, generator=generator)
    t = torch.rand(batch, generator=generator)
    return latents, t, prompts


def velocity(model, inputs):
    latents, t, prompts = inputs
    with torch.no_grad():
        return model.velocity(latents, t, prompts, sampler())


def gdro_step(model, optimizer, seed=0):
    """One optimiser step on L_GDRO + 0.5 L_reg over a generated group of three, as training does."""
    prompt = model.encode_prompts(PROMPTS[:1])
    group = model.generate(prompt, seeds=[1, 2, 3], sampler=sampler(2))
    batch = GroupBatch(group.latents.unsqueeze(0), torch.tensor([[0.2, 0.9, 0.5]]), prompt, sampler())
    config = LossConfig(beta=50.0, tau=0.05, gamma=0.5, timesteps=TimestepSampler("uniform"))
    result = group_batch_loss(model, batch, config, torch.Generator().manual_seed(seed))
    optimizer.zero_grad()
    result.loss.backward()
    optimizer.step()
    return result


def test_euler_over_scheduler_sigmas_reproduces_flux_pipeline(tiny_flux):
    """Pins sign and scale: x_{t'} = x_t + (t' - t) v integrates to the pipeline's own output."""
    steps, seed = 6, 123
    prompt = tiny_flux.encode_prompts(PROMPTS[:1])
    pipeline = tiny_flux.pipeline
    expected = pipeline(
        prompt_embeds=prompt.sequence,
        pooled_prompt_embeds=prompt.pooled,
        height=IMAGE_SIZE,
        width=IMAGE_SIZE,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        return_dict=False,
    )[0]

    channels = pipeline.transformer.config.in_channels // 4
    latents, _ = pipeline.prepare_latents(
        1, channels, IMAGE_SIZE, IMAGE_SIZE, torch.float32, "cpu", torch.Generator().manual_seed(seed)
    )
    mu = tiny_flux.timestep_shift_mu(IMAGE_SIZE, IMAGE_SIZE)
    retrieve_timesteps(pipeline.scheduler, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    sigmas = pipeline.scheduler.sigmas  # steps + 1 values, from ~1 down to 0
    for sigma, next_sigma in zip(sigmas[:-1], sigmas[1:]):
        with torch.no_grad():
            v = tiny_flux.velocity(latents, sigma.expand(1), prompt, sampler())
        latents = latents + (next_sigma - sigma) * v
    torch.testing.assert_close(latents, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(expected, torch.zeros_like(expected))

    # The scheduler's shifted sigmas are our time_shift of the unshifted grid.
    grid = torch.tensor(np.linspace(1.0, 1 / steps, steps), dtype=torch.float32)
    torch.testing.assert_close(sigmas[:-1], time_shift(grid, mu))


def test_generation_is_deterministic_per_seed(tiny_flux):
    prompt = tiny_flux.encode_prompts(PROMPTS[:1])
    first = tiny_flux.generate(prompt, seeds=[7, 8, 9], sampler=sampler(3))
    again = tiny_flux.generate(prompt, seeds=[7, 8, 9], sampler=sampler(3))
    alone = tiny_flux.generate(prompt, seeds=[9], sampler=sampler(3))
    assert first.images.shape == (3, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert first.images.min() >= 0 and first.images.max() <= 1
    assert torch.equal(first.images, again.images) and torch.equal(first.latents, again.latents)
    torch.testing.assert_close(alone.latents[0], first.latents[2], atol=1e-5, rtol=1e-5)  # not tied to batch
    assert not torch.allclose(first.latents[0], first.latents[1])
    assert first.seeds == [7, 8, 9]


def test_images_encode_to_packed_latents_and_decode_back(tiny_flux):
    images = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    latents = tiny_flux.encode_images(images)
    tokens = (IMAGE_SIZE // (tiny_flux.vae_scale_factor * 2)) ** 2
    assert latents.shape == (2, tokens, tiny_flux.transformer.config.in_channels)
    decoded = tiny_flux.decode_latents(latents, IMAGE_SIZE, IMAGE_SIZE)
    assert decoded.shape == images.shape and decoded.dtype == torch.float32
    assert torch.equal(tiny_flux.encode_images(images), latents)  # the posterior mean: deterministic


def test_prompt_embeddings_are_computed_once_and_reused(tiny_flux):
    prompts = tiny_flux.encode_prompts(PROMPTS)
    assert prompts.sequence.shape[:2] == (2, tiny_flux.max_sequence_length)
    assert prompts.pooled.shape[0] == 2 and prompts.text_ids.shape == (tiny_flux.max_sequence_length, 3)
    one = tiny_flux.encode_prompts(PROMPTS[1:])
    torch.testing.assert_close(prompts.select([1]).sequence, one.sequence)
    assert not torch.allclose(prompts.sequence[0], prompts.sequence[1])


def test_fresh_lora_equals_reference_then_learns_while_reference_stays(tiny_flux):
    inputs = probe_inputs(tiny_flux)
    base = velocity(tiny_flux, inputs)
    tiny_flux.add_lora(SMALL_LORA)
    assert torch.equal(velocity(tiny_flux, inputs), base)
    with tiny_flux.reference():
        assert torch.equal(velocity(tiny_flux, inputs), base)

    trainable = tiny_flux.trainable_parameters()
    assert trainable and all("lora_" in name for name, p in tiny_flux.transformer.named_parameters() if p.requires_grad)
    gdro_step(tiny_flux, torch.optim.Adam(trainable, lr=1e-2))

    assert not torch.allclose(velocity(tiny_flux, inputs), base)
    with tiny_flux.reference():
        assert torch.equal(velocity(tiny_flux, inputs), base)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_flux):
    tiny_flux.add_lora(SMALL_LORA)
    latents, t, prompts = probe_inputs(tiny_flux)
    with torch.no_grad():  # move off the zero update so every LoRA factor has a gradient
        for parameter in tiny_flux.trainable_parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))

    def gradients():
        tiny_flux.transformer.zero_grad()
        tiny_flux.velocity(latents, t, prompts, sampler()).square().mean().backward()
        return [p.grad.clone() for p in tiny_flux.trainable_parameters()]

    tiny_flux.transformer.train()
    plain = gradients()
    tiny_flux.set_gradient_checkpointing(True)
    assert tiny_flux.transformer.is_gradient_checkpointing
    checkpointed = gradients()
    tiny_flux.set_gradient_checkpointing(False)
    assert not tiny_flux.transformer.is_gradient_checkpointing
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b)


def test_lora_round_trip_in_diffusers_format(tiny_flux, tiny_flux_dir, tmp_path):
    inputs = probe_inputs(tiny_flux)
    tiny_flux.add_lora(SMALL_LORA)
    gdro_step(tiny_flux, torch.optim.Adam(tiny_flux.trainable_parameters(), lr=1e-2))
    trained = velocity(tiny_flux, inputs)
    tiny_flux.save_lora(tmp_path / "lora")
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()

    # Our loader reproduces the velocities and keeps the LoRA trainable.
    reloaded = FluxModel.from_pretrained(str(tiny_flux_dir), device="cpu")
    reloaded.load_lora(tmp_path / "lora")
    torch.testing.assert_close(velocity(reloaded, inputs), trained)
    assert len(reloaded.trainable_parameters()) == len(tiny_flux.trainable_parameters())

    # And so does diffusers' own FluxPipeline.load_lora_weights on a plain pipeline.
    pipeline = FluxPipeline.from_pretrained(tiny_flux_dir)
    pipeline.load_lora_weights(tmp_path / "lora")
    torch.testing.assert_close(velocity(FluxModel(pipeline, device="cpu"), inputs), trained)


def test_saving_given_weights_in_place_of_the_live_lora(tiny_flux, tiny_flux_dir, tmp_path):
    """save_lora(state_dict=...) writes other weights of the same LoRA, as an EMA export does."""
    inputs = probe_inputs(tiny_flux)
    base = velocity(tiny_flux, inputs)
    tiny_flux.add_lora(SMALL_LORA)
    untrained = {name: value.clone() for name, value in tiny_flux.lora_state_dict().items()}
    gdro_step(tiny_flux, torch.optim.Adam(tiny_flux.trainable_parameters(), lr=1e-2))
    tiny_flux.save_lora(tmp_path / "snapshot", state_dict=untrained)
    reloaded = FluxModel.from_pretrained(str(tiny_flux_dir), device="cpu")
    reloaded.load_lora(tmp_path / "snapshot")
    torch.testing.assert_close(velocity(reloaded, inputs), base)


def test_model_loading_errors_name_the_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing-model"):
        load_flow_model(str(tmp_path / "missing-model"))
    (tmp_path / "not-a-pipeline").mkdir()
    (tmp_path / "not-a-pipeline" / "config.json").write_text(json.dumps({}))
    with pytest.raises(ValueError, match="not a diffusers pipeline"):
        load_flow_model(str(tmp_path / "not-a-pipeline"))


def test_unknown_lora_target_is_refused(tiny_flux):
    with pytest.raises(ValueError, match="unknown LoRA target module 'attn.to_qkv'"):
        tiny_flux.add_lora(LoraSpec(rank=2, target_modules=("attn.to_q", "attn.to_qkv")))
    with pytest.raises(ValueError, match="rank must be >= 1"):
        LoraSpec(rank=0)
    with pytest.raises(RuntimeError, match="attach a LoRA first"):
        with tiny_flux.reference():
            pass


def test_an_unreachable_hub_id_says_so():
    # conftest sets HF_HUB_OFFLINE, as on a machine without network.
    with pytest.raises(OSError, match="could not load 'no-such-org/no-such-flux' from the hub"):
        load_flow_model("no-such-org/no-such-flux")


def test_a_model_built_in_memory_encodes_deterministically():
    # Modules built from configs start in train mode; the adapter must not leave T5's dropout on.
    first, second = load_flow_model(profile_for("tiny").weights), load_flow_model(profile_for("tiny").weights)
    prompts = ['a sign that says "OPEN"', "a photo of a cat"]
    together = first.encode_prompts(prompts)
    torch.testing.assert_close(second.encode_prompts(prompts[:1]).sequence[0], together.sequence[0])
    torch.testing.assert_close(first.encode_prompts(prompts[:1]).pooled[0], together.pooled[0])


def test_classifier_free_guidance_changes_samples_deterministically(tiny_flux):
    prompt = tiny_flux.encode_prompts(PROMPTS[:1])
    plain = tiny_flux.generate(prompt, [5, 6], sampler(3))
    guided = tiny_flux.generate(prompt, [5, 6], sampler(3, cfg_scale=4.0))
    assert torch.equal(guided.latents, tiny_flux.generate(prompt, [5, 6], sampler(3, cfg_scale=4.0)).latents)
    empty = tiny_flux.encode_prompts([""])  # the empty prompt given, as training's evaluation set does
    assert torch.equal(guided.latents, tiny_flux.generate(prompt, [5, 6], sampler(3, cfg_scale=4.0), empty).latents)
    assert not torch.allclose(guided.latents, plain.latents)


def test_distilled_guidance_comes_from_the_sampler_settings(tiny_flux_dir):
    """A guidance-distilled model (FLUX.1-dev) is conditioned on the guidance its samples were made with."""
    pipeline = FluxPipeline.from_pretrained(tiny_flux_dir)
    config = {**pipeline.transformer.config, "guidance_embeds": True}
    pipeline.transformer = FluxTransformer2DModel.from_config(config)
    model = FluxModel(pipeline, device="cpu")
    latents, t, prompts = probe_inputs(model)
    with torch.no_grad():
        low, again, high = (model.velocity(latents, t, prompts, sampler(guidance_scale=g)) for g in (1.0, 1.0, 5.0))
    assert torch.equal(low, again) and not torch.allclose(low, high)

