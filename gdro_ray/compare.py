"""Methods side by side: objectives (and settings varied one at a time) with several seeds each, on ONE group
dataset and ONE evaluation, made once as the align job makes them.

    RUN/groups/, RUN/eval_set/          shared: the group dataset and the evaluation set of the training curves
    RUN/base/                           the base model's final evaluation, made once for every run
    RUN/runs/LABEL-seedS/train/         a run's training (tensorboard, checkpoints, lora/)
    RUN/runs/LABEL-seedS/eval/          its final evaluation (aligned.json), paired with the base's
    RUN/runs/LABEL-seedS/result.json    its row of results.csv: a finished run is read back, never run again
    RUN/results.csv                     one row per finished run, of this command and of earlier ones into RUN,
                                        with its training's forward passes (gdro_ray.meter); the shared dataset's
                                        cost is in RUN/groups/manifest.json
    RUN/results.md                      mean and standard error over seeds per method and setting
    RUN/curves.png                      held-out reward and corrected score over training steps, mean over seeds,
                                        per method at its preset; curves-METHOD.png: a method's varied settings

A run's LABEL is its method, with the varied setting appended (gdro-k2, gdro-gamma0). Runs differ only in the
objective, the setting and the training seed: the groups, the held-out prompts and their sampling seeds are shared.
"""

import dataclasses
import json
import time
import typing
from dataclasses import dataclass
from pathlib import Path

from gdro_ray.align import AlignSettings, generation_config, prepare_data
from gdro_ray.cli import base_type, option
from gdro_ray.config import TrainConfig
from gdro_ray.console import StageConsole
from gdro_ray.data.manifest import read_manifest
from gdro_ray.evaluate import (
    HeldOut, evaluation_draw, mean_and_standard_error, paired_change, read_scores, sample_and_score, summarise,
    write_csv, write_results,
)
from gdro_ray.meter import ComputeMeter
from gdro_ray.models import load_flow_model
from gdro_ray.objective import OBJECTIVES
from gdro_ray.periodic_eval import PeriodicEvaluator
from gdro_ray.plots import plot_curves_by_label, read_scalars
from gdro_ray.profiles import profile_for, quality_judge
from gdro_ray.resource_plan import (
    check_plans, describe_plans, evaluation_plan, generation_plan, read_capacity, run_as_task, training_plan,
    uses_gpus,
)
from gdro_ray.rewards import build_reward
from gdro_ray.rewards.quality import QualityJudge
from gdro_ray.train.trainer import run_training

PRESET = "preset"  # the setting of a run that varies nothing
SCORES = ("reward", "quality", "corrected", "reward_change", "geneval")


@dataclass
class CompareSettings:
    methods: tuple[str, ...] = option(OBJECTIVES, "objectives to train, each from its own preset")
    seeds: int = option(3, "training seeds per method and setting (0, 1, ...); data and evaluation stay one")
    grid: tuple[str, ...] = option((), "FIELD=V1,V2,...: also train each method with this one training field set to "
                                       "each value (e.g. k=2,4,6,8); several --grid flags vary one field at a time")

    def __post_init__(self):
        unknown = sorted(set(self.methods) - set(OBJECTIVES))
        if not self.methods or unknown:
            raise ValueError(f"methods must be among {OBJECTIVES}, got {list(self.methods)}")
        if self.seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {self.seeds}")
        for item in self.grid:
            parse_grid(item)

    def axes(self) -> list[tuple[str, tuple]]:
        return [parse_grid(item) for item in self.grid]


def parse_grid(text: str) -> tuple[str, tuple]:
    """'k=2,4,6' -> ('k', (2, 4, 6)), each value of the training field's own type."""
    name, _, values = text.partition("=")
    fields = typing.get_type_hints(TrainConfig)
    varied = {f.name for f in dataclasses.fields(TrainConfig)} - {"objective", "seed", "data", "task", "model"}
    if name not in varied or not values:
        raise ValueError(f"a grid is FIELD=V1,V2,... over a training field ({', '.join(sorted(varied))}), "
                         f"got {text!r}")
    kind = base_type(fields[name])
    try:
        return name, tuple(kind(value) for value in values.split(","))
    except ValueError:
        raise ValueError(f"grid {text!r}: {name} takes {kind.__name__} values") from None


@dataclass(frozen=True)
class RunSpec:
    method: str
    seed: int
    field: str | None = None  # the setting varied from the method's preset, if any
    value: object = None

    @property
    def setting(self) -> str:
        return PRESET if self.field is None else f"{self.field}={self.value}"

    @property
    def label(self) -> str:
        return self.method if self.field is None else f"{self.method}-{self.field}{self.value}"

    @property
    def name(self) -> str:
        return f"{self.label}-seed{self.seed}"


def plan_runs(configs: dict[str, TrainConfig], settings: CompareSettings) -> list[RunSpec]:
    """Each method's preset, then each grid value that differs from it, each with every seed."""
    runs = []
    for method in settings.methods:
        variations = [(None, None)] + [(name, value) for name, values in settings.axes() for value in values
                                       if getattr(configs[method], name) != value]
        runs += [RunSpec(method, seed, name, value) for name, value in variations for seed in range(settings.seeds)]
    return list(dict.fromkeys(runs))  # a value given on two axes runs once


def run_compare(configs: dict[str, TrainConfig], align: AlignSettings, settings: CompareSettings,
                log=print) -> list[dict]:
    """Every run of the plan to its end (finished runs are skipped); returns the rows of results.csv."""
    first = configs[settings.methods[0]]
    run = Path(align.out or f"runs/compare-{first.task}").resolve()
    runs = plan_runs(configs, settings)
    capacity = read_capacity()
    use_gpu = uses_gpus(first.use_gpu, capacity)
    evaluation = evaluation_plan(use_gpu)
    plans = [generation_plan(generation_config(first, align, run), capacity), evaluation,
             training_plan(first, use_gpu)]
    check_plans(plans, capacity)
    log(describe_plans(plans, capacity))
    cached = needs_reference_cache([run_config(configs, spec) for spec in runs], read_manifest(run / "groups"))
    shared = prepare_data(dataclasses.replace(first, reference="cached") if cached else first, align, run,
                          evaluation, log)
    held_out = HeldOut.of_dataset(shared.data, align.eval_prompt_file)
    judge = quality_judge(first.model, **align.judge())
    draw = align.final_evaluation(held_out)
    prompts = len(held_out.prompts(draw["num_prompts"]))
    if not (run / "base" / "base.json").is_file():
        with StageConsole(prompts, "evaluate base", "prompt") as console:
            run_as_task(evaluation, evaluate_model, held_out, None, run / "base", "base", judge, **draw,
                        progress=console.remote, log=log)
    base = summarise(read_scores(run / "base", "base"))
    for index, spec in enumerate(runs, 1):
        directory = run / "runs" / spec.name
        if (directory / "result.json").is_file():
            continue
        log(f"[compare] run {index}/{len(runs)}: {spec.name}")
        config = dataclasses.replace(run_config(configs, spec), data=shared.data, eval_set=shared.eval_set,
                                     storage_path=str(directory), name="train")
        lora, timing = config.run_directory / "lora", directory / "train_seconds.json"
        if not (lora / "config.yaml").is_file():
            started = time.perf_counter()  # a resumed training counts the attempt that finished it
            run_training(config, evaluator=PeriodicEvaluator(config.eval_set) if config.eval_set else None, log=log)
            timing.write_text(json.dumps(time.perf_counter() - started))
        with StageConsole(prompts, f"evaluate {spec.name}", "prompt") as console:
            summary = run_as_task(evaluation, evaluate_model, held_out, lora, directory / "eval", "aligned", judge,
                                  **draw, progress=console.remote, log=log)
        change = paired_change(read_scores(run / "base", "base"), read_scores(directory / "eval", "aligned"))
        meter = ComputeMeter.reported(read_scalars(config.run_directory / "tensorboard"))
        row = _row(spec, config, summary, change, json.loads(timing.read_text()), meter.forward_passes)
        (directory / "result.json").write_text(json.dumps(row, indent=1))
        log(f"[compare] {spec.name}: reward {row['reward']:.3f} (base {base['reward']:.3f}, change "
            f"{row['reward_change']:+.3f} +- {row['reward_change_se']:.3f}), corrected {row['corrected']:.3f} "
            f"(base {base['corrected']:.3f}), {row['train_seconds']:.0f} s training")
    return write_report(run, base)


def write_report(run: Path, base: dict) -> list[dict]:
    """results.csv, results.md and the curves from every finished run in RUN/runs (of this command or earlier
    ones); returns the rows, by method, setting and seed."""
    rows = sorted((json.loads(path.read_text()) for path in (run / "runs").glob("*/result.json")), key=_order)
    if not rows:
        raise ValueError(f"no finished runs in {run / 'runs'}")
    write_csv(rows, run / "results.csv")
    (run / "results.md").write_text(results_table(rows, base))
    labels: dict[str, list[dict]] = {}
    for row in rows:
        labels.setdefault(row["label"], []).append(row)
    plot_curves(run, {label: members for label, members in labels.items() if members[0]["setting"] == PRESET},
                run / "curves.png")
    for method in dict.fromkeys(row["method"] for row in rows if row["setting"] != PRESET):
        plot_curves(run, {label: members for label, members in labels.items() if members[0]["method"] == method},
                    run / f"curves-{method}.png")
    return rows


def _order(row: dict) -> tuple:
    field, _, value = row["setting"].partition("=")
    try:  # numbers in their order, words (reference=cached) in theirs
        number, word = float(value or 0), ""
    except ValueError:
        number, word = 0.0, value
    return (OBJECTIVES.index(row["method"]), row["setting"] != PRESET, field, word, number, row["seed"])


def evaluate_model(held_out: HeldOut, lora: str | Path | None, out: Path, name: str, judge: QualityJudge, *,
                   num_prompts: int | None, images_per_prompt: int, progress=None) -> dict:
    """The model (with a LoRA, if given) on the held-out draw: OUT/NAME.json and .csv; returns its summary."""
    model = load_flow_model(profile_for(held_out.model).weights)
    if lora is not None:
        model.load_lora(lora)
    prompts, seeds = evaluation_draw(held_out, num_prompts, images_per_prompt)
    scores, _ = sample_and_score(model, held_out, build_reward(held_out.reward), judge, prompts, seeds, progress)
    summary = summarise(scores)
    write_results(out, name, scores, summary)
    return summary


def needs_reference_cache(run_configs: list[TrainConfig], made: dict | None) -> bool:
    """One dataset serves every run: it carries the reference cache when any run trains on it (--grid
    reference=cached), or when an earlier command into the directory made it with one."""
    return any(config.reference == "cached" for config in run_configs) or \
        (made is not None and "reference_cache" in made["identity"])


def run_config(configs: dict[str, TrainConfig], spec: RunSpec) -> TrainConfig:
    """The training config of one run: its method's, with its seed and its varied setting."""
    values = {"seed": spec.seed} | ({spec.field: spec.value} if spec.field else {})
    return dataclasses.replace(configs[spec.method], **values)


def _row(spec: RunSpec, config: TrainConfig, summary: dict, change: dict, train_seconds: float,
         train_forward_passes: int) -> dict:
    return {"method": spec.method, "setting": spec.setting, "label": spec.label, "seed": spec.seed,
            "k": config.k, "beta": config.beta, "tau": config.tau, "gamma": config.gamma, "lr": config.lr,
            "reward": summary["reward"], "quality": summary["quality"], "corrected": summary["corrected"],
            "reward_change": change["reward"]["mean"], "reward_change_se": change["reward"]["standard_error"],
            "geneval": summary.get("geneval", {}).get("overall"), "steps": config.steps,
            "train_seconds": round(train_seconds, 1), "train_forward_passes": train_forward_passes}


def results_table(rows: list[dict], base: dict) -> str:
    """A markdown table: one line per method and setting, mean +- standard error over its seeds; the base first."""
    geneval = any(row.get("geneval") is not None for row in rows)
    columns = ["held-out reward", "judge rating", "corrected", "reward change"] + (["GenEval"] if geneval else [])
    lines = ["| method | setting | seeds | " + " | ".join(columns) + " | training s |",
             "|---" * (len(columns) + 4) + "|"]
    base_cells = [f"{base['reward']:.3f}", f"{base['quality']:.2f}", f"{base['corrected']:.3f}", ""]
    base_cells += [f"{base['geneval']['overall']:.3f}"] if geneval else []
    lines.append("| base | | | " + " | ".join(base_cells) + " | |")
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["setting"]), []).append(row)
    for (method, setting), members in groups.items():
        cells = []
        for name, digits in zip(SCORES, (3, 2, 3, 3, 3)):
            if name == "geneval" and not geneval:
                continue
            mean, error = mean_and_standard_error([row[name] for row in members])
            cells.append(f"{mean:.{digits}f}" + (f" ± {error:.{digits}f}" if error is not None else ""))
        seconds = sum(row["train_seconds"] for row in members) / len(members)
        lines.append(f"| {method} | {setting} | {len(members)} | " + " | ".join(cells) + f" | {seconds:.0f} |")
    return "\n".join(lines) + "\n"


def plot_curves(run: Path, labels: dict[str, list[dict]], out: Path) -> Path:
    """Held-out reward and corrected score over training steps, one line per label, the mean over its seeds at each
    step (read from each run's TensorBoard log)."""
    curves = {}
    for label, members in labels.items():
        points: dict[str, dict[int, list[float]]] = {}
        for row in members:
            scalars = read_scalars(run / "runs" / f"{label}-seed{row['seed']}" / "train" / "tensorboard")
            for tag in ("eval/reward", "eval/corrected"):
                for step, value in zip(*scalars.get(tag, ([], []))):
                    points.setdefault(tag, {}).setdefault(step, []).append(value)
        curves[label] = {tag: (sorted(by_step), [sum(by_step[s]) / len(by_step[s]) for s in sorted(by_step)])
                         for tag, by_step in points.items()}
    return plot_curves_by_label(curves, out)
