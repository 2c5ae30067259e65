"""The step loop in one plain process: schedule, checkpoint contents, resume, config checks."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch
from conftest import tiny_config

from pipeline import checkpoint, dist, schedule
from pipeline.app import train_command
from pipeline.errors import HardnegError
from pipeline.objectives import bind_loss


def test_lr_schedule_warmup_then_cosine():
    lrs = [schedule.lr_at(s, 1.0, warmup_steps=4, total_steps=20, min_ratio=0.1) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in pairwise(lrs[4:]))  # non-increasing after warm-up
    assert math.isclose(schedule.lr_at(20, 1.0, 4, 20, 0.1), 0.1)
    assert math.isclose(schedule.lr_at(12, 1.0, 4, 20, 0.0), 0.5)  # half-way through the cosine


def test_local_run_checkpoints_full_state_and_resumes(tmp_path, digits_shards):
    cfg = tiny_config(
        tmp_path, digits_shards, "cluster.launcher=local", "tracking.enabled=false", "train.knn_every_epochs=0"
    )
    result = train_command.train_run(cfg)
    steps = 1347 // 128
    assert result["step"] == steps and 0.0 <= result["knn_top1"] <= 1.0  # kNN always runs at the end
    state = checkpoint.load(result["checkpoint"])
    assert state["step"] == steps and state["epoch"] == 1
    assert {"model", "optimizer", "config", "mlflow_run_id"} <= set(state)
    assert state["config"]["train"]["global_batch_size"] == 128  # the resolved config travels along

    # Continue the same run for one more epoch: it starts at the saved step, not at 0.
    resumed_cfg = tiny_config(
        tmp_path,
        digits_shards,
        "cluster.launcher=local",
        "tracking.enabled=false",
        "train.epochs=2",
        f"tracking.run_name={result['run_name']}",
    )
    before = {k: v.clone() for k, v in state["model"].items()}
    resumed = train_command.train_run(resumed_cfg, resume=result["run_name"])
    assert resumed["step"] == 2 * steps
    after = checkpoint.load(resumed["checkpoint"])
    assert after["step"] == 2 * steps
    assert any(not torch.equal(before[k], after["model"][k]) for k in before)


def test_resume_refuses_a_different_config(tmp_path, digits_shards):
    cfg = tiny_config(
        tmp_path,
        digits_shards,
        "cluster.launcher=local",
        "tracking.enabled=false",
        "train.knn_every_epochs=0",
        "tracking.run_name=r1",
    )
    train_command.train_run(cfg)
    other = tiny_config(
        tmp_path,
        digits_shards,
        "cluster.launcher=local",
        "tracking.enabled=false",
        "loss.temperature=0.2",
        "tracking.run_name=r1",
    )
    with pytest.raises(HardnegError, match=r"cannot resume.*loss\.temperature: 0\.5 -> 0\.2"):
        train_command.train_run(other, resume="r1")
    with pytest.raises(HardnegError, match=r"run 'r1' already exists.*--resume"):
        train_command.train_run(cfg)
    with pytest.raises(HardnegError, match=r"no checkpoint"):
        train_command.train_run(cfg, resume="nonexistent")


def test_preflight_errors_are_one_line(tmp_path, digits_shards):
    with pytest.raises(HardnegError, match="global_batch_size=4096 exceeds the 1347 samples"):
        train_command.train_run(tiny_config(tmp_path, digits_shards, "train.global_batch_size=4096"))
    with pytest.raises(HardnegError, match="data split 'val' not in"):
        train_command.train_run(tiny_config(tmp_path, digits_shards, "data.eval_split=val"))
    with pytest.raises(HardnegError, match="manifest"):
        train_command.train_run(tiny_config(tmp_path, str(tmp_path / "no-shards")))


def test_build_loss_binds_hyper_parameters():
    from pipeline import config
    from pipeline.losses import hcl

    z1, z2 = torch.randn(8, 4), torch.randn(8, 4)
    cfg = config.load(None, ["loss.name=hcl", "loss.beta=2", "loss.tau_plus=0.05"])
    got = bind_loss(cfg.loss)(z1, z2, dist.make_gather(dist.current_context()), None)
    assert torch.allclose(got, hcl(z1, z2, temperature=0.5, tau_plus=0.05, beta=2.0))


def test_gpu_path_options_run_on_cpu(tmp_path, digits_shards):
    """bf16 autocast + channels_last + batched device augmentation: same loop, loadable checkpoint."""
    cfg = tiny_config(
        tmp_path,
        digits_shards,
        "cluster.launcher=local",
        "tracking.enabled=false",
        "train.knn_every_epochs=0",
        "augment.where=device",
        "train.precision=bf16",
        "train.channels_last=true",
    )
    result = train_command.train_run(cfg)
    assert result["step"] == 1347 // 128 and math.isfinite(result["knn_top1"])
    state = checkpoint.load(result["checkpoint"])
    plain = tiny_config(tmp_path, digits_shards)  # fp32, loader augmentation: the same weights load
    from pipeline.objectives import build_objective

    build_objective(plain).load_state_dict(state["model"])


def test_device_two_views_are_per_sample_random():
    from pipeline import augment, config

    cfg = config.load(None, ["augment.image_size=16", "augment.mean=[0.5,0.5,0.5]", "augment.std=[0.5,0.5,0.5]"])
    views = augment.DeviceTwoViews(cfg.augment)
    images = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8).repeat(6, 1, 1, 1)  # 6 copies of one image
    torch.manual_seed(0)
    v1, v2 = views(images)
    assert v1.shape == v2.shape == (6, 3, 16, 16) and v1.dtype == torch.float32
    assert v1.min() >= -1.0 - 1e-5 and v1.max() <= 1.0 + 1e-5  # normalised from [0, 1] with mean=std=0.5
    assert not torch.allclose(v1, v2)  # the two views differ
    assert not torch.allclose(v1[0], v1[1])  # and so do copies of the same image: parameters per sample


def test_training_reads_ffcv_files(tmp_path):
    """data.format=ffcv trains from the .beton written by `prep --format both` (kNN reads the shards)."""
    pytest.importorskip("ffcv", reason="FFCV is not installed here (make setup builds it)")
    from data_prep.prep import prepare

    shards = str(tmp_path / "both")
    prepare("builtin:digits", shards, shard_size=512, format="both")
    cfg = tiny_config(
        tmp_path,
        shards,
        "cluster.launcher=local",
        "tracking.enabled=false",
        "train.knn_every_epochs=0",
        "data.format=ffcv",
    )
    result = train_command.train_run(cfg)
    assert result["step"] == 1347 // 128 and math.isfinite(result["knn_top1"])


def test_pretraining_reads_several_splits(tmp_path):
    """STL-10 as the HCL/DCL releases: pretrain on train + unlabeled, kNN bank from the labelled train split."""
    from data_prep import synthetic
    from data_prep.manifest import read_manifest
    from data_prep.prep import prepare
    from pipeline import data

    out = str(tmp_path / "stl")
    prepare(
        f"stl10:{synthetic.write_stl10(str(tmp_path / 'raw'), n_train=24, n_unlabeled=40, folder=True)}",
        out,
        shard_size=8,
        val_fraction=0.25,
    )  # the kNN monitor reads the 6-image holdout
    both = ("train", "unlabeled")
    assert data.steps_per_epoch(read_manifest(out), both, 16) == (18 + 40) // 16
    batches = data.train_batches(
        out, both, lambda image: (torch.zeros(1), torch.zeros(1)), 16, rank=0, seed=0, shuffle_buffer=0
    )
    labels = torch.cat([next(batches)[2] for _ in range(20)])
    assert (labels == -1).any() and (labels >= 0).any()  # both splits feed pretraining

    cfg = tiny_config(
        tmp_path,
        out,
        "cluster.launcher=local",
        "tracking.enabled=false",
        "train.knn_every_epochs=0",
        "data.pretrain_splits=[train,unlabeled]",
        "train.global_batch_size=16",
        "eval.knn_k=5",
        "data.shuffle_buffer=16",
    )
    result = train_command.train_run(cfg)
    assert result["step"] == (18 + 40) // 16 and 0.0 <= result["knn_top1"] <= 1.0
    with pytest.raises(HardnegError, match=r"data split 'nosuch' not in"):
        train_command.train_run(
            tiny_config(
                tmp_path,
                out,
                "cluster.launcher=local",
                "data.pretrain_splits=[train,nosuch]",
                "train.global_batch_size=16",
            )
        )


def test_automatic_run_names_never_collide(tmp_path, digits_shards, monkeypatch):
    """Two runs started within the same second: the second gets a -2 suffix, not an 'already exists' error."""
    monkeypatch.setattr(train_command.time, "strftime", lambda fmt: "20261122-120000")
    cfg = tiny_config(tmp_path, digits_shards, "cluster.launcher=local", "tracking.enabled=false")
    assert train_command.choose_run_name(cfg, None) == "nt_xent-20261122-120000"
    checkpoint.write({"step": 1}, str(tmp_path / "runs" / "nt_xent-20261122-120000" / "checkpoint_000001"))
    assert train_command.choose_run_name(cfg, None) == "nt_xent-20261122-120000-2"


class _Recorder:
    """A tracker and hooks that remember what the reporter asked for."""

    run_id = "r"

    def __init__(self):
        self.artifacts, self.reports, self.metrics = [], [], []

    def log_metrics(self, metrics, step):
        self.metrics.append((step, metrics))

    def log_artifacts(self, directory, path):
        self.artifacts.append(path)

    def report(self, metrics, checkpoint_dir):
        self.reports.append(metrics)


def test_no_test_set_selection_monitor_reads_the_holdout_and_best_can_follow_the_loss(tmp_path, digits_shards):
    from data_prep.prep import prepare
    from pipeline.objectives import build_objective
    from pipeline.reporting import EpochReporter

    ctx = dist.DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    cfg = tiny_config(tmp_path, digits_shards, "cluster.launcher=local", "tracking.plots=false")
    rec = _Recorder()
    reporter = EpochReporter(cfg, ctx, rec, rec, build_objective(cfg), lambda step, epoch: {"step": step})
    assert reporter.monitor_split == "holdout"  # never the test split
    reporter.epoch_end(10, 1, False, {"step": 10, "epoch": 1, "loss": 1.0, "epoch_loss": 1.0})
    assert rec.metrics and rec.artifacts == ["checkpoints/best", "checkpoints/last"]

    plain = prepare("builtin:digits", str(tmp_path / "plain"), val_fraction=0.0)
    assert "holdout" not in plain["splits"]
    cfg = tiny_config(
        tmp_path,
        str(tmp_path / "plain"),
        "cluster.launcher=local",
        "tracking.plots=false",
        "train.best_by=loss",
        "train.checkpoint_every_epochs=5",
    )
    rec = _Recorder()
    reporter = EpochReporter(cfg, ctx, rec, rec, build_objective(cfg), lambda step, epoch: {"step": step})
    assert reporter.monitor_split is None and not reporter.knn_due(1, last=True)  # no kNN on test, ever
    for epoch, loss in enumerate([3.0, 2.0, 2.5], start=1):
        reporter.epoch_end(10 * epoch, epoch, False, {"step": 10 * epoch, "epoch": epoch, "epoch_loss": loss})
    assert rec.metrics == [] and rec.artifacts == ["checkpoints/best", "checkpoints/best"]  # epochs 1, 2 only
    assert reporter.best_loss == 2.0
