"""The console: progress from Ray workers reaches the driver once, and libraries stay quiet unless asked."""

import logging
import os

import pytest
import ray
import transformers.utils.logging

from gdro_ray.console import StageConsole, StageProgress, is_verbose, metric_line, set_verbose


@ray.remote(num_cpus=0)
def report_steps(progress: StageProgress, steps: int) -> None:
    for step in range(1, steps + 1):
        progress.metrics(step, steps, {"loss": 1.0 / step, "top1_agreement": 0.5, "grad_norm": 2.0})
    progress.message("done")


def test_a_workers_metric_lines_reach_the_driver_once_and_move_the_bar(local_ray, capsys):
    with StageConsole(total=3, description="train", unit="step") as console:
        ray.get(report_steps.remote(console.remote, 3))
    out = capsys.readouterr().out.splitlines()
    assert [line for line in out if line.startswith("step ")] == [
        "step 1/3  loss 1  top1 0.5", "step 2/3  loss 0.5  top1 0.5", "step 3/3  loss 0.3333  top1 0.5"]
    assert out.count("done") == 1 and console.bar.n == 3


def test_a_silent_progress_says_nothing_and_one_without_a_console_prints(capsys):
    StageProgress(silent=True).metrics(1, 2, {"loss": 0.5})
    StageProgress(silent=True).advance()
    assert capsys.readouterr().out == ""
    StageProgress().message("resumed at step 4")
    assert capsys.readouterr().out == "resumed at step 4\n"
    assert metric_line(5, 10, {"eval_reward": 0.25, "samples_per_second": 12.5}) == \
        "step 5/10  eval reward 0.25  samples/s 12.5"


@pytest.fixture
def restore_verbosity():
    saved = {name: os.environ.get(name) for name in ("GDRO_VERBOSE", "TRANSFORMERS_VERBOSITY")}
    yield
    for name, value in saved.items():
        os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)
    set_verbose(is_verbose())


def test_libraries_log_errors_only_unless_verbose(restore_verbosity):
    set_verbose(False)
    assert transformers.utils.logging.get_verbosity() == logging.ERROR
    assert logging.getLogger("ray.train").level == logging.ERROR and logging.getLogger("deepspeed").level == logging.ERROR
    set_verbose(True)
    assert transformers.utils.logging.get_verbosity() == logging.WARNING and is_verbose()
