"""CLIPScore and PickScore on a tiny random CLIP, saved and loaded as a real checkpoint is."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import tiny_clip_parts
from gdro_ray.profiles import profile_for
from gdro_ray.rewards import build_reward, open_clip_weights, score_safely


@pytest.fixture(scope="module")
def saved_clip(tmp_path_factory):
    directory = tmp_path_factory.mktemp("clip")
    model, processor = tiny_clip_parts()
    model.save_pretrained(directory)  # safetensors
    processor.save_pretrained(directory)
    return directory


def images(count):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(count)]


PROMPTS = [{"prompt": text} for text in ("a red square", "two blue circles", "a sign that says GDRO", "a cat")]


@pytest.mark.parametrize("name", ["clipscore", "pickscore"])
def test_scores_are_finite_and_batched_equals_one_by_one(saved_clip, name):
    spec = profile_for("tiny").reward_spec("ocr", None, {"name": name, "model": str(saved_clip), "processor": None,
                                                         "batch_size": 3})
    reward = build_reward(spec)
    reward.load()
    batched = [result.reward for result in score_safely(reward, images(4), PROMPTS)]
    single = [reward.score([image], [meta])[0].reward for image, meta in zip(images(4), PROMPTS)]
    assert all(np.isfinite(batched)) and batched == pytest.approx(single, abs=1e-5)
    assert len(set(np.round(batched, 6))) > 1  # prompts and images make a difference


def test_the_scores_are_the_models_cosine_similarity(saved_clip):
    model, processor = tiny_clip_parts()
    inputs = processor(text=["a red square"], images=images(1), return_tensors="pt", padding=True)
    with torch.no_grad():
        outputs = model(**inputs)
    cosine = torch.nn.functional.cosine_similarity(outputs.image_embeds, outputs.text_embeds).item()
    clip = build_reward({"name": "clipscore", "model": str(saved_clip)}).score(images(1), PROMPTS[:1])[0].reward
    pick = build_reward({"name": "pickscore", "model": str(saved_clip)}).score(images(1), PROMPTS[:1])[0].reward
    assert clip == pytest.approx(2.5 * max(cosine, 0), abs=1e-5)
    assert pick == pytest.approx(model.logit_scale.exp().item() * cosine, abs=1e-4)


@pytest.mark.parametrize("name", ["clipscore", "pickscore"])
def test_missing_weights_fail_at_load_naming_them(tmp_path, name):
    spec = profile_for("tiny").reward_spec("ocr", None, {"name": name, "model": str(tmp_path / "no-such-clip")})
    with pytest.raises(OSError, match="no-such-clip"):
        build_reward(spec).load()
    assert profile_for("tiny").reward_spec("ocr", None, {"name": "pickscore"})["processor"] == \
        "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


@pytest.fixture(scope="module")
def aesthetic_head(tmp_path_factory):
    """The predictor's MLP at the tiny CLIP's embedding width, random, in the published state dict's layout."""
    generator = torch.Generator().manual_seed(0)
    widths = (8, 1024, 128, 64, 16, 1)
    weights = {}
    for index, (inputs, outputs) in zip((0, 2, 4, 6, 7), zip(widths, widths[1:])):
        weights[f"layers.{index}.weight"] = torch.randn(outputs, inputs, generator=generator) / inputs**0.5
        weights[f"layers.{index}.bias"] = torch.randn(outputs, generator=generator)
    path = tmp_path_factory.mktemp("aesthetic") / "head.safetensors"
    save_file(weights, path)
    return path, weights


def test_the_aesthetic_score_is_the_mlp_on_the_unit_image_embedding(saved_clip, aesthetic_head):
    path, weights = aesthetic_head
    reward = build_reward(profile_for("tiny").reward_spec("ocr", None, {"name": "aesthetic", "model": str(saved_clip),
                                                                        "head": str(path), "batch_size": 3}))
    scores = [result.reward for result in score_safely(reward, images(4), PROMPTS)]
    assert scores == pytest.approx([reward.score([image], [meta])[0].reward for image, meta in zip(images(4), PROMPTS)],
                                   abs=1e-4)
    model, processor = tiny_clip_parts()  # by hand: the same CLIP, the head's five linear layers
    with torch.no_grad():
        hidden = model.get_image_features(**processor(images=images(1), return_tensors="pt")).pooler_output
        hidden = torch.nn.functional.normalize(hidden, dim=-1)
        for index in (0, 2, 4, 6, 7):
            hidden = hidden @ weights[f"layers.{index}.weight"].T + weights[f"layers.{index}.bias"]
    assert scores[0] == pytest.approx(hidden.item(), abs=1e-4)


def test_an_aesthetic_head_missing_or_of_another_layout_is_named(saved_clip, aesthetic_head, tmp_path):
    with pytest.raises(FileNotFoundError, match="aesthetic head None does not exist"):
        spec = profile_for("tiny").reward_spec("ocr", None, {"name": "aesthetic", "model": str(saved_clip)})
        build_reward(spec).load()
    save_file({"linear.weight": torch.zeros(1, 8)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match=r"holds \['linear.weight'\], expected"):
        build_reward({"name": "aesthetic", "model": str(saved_clip), "head": str(tmp_path / "other.safetensors")}).load()


def open_clip_names(model) -> dict:
    """A transformers CLIP's tensors under OpenCLIP's names (the layout HPSv2.1 ships in), by hand."""
    state, named = model.state_dict(), {}
    for tower, prefix in (("text_model", ""), ("vision_model", "visual.")):
        config = getattr(model.config, "text_config" if tower == "text_model" else "vision_config")
        for index in range(config.num_hidden_layers):
            layer, block = f"{tower}.encoder.layers.{index}", f"{prefix}transformer.resblocks.{index}"
            for kind in ("weight", "bias"):
                named[f"{block}.attn.in_proj_{kind}"] = torch.cat(
                    [state[f"{layer}.self_attn.{p}_proj.{kind}"] for p in "qkv"])
                for ours, theirs in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("self_attn.out_proj",
                                     "attn.out_proj"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                    named[f"{block}.{theirs}.{kind}"] = state[f"{layer}.{ours}.{kind}"]
    named |= {"token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
              "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
              "ln_final.weight": state["text_model.final_layer_norm.weight"],
              "ln_final.bias": state["text_model.final_layer_norm.bias"],
              "text_projection": state["text_projection.weight"].T, "logit_scale": state["logit_scale"],
              "visual.class_embedding": state["vision_model.embeddings.class_embedding"],
              "visual.positional_embedding": state["vision_model.embeddings.position_embedding.weight"],
              "visual.conv1.weight": state["vision_model.embeddings.patch_embedding.weight"],
              "visual.ln_pre.weight": state["vision_model.pre_layrnorm.weight"],
              "visual.ln_pre.bias": state["vision_model.pre_layrnorm.bias"],
              "visual.ln_post.weight": state["vision_model.post_layernorm.weight"],
              "visual.ln_post.bias": state["vision_model.post_layernorm.bias"],
              "visual.proj": state["visual_projection.weight"].T}
    return named


def test_an_open_clip_checkpoint_converts_to_the_hpsv2_reward(saved_clip, tmp_path):
    model, processor = tiny_clip_parts()
    checkpoint = tmp_path / "hps.pt"
    torch.save({"state_dict": {f"module.{name}": tensor for name, tensor in open_clip_names(model).items()}},
               checkpoint)
    assert open_clip_weights.main([str(checkpoint), "--config", str(saved_clip), "--out", str(tmp_path / "hps")]) \
        is None
    reward = build_reward(profile_for("tiny").reward_spec("ocr", None, {"name": "hpsv2", "model": str(tmp_path / "hps"),
                                                                        "processor": None}))
    inputs = processor(text=["a red square"], images=images(1), return_tensors="pt", padding=True)
    with torch.no_grad():
        outputs = model(**inputs)
    cosine = torch.nn.functional.cosine_similarity(outputs.image_embeds, outputs.text_embeds).item()
    assert reward.score(images(1), PROMPTS[:1])[0].reward == pytest.approx(cosine, abs=1e-5)
    with pytest.raises(ValueError, match='the hpsv2 reward needs "model"'):
        build_reward(profile_for("tiny").reward_spec("ocr", None, {"name": "hpsv2"})).load()
    with pytest.raises(ValueError, match="'visual.extra' has no place"):
        open_clip_weights.open_clip_to_transformers({"visual.extra": torch.zeros(1)})
