"""Tracking against a real `mlflow server` on 127.0.0.1 and a SQLite file: params, metrics, PNG
artifacts, the registered encoder, restart-safe steps, and secrets that never reach the store."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ARTIFACTS_ON, logged_text, tiny_config
from mlflow.tracking import MlflowClient
from PIL import Image

from pipeline import redaction, tracking, train
from pipeline.app import train_command
from pipeline.app.cli import main as cli_main

SECRET = "hunter2-very-secret"


@pytest.mark.parametrize("store", [pytest.param("server", marks=pytest.mark.server), "sqlite"])
def test_run_logs_everything_and_resumes_cleanly(store, tmp_path, digits_shards, request):
    uri = request.getfixturevalue("shared_mlflow_server") if store == "server" else f"sqlite:///{tmp_path / 'm.db'}"
    common = [
        "cluster.launcher=local",
        f"tracking.uri={uri}",
        "tracking.run_name=t1",
        f"tracking.registered_model=enc-{store}",
        "tracking.system_metrics_every_s=1",
        # fake secrets in places a user might put them; none may reach params, tags or config.yaml
        f"cluster.address=ray://admin:{SECRET}@10.0.0.1:10001",
        "train.knn_every_epochs=1",
        *ARTIFACTS_ON,
    ]
    first = train_command.train_run(tiny_config(tmp_path, digits_shards, *common))
    client = MlflowClient(uri)
    run = client.get_run(first["mlflow_run_id"])
    params = run.data.params
    assert params["loss.name"] == "nt_xent" and params["world_size"] == "1"
    assert params["version.torch"].startswith("2.")
    tags = run.data.tags
    assert tags["method"] == "nt_xent" and tags["world_size"] == "1" and tags["dataset"] == "builtin:digits"
    assert len(tags["mlflow.source.git.commit"]) == 40 and tags["mlflow.source.name"] == "hardneg train"
    assert "nt_xent" in tags["mlflow.note.content"] and "builtin:digits" in tags["mlflow.note.content"]
    # only the chosen method's settings, and no bookkeeping, among the params
    assert not any(k.startswith(("loss.psm_", "loss.mochi_")) for k in params), sorted(params)
    assert "loss.tau_plus" not in params and "tracking.run_id" not in params and "loss.temperature" in params
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.name == "digits" and len(dataset.dataset.digest) == 16
    assert json.loads(dataset.dataset.profile)["splits"]["train"] > 0
    assert params["cluster.address"] == "ray://admin:***@10.0.0.1:10001"
    metrics = run.data.metrics
    for key in (
        "train/loss",
        "train/lr",
        "perf/images_per_s",
        "perf/data_wait_share",
        "eval/knn_top1",
        "eval/knn_top1_best",
        "negatives/cos_hardest_negative_mean",
        "negatives/same_class_share_of_hardest",
    ):
        assert key in metrics, key
    assert 0.0 <= metrics["perf/data_wait_share"] <= 1.0
    assert metrics["eval/knn_top1_best"] >= metrics["eval/knn_top1"]
    assert any(k.startswith("system/") for k in metrics), sorted(metrics)  # CPU / memory sampling

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "checkpoints", "plots"} <= artifacts
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert "plots/embedding.png" in plots and "plots/curves.png" not in plots  # MLflow draws the curves
    histograms = [a.path for a in client.list_artifacts(run.info.run_id, "plots/similarities")]
    assert histograms and all(p.endswith(".png") for p in histograms)  # positives vs negatives, per kNN epoch
    for name in ("embedding.png",):
        with Image.open(client.download_artifacts(run.info.run_id, f"plots/{name}")) as image:
            assert image.format == "PNG" and image.size[0] > 100
    ckpts = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert ckpts == {"checkpoints/last", "checkpoints/best"}
    versions = client.search_model_versions(f"name='enc-{store}'")
    assert [v.run_id for v in versions] == [run.info.run_id]
    version = client.get_model_version(f"enc-{store}", versions[0].version)
    assert sorted(version.aliases) == ["best", "last", "last-run-best"]  # one epoch: the last is the best
    assert "nt_xent" in version.description and "eval/knn_top1" in version.description
    meta = json.load(open(client.download_artifacts(run.info.run_id, "checkpoints/best/meta.json")))
    assert meta["best_by"]["metric"] == "eval/knn_top1"
    assert meta["best_by"]["value"] == pytest.approx(metrics["eval/knn_top1"], rel=1e-5)
    (model,) = client.search_logged_models([run.info.experiment_id])
    assert model.tags["mlflow.source.name"] == "hardneg train"  # not Ray's default_worker.py
    linked = {m.key: m for m in model.metrics}
    assert linked["eval/knn_top1"].step == first["step"]
    assert linked["eval/knn_top1"].value == pytest.approx(metrics["eval/knn_top1"])
    assert SECRET not in logged_text(client, run.info.run_id)

    # Resume for a second epoch into the same run: every metric's steps strictly increase.
    second = train_command.train_run(tiny_config(tmp_path, digits_shards, *common, "train.epochs=2"), resume="t1")
    assert second["mlflow_run_id"] == first["mlflow_run_id"]
    for key in ("train/loss", "train/lr", "perf/images_per_s", "eval/knn_top1", "eval/knn_top1_best"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert steps == sorted(set(steps)) and steps[-1] == second["step"], (key, steps)
    assert SECRET not in logged_text(client, run.info.run_id)


def test_replayed_steps_are_not_logged_twice(tmp_path):
    cfg = tiny_config(tmp_path, "unused").tracking
    first = tracking.MlflowTracker(cfg)
    first.log_metrics({"loss": 1.0}, step=5)
    first.log_metrics({"loss": 0.9, "knn_top1": 0.5}, step=10)
    restarted = tracking.MlflowTracker(cfg, run_id=first.run_id)  # a worker restarted from step 5
    restarted.log_metrics({"loss": 0.95}, step=10)  # replayed: dropped
    restarted.log_metrics({"loss": 0.8, "knn_top1": 0.6}, step=15)
    history = restarted.history("loss")
    assert history == [(5, 1.0), (10, 0.9), (15, 0.8)]
    assert restarted.history("knn_top1") == [(10, 0.5), (15, 0.6)]


def test_redaction():
    r = redaction.redact(
        {
            "aws_secret_access_key": "x",
            "nested": {"api_key": "y", "ok": 1},
            "uri": "https://bob:pa55@host/x",
            "note": "key AKIAABCDEFGHIJKLMNOP here",
            "plain": "s3://bucket/path",
        }
    )
    assert r == {
        "aws_secret_access_key": "***",
        "nested": {"api_key": "***", "ok": 1},
        "uri": "https://bob:***@host/x",
        "note": "key *** here",
        "plain": "s3://bucket/path",
    }


def test_runs_table_cli(tmp_path, capsys):
    cfg = tiny_config(tmp_path, "unused").tracking
    tracker = tracking.MlflowTracker(cfg)
    tracker.log_params({"loss.name": "hcl", "loss.beta": 2.0, "train.global_batch_size": 256})
    tracker.log_metrics({"knn_top1": 0.91, "images_per_s": 100.0}, step=1)
    tracker.log_metrics({"images_per_s": 300.0}, step=2)
    tracker.finish()
    assert cli_main(["runs", "hardneg", "--tracking-uri", cfg.uri, "--wide"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:4] == ["run", "run", "id", "method"] and "temperature" in out[0]
    assert "hcl" in out[1] and "0.9100" in out[1] and "200.0" in out[1] and tracker.run_id in out[1]
    assert cli_main(["runs", "nope", "--tracking-uri", cfg.uri]) == 2


def test_checkpoints_hold_the_redacted_config_and_resume_still_matches(tmp_path):
    cfg = tiny_config(tmp_path, "unused", f"cluster.address=ray://admin:{SECRET}@10.0.0.1:10001")
    saved = train._state(
        torch.nn.Linear(2, 2),
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1),
        step=3,
        epoch=1,
        cfg=cfg,
        run_id=None,
    )["config"]
    assert SECRET not in repr(saved) and saved["cluster"]["address"] == "ray://admin:***@10.0.0.1:10001"
    assert train.resume_mismatches(saved, cfg) == []  # the same run, though its checkpoint lost the password
    other = tiny_config(
        tmp_path, "unused", f"cluster.address=ray://admin:{SECRET}@10.0.0.1:10001", "loss.temperature=0.2"
    )
    assert train.resume_mismatches(saved, other) == [f"loss.temperature: {cfg.loss.temperature!r} -> 0.2"]
