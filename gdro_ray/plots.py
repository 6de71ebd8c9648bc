"""PNG plots of a run: training curves read back from TensorBoard, evaluation scores over steps."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

TRAINING_PANELS = (
    ("loss", ("train/loss", "train/loss_group", "train/loss_top1")),
    ("implicit-reward ranking", ("train/top1_agreement", "train/kendall_tau")),
)


def read_scalars(tensorboard_dir: str | Path) -> dict[str, tuple[list[int], list[float]]]:
    """Every scalar series of a TensorBoard log directory: tag -> (steps, values)."""
    if not Path(tensorboard_dir).is_dir():
        raise FileNotFoundError(f"TensorBoard log directory {str(tensorboard_dir)!r} does not exist")
    events = EventAccumulator(str(tensorboard_dir))
    events.Reload()
    return {tag: ([e.step for e in events.Scalars(tag)], [e.value for e in events.Scalars(tag)])
            for tag in events.Tags()["scalars"]}


def plot_training_curves(tensorboard_dir: str | Path, out: str | Path) -> Path:
    scalars = read_scalars(tensorboard_dir)
    if not scalars:
        raise ValueError(f"no scalars logged in {str(tensorboard_dir)!r}")
    figure, axes = plt.subplots(1, len(TRAINING_PANELS), figsize=(5 * len(TRAINING_PANELS), 3.5))
    for axis, (title, tags) in zip(axes, TRAINING_PANELS):
        for tag in tags:
            if tag in scalars:
                axis.plot(*scalars[tag], label=tag.removeprefix("train/"))
        axis.set(title=title, xlabel="step")
        axis.legend()
    return _save(figure, out)


def plot_evaluation_curve(steps: list[int], rewards: list[float], corrected: list[float], out: str | Path) -> Path:
    """Held-out task reward and corrected score against training steps (step 0: the base model)."""
    figure, axis = plt.subplots(figsize=(5, 3.5))
    axis.plot(steps, rewards, marker="o", label="task reward")
    axis.plot(steps, corrected, marker="s", label="corrected score")
    axis.set(title="held-out evaluation", xlabel="step")
    axis.legend()
    return _save(figure, out)


def plot_curves_by_label(curves: dict[str, dict[str, tuple[list[int], list[float]]]], out: str | Path) -> Path:
    """One panel per held-out score (eval/reward, eval/corrected), one line per label: label -> tag -> (steps,
    values)."""
    panels = (("eval/reward", "held-out reward"), ("eval/corrected", "corrected score"))
    figure, axes = plt.subplots(1, len(panels), figsize=(11, 4))
    for axis, (tag, title) in zip(axes, panels):
        for label, series in curves.items():
            if tag in series:
                axis.plot(*series[tag], marker="o", label=label)
        axis.set(title=f"{title} (mean over seeds)", xlabel="step")
    axes[-1].legend(fontsize="small", ncol=2)
    return _save(figure, out)


def plot_compute_curves(curves: dict[str, tuple[list, list, dict[str, list]]], out: str | Path,
                        title: str = "") -> Path:
    """Held-out scores (rows) against forward passes and seconds (columns), one line per method:
    method -> (forward passes, seconds, {score name: values})."""
    scores = list(next(iter(curves.values()))[2])
    figure, axes = plt.subplots(len(scores), 2, figsize=(10, 3.3 * len(scores)), squeeze=False)
    for row, score in enumerate(scores):
        for column, unit in enumerate(("transformer forward passes", "wall seconds")):
            axis = axes[row][column]
            for name, (forwards, seconds, values) in curves.items():
                axis.plot((forwards, seconds)[column], values[score], marker="o", label=name)
            axis.set(xlabel=unit, ylabel=f"held-out {score}")
    axes[0][0].legend()
    if title:
        figure.suptitle(title)
    return _save(figure, out)


def _save(figure, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out
