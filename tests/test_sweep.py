"""A tiny Ray Tune sweep on the tiny world: every trial ends, ASHA stops some early, best.yaml feeds align."""

import csv

import pytest
import ray
import yaml

from gdro_ray.ray_session import init_ray


@pytest.fixture(scope="module")
def ray_cluster():
    init_ray(num_cpus=6)
    yield
    ray.shutdown()


def test_a_tiny_sweep_stops_a_trial_early_writes_a_preset_align_accepts_and_resumes(ray_cluster, load_script, tmp_path,
                                                                                   capsys):
    run = tmp_path / "sweep"
    # The trial after the preset samples a learning rate that wrecks a LoRA in two steps: its held-out
    # corrected score at the first rung trails the preset's, and ASHA must stop it there. Glyphs, since
    # the judge rates the base's glyphs well above 3: any reward the preset keeps then counts for it.
    argv = [
        "--task", "ocr", "--out", str(run), "--num-prompts", "8", "--k-gen", "4", "--steps", "4", "--k", "3",
        "--num-workers", "1", "--groups-per-step", "2", "--warmup-steps", "0", "--checkpoint-every", "2",
        "--eval-every", "2", "--train-eval-prompts", "4", "--eval-images-per-prompt", "2", "--lr", "1e-4",
        "--num-samples", "2", "--grace-period", "2", "--reduction-factor", "2", "--lr-range", "1.0,2.0",
        "--k-choices", "2,3",
    ]
    best = load_script("tune/sweep.py").main(argv)

    with open(run / "results.csv") as handle:
        rows = {row["lr"]: row for row in csv.DictReader(handle)}
    assert len(rows) == 2 and not any(row["error"] for row in rows.values())
    preset, wrecked = rows.pop("0.0001"), rows.popitem()[1]
    assert preset["stopped_early"] == "False" and preset["step"] == "4"
    assert wrecked["stopped_early"] == "True" and wrecked["step"] == "2"
    assert float(wrecked["eval_corrected"]) < float(preset["eval_corrected"])
    preset = yaml.safe_load((run / "best.yaml").read_text())
    assert preset == best and set(preset) == {"task", "model", "steps", "beta", "tau", "gamma", "k", "lr"}
    train, _ = load_script("jobs/align.py").parse_args(["--task", "ocr", "--config", str(run / "best.yaml")])
    assert (train.beta, train.k, train.lr) == (best["beta"], best["k"], best["lr"])

    # A rerun restores the finished sweep instead of training again.
    checkpoints = {path: path.stat().st_mtime_ns for path in (run / "trials").rglob("*.safetensors")}
    assert checkpoints, "the trials checkpointed their LoRAs"
    capsys.readouterr()
    assert load_script("tune/sweep.py").main(argv) == best
    assert "resuming the sweep" in capsys.readouterr().out
    assert {path: path.stat().st_mtime_ns for path in (run / "trials").rglob("*.safetensors")} == checkpoints


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--beta-range", "5"], "beta range must be LOW,HIGH"),
        (["--lr-range", "0,1"], "lr range must be LOW,HIGH"),
        (["--k-choices", "1,2"], "k choices must be >= 2"),
        (["--reduction-factor", "1"], "reduction_factor"),
    ],
)
def test_bad_sweep_arguments_are_named(argv, message, load_script, capsys):
    with pytest.raises(SystemExit):
        load_script("tune/sweep.py").parse_args(["--task", "ocr", *argv])
    assert message in capsys.readouterr().err
