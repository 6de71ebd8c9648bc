"""ImageReward (Xu et al. 2023) on transformers' BLIP modules.

ImageReward is BLIP: a ViT encodes the image, a BERT text encoder reads the prompt with cross-attention to the
image, and an MLP maps the text's [CLS] state to a reward, standardised by the training set's mean and spread.
It is published as a pickle (ImageReward.pt) for a package that pins old timm and fairscale, so gdro-ray renames
its tensors once to transformers' BlipVisionModel and BlipTextModel and saves a model directory
(model.safetensors, config.json, the BERT tokenizer with BLIP's two extra tokens, the image processor):

    python -m gdro_ray.rewards.image_reward ImageReward.pt --tokenizer bert-base-uncased --out image-reward
    --reward '{"name": "imagereward", "model": "image-reward"}'

The architecture is read from the tensors' shapes (heads of 64 channels, as BLIP's ViT and BERT have).
"""

import argparse
import json
import re
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, BlipTextConfig, BlipVisionConfig, CLIPImageProcessor
from transformers.models.blip.modeling_blip import BlipVisionModel
from transformers.models.blip.modeling_blip_text import BlipTextModel

from gdro_ray.rewards.loading import BatchedModelReward, read_checkpoint

MEAN, STD = 0.16717362830052426, 1.0333394966054072  # of the head's output over ImageReward's training set
PROMPT_TOKENS = 35  # ImageReward pads and truncates every prompt to this
HEAD_LAYERS = (0, 2, 4, 6, 7)  # its MLP's linear layers (Dropout between, no activation)
HEAD_CHANNELS = 64
CONFIG_NAME = "image_reward.json"


class ImageRewardModel(torch.nn.Module):
    def __init__(self, vision: BlipVisionConfig, text: BlipTextConfig, head_widths: list[int]):
        super().__init__()
        self.vision = BlipVisionModel(vision)
        self.text = BlipTextModel(text, add_pooling_layer=False)
        self.head = torch.nn.ModuleList(torch.nn.Linear(a, b) for a, b in zip(head_widths, head_widths[1:]))

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        image = self.vision(pixel_values=pixel_values).last_hidden_state
        text = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image,
                         encoder_attention_mask=torch.ones(image.shape[:-1], dtype=torch.long, device=image.device),
                         is_decoder=False).last_hidden_state[:, 0]
        for layer in self.head:
            text = layer(text)
        return (text.squeeze(-1) - MEAN) / STD


def from_published(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    """ImageReward.pt's tensors in ImageRewardModel's names, and the configs their shapes imply. BLIP's parts
    that scoring does not use (projections, the ITM head, a decoder, momentum copies, queues) are left out."""
    renamed = {}
    for name, tensor in state.items():
        if name.endswith("position_ids"):  # a buffer BLIP saved and transformers makes itself
            continue
        if name.startswith("mlp.layers."):
            index, kind = name.removeprefix("mlp.layers.").split(".")
            renamed[f"head.{HEAD_LAYERS.index(int(index))}.{kind}"] = tensor
        elif name.startswith("blip.text_encoder."):
            renamed["text." + name.removeprefix("blip.text_encoder.")] = tensor
        elif name.startswith("blip.visual_encoder."):
            renamed["vision." + _vision_name(name.removeprefix("blip.visual_encoder."))] = tensor
        elif not name.startswith("blip."):
            raise ValueError(f"ImageReward tensor {name!r} has no place in the model")
    vision_width = renamed["vision.embeddings.class_embedding"].shape[-1]
    patch = renamed["vision.embeddings.patch_embedding.weight"].shape[-1]
    positions = renamed["vision.embeddings.position_embedding"].shape[1] - 1
    text_width = renamed["text.embeddings.word_embeddings.weight"].shape[1]
    configs = {
        "vision": dict(hidden_size=vision_width, num_attention_heads=vision_width // HEAD_CHANNELS,
                       intermediate_size=renamed["vision.encoder.layers.0.mlp.fc1.weight"].shape[0],
                       num_hidden_layers=_count(renamed, r"vision\.encoder\.layers\.(\d+)\."), patch_size=patch,
                       image_size=int(positions**0.5) * patch, layer_norm_eps=1e-6),  # BLIP's ViT: 1e-6
        "text": dict(vocab_size=renamed["text.embeddings.word_embeddings.weight"].shape[0], hidden_size=text_width,
                     num_attention_heads=text_width // HEAD_CHANNELS,
                     intermediate_size=renamed["text.encoder.layer.0.intermediate.dense.weight"].shape[0],
                     num_hidden_layers=_count(renamed, r"text\.encoder\.layer\.(\d+)\."),
                     max_position_embeddings=renamed["text.embeddings.position_embeddings.weight"].shape[0],
                     encoder_hidden_size=vision_width, layer_norm_eps=1e-12),
        "head": [renamed["head.0.weight"].shape[1]] + [renamed[f"head.{i}.weight"].shape[0] for i in range(5)],
    }
    return renamed, configs


# BLIP's ViT (timm's names) -> transformers' BlipVisionModel.
_VISION = [
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"^norm\.", "post_layernorm."),
]


def _vision_name(name: str) -> str:
    for pattern, replacement in _VISION:
        if re.match(pattern, name):
            return re.sub(pattern, replacement, name)
    raise ValueError(f"ImageReward tensor 'blip.visual_encoder.{name}' has no place in the model")


def _count(state: dict, pattern: str) -> int:
    return 1 + max(int(match.group(1)) for name in state if (match := re.match(pattern, name)))


def build(configs: dict) -> ImageRewardModel:
    return ImageRewardModel(BlipVisionConfig(**configs["vision"]), BlipTextConfig(**configs["text"]), configs["head"])


def convert(checkpoint: str | Path, tokenizer: str, out: str | Path) -> Path:
    """An ImageReward model directory at out from the published checkpoint and BLIP's tokenizer base."""
    state, configs = from_published(read_checkpoint(checkpoint))
    model = build(configs)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [name for name in missing if not name.endswith("position_ids")]  # buffers made by transformers
    if missing or unexpected:
        raise ValueError(f"{str(checkpoint)!r} does not fit ImageReward: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()}, out / "model.safetensors")
    (out / CONFIG_NAME).write_text(json.dumps(configs, indent=1))
    words = AutoTokenizer.from_pretrained(tokenizer, trust_remote_code=False)
    words.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})  # BLIP's, 30524
    words.save_pretrained(out)
    size = configs["vision"]["image_size"]  # CLIP's normalisation, bicubic resize and centre crop, as ImageReward
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(out)
    return out


class ImageRewardScore(BatchedModelReward):
    name = "imagereward"

    def __init__(self, model: str | None, batch_size: int = 16):
        self.source, self.batch_size = model, batch_size

    def build(self) -> ImageRewardModel:
        directory = Path(self.source) if self.source else None
        if directory is None or not (directory / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"ImageReward model {self.source!r} is not a converted model directory (no "
                                    f"{CONFIG_NAME}): convert ImageReward.pt with "
                                    "python -m gdro_ray.rewards.image_reward")
        model = build(json.loads((directory / CONFIG_NAME).read_text()))
        model.load_state_dict(load_file(directory / "model.safetensors"))
        self._tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
        self._processor = CLIPImageProcessor.from_pretrained(directory)
        return model

    def score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        words = self._tokenizer(prompts, padding="max_length", truncation=True, max_length=PROMPT_TOKENS,
                                return_tensors="pt").to(self._device)
        pixels = self._processor(images=images, return_tensors="pt")["pixel_values"].to(self._device)
        return self._model(pixels, words["input_ids"], words["attention_mask"])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="ImageReward.pt")
    parser.add_argument("--tokenizer", default="bert-base-uncased", help="BLIP's tokenizer base (hub id or directory)")
    parser.add_argument("--out", required=True, help="the model directory to write")
    args = parser.parse_args(argv)
    print(f"wrote {convert(args.checkpoint, args.tokenizer, args.out)}")


if __name__ == "__main__":
    main()
