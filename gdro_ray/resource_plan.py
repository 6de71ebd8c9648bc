"""What each stage asks Ray for, checked against the cluster before any work starts.

A stage's plan is what it holds at once:

    generation   generation actors (1 CPU, and GPUs on GPU clusters) beside the scoring actors (1 CPU each)
    evaluation   one task at a time: encoding the held-out prompts, the final base-against-aligned evaluation
    training     the training workers (cpus_per_worker CPUs, and 1 GPU each on GPUs) and the Ray Data reader
                 that streams groups to them (reader_cpus); evaluation during training runs inside rank 0
    sweep        per concurrent trial: its Tune driver and its training plan

Stages run one after another, so a run fits a cluster that holds its largest stage. A fixed cluster (the
local Ray a job starts, or `ray start --head` without an autoscaler) must hold each stage as it stands, or
the job stops before any work, naming what is missing and the flags that lower it: Ray would otherwise wait
forever (training workers that took every CPU starved the data reader that feeds them). A cluster that can
grow declares how far (Ray's autoscaler config where Ray reports one, else the variable GROWTH_VARIABLE,
which the configs in cluster/ set); a stage larger than today's cluster asks the autoscaler for its
resources and waits, saying what for.
"""

import contextlib
import json
import os
import time
from dataclasses import dataclass

import ray

# JSON of the most resources the cluster can grow to, e.g. {"CPU": 392, "GPU": 32}: set on clusters that autoscale.
GROWTH_VARIABLE = "GDRO_CLUSTER_MAX_RESOURCES"
TRIAL_DRIVER_CPUS = 0.25  # a Tune trial's function only drives its Train run and waits on it
PLANNED = ("CPU", "GPU")  # the resources stages ask for; memory is left to Ray's own accounting


@dataclass(frozen=True)
class Demand:
    """``count`` holders of one kind (actors, workers, tasks), each asking for ``each``."""

    what: str
    count: int
    each: dict

    def describe(self) -> str:
        return f"{self.count} {self.what} x {_format(self.each)}"


@dataclass(frozen=True)
class StagePlan:
    stage: str
    demands: tuple[Demand, ...]
    lower_with: str  # the flags that make the stage smaller

    def total(self) -> dict:
        total = {}
        for demand in self.demands:
            for name, amount in demand.each.items():
                total[name] = total.get(name, 0.0) + demand.count * amount
        return {name: amount for name, amount in total.items() if amount > 0}

    def bundles(self) -> list[dict]:
        """One resource bundle per holder: what an autoscaler is asked for."""
        return [{k: v for k, v in demand.each.items() if v > 0} for demand in self.demands for _ in range(demand.count)]

    def describe(self) -> str:
        return f"{self.stage} {_format(self.total())} ({', '.join(d.describe() for d in self.demands)})"


@dataclass(frozen=True)
class ClusterCapacity:
    """The cluster's CPUs and GPUs now, and the most it can grow to (None: it cannot grow)."""

    now: dict
    ceiling: dict | None = None

    @property
    def can_grow(self) -> bool:
        return self.ceiling is not None

    @property
    def has_gpus(self) -> bool:
        return (self.ceiling or self.now).get("GPU", 0) > 0

    def missing(self, plan: StagePlan, against: dict | None = None) -> dict:
        """What the plan asks for beyond ``against`` (default: the most the cluster can ever hold)."""
        against = against if against is not None else (self.ceiling or self.now)
        return {name: amount - against.get(name, 0.0) for name, amount in plan.total().items()
                if amount > against.get(name, 0.0) + 1e-9}

    def describe(self) -> str:
        grows = f"can grow to {_format(self.ceiling)}" if self.can_grow else "cannot grow"
        return f"{_format(self.now)} now, {grows}"


class ResourcePlanError(ValueError):
    """A stage asks for more than the cluster can ever hold."""


def read_capacity() -> ClusterCapacity:
    """The connected cluster's capacity (ray.init first)."""
    now = {name: float(amount) for name, amount in ray.cluster_resources().items() if name in PLANNED}
    ceiling = _declared_ceiling()
    if ceiling is not None:  # a declaration never shrinks the cluster below what it already has
        ceiling = {name: max(ceiling.get(name, 0.0), now.get(name, 0.0)) for name in PLANNED}
    return ClusterCapacity(now, ceiling)


def uses_gpus(setting: bool | None, capacity: ClusterCapacity) -> bool:
    """An explicit setting, else GPUs whenever the cluster has or can get them."""
    return capacity.has_gpus if setting is None else setting


def generation_plan(config, capacity: ClusterCapacity) -> StagePlan:
    """A GenerationConfig's actor pools at their minimum sizes (they grow towards their maxima as room allows)."""
    gpus = config.gpus_per_generator
    if gpus is None:
        gpus = 1.0 if capacity.has_gpus else 0.0
    return StagePlan("generation", (
        Demand("generation actors", config.generation_actors[0], {"CPU": 1.0, "GPU": gpus}),
        Demand("scoring actors", config.scoring_actors[0], {"CPU": 1.0, "GPU": config.gpus_per_scorer}),
    ), "--generation-actors, --scoring-actors or --gpus-per-generator")


def evaluation_plan(use_gpu: bool) -> StagePlan:
    return StagePlan("evaluation", (Demand("evaluation task", 1, {"CPU": 1.0, "GPU": 1.0 if use_gpu else 0.0}),),
                     "--use-gpu false")


def training_plan(config, use_gpu: bool) -> StagePlan:
    """A training config's workers (the minimum of an elastic run) and, offline, its data reader."""
    workers = Demand("training workers", config.num_workers, worker_resources(config, use_gpu))
    reader_cpus = getattr(config, "reader_cpus", None)  # online training reads no dataset
    if reader_cpus is None:
        return StagePlan("training", (workers,), "--num-workers or --cpus-per-worker")
    return StagePlan("training", (workers, Demand("data reader", 1, {"CPU": reader_cpus})),
                     "--num-workers, --cpus-per-worker or --reader-cpus")


def sweep_plan(config, use_gpu: bool, trials: int) -> StagePlan:
    training = training_plan(config, use_gpu)
    driver = Demand("trial drivers", trials, {"CPU": TRIAL_DRIVER_CPUS})
    held = tuple(Demand(d.what, d.count * trials, d.each) for d in training.demands)
    return StagePlan(f"sweep ({trials} trial(s) at once)", (driver, *held),
                     f"--max-concurrent-trials or {training.lower_with}")


def worker_resources(config, use_gpu: bool) -> dict:
    return {"CPU": config.cpus_per_worker, "GPU": 1.0 if use_gpu else 0.0}


def check_plans(plans: list[StagePlan], capacity: ClusterCapacity) -> None:
    """Stop before any work when a stage asks for more than the cluster can ever hold."""
    problems = []
    for plan in plans:
        missing = capacity.missing(plan)
        if missing:
            problems.append(f"{plan.describe()} is short of {_format(missing)}: lower it with {plan.lower_with}")
    if problems:
        where = (f"this cluster can grow to at most {_format(capacity.ceiling)}" if capacity.can_grow else
                 f"this Ray cluster holds {_format(capacity.now)} and cannot grow (on an autoscaling cluster, "
                 f"declare its maximum in {GROWTH_VARIABLE}, as the configs in cluster/ do)")
        raise ResourcePlanError(f"the run does not fit: {where}.\n  " + "\n  ".join(problems))


@contextlib.contextmanager
def cluster_ready_for(plan: StagePlan, log=print, poll_seconds: float = 10.0, report_seconds: float = 60.0):
    """Within this context the cluster holds the plan: checked at once on a fixed cluster; on one that can
    grow, asked of the autoscaler and waited for (saying what for), and the request dropped afterwards."""
    capacity = read_capacity()
    check_plans([plan], capacity)
    if not capacity.missing(plan, against=capacity.now):
        yield
        return
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=plan.bundles())
    try:
        waited, reported = 0.0, -report_seconds
        while missing := capacity.missing(plan, against=capacity.now):
            if waited - reported >= report_seconds:
                log(f"[resources] waiting for the cluster to grow by {_format(missing)} for {plan.describe()} "
                    f"({waited:.0f} s so far; it has {_format(capacity.now)})")
                reported = waited
            time.sleep(poll_seconds)
            waited += poll_seconds
            capacity = read_capacity()
        log(f"[resources] the cluster holds {plan.describe()}")
        yield
    finally:
        request_resources(bundles=[])  # lets idle nodes go again


def describe_plans(plans: list[StagePlan], capacity: ClusterCapacity) -> str:
    return f"[resources] a cluster of {capacity.describe()}; " + "; ".join(plan.describe() for plan in plans)


def run_as_task(plan: StagePlan, function, *args, log=print, **kwargs):
    """function(*args, **kwargs) as one Ray task holding a one-task plan's resources: work that needs a model
    runs where the plan puts it (a GPU node), not on the node the job's driver happens to run on."""
    (task,) = plan.demands
    remote = ray.remote(num_cpus=task.each["CPU"], num_gpus=task.each["GPU"], max_retries=0)(function)
    with cluster_ready_for(plan, log):
        return ray.get(remote.remote(*args, **kwargs))


def _declared_ceiling() -> dict | None:
    text = os.environ.get(GROWTH_VARIABLE)
    if text:
        try:
            ceiling = json.loads(text)
            if not isinstance(ceiling, dict):
                raise ValueError
            return {name: float(ceiling[name]) for name in PLANNED if name in ceiling}
        except (ValueError, TypeError):
            raise ResourcePlanError(f"{GROWTH_VARIABLE} must be a JSON object such as "
                                    f'{{"CPU": 392, "GPU": 32}}, got {text!r}') from None
    # Ray knows the maximum when its autoscaler reports its config (Ray Train checks its workers against the same,
    # through this private call of Ray 2.60; a Ray without it counts as not reporting).
    read_reported = getattr(ray._private.state.state, "get_max_resources_from_cluster_config", lambda: None)
    reported = read_reported()
    return {name: float(reported.get(name, 0)) for name in PLANNED} if reported else None


def _format(resources: dict) -> str:
    shown = {name: amount for name, amount in sorted(resources.items()) if amount} or resources
    return "{" + ", ".join(f"{name}: {amount:g}" for name, amount in shown.items()) + "}"
