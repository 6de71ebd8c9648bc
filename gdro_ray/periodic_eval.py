"""Held-out evaluation during training: at chosen steps, rank 0 samples with the EMA LoRA and scores it.

Training workers load no text encoders, so the recipe encodes the held-out prompts once (build_eval_set)
and writes them beside the run (save_eval_set: JSON + safetensors). The recipe hands a PeriodicEvaluator
of that directory to training; on rank 0 it reads the set back, loads the dataset's reward and the judge
once, and reports eval_reward, eval_quality and eval_corrected (and on GenEval prompts eval_geneval, GenEval's
overall score): the curves that early stopping in tune/ and the align job's evaluation plot read.
"""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from safetensors.torch import load_file, save_file

from gdro_ray.data.prompts import PromptRecord
from gdro_ray.evaluate import HeldOut, generate_images, heldout_seeds, score_images, summarise
from gdro_ray.models import FlowModel, PromptEmbeddings, SamplerSettings, load_flow_model
from gdro_ray.profiles import profile_for, quality_judge
from gdro_ray.rewards import build_reward

SETTINGS_FILE, EMBEDDINGS_FILE = "eval_set.json", "eval_embeddings.safetensors"


@dataclass
class EvalSet:
    """Held-out prompts with their embeddings and seeds, and how to sample and score them."""

    held_out: HeldOut
    prompts: list[PromptRecord]
    embeddings: PromptEmbeddings
    seeds: list[list[int]]  # one row per prompt
    unconditional: PromptEmbeddings | None = None  # the empty prompt's, for classifier-free guidance
    judge: dict = field(default_factory=dict)  # keyword arguments of profiles.quality_judge


def build_eval_set(model: FlowModel, held_out: HeldOut, num_prompts: int, images_per_prompt: int,
                   judge: dict | None = None) -> EvalSet:
    prompts = held_out.prompts(num_prompts)
    embeddings = model.encode_prompts([p.prompt for p in prompts]).to("cpu")
    unconditional = model.encode_prompts([""]).to("cpu") if held_out.sampler.cfg_scale > 1 else None
    return EvalSet(held_out, prompts, embeddings, heldout_seeds(len(prompts), images_per_prompt), unconditional,
                   judge or {})


def write_eval_sets(model: str, revision: str | None, sets: list[tuple[HeldOut, int, int, Path]],
                    judge: dict | None = None) -> None:
    """Encode and save each (held_out, num_prompts, images_per_prompt, directory), loading the model's text encoders
    once (on the CPU: a task of the evaluation plan runs this)."""
    flow = load_flow_model(profile_for(model).weights, device="cpu", revision=revision)
    for held_out, num_prompts, images_per_prompt, directory in sets:
        save_eval_set(build_eval_set(flow, held_out, num_prompts, images_per_prompt, judge), directory)


def save_eval_set(eval_set: EvalSet, directory: str | Path) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {"sequence": eval_set.embeddings.sequence, "pooled": eval_set.embeddings.pooled,
               "text_ids": eval_set.embeddings.text_ids}
    if eval_set.unconditional is not None:
        tensors |= {"unconditional_sequence": eval_set.unconditional.sequence,
                    "unconditional_pooled": eval_set.unconditional.pooled}
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, directory / EMBEDDINGS_FILE)
    settings = {"held_out": asdict(eval_set.held_out), "prompts": [asdict(p) for p in eval_set.prompts],
                "seeds": eval_set.seeds, "judge": eval_set.judge}
    (directory / SETTINGS_FILE).write_text(json.dumps(settings, indent=1))


def load_eval_set(directory: str | Path) -> EvalSet:
    directory = Path(directory)
    if not (directory / SETTINGS_FILE).is_file() or not (directory / EMBEDDINGS_FILE).is_file():
        raise FileNotFoundError(f"{str(directory)!r} holds no evaluation set ({SETTINGS_FILE} and {EMBEDDINGS_FILE})")
    settings = json.loads((directory / SETTINGS_FILE).read_text())
    missing = sorted({"held_out", "prompts", "seeds", "judge"} - set(settings))
    if missing:
        raise ValueError(f"{str(directory / SETTINGS_FILE)!r} lacks {missing}: delete the directory to build it again")
    tensors = load_file(directory / EMBEDDINGS_FILE)
    held_out = settings["held_out"]
    held_out = HeldOut(**{**held_out, "sampler": SamplerSettings.from_dict(held_out["sampler"])})
    embeddings = PromptEmbeddings(tensors["sequence"], tensors["pooled"], tensors["text_ids"])
    unconditional = None
    if "unconditional_sequence" in tensors:
        unconditional = PromptEmbeddings(tensors["unconditional_sequence"], tensors["unconditional_pooled"],
                                         tensors["text_ids"])
    return EvalSet(held_out, [PromptRecord(**record) for record in settings["prompts"]], embeddings,
                   settings["seeds"], unconditional, settings["judge"])


class PeriodicEvaluator:
    """model -> {eval_reward, eval_quality, eval_corrected} on the evaluation set in a directory. Travels to
    the training workers as the directory's name; the set, its reward and its judge load on first use."""

    def __init__(self, directory: str | Path):
        self.directory = str(directory)
        self.eval_set = self.reward = self.judge = None

    def __call__(self, model: FlowModel) -> dict:
        if self.eval_set is None:
            self.eval_set = load_eval_set(self.directory)
            self.reward = build_reward(self.eval_set.held_out.reward)
            self.reward.load()
            self.judge = quality_judge(self.eval_set.held_out.model, **self.eval_set.judge)
        data = self.eval_set
        images = generate_images(model, data.prompts, data.seeds, data.held_out.sampler, embeddings=data.embeddings,
                                 unconditional=data.unconditional)
        summary = summarise(score_images(self.reward, self.judge, data.prompts, data.seeds, images, data.held_out.task))
        scores = {"eval_reward": summary["reward"], "eval_quality": summary["quality"],
                  "eval_corrected": summary["corrected"]}
        if "geneval" in summary:
            scores["eval_geneval"] = summary["geneval"]["overall"]
        return scores
