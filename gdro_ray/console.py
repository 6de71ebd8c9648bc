"""What a job prints: a progress bar per stage, one metric line per log interval, and no library chatter.

By default Ray's worker output does not reach the console (Ray Train, Ray Data, DeepSpeed, transformers and
diffusers print pages of it) and the libraries in this process log errors only. Stages that run in Ray
workers send their progress to the driver through a queue (StageConsole): training's bar and metric lines
come from rank 0 only, once.
--verbose (GDRO_VERBOSE=1) shows everything. TensorBoard and the run directory get every metric either way.
"""

import logging
import os
import threading

from tqdm import tqdm

VERBOSE_VARIABLE = "GDRO_VERBOSE"
LIBRARY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "deepspeed", "DeepSpeed", "torch.distributed")
# Environment of every Ray worker: the libraries read it when they load, before any of our code runs.
# Tune's newer console prints its experiment box and each failed trial's metrics table at any verbosity; the
# older one keeps quiet at verbose=0 (the sweep prints its own lines).
QUIET_ENVIRONMENT = {"RAY_DATA_LOG_LEVEL": "ERROR", "TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error",
                     "HF_HUB_DISABLE_PROGRESS_BARS": "1", "RAY_AIR_NEW_OUTPUT": "0"}
SHOWN_METRICS = {"loss": "loss", "top1_agreement": "top1", "rollout_reward": "rollout reward",
                 "eval_reward": "eval reward", "eval_geneval": "eval GenEval", "eval_corrected": "eval corrected",
                 "samples_per_second": "samples/s"}


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_VARIABLE) == "1"


def set_verbose(verbose: bool) -> None:
    """The jobs' --verbose: for this process and every Ray worker started after it."""
    os.environ[VERBOSE_VARIABLE] = "1" if verbose else "0"
    if verbose:  # undo the quiet start gdro_ray/__init__.py gave transformers
        os.environ.pop("TRANSFORMERS_VERBOSITY", None)
        import transformers.utils.logging

        transformers.utils.logging.set_verbosity_warning()
    quiet_libraries()


def worker_environment() -> dict:
    """Environment variables for Ray's runtime_env."""
    return {VERBOSE_VARIABLE: "1" if is_verbose() else "0", **({} if is_verbose() else QUIET_ENVIRONMENT)}


def quiet_libraries() -> None:
    """Library logs below errors and their progress bars off, unless verbose; called in every process we start."""
    if is_verbose():
        return
    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    import diffusers.utils.logging
    import transformers.utils.logging

    for library in (transformers.utils.logging, diffusers.utils.logging):
        library.set_verbosity_error()
        library.disable_progress_bar()


def metric_line(step: int, total: int, metrics: dict) -> str:
    """'step 20/300  loss 1.713  top1 0.500  samples/s 14.9': the metrics a person follows, in one line."""
    shown = [f"{label} {metrics[name]:.4g}" for name, label in SHOWN_METRICS.items() if name in metrics]
    return "  ".join([f"step {step}/{total}", *shown])


class StageConsole:
    """A stage's progress bar and metric lines on the driver, fed from Ray workers through a queue.

    Used as a context around the stage; its `remote` (a StageProgress) travels to the workers, which report
    through it. A thread here draws what arrives."""

    def __init__(self, total: int, description: str, unit: str):
        import ray
        from ray.util.queue import Queue
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # A queue actor of no CPU (the stages' plans leave none spare on a small cluster) on the driver's own node:
        # on a worker node it would go with that node, and every report through it after (benchmarks/faults.py).
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
        self.remote = StageProgress(self.queue)
        self.bar = tqdm(total=total, desc=description, unit=unit, dynamic_ncols=True, delay=0.1)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._draw, daemon=True)

    def __enter__(self) -> "StageConsole":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        self.thread.join(timeout=10)
        self.bar.close()
        self.queue.shutdown()

    def _draw(self) -> None:
        while not (self.stopped.is_set() and self.queue.empty()):
            try:
                kind, *content = self.queue.get(timeout=0.5)
            except Exception:  # queue.Empty, or the queue actor gone at shutdown
                if self.stopped.is_set():
                    break
                continue
            if kind == "advance":
                self.bar.update(content[0])
            elif kind == "message":
                self.bar.write(content[0])
            else:  # metrics at a step
                step, total, metrics = content
                self.bar.update(step - self.bar.n)
                if "loss" in metrics:
                    self.bar.set_postfix_str(f"loss {metrics['loss']:.4g}")
                self.bar.write(metric_line(step, total, metrics))


class StageProgress:
    """The worker side of a StageConsole. Without one (a sweep's trials) it prints, which the console shows
    with --verbose; silent, it says nothing (training ranks other than 0)."""

    def __init__(self, queue=None, silent: bool = False):
        self.queue, self.silent = queue, silent

    def advance(self, count: int = 1) -> None:
        if self.queue is not None and not self.silent:
            self._put(("advance", count))

    def metrics(self, step: int, total: int, metrics: dict) -> None:
        self._send(("metrics", step, total, metrics), metric_line(step, total, metrics))

    def message(self, text: str) -> None:
        self._send(("message", text), text)

    def _send(self, item, text: str) -> None:
        if self.silent:
            return
        if self.queue is None:
            print(text, flush=True)
        else:
            self._put(item)

    def _put(self, item) -> None:
        from ray.exceptions import RayActorError

        try:
            self.queue.put_nowait(item)
        except RayActorError:  # the driver's console is gone: the work goes on without it
            self.queue, self.silent = None, True


def add_verbose_argument(parser) -> None:
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's, DeepSpeed's, transformers' and diffusers' own output")
