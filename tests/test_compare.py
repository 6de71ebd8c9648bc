"""The compare job: its plan of runs, its table, and a small comparison end to end with resume."""

import csv
import json

import pytest

from gdro_ray.compare import (CompareSettings, RunSpec, needs_reference_cache, parse_grid, plan_runs, results_table,
                              run_config)
from gdro_ray.compute_report import ComputeCurve
from gdro_ray.config import TrainConfig
from test_align import SMALL


def test_a_grid_varies_one_field_at_a_time_and_skips_the_presets_own_value():
    configs = {"gdro": TrainConfig(k=6, gamma=0.5), "dpo": TrainConfig(objective="dpo", k=6, gamma=0.0)}
    settings = CompareSettings(methods=("gdro", "dpo"), seeds=2, grid=("k=2,6", "gamma=0,0.5"))
    runs = plan_runs(configs, settings)
    labels = [run.label for run in runs if run.seed == 0]
    assert labels == ["gdro", "gdro-k2", "gdro-gamma0.0", "dpo", "dpo-k2", "dpo-gamma0.5"]
    assert len(runs) == 2 * len(labels) and len(set(runs)) == len(runs)
    assert RunSpec("gdro", 1, "k", 2).name == "gdro-k2-seed1" and RunSpec("gdro", 1, "k", 2).setting == "k=2"
    assert parse_grid("beta=5,20") == ("beta", (5.0, 20.0))


def test_the_shared_dataset_carries_the_reference_cache_when_a_run_trains_on_it_or_it_was_made_with_one():
    configs = {"dgpo": TrainConfig(objective="dgpo"), "sft": TrainConfig(objective="sft")}
    plain = [run_config(configs, spec) for spec in plan_runs(configs, CompareSettings(methods=("dgpo", "sft")))]
    gridded = CompareSettings(methods=("dgpo", "sft"), grid=("reference=cached",))
    assert not needs_reference_cache(plain, made=None)
    assert not needs_reference_cache(plain, made={"identity": {"model": "tiny"}})
    assert needs_reference_cache([run_config(configs, spec) for spec in plan_runs(configs, gridded)], made=None)
    assert needs_reference_cache(plain, made={"identity": {"reference_cache": {"draws": 2}}})  # an earlier command's


@pytest.mark.parametrize("settings, message", [
    (dict(methods=("gdro", "ppo")), "methods must be among"),
    (dict(seeds=0), "seeds must be >= 1"),
    (dict(grid=("k=2,x",)), "k takes int values"),
    (dict(grid=("kk=2",)), "FIELD=V1,V2"),
    (dict(grid=("objective=dpo",)), "FIELD=V1,V2"),
])
def test_bad_settings_are_named(settings, message):
    with pytest.raises(ValueError, match=message):
        CompareSettings(**settings)


def test_the_table_gives_mean_and_standard_error_over_seeds():
    rows = [{"method": "gdro", "setting": "preset", "reward": r, "quality": 3.0, "corrected": 0.2 + r,
             "reward_change": r - 0.3, "geneval": None, "train_seconds": 100.0} for r in (0.4, 0.5, 0.6)]
    table = results_table(rows, {"reward": 0.3, "quality": 3.0, "corrected": 0.2})
    line = next(line for line in table.splitlines() if line.startswith("| gdro"))
    assert "| 3 |" in line and "0.500 ± 0.058" in line  # sd 0.1 over sqrt(3)
    assert table.splitlines()[2].startswith("| base |") and "GenEval" not in table


def test_a_small_comparison_shares_its_data_and_reads_finished_runs_back(local_ray, load_script, tmp_path, capsys):
    compare = load_script("jobs/compare.py")
    out = tmp_path / "compare"
    rows = compare.main(["--task", "ocr", "--out", str(out), "--methods", "dgpo", "--seeds", "1", *SMALL])
    assert [(row["method"], row["setting"]) for row in rows] == [("dgpo", "preset")]
    for path in ("groups/manifest.json", "eval_set/eval_set.json", "base/base.json", "results.csv", "results.md",
                 "curves.png", "runs/dgpo-seed0/eval/aligned.json", "runs/dgpo-seed0/train/lora/config.yaml"):
        assert (out / path).is_file(), path
    assert "objective: dgpo" in (out / "runs/dgpo-seed0/train/lora/config.yaml").read_text()
    base, lora = out / "base" / "base.json", out / "runs/dgpo-seed0/train/lora/pytorch_lora_weights.safetensors"
    written = {path: path.stat().st_mtime_ns for path in (base, lora)}
    capsys.readouterr()

    # A second command into the same directory with a second method: the finished run is read back, the new
    # method trains on the same dataset, and the tables hold both.
    rows = compare.main(["--task", "ocr", "--out", str(out), "--methods", "dgpo,sft", "--seeds", "1", *SMALL])
    log = capsys.readouterr().out
    assert "groups: complete" in log and "run 1/2" not in log and "run 2/2: sft-seed0" in log
    assert all(path.stat().st_mtime_ns == mtime for path, mtime in written.items())
    assert [row["label"] for row in rows] == ["dgpo", "sft"]
    with open(out / "results.csv") as handle:
        table = list(csv.DictReader(handle))
    # 4 steps of 1 worker x 2 groups x k members, each a policy forward and a backward, and a reference forward
    # unless the run, as sft, runs no reference
    assert [int(row["train_forward_passes"]) for row in table] == [4 * 2 * 3 * 4, 4 * 2 * 3 * 3]
    assert "| sft | preset | 1 |" in (out / "results.md").read_text() and not list(out.glob("curves-*.png"))
    # A compare run against compute: its shared dataset's cost before step 0.
    curve = ComputeCurve.of_run(out / "runs/sft-seed0")
    generation = json.loads((out / "groups/manifest.json").read_text())["counts"]["compute"]["forward_passes"]
    assert curve.forward_passes[0] == generation and curve.forward_passes[-1] == generation + 4 * 2 * 3 * 3
    assert (curve.final["reward"], curve.final["reward_change"]) == (rows[1]["reward"], rows[1]["reward_change"])


def test_objective_is_refused_in_favour_of_methods(load_script, capsys):
    with pytest.raises(SystemExit):
        load_script("jobs/compare.py").parse_args(["--task", "ocr", "--objective", "dpo"])
    assert "--methods" in capsys.readouterr().err
