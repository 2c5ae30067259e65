"""The console script as a user runs it: --help, --print-config, and bad input -> one line, exit 2."""
from __future__ import annotations

import os
import subprocess
import sys

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
    assert_one_line_error(run("eval", "--checkpoint", str(tmp_path / "none"), "--data", digits_shards),
                          "no checkpoint found")
    assert_one_line_error(run("train", f"data.path={tmp_path / 'nodata'}", f"cluster.storage_path={tmp_path}"),
                          "manifest")


def test_prep_then_verify(tmp_path):
    out = tmp_path / "shards"
    proc = run("prep", "builtin:digits", str(out), "--quiet")
    assert proc.returncode == 0 and "train: 1497" in proc.stdout, proc.stderr
    assert run("prep", "verify", str(out)).returncode == 0
    shard = out / "test-000000.tar"
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0xFF
    shard.write_bytes(bytes(data))
    bad = run("prep", "verify", str(out))
    assert bad.returncode == 2 and "test-000000.tar" in bad.stdout
