"""Typed training configuration: one dataclass, the paper's presets per task, YAML files, CLI overrides.

Precedence, lowest first: field defaults < preset < YAML file < command-line flags. Every field is a
flag (`--beta 6`, `--zero-stage 3`), with its comment here as the help text.
"""

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from gdro_ray.cli import add_dataclass_arguments, base_type, values_given
from gdro_ray.flow import TIMESTEP_SAMPLERS
from gdro_ray.objective import OBJECTIVES, REDUCTIONS
from gdro_ray.profiles import DEFAULT_MODEL, online_preset_values, preset_values, profile_for

PRECISIONS = ("auto", "bf16", "fp32")
LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")
STRATEGIES = ("deepspeed", "ddp")
ONLINE_METHODS = ("flow-grpo",)
REFERENCES = ("live", "cached")


@dataclass
class RunConfig:
    """What every training method shares: the model, the LoRA and its optimiser, the workers, the run's output and
    its held-out evaluation. TrainConfig (offline, on a group dataset) and the online baseline's OnlineConfig add
    their own."""

    # -- task and model
    task: str = field(default="ocr", metadata={"help": "the task (selects its preset)"})
    model: str = field(default=DEFAULT_MODEL,
                       metadata={"help": "'tiny', a diffusers FLUX or SD3 directory, or a hub id"})
    revision: str | None = field(default=None, metadata={"help": "hub revision of --model"})
    # -- optimisation
    steps: int = field(default=300, metadata={"help": "optimiser steps"})
    lr: float = field(default=3e-4, metadata={"help": "peak learning rate"})
    lr_schedule: str = field(default="constant_with_warmup", metadata={"help": f"one of {LR_SCHEDULES}"})
    warmup_steps: int = field(default=10, metadata={"help": "learning-rate warm-up steps"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0: off)"})
    lora_rank: int = field(default=32, metadata={"help": "LoRA rank"})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA alpha (update scaled by alpha / rank)"})
    ema_decay: float = field(default=0.99, metadata={"help": "EMA decay of the LoRA weights (0: no EMA)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward"})
    max_nonfinite_steps: int = field(default=5, metadata={"help": "stop after this many non-finite losses in a row"})
    seed: int = field(default=0, metadata={"help": "seed of the run's draws: members, noise, timesteps, prompts"})
    # -- distributed
    strategy: str = field(default="deepspeed", metadata={"help": f"one of {STRATEGIES}; ddp all-reduces LoRA grads"})
    zero_stage: int = field(default=2, metadata={"help": "DeepSpeed ZeRO stage (2 or 3)"})
    precision: str = field(default="auto", metadata={"help": f"{PRECISIONS}; auto: bf16 on GPUs, fp32 on CPUs"})
    num_workers: int = field(default=2, metadata={"help": "training workers (min when --max-workers is set)"})
    max_workers: int | None = field(default=None, metadata={"help": "elastic: grow up to this many workers"})
    resize_check_s: float = field(default=60.0, metadata={"help": "elastic: seconds between checks for room to grow"})
    use_gpu: bool | None = field(default=None, metadata={"help": "default: when the cluster has or can get GPUs"})
    cpus_per_worker: float = field(default=1.0, metadata={"help": "CPUs each training worker asks Ray for"})
    max_failures: int = field(default=2, metadata={"help": "worker-group restarts from the last checkpoint"})
    # -- output
    storage_path: str = field(default="runs", metadata={"help": "where runs, checkpoints and logs go"})
    name: str = field(default="gdro", metadata={"help": "run name; rerun the same name to resume"})
    checkpoint_every: int = field(default=50, metadata={"help": "steps between checkpoints"})
    log_every: int = field(default=1, metadata={"help": "steps between metric reports"})
    # -- held-out evaluation during training
    eval_set: str = field(default="", metadata={"help": "an evaluation set directory (gdro_ray.periodic_eval)"})
    eval_every: int = field(default=0, metadata={"help": "steps between held-out evaluations (0: none)"})

    def __post_init__(self):
        positive = ("steps", "lora_rank", "num_workers", "checkpoint_every", "log_every", "max_nonfinite_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "cpus_per_worker"):
            if not getattr(self, name) > 0:  # also refuses NaN
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name, allowed in (("precision", PRECISIONS), ("lr_schedule", LR_SCHEDULES), ("strategy", STRATEGIES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0, got {self.eval_every}")
        if self.zero_stage not in (2, 3):
            raise ValueError(f"zero_stage must be 2 or 3, got {self.zero_stage}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.resize_check_s <= 0:
            raise ValueError(f"resize_check_s must be > 0, got {self.resize_check_s}")
        if self.max_workers is not None and self.max_workers < self.num_workers:
            raise ValueError(f"max_workers ({self.max_workers}) must be >= num_workers ({self.num_workers})")

    @property
    def run_directory(self) -> Path:
        return Path(self.storage_path).resolve() / self.name

    @property
    def micro_batch(self) -> int:
        """What one backward sees, per worker (DeepSpeed's micro-batch size)."""
        raise NotImplementedError

    @property
    def accumulation(self) -> int:
        """Micro-batches per optimiser step."""
        raise NotImplementedError


@dataclass
class TrainConfig(RunConfig):
    """Offline training on a group dataset with one of the objectives."""

    data: str = field(default="", metadata={"help": "group dataset directory (jobs/generate.py --out)"})
    # -- the objective (GDRO: paper eq. 6 and the top-1 term)
    objective: str = field(default="gdro", metadata={
        "help": f"one of {OBJECTIVES}: GDRO, hard Plackett-Luce, Diffusion-DPO on each group's best and worst, "
                "the top-1 member's flow-matching loss alone, DGPO (gdro_ray/objective.py)"})
    k: int = field(default=6, metadata={"help": "group size drawn from each stored group of k_gen images"})
    beta: float = field(default=12.0, metadata={"help": "implicit-reward scale, on the scale of --reduction"})
    tau: float = field(default=0.05, metadata={"help": "temperature of the soft ranking targets softmax(r / tau)"})
    gamma: float = field(default=0.5, metadata={"help": "weight of the top-1 velocity-regression stabiliser"})
    kl: float = field(default=0.0, metadata={"help": "weight of the velocity distance to the reference (DGPO's KL)"})
    reduction: str = field(default="mean", metadata={"help": f"velocity error over latent elements: {REDUCTIONS}"})
    timesteps: str = field(default="logit_normal", metadata={"help": f"timestep sampler: {TIMESTEP_SAMPLERS}"})
    reference: str = field(default="live", metadata={
        "help": f"one of {REFERENCES}: the reference velocities computed at every step (the LoRA off), or read from "
                "the group dataset's cache (made with --reference-draws)"})
    reference_lora: str | None = field(default=None, metadata={
        "help": "with --reference cached: the LoRA whose policy the cache holds, an earlier round's (default: the "
                "base model)"})
    reward_weights: dict | None = field(default=None, metadata={
        "help": "a dataset scored with a mixed reward, ranked with these weights, JSON {PART: weight} (default: "
                "its own)"})
    reward_normalise: bool = field(default=False, metadata={
        "help": "a mixed reward's parts each normalised over its group before mixing"})
    groups_per_step: int = field(default=2, metadata={"help": "groups per worker per micro-batch"})
    grad_accumulation: int = field(default=1, metadata={"help": "micro-batches per optimiser step"})
    reader_cpus: float = field(default=0.25, metadata={"help": "CPUs the training plan leaves free for the Ray Data "
                                                               "reader feeding the workers"})
    replay_limit_mb: float = field(default=2048.0, metadata={
        "help": "a worker whose share of the dataset fits in this many MiB replays it from memory after the first "
                "epoch; a larger share streams every epoch (0: always stream)"})
    stop_at: int | None = field(default=None, metadata={
        "help": "end this run at this step, its schedule still spanning --steps (a round of the align job)"})

    def __post_init__(self):
        super().__post_init__()
        for name in ("k", "groups_per_step", "grad_accumulation"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.k < 2:
            raise ValueError(f"k must be >= 2 to rank a group, got {self.k}")
        for name in ("beta", "tau", "reader_cpus"):
            if not getattr(self, name) > 0:  # also refuses NaN
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("gamma", "kl", "replay_limit_mb"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.objective == "sft" and self.kl > 0:
            raise ValueError("the sft objective runs no reference, so it takes no kl term: set kl to 0")
        if self.reference_lora is not None and self.reference != "cached":
            raise ValueError("a reference LoRA is read from the dataset's reference cache: give --reference cached")
        if self.stop_at is not None and not 1 <= self.stop_at <= self.steps:
            raise ValueError(f"stop_at must be within 1..steps ({self.steps}), got {self.stop_at}")
        if self.reward_weights is not None and (not self.reward_weights or not all(
                isinstance(weight, (int, float)) for weight in self.reward_weights.values())):
            raise ValueError(f"reward_weights must map reward parts to numbers, got {self.reward_weights!r}")
        for name, allowed in (("objective", OBJECTIVES), ("reduction", REDUCTIONS), ("timesteps", TIMESTEP_SAMPLERS),
                              ("reference", REFERENCES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")

    @property
    def micro_batch(self) -> int:
        return self.groups_per_step

    @property
    def accumulation(self) -> int:
        return self.grad_accumulation


@dataclass
class OnlineConfig(RunConfig):
    """Flow-GRPO, online: each worker samples groups of its prompts with the current LoRA through the SDE sampler,
    scores them and trains on the sampled transitions (gdro_ray.online)."""

    method: str = field(default="flow-grpo", metadata={"help": f"the online method: {ONLINE_METHODS}"})
    prompt_set: str = field(default="", metadata={"help": "encoded training prompts (gdro_ray.periodic_eval format)"})
    images_per_prompt: int = field(default=8, metadata={"help": "images sampled per prompt: the group"})
    prompts_per_step: int = field(default=2, metadata={"help": "prompts per worker per optimiser step"})
    sample_steps: int = field(default=10, metadata={"help": "SDE sampler steps of a rollout"})
    noise_level: float = field(default=0.7, metadata={"help": "the SDE's noise level a"})
    train_fraction: float = field(default=0.99, metadata={"help": "share of each rollout's transitions trained on"})
    clip_range: float = field(default=1e-4, metadata={"help": "PPO clip range of the policy ratio"})
    kl_beta: float = field(default=0.04, metadata={"help": "weight of the KL penalty to the reference (0: off)"})

    def __post_init__(self):
        super().__post_init__()
        if self.method not in ONLINE_METHODS:
            raise ValueError(f"method must be one of {ONLINE_METHODS}, got {self.method!r}")
        for name in ("images_per_prompt", "prompts_per_step", "sample_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.images_per_prompt < 2:
            raise ValueError(f"images_per_prompt must be >= 2 to compare images, got {self.images_per_prompt}")
        for name in ("noise_level", "clip_range"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 < self.train_fraction <= 1:
            raise ValueError(f"train_fraction must be in (0, 1], got {self.train_fraction}")
        if not self.kl_beta >= 0:
            raise ValueError(f"kl_beta must be >= 0, got {self.kl_beta}")

    @property
    def trained_transitions(self) -> int:
        """Transitions of each rollout trained on (Flow-GRPO: int(steps x fraction), at least one)."""
        return max(1, int(self.sample_steps * self.train_fraction))

    @property
    def micro_batch(self) -> int:
        return self.images_per_prompt  # one prompt's transitions at one step

    @property
    def accumulation(self) -> int:
        return self.prompts_per_step * self.trained_transitions


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping of field: value, got {type(values).__name__}")
    return values


def build_config(values: dict, cls: type[RunConfig] = TrainConfig) -> RunConfig:
    """A config of class cls from plain values, each checked against its field's type."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"unknown config fields {unknown}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    return cls(**{name: _checked(name, value, hints[name]) for name, value in values.items()})


def save_yaml(config: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))


def add_arguments(parser: argparse.ArgumentParser, cls: type[RunConfig] = TrainConfig) -> None:
    """One flag per field of cls, plus --preset and --config; defaults stay unset (None)."""
    parser.add_argument("--preset", default=None,
                        help="named settings per task: 'paper', 'tiny' (default: the model's own)")
    parser.add_argument("--config", default=None, help="a YAML file of field: value")
    add_dataclass_arguments(parser, cls)


def config_from_arguments(args: argparse.Namespace, cls: type[RunConfig] = TrainConfig) -> RunConfig:
    """Defaults < preset (default: the model's own, for the task, and the objective or method) < YAML < flags."""
    flags = values_given(args, cls)
    given = {**(read_yaml(args.config) if args.config else {}), **flags}
    task, model = given.get("task", cls.task), given.get("model", cls.model)
    preset = args.preset or profile_for(model).preset
    if cls is OnlineConfig:
        values = online_preset_values(preset, task)
    else:
        values = preset_values(preset, task, given.get("objective", TrainConfig.objective))
    return build_config({**values, **given}, cls)


def _checked(name: str, value, hint):
    if value is None:
        if type(None) in typing.get_args(hint):
            return None
        raise ValueError(f"config field {name!r} may not be empty")
    base = base_type(hint)
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, base) or (base is int and isinstance(value, bool)):
        raise ValueError(f"config field {name!r} expects {base.__name__}, got {type(value).__name__} {value!r}")
    return value
