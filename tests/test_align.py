"""The align job end to end on the embedded tiny model, at tiny sizes: stages, run directory, resume."""

import hashlib
import json

import pytest

from gdro_ray.compute_report import ComputeCurve, compute_report
from gdro_ray.config import read_yaml
from gdro_ray.plots import read_scalars

SMALL = ["--num-prompts", "8", "--k-gen", "4", "--num-steps", "4", "--steps", "4", "--k", "3",
         "--num-workers", "1", "--groups-per-step", "2", "--checkpoint-every", "2", "--eval-every", "2",
         "--train-eval-prompts", "2", "--eval-prompts", "2", "--eval-images", "4"]


@pytest.fixture
def align_job(load_script):
    return load_script("jobs/align.py")


def test_a_small_align_run_in_two_rounds_fills_its_run_directory_and_a_rerun_skips_every_stage(
        local_ray, align_job, tmp_path, capsys):
    """Two rounds: round 2 trains on the split's next prompts, generated with round 1's policy, which is also its
    cached reference."""
    run = tmp_path / "run"
    arguments = ["--task", "geneval", "--out", str(run), "--rounds", "2", "--round-prompts", "new", "--reference",
                 "cached", "--round-reference", "previous", "--log-every", "1", *SMALL]
    summary = align_job.main(arguments)

    for path in ("groups/manifest.json", "round-2/groups/manifest.json", "eval_set/eval_set.json",
                 "train/lora/pytorch_lora_weights.safetensors", "train/lora/config.yaml", "round-1/lora/config.yaml",
                 "training_curves.png", "eval_curve.png", "eval/base.json", "eval/base.csv", "eval/aligned.json",
                 "eval/aligned.csv", "eval/summary.json", "eval/comparison.png", "summary.json"):
        assert (run / path).is_file(), path
    assert set(summary) == {"base", "aligned", "change", "judge", "held_out", "compute", "pictures"}
    first, second = (json.loads((directory / "manifest.json").read_text())
                     for directory in (run / "groups", run / "round-2" / "groups"))
    assert "lora" not in first["identity"] and second["identity"]["first_prompt"] == 8  # the split's next 8
    lora = run / "round-1" / "lora" / "pytorch_lora_weights.safetensors"
    assert second["identity"]["lora"]["sha256"] == hashlib.sha256(lora.read_bytes()).hexdigest()[:16]
    # Round 2's reference is round 1's policy, cached with its groups.
    assert second["identity"]["reference_cache"]["lora"] == second["identity"]["lora"]
    assert read_yaml(run / "round-2" / "lora" / "config.yaml")["reference_lora"] == str(lora.parent)
    # The steps are shared out (2 a round, one training run resumed).
    scalars = read_scalars(run / "train" / "tensorboard")
    assert scalars["train/attempt_start_step"][0][-1] == 4 and scalars["train/attempt_start_step"][1][-1] == 2
    # Round 2's first report (step 3) carries the held-out scores its checkpoint was saved with, as an
    # uninterrupted run's would: a sweep's scheduler reads them from every report.
    steps, corrected = scalars["train/eval_corrected"]
    assert steps == [1, 2, 3, 4] and corrected[2] == corrected[1]

    # The meter, counted: each dataset's 4 sampler steps per image and the cache's 8 draws per image, both rounds
    # summed; 4 steps of 2 groups x 3 members, each a policy forward and a backward (two forwards), the reference
    # read from the cache.
    generation = [manifest["counts"]["compute"]["forward_passes"] for manifest in (first, second)]
    assert generation[0] == first["counts"]["groups"] * 4 * (4 + 8)
    compute = summary["compute"]
    assert compute["generation"]["forward_passes"] == sum(generation)
    assert compute["generation"]["reward_calls"] == (first["counts"]["groups"] + second["counts"]["groups"]) * 4
    assert compute["training"]["forward_passes"] == 4 * 2 * 3 * 3 and compute["training"]["seconds"]["training"] > 0
    assert compute["total"]["forward_passes"] == sum(generation) + 72
    # Against compute: the first dataset's cost comes before step 0, round 2's after step 2, where round 1 stopped.
    curve = ComputeCurve.of_run(run)
    assert curve.steps == [0, 2, 4]
    assert curve.forward_passes == [generation[0], generation[0] + 36, sum(generation) + 72]
    assert curve.final["reward_change"] == summary["change"]["reward"]["mean"]  # paired against the base
    report = compute_report({"gdro": [run], "again": [run]}, tmp_path / "compute")
    assert "gdro reached again's last held-out reward" in report and (tmp_path / "compute" / "compute.png").is_file()
    assert "gdro's final reward change" in report and "is at least again's" in report  # the same runs: equal
    for name in ("base", "aligned"):
        assert summary[name]["images"] == 4 and 1.0 <= summary[name]["quality"] <= 5.0
    assert json.loads((run / "summary.json").read_text())["aligned"] == summary["aligned"]
    # GenEval's own metric beside the partial-credit reward, at the end and during training
    assert set(summary["base"]["geneval"]) == {"overall", "per_tag", "images"}
    assert "eval/geneval" in scalars
    final = run / "train" / "lora" / "pytorch_lora_weights.safetensors"
    written = final.stat().st_mtime_ns
    console = capsys.readouterr()
    # One metric line per reported step, from rank 0 only; no library output, no raw reports.
    assert [line.split("  ")[0] for line in console.out.splitlines() if line.startswith("step ")] == \
        ["step 1/4", "step 2/4", "step 3/4", "step 4/4"]
    assert "TrainingReport" not in console.out + console.err and "DeepSpeed" not in console.out + console.err

    again = align_job.main(arguments)
    log = capsys.readouterr().out
    assert "groups: complete" in log and "training: complete" in log
    assert final.stat().st_mtime_ns == written
    assert again["aligned"] == summary["aligned"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--task", "poetry"], "--task must be one of"),
        (["--task", "ocr", "--config", "/no/such/config.yaml"], "/no/such/config.yaml"),
        (["--task", "ocr", "--k-gen", "1"], "k_gen"),
        (["--task", "ocr", "--rounds", "2", "--round-reference", "previous"], "add --reference cached"),
    ],
)
def test_bad_arguments_stop_with_a_message_naming_them(argv, message, align_job, capsys):
    with pytest.raises(SystemExit):
        align_job.parse_args(argv)
    assert message in capsys.readouterr().err


def test_a_config_field_of_the_wrong_type_is_named(align_job, tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("beta: high\n")
    with pytest.raises(SystemExit):
        align_job.parse_args(["--task", "ocr", "--config", str(config)])
    err = capsys.readouterr().err
    assert "'beta'" in err and "float" in err


def test_an_evaluation_set_missing_its_settings_is_refused_by_name(tmp_path):
    from gdro_ray.periodic_eval import EMBEDDINGS_FILE, SETTINGS_FILE, load_eval_set

    (tmp_path / SETTINGS_FILE).write_text(json.dumps({"seeds": [[10000, 10001]], "prompts": []}))
    (tmp_path / EMBEDDINGS_FILE).write_bytes(b"")
    with pytest.raises(ValueError, match=r"lacks \['held_out', 'judge'\]"):
        load_eval_set(tmp_path)


def test_k_gen_defaults_to_the_models_own(align_job):
    assert align_job.parse_args(["--task", "ocr"])[1].k_gen == 8  # the tiny world's measured size
    _, settings = align_job.parse_args(["--task", "ocr", "--model", "black-forest-labs/FLUX.1-dev"])
    assert settings.k_gen == 16  # the paper's
    assert align_job.parse_args(["--task", "ocr", "--k-gen", "12"])[1].k_gen == 12

