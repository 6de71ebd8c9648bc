"""A tiny Ray Tune sweep on the tiny world: every trial ends, ASHA stops some early, best.yaml feeds align."""

import csv
import dataclasses

import pytest
import yaml

from gdro_ray.config import TrainConfig
from gdro_ray.resource_plan import ClusterCapacity, ResourcePlanError
from gdro_ray.sweep import SweepSettings, concurrent_trials


def test_a_tiny_sweep_stops_a_trial_early_writes_a_preset_align_accepts_and_resumes(local_ray, load_script, tmp_path,
                                                                                   capsys):
    run = tmp_path / "sweep"
    # The trial after the preset samples a learning rate that wrecks a LoRA in two steps: its held-out
    # corrected score at the first rung trails the preset's, and ASHA must stop it there. Glyphs, since
    # the judge rates the base's glyphs well above 3: any reward the preset keeps then counts for it.
    argv = [
        "--task", "ocr", "--out", str(run), "--num-prompts", "8", "--k-gen", "4", "--steps", "4", "--k", "3",
        "--num-workers", "1", "--groups-per-step", "2", "--warmup-steps", "0", "--checkpoint-every", "2",
        "--eval-every", "2", "--train-eval-prompts", "4", "--train-eval-images-per-prompt", "2", "--lr", "1e-4",
        "--num-samples", "2", "--grace-period", "2", "--reduction-factor", "2", "--lr-range", "1.0,2.0",
        "--k-choices", "2,3",
    ]
    best = load_script("tune/sweep.py").main(argv)

    with open(run / "results.csv") as handle:
        rows = {row["lr"]: row for row in csv.DictReader(handle)}
    assert len(rows) == 2 and not any(row["error"] for row in rows.values())
    preset_row, wrecked = rows.pop("0.0001"), rows.popitem()[1]
    assert preset_row["stopped_early"] == "False" and preset_row["step"] == "4"
    assert wrecked["stopped_early"] == "True" and wrecked["step"] == "2"
    assert float(wrecked["eval_corrected"]) < float(preset_row["eval_corrected"])
    preset = yaml.safe_load((run / "best.yaml").read_text())
    assert preset == best and set(preset) == {"task", "model", "steps", "beta", "tau", "gamma", "k", "lr"}
    train, _ = load_script("jobs/align.py").parse_args(["--task", "ocr", "--config", str(run / "best.yaml")])
    assert (train.beta, train.k, train.lr) == (best["beta"], best["k"], best["lr"])
    assert preset_row["checkpoint"] and (run / "best_lora" / "pytorch_lora_weights.safetensors").is_file()
    assert yaml.safe_load((run / "best_lora" / "config.yaml").read_text())["lr"] == best["lr"]

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


def test_a_cluster_runs_only_the_trials_it_can_hold_and_refuses_a_trial_larger_than_itself(capsys):
    two_workers = TrainConfig(num_workers=2, use_gpu=False)  # a trial: 0.25 CPU driver, 2 x 1 CPU workers, 0.25 reader
    asked = SweepSettings(max_concurrent_trials=2)
    assert concurrent_trials(two_workers, asked, ClusterCapacity({"CPU": 4.0})) == 1
    assert "1 trial(s) at once instead of 2" in capsys.readouterr().out
    assert concurrent_trials(two_workers, asked, ClusterCapacity({"CPU": 5.0})) == 2
    # A cluster that can grow is held to its ceiling, not to what it has now.
    assert concurrent_trials(two_workers, asked, ClusterCapacity({"CPU": 3.0}, ceiling={"CPU": 64.0})) == 2
    on_gpus = dataclasses.replace(two_workers, use_gpu=None)  # None: GPUs when the cluster has them
    assert concurrent_trials(on_gpus, SweepSettings(max_concurrent_trials=8),
                             ClusterCapacity({"CPU": 64.0, "GPU": 4.0})) == 2
    with pytest.raises(ResourcePlanError, match=r"sweep \(1 trial\(s\) at once\) \{CPU: 2.5\}.*--num-workers"):
        concurrent_trials(two_workers, asked, ClusterCapacity({"CPU": 2.0}))


def test_k_choices_above_the_images_generated_per_prompt_are_refused_before_any_work(load_script, capsys):
    with pytest.raises(SystemExit):
        load_script("tune/sweep.py").parse_args(["--task", "ocr", "--k-gen", "4", "--k", "3", "--k-choices", "2,6"])
    assert "k (6) is larger than k_gen (4)" in capsys.readouterr().err
