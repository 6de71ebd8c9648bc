"""Ray Tune over GDRO's knobs per task: beta, tau, gamma, k and the learning rate.

The group dataset and the evaluation set are made once (align.prepare_data) and shared by every trial.
Each trial is a function trainable that runs one TorchTrainer (Ray Train V2) with TuneReportCallback,
so the workers' reports, the held-out eval_corrected included, reach Tune. ASHA stops trials whose
corrected score trails at a rung; its grace period should outlast the dip below the base that GDRO
runs show early on (docs/results.md). The first trial is the preset itself.

    RUN/groups, RUN/eval_set      shared data
    RUN/trials/trial-ID/          each trial's training run (checkpoints, tensorboard)
    RUN/results.csv               one row per trial: its settings, last step, last scores, stopped early,
                                  error, last checkpoint
    RUN/best.yaml                 the best trial's settings: a --config for jobs/align.py
    RUN/best_lora/                the best trial's LoRA from its last checkpoint (diffusers format)
"""

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import yaml
from ray import tune
from ray.train import Checkpoint
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator
from tqdm import tqdm

from gdro_ray.align import AlignSettings, generation_config, prepare_data
from gdro_ray.cli import option
from gdro_ray.config import TrainConfig, build_config
from gdro_ray.console import is_verbose, metric_line
from gdro_ray.evaluate import write_csv
from gdro_ray.periodic_eval import PeriodicEvaluator
from gdro_ray.resource_plan import (
    TRIAL_DRIVER_CPUS, ClusterCapacity, check_plans, cluster_ready_for, describe_plans, evaluation_plan,
    generation_plan, read_capacity, sweep_plan, uses_gpus,
)
from gdro_ray.train.trainer import export_lora, run_training

TUNED = ("beta", "tau", "gamma", "k", "lr")
METRIC = "eval_corrected"
STOPPED_TRIAL_CLEANUP_S = 15  # well inside Train's 60 s wait for a worker group to start


@dataclass
class SweepSettings:
    num_samples: int = option(8, "trials, the preset's included")
    max_concurrent_trials: int = option(1, "trials at once; each takes num_workers training workers")
    grace_period: int = option(50, "steps before ASHA may stop a trial")
    reduction_factor: int = option(3, "ASHA keeps the best 1/reduction_factor at each rung")
    beta_range: tuple[float, float] = option((2.0, 50.0), "LOW,HIGH of beta, log-uniform")
    tau_range: tuple[float, float] = option((0.01, 0.5), "LOW,HIGH of tau, log-uniform")
    gamma_range: tuple[float, float] = option((0.0, 1.0), "LOW,HIGH of gamma, uniform")
    lr_range: tuple[float, float] = option((1e-4, 3e-3), "LOW,HIGH of the learning rate, log-uniform")
    k_choices: tuple[int, ...] = option((2, 4, 6), "K,K,... the group sizes to try")
    sweep_seed: int = option(0, "seed of the search")

    def __post_init__(self):
        if self.num_samples < 1 or self.max_concurrent_trials < 1:
            raise ValueError("num_samples and max_concurrent_trials must be >= 1")
        if self.grace_period < 1 or self.reduction_factor < 2:
            raise ValueError("grace_period must be >= 1 and reduction_factor >= 2")
        for name in ("beta", "tau", "gamma", "lr"):
            bounds = getattr(self, f"{name}_range")
            lowest = 0.0 if name == "gamma" else 1e-12  # log-uniform ranges must stay above zero
            if len(bounds) != 2 or not lowest <= bounds[0] <= bounds[1]:
                raise ValueError(f"{name} range must be LOW,HIGH with {lowest:g} <= LOW <= HIGH, got {bounds}")
        if not self.k_choices or min(self.k_choices) < 2:
            raise ValueError(f"k choices must be >= 2 (a group to rank), got {self.k_choices}")

    def param_space(self) -> dict:
        return {"beta": tune.loguniform(*self.beta_range), "tau": tune.loguniform(*self.tau_range),
                "gamma": tune.uniform(*self.gamma_range), "lr": tune.loguniform(*self.lr_range),
                "k": tune.choice(list(self.k_choices))}


def concurrent_trials(train: TrainConfig, sweep: SweepSettings, capacity: ClusterCapacity, log=print) -> int:
    """The concurrency to run with: what was asked, or as many trials as the cluster can hold at most. Trials
    beyond that would start their Train runs anyway and wait on each other's workers until they time out,
    over and over: a sweep that never ends. A trial larger than the cluster stops the sweep before any work."""
    use_gpu = uses_gpus(train.use_gpu, capacity)
    check_plans([sweep_plan(train, use_gpu, 1)], capacity)
    fit = 1
    while fit < sweep.max_concurrent_trials and not capacity.missing(sweep_plan(train, use_gpu, fit + 1)):
        fit += 1
    if fit < sweep.max_concurrent_trials:
        log(f"running {fit} trial(s) at once instead of {sweep.max_concurrent_trials}: a cluster of "
            f"{capacity.describe()} holds no more, and more trials would wait on each other's workers")
    return fit


def run_sweep(train: TrainConfig, align: AlignSettings, sweep: SweepSettings, log=print) -> dict:
    """Every trial to its end or its early stop; returns the best trial's settings (also in RUN/best.yaml).
    Rerun with the same output directory to resume an interrupted sweep."""
    if train.eval_every < 1:
        raise ValueError("a sweep stops trials on held-out scores: set eval_every >= 1")
    align.check_group_size(max(sweep.k_choices))
    run = Path(align.out or f"runs/sweep-{train.task}").resolve()
    capacity = read_capacity()
    use_gpu = uses_gpus(train.use_gpu, capacity)
    concurrent = concurrent_trials(train, sweep, capacity, log)
    plans = [generation_plan(generation_config(train, align, run), capacity), evaluation_plan(use_gpu),
             sweep_plan(train, use_gpu, concurrent)]
    check_plans(plans, capacity)
    log(describe_plans(plans, capacity))
    train = prepare_data(train, align, run, plans[1], log)
    base = dataclasses.asdict(dataclasses.replace(train, storage_path=str(run / "trials"), max_failures=0))
    # Tune gives a stopped trial's actor up to 600 s by default to end before it kills it, and the trial's
    # Train run holds its workers until then, while the next trial's workers wait and time out after 60 s.
    os.environ.setdefault("TUNE_FORCE_TRIAL_CLEANUP_S", str(STOPPED_TRIAL_CLEANUP_S))
    if not is_verbose():  # Tune logs each failed trial's traceback; the console says it in a line, with the file
        logging.getLogger("ray.tune.execution.tune_controller").setLevel(logging.CRITICAL)
    trainable = tune.with_resources(tune.with_parameters(_trial, base=base), {"CPU": TRIAL_DRIVER_CPUS})
    experiment = run / "tune"
    if tune.Tuner.can_restore(experiment):
        # A rerun goes on where the last one stopped: finished trials stay finished, unfinished ones resume
        # from their last checkpoint, errored ones get their retry. The sweep settings are the first run's.
        log(f"resuming the sweep in {experiment} (its search space and settings are the first run's)")
        tuner = tune.Tuner.restore(str(experiment), trainable, resume_errored=True, param_space=sweep.param_space())
        # The console callback comes back with the experiment's run config.
        with cluster_ready_for(plans[2], log):
            return _summarise(tuner.fit(), train, run)
    scheduler = ASHAScheduler(time_attr="step", max_t=train.steps, grace_period=min(sweep.grace_period, train.steps),
                              reduction_factor=sweep.reduction_factor)
    preset = {name: getattr(train, name) for name in TUNED}
    tuner = tune.Tuner(
        trainable,
        param_space=sweep.param_space(),
        tune_config=tune.TuneConfig(
            metric=METRIC, mode="max", scheduler=scheduler, num_samples=sweep.num_samples,
            # The generator limits concurrency itself (TuneConfig's max_concurrent_trials skips generators):
            # trials beyond what the cluster holds would wait on each other's workers and hang.
            search_alg=BasicVariantGenerator(points_to_evaluate=[preset], random_state=sweep.sweep_seed,
                                             max_concurrent=concurrent),
        ),
        # Tune retries a failed trial (a lost node, say; its own Train retries are off) up to --max-failures times,
        # and the retry resumes the trial's Train run from its last checkpoint.
        run_config=tune.RunConfig(name=experiment.name, storage_path=str(run), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=train.max_failures),
                                  callbacks=[SweepConsole(sweep.num_samples, train.steps)]),
    )
    with cluster_ready_for(plans[2], log):
        return _summarise(tuner.fit(), train, run)


def _summarise(results, train: TrainConfig, run: Path) -> dict:
    """results.csv and best.yaml from the trials' results; the best trial's settings."""
    rows = _result_rows(results, train.steps)
    write_csv(rows, run / "results.csv")
    finished = [row for row in rows if row.get(METRIC) is not None]
    if not finished:
        raise RuntimeError(f"no trial reported {METRIC}; see {run / 'tune'} for the trials' errors")
    best = max(finished, key=lambda row: row[METRIC])
    tuned = {name: best[name] for name in TUNED}
    settings = {"task": train.task, "model": train.model, "steps": train.steps, **tuned}
    (run / "best.yaml").write_text(f"# best of {len(rows)} trials by {METRIC} = {best[METRIC]:.4f} "
                                   f"(trial {best['trial_id']})\n" + yaml.safe_dump(settings, sort_keys=False))
    checkpoint = best["checkpoint"]
    if checkpoint:  # the trial's last checkpoint: its LoRA, ready to load, without training it again
        export_lora(Checkpoint(checkpoint), dataclasses.replace(train, **tuned), out=run / "best_lora")
    return settings


class SweepConsole(tune.Callback):
    """The sweep's console: a bar over trials, and a line per trial result with its held-out score."""

    def __init__(self, trials: int, steps: int):
        self.trials, self.steps, self.bar = trials, steps, None

    def __getstate__(self) -> dict:  # Tune stores its callbacks with the experiment; the bar stays here
        return {**self.__dict__, "bar": None}

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if METRIC in result:
            self._bar().write(f"trial {trial.trial_id}: " + metric_line(result.get("step", 0), self.steps, result))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._finished(trials)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._bar().write(f"trial {trial.trial_id} failed (failure {trial.num_failures}), retried from its last "
                          f"checkpoint; the error: {_error_file(trial)}")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._bar().write(f"trial {trial.trial_id} failed for good; the error: {_error_file(trial)}")
        self._finished(trials)

    def on_experiment_end(self, trials, **info):
        if self.bar is not None:
            self.bar.close()

    def _finished(self, trials) -> None:
        bar = self._bar()
        bar.n = sum(trial.status in ("TERMINATED", "ERROR") for trial in trials)
        scores = [t.last_result[METRIC] for t in trials if METRIC in (t.last_result or {})]
        bar.set_postfix_str(f"best {METRIC} {max(scores):.4g}" if scores else "")

    def _bar(self) -> tqdm:
        if self.bar is None:
            self.bar = tqdm(total=self.trials, desc="sweep", unit="trial", dynamic_ncols=True)
        return self.bar


def _error_file(trial) -> str:
    """Where the trial's error is kept in the run directory (Tune writes it in Ray's session folder first)."""
    return os.path.join(trial.path, os.path.basename(trial.error_file or "error.txt"))


def _trial(values: dict, base: dict) -> None:
    config = build_config({**base, **values, "name": f"trial-{tune.get_context().get_trial_id()}"})
    # The sweep made sure of the cluster for all its trials at once; a trial does not ask again.
    run_training(config, evaluator=PeriodicEvaluator(config.eval_set), callbacks=[TuneReportCallback()],
                 wait_for_cluster=False, console=False)


def _result_rows(results, steps: int) -> list[dict]:
    rows = []
    for result in results:
        metrics = result.metrics or {}
        row = {"trial_id": metrics.get("trial_id", ""), **result.config}
        reported = ("step", "eval_reward", "eval_quality", "eval_geneval", METRIC)
        row.update({name: metrics.get(name) for name in reported})
        row["stopped_early"] = metrics.get("step", 0) < steps and result.error is None
        row["error"] = type(result.error).__name__ if result.error else ""
        row["checkpoint"] = _last_checkpoint_path(result)
        rows.append(row)
    return rows


def _last_checkpoint_path(result) -> str:
    """Where the trial's last checkpoint is ("" if it made none): TuneReportCallback reports each
    checkpoint's path with the metrics of that step."""
    history = result.metrics_dataframe
    if history is None or CHECKPOINT_PATH_KEY not in history:
        return ""
    paths = history[CHECKPOINT_PATH_KEY].dropna()
    return str(paths.iloc[-1]) if len(paths) else ""
