"""The align recipe's stages, in one run directory, each skipped when its output is complete:

    RUN/groups/          offline group dataset: k_gen images per training prompt, scored (Ray Data)
    RUN/eval_set/        held-out prompts, encoded once, for evaluation during training
    RUN/train/           GDRO LoRA training (Ray Train + DeepSpeed): checkpoints, tensorboard/, lora/
    RUN/training_curves.png, RUN/eval_curve.png
    RUN/eval/            base against aligned on held-out prompts: JSON, CSV, comparison.png
"""

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from gdro_ray.config import TrainConfig, add_arguments, config_from_arguments
from gdro_ray.data.generation import GenerationConfig, generate_groups, parse_pool, pending_prompts
from gdro_ray.data.prompts import load_prompts
from gdro_ray.evaluate import default_judge, evaluate_lora, heldout_seeds
from gdro_ray.models import TINY, load_flow_model
from gdro_ray.plots import plot_evaluation_curve, plot_training_curves, read_scalars
from gdro_ray.resource_plan import (
    StagePlan, check_plans, describe_plans, evaluation_plan, generation_plan, read_capacity, run_as_task,
    training_plan, uses_gpus,
)
from gdro_ray.tasks import prompt_set
from gdro_ray.train.periodic_eval import SETTINGS_FILE, build_eval_set, save_eval_set
from gdro_ray.train.trainer import run_training

TASKS = ("ocr", "geneval")


@dataclass
class AlignSettings:
    """What the align job adds to training: the dataset to generate and the evaluation to run."""

    out: str = ""  # the run directory; default runs/align-TASK
    num_prompts: int = 96  # training prompts
    k_gen: int = 8  # images generated per training prompt (training draws k of them)
    sample_steps: int | None = None  # sampler steps (None: models.default_sampler_steps)
    size: int | None = None  # image size (None: 32 on the tiny model, 512 otherwise)
    cfg_scale: float = 1.0  # classifier-free guidance when sampling (dataset and evaluation)
    # The final evaluation: its held-out prompts (as many as the set holds, up to this), and its images spread
    # evenly over them. Many prompts before many seeds: a LoRA's gain can differ between kinds of prompt (on
    # glyphs it is mostly on single letters), and the standard error of the paired change shrinks with images.
    eval_prompts: int = 96
    eval_images: int = 384
    train_eval_prompts: int = 8  # held-out prompts evaluated during training (a subset: it runs often)
    train_eval_images_per_prompt: int = 4
    judge_url: str | None = None
    judge_token_env: str | None = None
    judge_model: str | None = None
    generation_actors: tuple[int, int] = (1, 1)
    scoring_actors: tuple[int, int] = (1, 1)
    gpus_per_generator: float | None = None  # None: 1 when the cluster has or can get GPUs

    def __post_init__(self):
        for name in ("num_prompts", "k_gen", "eval_prompts", "eval_images", "train_eval_prompts",
                     "train_eval_images_per_prompt"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.k_gen < 2:
            raise ValueError(f"k_gen (images per prompt) must be >= 2 to form a group, got {self.k_gen}")

    def check_group_size(self, k: int) -> None:
        """Training draws k of the k_gen images of each group: refused before any image is generated."""
        if k > self.k_gen:
            raise ValueError(f"k ({k}) is larger than k_gen ({self.k_gen}), the images generated per prompt: "
                             "lower --k or raise --k-gen")

    def judge(self) -> dict:
        """Keyword arguments of evaluate.default_judge."""
        return {"judge_url": self.judge_url, "token_env": self.judge_token_env, "judge_model": self.judge_model}


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
    train = prepare_data(train, settings, run, evaluation, log)
    train = dataclasses.replace(train, storage_path=str(run), name="train")
    lora = train.run_directory / "lora"
    if (lora / "config.yaml").is_file():
        log(f"[align] training: complete in {lora}, skipped")
    else:
        run_training(train, log=log)

    tensorboard = train.run_directory / "tensorboard"
    plot_training_curves(tensorboard, run / "training_curves.png")
    scalars = read_scalars(tensorboard)
    if "eval/reward" in scalars:
        steps, rewards = scalars["eval/reward"]
        plot_evaluation_curve(steps, rewards, scalars["eval/corrected"][1], run / "eval_curve.png")

    judge = default_judge(train.model, **settings.judge())
    sampler = generation_config(train, settings, run).sampler()
    summary = run_as_task(evaluation, evaluate_lora, train.task, train.model, lora, run / "eval", judge,
                          num_prompts=settings.eval_prompts, images_per_prompt=final_images_per_prompt(train, settings),
                          seed=train.seed, size=sampler["height"], num_steps=sampler["num_steps"],
                          cfg_scale=settings.cfg_scale, log=log)
    pictures = [str(path) for path in (run / "eval" / "comparison.png", run / "training_curves.png",
                                       run / "eval_curve.png") if path.is_file()]
    summary = {**summary, "pictures": pictures}
    (run / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def prepare_data(train: TrainConfig, settings: AlignSettings, run: Path, evaluation: StagePlan,
                 log=print) -> TrainConfig:
    """The group dataset (RUN/groups) and, when training evaluates, the evaluation set (RUN/eval_set, encoded
    in a task of the evaluation plan), each made unless complete; returns the training config pointed at them."""
    run.mkdir(parents=True, exist_ok=True)
    generation = generation_config(train, settings, run)
    if pending_prompts(generation):
        counts = generate_groups(generation, log=log)["counts"]
        log(f"[align] groups: {counts['groups']} of {settings.k_gen}, mean reward {counts['mean_reward']:.3f}")
    else:
        log(f"[align] groups: complete in {generation.out}, skipped")
    if train.eval_every and not (run / "eval_set" / SETTINGS_FILE).is_file():
        run_as_task(evaluation, _write_eval_set, train, settings, generation, run / "eval_set", log=log)
    return dataclasses.replace(train, data=generation.out, eval_set=str(run / "eval_set") if train.eval_every else "")


def final_images_per_prompt(train: TrainConfig, settings: AlignSettings) -> int:
    """Images per held-out prompt for settings.eval_images in all, over the prompts the set holds."""
    prompts = load_prompts(prompt_set(train.task, train.model), num_prompts=settings.eval_prompts, seed=train.seed,
                           split="heldout")
    return math.ceil(settings.eval_images / len(prompts))


def generation_config(train: TrainConfig, settings: AlignSettings, run: Path) -> GenerationConfig:
    return GenerationConfig(
        task=train.task, model=train.model, revision=train.revision, seed=train.seed, k=settings.k_gen,
        height=settings.size, width=settings.size, num_steps=settings.sample_steps, cfg_scale=settings.cfg_scale,
        num_prompts=settings.num_prompts, out=str(run / "groups"), generation_actors=settings.generation_actors,
        scoring_actors=settings.scoring_actors, gpus_per_generator=settings.gpus_per_generator,
    )


def _write_eval_set(train: TrainConfig, settings: AlignSettings, generation: GenerationConfig, out: Path) -> None:
    prompts = load_prompts(prompt_set(train.task, train.model), num_prompts=settings.train_eval_prompts,
                           seed=train.seed, split="heldout")
    model = load_flow_model(train.model, device="cpu", revision=train.revision)
    seeds = heldout_seeds(len(prompts), settings.train_eval_images_per_prompt)
    eval_set = build_eval_set(model, train.task, train.model, prompts, seeds, generation.height, generation.width,
                              generation.num_steps, settings.cfg_scale, settings.judge())
    save_eval_set(eval_set, out)


def default_preset(model: str) -> str:
    """The tiny world's own settings on the embedded model, the paper's elsewhere."""
    return "tiny" if model == TINY else "paper"


def add_align_arguments(parser: argparse.ArgumentParser) -> None:
    """TrainConfig's flags (with --preset and --config), then AlignSettings' own."""
    add_arguments(parser)
    defaults = AlignSettings()
    group = parser.add_argument_group("dataset and evaluation")
    group.add_argument("--out", default="", help="run directory (default: runs/JOB-TASK)")
    group.add_argument("--num-prompts", type=int, default=defaults.num_prompts, help="training prompts")
    group.add_argument("--k-gen", type=int, default=defaults.k_gen, help="images generated per training prompt")
    group.add_argument("--sample-steps", type=int, default=None, help="sampler steps (default: 20 tiny, 28 otherwise)")
    group.add_argument("--size", type=int, default=None, help="image size (default: 32 tiny, 512 otherwise)")
    group.add_argument("--cfg-scale", type=float, default=defaults.cfg_scale, help="classifier-free guidance (1: off)")
    group.add_argument("--eval-prompts", type=int, default=defaults.eval_prompts, help="held-out prompts at the end")
    group.add_argument("--eval-images", type=int, default=defaults.eval_images,
                       help="images of the final evaluation, spread evenly over its held-out prompts")
    group.add_argument("--train-eval-prompts", type=int, default=defaults.train_eval_prompts,
                       help="held-out prompts evaluated every --eval-every steps during training")
    group.add_argument("--train-eval-images-per-prompt", type=int, default=defaults.train_eval_images_per_prompt)
    group.add_argument("--judge-url", default=None, help="a quality judge server (gdro_ray/rewards/http_judge.py)")
    group.add_argument("--judge-token-env", default=None, help="environment variable holding the judge's token")
    group.add_argument("--judge-model", default=None, help="a vision-language judge: hub id or local directory")
    group.add_argument("--generation-actors", type=parse_pool, default=defaults.generation_actors, help="MIN,MAX")
    group.add_argument("--scoring-actors", type=parse_pool, default=defaults.scoring_actors, help="MIN,MAX")
    group.add_argument("--gpus-per-generator", type=float, default=None,
                       help="default: 1 if the cluster has GPUs, or declares it can get them "
                            "(GDRO_CLUSTER_MAX_RESOURCES, see cluster/README.md)")


def align_from_arguments(parser: argparse.ArgumentParser, args) -> tuple[TrainConfig, AlignSettings]:
    """Both configs from parsed flags; a bad value stops the parser with a message naming it."""
    args.task, args.model = args.task or "ocr", args.model or TINY
    if args.task not in TASKS:
        parser.error(f"--task must be one of {TASKS}, got {args.task!r}")
    args.preset = args.preset or default_preset(args.model)
    try:
        train = config_from_arguments(args)
        settings = AlignSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(AlignSettings)})
        settings.check_group_size(train.k)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    return train, settings
