"""A complete tiny FLUX pipeline built from configs, with no network.

Same diffusers and transformers classes as FLUX.1 (FluxTransformer2DModel, AutoencoderKL, CLIP and T5
encoders, their tokenizers, FlowMatchEulerDiscreteScheduler), only small, so that every stage of
gdro-ray runs FLUX's real code path on a CPU. Tokenizers are made in-process: CLIP's from a
byte-level vocabulary (no merges), T5's from a character-level Unigram vocabulary.
"""

import string
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

# FLUX.1's scheduler settings, so that the resolution-dependent shift behaves as on the real model.
FLUX_SCHEDULER_CONFIG = dict(
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)


@dataclass(frozen=True)
class TinyFluxConfig:
    """Sizes of a tiny FLUX. Defaults: 32x32 RGB images -> 16x16x4 latents -> 64 tokens of 16 channels."""

    image_size: int = 32
    latent_channels: int = 4
    vae_channels: tuple[int, ...] = (16, 32)  # two levels: the VAE downsamples by 2
    num_layers: int = 1
    num_single_layers: int = 1
    num_attention_heads: int = 2
    attention_head_dim: int = 16
    axes_dims_rope: tuple[int, int, int] = (4, 6, 6)
    text_dim: int = 32
    text_layers: int = 2
    t5_max_length: int = 32
    t5_position_buckets: int = 8  # T5's relative-position buckets: how finely its tokens tell their order


def byte_level_chars() -> list[str]:
    """The 256 printable stand-ins for bytes that byte-level BPE vocabularies use (GPT-2, CLIP)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(161, 173)) + list(range(174, 256))
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def build_clip_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    chars = byte_level_chars()
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=max_length)


# Whole-word pieces for the prompt templates of the tiny world, so a prompt fits T5's short context in
# a few tokens; any other text still tokenises, character by character (so do the glyph surfaces
# "board", "banner", ...: the longest glyph prompt takes 19 of the 32 tokens).
TEMPLATE_WORDS = (
    "a an and the of photo sign that says text in bold letters poster with word label reading "
    "square squares circle circles triangle triangles red green blue yellow two three four "
    "left right above below"
).split()


def build_t5_tokenizer(max_length: int = 32) -> T5TokenizerFast:
    # Unigram pieces: specials first (pad 0, eos 1, unk 2, as T5), a word-start marker, characters, words.
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -5.0) for c in string.ascii_letters + string.digits + string.punctuation]
    pieces += [("\u2581" + c, -4.0) for c in string.ascii_letters + string.digits]
    pieces += [("\u2581" + word, -3.0) for word in TEMPLATE_WORDS if len(word) > 1]
    # model_max_length is the T5 sequence length the FLUX adapter encodes prompts to.
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=max_length)


def build_tiny_flux_pipeline(config: TinyFluxConfig = TinyFluxConfig(), seed: int = 0) -> FluxPipeline:
    """A randomly initialised tiny FluxPipeline (fp32, CPU). Deterministic for a given seed."""
    torch.manual_seed(seed)
    clip_tokenizer = build_clip_tokenizer()
    t5_tokenizer = build_t5_tokenizer(config.t5_max_length)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(clip_tokenizer),
            hidden_size=config.text_dim,
            intermediate_size=config.text_dim * 2,
            projection_dim=config.text_dim,
            num_hidden_layers=config.text_layers,
            num_attention_heads=2,
            max_position_embeddings=clip_tokenizer.model_max_length,
            bos_token_id=clip_tokenizer.bos_token_id,
            eos_token_id=clip_tokenizer.eos_token_id,
            pad_token_id=clip_tokenizer.pad_token_id,
        )
    )
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tokenizer),
            d_model=config.text_dim,
            d_kv=config.text_dim // 4,
            d_ff=config.text_dim * 2,
            num_layers=config.text_layers,
            num_heads=4,
            relative_attention_num_buckets=config.t5_position_buckets,
            pad_token_id=t5_tokenizer.pad_token_id,
            eos_token_id=t5_tokenizer.eos_token_id,
            decoder_start_token_id=t5_tokenizer.pad_token_id,
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(config.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(config.vae_channels),
        block_out_channels=config.vae_channels,
        layers_per_block=1,
        latent_channels=config.latent_channels,
        norm_num_groups=8,
        sample_size=config.image_size,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0,
        scaling_factor=1.0,
    )
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=config.latent_channels * 4,  # 2x2 latent patches packed into one token
        num_layers=config.num_layers,
        num_single_layers=config.num_single_layers,
        attention_head_dim=config.attention_head_dim,
        num_attention_heads=config.num_attention_heads,
        joint_attention_dim=config.text_dim,
        pooled_projection_dim=config.text_dim,
        guidance_embeds=False,
        axes_dims_rope=config.axes_dims_rope,
    )
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )
