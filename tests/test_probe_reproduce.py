"""Linear probe on separable features; the reproduce grid skips finished cells and resumes interrupted ones."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from conftest import tiny_config

from pipeline import checkpoint
from pipeline.app import train_command
from pipeline.app.reproduce import _cell_config, load_grid, reproduce
from pipeline.config import EvalConfig
from pipeline.errors import HardnegError
from pipeline.probe import accuracy, fit_linear


@pytest.mark.parametrize("optimizer,lr", [("adam", 5e-2), ("sgd", 1.0)])
def test_linear_probe_separates_linearly_separable_features(optimizer, lr):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 4, generator=g)
    feats = torch.randn(3000, 16, generator=g)
    logits = feats @ w
    top2 = logits.topk(2, dim=1).values
    keep = (top2[:, 0] - top2[:, 1]) > 1.0  # separable with a margin, by construction
    feats, labels = feats[keep][:600], logits[keep][:600].argmax(dim=1)
    cfg = EvalConfig(
        probe_epochs=100, probe_optimizer=optimizer, probe_lr=lr, probe_batch_size=64, probe_weight_decay=0.0
    )

    def batches(epoch):
        order = torch.randperm(500, generator=torch.Generator().manual_seed(epoch))
        for i in range(0, 500, 64):
            yield feats[order[i : i + 64]], labels[order[i : i + 64]]

    classifier = fit_linear(batches, 16, 4, cfg)
    assert accuracy(classifier, feats[500:], labels[500:]) >= 0.99


def write_grid(tmp_path, digits_shards, epochs: int) -> str:
    base = tiny_config(tmp_path, digits_shards)
    method_cfg = tmp_path / "nt_xent.yaml"
    method_cfg.write_text(
        yaml.safe_dump(
            {
                "augment": {"image_size": 8, "hflip_p": 0.0, "crop_scale_min": 0.6},
                "model": {"width": 4, "proj_hidden_dim": 32, "proj_dim": 16},
                "train": {"global_batch_size": 128, "log_every_steps": 4, "knn_every_epochs": 0},
                "cluster": {"launcher": "local"},
                "eval": {"knn_k": 20},
                "tracking": {"uri": base.tracking.uri, "log_model": False, "system_metrics_every_s": 0},
            }
        )
    )
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        yaml.safe_dump(
            {
                "name": "tiny",
                "out": str(tmp_path / "results"),
                "datasets": {"digits": digits_shards},
                "methods": {"nt_xent": str(method_cfg), "hcl": str(method_cfg)},
                "seeds": [0],
                "overrides": [f"train.epochs={epochs}", "eval.probe_epochs=2", "eval.probe_augment=false"],
                "published": {"hcl": {"digits": 99.0}},
            },
            sort_keys=False,
        )
    )
    return str(grid)


@pytest.mark.slow  # tens of seconds of CPU: not in make test-fast
def test_grid_skips_finished_and_resumes_interrupted(tmp_path, digits_shards):
    grid_path = write_grid(tmp_path, digits_shards, epochs=2)
    root = tmp_path / "results" / "tiny"
    # An interrupted cell: its training stopped after epoch 1 of 2.
    cell_cfg = _cell_config(load_grid(grid_path), "hcl", "digits", 0, str(root))
    interrupted = train_command.train_run(train_command._with(cell_cfg, "train", epochs=1))
    assert interrupted["step"] == 10

    reproduce(grid_path, only=1)  # runs nt_xent only
    cells = sorted(os.listdir(root / "cells"))
    assert cells == ["nt_xent-digits-s0.json"]
    first = json.loads((root / "cells" / cells[0]).read_text())
    assert first["step"] == 20 and 0 <= first["knn_top1"] <= 1 and 0 <= first["linear_top1"] <= 1
    mtime = os.path.getmtime(root / "cells" / cells[0])

    text = reproduce(grid_path)  # skips nt_xent, resumes hcl from step 10
    assert os.path.getmtime(root / "cells" / cells[0]) == mtime
    hcl = json.loads((root / "cells" / "hcl-digits-s0.json").read_text())
    assert hcl["step"] == 20 and hcl["mlflow_run_id"] == interrupted["mlflow_run_id"]
    assert checkpoint.load(checkpoint.latest(str(root / "runs" / "hcl-digits-s0")))["step"] == 20
    assert "| nt_xent | digits |" in text and "| 99.00 |" in text
    assert (root / "table.md").read_text() == text


def test_grid_runs_only_the_named_methods(tmp_path, monkeypatch):
    import pipeline.app.reproduce as reproduce_mod

    grid_path = write_grid(tmp_path, str(tmp_path / "shards"), epochs=1)
    ran = []

    def fake_cell(grid, method, dataset, seed, root, lr=None):
        ran.append(method)
        return {
            "method": method,
            "dataset": dataset,
            "seed": seed,
            "cell": f"{method}-{dataset}-s{seed}",
            "knn_top1": 0.5,
        }

    monkeypatch.setattr(reproduce_mod, "run_cell", fake_cell)
    text = reproduce(grid_path, methods=["hcl"])
    assert ran == ["hcl"] and os.listdir(tmp_path / "results" / "tiny" / "cells") == ["hcl-digits-s0.json"]
    assert "| hcl | digits | – | 50.00 ± 0.00 |" in text and "| nt_xent | digits | – | – |" in text
    with pytest.raises(HardnegError, match="no method simclr; it has: nt_xent, hcl"):
        reproduce(grid_path, methods=["simclr"])


def test_grid_file_errors(tmp_path):
    with pytest.raises(HardnegError, match="grid file not found"):
        load_grid(str(tmp_path / "none.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndatasets: {d: here}\nmethods: {m: nowhere.yaml}\n")
    with pytest.raises(HardnegError, match="config of method 'm' not found"):
        load_grid(str(bad))
    bad.write_text("name: x\ndatasets: {d: here}\nmethods: {}\nseedz: [1]\n")
    with pytest.raises(HardnegError, match="seedz"):
        load_grid(str(bad))


def test_eval_all_protocols_with_augmented_probe_logs_into_the_run(tmp_path, digits_shards):
    from mlflow.tracking import MlflowClient

    from pipeline.evaluate import evaluate_checkpoint

    run = train_command.train_run(
        tiny_config(
            tmp_path,
            digits_shards,
            "cluster.launcher=local",
            "train.knn_every_epochs=0",
            "tracking.log_model=false",
            "tracking.system_metrics_every_s=0",
        )
    )
    result = evaluate_checkpoint(
        run["checkpoint"],
        digits_shards,
        ["eval.probe_epochs=2", "eval.probe_batch_size=128"],
        protocol="all",
        track=True,
    )
    assert result["probe_augment"] is True and result["probe_epochs"] == 2
    assert 0.1 < result["linear_top1"] <= 1.0 and 0.1 < result["knn_top1"] <= 1.0
    after = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run["mlflow_run_id"])
    assert after.info.status == "FINISHED"  # evaluation logs into the run without leaving it RUNNING
    logged = after.data.metrics
    # the MLflow view's grouped names, logged to 6 significant digits
    assert logged["eval/probe_top1"] == pytest.approx(result["linear_top1"], rel=1e-5)
    assert logged["eval/knn_top1_checkpoint"] == pytest.approx(result["knn_top1"], rel=1e-5)


def test_probe_transform_follows_the_release_protocols():
    from torchvision.transforms import v2

    from pipeline.config import AugmentConfig, EvalConfig
    from pipeline.probe import probe_transform

    def kinds(tf):
        out = []
        for t in tf.transforms:
            out += [type(x).__name__ for x in t.transforms] if isinstance(t, v2.RandomApply) else [type(t).__name__]
        return out

    aug = AugmentConfig(blur_p=0.0)
    plain = probe_transform(aug, EvalConfig(probe_crop_min=0.25))
    assert kinds(plain)[:2] == ["RandomResizedCrop", "RandomHorizontalFlip"] and "ColorJitter" not in kinds(plain)
    assert plain.transforms[0].scale == (0.25, 1.0)
    sscl = probe_transform(aug, EvalConfig(probe_transform="train", probe_crop_min=0.25, probe_blur_p=0.5))
    assert {"ColorJitter", "RandomGrayscale", "GaussianBlur"} <= set(kinds(sscl))
    assert sscl.transforms[0].scale == (0.25, 1.0)
    hcl = probe_transform(AugmentConfig(blur_p=0.5), EvalConfig(probe_transform="train"))
    assert "GaussianBlur" in kinds(hcl) and hcl.transforms[0].scale == (0.08, 1.0)


@pytest.mark.slow  # tens of seconds of CPU: not in make test-fast
def test_grid_chooses_each_methods_lr_on_the_validation_split(tmp_path, digits_shards, capsys):
    grid_path = write_grid(tmp_path, digits_shards, epochs=1)
    raw = yaml.safe_load(open(grid_path))
    raw["methods"] = {"nt_xent": raw["methods"]["nt_xent"]}
    raw["lrs"] = {"nt_xent": [0.05, 0.1]}
    raw["published"] = {"nt_xent": {"digits": 12.5}}
    raw["overrides"] += ["eval.probe_epochs=1"]
    with open(grid_path, "w") as f:
        yaml.safe_dump(raw, f)
    text = reproduce(grid_path)
    root = tmp_path / "results" / "tiny"
    choice = json.loads((root / "cells" / "nt_xent-digits-lr.json").read_text())
    scores = {float(k): v for k, v in choice["val_knn_top1"].items()}
    assert set(scores) == {0.05, 0.1} and choice["chosen_lr"] == max(scores, key=scores.get)
    cell = json.loads((root / "cells" / "nt_xent-digits-s0.json").read_text())
    assert cell["lr"] == choice["chosen_lr"] and cell["query_split"] == "test"  # test only in the final evaluation
    assert sorted(os.listdir(root / "runs")) == ["nt_xent-digits-lr0.05-s0", "nt_xent-digits-lr0.1-s0"]  # reused
    assert f"| {choice['chosen_lr']:g} |" in text and "| 12.50 |" in text
    assert "(published 12.50)" in capsys.readouterr().out
