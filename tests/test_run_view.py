"""What a reader of the MLflow store sees: grouped metric names and their docs table, the params and
description of a run, `hardneg runs` on new and older stores (sort, CSV, markdown), the explanatory plots."""

from __future__ import annotations

import csv
import io
import json
import os

import pytest
import torch
from conftest import tiny_config
from PIL import Image

from pipeline import config, metric_names, plots, run_info, tracking, tracking_runs
from pipeline.app.cli import main as cli_main
from pipeline.losses import diagnostics
from pipeline.objectives import build_objective

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_diagnostic_has_a_grouped_name_and_the_docs_table_is_current():
    z1, z2 = torch.randn(8, 16), torch.randn(8, 16)
    stats = diagnostics.in_batch_stats(
        z1,
        z2,
        temperature=0.5,
        beta=1.0,
        n_hard=4,
        labels=torch.arange(8) % 3,
        n_synthetic=2,
        generator=torch.Generator().manual_seed(0),
    )
    named = metric_names.grouped(
        {"loss": 1.0, "lr": 0.1, "images_per_s": 10.0, "data_wait_share": 0.01}
        | {k: float(v) for k, v in stats.items()}
    )
    assert set(stats) <= set(metric_names.METRICS)  # nothing reaches MLflow under an unexplained name
    groups = {name.split("/")[0] for name in named}
    assert groups == {"train", "perf", "negatives"}
    assert "negatives/same_class_share_of_hardest" in named and "negatives/hcl_effective_count" in named
    assert not any("sim_pos_max" in k or "cos_positive_max" in k for k in named)  # always ~1: not logged
    assert metric_names.grouped({"custom": 1.0}) == {"custom": 1.0}
    assert metric_names.grouped({"loss": 0.123456789123}) == {"train/loss": 0.123457}
    with open(os.path.join(ROOT, "docs", "metrics.md")) as f:
        assert metric_names.markdown_table() in f.read(), "docs/metrics.md: paste metric_names.markdown_table()"


@pytest.mark.parametrize("method", ["nt_xent", "hcl", "sscl", "psm", "mochi"])
def test_params_hold_the_chosen_method_only(tmp_path, method):
    cfg = tiny_config(tmp_path, "unused", f"loss.name={method}", "tracking.run_id=abc", "tracking.run_name=r1")
    params = run_info.run_params(cfg)
    loss = {k.split(".", 1)[1] for k in params if k.startswith("loss.")}
    assert loss == set(config.loss_keys(method))
    assert {"name", "temperature"} <= loss
    assert not any(k.startswith(("psm_", "mochi_")) and not k.startswith(method) for k in loss), loss
    assert "tracking.run_id" not in params and "tracking.run_name" not in params
    assert params["train.global_batch_size"] == 128  # everything else stays
    assert ("tau_plus" in loss) == (method in ("hcl", "sscl")) and ("beta" in loss) == (method in ("hcl", "sscl"))


def test_note_tags_and_dataset_describe_the_run(tmp_path, digits_shards):
    from data_prep.manifest import read_manifest

    cfg = tiny_config(tmp_path, digits_shards, "loss.name=hcl", "loss.beta=2.0")
    manifest = read_manifest(digits_shards)
    note = run_info.run_note(cfg, manifest, world_size=2)
    assert "hcl" in note and "beta=2.0" in note and "builtin:digits" in note and "2 worker(s)" in note
    assert note.count(". ") <= 2  # one or two sentences
    tags = run_info.run_tags(cfg, manifest, world_size=2)
    assert tags["method"] == "hcl" and tags["world_size"] == "2" and tags["dataset"] == "builtin:digits"
    assert tags["mlflow.source.name"] == "hardneg train" and len(tags.get("mlflow.source.git.commit", "x" * 40)) == 40
    dataset = run_info.dataset_input(cfg, manifest)
    profile = json.loads(dataset["profile"])
    assert dataset["name"] == "digits" and dataset["digest"] == run_info.dataset_digest(manifest)
    assert profile["num_rows"] == manifest["splits"]["train"]["num_samples"] and profile["classes"] == 10


def _legacy_and_new_runs(tmp_path):
    """Two runs in one SQLite store: one logged with the pre-grouping names, one with the grouped names."""
    cfg = tiny_config(tmp_path, "unused").tracking
    old = tracking.MlflowTracker(cfg)
    old.log_params(
        {
            "loss.name": "hcl",
            "loss.temperature": 0.5,
            "loss.beta": 2.0,
            "loss.tau_plus": 0.1,
            "loss.psm_aa": 1.0,
            "train.global_batch_size": 256,
            "data.path": "/data/cifar10",
        }
    )
    old.log_metrics({"knn_top1": 0.93, "images_per_s": 100.0}, step=1)
    old.log_metrics({"knn_top1": 0.91, "images_per_s": 300.0, "linear_top1": 0.95}, step=2)
    old.finish()
    new = tracking.MlflowTracker(cfg)
    new.log_params({"loss.name": "nt_xent", "loss.temperature": 0.2, "train.global_batch_size": 128})
    new.set_tags({"method": "nt_xent", "dataset": "builtin:digits"})
    new.log_metrics(metric_names.grouped({"knn_top1": 0.5, "knn_top1_best": 0.5, "images_per_s": 50.0}), step=1)
    new.finish()
    return cfg.uri, old.run_id, new.run_id


def test_runs_table_reads_old_and_new_names_sorts_and_exports(tmp_path, capsys):
    uri, old_id, new_id = _legacy_and_new_runs(tmp_path)
    rows = {r["run id"]: r for r in tracking_runs.runs_table(uri, "hardneg")}
    old, new = rows[old_id], rows[new_id]
    assert (old["best kNN"], old["last kNN"], old["probe top-1"]) == (0.93, 0.91, 0.95)  # best != last
    assert old["train images/s (mean)"] == 200.0 and old["dataset"] == "cifar10"
    assert old["settings"] == "tau_plus=0.1 beta=2.0"  # the method's own; not loss.psm_aa
    assert (new["best kNN"], new["probe top-1"], new["dataset"]) == (0.5, None, "builtin:digits")
    assert old["train time"] is None and old["started"] is not None  # no perf/train_seconds: not the wall span

    assert cli_main(["runs", "--tracking-uri", uri, "--sort", "best kNN", "--wide"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[0]
    for column in ("run id", "temperature", "started", "train time", "best kNN", "last kNN", "probe top-1"):
        assert column in header, column
    assert old_id in lines[1] and new_id in lines[2] and "no probe" in lines[2]
    assert cli_main(["runs", "--tracking-uri", uri, "--sort", "best kNN"]) == 0
    narrow = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in narrow) <= 120 and "run id" not in narrow[0] and "train time" in narrow[0]

    assert cli_main(["runs", "--tracking-uri", uri, "--sort", "method", "--format", "csv"]) == 0
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["method"] for r in table] == ["hcl", "nt_xent"] and table[0]["best kNN"] == "0.93"
    assert cli_main(["runs", "--tracking-uri", uri, "--format", "md"]) == 0
    md = capsys.readouterr().out.splitlines()
    assert md[0].startswith("| run | run id |") and md[1].startswith("|---|") and len(md) == 4
    assert cli_main(["runs", "--tracking-uri", uri, "--sort", "nope"]) == 2
    assert "--sort 'nope'" in capsys.readouterr().err


def test_similarity_histogram_splits_negatives_by_class_and_marks_the_hardest(tmp_path):
    cfg = tiny_config(tmp_path, "unused", "loss.name=sscl", "loss.n_hard=4", "loss.n_synthetic=2")
    objective = build_objective(cfg).eval()
    x = torch.rand(6, 3, 8, 8)
    labels = torch.tensor([0, 0, 1, 1, 2, -1])
    samples = objective.similarity_samples(x, x.flip(0), labels)
    n2 = 12
    assert samples["positive"].shape == (6,)
    both, ids = torch.cat([labels, labels]), torch.arange(n2)
    negative = (ids[:, None] != ids[None, :]) & (ids[None, :] != (ids[:, None] + 6) % n2)  # not self, not positive
    same = (both[:, None] == both[None, :]) & (both[:, None] >= 0)  # label -1: unknown, never the same class
    assert samples["same-class negative"].numel() == (negative & same).sum() > 0
    assert samples["same-class negative"].numel() + samples["other-class negative"].numel() == n2 * (n2 - 2)
    assert samples["4 hardest negatives per anchor"].numel() == n2 * 4
    assert samples["synthetic negative"].numel() == n2 * 2
    path = plots.similarity_histogram_png(samples, str(tmp_path / "h.png"), "sscl, epoch 1, step 3")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 300


def test_embedding_names_its_projection(tmp_path):
    features, labels = torch.randn(40, 8), torch.arange(40) % 4
    path = plots.embedding_png(features, labels, str(tmp_path / "e.png"), "digits, test split", max_points=30)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 300
    assert plots.tsne_2d(features[:30]).shape == (30, 2)


@pytest.mark.parametrize("method,extra", [("psm", "mined positive"), ("mochi", "synthetic negative")])
def test_bank_methods_histogram_their_own_groups(tmp_path, method, extra):
    own = {  # each method's own keys: another method's key is an error (issue 12)
        "psm": ["loss.psm_bank_size=64", "loss.n_hard=8"],
        "mochi": ["loss.mochi_queue_size=64", "loss.mochi_n_hard=8", "loss.mochi_s=4", "loss.mochi_s_prime=2"],
    }[method]
    cfg = tiny_config(tmp_path, "unused", f"loss.name={method}", *own)
    objective = build_objective(cfg).eval()
    bank = "bank" if method == "psm" else "queue"
    getattr(objective, f"{bank}_labels").copy_(torch.arange(64) % 3 - 1)  # classes 0, 1 and unknown (-1)
    x, labels = torch.rand(5, 3, 8, 8), torch.tensor([0, 1, 0, 1, 0])
    samples = objective.similarity_samples(x, x.flip(0), labels)
    n_known = (torch.arange(64) % 3 - 1 >= 0).sum()
    assert samples["same-class negative"].numel() + samples["other-class negative"].numel() == 5 * n_known
    assert samples["negative of unknown class (bank warm-up)"].numel() == 5 * (64 - n_known)
    assert samples["8 hardest negatives per anchor"].numel() == 5 * 8 and samples[extra].numel() > 0
    assert all(v.abs().max() <= 1 + 1e-5 for v in samples.values())  # cosines


def test_runs_on_a_missing_sqlite_store_is_one_line_and_creates_nothing(tmp_path, capsys):
    missing = tmp_path / "no" / "mlflow.db"
    assert cli_main(["runs", "--tracking-uri", f"sqlite:///{missing}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"hardneg: error: no MLflow store at {missing} (from --tracking-uri sqlite:///{missing})"
    assert not (tmp_path / "no").exists()  # MlflowClient would have created an empty store and its folder
