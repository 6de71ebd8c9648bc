"""The align recipe's stages, in one run directory, each skipped when its output is complete:

    RUN/groups/          offline group dataset: k_gen images per training prompt, scored (Ray Data)
    RUN/eval_set/        held-out prompts, encoded once, for evaluation during training
    RUN/train/           GDRO LoRA training (Ray Train + DeepSpeed): checkpoints, tensorboard/, lora/
    RUN/training_curves.png, RUN/eval_curve.png
    RUN/eval/            base against aligned on held-out prompts: JSON, CSV, comparison.png
    RUN/summary.json     the final evaluation, and what the method cost: the compute meter of generation
                         (the datasets' manifests) and of training (its last report), and their total

With --rounds R, training stops after each R-th of its steps; round r > 1 trains on RUN/round-r/groups, made
with round r - 1's EMA LoRA (RUN/round-(r-1)/lora), and each round's LoRA is kept in RUN/round-r/lora.
"""

import argparse
import dataclasses
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from gdro_ray.cli import add_dataclass_arguments, from_arguments, option, values_given
from gdro_ray.config import TrainConfig, add_arguments, config_from_arguments
from gdro_ray.console import StageConsole
from gdro_ray.data.manifest import read_dataset_manifest
from gdro_ray.evaluate import HeldOut, evaluate_lora
from gdro_ray.generation import GenerationConfig, generate_groups, pending_prompts
from gdro_ray.meter import ComputeMeter
from gdro_ray.models import SamplerSettings
from gdro_ray.periodic_eval import SETTINGS_FILE, PeriodicEvaluator, write_eval_sets
from gdro_ray.plots import plot_evaluation_curve, plot_training_curves, read_scalars
from gdro_ray.profiles import TASKS, JudgeSettings, profile_for, quality_judge
from gdro_ray.resource_plan import (
    StagePlan, check_plans, describe_plans, evaluation_plan, generation_plan, read_capacity, run_as_task,
    training_plan, uses_gpus,
)
from gdro_ray.train.trainer import run_training


ROUND_PROMPTS = ("same", "new")
ROUND_REFERENCES = ("base", "previous")


@dataclass
class HeldOutSettings(JudgeSettings):
    """How a recipe evaluates: the final evaluation's prompts and images, the curves' during training, the judge."""

    eval_prompt_file: str | None = option(None, "evaluate on this file's prompts, e.g. GenEval's 553 of "
                                                "evaluation_metadata.jsonl or Flow-GRPO's OCR test.txt")
    # The final evaluation: its held-out prompts (as many as the set holds, up to this), and its images spread
    # evenly over them. Many prompts before many seeds: a LoRA's gain can differ between kinds of prompt (on
    # glyphs it is mostly on single letters), and the standard error of the paired change shrinks with images.
    eval_prompts: int = option(96, "held-out prompts of the final evaluation (0: all of --eval-prompt-file's)")
    eval_images: int = option(384, "images of the final evaluation, spread evenly over its held-out prompts")
    train_eval_prompts: int = option(8, "held-out prompts evaluated every --eval-every steps during training")
    train_eval_images_per_prompt: int = option(4, "images per held-out prompt during training")

    def __post_init__(self):
        for name in ("eval_images", "train_eval_prompts", "train_eval_images_per_prompt"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_prompts < (0 if self.eval_prompt_file else 1):  # 0: all of the file's prompts
            raise ValueError(f"eval_prompts must be >= 1 (0 with a prompt file: all of it), got {self.eval_prompts}")

    def final_evaluation(self, held_out: HeldOut) -> dict:
        """evaluate_lora's draw: its prompts, and its images spread evenly over them."""
        prompts = len(held_out.prompts(self.eval_prompts or None))
        return {"num_prompts": self.eval_prompts or None, "images_per_prompt": math.ceil(self.eval_images / prompts)}


@dataclass
class AlignSettings(HeldOutSettings):
    """What the align job adds to training: the dataset to generate and the evaluation to run."""

    out: str = option("", "run directory (default: runs/JOB-TASK)")
    num_prompts: int = option(96, "training prompts (with --train-prompt-file, 0: all of the file's)")
    train_prompt_file: str | None = option(None, "train on this file's prompts: Flow-GRPO's one-prompt-a-line "
                                                 ".txt (ocr) or GenEval's .jsonl (geneval)")
    k_gen: int = option(8, "images generated per training prompt, training draws k of them (default: the "
                           "model's own, 16 on FLUX as in the paper)")
    sampler: SamplerSettings | None = option(None, "how to sample, dataset and evaluations (default: the model's)")
    generation_actors: tuple[int, int] = option((1, 1), "MIN,MAX generation actors", pair_from_one=True)
    scoring_actors: tuple[int, int] = option((1, 1), "MIN,MAX scoring actors", pair_from_one=True)
    gpus_per_generator: float | None = option(None, "default: 1 if the cluster has GPUs, or declares it can get "
                                                    "them (GDRO_CLUSTER_MAX_RESOURCES, see cluster/README.md)")
    reference_draws: int = option(8, "with --reference cached: (t, eps) draws per group whose reference velocities "
                                     "generation stores")
    rounds: int = option(1, "semi-online: train in this many rounds, each after the first on groups generated with "
                            "the previous round's policy; the steps are shared out, not multiplied")
    round_prompts: str = option("same", "each later round's prompts: the same training prompts, or the split's next "
                                        "--num-prompts", choices=ROUND_PROMPTS)
    round_reference: str = option("base", "each later round's reference: the base model, or the previous round's "
                                          "policy (needs --reference cached)", choices=ROUND_REFERENCES)

    def __post_init__(self):
        super().__post_init__()
        if self.reference_draws < 1:
            raise ValueError(f"reference_draws must be >= 1, got {self.reference_draws}")
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        if self.round_prompts not in ROUND_PROMPTS:
            raise ValueError(f"round_prompts must be one of {ROUND_PROMPTS}, got {self.round_prompts!r}")
        if self.round_reference not in ROUND_REFERENCES:
            raise ValueError(f"round_reference must be one of {ROUND_REFERENCES}, got {self.round_reference!r}")

    def check_reference(self, train: TrainConfig) -> None:
        """The previous round's policy as the reference is read from each dataset's cache."""
        if self.round_reference == "previous" and train.reference != "cached":
            raise ValueError("--round-reference previous reads the previous round's policy from the reference cache: "
                             "add --reference cached")
        if self.num_prompts < (0 if self.train_prompt_file else 1):  # 0: all of the file's prompts
            raise ValueError(f"num_prompts must be >= 1 (0 with a prompt file: all of it), got {self.num_prompts}")
        if self.k_gen < 2:
            raise ValueError(f"k_gen (images per prompt) must be >= 2 to form a group, got {self.k_gen}")

    def check_group_size(self, k: int) -> None:
        """Training draws k of the k_gen images of each group: refused before any image is generated."""
        if k > self.k_gen:
            raise ValueError(f"k ({k}) is larger than k_gen ({self.k_gen}), the images generated per prompt: "
                             "lower --k or raise --k-gen")


def run_align(train: TrainConfig, settings: AlignSettings, log=print) -> dict:
    """All stages; returns the final evaluation ({"base": {...}, "aligned": {...}}) and the pictures' paths.
    Stops before any work when a stage does not fit the cluster."""
    run = Path(settings.out or f"runs/align-{train.task}").resolve()
    capacity = read_capacity()
    use_gpu = uses_gpus(train.use_gpu, capacity)
    evaluation = evaluation_plan(use_gpu)
    plans = [generation_plan(generation_config(train, settings, run), capacity), evaluation,
             training_plan(train, use_gpu)]
    check_plans(plans, capacity)
    log(describe_plans(plans, capacity))
    datasets = []
    for round_ in range(1, settings.rounds + 1):
        previous = round_ > 1 and settings.round_reference == "previous"
        train = dataclasses.replace(prepare_data(train, settings, run, evaluation, log, round_),
                                    storage_path=str(run), name="train", stop_at=round_end(train, settings, round_),
                                    reference_lora=str(round_lora(run, round_ - 1)) if previous else None)
        datasets.append(train.data)
        lora = train.run_directory / "lora" if settings.rounds == 1 else round_lora(run, round_)
        if (lora / "config.yaml").is_file():
            log(f"[align] training: complete in {lora}, skipped")
            continue
        run_training(train, evaluator=PeriodicEvaluator(train.eval_set) if train.eval_set else None, log=log)
        if settings.rounds > 1:  # the policy the next round generates with
            shutil.copytree(train.run_directory / "lora", lora, dirs_exist_ok=True)
    lora = train.run_directory / "lora"

    tensorboard = train.run_directory / "tensorboard"
    plot_training_curves(tensorboard, run / "training_curves.png")
    scalars = read_scalars(tensorboard)
    if "eval/reward" in scalars:
        steps, rewards = scalars["eval/reward"]
        plot_evaluation_curve(steps, rewards, scalars["eval/corrected"][1], run / "eval_curve.png")

    # The reward, sampler and prompt source the groups were made with (prompts: the evaluation file's, if given).
    held_out = HeldOut.of_dataset(train.data, settings.eval_prompt_file)
    judge = quality_judge(train.model, **settings.judge())
    draw = settings.final_evaluation(held_out)
    with StageConsole(2 * len(held_out.prompts(draw["num_prompts"])), "evaluate base, aligned", "prompt") as console:
        summary = run_as_task(evaluation, evaluate_lora, held_out, lora, run / "eval", judge, **draw,
                              progress=console.remote, log=log)
    pictures = [str(path) for path in (run / "eval" / "comparison.png", run / "training_curves.png",
                                       run / "eval_curve.png") if path.is_file()]
    summary = {**summary, "compute": method_compute(datasets, scalars), "pictures": pictures}
    (run / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def method_compute(datasets: list[str], scalars: dict) -> dict:
    """What the method cost (gdro_ray.meter): making and scoring its group datasets (one a round), training (the last
    report's totals), and both together. Evaluation is not counted."""
    training = ComputeMeter.reported(scalars)
    made = [read_dataset_manifest(data)["counts"].get("compute") for data in datasets]
    if None in made:  # a dataset made before the meter
        return {"generation": None, "training": training.as_dict(), "total": None}
    generation = ComputeMeter()
    for cost in made:
        generation = generation.add(cost)
    return {"generation": generation.as_dict(), "training": training.as_dict(),
            "total": training.add(generation.as_dict()).as_dict()}


def round_end(train: TrainConfig, settings: AlignSettings, round_: int) -> int | None:
    """The step a round trains to (None: a single round runs to --steps)."""
    return None if settings.rounds == 1 else round(round_ * train.steps / settings.rounds)


def round_lora(run: Path, round_: int) -> Path:
    return run / f"round-{round_}" / "lora"


def prepare_data(train: TrainConfig, settings: AlignSettings, run: Path, evaluation: StagePlan,
                 log=print, round_: int = 1) -> TrainConfig:
    """The group dataset (RUN/groups; a later round's RUN/round-R/groups) and, when training evaluates, the
    evaluation set (RUN/eval_set, encoded in a task of the evaluation plan), each made unless complete; returns
    the training config pointed at them."""
    run.mkdir(parents=True, exist_ok=True)
    generation = generation_config(train, settings, run, round_)
    if pending_prompts(generation):
        counts = generate_groups(generation, log=log)["counts"]
        log(f"[align] groups: {counts['groups']} of {settings.k_gen}, mean reward {counts['mean_reward']:.3f}")
    else:
        log(f"[align] groups: complete in {generation.out}, skipped")
    if train.eval_every and not (run / "eval_set" / SETTINGS_FILE).is_file():
        held_out = HeldOut.of_dataset(generation.out, settings.eval_prompt_file)
        run_as_task(evaluation, write_eval_sets, train.model, train.revision,
                    [(held_out, settings.train_eval_prompts, settings.train_eval_images_per_prompt, run / "eval_set")],
                    settings.judge(), log=log)
    return dataclasses.replace(train, data=generation.out, eval_set=str(run / "eval_set") if train.eval_every else "")


def generation_config(train: TrainConfig, settings: AlignSettings, run: Path, round_: int = 1) -> GenerationConfig:
    """Round 1's dataset from the base model; a later round's from the previous round's LoRA, on the same
    prompts or the split's next ones."""
    later = round_ > 1
    return GenerationConfig(
        task=train.task, model=train.model, revision=train.revision, seed=train.seed, k=settings.k_gen,
        sampler=settings.sampler, num_prompts=settings.num_prompts,
        out=str(run / f"round-{round_}" / "groups" if later else run / "groups"),
        lora=str(round_lora(run, round_ - 1)) if later else None,
        first_prompt=(round_ - 1) * settings.num_prompts if later and settings.round_prompts == "new" else 0,
        reference_policy="lora" if later and settings.round_reference == "previous" else "base",
        # A training file is used whole when another file evaluates; otherwise its held-out split evaluates.
        prompt_file=settings.train_prompt_file,
        split="all" if settings.train_prompt_file and settings.eval_prompt_file else "train",
        generation_actors=settings.generation_actors, scoring_actors=settings.scoring_actors,
        gpus_per_generator=settings.gpus_per_generator,
        reference_draws=settings.reference_draws if train.reference == "cached" else 0,
        reference_timesteps=train.timesteps,
    )


def add_align_arguments(parser: argparse.ArgumentParser) -> None:
    """TrainConfig's flags (with --preset and --config), the sampler's, then AlignSettings' own."""
    add_arguments(parser)
    add_dataclass_arguments(parser.add_argument_group("sampler (default: the model's own)"), SamplerSettings)
    add_dataclass_arguments(parser.add_argument_group("dataset and evaluation"), AlignSettings, skip=("sampler",))


def align_from_arguments(parser: argparse.ArgumentParser, args) -> tuple[TrainConfig, AlignSettings]:
    """Both configs from parsed flags; a bad value stops the parser with a message naming it."""
    if args.task not in (None, *TASKS):
        parser.error(f"--task must be one of {TASKS}, got {args.task!r}")
    try:
        train = config_from_arguments(args)
        sampler = profile_for(train.model).sampler.with_overrides(**values_given(args, SamplerSettings))
        profile = profile_for(train.model)
        settings = from_arguments(args, AlignSettings, skip=("sampler",), sampler=sampler,
                                  k_gen=profile.images_per_prompt)
        settings.check_group_size(train.k)
        settings.check_reference(train)
        generation_config(train, settings, Path(settings.out or "."))  # a prompt file of the wrong task, missing
        if settings.eval_prompt_file:
            HeldOut.of_task(train.task, train.model, eval_prompt_file=settings.eval_prompt_file)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    return train, settings
