"""Joining Ray: the cluster when there is one, a fresh local Ray otherwise."""

import os

import ray


def init_ray(num_cpus: int | None = None, dashboard: bool = False) -> None:
    """Connect to the cluster named by RAY_ADDRESS (set by `ray job submit` too), else start Ray here.

    A bare ray.init() would join any cluster an earlier `ray start` left behind; address="local"
    always starts a fresh one, with the machine's own CPUs unless num_cpus says otherwise (each stage's
    resource plan has to fit what is really there: see resource_plan). dashboard starts
    Ray's dashboard on 127.0.0.1: sweeps need its state API, through which Ray Train frees the workers'
    placement group of a run that Tune stopped; without it the group stays reserved and later trials
    wait for workers forever.
    """
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard)
    ray.data.DataContext.get_current().enable_progress_bars = False  # the jobs show their own bars
