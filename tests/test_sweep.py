"""Sweep settings and the trials a cluster can hold; the sweep itself runs in tests/test_cluster_jobs.py, submitted
to a Ray head as users run it."""

import dataclasses

import pytest

from gdro_ray.config import TrainConfig
from gdro_ray.resource_plan import ClusterCapacity, ResourcePlanError
from gdro_ray.sweep import SweepSettings, concurrent_trials


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
