"""The trained encoder downstream: the registered MLflow model at any batch size and what its aliases mean,
`hardneg export` and `hardneg embed` through the real CLI, and the README's three lines without hardneg."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import mlflow
import mlflow.pyfunc
import mlflow.pytorch
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import tiny_config
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from pipeline import augment, checkpoint, data, dist, train
from pipeline.app import train_command
from pipeline.app.cli import main
from pipeline.encoder_io import SPEC_FILE, WEIGHTS_FILE
from pipeline.evaluate import encoder_from_checkpoint
from pipeline.features import extract_features
from pipeline.objectives import build_objective

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HARDNEG = os.path.join(os.path.dirname(sys.executable), "hardneg")
# a Python without hardneg: its three packages cannot be imported
NO_HARDNEG = "import sys; sys.modules.update(pipeline=None, data_prep=None, cluster=None)\n"


def _backbone_at(run_dir: str, step: int) -> torch.nn.Module:
    backbone, _, state = encoder_from_checkpoint(os.path.join(run_dir, f"checkpoint_{step:08d}"))
    assert state["step"] == step
    return backbone.eval()


@pytest.mark.slow  # two trainings that each log an exported model
def test_registered_model_runs_any_batch_and_best_is_best_across_versions(tmp_path, digits_shards, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # tiny_config's store
    common = [
        "cluster.launcher=local",
        "tracking.registered_model=enc",
        "tracking.log_model=true",
        "train.knn_every_epochs=1",
    ]
    # two runs: the second is the newest, so "last" and "last-run-best" are its own; "best" is whichever version's
    # kNN is highest of all (test_best_version_is_the_highest_knn_not_the_newest pins that down on fixed values)
    train_command.train_run(tiny_config(tmp_path, digits_shards, *common, "tracking.run_name=a", "optim.lr=0.001"))
    train_command.train_run(tiny_config(tmp_path, digits_shards, *common, "tracking.run_name=b", "train.epochs=2"))
    client = MlflowClient(uri)
    versions = client.search_model_versions("name='enc'")
    runs = {v.version: client.get_run(v.run_id).info.run_name for v in versions}
    knn = {v.version: float(v.tags["knn_top1"]) for v in versions}
    assert set(runs.values()) == {"a", "b"} and len(knn) == len(versions) >= 2
    for v in versions:  # each version's tag is its run's monitored kNN at its step
        history = {m.step: m.value for m in client.get_metric_history(v.run_id, "eval/knn_top1")}
        assert knn[v.version] == pytest.approx(history[int(v.tags["step"])], abs=1e-6)
    top = max(knn.values())
    best = client.get_model_version_by_alias("enc", "best")
    assert knn[best.version] == top and int(best.version) == max(int(v) for v, k in knn.items() if k == top)
    newest = [v for v in knn if runs[v] == "b"]
    last = client.get_model_version_by_alias("enc", "last")
    assert runs[last.version] == "b" and "encoder-best" not in last.source
    run_best = client.get_model_version_by_alias("enc", "last-run-best")
    assert runs[run_best.version] == "b" and knn[run_best.version] == max(knn[v] for v in newest)
    print("kNN per version:", {f"{runs[v]}/v{v}": k for v, k in knn.items()}, "best ->", best.version)

    mlflow.set_tracking_uri(uri)
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")  # MLflow then checks the archive is pickle-free
    for alias, version in (("best", best), ("last", last)):
        model = mlflow.pytorch.load_model(f"models:/enc@{alias}")
        reference = _backbone_at(str(tmp_path / "runs" / runs[version.version]), int(version.tags["step"]))
        for batch in (1, 7, 64):
            x = torch.randn(batch, 3, 8, 8)
            with torch.no_grad():
                torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)
        # no device is baked into the graph, so model.to("cuda") moves the whole program
        assert not [n for n in model.graph.nodes if isinstance(n.kwargs.get("device"), torch.device)]
        pyfunc = mlflow.pyfunc.load_model(f"models:/enc@{alias}")
        x = np.random.default_rng(0).standard_normal((7, 3, 8, 8)).astype(np.float32)
        with torch.no_grad():
            np.testing.assert_allclose(pyfunc.predict(x), reference(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-5)


def test_best_version_is_the_highest_knn_not_the_newest(tmp_path):
    """tracking.best_version over a real registry (SQLite): the highest knn_top1 tag wins, the newest on a tie,
    and versions without the tag are no candidates."""
    from pipeline.tracking import best_version

    client = MlflowClient(f"sqlite:///{tmp_path / 'r.db'}")
    client.create_registered_model("m")
    assert best_version(client, "m") is None
    for knn in ("0.61", "0.90", None, "0.75", "0.90"):
        version = client.create_model_version("m", source=str(tmp_path)).version
        if knn is not None:
            client.set_model_version_tag("m", version, "knn_top1", knn)
        if version == 2:
            assert best_version(client, "m") == "2"
    assert best_version(client, "m") == "5"  # 0.90 twice: the newer of the two, not version 4 (0.75)
    client.delete_model_version("m", "5")
    assert best_version(client, "m") == "2"


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, digits_shards):
    """A checkpoint of one tiny local training run (width-4 ResNet-18, 8 px)."""
    tmp = tmp_path_factory.mktemp("encoder-use")
    run_dir = str(tmp / "runs" / "e")
    cfg = tiny_config(tmp, digits_shards, "tracking.enabled=false", "tracking.run_name=e")
    train.run(cfg, dist.current_context(), train.LocalHooks(run_dir))
    return checkpoint.latest(run_dir)


def _run_without_hardneg(script: str, cwd) -> None:
    proc = subprocess.run([sys.executable, "-c", NO_HARDNEG + script], cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_export_writes_safetensors_and_a_json_whose_torchvision_lines_build_it(tiny_checkpoint, tmp_path):
    out = tmp_path / "encoder"
    proc = subprocess.run([HARDNEG, "export", tiny_checkpoint, str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout and sorted(os.listdir(out)) == [SPEC_FILE, WEIGHTS_FILE]
    backbone, cfg, state = encoder_from_checkpoint(tiny_checkpoint)
    weights = load_file(str(out / WEIGHTS_FILE))
    assert weights.keys() == backbone.state_dict().keys()
    for key, value in backbone.state_dict().items():
        assert torch.equal(weights[key], value), key
    spec = json.loads((out / SPEC_FILE).read_text())
    assert spec["feature_dim"] == 32 and spec["width"] == 4 and spec["input"]["shape"] == ["N", 3, 8, 8]
    assert spec["input"]["mean"] == list(cfg.augment.mean) and spec["trained"]["step"] == state["step"]

    x = torch.randn(5, 3, 8, 8)
    torch.save(x, tmp_path / "x.pt")
    script = spec["build_code"] + (
        "import safetensors.torch\n"
        f"net.load_state_dict(safetensors.torch.load_file({str(out / WEIGHTS_FILE)!r})); net.eval()\n"
        "with torch.no_grad(): torch.save(net(torch.load('x.pt')), 'y.pt')\n"
    )
    _run_without_hardneg(script, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "y.pt"), backbone.eval()(x), rtol=1e-6, atol=1e-6)


def test_the_readme_three_lines_load_the_default_network(tmp_path, digits_shards):
    """The README's lines, verbatim, on an export of the default backbone (ResNet-18, CIFAR stem, width 64)."""
    text = open(os.path.join(REPO, "README.md")).read()
    block = re.search(r"<!-- encoder-three-lines -->.*?\n```python\n(.*?)```", text, re.S)
    assert block is not None, "the README lost its marked three lines"
    lines = block.group(1)
    assert len(lines.strip().splitlines()) == 3
    cfg = tiny_config(tmp_path, digits_shards, "model.width=64", "augment.image_size=32")
    torch.manual_seed(0)
    objective = build_objective(cfg)
    for module in objective.backbone.modules():  # non-trivial BN statistics, as after training
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
    optimizer = train.build_optimizer(cfg.optim, objective)
    state = train._state(objective, optimizer, 7, 1, cfg, None)
    checkpoint.write(state, str(tmp_path / "ckpt"))
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "encoder")]) == 0
    x = torch.randn(3, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    _run_without_hardneg(lines + "with torch.no_grad(): torch.save(net(torch.load('x.pt')), 'y.pt')\n", tmp_path)
    with torch.no_grad():
        want = objective.backbone.eval()(x)
    assert want.shape == (3, 512)
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), want, rtol=1e-6, atol=1e-6)


def test_embed_writes_the_features_and_labels_of_a_split(tiny_checkpoint, tmp_path, digits_shards, capsys):
    backbone, cfg, _ = encoder_from_checkpoint(tiny_checkpoint)
    transform = augment.eval_transform(cfg.augment, cfg.eval.eval_image_size)
    want, want_y = extract_features(backbone, data.eval_batches(digits_shards, "test", transform, 64))

    proc = subprocess.run(
        [HARDNEG, "embed", tiny_checkpoint, digits_shards, str(tmp_path / "f.parquet")], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "embed test" in proc.stderr  # the progress bar
    assert json.loads(proc.stdout)["samples"] == len(want_y) == 300
    table = pq.read_table(tmp_path / "f.parquet")
    np.testing.assert_array_equal(table.column("label").to_numpy(), want_y.numpy())
    feats = np.stack(table.column("feature").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(feats, want.numpy(), rtol=1e-5, atol=1e-6)

    assert main(["embed", tiny_checkpoint, digits_shards, str(tmp_path / "npy"), "--split", "holdout"]) == 0
    capsys.readouterr()
    hold, hold_y = extract_features(backbone, data.eval_batches(digits_shards, "holdout", transform, 64))
    np.testing.assert_allclose(np.load(tmp_path / "npy" / "features.npy"), hold.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.load(tmp_path / "npy" / "labels.npy"), hold_y.numpy())

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    for command in (["export", tiny_checkpoint], ["embed", tiny_checkpoint, digits_shards]):
        assert main([*command, str(tmp_path / "mine")]) == 2  # a folder of someone's files is never replaced
        assert "refusing to replace" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert main(["embed", tiny_checkpoint, digits_shards, str(tmp_path / "x"), "--split", "nope"]) == 2
    assert "split 'nope' not in" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # nothing half-written
