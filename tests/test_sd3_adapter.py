"""Stable Diffusion 3 behind the FlowModel interface, on a tiny SD3 of random weights built from the same
diffusers and transformers classes as SD3.5 and saved as a checkpoint: the path a real one takes."""

import json

import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from conftest import IMAGE_SIZE, sampler
from gdro_ray.data.records import tensor_from_bytes
from gdro_ray.flow import time_shift
from gdro_ray.generation import GenerationConfig, GroupGenerator
from gdro_ray.models import LoraSpec, load_flow_model
from gdro_ray.models.sd3 import SD3Model
from gdro_ray.profiles import preset_values, profile_for
from gdro_ray.tiny_world.model import build_clip_tokenizer, build_t5_tokenizer
from gdro_ray.train.step import GroupBatch, LossConfig, group_batch_loss

PROMPTS = ["a photo of a red cube", 'a sign that says "GDRO"']


def tiny_clip(tokenizer, width: int) -> CLIPTextModelWithProjection:
    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, projection_dim=width,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))


def build_tiny_sd3_pipeline(seed: int = 0) -> StableDiffusion3Pipeline:
    """SD3.5's classes at a few thousand weights: CLIP-L and CLIP-G (16 wide each), T5 (32, as wide as both, as
    SD3's 4096 holds CLIP's 768 + 1280), two joint blocks (the last has no text output, as SD3's), 4 latent
    channels in 2x2 patches, SD3.5's VAE scaling and shift."""
    torch.manual_seed(seed)
    clip, t5 = build_clip_tokenizer(), build_t5_tokenizer(32)
    transformer = SD3Transformer2DModel(
        sample_size=IMAGE_SIZE // 2, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
        pos_embed_max_size=16,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1, latent_channels=4,
        norm_num_groups=8, sample_size=IMAGE_SIZE, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5305,
    )
    encoder_3 = T5EncoderModel(T5Config(
        vocab_size=len(t5), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, pad_token_id=t5.pad_token_id,
        eos_token_id=t5.eos_token_id, decoder_start_token_id=t5.pad_token_id,
    ))
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=tiny_clip(clip, 16), tokenizer=clip, text_encoder_2=tiny_clip(clip, 16), tokenizer_2=clip,
        text_encoder_3=encoder_3, tokenizer_3=t5,
    )


@pytest.fixture(scope="module")
def tiny_sd3_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-sd3")
    build_tiny_sd3_pipeline().save_pretrained(directory)
    return directory


@pytest.fixture
def tiny_sd3(tiny_sd3_dir):
    return load_flow_model(str(tiny_sd3_dir), device="cpu")


def probe_inputs(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    prompts = model.encode_prompts(PROMPTS)
    tokens = (IMAGE_SIZE // model.vae_scale_factor // model.patch_size) ** 2
    latents = torch.randn(2, tokens, model.transformer.config.in_channels * model.patch_size ** 2, generator=generator)
    return latents, torch.rand(2, generator=generator), prompts


def velocity(model, inputs):
    latents, t, prompts = inputs
    with torch.no_grad():
        return model.velocity(latents, t, prompts, sampler())


def test_a_checkpoint_directory_is_recognised_as_sd3_with_its_presets(tiny_sd3_dir, tiny_sd3):
    assert isinstance(tiny_sd3, SD3Model)
    profile = profile_for(str(tiny_sd3_dir))
    assert profile.preset == "sd3.5" and profile.sampler.cfg_scale == 4.5 and profile.sampler.num_steps == 40
    assert profile_for("stabilityai/stable-diffusion-3.5-medium").preset == "sd3.5"  # by name, offline
    assert preset_values("sd3.5", "ocr")["lora_alpha"] == 64.0  # Flow-GRPO's SD3.5 LoRA
    index = json.loads((tiny_sd3_dir / "model_index.json").read_text())
    (tiny_sd3_dir.parent / "unknown").mkdir(exist_ok=True)
    (tiny_sd3_dir.parent / "unknown" / "model_index.json").write_text(json.dumps({**index, "_class_name": "UNetPipe"}))
    with pytest.raises(ValueError, match="is a UNetPipe; gdro-ray knows these families: flux .*sd3"):
        load_flow_model(str(tiny_sd3_dir.parent / "unknown"))


def test_euler_over_the_sampling_sigmas_reproduces_the_pipeline(tiny_sd3):
    """Pins the velocity's sign, the time scale (SD3 takes t x 1000), the packing and the schedule."""
    settings = sampler(5)
    prompt = tiny_sd3.encode_prompts(PROMPTS[:1])
    group = tiny_sd3.generate(prompt, [3, 4], settings)
    latents = tiny_sd3.initial_noise([3, 4], settings)
    sigmas = tiny_sd3.sampling_sigmas(settings)
    assert sigmas[0] == 1 and sigmas[-1] == 0 and len(sigmas) == 6
    for sigma, next_sigma in zip(sigmas[:-1], sigmas[1:]):
        latents = latents + (next_sigma - sigma) * velocity(tiny_sd3, (latents, sigma.expand(2), prompt.select([0, 0])))
    torch.testing.assert_close(latents, group.latents, atol=1e-5, rtol=1e-5)
    assert group.images.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE) and not torch.equal(group.images[0], group.images[1])
    again = tiny_sd3.generate(prompt, [4], settings)
    torch.testing.assert_close(again.latents[0], group.latents[1], atol=1e-5, rtol=1e-5)  # per seed, not per batch


def test_classifier_free_guidance_and_the_static_shift(tiny_sd3):
    prompt = tiny_sd3.encode_prompts(PROMPTS[:1])
    plain, guided = (tiny_sd3.generate(prompt, [5], sampler(3, cfg_scale=c)).latents for c in (1.0, 4.5))
    assert torch.equal(guided, tiny_sd3.generate(prompt, [5], sampler(3, cfg_scale=4.5)).latents)
    assert not torch.allclose(plain, guided)
    # Training's shifted timesteps are the sampler's: the scheduler's static shift 3 is FLUX's mu = log 3.
    t = torch.tensor([0.1, 0.5, 0.9])
    torch.testing.assert_close(time_shift(t, tiny_sd3.timestep_shift_mu(IMAGE_SIZE, IMAGE_SIZE)), 3 * t / (1 + 2 * t))


def test_images_pack_into_tokens_and_back(tiny_sd3):
    images = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    tokens = tiny_sd3.encode_images(images)
    assert tokens.shape == (2, (IMAGE_SIZE // 2 // 2) ** 2, 16)
    latents = torch.randn(2, 4, IMAGE_SIZE // 2, IMAGE_SIZE // 2)
    assert torch.equal(tiny_sd3.unpack(tiny_sd3.pack(latents), IMAGE_SIZE, IMAGE_SIZE), latents)
    assert tiny_sd3.decode_latents(tokens, IMAGE_SIZE, IMAGE_SIZE).shape == images.shape


def test_a_gdro_step_trains_the_lora_and_exports_what_diffusers_loads(tiny_sd3, tiny_sd3_dir, tmp_path):
    inputs = probe_inputs(tiny_sd3)
    base = velocity(tiny_sd3, inputs)
    tiny_sd3.add_lora(LoraSpec(rank=4, alpha=8))
    assert torch.equal(velocity(tiny_sd3, inputs), base)
    names = {name.split(".lora_")[0].split(".", 2)[-1] for name, _ in tiny_sd3.transformer.named_parameters()
             if "lora_" in name}
    assert names == set(SD3Model.LORA_TARGETS)  # the family's targets when none are given

    prompt = tiny_sd3.encode_prompts(PROMPTS[:1])
    group = tiny_sd3.generate(prompt, [1, 2, 3], sampler(2))
    batch = GroupBatch(group.latents.unsqueeze(0), torch.tensor([[0.2, 0.9, 0.5]]), prompt, sampler())
    config = LossConfig(beta=50.0, tau=0.05, gamma=0.5, timesteps=tiny_sd3.training_timesteps("flux_shift", sampler()))
    optimizer = torch.optim.Adam(tiny_sd3.trainable_parameters(), lr=1e-2)
    result = group_batch_loss(tiny_sd3, batch, config, torch.Generator().manual_seed(0))
    result.loss.backward()
    optimizer.step()
    trained = velocity(tiny_sd3, inputs)
    assert torch.isfinite(result.loss) and not torch.allclose(trained, base)
    with tiny_sd3.reference():
        assert torch.equal(velocity(tiny_sd3, inputs), base)

    tiny_sd3.save_lora(tmp_path / "lora")
    pipeline = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir)
    pipeline.load_lora_weights(tmp_path / "lora")  # diffusers' own loader
    torch.testing.assert_close(velocity(SD3Model(pipeline, device="cpu"), inputs), trained)
    reloaded = load_flow_model(str(tiny_sd3_dir), device="cpu", text_encoders=False)
    reloaded.load_lora(tmp_path / "lora")
    torch.testing.assert_close(velocity(reloaded, (*inputs[:2], inputs[2])), trained)
    assert len(reloaded.trainable_parameters()) == len(tiny_sd3.trainable_parameters())


def test_the_generation_actor_makes_groups_and_their_reference_cache(tiny_sd3_dir, tiny_sd3, tmp_path):
    config = GenerationConfig(task="ocr", model=str(tiny_sd3_dir), k=2, sampler=sampler(2, cfg_scale=2.0),
                              num_prompts=1, out=str(tmp_path), reference_draws=2)
    prompt = config.prompts()[0]
    row = GroupGenerator(config)({"prompt_id": [prompt.prompt_id], "prompt": [prompt.prompt],
                                  "metadata": [json.dumps(prompt.metadata)]}).to_pylist()[0]
    latents = tensor_from_bytes(row["latents"], row["latents_shape"], row["latents_dtype"])
    expected = tiny_sd3.generate(tiny_sd3.encode_prompts([row["prompt"]]), row["seeds"], config.sampler).latents
    torch.testing.assert_close(latents, expected, atol=1e-5, rtol=1e-5)
    assert row["reference_shape"] == [2, 2, *latents.shape[1:]]
