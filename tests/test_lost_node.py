"""A lost node: a real two-node Ray cluster on this machine (ray.cluster_utils.Cluster: a head and a second
raylet joined to it, one CPU each), one training worker per node, the second node removed mid-run. With
cluster.min_workers=1 the run restarts from its last checkpoint on the capacity left (one worker) and
finishes with the full step count, in one MLflow run, no metric step twice.

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
            except Exception:
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
    loss = [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")]
    assert loss == list(range(1, total + 1))
