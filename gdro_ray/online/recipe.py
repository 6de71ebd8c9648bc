"""The online baseline's stages, in one run directory, each skipped when its output is complete:

    RUN/prompt_set/      the training prompts (the task's training split, as the align job's), encoded once, and
                         the rollout sampler: the model's own with sample_steps steps
    RUN/eval_set/        held-out prompts for the curves during training (as the align job's)
    RUN/train/           Flow-GRPO training on Ray Train (gdro_ray.online.worker): checkpoints, tensorboard/, lora/
    RUN/eval/            base against aligned on held-out prompts, sampled with the deterministic ODE sampler
    RUN/summary.json     the final evaluation and the compute meter's totals (sampling, scoring and training all
                         happen in training here)
"""

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from gdro_ray.align import HeldOutSettings
from gdro_ray.cli import option
from gdro_ray.config import OnlineConfig
from gdro_ray.console import StageConsole
from gdro_ray.evaluate import HeldOut, evaluate_lora
from gdro_ray.meter import ComputeMeter
from gdro_ray.models import SamplerSettings
from gdro_ray.online.worker import online_worker
from gdro_ray.periodic_eval import SETTINGS_FILE, PeriodicEvaluator, write_eval_sets
from gdro_ray.plots import plot_evaluation_curve, read_scalars
from gdro_ray.profiles import quality_judge
from gdro_ray.resource_plan import (
    check_plans, describe_plans, evaluation_plan, read_capacity, run_as_task, training_plan, uses_gpus,
)
from gdro_ray.train.trainer import fit


@dataclass
class OnlineSettings(HeldOutSettings):
    """What the online job adds to training: its prompts and the evaluations."""

    out: str = option("", "run directory (default: runs/online-TASK)")
    num_prompts: int = option(96, "training prompts, drawn from the task's training split as the align job's")
    sampler: SamplerSettings | None = option(None, "how evaluations sample (default: the model's); rollouts take "
                                                   "its size and guidance with --sample-steps steps")

    def __post_init__(self):
        super().__post_init__()
        if self.num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1, got {self.num_prompts}")


def run_online(config: OnlineConfig, settings: OnlineSettings, log=print) -> dict:
    """All stages; returns the final evaluation with the compute meter's totals and the pictures' paths."""
    run = Path(settings.out or f"runs/online-{config.task}").resolve()
    capacity = read_capacity()
    use_gpu = uses_gpus(config.use_gpu, capacity)
    evaluation = evaluation_plan(use_gpu)
    plans = [evaluation, training_plan(config, use_gpu)]
    check_plans(plans, capacity)
    log(describe_plans(plans, capacity))
    held_out = HeldOut.of_task(config.task, config.model, config.seed, settings.sampler, settings.eval_prompt_file)
    rollouts = dataclasses.replace(held_out, split="train",
                                   sampler=dataclasses.replace(held_out.sampler, num_steps=config.sample_steps))
    sets = [(rollouts, settings.num_prompts, 1, run / "prompt_set")]
    if config.eval_every:
        sets.append((held_out, settings.train_eval_prompts, settings.train_eval_images_per_prompt, run / "eval_set"))
    missing = [entry for entry in sets if not (entry[-1] / SETTINGS_FILE).is_file()]
    if missing:
        run_as_task(evaluation, write_eval_sets, config.model, config.revision, missing, settings.judge(), log=log)
    config = dataclasses.replace(config, prompt_set=str(run / "prompt_set"), storage_path=str(run), name="train",
                                 eval_set=str(run / "eval_set") if config.eval_every else "")
    lora = config.run_directory / "lora"
    if (lora / "config.yaml").is_file():
        log(f"[online] training: complete in {lora}, skipped")
    else:
        fit(online_worker, config, evaluator=PeriodicEvaluator(config.eval_set) if config.eval_set else None, log=log)

    scalars = read_scalars(config.run_directory / "tensorboard")
    pictures = []
    if "eval/reward" in scalars:
        steps, rewards = scalars["eval/reward"]
        pictures.append(str(plot_evaluation_curve(steps, rewards, scalars["eval/corrected"][1],
                                                  run / "eval_curve.png")))
    judge = quality_judge(config.model, **settings.judge())
    draw = settings.final_evaluation(held_out)
    with StageConsole(2 * len(held_out.prompts(draw["num_prompts"])), "evaluate base, aligned", "prompt") as console:
        summary = run_as_task(evaluation, evaluate_lora, held_out, lora, run / "eval", judge, **draw,
                              progress=console.remote, log=log)
    summary = {**summary, "compute": {"total": ComputeMeter.reported(scalars).as_dict()},
               "pictures": [str(run / "eval" / "comparison.png"), *pictures]}
    (run / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
