"""The console script as a user runs it: --help, --print-config, and bad input -> one line, exit 2."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

HARDNEG = os.path.join(os.path.dirname(sys.executable), "hardneg")


def run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([HARDNEG, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hardneg: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("command", ["prep", "train", "eval", "demo"])
def test_help(command):
    proc = run(command, "--help")
    assert proc.returncode == 0 and "usage: hardneg " + command in proc.stdout


def test_print_config_is_the_resolved_config(tmp_path):
    (tmp_path / "c.yaml").write_text("loss:\n  name: hcl\n")
    proc = run("train", "--config", str(tmp_path / "c.yaml"), "train.epochs=7", "--print-config")
    assert proc.returncode == 0, proc.stderr
    printed = yaml.safe_load(proc.stdout)
    assert printed["loss"]["name"] == "hcl" and printed["train"]["epochs"] == 7
    assert printed["optim"]["name"] == "sgd"  # defaults are filled in


def test_bad_config_inputs(tmp_path):
    assert_one_line_error(run("train", "--config", str(tmp_path / "missing.yaml")), "config file not found")
    assert_one_line_error(run("train", "train.epochz=3"), "unknown config key 'train.epochz'", "epochs")
    assert_one_line_error(run("train", "train.epochs=-1"), "train.epochs=-1")


def test_bad_prep_inputs_leave_nothing_behind(tmp_path):
    out = tmp_path / "out"
    assert_one_line_error(run("prep", "nosuch:thing", str(out)), "unknown dataset 'nosuch:thing'")
    assert_one_line_error(run("prep", f"imagefolder:{tmp_path / 'absent'}", str(out)), "absent")
    assert not out.exists()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_one_line_error(run("prep", "builtin:digits", str(blocker / "sub")), "cannot write")
    assert_one_line_error(run("prep", "builtin:digits", str(blocker)), "cannot write")
    assert blocker.read_text() == "x" and sorted(os.listdir(tmp_path)) == ["file"]


def test_bad_eval_and_train_data(tmp_path, digits_shards):
    assert_one_line_error(
        run("eval", "--checkpoint", str(tmp_path / "none"), "--data", digits_shards), "no checkpoint found"
    )
    assert_one_line_error(
        run("train", f"data.path={tmp_path / 'nodata'}", f"cluster.storage_path={tmp_path}"), "manifest"
    )


def test_prep_then_verify(tmp_path):
    out = tmp_path / "shards"
    proc = run("prep", "builtin:digits", str(out), "--quiet")
    assert proc.returncode == 0 and "train: 1347" in proc.stdout, proc.stderr
    assert run("prep", "verify", str(out)).returncode == 0
    shard = out / "test-000000.tar"
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0xFF
    shard.write_bytes(bytes(data))
    bad = run("prep", "verify", str(out))
    assert bad.returncode == 2 and "test-000000.tar" in bad.stdout


@pytest.mark.slow  # a training subprocess, 10-20 s: not in make test-fast
def test_sigterm_marks_the_mlflow_run_killed(tmp_path, digits_shards):
    """`hardneg stop` / `ray job stop` send SIGTERM: the run must not be left RUNNING in MLflow."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [
        "train",
        "cluster.launcher=local",
        f"data.path={digits_shards}",
        f"tracking.uri={uri}",
        f"cluster.storage_path={tmp_path / 'runs'}",
        "tracking.run_name=term",
        "augment.image_size=8",
        "model.width=4",
        "model.proj_hidden_dim=32",
        "model.proj_dim=16",
        "train.global_batch_size=128",
        "train.epochs=500",
        "train.log_every_steps=1",
        "train.knn_every_epochs=0",
        "eval.knn_k=20",
    ]
    log = open(tmp_path / "stderr.txt", "w+")  # a file, not a pipe: nothing blocks on a full buffer
    out = open(tmp_path / "stdout.txt", "w+")
    proc = subprocess.Popen(
        [HARDNEG, *args], stdout=out, stderr=log, text=True, env=os.environ | {"PYTHONUNBUFFERED": "1"}
    )
    try:
        client, deadline, run = None, time.monotonic() + 240, None
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(1)
            if "epoch 1/" not in (tmp_path / "stdout.txt").read_text():
                continue  # an MLflow client opened before the run's own would race it creating the tables
            client = client or MlflowClient(uri)
            runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
            if runs and client.get_metric_history(runs[0].info.run_id, "train/loss"):
                run = runs[0]
                break
        assert run is not None and run.info.status == "RUNNING", proc.poll()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
        out.close()
    stderr = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 130 and "interrupted" in stderr and "Traceback" not in stderr, stderr
    assert client.get_run(run.info.run_id).info.status == "KILLED"
