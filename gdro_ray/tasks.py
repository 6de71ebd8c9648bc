"""What a task name means for a model: which prompt set it draws from and which reward scores it.

On real checkpoints `ocr` and `geneval` are the OCR and GenEval prompt sets and rewards. On the
embedded tiny FLUX the same names select the tiny world: glyph prompts read by the same OCR reward,
and shapes scenes scored by the same GenEval rules over a shapes detector.
"""

from pathlib import Path

from gdro_ray.models import TINY
from gdro_ray.rewards import DEFAULT_SPECS

TINY_WORLD = {"ocr": "tiny-ocr", "geneval": "tiny-geneval"}


def prompt_set(task: str, model: str) -> str:
    """The prompt set name (in data.prompts.PROMPT_SETS, or "custom") for a task on a model."""
    return TINY_WORLD.get(task, task) if model == TINY else task


def reward_for_task(task: str, model: str, prompt_file: str | None = None, overrides: dict | None = None) -> dict:
    """The full reward spec of a task; a custom prompt file is scored by its format (.txt OCR, .jsonl GenEval)."""
    name = task
    if task == "custom":
        if prompt_file is None:
            raise ValueError("the custom task needs a prompt file (.txt for OCR, .jsonl for GenEval)")
        name = "ocr" if Path(prompt_file).suffix == ".txt" else "geneval"
    overrides = overrides or {}
    name = overrides.get("name", name)
    if model == TINY and f"tiny-{name}" in DEFAULT_SPECS:
        name = f"tiny-{name}"
    if name not in DEFAULT_SPECS:
        raise ValueError(f"no reward for {name!r}; known rewards: {sorted(DEFAULT_SPECS)}")
    return {**DEFAULT_SPECS[name], **overrides}
