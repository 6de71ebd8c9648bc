"""The cluster path as users take it: a running Ray head of 2 CPUs with token authentication, jobs submitted
through the Jobs API with the repository as their working directory, as `ray job submit --working-dir .` does.

The head is a real `ray start --head`, so nothing here can borrow logical CPUs the machine does not have:
every stage's resource plan has to fit 2 CPUs, or the job has to say at its start that it does not.
"""

import contextlib
import csv
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml
from ray.job_submission import JobStatus, JobSubmissionClient

from conftest import free_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SMALL_RUN = ["--num-prompts", "8", "--k-gen", "4", "--k", "3", "--num-steps", "4", "--steps", "4",
             "--groups-per-step", "2", "--checkpoint-every", "2", "--eval-every", "2", "--train-eval-prompts", "2",
             "--train-eval-images-per-prompt", "2"]


@pytest.fixture(scope="module")
def ray_head():
    """`ray start --head --num-cpus 2` with token auth; yields a Jobs API client. At the end it stops this head
    only (not `ray stop`, which would stop every Ray on the machine, a user's runs included)."""
    temp = Path(tempfile.mkdtemp(prefix="gdro-head-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    token = secrets.token_hex(32)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_AUTH_MODE", "token")
        env.setenv("RAY_AUTH_TOKEN", token)
        env.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")  # the jobs' `python` is this environment's
        env.delenv("RAY_ADDRESS", raising=False)
        dashboard = free_port()
        subprocess.run([BIN / "ray", "start", "--head", "--num-cpus", "2", "--port", str(free_port()),
                        "--dashboard-port", str(dashboard), "--ray-client-server-port", str(free_port()),
                        "--dashboard-agent-listen-port", str(free_port()), "--temp-dir", str(temp),
                        "--disable-usage-stats"], check=True, capture_output=True)
        try:
            yield _client(f"http://127.0.0.1:{dashboard}", token)
        finally:
            _stop_head(temp)
            shutil.rmtree(temp, ignore_errors=True)


def _stop_head(temp: Path) -> None:
    """Kill the head's own processes: those started with its temp directory on their command line (GCS, raylet,
    dashboard, monitors); its workers and agents end with their raylet."""
    own = [process for process in psutil.process_iter(["cmdline"])
           if any(str(temp) in part for part in process.info["cmdline"] or ())]
    for process in own:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(own, timeout=30)


def _client(address: str, token: str) -> JobSubmissionClient:
    """The Jobs API, once the head's job agent answers (it starts a few seconds after the head). The token goes
    in the header itself: this process imported Ray before RAY_AUTH_MODE was set, so Ray would not add it."""
    deadline = time.monotonic() + 120
    while True:
        try:
            client = JobSubmissionClient(address, headers={"authorization": f"Bearer {token}"})
            client.list_jobs()
            return client
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(2)


def submit_and_wait(client: JobSubmissionClient, entrypoint: list[str], timeout_s: float) -> tuple[JobStatus, str]:
    job = client.submit_job(entrypoint=" ".join(entrypoint), runtime_env={"working_dir": str(REPO)})
    deadline = time.monotonic() + timeout_s
    while (status := client.get_job_status(job)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        if time.monotonic() > deadline:
            client.stop_job(job)
            pytest.fail(f"{entrypoint[:2]} still {status} after {timeout_s} s:\n{client.get_job_logs(job)[-3000:]}")
        time.sleep(3)
    return status, client.get_job_logs(job)


def test_an_align_job_submitted_to_a_2_cpu_head_finishes(ray_head, tmp_path):
    run = tmp_path / "align"
    status, logs = submit_and_wait(ray_head, ["python", "jobs/align.py", "--task", "geneval", "--out", str(run),
                                              *SMALL_RUN, "--eval-prompts", "2", "--eval-images", "4"], 600)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    # The plan it printed: the tiny preset's two training workers and their data reader within the 2 CPUs.
    assert "training {CPU: 1.75} (2 training workers x {CPU: 0.75}, 1 data reader x {CPU: 0.25})" in logs
    for path in ("groups/manifest.json", "train/lora/pytorch_lora_weights.safetensors", "eval/comparison.png",
                 "summary.json"):
        assert (run / path).is_file(), path
    summary = json.loads((run / "summary.json").read_text())
    assert summary["aligned"]["images"] == 4
    assert "corrected" in logs and f"{summary['aligned']['reward']:.3f}" in logs  # the printed table


def test_a_sweep_submitted_to_a_2_cpu_head_stops_a_trial_early_writes_a_preset_align_accepts_and_resumes(
        ray_head, load_script, tmp_path):
    run = tmp_path / "sweep"
    # The trial after the preset samples a learning rate that wrecks a LoRA in two steps: its held-out
    # corrected score at the first rung trails the preset's, and ASHA must stop it there. Glyphs, since
    # the judge rates the base's glyphs well above 3: any reward the preset keeps then counts for it.
    command = [
        "python", "tune/sweep.py", "--task", "ocr", "--out", str(run), "--num-prompts", "8", "--k-gen", "4",
        "--steps", "4", "--k", "3", "--num-workers", "1", "--groups-per-step", "2", "--warmup-steps", "0",
        "--checkpoint-every", "2", "--eval-every", "2", "--train-eval-prompts", "4", "--train-eval-images-per-prompt",
        "2", "--lr", "1e-4", "--num-samples", "2", "--grace-period", "2", "--reduction-factor", "2", "--lr-range",
        "1.0,2.0", "--k-choices", "2,3",
    ]
    status, logs = submit_and_wait(ray_head, command, 600)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    with open(run / "results.csv") as handle:
        rows = {row["lr"]: row for row in csv.DictReader(handle)}
    assert len(rows) == 2 and not any(row["error"] for row in rows.values())
    preset_row, wrecked = rows.pop("0.0001"), rows.popitem()[1]
    assert preset_row["stopped_early"] == "False" and preset_row["step"] == "4"
    assert wrecked["stopped_early"] == "True" and wrecked["step"] == "2"
    assert float(wrecked["eval_corrected"]) < float(preset_row["eval_corrected"])
    best = yaml.safe_load((run / "best.yaml").read_text())
    assert set(best) == {"task", "model", "steps", "beta", "tau", "gamma", "k", "lr"}
    train, _ = load_script("jobs/align.py").parse_args(["--task", "ocr", "--config", str(run / "best.yaml")])
    assert (train.beta, train.k, train.lr) == (best["beta"], best["k"], best["lr"])
    assert preset_row["checkpoint"] and (run / "best_lora" / "pytorch_lora_weights.safetensors").is_file()
    assert yaml.safe_load((run / "best_lora" / "config.yaml").read_text())["lr"] == best["lr"]

    # Submitted again, it restores the finished sweep instead of training again.
    checkpoints = {path: path.stat().st_mtime_ns for path in (run / "trials").rglob("*.safetensors")}
    assert checkpoints, "the trials checkpointed their LoRAs"
    status, logs = submit_and_wait(ray_head, command, 300)
    assert status == JobStatus.SUCCEEDED and "resuming the sweep" in logs, logs[-3000:]
    assert {path: path.stat().st_mtime_ns for path in (run / "trials").rglob("*.safetensors")} == checkpoints
    assert yaml.safe_load((run / "best.yaml").read_text()) == best


def test_a_comparison_and_an_online_run_submitted_to_a_2_cpu_head_finish(ray_head, tmp_path):
    compare, online = tmp_path / "compare", tmp_path / "online"
    status, logs = submit_and_wait(ray_head, ["python", "jobs/compare.py", "--task", "ocr", "--out", str(compare),
                                              "--methods", "dpo", "--seeds", "1", *SMALL_RUN, "--eval-prompts", "2",
                                              "--eval-images", "4"], 600)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert "| dpo | preset | 1 |" in (compare / "results.md").read_text()
    status, logs = submit_and_wait(ray_head, ["python", "jobs/online.py", "--task", "ocr", "--out", str(online),
                                              "--steps", "2", "--num-prompts", "4", "--images-per-prompt", "3",
                                              "--sample-steps", "2", "--num-steps", "4", "--eval-every", "2",
                                              "--train-eval-prompts", "2", "--eval-prompts", "2",
                                              "--eval-images", "4"], 600)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert json.loads((online / "summary.json").read_text())["compute"]["total"]["forward_passes"] > 0


def test_a_run_larger_than_the_head_fails_at_its_start_naming_what_is_missing(ray_head, tmp_path):
    started = time.monotonic()
    status, logs = submit_and_wait(ray_head, ["python", "jobs/align.py", "--task", "ocr", "--out", str(tmp_path),
                                              "--num-workers", "3"], 120)
    assert status == JobStatus.FAILED
    assert "training {CPU: 2.5}" in logs and "is short of {CPU: 0.5}" in logs and "--num-workers" in logs
    assert not (tmp_path / "groups").exists() and time.monotonic() - started < 120
