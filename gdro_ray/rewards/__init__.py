"""Rewards behind one interface (gdro_ray.rewards.base.Reward), built from a JSON-able spec.

A spec is {"name": ..., options}; the manifest of a group dataset records the full spec, defaults
included, so that a dataset says exactly how it was scored.
"""

import importlib

from gdro_ray.rewards.base import Reward, RewardResult, score_safely
from gdro_ray.rewards.geneval import DEFAULT_CLIP_ID, DEFAULT_DETECTOR_ID
from gdro_ray.rewards.mixture import MIX

__all__ = ["DEFAULT_SPECS", "MIX", "Reward", "RewardResult", "build_reward", "check_mix", "score_safely"]

# The reward each prompt set is scored with, and its default options.
DEFAULT_SPECS = {
    "ocr": {"name": "ocr", "engine": "rapidocr", "min_side": 256, "detection": "image"},
    "geneval": {"name": "geneval", "mode": "partial", "detector": DEFAULT_DETECTOR_ID, "clip": DEFAULT_CLIP_ID},
    "brightness": {"name": "brightness"},
    # gdro_ray/rewards/clip_rewards.py: the checkpoints Flow-GRPO scores with
    "clipscore": {"name": "clipscore", "model": "openai/clip-vit-large-patch14"},
    "pickscore": {"name": "pickscore", "model": "yuvalkirstain/PickScore_v1",
                  "processor": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"},
    "hpsv2": {"name": "hpsv2", "model": None, "processor": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"},
    "imagereward": {"name": "imagereward", "model": None},
    "aesthetic": {"name": "aesthetic", "model": "openai/clip-vit-large-patch14", "head": None},
    "vlm_judge": {"name": "vlm_judge", "model": "CodeGoat24/UnifiedReward-qwen-7b", "mode": "single"},
}


# Built by name, each imported only when built: reading a spec imports no model library.
REWARD_CLASSES = {
    "brightness": "gdro_ray.rewards.brightness:BrightnessReward",
    "ocr": "gdro_ray.rewards.ocr:OCRReward",
    "clipscore": "gdro_ray.rewards.clip_rewards:CLIPScore",
    "pickscore": "gdro_ray.rewards.clip_rewards:PickScore",
    "hpsv2": "gdro_ray.rewards.clip_rewards:HPSv2",
    "imagereward": "gdro_ray.rewards.image_reward:ImageRewardScore",
    "aesthetic": "gdro_ray.rewards.clip_rewards:AestheticReward",
    "vlm_judge": "gdro_ray.rewards.vlm_judge:VLMJudgeReward",
}


def build_reward(spec: dict) -> Reward:
    options = {key: value for key, value in spec.items() if key != "name"}
    if spec.get("name") in REWARD_CLASSES:
        return _import_attribute(REWARD_CLASSES[spec["name"]])(**options)
    if spec.get("name") == MIX:
        from gdro_ray.rewards.mixture import MixedReward

        return MixedReward({label: (build_reward({k: v for k, v in part.items() if k != "weight"}), part["weight"])
                            for label, part in check_mix(spec)["parts"].items()})
    if spec.get("name") == "geneval":
        import torch

        from gdro_ray.rewards.geneval import GenEvalReward
        from gdro_ray.rewards.geneval_backend import ClipColorClassifier, TransformersDetector

        detector_id, clip_id = options.pop("detector"), options.pop("clip")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if ":" in detector_id:  # "module:Class", a Detector of this installation built with no arguments
            detector = _import_attribute(detector_id)()
        else:
            detector = TransformersDetector.from_pretrained(detector_id, device=device)
        # No colour classifier (clip None) for a detector that reads each object's colour itself.
        colors = None if clip_id is None else ClipColorClassifier.from_pretrained(clip_id, device=device)
        return GenEvalReward(detector, colors, **options)
    raise ValueError(f"unknown reward {spec.get('name')!r}; known rewards: {sorted(DEFAULT_SPECS)}")


def check_mix(spec: dict) -> dict:
    """A mix spec with at least one part, each part a reward spec with a numeric weight; returned as given."""
    parts = spec.get("parts")
    if not isinstance(parts, dict) or not parts:
        raise ValueError(f'a "mix" reward needs "parts": {{LABEL: {{"name": REWARD, "weight": W, ...}}}}, '
                         f"got {parts!r}")
    for label, part in parts.items():
        if not isinstance(part, dict) or not isinstance(part.get("weight"), (int, float)) or part.get("name") == MIX:
            raise ValueError(f"mix part {label!r} must be a reward spec (not a mix) with a numeric weight, "
                             f"got {part!r}")
    return spec


def _import_attribute(path: str):
    module_name, _, attribute = path.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"{path!r} names no importable 'module:Class' ({error})") from error
