"""A lost node: a real two-node Ray cluster on this machine (ray.cluster_utils.Cluster: a head and a second
raylet joined to it, one CPU each), one training worker per node, the second node removed mid-run. With
cluster.min_workers=1 the run restarts from its last checkpoint on the capacity left (one worker) and
finishes with the full step count, in one MLflow run, no metric step twice. It runs the chunked step
(train.chunk_size): the survivor runs twice the chunks of the same size, its peak memory does not grow,
and its losses after the restart are those of a one-worker run resumed from the same checkpoint.

Run with -s to see the restart step.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading

import pytest
from conftest import tiny_config

from pipeline import checkpoint
from pipeline.app import train_command

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("own_ray")]
SPE = 1347 // 128  # steps per epoch of the digits train split (1347 after the val holdout) at batch 128


def _registered_step(run_dir: str):
    """The step of the latest checkpoint Ray Train's controller registered, or None."""
    try:
        with open(os.path.join(run_dir, "checkpoint_manager_snapshot.json")) as f:
            latest = json.load(f).get("latest_checkpoint_result")
        return int(latest["metrics"]["step"]) if latest else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def test_a_lost_node_restarts_on_the_remaining_one(tmp_path, digits_shards, request, monkeypatch):
    import ray._private.utils
    from mlflow.tracking import MlflowClient
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    ray_tmp = tempfile.mkdtemp(prefix="hnln-", dir="/tmp")  # short: Ray's socket paths live under it
    request.addfinalizer(lambda: shutil.rmtree(ray_tmp, ignore_errors=True))
    # Cluster() writes the head's address to /tmp/ray/ray_current_cluster whatever temp_dir says, and fails where
    # /tmp/ray does not exist (a new machine, the suite's fresh /tmp); elsewhere it would overwrite the address
    # file of whichever Ray runs on this machine. This test connects by cluster.address: the file goes in ray_tmp.
    write_ray_address = ray._private.utils.write_ray_address
    monkeypatch.setattr(
        ray._private.utils, "write_ray_address", lambda address, temp_dir=None: write_ray_address(address, ray_tmp)
    )
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "temp_dir": ray_tmp, "include_dashboard": True, "dashboard_host": "127.0.0.1"},
    )
    request.addfinalizer(cluster.shutdown)
    second = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()

    epochs = 2  # 20 steps: the node goes after the first registered checkpoint (step 4), 16 steps before the end
    total = epochs * SPE
    cfg = tiny_config(
        tmp_path,
        digits_shards,
        "cluster.launcher=ray",
        "cluster.num_workers=2",
        "cluster.min_workers=1",
        f"cluster.address={cluster.address}",
        "cluster.max_failures=2",
        f"train.epochs={epochs}",
        "train.knn_every_epochs=0",
        "train.log_every_steps=1",
        "train.checkpoint_every_steps=4",
        "tracking.plots=false",
        "tracking.log_model=false",
        "tracking.system_metrics_every_s=0",
        "tracking.run_name=lost",
        "train.chunk_size=32",  # 2 chunks per step on each of 2 workers, 4 on the survivor
        "train.loss_tile=64",
        "cluster.checkpoints_to_keep=null",  # the replay starts from the restart's checkpoint
        "data.order=epoch",  # the survivor reads the rest of the epoch: tests/test_epoch_order.py counts the keys
    )
    run_dir = str(tmp_path / "runs" / "lost")
    seen: dict = {}
    done = threading.Event()

    def remove_the_second_node() -> None:
        while not done.wait(0.5):
            step = _registered_step(run_dir)
            if step is None:
                continue
            try:
                workers = [
                    a
                    for a in list_actors(address=cluster.address, filters=[("state", "=", "ALIVE")])
                    if a.class_name.endswith("RayTrainWorker")
                ]
            except Exception:  # noqa: BLE001 -- the state API may not answer while a node is down: poll again
                continue
            seen["nodes"] = {a.node_id for a in workers}
            seen["checkpoint_step"] = step
            cluster.remove_node(second)
            print(
                f"\n[node] removed the second node: workers were on {len(seen['nodes'])} nodes, latest "
                f"registered checkpoint at step {step}",
                flush=True,
            )
            return

    remover = threading.Thread(target=remove_the_second_node, daemon=True)
    remover.start()
    try:
        result = train_command.train_run(cfg)
    finally:
        done.set()
        remover.join(timeout=30)

    assert seen, "the run finished before the node could be removed"
    assert len(seen["nodes"]) == 2  # one training worker per node
    restart = result["restored_from_step"]
    print(
        f"[restart] restarted from the checkpoint at step {restart} on the remaining node; final step "
        f"{result['step']} of {total}",
        flush=True,
    )
    assert restart is not None and seen["checkpoint_step"] <= restart < total
    assert result["step"] == total and checkpoint.load(result["checkpoint"])["step"] == total

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    for key in runs[0].data.metrics:
        steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, key)]
        assert steps == sorted(set(steps)), f"{key}: steps repeat: {steps}"
    history = {
        key: {m.step: m.value for m in client.get_metric_history(runs[0].info.run_id, key)}
        for key in ("train/loss", "perf/chunks_per_step", "perf/peak_memory_mib")
    }
    assert sorted(history["train/loss"]) == list(range(1, total + 1))
    chunks = history["perf/chunks_per_step"]
    # a step is logged once: the first attempt's steps after the checkpoint (until it saw the node go) stay
    survivor = sorted(s for s in chunks if chunks[s] == 4)
    print(f"[chunks] 2 per step up to step {survivor[0] - 1}, then 4 on the survivor")
    assert {chunks[s] for s in chunks if s <= restart} == {2} and restart < survivor[0]
    assert survivor == list(range(survivor[0], total + 1)) and set(chunks) == set(range(1, total + 1))
    peak = history["perf/peak_memory_mib"]
    before, after = max(peak[s] for s in peak if s < survivor[0]), max(peak[s] for s in survivor)
    print(f"[memory] rank 0's peak resident set: {before:.0f} MiB on 2 workers, {after:.0f} MiB on the survivor")
    assert after <= before * 1.10  # a process's whole peak (torch, Ray): the activations of one chunk stay as they were

    # The survivor's steps are those of a one-worker run resumed from the same checkpoint.
    replay = _replay_from(result, restart, cfg, tmp_path)
    assert sorted(replay) == list(range(restart + 1, total + 1))
    worst = max(abs(replay[s] - history["train/loss"][s]) / abs(replay[s]) for s in survivor)
    print(f"[replay] the survivor's steps {survivor[0]}..{total} vs one local worker from step {restart}: "
          f"worst relative loss difference {worst:.2e}")  # fmt: skip
    assert worst < 1e-5


def _replay_from(result: dict, restart: int, cfg, tmp_path) -> dict:
    """Per-step losses of an uninterrupted one-worker local run from the checkpoint the survivor restarted from."""
    from mlflow.tracking import MlflowClient

    from pipeline import config, dist, train

    run_dir = os.path.dirname(result["checkpoint"])
    state = checkpoint.load(os.path.join(run_dir, checkpoint.dir_name(restart)))
    state["mlflow_run_id"] = None  # a new MLflow run, in its own store
    store = f"sqlite:///{tmp_path / 'replay.db'}"
    settings = config.to_dict(cfg)
    settings["cluster"] = {"launcher": "local", "storage_path": str(tmp_path / "replay")}
    settings["tracking"] = {"uri": store, "run_name": "replay", "plots": False, "log_model": False}
    settings["tracking"] |= {"system_metrics_every_s": 0, "registered_model": None}
    replay_cfg = config.from_dict(settings)

    class FromCheckpoint:
        def restore(self):
            return state

        def report(self, metrics, checkpoint_dir):
            pass

    out = train.run(replay_cfg, dist.current_context("cpu"), FromCheckpoint())
    client = MlflowClient(store)
    return {m.step: m.value for m in client.get_metric_history(out["mlflow_run_id"], "train/loss")}
