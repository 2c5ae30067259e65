"""Checkpoints are data: what a checkpoint holds, old files, and hostile or foreign files through the real CLI.

A pickle that names a code-running object, a truncated state.pt, a torch file that is not ours and a folder
without a checkpoint are each one `hardneg: error:` line (exit 2, no traceback) for `eval` and for
`train --resume`, and the code-running file's marker is never created.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import tiny_config, tiny_overrides

from pipeline import checkpoint, dist, train
from pipeline.errors import HardnegError

HARDNEG = os.path.join(os.path.dirname(sys.executable), "hardneg")


class _RunsCode:
    """An object whose unpickling runs a shell command: what a hostile checkpoint would hold."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits_shards):
    """One tiny local run: (its tmp folder, its checkpoint folder)."""
    tmp = tmp_path_factory.mktemp("ckpt-safety")
    result = train.run(
        tiny_config(tmp, digits_shards, "tracking.enabled=false", "tracking.run_name=good"),
        dist.current_context(),
        train.LocalHooks(str(tmp / "runs" / "good")),
    )
    return tmp, checkpoint.latest(str(tmp / "runs" / "good")), result


def _raw(path: str):
    """state.pt as torch's safe reader sees it, before checkpoint.load parses the config."""
    return torch.load(os.path.join(path, checkpoint.STATE_FILE), weights_only=True)


def test_a_checkpoint_holds_only_plain_data(trained):
    _, path, result = trained
    raw = _raw(path)  # weights_only=True: would raise on any object that is not plain data
    assert raw["format"] == checkpoint.FORMAT == 2
    assert isinstance(raw["config"], str) and "global_batch_size: 128" in raw["config"]
    assert set(raw) >= {"model", "optimizer", "step", "epoch", "config", "rng", "counters", "mlflow_run_id"}
    assert raw["step"] == result["step"]
    assert set(raw["rng"]) == {"torch", "numpy", "python"}

    def plain(value) -> bool:
        if isinstance(value, dict):
            return all(isinstance(k, (str, int)) and plain(v) for k, v in value.items())
        if isinstance(value, (list, tuple)):
            return all(plain(v) for v in value)
        return isinstance(value, (torch.Tensor, str, int, float, bool, type(None)))

    assert plain(raw)
    state = checkpoint.load(path)
    assert state["config"]["train"]["global_batch_size"] == 128  # parsed back into the dict callers use


def test_rng_states_round_trip(tmp_path):
    np.random.seed(3)
    random.seed(4)
    torch.manual_seed(5)
    saved = checkpoint.rng_state()
    expected = (np.random.rand(3), random.random(), torch.rand(2))
    state = {"model": {}, "optimizer": {}, "step": 1, "config": {"a": 1}, "rng": saved}
    checkpoint.write(state, str(tmp_path / "c"))
    np.random.seed(99)
    random.seed(99)
    torch.manual_seed(99)
    checkpoint.restore_rng(checkpoint.load(str(tmp_path / "c"))["rng"])
    again = (np.random.rand(3), random.random(), torch.rand(2))
    np.testing.assert_array_equal(expected[0], again[0])
    assert expected[1] == again[1]
    assert torch.equal(expected[2], again[2])


def test_a_checkpoint_from_before_format_2_loads_through_the_safe_path(trained, tmp_path):
    """Format 1 stored the config as a dict (and the torch RNG only): it is plain data and loads as it is."""
    _, path, _ = trained
    raw = _raw(path)
    old = {k: v for k, v in raw.items() if k != "format"} | {
        "config": checkpoint.load(path)["config"],
        "rng": {"torch": raw["rng"]["torch"]},
    }
    folder = tmp_path / "old"
    shutil.copytree(path, folder)
    torch.save(old, folder / checkpoint.STATE_FILE)
    state = checkpoint.load(str(folder))
    assert state["config"] == checkpoint.load(path)["config"] and "format" not in state
    for key in state["model"]:
        assert torch.equal(state["model"][key], raw["model"][key])
    checkpoint.restore_rng(state["rng"])  # a torch-only RNG record restores too


def test_upgrade_converts_an_old_file_only_with_the_explicit_flag(trained, tmp_path, capsys):
    """A file with numpy values (refused by the safe reader) is converted only with --unsafe-load, with a warning."""
    from pipeline.app.cli import main

    _, path, _ = trained
    folder = tmp_path / "numpy-era"
    shutil.copytree(path, folder)
    state = {k: v for k, v in checkpoint.load(path).items() if k != "format"}
    state["counters"] = {"data_read": np.float64(1280.0)}
    torch.save(state, folder / checkpoint.STATE_FILE)  # config as a dict, a numpy scalar: an older writer's file
    before = (folder / checkpoint.STATE_FILE).read_bytes()

    with pytest.raises(HardnegError, match="numpy"):
        checkpoint.load(str(folder))
    assert main(["upgrade-checkpoint", str(folder)]) == 2
    assert "--unsafe-load" in capsys.readouterr().err
    assert (folder / checkpoint.STATE_FILE).read_bytes() == before  # refused: the file is untouched

    assert main(["upgrade-checkpoint", str(folder), "--unsafe-load"]) == 0
    out, err = capsys.readouterr()
    assert "warning" in err and "runs any code" in err
    assert "format 1 -> 2" in out and "state.counters.data_read" in out
    upgraded = checkpoint.load(str(folder))
    assert upgraded["counters"]["data_read"] == 1280.0 and type(upgraded["counters"]["data_read"]) is float
    assert isinstance(_raw(str(folder))["config"], str)
    assert json.load(open(folder / checkpoint.META_FILE))["step"] == state["step"]  # meta.json kept


def _hostile_folders(root, good: str) -> dict[str, tuple[str, str]]:
    """name -> (checkpoint folder, the phrase its one-line error must contain)."""
    marker = str(root / "PWNED")
    for name in ("code", "truncated", "foreign", "not_a_dict"):
        folder = root / name / "checkpoint_00000010"
        folder.mkdir(parents=True)
        shutil.copy(os.path.join(good, checkpoint.META_FILE), folder / checkpoint.META_FILE)
    blob = io.BytesIO()
    torch.save({"model": {}, "optimizer": {}, "step": 10, "config": "x: 1", "boom": _RunsCode(marker)}, blob)
    (root / "code" / "checkpoint_00000010" / checkpoint.STATE_FILE).write_bytes(blob.getvalue())
    whole = open(os.path.join(good, checkpoint.STATE_FILE), "rb").read()
    (root / "truncated" / "checkpoint_00000010" / checkpoint.STATE_FILE).write_bytes(whole[: len(whole) // 2])
    torch.save({"weights": torch.zeros(3)}, root / "foreign" / "checkpoint_00000010" / checkpoint.STATE_FILE)
    torch.save([torch.zeros(3)], root / "not_a_dict" / "checkpoint_00000010" / checkpoint.STATE_FILE)
    (root / "empty").mkdir()
    return {
        "code": (str(root / "code"), "names the Python object posix.system"),
        "truncated": (str(root / "truncated"), "truncated or not a torch file"),
        "foreign": (
            str(root / "foreign"),
            "not a hardneg checkpoint: it has no 'model', 'optimizer', 'step', 'config'",
        ),
        "not_a_dict": (str(root / "not_a_dict"), "not a hardneg checkpoint: it holds a list"),
        "empty": (str(root / "empty"), "no checkpoint found at"),
    }


def _cli(args: list[str], capsys, in_process: bool) -> tuple[int, str]:
    """(exit code, stdout + stderr) of the real CLI: its own process, or main() here (same parser and handlers)."""
    if not in_process:
        proc = subprocess.run([HARDNEG, *args], capture_output=True, text=True)
        return proc.returncode, proc.stdout + proc.stderr
    from pipeline.app.cli import main

    code = main(args)  # an uncaught exception (a traceback in a shell) fails the test here
    out, err = capsys.readouterr()
    return code, out + err


def _one_line_error(code: int, output: str, phrase: str, where: str) -> None:
    assert code == 2, (code, output[-3000:])
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if line.startswith("hardneg: error:")]
    assert len(errors) == 1, output[-3000:]
    assert phrase in errors[0] and where in errors[0], errors[0]


def test_hostile_and_foreign_checkpoints_are_one_line_for_eval_and_resume(trained, tmp_path, digits_shards, capsys):
    """The code-running file goes through a real `hardneg` process; the other files through main() in-process."""
    _, good, _ = trained
    cases = _hostile_folders(tmp_path, good)
    marker = tmp_path / "PWNED"
    for name, (folder, phrase) in cases.items():
        args = ["eval", "--checkpoint", folder, "--data", digits_shards]
        _one_line_error(*_cli(args, capsys, in_process=name != "code"), phrase, folder)
        assert not marker.exists(), f"{name}: the checkpoint ran code"
    for name, (folder, phrase) in cases.items():
        storage, run = os.path.split(folder)
        where = folder
        if name == "empty":  # --resume of a run without checkpoints has its own line
            phrase, where = f"run '{run}' has no checkpoint under", storage
        overrides = tiny_overrides(
            tmp_path, digits_shards, f"cluster.storage_path={storage}", f"tracking.run_name={run}"
        )
        args = ["train", *overrides, "cluster.launcher=local", "--resume"]
        _one_line_error(*_cli(args, capsys, in_process=name != "code"), phrase, where)
        assert not marker.exists(), f"{name}: the checkpoint ran code on resume"
    assert not (tmp_path / "mlflow.db").exists()  # refused before any MLflow run was made
    # the file is really hostile: the unsafe reader the project no longer uses would have run it
    torch.load(os.path.join(cases["code"][0], "checkpoint_00000010", checkpoint.STATE_FILE), weights_only=False)
    assert marker.exists()
