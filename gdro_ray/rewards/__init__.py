"""Rewards behind one interface (gdro_ray.rewards.base.Reward), built from a JSON-able spec.

A spec is {"name": ..., options}; the manifest of a group dataset records the full spec, defaults
included, so that a dataset says exactly how it was scored.
"""

from pathlib import Path

import torch

from gdro_ray.rewards.base import Reward, RewardResult, score_safely
from gdro_ray.rewards.geneval_backend import DEFAULT_CLIP_ID, DEFAULT_DETECTOR_ID

__all__ = ["Reward", "RewardResult", "build_reward", "reward_for_task", "score_safely"]

# The reward each prompt set is scored with, and its default options.
DEFAULT_SPECS = {
    "ocr": {"name": "ocr", "engine": "rapidocr", "min_side": 256},
    "geneval": {"name": "geneval", "mode": "partial", "detector": DEFAULT_DETECTOR_ID, "clip": DEFAULT_CLIP_ID},
    "brightness": {"name": "brightness"},
}


def reward_for_task(task: str, prompt_file: str | None = None, overrides: dict | None = None) -> dict:
    """The full reward spec of a task; a custom prompt file is scored by its format (.txt OCR, .jsonl GenEval)."""
    name = task
    if task == "custom":
        if prompt_file is None:
            raise ValueError("the custom task needs a prompt file (.txt for OCR, .jsonl for GenEval)")
        name = "ocr" if Path(prompt_file).suffix == ".txt" else "geneval"
    overrides = overrides or {}
    name = overrides.get("name", name)
    if name not in DEFAULT_SPECS:
        raise ValueError(f"no reward for {name!r}; known rewards: {sorted(DEFAULT_SPECS)}")
    return {**DEFAULT_SPECS[name], **overrides}


def build_reward(spec: dict) -> Reward:
    options = {key: value for key, value in spec.items() if key != "name"}
    if spec.get("name") == "brightness":
        from gdro_ray.rewards.brightness import BrightnessReward

        return BrightnessReward()
    if spec.get("name") == "ocr":
        from gdro_ray.rewards.ocr import OCRReward

        return OCRReward(**options)
    if spec.get("name") == "geneval":
        from gdro_ray.rewards.geneval import GenEvalReward
        from gdro_ray.rewards.geneval_backend import ClipColorClassifier, TransformersDetector

        device = "cuda" if torch.cuda.is_available() else "cpu"
        detector = TransformersDetector.from_pretrained(options.pop("detector"), device=device)
        colors = ClipColorClassifier.from_pretrained(options.pop("clip"), device=device)
        return GenEvalReward(detector, colors, **options)
    raise ValueError(f"unknown reward {spec.get('name')!r}; known rewards: {sorted(DEFAULT_SPECS)}")
