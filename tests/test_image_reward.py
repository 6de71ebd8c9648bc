"""ImageReward: its published checkpoint's layout converted to transformers' BLIP and scored, on a tiny model."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BertTokenizerFast

from gdro_ray.profiles import profile_for
from gdro_ray.rewards import build_reward, score_safely
from gdro_ray.rewards.image_reward import HEAD_LAYERS, ImageRewardModel, build, main

TINY = {"vision": dict(hidden_size=64, num_attention_heads=1, intermediate_size=128, num_hidden_layers=2, patch_size=16,
                       image_size=32, layer_norm_eps=1e-6),
        "text": dict(vocab_size=64, hidden_size=64, num_attention_heads=1, intermediate_size=128, num_hidden_layers=2,
                     max_position_embeddings=40, encoder_hidden_size=64, layer_norm_eps=1e-12),
        "head": [64, 1024, 128, 64, 16, 1]}
VISION_NAMES = {"embeddings.class_embedding": "cls_token", "embeddings.position_embedding": "pos_embed",
                "embeddings.patch_embedding": "patch_embed.proj", "post_layernorm": "norm", "layer_norm1": "norm1",
                "layer_norm2": "norm2", "self_attn.qkv": "attn.qkv", "self_attn.projection": "attn.proj",
                "encoder.layers": "blocks"}


def published_names(model: ImageRewardModel) -> dict:
    """The model's tensors under ImageReward.pt's names (BLIP's ViT and BERT, the MLP's Sequential), by hand."""
    state = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("vision."):
            name = name.removeprefix("vision.")
            for ours, theirs in VISION_NAMES.items():
                name = name.replace(ours, theirs)
            state[f"blip.visual_encoder.{name}"] = tensor
        elif name.startswith("text."):
            state[f"blip.text_encoder.{name.removeprefix('text.')}"] = tensor
        else:
            index, kind = name.removeprefix("head.").split(".")
            state[f"mlp.layers.{HEAD_LAYERS[int(index)]}.{kind}"] = tensor
    return state | {"blip.text_proj.weight": torch.zeros(2, 64)}  # a part scoring does not use


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("image-reward")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz", "a", "red", "square", "sign"]
    BertTokenizerFast(vocab={word: index for index, word in enumerate(dict.fromkeys(words))}).save_pretrained(root / "bert")
    torch.manual_seed(0)
    model = build(TINY).eval()
    torch.save({"state_dict": published_names(model)}, root / "ImageReward.pt")
    main([str(root / "ImageReward.pt"), "--tokenizer", str(root / "bert"), "--out", str(root / "converted")])
    return model, root / "converted"


def images(count):
    rng = np.random.default_rng(1)
    return [Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)) for _ in range(count)]


PROMPTS = [{"prompt": text} for text in ("a red square", "a sign", "square", "red red red")]


def test_the_converted_checkpoint_scores_as_the_model_it_came_from(converted):
    model, directory = converted
    reward = build_reward(profile_for("tiny").reward_spec("ocr", None, {"name": "imagereward", "model": str(directory),
                                                                        "batch_size": 3}))
    scores = [result.reward for result in score_safely(reward, images(4), PROMPTS)]
    assert all(np.isfinite(scores)) and scores == pytest.approx(
        [reward.score([image], [meta])[0].reward for image, meta in zip(images(4), PROMPTS)], abs=1e-5)
    # By hand: the source model on the same pixels and tokens (35 of them, padded, as ImageReward reads prompts).
    words = reward._tokenizer(["a red square"], padding="max_length", max_length=35, truncation=True,
                              return_tensors="pt")
    assert reward._tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [34, 35]  # BLIP's two, after the 34 words
    assert words["input_ids"].shape == (1, 35)
    pixels = reward._processor(images=images(1), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = model(pixels, words["input_ids"], words["attention_mask"]).item()
    assert scores[0] == pytest.approx(expected, abs=1e-5)


def test_a_missing_or_unconverted_model_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="None is not a converted model directory"):
        build_reward(profile_for("tiny").reward_spec("ocr", None, {"name": "imagereward"})).load()
    with pytest.raises(FileNotFoundError, match="no-such-dir.* is not a converted model directory"):
        build_reward({"name": "imagereward", "model": str(tmp_path / "no-such-dir")}).load()
    torch.save({"other.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="'other.weight' has no place"):
        main([str(tmp_path / "other.pt"), "--tokenizer", "unused", "--out", str(tmp_path / "out")])
