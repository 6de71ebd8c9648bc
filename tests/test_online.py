"""The online baseline end to end on the tiny model: Flow-GRPO's first step at ratio 1 and KL 0, the meter, resume."""

import shutil

import pytest

from gdro_ray.compute_report import ComputeCurve
from gdro_ray.plots import read_scalars

SMALL = ["--num-prompts", "4", "--images-per-prompt", "4", "--prompts-per-step", "2", "--sample-steps", "3",
         "--num-steps", "4", "--num-workers", "1", "--checkpoint-every", "1", "--eval-every", "2", "--log-every", "1",
         "--train-eval-prompts", "2", "--train-eval-images-per-prompt", "2", "--eval-prompts", "2",
         "--eval-images", "4", "--warmup-steps", "0"]


@pytest.fixture
def online_job(load_script):
    return load_script("jobs/online.py")


def test_a_small_online_run_meters_its_work_and_resumes(local_ray, online_job, tmp_path, capsys):
    run = tmp_path / "online"
    summary = online_job.main(["--task", "geneval", "--out", str(run), "--steps", "2", *SMALL])
    for path in ("prompt_set/eval_set.json", "eval_set/eval_set.json", "train/lora/pytorch_lora_weights.safetensors",
                 "eval/summary.json", "eval/comparison.png", "eval_curve.png", "summary.json"):
        assert (run / path).is_file(), path
    for name in ("base", "aligned"):
        assert summary[name]["images"] == 4
    # Per step, 2 prompts of 4 images: 3 SDE steps sampled; 2 of the 3 transitions trained, each a policy forward,
    # a reference forward and a backward (two forwards); every image scored.
    compute = summary["compute"]["total"]
    assert compute["forward_passes"] == 2 * (2 * 4 * 3 + 2 * 2 * 4 * 4) and compute["reward_calls"] == 2 * 8
    assert set(compute["seconds"]) == {"generation", "scoring", "training"}
    scalars = read_scalars(run / "train" / "tensorboard")
    # The first step trains on the policy that sampled: every ratio is 1 and, with a fresh LoRA, the KL is 0.
    assert scalars["train/ratio"][1][0] == pytest.approx(1.0, abs=1e-6)
    assert scalars["train/clipped"][1][0] == 0.0 and scalars["train/kl"][1][0] == 0.0
    assert scalars["train/kl"][1][1] > 0  # the LoRA moved after one optimiser step
    assert "eval/reward" in scalars and "train/rollout_reward" in scalars
    curve = ComputeCurve.of_run(run)  # held-out scores at the evaluation steps, with the compute spent by then
    assert curve.steps == [0, 2] and curve.forward_passes == [0, compute["forward_passes"]]
    capsys.readouterr()

    # As if stopped after the checkpoint of step 2 and asked for one more step: training resumes from it.
    shutil.rmtree(run / "train" / "lora")
    shutil.rmtree(run / "eval")
    again = online_job.main(["--task", "geneval", "--out", str(run), "--steps", "3", *SMALL])
    console = capsys.readouterr()
    assert "resumed at step 2" in console.out + console.err
    steps, starts = read_scalars(run / "train" / "tensorboard")["train/attempt_start_step"]
    assert steps[-1] == 3 and starts[-1] == 2
    # the meter goes on from the checkpoint: one more step's work
    assert again["compute"]["total"]["forward_passes"] == 3 * (2 * 4 * 3 + 2 * 2 * 4 * 4)


def test_bad_online_settings_are_named(online_job, capsys):
    for argv, message in ((["--clip-range", "0"], "clip_range must be > 0"),
                          (["--images-per-prompt", "1"], "images_per_prompt must be >= 2"),
                          (["--method", "dance-grpo"], "method must be one of")):
        with pytest.raises(SystemExit):
            online_job.parse_args(["--task", "ocr", *argv])
        assert message in capsys.readouterr().err
