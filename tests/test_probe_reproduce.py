"""Linear probe on separable features; the reproduce grid: its plan (which trial may start when: lr choice first,
records on disk), its table, and on the shared Ray it skips finished cells, resumes interrupted ones and
chooses each method's lr on the validation split."""

from __future__ import annotations

import json
import os
import pathlib

import pytest
import torch
import yaml
from conftest import tiny_config

from pipeline import checkpoint
from pipeline.app import train_command
from pipeline.app.grid_plan import DONE, GridPlan
from pipeline.app.grid_table import table
from pipeline.app.reproduce import Grid, _cell_config, _results, load_grid, reproduce
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


@pytest.mark.ray
@pytest.mark.slow  # tens of seconds of CPU: not in make test-fast
def test_grid_skips_finished_and_resumes_interrupted(tmp_path, digits_shards, shared_ray):
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


def _run_plan_here(results: dict):
    """A stand-in for the Tune runner: the plan's trials one after another in this process, with fake results."""

    def run(plan, probes, max_concurrent):
        while (spec := plan.next_trial()) != DONE:
            assert spec is not None  # nothing runs meanwhile, so something is always startable
            result = results.get(spec["method"], {"knn_top1": 0.5})
            plan.trial_finished(
                spec["id"],
                {
                    "method": spec["method"],
                    "dataset": spec["dataset"],
                    "seed": spec["seed"],
                    "cell": spec["id"],
                    "wall_s": 1,
                }
                | ({"val_knn_top1": spec["lr"]} if spec["kind"] == "lr" else result),
            )

    return run


def test_grid_runs_only_the_named_methods(tmp_path, monkeypatch):
    import pipeline.app.reproduce as reproduce_mod

    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text("{}")
    grid_path = write_grid(tmp_path, str(shards), epochs=1)
    monkeypatch.setattr(reproduce_mod, "_check_cells", lambda grid, cfgs: None)  # no data: the plan alone
    monkeypatch.setattr(reproduce_mod, "_run_on_ray", _run_plan_here({}))
    text = reproduce(grid_path, methods=["hcl"])
    assert os.listdir(tmp_path / "results" / "tiny" / "cells") == ["hcl-digits-s0.json"]
    assert "| hcl | digits | – | 50.00 ± 0.00 |" in text and "| nt_xent | digits | – | – |" in text
    with pytest.raises(HardnegError, match="no method simclr; it has: nt_xent, hcl"):
        reproduce(grid_path, methods=["simclr"])


def _plan(tmp_path, lrs=None, only=None, events=None) -> GridPlan:
    """Methods a, b on dataset d, seeds 0 and 1, records under tmp_path/cells; ``events`` collects (kind, cell)."""
    cells = tmp_path / "cells"
    cells.mkdir(exist_ok=True)
    return GridPlan(
        ["a", "b"],
        ["d"],
        [0, 1],
        lrs or {},
        str(cells),
        lambda kind, method, dataset, seed, lr: {"kind": kind, "method": method, "seed": seed, "lr": lr},
        only=only,
        on_event=lambda kind, record: (events if events is not None else []).append((kind, record.get("cell"))),
    )


def _finish(plan, spec, **values):
    plan.trial_finished(spec["id"], {"method": spec["method"], "dataset": "d", "seed": spec["seed"]} | values)


def test_plan_runs_a_methods_seeds_after_its_lr_choice_and_fills_the_gaps_with_other_methods(tmp_path):
    plan = _plan(tmp_path, lrs={"a": [0.1, 0.2]})
    first, second = plan.next_trial(), plan.next_trial()
    assert [(s["kind"], s["id"]) for s in (first, second)] == [("lr", "a-d-lr0.1-s0-val"), ("lr", "a-d-lr0.2-s0-val")]
    # a's seeds wait for its lr: b's cells fill the free slots meanwhile
    b0, b1 = plan.next_trial(), plan.next_trial()
    assert [b0["id"], b1["id"]] == ["b-d-s0", "b-d-s1"] and plan.next_trial() is None
    _finish(plan, first, val_knn_top1=0.7)
    assert plan.next_trial() is None  # one candidate still trains
    _finish(plan, second, val_knn_top1=0.9)
    choice = json.loads((tmp_path / "cells" / "a-d-lr.json").read_text())
    assert choice["chosen_lr"] == 0.2 and choice["val_knn_top1"] == {"0.1": 0.7, "0.2": 0.9}
    a0 = plan.next_trial()
    assert (a0["kind"], a0["id"], a0["lr"]) == ("seed", "a-d-s0", 0.2)
    assert plan.remaining() == 4  # a-d-s0, b-d-s0, b-d-s1 running; a-d-s1 to start
    for spec in (a0, plan.next_trial(), b0, b1):
        _finish(plan, spec, knn_top1=0.5)
    assert plan.next_trial() == DONE and plan.remaining() == 0

    # a new plan over the same records (a rerun): nothing left to start
    again = _plan(tmp_path, lrs={"a": [0.1, 0.2]})
    assert again.next_trial() == DONE


def test_plan_fails_cells_in_one_record_each_and_reruns_them(tmp_path):
    events = []
    plan = _plan(tmp_path, lrs={"a": [0.1]}, events=events)
    candidate, b0, b1 = plan.next_trial(), plan.next_trial(), plan.next_trial()
    plan.trial_failed(candidate["id"], "HardnegError: diverged", attempts=2)  # a's only candidate: no lr for a
    plan.trial_failed(b0["id"], "RuntimeError: boom", attempts=2)
    _finish(plan, b1, knn_top1=0.5)
    assert plan.next_trial() == DONE  # a's seeds fail at once: they cannot run without an lr
    failed = {p.name: json.loads(p.read_text()) for p in (tmp_path / "cells").glob("*.failed.json")}
    assert sorted(failed) == ["a-d-s0.failed.json", "a-d-s1.failed.json", "b-d-s0.failed.json"]
    assert failed["a-d-s0.failed.json"]["failed"] == "no lr candidate finished (lr 0.1: HardnegError: diverged)"
    assert failed["b-d-s0.failed.json"] == failed["b-d-s0.failed.json"] | {
        "failed": "RuntimeError: boom",
        "attempts": 2,
    }
    assert [e for e in events if e[0] == "failed"] == [("failed", "b-d-s0"), ("failed", "a-d-s0"), ("failed", "a-d-s1")]

    grid = Grid(name="g", datasets={"d": "x"}, methods={"a": "a.yaml", "b": "b.yaml"}, seeds=[0, 1])
    text = table(grid, _results(grid, str(tmp_path / "cells")))
    assert "| b | d | – | 50.00 ± 0.00 | – | 1 |" in text
    assert "| b | d | seed 0 | failed: RuntimeError: boom | | | | |" in text
    assert "| a | d | seed 1 | failed: no lr candidate finished (lr 0.1: HardnegError: diverged) |" in text

    # a rerun tries the failed cells again (and the lr candidate); a success removes the failure record
    again = _plan(tmp_path, lrs={"a": [0.1]})
    candidate, b0 = again.next_trial(), again.next_trial()
    assert (candidate["id"], b0["id"], again.next_trial()) == ("a-d-lr0.1-s0-val", "b-d-s0", None)
    _finish(again, b0, knn_top1=0.6)
    assert not (tmp_path / "cells" / "b-d-s0.failed.json").exists()


def test_plan_max_cells_bounds_the_cells_started(tmp_path):
    plan = _plan(tmp_path, only=1)
    spec = plan.next_trial()
    assert spec["id"] == "a-d-s0" and plan.next_trial() is None
    _finish(plan, spec, knn_top1=0.5)
    assert plan.next_trial() == DONE and plan.remaining() == 0  # --max-cells 1: nothing more this run


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


@pytest.mark.ray
@pytest.mark.slow  # tens of seconds of CPU: not in make test-fast
def test_grid_chooses_each_methods_lr_on_the_validation_split(tmp_path, digits_shards, shared_ray, capsys):
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
    runs = sorted(name for name in os.listdir(root / "runs") if not name.startswith("."))  # .tune: Tune's files
    assert runs == ["nt_xent-digits-lr0.05-s0", "nt_xent-digits-lr0.1-s0"]  # seed 0 reused the chosen candidate
    assert f"| {choice['chosen_lr']:g} |" in text and "| 12.50 |" in text
    assert "(published 12.50)" in capsys.readouterr().out


def test_launch_grid_submits_reproduce_and_refuses_what_the_job_would_lose(tmp_path):
    from cluster.submit import grid_job_spec
    from pipeline.app.reproduce import cell_configs

    root = pathlib.Path(__file__).resolve().parents[1]
    grid = load_grid(str(root / "configs" / "grids" / "stl10_hcl.yaml"))
    remote = ["data.path=s3://b/stl10", "cluster.storage_path=s3://b/runs", "tracking.uri=http://m:5000"]
    cells = cell_configs(grid, "/abs/results", [*remote, "cluster.address=auto"])
    assert [c.tracking.run_name for c in cells] == ["simclr-stl10-s0", "dcl-stl10-s0", "hcl-stl10-s0"]
    spec = grid_job_spec("configs/grids/stl10_hcl.yaml", cells, remote, out="/abs/results", working_dir=root)
    assert spec["entrypoint"].startswith(
        "python -m pipeline.app.cli reproduce configs/grids/stl10_hcl.yaml --address auto --out /abs/results "
        "data.path=s3://b/stl10"
    )
    with pytest.raises(HardnegError, match="grid out: results is relative"):
        grid_job_spec("configs/grids/stl10_hcl.yaml", cells, remote, out="results", working_dir=root)
    local = cell_configs(grid, "/abs/results", ["cluster.address=auto"])  # data/stl10: only in the job's dir
    with pytest.raises(HardnegError, match="data.path=data/stl10 is relative"):
        grid_job_spec("configs/grids/stl10_hcl.yaml", local, [], out="/abs/results", working_dir=root)
