"""OpenCLIP checkpoints as transformers' CLIPModel, saved as safetensors.

HPSv2.1 is published as an OpenCLIP ViT-H-14 state dict in a pickle (HPS_v2.1_compressed.pt), and the
hpsv2 package pins old versions of pytest, protobuf and timm. So gdro-ray reads the tensors once, without
running any code of the pickle (torch.load(weights_only=True)), renames them to transformers' CLIP layout and
saves a model directory that the hpsv2 reward loads like any other:

    python -m gdro_ray.rewards.open_clip_weights HPS_v2.1_compressed.pt --config laion/CLIP-ViT-H-14-laion2B-s32B-b79K \
        --out hps-v2.1

--config names the transformers CLIP of the same architecture (its config.json and processor are copied).
OpenCLIP keeps OpenAI CLIP's names, so an OpenAI CLIP checkpoint converts the same way.
"""

import argparse
import re
from pathlib import Path

import torch

from gdro_ray.rewards.loading import read_checkpoint

# OpenCLIP name -> transformers name, for the parts outside the residual blocks; "x.T" means the transpose.
_OUTSIDE = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "text_projection": "text_projection.weight.T",
    "logit_scale": "logit_scale",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",  # transformers' own spelling
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "visual.proj": "visual_projection.weight.T",
}
# Inside a residual block of either tower.
_BLOCK = {
    "ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
}
_RESBLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+?)[._](weight|bias)$")  # attn.in_proj_weight


def open_clip_to_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An OpenCLIP (or OpenAI CLIP) state dict in transformers' CLIPModel names; the fused attention input
    projection is split into q, k and v. A name it does not know is refused, naming it."""
    converted = {}
    for name, tensor in state.items():
        name = name.removeprefix("module.")  # saved from DistributedDataParallel
        if name in _OUTSIDE:
            target = _OUTSIDE[name]
            converted[target.removesuffix(".T")] = tensor.T.contiguous() if target.endswith(".T") else tensor
            continue
        block = _RESBLOCK.match(name)
        if block is None:
            if name == "attn_mask":  # a causal-mask buffer, rebuilt by transformers
                continue
            raise ValueError(f"OpenCLIP tensor {name!r} has no place in transformers' CLIPModel")
        tower, index, part, kind = block.groups()
        prefix = f"{'vision_model' if tower else 'text_model'}.encoder.layers.{index}"
        if part == "attn.in_proj":
            for projection, chunk in zip("qkv", tensor.chunk(3, dim=0)):
                converted[f"{prefix}.self_attn.{projection}_proj.{kind}"] = chunk.contiguous()
        elif part in _BLOCK:
            converted[f"{prefix}.{_BLOCK[part]}.{kind}"] = tensor
        else:
            raise ValueError(f"OpenCLIP tensor {name!r} has no place in transformers' CLIPModel")
    return converted


def convert(checkpoint: str | Path, config: str, out: str | Path) -> Path:
    """A transformers CLIP model directory (safetensors) at out from an OpenCLIP checkpoint, with config's
    architecture and processor."""
    from transformers import AutoProcessor, CLIPConfig, CLIPModel

    model = CLIPModel(CLIPConfig.from_pretrained(config))
    missing, unexpected = model.load_state_dict(open_clip_to_transformers(read_checkpoint(checkpoint)), strict=False)
    missing = [name for name in missing if not name.endswith("position_ids")]  # buffers transformers makes itself
    if missing or unexpected:
        raise ValueError(f"{str(checkpoint)!r} does not fit {config!r}: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}")
    model.save_pretrained(out)  # safetensors
    AutoProcessor.from_pretrained(config).save_pretrained(out)
    return Path(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="the OpenCLIP .pt/.pth file")
    parser.add_argument("--config", required=True, help="the transformers CLIP of the same architecture (hub id or "
                                                        "directory)")
    parser.add_argument("--out", required=True, help="the model directory to write")
    args = parser.parse_args(argv)
    print(f"wrote {convert(args.checkpoint, args.config, args.out)}")


if __name__ == "__main__":
    main()
