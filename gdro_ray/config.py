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
from gdro_ray.profiles import DEFAULT_MODEL, preset_values, profile_for

PRECISIONS = ("auto", "bf16", "fp32")
LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")
STRATEGIES = ("deepspeed", "ddp")


@dataclass
class TrainConfig:
    # -- data and model
    data: str = field(default="", metadata={"help": "group dataset directory (jobs/generate.py --out)"})
    task: str = field(default="ocr", metadata={"help": "the task the dataset was made for (selects its preset)"})
    model: str = field(default=DEFAULT_MODEL, metadata={"help": "'tiny', a diffusers FLUX directory, or a hub id"})
    revision: str | None = field(default=None, metadata={"help": "hub revision of --model"})
    # -- the objective (GDRO: paper eq. 6 and the top-1 term)
    objective: str = field(default="gdro", metadata={
        "help": f"one of {OBJECTIVES}: GDRO, hard Plackett-Luce, Diffusion-DPO on each group's best and worst, "
                "the top-1 member's flow-matching loss alone, DGPO (gdro_ray/objective.py)"})
    k: int = field(default=6, metadata={"help": "group size drawn from each stored group of k_gen images"})
    beta: float = field(default=12.0, metadata={"help": "implicit-reward scale, on the scale of --reduction"})
    tau: float = field(default=0.05, metadata={"help": "temperature of the soft ranking targets softmax(r / tau)"})
    gamma: float = field(default=0.5, metadata={"help": "weight of the top-1 velocity-regression stabiliser"})
    reduction: str = field(default="mean", metadata={"help": f"velocity error over latent elements: {REDUCTIONS}"})
    timesteps: str = field(default="logit_normal", metadata={"help": f"timestep sampler: {TIMESTEP_SAMPLERS}"})
    # -- optimisation
    steps: int = field(default=300, metadata={"help": "optimiser steps"})
    groups_per_step: int = field(default=2, metadata={"help": "groups per worker per micro-batch"})
    grad_accumulation: int = field(default=1, metadata={"help": "micro-batches per optimiser step"})
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
    seed: int = field(default=0, metadata={"help": "seed of member draws, noise and timesteps"})
    # -- distributed
    strategy: str = field(default="deepspeed", metadata={"help": f"one of {STRATEGIES}; ddp all-reduces LoRA grads"})
    zero_stage: int = field(default=2, metadata={"help": "DeepSpeed ZeRO stage (2 or 3)"})
    precision: str = field(default="auto", metadata={"help": f"{PRECISIONS}; auto: bf16 on GPUs, fp32 on CPUs"})
    num_workers: int = field(default=2, metadata={"help": "training workers (min when --max-workers is set)"})
    max_workers: int | None = field(default=None, metadata={"help": "elastic: grow up to this many workers"})
    use_gpu: bool | None = field(default=None, metadata={"help": "default: when the cluster has or can get GPUs"})
    cpus_per_worker: float = field(default=1.0, metadata={"help": "CPUs each training worker asks Ray for"})
    reader_cpus: float = field(default=0.25, metadata={"help": "CPUs of the Ray Data reader feeding the workers"})
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
        positive = ("k", "steps", "groups_per_step", "grad_accumulation", "lora_rank", "num_workers",
                    "checkpoint_every", "log_every", "max_nonfinite_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.k < 2:
            raise ValueError(f"k must be >= 2 to rank a group, got {self.k}")
        for name in ("beta", "tau", "lr", "cpus_per_worker", "reader_cpus"):
            if not getattr(self, name) > 0:  # also refuses NaN
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not self.gamma >= 0:
            raise ValueError(f"gamma must be >= 0, got {self.gamma}")
        for name, allowed in (("objective", OBJECTIVES), ("reduction", REDUCTIONS), ("timesteps", TIMESTEP_SAMPLERS), ("precision", PRECISIONS),
                              ("lr_schedule", LR_SCHEDULES), ("strategy", STRATEGIES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0, got {self.eval_every}")
        if self.zero_stage not in (2, 3):
            raise ValueError(f"zero_stage must be 2 or 3, got {self.zero_stage}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.max_workers is not None and self.max_workers < self.num_workers:
            raise ValueError(f"max_workers ({self.max_workers}) must be >= num_workers ({self.num_workers})")

    @property
    def run_directory(self) -> Path:
        return Path(self.storage_path).resolve() / self.name


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping of field: value, got {type(values).__name__}")
    return values


def build_config(values: dict) -> TrainConfig:
    """A TrainConfig from plain values, each checked against its field's type."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"unknown config fields {unknown}; known: {sorted(fields)}")
    hints = typing.get_type_hints(TrainConfig)
    return TrainConfig(**{name: _checked(name, value, hints[name]) for name, value in values.items()})


def save_yaml(config: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, plus --preset and --config; defaults stay unset (None)."""
    parser.add_argument("--preset", default=None,
                        help="named settings per task: 'paper', 'tiny' (default: the model's own)")
    parser.add_argument("--config", default=None, help="a YAML file of field: value")
    add_dataclass_arguments(parser, TrainConfig)


def config_from_arguments(args: argparse.Namespace) -> TrainConfig:
    """Defaults < preset (default: the model's own, for the task and objective) < YAML < flags."""
    flags = values_given(args, TrainConfig)
    from_file = read_yaml(args.config) if args.config else {}
    chosen = {name: flags.get(name, from_file.get(name, getattr(TrainConfig, name)))
              for name in ("task", "model", "objective")}
    preset = preset_values(args.preset or profile_for(chosen["model"]).preset, chosen["task"], chosen["objective"])
    return build_config({**preset, **from_file, **flags})


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
