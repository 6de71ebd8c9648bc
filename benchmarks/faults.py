"""Faults at cluster scale, simulated on one machine: worker nodes removed and added while the group dataset
is generated, while a LoRA trains and while a sweep runs, and the driver killed; after each trial the invariants
are checked.

The cluster is Ray's own multi-node simulation (ray.cluster_utils.Cluster): a head and worker nodes, each a
raylet of its own, so removing a node kills every actor and worker on it as a lost spot instance would. The
jobs run as they do on a real cluster, as drivers joining it through RAY_ADDRESS. Each trial draws its stage,
how many faults and when from --seed; its result is one line of OUT/trials.jsonl, so a rerun goes on from the
first trial without one.

    python benchmarks/faults.py --trials 10 --seed 0 --out runs/faults

Trials cycle through the stages:
  generation        jobs/generate.py; worker nodes removed after the first shard, a fresh node added back
  generation-driver the generation driver killed after the first shard, then the same command rerun
  training          jobs/train.py, elastic (--num-workers 1 --max-workers 2); nodes removed after a checkpoint
  training-driver   the training driver killed after a checkpoint, then the same command rerun (it resumes)
  sweep             tune/sweep.py (its own small dataset, trials one after another); nodes removed once a trial
                    has checkpointed
Invariants: every prompt written once (lost, duplicated), every training run finished (in a sweep: every trial
to its last step, none errored, the best trial's settings and LoRA written), the steps trained twice
after a restart (at most --checkpoint-every a restart), and the LoRA's largest difference from an uninterrupted
run of the same settings (the uninterrupted run is repeated once to show its own spread: 0 when the run is
deterministic).
"""

import argparse
import csv
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ray.cluster_utils import Cluster
from safetensors.torch import load_file

from gdro_ray.data.shards import read_shards, shard_paths
from gdro_ray.models import LORA_WEIGHTS

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("generation", "generation-driver", "training", "training-driver", "sweep")
STEP_LINE = re.compile(r"^step (\d+)/\d+ ", re.MULTILINE)
RESUMED_LINE = re.compile(r"resumed at step (\d+) on (\d+) workers?", re.MULTILINE)


@dataclass
class Sizes:
    """How large each trial's work is: small enough for a CI test at the smallest."""

    prompts: int = 16
    k: int = 3
    sampler_steps: int = 2
    train_steps: int = 24
    checkpoint_every: int = 4
    fault_delay: float = 5.0  # the longest random wait before a fault once the stage is under way
    most_node_losses: int = 2  # a node-loss trial removes between one and this many nodes
    # In elastic training a removed node returns only once the run has resumed without it: it shrinks, then grows.
    back_after_resume: bool = True
    sweep_trials: int = 2

    def generate_command(self, out: Path) -> list[str]:
        return ["jobs/generate.py", "--task", "ocr", "--num-prompts", str(self.prompts), "--k", str(self.k),
                "--num-steps", str(self.sampler_steps), "--prompts-per-batch", "1", "--out", str(out), "--no-progress"]

    def sweep_command(self, out: Path) -> list[str]:
        """Two trials of the full length (no early stop), evaluated at each checkpoint as ASHA needs."""
        return ["tune/sweep.py", "--task", "ocr", "--out", str(out), "--num-prompts", str(self.prompts), "--k-gen",
                str(self.k), "--num-steps", str(self.sampler_steps), "--k", str(self.k), "--steps",
                str(self.train_steps), "--groups-per-step", "2", "--num-workers", "1", "--checkpoint-every",
                str(self.checkpoint_every), "--eval-every", str(self.checkpoint_every), "--train-eval-prompts", "2",
                "--train-eval-images-per-prompt", "2", "--eval-prompts", "2", "--eval-images", "2",
                "--num-samples", str(self.sweep_trials), "--grace-period", str(self.train_steps),
                "--k-choices", str(self.k), "--max-failures", "4"]

    def train_command(self, data: Path, storage: Path, name: str, elastic: bool = True) -> list[str]:
        workers = ["--num-workers", "1", "--max-workers", "2", "--resize-check-s", "5"] if elastic else \
            ["--num-workers", "2"]
        return ["jobs/train.py", "--data", str(data), "--task", "ocr", "--k", str(self.k), "--steps",
                str(self.train_steps), "--groups-per-step", "2", *workers,
                "--checkpoint-every", str(self.checkpoint_every), "--log-every", "1", "--max-failures", "4",
                "--storage-path", str(storage), "--name", name, "--seed", "0"]


class LocalCluster:
    """A head without CPUs for work (as on a cluster whose head only coordinates) and worker nodes of one CPU
    each, every node its own raylet on this machine: every generation actor and training worker is on a worker
    node, so a node removed always takes some of them with it."""

    def __init__(self, worker_nodes: int = 2):
        # A lost node is noticed after 2 missed health checks a second apart (Ray's default waits about 30 s).
        # A node keeps as many idle worker processes as it has CPUs (Ray's soft limit): on a node of one CPU that
        # holds a training worker, every Ray Data read would start (and import) a fresh process, about 14 s each.
        # Cluster nodes have dozens of CPUs; these one-CPU stand-ins keep four like them.
        # The dashboard runs, as on a real cluster's head: Ray Train frees the placement group of a run whose
        # controller died (a sweep trial's, its node lost) through the dashboard's state API; without it the group
        # stays reserved and the sweep's next trials wait for workers that never fit.
        system = {"health_check_period_ms": 1000, "health_check_failure_threshold": 2, "num_workers_soft_limit": 4}
        self.cluster = Cluster(initialize_head=True, connect=False,
                               head_node_args=dict(num_cpus=0, include_dashboard=True, dashboard_port=0,
                                                   _system_config=system))
        self.workers = [self.cluster.add_node(num_cpus=1) for _ in range(worker_nodes)]
        self.cluster.wait_for_nodes()

    def job(self, arguments: list[str], log: Path) -> subprocess.Popen:
        """A driver joining this cluster, in a process group of its own (so it can be killed alone), its console
        appended to log (a file: a pipe nobody reads would stop the job once full)."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a") as console:
            return subprocess.Popen([sys.executable, *arguments], cwd=ROOT, stdout=console, stderr=subprocess.STDOUT,
                                    env={**os.environ, "RAY_ADDRESS": self.cluster.address}, start_new_session=True)

    def remove_worker(self, rng: random.Random) -> None:
        self.cluster.remove_node(self.workers.pop(rng.randrange(len(self.workers))))

    def add_worker(self) -> None:
        self.workers.append(self.cluster.add_node(num_cpus=1))
        self.cluster.wait_for_nodes()

    def shutdown(self) -> None:
        self.cluster.shutdown()


def wait_until(ready, process: subprocess.Popen, timeout: float = 600) -> bool:
    """Poll ready() until it holds; False when the job ended or the time ran out first."""
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def finish(process: subprocess.Popen, log: Path, timeout: float = 1800) -> tuple[int, str]:
    """The job's exit code and its whole console (every attempt written to the log)."""
    code = process.wait(timeout=timeout)
    return code, log.read_text(errors="replace")


def remove_and_add_nodes(cluster: LocalCluster, process: subprocess.Popen, rng: random.Random, faults: int,
                         ready, delay: float, resumptions=None) -> int:
    """Once ready() holds: `faults` times, a random wait, a worker node removed, a fresh one added a few seconds
    later, or, given resumptions() (how many attempts have resumed so far), once one more has. Returns how many
    nodes were removed before the job ended."""
    removed = 0
    if not wait_until(ready, process):
        return 0
    for _ in range(faults):
        time.sleep(rng.uniform(0.0, delay))
        if process.poll() is not None:
            break
        before = resumptions() if resumptions else 0
        cluster.remove_worker(rng)
        removed += 1
        time.sleep(rng.uniform(2.0, 10.0))
        if resumptions:
            wait_until(lambda: resumptions() > before, process)
        cluster.add_worker()
    return removed


def kill_driver(process: subprocess.Popen, rng: random.Random, ready, delay: float) -> int:
    """Once ready() holds and a random wait has passed, the driver's process group killed (the cluster stays)."""
    if not wait_until(ready, process):
        return 0
    time.sleep(rng.uniform(0.0, delay))
    if process.poll() is not None:
        return 0
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return 1


def prompt_counts(out: Path, prompts: int) -> dict:
    ids = read_shards(out, columns=["prompt_id"]).column("prompt_id").to_pylist() if shard_paths(out) else []
    return {"prompts_lost": prompts - len(set(ids)), "prompts_duplicated": len(ids) - len(set(ids))}


def steps_repeated(output: str) -> tuple[int, list[int]]:
    """From the console (a metric line every step): the steps trained again after restarts (a step reported
    again, whether the attempt resumed from a checkpoint or began afresh), and the workers of each attempt that
    resumed from a checkpoint."""
    steps = [int(match.group(1)) for match in STEP_LINE.finditer(output)]
    repeated = sum(1 for index, step in enumerate(steps) if step <= max(steps[:index], default=0))
    return repeated, [int(match.group(2)) for match in RESUMED_LINE.finditer(output)]


def lora_difference(first: Path, second: Path) -> float:
    a, b = load_file(first / "lora" / LORA_WEIGHTS), load_file(second / "lora" / LORA_WEIGHTS)
    return max(float((a[name] - b[name]).abs().max()) for name in a)


def checkpoint_registered(run: Path) -> bool:
    """Ray Train writes its snapshot once the controller has registered a reported checkpoint."""
    return (run / "checkpoint_manager_snapshot.json").is_file()


def generation_trial(cluster: LocalCluster, rng: random.Random, sizes: Sizes, out: Path, stage: str) -> dict:
    command, log = sizes.generate_command(out), out.parent / "driver.log"
    first_shard = lambda: bool(shard_paths(out))  # noqa: E731
    process = cluster.job(command, log)
    if stage == "generation":
        faults = remove_and_add_nodes(cluster, process, rng, rng.randint(1, sizes.most_node_losses), first_shard,
                                      sizes.fault_delay)
    else:
        faults = kill_driver(process, rng, first_shard, sizes.fault_delay)
        if faults:
            process = cluster.job(command, log)
    code, output = finish(process, log)
    return {"faults": faults, "finished": code == 0, **prompt_counts(out, sizes.prompts),
            "error": output[-2000:] if code else ""}


def training_trial(cluster: LocalCluster, rng: random.Random, sizes: Sizes, data: Path, storage: Path, stage: str,
                   reference: Path | None = None) -> dict:
    command, log = sizes.train_command(data, storage, "run", elastic=stage == "training"), storage / "driver.log"
    after_a_checkpoint = lambda: checkpoint_registered(storage / "run")  # noqa: E731
    process = cluster.job(command, log)
    if stage == "training":
        resumptions = lambda: len(RESUMED_LINE.findall(log.read_text(errors="replace")))  # noqa: E731
        faults = remove_and_add_nodes(cluster, process, rng, rng.randint(1, sizes.most_node_losses),
                                      after_a_checkpoint, sizes.fault_delay,
                                      resumptions if sizes.back_after_resume else None)
    else:
        faults = kill_driver(process, rng, after_a_checkpoint, sizes.fault_delay)
        if faults:
            process = cluster.job(command, log)
    code, output = finish(process, log)
    repeated, workers = steps_repeated(output)
    finished = code == 0 and (storage / "run" / "lora" / LORA_WEIGHTS).is_file()
    compared = finished and reference is not None and stage == "training-driver"
    difference = lora_difference(storage / "run", reference) if compared else None
    return {"faults": faults, "finished": finished, "steps_repeated": repeated, "resumed_on_workers": workers,
            "lora_difference": difference, "error": output[-2000:] if not finished else ""}


def sweep_trial(cluster: LocalCluster, rng: random.Random, sizes: Sizes, out: Path) -> dict:
    command, log = sizes.sweep_command(out), out.parent / "driver.log"
    a_trial_checkpointed = lambda: any((out / "trials").glob("*/checkpoint_manager_snapshot.json"))  # noqa: E731
    process = cluster.job(command, log)
    faults = remove_and_add_nodes(cluster, process, rng, rng.randint(1, sizes.most_node_losses), a_trial_checkpointed,
                                  sizes.fault_delay)
    code, output = finish(process, log)
    rows = list(csv.DictReader((out / "results.csv").open())) if (out / "results.csv").is_file() else []
    complete = [row for row in rows if row["step"] == str(sizes.train_steps) and not row["error"]]
    written = (out / "best.yaml").is_file() and (out / "best_lora" / LORA_WEIGHTS).is_file()
    finished = code == 0 and len(complete) == sizes.sweep_trials and written
    return {"faults": faults, "finished": finished, "trials_complete": len(complete),
            "trials_errored": sum(bool(row["error"]) for row in rows), "error": output[-2000:] if not finished else ""}


def uninterrupted(cluster: LocalCluster, sizes: Sizes, out: Path) -> dict:
    """The shared dataset and two uninterrupted training runs of the fixed-size (training-driver) settings."""
    data = out / "groups"
    if not (data / "manifest.json").is_file() or not read_manifest_complete(data):
        log = out / "groups.log"
        code, output = finish(cluster.job(sizes.generate_command(data), log), log)
        if code:
            raise RuntimeError(f"generating the shared dataset failed:\n{output[-3000:]}")
    for name in ("uninterrupted", "uninterrupted-again"):
        if not (out / name / "lora" / LORA_WEIGHTS).is_file():
            log = out / f"{name}.log"
            code, output = finish(cluster.job(sizes.train_command(data, out, name, elastic=False), log), log)
            if code:
                raise RuntimeError(f"the uninterrupted run {name} failed:\n{output[-3000:]}")
    return {"data": data, "reference": out / "uninterrupted",
            "spread": lora_difference(out / "uninterrupted", out / "uninterrupted-again")}


def read_manifest_complete(data: Path) -> bool:
    return json.loads((data / "manifest.json").read_text()).get("complete", False)


def run_trial(cluster: LocalCluster, index: int, seed: int, sizes: Sizes, out: Path, shared: dict | None) -> dict:
    stage = STAGES[index % len(STAGES)]
    rng = random.Random(seed * 1000 + index)
    directory = out / f"trial-{index}"
    shutil.rmtree(directory, ignore_errors=True)  # a trial cut short starts again
    started = time.monotonic()
    if stage.startswith("generation"):
        result = generation_trial(cluster, rng, sizes, directory / "groups", stage)
    elif stage == "sweep":
        result = sweep_trial(cluster, rng, sizes, directory / "sweep")
    else:
        result = training_trial(cluster, rng, sizes, shared["data"], directory, stage, shared["reference"])
    return {"trial": index, "stage": stage, "seed": seed, "seconds": round(time.monotonic() - started, 1), **result}


def summary_table(trials: list[dict], spread: float | None) -> str:
    lines = ["| stage | trials | faults | prompts lost | prompts duplicated | runs finished | steps repeated "
             "| workers after a restart | LoRA max difference |", "|---|---|---|---|---|---|---|---|---|"]
    for stage in STAGES:
        rows = [t for t in trials if t["stage"] == stage]
        if not rows:
            continue
        total = lambda key: sum(t.get(key) or 0 for t in rows)  # noqa: E731
        differences = [t["lora_difference"] for t in rows if t.get("lora_difference") is not None]
        workers = sorted({w for t in rows for w in t.get("resumed_on_workers", [])})
        lines.append(
            f"| {stage} | {len(rows)} | {total('faults')} | "
            + (f"{total('prompts_lost')} | {total('prompts_duplicated')} | " if stage.startswith("generation")
               else "| | ")
            + f"{sum(t['finished'] for t in rows)}/{len(rows)}"
            + (f" ({total('trials_complete')} trials complete, {total('trials_errored')} errored) | "
               if stage == "sweep" else " | ")
            + (f"{total('steps_repeated')} | {', '.join(map(str, workers)) or '-'} | " if stage.startswith("training")
               else "| | ")
            + (f"{max(differences):.2e} |" if differences else "|"))
    if spread is not None:
        lines.append(f"\nTwo uninterrupted runs of the same settings differ by at most {spread:.2e} "
                     "(their own spread).")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/faults")
    parser.add_argument("--prompts", type=int, default=Sizes.prompts)
    parser.add_argument("--train-steps", type=int, default=Sizes.train_steps)
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    sizes = Sizes(prompts=args.prompts, train_steps=args.train_steps)
    record = out / "trials.jsonl"
    done = [json.loads(line) for line in record.read_text().splitlines()] if record.is_file() else []
    cluster = LocalCluster()
    try:
        shared = uninterrupted(cluster, sizes, out) if any(STAGES[i % len(STAGES)].startswith("training")
                                                             for i in range(args.trials)) else None
        for index in range(len(done), args.trials):
            result = run_trial(cluster, index, args.seed, sizes, out, shared)
            print(json.dumps({k: v for k, v in result.items() if k != "error"}), flush=True)
            if result.get("error"):
                print(result["error"], file=sys.stderr)
            with record.open("a") as file:
                file.write(json.dumps(result) + "\n")
            done.append(result)
            while len(cluster.workers) < 2:  # every trial starts on the full cluster
                cluster.add_worker()
    finally:
        cluster.shutdown()
    print(summary_table(done, shared and shared["spread"]))


if __name__ == "__main__":
    main()
