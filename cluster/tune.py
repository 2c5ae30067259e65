"""Ray Tune as the grid's scheduler: every cell is a trial, started as soon as its dependencies and resources allow.

The application hands over a *planner* (pure Python, no Ray): ``next_trial()`` gives the next trial spec, None
while every startable trial is running (a method's seeds wait for its lr choice), or DONE; ``trial_finished`` and
``trial_failed`` tell it the outcome. A Tune Searcher asks the planner for trials, so the order of dependence is
the planner's and the concurrency is Tune's: ``max_concurrent`` trials at once, each started only when its
resources are free.

A trial's resources follow its cell's launcher (Ray Train V2's pattern for Tune, docs.ray.io "Hyperparameter
Tuning with Ray Tune"):
- cluster.launcher=ray: the trial is a driver that builds its own TorchTrainer (cluster/train.py); the trial itself
  reserves a little memory and no CPU, its Ray Train workers reserve what cluster.num_workers x cpus/gpus_per_worker
  say, and Ray starts them only when all are free at once.
- cluster.launcher=local: the trial trains in its own process, so it reserves one worker's CPUs (and GPU).
Evaluation runs in the trial's process after training. A trial that raises is retried up to
``max_failures`` times (Tune's FailureConfig); the trial function resumes from the cell's own last checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence

import ray
import ray.cloudpickle as cloudpickle
from ray import tune
from ray.tune.search import Searcher

from cluster.train import missing_resources
from pipeline.config import Config

DONE = "DONE"  # what a planner's next_trial returns when nothing is left to start or wait for
DRIVER_MEMORY = 256 * 1024**2  # what a launcher=ray trial reserves: its driver process waits on Ray Train's workers


class Planner(Protocol):
    """What the grid gives the scheduler (see module docstring)."""

    def next_trial(self) -> Any: ...  # a spec dict with a unique "id", None (wait), or DONE
    def trial_finished(self, trial_id: str, result: dict) -> None: ...
    def trial_failed(self, trial_id: str, reason: str, attempts: int) -> None: ...


def trial_resources(cfg: Config) -> dict[str, float]:
    """What one trial of ``cfg`` reserves itself (its Ray Train workers, if any, reserve their own)."""
    if cfg.cluster.launcher == "ray":
        return {"CPU": 0.0, "memory": float(DRIVER_MEMORY)}
    resources = {"CPU": float(cfg.cluster.cpus_per_worker)}
    if cfg.cluster.use_gpu:
        resources["GPU"] = float(cfg.cluster.gpus_per_worker)
    return resources


def cell_footprint(cfg: Config) -> dict[str, float]:
    """Everything one running cell of ``cfg`` holds: the trial plus its Ray Train workers."""
    total = dict(trial_resources(cfg))
    if cfg.cluster.launcher == "ray":
        total["CPU"] = total.get("CPU", 0.0) + cfg.cluster.num_workers * cfg.cluster.cpus_per_worker
        if cfg.cluster.use_gpu:
            total["GPU"] = total.get("GPU", 0.0) + cfg.cluster.num_workers * cfg.cluster.gpus_per_worker
    return total


def fitting_concurrency(cfgs: Sequence[Config], available: Mapping[str, float]) -> int:
    """How many of the largest cells fit the cluster at once (at least 1): the default of --max-concurrent.
    Beyond it, a launcher=ray trial would only start a driver whose workers wait for a free slot."""
    fits = []
    for cfg in cfgs:
        for kind, need in cell_footprint(cfg).items():
            if kind in ("CPU", "GPU") and need > 0:
                fits.append(int(float(available.get(kind, 0)) // need))
    return max(1, min(fits)) if fits else 1


def check_cells_fit(cfgs: Sequence[Config], available: Mapping[str, float]) -> Optional[str]:
    """A one-line reason why some cell could never start on the cluster, or None."""
    for cfg in cfgs:
        if cfg.cluster.launcher == "ray":
            problem = missing_resources(cfg, available)
        else:
            problem = next(
                (
                    f"a cell with cluster.launcher=local needs {need:g} {kind}s; the Ray cluster has "
                    f"{float(available.get(kind, 0)):g}"
                    for kind, need in trial_resources(cfg).items()
                    if kind in ("CPU", "GPU") and need > float(available.get(kind, 0))
                ),
                None,
            )
        if problem:
            return f"{cfg.tracking.run_name}: {problem}"
    return None


class _PlannerSearcher(Searcher):
    """Tune's view of the planner: suggest = the planner's next trial; a completed trial goes back to it."""

    def __init__(self, planner: Planner) -> None:
        super().__init__()
        self.planner = planner
        self.ids: dict[str, str] = {}  # Tune's trial id -> the planner's

    def suggest(self, trial_id: str) -> Optional[dict]:
        spec = self.planner.next_trial()
        if spec == DONE:
            return Searcher.FINISHED
        if spec is None:
            return None  # Tune asks again at its next step
        self.ids[trial_id] = spec["id"]
        return {"spec": spec}

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False) -> None:
        if not error and result is not None and "cell_result" in result:
            self.planner.trial_finished(self.ids[trial_id], json.loads(result["cell_result"]))
        # errors reach the planner through _FailureCallback, which has the trial (its reason, its attempts)


def _reason(trial) -> str:
    """The last meaningful line of a trial's error, as 'Type: message'."""
    # The trial writes its error files in its local folder; get_pickled_error/get_error read the storage copy,
    # which is synced later (at the last failure it may not exist yet): the local files first.
    error = None
    try:
        local = trial.pickled_error_file
        if local and os.path.exists(local):
            with open(local, "rb") as f:
                error = cloudpickle.load(f)
        else:
            error = trial.get_pickled_error()
    except Exception:  # noqa: BLE001 -- an unpicklable error of any kind: the text trace below
        pass
    if error is not None:
        cause = getattr(error, "cause", None) or error
        text = str(cause).strip().splitlines()
        name = type(cause).__name__
        return f"{name}: {text[-1]}" if text and name != "HardnegError" else (text[-1] if text else name)
    local_text = trial.error_file
    if local_text and os.path.exists(local_text):
        with open(local_text) as f:
            trace = f.read().strip().splitlines()
    else:
        trace = (trial.get_error() or "").strip().splitlines()
    return trace[-1] if trace else "unknown error"


class _FailureCallback(tune.Callback):
    """A trial that failed for good (its retries spent) goes back to the planner with its reason."""

    def __init__(self, searcher: _PlannerSearcher) -> None:
        self.searcher = searcher

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        planner_id = self.searcher.ids.get(trial.trial_id)
        if planner_id is not None:
            self.searcher.planner.trial_failed(planner_id, _reason(trial), trial.num_failures)


def _trainable(trial_fn: Callable[[dict], dict]) -> Callable[[dict], dict]:
    def run_trial(config: dict) -> dict:
        # one JSON string: Tune flattens nested results and adds its own keys beside them
        return {"cell_result": json.dumps(trial_fn(config["spec"]))}

    return run_trial


def _quiet_forwarded_output() -> None:
    """Without --verbose the grid's console is the driver's own lines: the trials' and their workers' output
    (concurrent epochs of several cells, interleaved) stays in Ray's log files."""
    from ray._private import worker as ray_worker  # Ray's log dispatcher has no public API

    dispatcher = ray_worker.global_worker_stdstream_dispatcher
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", lambda data: None)


def run_trials(
    planner: Planner,
    trial_fn: Callable[[dict], dict],
    resources: Callable[[dict], Mapping[str, float]],
    *,
    storage_path: str,
    name: str,
    max_concurrent: int,
    max_failures: int,
    verbose: bool = False,
) -> None:
    """Run the planner's trials under Tune on the connected Ray (inside cluster.train.ray_session) until it is
    DONE. ``trial_fn(spec)`` runs in each trial and returns the result dict; ``resources(spec)`` is what the
    trial reserves. Returns when every trial finished or failed for good."""
    if not verbose:
        os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")  # the planner prints one line per failed cell
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        for logger_name in ("ray.tune", "ray.train", "ray.air"):
            logging.getLogger(logger_name).setLevel(logging.ERROR)
        _quiet_forwarded_output()
    # Ctrl-C / SIGTERM end the driver at once (the CLI turns both into KeyboardInterrupt); the cells' records and
    # checkpoints are the grid's state, so a rerun resumes without Tune's own experiment snapshot
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    searcher = _PlannerSearcher(planner)
    trainable = tune.with_resources(
        _trainable(trial_fn),
        lambda config: tune.PlacementGroupFactory([dict(resources(config["spec"]))]),
    )
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            num_samples=-1,  # the planner says when it is done
            max_concurrent_trials=max_concurrent,
            trial_name_creator=lambda trial: trial.config["spec"]["id"],
            trial_dirname_creator=lambda trial: trial.config["spec"]["id"],
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=tune.FailureConfig(max_failures=max_failures),
            callbacks=[_FailureCallback(searcher)],
            verbose=2 if verbose else 0,
        ),
    )
    try:
        tuner.fit()
    finally:
        sys.stdout.flush()


def cluster_resources() -> dict[str, float]:
    """The connected Ray cluster's total resources."""
    return {k: float(v) for k, v in ray.cluster_resources().items() if not math.isnan(float(v))}
