"""Held-out evaluation during training: at chosen steps, rank 0 samples with the EMA LoRA and scores it.

Training workers load no text encoders, so the driver encodes the held-out prompts once
(build_eval_set) and writes them beside the run (save_eval_set: JSON + safetensors). Workers read them
back and report eval_reward, eval_quality and eval_corrected: the curve that early stopping in tune/
and the align job's evaluation plot read.
"""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from safetensors.torch import load_file, save_file

from gdro_ray.data.prompts import PromptRecord
from gdro_ray.models.base import FlowModel, PromptEmbeddings

SETTINGS_FILE, EMBEDDINGS_FILE = "eval_set.json", "eval_embeddings.safetensors"


@dataclass
class EvalSet:
    """Held-out prompts with their embeddings, and how to sample and score them."""

    task: str
    model: str
    prompts: list[PromptRecord]
    embeddings: PromptEmbeddings
    seeds: list[list[int]]  # one row per prompt
    height: int
    width: int
    num_steps: int
    cfg_scale: float = 1.0
    unconditional: PromptEmbeddings | None = None  # the empty prompt's, for classifier-free guidance
    judge: dict = field(default_factory=dict)  # keyword arguments of evaluate.default_judge


def build_eval_set(model: FlowModel, task: str, model_name: str, prompts: list[PromptRecord], seeds: list[list[int]],
                   height: int, width: int, num_steps: int, cfg_scale: float = 1.0, judge: dict | None = None) -> EvalSet:
    embeddings = model.encode_prompts([p.prompt for p in prompts]).to("cpu")
    unconditional = model.encode_prompts([""]).to("cpu") if cfg_scale > 1 else None
    return EvalSet(task, model_name, prompts, embeddings, seeds, height, width, num_steps, cfg_scale, unconditional,
                   judge or {})


def save_eval_set(eval_set: EvalSet, directory: str | Path) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {"sequence": eval_set.embeddings.sequence, "pooled": eval_set.embeddings.pooled,
               "text_ids": eval_set.embeddings.text_ids}
    if eval_set.unconditional is not None:
        tensors |= {"unconditional_sequence": eval_set.unconditional.sequence,
                    "unconditional_pooled": eval_set.unconditional.pooled}
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, directory / EMBEDDINGS_FILE)
    settings = {name: value for name, value in asdict(eval_set).items() if name not in ("embeddings", "unconditional")}
    (directory / SETTINGS_FILE).write_text(json.dumps(settings, indent=1))


def load_eval_set(directory: str | Path) -> EvalSet:
    directory = Path(directory)
    if not (directory / SETTINGS_FILE).is_file() or not (directory / EMBEDDINGS_FILE).is_file():
        raise FileNotFoundError(f"{str(directory)!r} holds no evaluation set ({SETTINGS_FILE} and {EMBEDDINGS_FILE})")
    settings = json.loads((directory / SETTINGS_FILE).read_text())
    if not all(isinstance(row, list) for row in settings["seeds"]):
        raise ValueError(f"{str(directory)!r} was written by an earlier gdro-ray, with seeds shared by all prompts; "
                         "delete it and rerun to build it again with a seed per image")
    tensors = load_file(directory / EMBEDDINGS_FILE)
    settings["prompts"] = [PromptRecord(**record) for record in settings["prompts"]]
    embeddings = PromptEmbeddings(tensors["sequence"], tensors["pooled"], tensors["text_ids"])
    unconditional = None
    if "unconditional_sequence" in tensors:
        unconditional = PromptEmbeddings(tensors["unconditional_sequence"], tensors["unconditional_pooled"],
                                         tensors["text_ids"])
    return EvalSet(**settings, embeddings=embeddings, unconditional=unconditional)


class PeriodicEvaluator:
    """Scores a model on an EvalSet: the reward and judge are loaded once, on first use."""

    def __init__(self, eval_set: EvalSet):
        self.eval_set = eval_set
        self.reward = self.judge = None

    def __call__(self, model: FlowModel) -> dict:
        from gdro_ray.evaluate import default_judge, generate_images, score_images, summarise
        from gdro_ray.rewards import build_reward
        from gdro_ray.tasks import reward_for_task

        data = self.eval_set
        if self.reward is None:
            self.reward = build_reward(reward_for_task(data.task, data.model))
            self.reward.load()
            self.judge = default_judge(data.model, **data.judge)
        model.cfg_scale, model.unconditional = data.cfg_scale, data.unconditional
        images = generate_images(model, data.prompts, data.seeds, data.height, data.width, data.num_steps,
                                 embeddings=data.embeddings)
        summary = summarise(score_images(self.reward, self.judge, data.prompts, data.seeds, images, data.task))
        return {"eval_reward": summary["reward"], "eval_quality": summary["quality"],
                "eval_corrected": summary["corrected"]}
