"""End to end through a real local Ray instance (the session's shared one, 2 CPU workers) and a real SQLite MLflow
store."""

from __future__ import annotations

import os

import mlflow
import pytest
from conftest import tiny_config
from mlflow.tracking import MlflowClient

from pipeline import checkpoint
from pipeline.app import train_command

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("shared_ray")]


def metric_steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, key)]


def test_ray_train_mlflow_then_resume(tmp_path, digits_shards):
    steps = 1347 // 128
    cfg = tiny_config(tmp_path, digits_shards, "cluster.launcher=ray", "cluster.num_workers=2", "tracking.run_name=e2e")
    first = train_command.train_run(cfg)
    assert first["step"] == steps and first["epoch"] == 1

    # Checkpoint went through ray.train.report to the run's storage path and holds the resolved config.
    saved = checkpoint.load(first["checkpoint"])
    assert first["checkpoint"].startswith(str(tmp_path / "runs" / "e2e"))
    assert saved["step"] == steps and saved["config"]["cluster"]["num_workers"] == 2

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(first["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "e2e"
    params = run.data.params
    assert params["loss.name"] == "nt_xent" and params["train.global_batch_size"] == "128"
    assert params["world_size"] == "2" and params["model.width"] == "4"
    assert metric_steps(client, run.info.run_id, "train/loss") == [4, 8, steps]
    assert metric_steps(client, run.info.run_id, "eval/knn_top1") == [steps]
    assert 0.0 <= run.data.metrics["eval/knn_top1"] <= 1.0 and run.data.metrics["perf/images_per_s"] > 0
    assert run.data.metrics["train/lr"] > 0
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "checkpoints"} <= artifacts
    last = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints/last")}
    assert last == {"checkpoints/last/state.pt", "checkpoints/last/meta.json"}
    config_text = mlflow.artifacts.load_text(f"{run.info.artifact_uri}/config.yaml")
    assert "global_batch_size: 128" in config_text

    # Resume the same run for a second epoch: it continues from the saved step in the same MLflow run.
    longer = tiny_config(
        tmp_path,
        digits_shards,
        "cluster.launcher=ray",
        "cluster.num_workers=2",
        "tracking.run_name=e2e",
        "train.epochs=2",
    )
    second = train_command.train_run(longer, resume="e2e")
    assert second["mlflow_run_id"] == first["mlflow_run_id"]
    assert second["step"] == 2 * steps
    assert checkpoint.load(second["checkpoint"])["step"] == 2 * steps
    loss_steps = metric_steps(client, run.info.run_id, "train/loss")
    assert loss_steps == sorted({4, 8, steps, 12, 16, 20, 2 * steps})  # continued after `steps`, nothing repeated
    assert metric_steps(client, run.info.run_id, "eval/knn_top1") == [steps, 2 * steps]
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    assert os.path.isdir(tmp_path / "runs" / "e2e")
