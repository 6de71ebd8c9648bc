"""Joining Ray: the cluster when there is one, a fresh local Ray otherwise."""

import logging
import os

import ray

from gdro_ray.console import is_verbose, worker_environment


def init_ray(dashboard: bool = False) -> None:
    """Connect to the cluster named by RAY_ADDRESS (set by `ray job submit` too), else start Ray here.

    A bare ray.init() would join any cluster an earlier `ray start` left behind; address="local" always
    starts a fresh one, with the machine's own CPUs (each stage's resource plan has to fit what is really
    there: see resource_plan). dashboard starts Ray's dashboard on 127.0.0.1: sweeps need its state API,
    through which Ray Train frees the workers' placement group of a run that Tune stopped; without it the
    group stays reserved and later trials wait for workers forever.

    Unless verbose (gdro_ray.console), workers' output stays in Ray's logs and Ray's own logs below errors
    stay out of the console.
    """
    if ray.is_initialized():
        return
    options = dict(log_to_driver=is_verbose(), logging_level=logging.INFO if is_verbose() else logging.ERROR,
                   runtime_env={"env_vars": worker_environment()})
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**options)
    else:
        ray.init(address="local", include_dashboard=dashboard, **options)
    ray.data.DataContext.get_current().enable_progress_bars = False  # the jobs show their own bars
