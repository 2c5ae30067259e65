"""Checkpoints: a directory holding ``state.pt`` (full training state) and ``meta.json`` (step, run id).

Written atomically (temporary directory, then rename) and read from any fsspec URL. The state holds
the model, optimiser, step, RNG states, MLflow run id and the resolved config, so a run can continue
exactly and an evaluation needs nothing but the checkpoint.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from typing import Optional

import fsspec
import torch

from data_prep.atomic import atomic_dir
from pipeline.errors import HardnegError

STATE_FILE = "state.pt"
META_FILE = "meta.json"


def write(state: dict, directory: str) -> str:
    """Write ``state`` into the local ``directory`` atomically; returns the directory."""
    with atomic_dir(directory, replace=True) as tmp:
        os.makedirs(tmp)
        torch.save(state, os.path.join(tmp, STATE_FILE))
        meta = {"step": state["step"], "epoch": state.get("epoch"), "mlflow_run_id": state.get("mlflow_run_id")}
        with open(os.path.join(tmp, META_FILE), "w") as f:
            json.dump(meta, f)
    return directory


def publish(source_dir: str, directory: str) -> str:
    """Copy a finished checkpoint directory to the local ``directory`` atomically."""
    with atomic_dir(directory) as tmp:
        shutil.copytree(source_dir, tmp)
    return directory


def dir_name(step: int) -> str:
    """A checkpoint's folder name under either launcher: by step, so names sort by step."""
    return f"checkpoint_{step:08d}"


def prune(run_dir: str, keep: int) -> list[str]:
    """Remove all but the ``keep`` newest (highest-step) checkpoint folders of the local ``run_dir``; the removed."""
    names = sorted(
        n for n in os.listdir(run_dir) if n.startswith("checkpoint_") and os.path.isdir(os.path.join(run_dir, n))
    )
    gone = names[: max(len(names) - keep, 0)]
    for name in gone:
        shutil.rmtree(os.path.join(run_dir, name), ignore_errors=True)
    return gone


def _read_meta(fs, path: str) -> Optional[dict]:
    try:
        with fs.open(f"{path}/{META_FILE}", "r") as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def latest(run_dir: str) -> Optional[str]:
    """The checkpoint directory with the highest step below ``run_dir`` (any fsspec URL), or None."""
    fs, root = fsspec.core.url_to_fs(run_dir)
    if not fs.isdir(root):
        return None
    best, best_step = None, -1
    for entry in fs.ls(root, detail=True):
        if entry["type"] != "directory" or os.path.basename(entry["name"]).startswith("."):
            continue
        meta = _read_meta(fs, entry["name"])
        if meta is not None and meta["step"] > best_step:
            best, best_step = entry["name"], meta["step"]
    if best is None:
        return None
    return fs.unstrip_protocol(best) if "://" in run_dir else best


def resolve(path: str) -> str:
    """A checkpoint directory from a checkpoint dir, its state.pt, or a run dir (-> its latest)."""
    fs, root = fsspec.core.url_to_fs(path)
    if root.endswith(STATE_FILE):
        return path[: -len(STATE_FILE)].rstrip("/")
    if fs.exists(f"{root}/{STATE_FILE}"):
        return path
    found = latest(path)
    if found is None:
        raise HardnegError(f"no checkpoint found at {path}")
    return found


def load(path: str) -> dict:
    """Load the state of the checkpoint at ``path`` (see resolve) onto the CPU."""
    directory = resolve(path)
    try:
        with fsspec.open(f"{directory}/{STATE_FILE}", "rb") as f:
            buffer = io.BytesIO(f.read())
    except FileNotFoundError:
        raise HardnegError(f"no checkpoint found at {path}") from None
    try:
        return torch.load(buffer, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file: say so in one line
        raise HardnegError(f"checkpoint {directory} is unreadable: {type(e).__name__}: {e}") from None
