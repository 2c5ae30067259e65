"""A lost worker: SIGKILL one of 2 Ray Train CPU workers mid-run; training restarts from the last
checkpoint, finishes with the same number of steps, and MLflow keeps one run with no step twice. The
restarted run's per-step loss history equals an uninterrupted run's, value for value.

Run with -s to see the restart step and the final step.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading

import pytest
from conftest import tiny_config
from mlflow.tracking import MlflowClient

from pipeline import checkpoint
from pipeline.app import train_command

pytestmark = [
    pytest.mark.ray,
    pytest.mark.usefixtures("shared_ray"),  # its raylet and workers are descendants of this process
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc"),
]


def descendants(root: int) -> list[int]:
    """Every live process below ``root`` (our private Ray's raylet and its workers are children of this one)."""
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], [root]
    while frontier:
        kids = [pid for pid, ppid in parent.items() if ppid in frontier]
        found += kids
        frontier = kids
    return found


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def train_workers() -> list[int]:
    """Our own RayTrainWorker processes (never another session's)."""
    return sorted(pid for pid in descendants(os.getpid()) if "RayTrainWorker" in cmdline(pid))


def ray_registered_step(run_dir: str):
    """The step of the latest checkpoint Ray Train's controller has registered (its manager snapshot), or None.

    A report reaches the controller only at its next health-check poll (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S: 2 s by
    default, 0.5 s in the suite, later on a loaded machine): a restart resumes from the latest *registered* checkpoint, which may trail the newest
    one on disk, and begins at step 0 when none is registered yet.
    """
    try:
        with open(os.path.join(run_dir, "checkpoint_manager_snapshot.json")) as f:
            latest = json.load(f).get("latest_checkpoint_result")
        return int(latest["metrics"]["step"]) if latest else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def test_sigkill_one_worker_resumes_from_the_last_checkpoint(tmp_path, digits_shards):
    spe, epochs = 1347 // 128, 3  # killed after epoch 1's checkpoint + 4 steps; 2 epochs of work left after it
    total = spe * epochs
    common = (
        "cluster.launcher=ray",
        "cluster.num_workers=2",
        f"train.epochs={epochs}",
        "train.knn_every_epochs=0",
        "train.checkpoint_every_epochs=1",
        "cluster.max_failures=2",
        "train.log_every_steps=1",
        "tracking.plots=false",
        "tracking.log_model=false",
    )
    cfg = tiny_config(tmp_path, digits_shards, *common, "tracking.run_name=ft")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = str(tmp_path / "runs" / "ft")
    killed: dict = {}
    done = threading.Event()

    def logged_steps(client: MlflowClient) -> list[int]:
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        return [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")] if runs else []

    def kill_one_worker_after_the_first_checkpoint() -> None:
        client = None
        while not done.wait(0.2):
            registered = ray_registered_step(run_dir)
            if registered is None:
                continue
            client = client or MlflowClient(uri)
            # a few steps past the checkpoint, so the restart has logged steps to skip
            if max(logged_steps(client), default=0) < spe + 4:
                continue
            workers = train_workers()
            if len(workers) != 2:
                continue
            victim = workers[-1]
            killed.update(
                pid=victim, checkpoint_step=registered, logged_step=max(logged_steps(client)), workers=workers
            )
            os.kill(victim, signal.SIGKILL)
            print(
                f"\n[kill] SIGKILL RayTrainWorker pid {victim} of {workers}: latest registered checkpoint at step "
                f"{killed['checkpoint_step']}, MLflow loss logged up to step {killed['logged_step']}",
                flush=True,
            )
            return

    killer = threading.Thread(target=kill_one_worker_after_the_first_checkpoint, daemon=True)
    killer.start()
    try:
        result = train_command.train_run(cfg)
    finally:
        done.set()
        killer.join(timeout=10)

    assert killed, "the run finished before a worker could be killed"
    restart, final = result["restored_from_step"], result["step"]
    print(
        f"[restart] training restarted from the checkpoint at step {restart}; final step {final} of {total}", flush=True
    )
    assert killed["pid"] not in train_workers()
    assert restart is not None and restart % spe == 0 and killed["checkpoint_step"] <= restart < total
    assert final == total and checkpoint.load(result["checkpoint"])["step"] == total

    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1, [r.info.run_id for r in runs]  # the restarted workers attached to the same run
    run = runs[0]
    assert run.info.run_id == result["mlflow_run_id"] and run.info.status == "FINISHED"
    for key in run.data.metrics:
        if key.startswith("system/"):
            continue  # sampled by time, not by training step
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert steps == sorted(set(steps)), f"{key}: steps repeat or go back: {steps}"
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss"))
    loss_steps = [step for step, _ in history]
    assert loss_steps == list(range(1, total + 1))  # every step once: before the kill from attempt 1, after from 2
    print(
        f"[mlflow] one run {run.info.run_id}, loss logged at {len(loss_steps)} strictly increasing steps "
        f"{loss_steps[0]}..{loss_steps[-1]}",
        flush=True,
    )

    # The same run uninterrupted: the same loss at every step (batches and RNG streams are functions of the step).
    reference = train_command.train_run(
        tiny_config(
            tmp_path,
            digits_shards,
            *common,
            "tracking.run_name=reference",
            f"tracking.uri=sqlite:///{tmp_path / 'reference.db'}",
        )
    )
    ref_client = MlflowClient(f"sqlite:///{tmp_path / 'reference.db'}")
    ref_history = sorted(
        (m.step, m.value) for m in ref_client.get_metric_history(reference["mlflow_run_id"], "train/loss")
    )
    assert ref_history == history
    print(
        f"[history] restarted at step {restart}: all {total} per-step losses equal the uninterrupted run's", flush=True
    )
