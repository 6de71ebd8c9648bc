"""Held-out scores against compute, method beside method: the curves and the table of a compute comparison.

A run directory of the align job (offline, GDRO) or of the online job (Flow-GRPO) holds all it needs: the
held-out evaluations during training and the compute meter's running totals in RUN/train/tensorboard (a report
comes at every evaluation step), the group dataset's cost in RUN/groups/manifest.json (offline only: spent
before step 0; a later round's, RUN/round-R/groups, after the step the round before it stopped at, which its
LoRA's config.yaml records), and the final evaluation in RUN/summary.json. A run of the compare job
(COMPARE/runs/NAME) reads its shared dataset's cost in COMPARE/groups and its final evaluation in its result.json.
"""

import json
from dataclasses import dataclass
from pathlib import Path

from gdro_ray.config import read_yaml
from gdro_ray.data.manifest import read_dataset_manifest
from gdro_ray.evaluate import mean_and_standard_error
from gdro_ray.plots import plot_compute_curves, read_scalars

CURVES = ("reward", "quality", "corrected")
# The final evaluation's scores, and its reward change against the base on the same images (paired): runs of
# different seeds draw different held-out images, so their bases differ and the change is what compares them.
FINAL = (*CURVES, "reward_change")


@dataclass
class ComputeCurve:
    """One run's held-out scores at its evaluation steps, with the compute spent by then."""

    steps: list[int]
    forward_passes: list[float]
    seconds: list[float]
    reward: list[float]
    quality: list[float]  # the judge's rating: online RL's reward hacking would show here
    corrected: list[float]
    final: dict  # the final evaluation of the aligned model: FINAL's scores

    @classmethod
    def of_run(cls, run: str | Path) -> "ComputeCurve":
        run = Path(run)
        scalars = read_scalars(run / "train" / "tensorboard")
        if "eval/reward" not in scalars or "train/compute_forward_passes" not in scalars:
            raise ValueError(f"{str(run)!r} has no held-out evaluations or no compute meter in its TensorBoard log")
        compared = (run / "result.json").is_file()  # a run of the compare job, on its shared dataset
        datasets = dataset_costs(run.parent.parent / "groups" if compared else run / "groups", run)
        forwards = {0: 0.0, **dict(zip(*scalars["train/compute_forward_passes"]))}
        seconds = {0: 0.0}
        for tag, (steps, values) in scalars.items():
            if tag.startswith("train/compute_seconds_"):
                for step, value in zip(steps, values):
                    seconds[step] = seconds.get(step, 0.0) + value
        steps = [step for step in scalars["eval/reward"][0] if step in forwards]
        reward, quality, corrected = (dict(zip(*scalars[f"eval/{name}"])) for name in CURVES)
        if compared:
            final = json.loads((run / "result.json").read_text())
        else:
            summary = json.loads((run / "summary.json").read_text())
            final = {**summary["aligned"], "reward_change": summary["change"]["reward"]["mean"]}

        def spent(step: int, name: str) -> float:  # on the datasets made before this step was trained
            return sum(cost[name] for after, cost in datasets if step > after)

        return cls(steps, [spent(s, "forward_passes") + forwards[s] for s in steps],
                   [spent(s, "seconds") + seconds[s] for s in steps], [reward[s] for s in steps],
                   [quality[s] for s in steps], [corrected[s] for s in steps],
                   {name: final[name] for name in FINAL})


def dataset_costs(first: Path, run: Path) -> list[tuple[int, dict]]:
    """The group datasets a run trained on: (the step after which it was used, -1 for the first; its cost)."""
    rounds = [(-1, first)] if first.is_dir() else []
    for groups in sorted(run.glob("round-*/groups"), key=lambda path: int(path.parent.name.split("-")[1])):
        previous = run / f"round-{int(groups.parent.name.split('-')[1]) - 1}" / "lora" / "config.yaml"
        rounds.append((read_yaml(previous)["stop_at"], groups))
    costs = []
    for after, groups in rounds:
        generation = read_dataset_manifest(groups)["counts"].get("compute")
        if generation is None:
            raise ValueError(f"the dataset in {str(groups)!r} was made before the compute meter")
        costs.append((after, {"forward_passes": generation["forward_passes"],
                              "seconds": sum(generation["seconds"].values())}))
    return costs


def mean_curve(curves: list[ComputeCurve]) -> ComputeCurve:
    """The runs' mean at the evaluation steps they all have (seeds of one method)."""
    steps = sorted(set.intersection(*(set(curve.steps) for curve in curves)))

    def mean(name: str) -> list[float]:
        return [sum(getattr(c, name)[c.steps.index(s)] for c in curves) / len(curves) for s in steps]

    final = {name: sum(c.final[name] for c in curves) / len(curves) for name in FINAL}
    return ComputeCurve(steps, mean("forward_passes"), mean("seconds"), *(mean(name) for name in CURVES), final)


def compute_to_reach(curve: ComputeCurve, target: float) -> tuple[float, float] | None:
    """Forward passes and seconds at the first evaluation whose reward reaches target (None: never)."""
    for forwards, seconds, reward in zip(curve.forward_passes, curve.seconds, curve.reward):
        if reward >= target:
            return forwards, seconds
    return None


def compute_report(methods: dict[str, list[str | Path]], out: str | Path, title: str = "") -> str:
    """OUT/compute.png (held-out reward, judge rating and corrected score against forward passes and seconds, mean
    over each method's runs) and OUT/compute.md: each method's final scores and reward change against the base
    (mean +- standard error over its runs) and its total compute, and the compute the first method needs to reach
    each other method's last held-out reward during training, as a share of that method's total. Returns the
    markdown."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = {name: [ComputeCurve.of_run(run) for run in directories] for name, directories in methods.items()}
    means = {name: mean_curve(curves) for name, curves in runs.items()}
    plot_compute_curves({name: (curve.forward_passes, curve.seconds, {score: getattr(curve, score) for score in CURVES})
                         for name, curve in means.items()}, out / "compute.png", title)
    lines = ["| method | runs | final held-out reward | judge rating | corrected | reward change | forward passes "
             "| seconds |", "|---|---|---|---|---|---|---|---|"]
    for name, curves in runs.items():
        cells = []
        for score, digits in zip(FINAL, (3, 2, 3, 3)):
            mean, error = mean_and_standard_error([curve.final[score] for curve in curves])
            cells.append(f"{mean:.{digits}f}" + (f" ± {error:.{digits}f}" if error is not None else ""))
        lines.append(f"| {name} | {len(curves)} | " + " | ".join(cells) +
                     f" | {means[name].forward_passes[-1]:,.0f} | {means[name].seconds[-1]:,.0f} |")
    first, *others = means
    for other in others:
        target = means[other].reward[-1]
        reached = compute_to_reach(means[first], target)
        if reached is None:
            lines.append(f"\n{first} did not reach {other}'s last held-out reward during training ({target:.3f}).")
        else:
            lines.append(f"\n{first} reached {other}'s last held-out reward during training ({target:.3f}) with "
                         f"{reached[0] / means[other].forward_passes[-1]:.2f} of its forward passes and "
                         f"{reached[1] / means[other].seconds[-1]:.2f} of its seconds.")
        # The curves evaluate a few prompts; the final evaluation's paired change is the firmer measure.
        mine, theirs = means[first].final["reward_change"], means[other].final["reward_change"]
        share = (f"{means[first].forward_passes[-1] / means[other].forward_passes[-1]:.2f} of its forward passes and "
                 f"{means[first].seconds[-1] / means[other].seconds[-1]:.2f} of its seconds")
        lines.append(f"{first}'s final reward change ({mine:+.3f}) "
                     + (f"is at least {other}'s ({theirs:+.3f}), with {share} (an upper bound of the share needed)."
                        if mine >= theirs else f"falls short of {other}'s ({theirs:+.3f}), with {share}."))
    markdown = "\n".join(lines) + "\n"
    (out / "compute.md").write_text(markdown)
    return markdown
