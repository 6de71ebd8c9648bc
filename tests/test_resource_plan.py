"""Each stage's resource plan against the cluster: what fits, what is refused (and how it says so), and
waiting for a cluster that grows."""

import threading
import time
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster

from gdro_ray.align import generation_config
from gdro_ray.resource_plan import (
    GROWTH_VARIABLE, ClusterCapacity, Demand, ResourcePlanError, StagePlan, check_plans, cluster_ready_for,
    evaluation_plan, generation_plan, training_plan, uses_gpus,
)


def align_plans(load_script, argv, capacity):
    train, settings = load_script("jobs/align.py").parse_args(argv)
    use_gpu = uses_gpus(train.use_gpu, capacity)
    generation = generation_config(train, settings, Path("unused"))
    return [generation_plan(generation, capacity), evaluation_plan(use_gpu), training_plan(train, use_gpu)]


def test_the_default_align_job_fits_a_2_cpu_machine_stage_by_stage(load_script):
    laptop = ClusterCapacity({"CPU": 2.0})
    generation, evaluation, training = align_plans(load_script, ["--task", "ocr"], laptop)
    assert generation.total() == {"CPU": 2.0}  # a generation actor beside a scoring actor
    assert evaluation.total() == {"CPU": 1.0}
    assert training.total() == {"CPU": 1.75}  # 2 workers x 0.75 and the data reader's 0.25
    check_plans([generation, evaluation, training], laptop)


def test_a_stage_larger_than_a_fixed_cluster_is_refused_naming_what_is_missing_and_the_flags(load_script):
    laptop = ClusterCapacity({"CPU": 2.0})
    plans = align_plans(load_script, ["--task", "ocr", "--num-workers", "3", "--generation-actors", "2"], laptop)
    with pytest.raises(ResourcePlanError) as refused:
        check_plans(plans, laptop)
    message = str(refused.value)
    assert "holds {CPU: 2} and cannot grow" in message and GROWTH_VARIABLE in message
    assert "generation {CPU: 3} (2 generation actors x {CPU: 1}, 1 scoring actors x {CPU: 1}) is short of {CPU: 1}" \
        in message and "--generation-actors" in message
    assert "training {CPU: 2.5}" in message and "short of {CPU: 0.5}" in message and "--num-workers" in message
    assert "evaluation" not in message  # the stage that fits is not named


def test_a_cluster_that_can_grow_is_held_to_its_ceiling_and_its_gpus_are_planned_from_zero(load_script):
    gpus_from_zero = ClusterCapacity({"CPU": 8.0}, ceiling={"CPU": 392.0, "GPU": 32.0})
    generation, evaluation, training = align_plans(
        load_script, ["--task", "geneval", "--model", "some/flux", "--num-workers", "8"],
        gpus_from_zero)
    assert generation.total() == {"CPU": 2.0, "GPU": 1.0} and evaluation.total() == {"CPU": 1.0, "GPU": 1.0}
    assert training.total() == {"CPU": 8.25, "GPU": 8.0}  # the paper preset's workers: a CPU and a GPU each
    check_plans([generation, evaluation, training], gpus_from_zero)
    with pytest.raises(ResourcePlanError, match=r"(?s)can grow to at most \{CPU: 392, GPU: 32\}.*short of \{GPU: 8\}"):
        check_plans([training_plan(training_config(load_script, 40), use_gpu=True)], gpus_from_zero)


def training_config(load_script, workers):
    train, _ = load_script("jobs/align.py").parse_args(["--model", "some/flux", "--num-workers", str(workers)])
    return train


@pytest.fixture
def growing_cluster(monkeypatch):
    """A real Ray cluster of one 1-CPU node that declares it can grow to 2 CPUs."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    ray.init(address=cluster.address)
    monkeypatch.setenv(GROWTH_VARIABLE, '{"CPU": 2}')
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_a_stage_waits_for_a_growing_cluster_saying_what_for(growing_cluster, monkeypatch):
    plan = StagePlan("training", (Demand("training workers", 2, {"CPU": 1.0}),), "--num-workers")
    said, held = [], []

    def stage():
        with cluster_ready_for(plan, log=said.append, poll_seconds=0.5, report_seconds=1.0):
            held.append(ray.cluster_resources()["CPU"])

    waiting = threading.Thread(target=stage)
    waiting.start()
    time.sleep(3)
    assert waiting.is_alive() and not held
    growing_cluster.add_node(num_cpus=1)  # the node an autoscaler would bring (Ray adds nodes from the main thread)
    waiting.join(timeout=60)
    assert held == [2.0]
    assert said[0].startswith("[resources] waiting for the cluster to grow by {CPU: 1} for training {CPU: 2}")
    assert said[-1] == "[resources] the cluster holds training {CPU: 2} (2 training workers x {CPU: 1})"

    # Beyond the declared ceiling it does not wait: it refuses.
    too_big = StagePlan("training", (Demand("training workers", 3, {"CPU": 1.0}),), "--num-workers")
    with pytest.raises(ResourcePlanError, match=r"can grow to at most \{CPU: 2\}"):
        with cluster_ready_for(too_big):
            pass
    monkeypatch.setenv(GROWTH_VARIABLE, "64 CPUs")
    with pytest.raises(ResourcePlanError, match=f"{GROWTH_VARIABLE} must be a JSON object"):
        with cluster_ready_for(plan):
            pass
