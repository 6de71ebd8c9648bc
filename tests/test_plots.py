import pytest
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from gdro_ray.plots import plot_evaluation_curve, plot_training_curves, read_scalars


def test_training_curves_are_read_back_and_drawn(tmp_path):
    writer = SummaryWriter(str(tmp_path / "tb"))
    for step in range(1, 6):
        writer.add_scalar("train/loss", 2.0 / step, step)
        writer.add_scalar("train/top1_agreement", 0.1 * step, step)
    writer.close()
    scalars = read_scalars(tmp_path / "tb")
    assert scalars["train/loss"] == ([1, 2, 3, 4, 5], pytest.approx([2.0, 1.0, 2 / 3, 0.5, 0.4]))
    png = plot_training_curves(tmp_path / "tb", tmp_path / "curves.png")
    assert Image.open(png).size[0] > 500
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no scalars"):
        plot_training_curves(tmp_path / "empty", tmp_path / "none.png")
    with pytest.raises(FileNotFoundError, match="missing"):
        read_scalars(tmp_path / "missing")


def test_evaluation_curve_is_drawn(tmp_path):
    png = plot_evaluation_curve([0, 100, 200], [0.4, 0.5, 0.6], [0.3, 0.35, 0.4], tmp_path / "eval.png")
    assert Image.open(png).format == "PNG"
