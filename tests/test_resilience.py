"""Faults a long run meets, in one plain process: exact resume, bad samples, non-finite steps, SIGTERM.

Every one-line error is checked through the real CLI: exit code 2, one line, no traceback, and no
checkpoint half-written (no temporary directory left behind).
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
import time

import pytest
import torch
from conftest import tiny_config, tiny_overrides

from pipeline import checkpoint, data, dist, train
from pipeline.app import train_command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPE = 1347 // 128  # steps per epoch of the digits train split (1347 after the val holdout) at batch 128


class Preempted(Exception):
    pass


class PreemptedHooks(train.LocalHooks):
    """LocalHooks that end the process right after the checkpoint of step ``at`` is published."""

    def __init__(self, run_dir: str, at: int):
        super().__init__(run_dir)
        self.at = at

    def report(self, metrics: dict, checkpoint_dir):
        super().report(metrics, checkpoint_dir)
        if metrics["step"] == self.at:
            raise Preempted(self.at)


def _params(run_dir: str) -> dict:
    return checkpoint.load(checkpoint.latest(run_dir))["model"]


@pytest.mark.parametrize("where", ["loader", "batch"])
def test_resume_mid_epoch_is_bitwise_exact(tmp_path, digits_shards, one_thread, where):
    """Interrupted at step 7 (mid-epoch 1) and resumed == uninterrupted, parameter for parameter, bit for bit,
    whether the views are made per sample in the loader or per batch (kornia, seeded by the step)."""
    common = (
        f"augment.where={where}",
        "cluster.launcher=local",
        "tracking.enabled=false",
        "train.knn_every_epochs=0",
        "train.epochs=2",
        "train.checkpoint_every_steps=7",
        "loss.name=sscl",
        "data.loader_workers=0",
    )
    whole = train_command.resolve_paths(tiny_config(tmp_path, digits_shards, *common, "tracking.run_name=whole"))
    train.run(whole, dist.current_context(), train.LocalHooks(str(tmp_path / "runs" / "whole")))

    cut = train_command.resolve_paths(tiny_config(tmp_path, digits_shards, *common, "tracking.run_name=cut"))
    cut_dir = str(tmp_path / "runs" / "cut")
    with pytest.raises(Preempted):
        train.run(cut, dist.current_context(), PreemptedHooks(cut_dir, at=7))
    assert checkpoint.load(checkpoint.latest(cut_dir))["step"] == 7
    result = train.run(cut, dist.current_context(), train.LocalHooks(cut_dir))  # resumes at step 7

    assert result["step"] == 2 * SPE
    a, b = _params(str(tmp_path / "runs" / "whole")), _params(cut_dir)
    assert a.keys() == b.keys()
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert differing == [], differing
    print(f"\n[resume {where}] interrupted at step 7 of {2 * SPE}, resumed: {len(a)} tensors bitwise equal", flush=True)


def test_step_checkpoints_that_fall_on_an_epoch_end_are_written(tmp_path, digits_shards, one_thread):
    """checkpoint_every_steps = steps per epoch checkpoints every epoch even when checkpoint_every_epochs is
    larger (the step boundary coincides with the epoch end, which used to skip it)."""
    cfg = train_command.resolve_paths(
        tiny_config(
            tmp_path,
            digits_shards,
            "cluster.launcher=local",
            "tracking.enabled=false",
            "train.knn_every_epochs=0",
            "train.epochs=2",
            "train.checkpoint_every_epochs=2",
            f"train.checkpoint_every_steps={SPE}",
            "tracking.run_name=every_epoch",
        )
    )
    run_dir = tmp_path / "runs" / "every_epoch"
    train.run(cfg, dist.current_context(), train.LocalHooks(str(run_dir)))
    steps = sorted(checkpoint.load(str(path))["step"] for path in run_dir.glob("checkpoint_*"))
    assert steps == [SPE, 2 * SPE], steps


def test_batches_are_a_function_of_the_step(digits_shards):
    """The stream started at step s yields what the stream from 0 yields at s, across an epoch end, with
    loader workers too."""
    views = lambda image: (torch.as_tensor(list(image.getdata())[:8], dtype=torch.float32),)  # noqa: E731
    for workers in (0, 2):

        def stream(start, workers=workers):
            return data.train_batches(
                digits_shards,
                "train",
                views,
                16,
                rank=1,
                seed=3,
                shuffle_buffer=50,
                loader_workers=workers,
                start_step=start,
                steps_per_epoch=5,
            )

        whole = stream(0)
        batches = [next(whole) for _ in range(9)]
        resumed = stream(4)
        for s in range(4, 9):
            got = next(resumed)
            assert all(torch.equal(x, y) for x, y in zip(got, batches[s], strict=True)), (workers, s)
        assert not torch.equal(batches[0][0], batches[5][0])  # a new epoch is a new order


def _corrupt_shard(src: str, dst: str, bad: int) -> str:
    """A copy of the digits shards whose train-000001.tar has ``bad`` undecodable images."""
    import shutil

    shutil.copytree(src, dst)
    path = os.path.join(dst, "train-000001.tar")
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    broken = 0
    with tarfile.open(path + ".tmp", "w") as out:
        for member, payload in members:
            if broken < bad and not member.name.endswith(".cls"):
                payload, broken = b"\x89PNG not really" + payload[:7], broken + 1
                member.size = len(payload)
            out.addfile(member, io.BytesIO(payload))
    os.replace(path + ".tmp", path)
    return dst


def _cli(*args: str, env=None, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "pipeline.app.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


def _tiny_args(tmp_path, shards: str, *extra: str) -> list[str]:
    """conftest's tiny overrides for one local process, without plots, models or system metrics."""
    return tiny_overrides(
        tmp_path,
        shards,
        "cluster.launcher=local",
        "tracking.plots=false",
        "tracking.log_model=false",
        "tracking.system_metrics_every_s=0",
        *extra,
    )


def _one_line_error(proc: subprocess.CompletedProcess, pattern: str) -> str:
    import re

    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("hardneg: error:")]
    assert len(errors) == 1 and re.search(pattern, errors[0]), proc.stderr[-3000:]
    return errors[0]


def _no_temporaries(run_dir) -> None:
    leftovers = [name for _, dirs, files in os.walk(run_dir) for name in dirs + files if ".tmp-" in name]
    assert leftovers == []


def _mlflow_run(tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    return client, runs[0]


@pytest.mark.slow  # a training subprocess, 10-20 s: not in make test-fast
def test_bad_samples_are_skipped_within_the_budget(tmp_path, digits_shards):
    shards = _corrupt_shard(digits_shards, str(tmp_path / "bad"), bad=3)
    proc = _cli(
        "train",
        *_tiny_args(
            tmp_path,
            shards,
            "train.epochs=2",
            "train.knn_every_epochs=0",
            "data.max_skip_fraction=0.05",
            "tracking.run_name=ok",
        ),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    named = [line for line in proc.stderr.splitlines() if "skipping a bad sample" in line]
    assert named and all("train-000001.tar" in line for line in named)
    assert len(named) == len(set(named)) == 1  # named once per shard, however often it is read
    client, run = _mlflow_run(tmp_path)
    skipped = client.get_metric_history(run.info.run_id, "data_skipped")
    assert run.info.status == "FINISHED" and skipped[-1].value > 0
    assert [m.value for m in skipped] == sorted(m.value for m in skipped)  # cumulative
    print(f"\n[skip] {int(skipped[-1].value)} bad samples skipped in {2 * SPE} steps", flush=True)


@pytest.mark.slow  # a training subprocess, 10-20 s: not in make test-fast
def test_bad_samples_past_the_budget_stop_the_run_in_one_line(tmp_path, digits_shards):
    shards = _corrupt_shard(digits_shards, str(tmp_path / "bad"), bad=40)
    proc = _cli(
        "train", *_tiny_args(tmp_path, shards, "train.epochs=2", "train.knn_every_epochs=0", "tracking.run_name=over")
    )
    line = _one_line_error(
        proc,
        r"bad samples: \d+ of \d+ read .* exceed data\.max_skip_fraction=0\.001; "
        r"worst shard .*train-000001\.tar",
    )
    client, run = _mlflow_run(tmp_path)
    assert run.info.status == "FAILED" and "bad samples" in run.data.tags["failure_reason"]
    _no_temporaries(tmp_path / "runs")
    print(f"\n[budget] {line}", flush=True)


@pytest.mark.slow
def test_ffcv_skips_an_undecodable_jpeg_within_the_budget(tmp_path):
    """data.format=ffcv: two corrupt JPEGs inside the .beton are skipped, named once (file and sample index) and
    summed into data_skipped exactly as often as the run's two epochs read them; the run finishes every step."""
    pytest.importorskip("ffcv", reason="FFCV is not installed here (make setup builds it)")
    import numpy as np
    from ffcv.reader import Reader

    from data_prep.prep import prepare

    shards = str(tmp_path / "both")
    manifest = prepare("builtin:digits", shards, shard_size=512, format="both", image_format="jpg")
    beton = os.path.join(shards, "train.beton")
    images = Reader(beton).metadata["f0"]
    bad = (5, 700)
    with open(beton, "r+b") as f:
        for k in bad:
            f.seek(int(images[k]["data_ptr"]) + 2)
            f.write(bytes(20))  # the JPEG header after its SOI marker
    proc = _cli(
        "train",
        *_tiny_args(
            tmp_path,
            shards,
            "data.format=ffcv",
            "train.epochs=2",
            "train.knn_every_epochs=0",
            "data.max_skip_fraction=0.05",
            "tracking.run_name=ffcv",
        ),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    named = [line for line in proc.stderr.splitlines() if "skipping a bad sample" in line]
    assert len(named) == 1 and "train.beton (sample " in named[0] and "undecodable JPEG" in named[0], named
    n = manifest["splits"]["train"]["num_samples"]
    read = [data.rank_order(np.arange(n, dtype=np.uint64), 0, e, 0, 1)[: SPE * 128] for e in (0, 1)]
    want = sum(int(np.isin(order, bad).sum()) for order in read)  # FFCV's loader seed is train.seed=0 at step 0
    client, run = _mlflow_run(tmp_path)
    skipped = client.get_metric_history(run.info.run_id, "data_skipped")
    assert run.info.status == "FINISHED" and want > 0 and skipped[-1].value == want
    assert max(m.step for m in skipped) == 2 * SPE  # every step ran
    print(f"\n[ffcv skip] {want} undecodable JPEG reads skipped in {2 * SPE} steps: {named[0]}", flush=True)


@pytest.mark.slow  # a training subprocess, 10-20 s: not in make test-fast
def test_a_nonfinite_loss_stops_in_one_line_naming_step_lr_and_checkpoint(tmp_path, digits_shards):
    proc = _cli(
        "train",
        *_tiny_args(
            tmp_path,
            digits_shards,
            "train.epochs=3",
            "train.knn_every_epochs=0",
            "optim.lr=1e12",
            "optim.warmup_epochs=1.5",
            "train.checkpoint_every_steps=1",
            "tracking.run_name=nan",
        ),
    )
    line = _one_line_error(
        proc,
        r"non-finite loss or gradient norm at step (\d+) \(lr [\d.e+]+\).*"
        r"(last good checkpoint: step \d+ in .*--resume|no checkpoint was written yet)",
    )
    client, run = _mlflow_run(tmp_path)
    assert run.info.status == "FAILED" and "non-finite" in run.data.tags["failure_reason"]
    found = checkpoint.latest(str(tmp_path / "runs" / "nan"))
    if found is not None:  # the last good checkpoint is whole and finite
        state = checkpoint.load(found)
        bad = [k for k, v in state["model"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
        assert bad == [], (state["step"], bad)
    _no_temporaries(tmp_path / "runs")
    print(f"\n[nonfinite] {line}", flush=True)


@pytest.mark.slow  # a training subprocess, 10-20 s: not in make test-fast
def test_skip_mode_drops_nonfinite_steps_then_stops_after_too_many(tmp_path, digits_shards):
    proc = _cli(
        "train",
        *_tiny_args(
            tmp_path,
            digits_shards,
            "train.epochs=2",
            "train.knn_every_epochs=0",
            "optim.lr=1e12",
            "train.on_nonfinite=skip",
            "train.max_nonfinite_steps=3",
            "tracking.run_name=skip",
        ),
    )
    _one_line_error(proc, r"non-finite loss or gradient norm in 3 steps in a row up to step \d+ \(lr ")
    client, run = _mlflow_run(tmp_path)
    assert run.info.status == "FAILED"


@pytest.mark.slow  # tens of seconds of CPU: not in make test-fast
def test_sigterm_checkpoints_the_current_step_then_ends_killed(tmp_path, digits_shards):
    """`hardneg stop` / a preemption: the run saves where it is, ends KILLED, and a resume finishes it."""
    args = _tiny_args(
        tmp_path,
        digits_shards,
        "train.epochs=3",
        "train.knn_every_epochs=0",
        "train.log_every_steps=1",
        "tracking.run_name=stopped",
    )
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.app.cli", "train", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:  # wait for a few logged steps, mid-epoch 1
        runs = (
            client.search_runs([e.experiment_id for e in client.search_experiments()])
            if (tmp_path / "mlflow.db").exists()
            else []
        )
        if runs and len(client.get_metric_history(runs[0].info.run_id, "train/loss")) >= 3:
            break
        time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    run_dir = str(tmp_path / "runs" / "stopped")
    saved = checkpoint.load(checkpoint.latest(run_dir))["step"]
    assert 3 <= saved < 3 * SPE and f"stopped at step {saved}" in out
    _, run = _mlflow_run(tmp_path)
    assert run.info.status == "KILLED"
    _no_temporaries(tmp_path / "runs")

    resumed = _cli("train", *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _, run = _mlflow_run(tmp_path)
    assert run.info.status == "FINISHED" and checkpoint.load(checkpoint.latest(run_dir))["step"] == 3 * SPE
    losses = [
        m.step
        for m in MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_metric_history(run.info.run_id, "train/loss")
    ]
    assert losses == list(range(1, 3 * SPE + 1))  # every step once: nothing lost, nothing twice
    print(f"\n[stop] SIGTERM -> checkpoint at step {saved}, KILLED; resume finished {3 * SPE} steps", flush=True)
