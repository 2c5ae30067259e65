"""Checkpoints: a directory holding ``state.pt`` (full training state) and ``meta.json`` (step, run id).

Written atomically (temporary directory, then rename) and read from any fsspec URL. The state holds
the model, optimiser, step, RNG states (torch, numpy, Python), MLflow run id and the resolved config,
so a run can continue exactly and an evaluation needs nothing but the checkpoint.

A checkpoint is data, never code: it holds only tensors, numbers, strings, None and plain containers
(the config as its YAML text), and every read uses ``torch.load(..., weights_only=True)``, whose
unpickler refuses any other object. Files written before format 2 (the config as a dict) hold the same
plain types and load through the same safe path; a file that does not is refused in one line and can
be converted once with ``hardneg upgrade-checkpoint PATH --unsafe-load`` (docs/security.md).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import re
import shutil
from typing import Any, Optional

import fsspec
import numpy as np
import torch
import yaml

from data_prep.atomic import atomic_dir, atomic_path
from pipeline import console
from pipeline.errors import HardnegError

STATE_FILE = "state.pt"
META_FILE = "meta.json"
FORMAT = 2  # 1: config stored as a dict (before 2026-12); 2: config stored as YAML text
# what every hardneg checkpoint holds, and the type each must have
REQUIRED = {"model": dict, "optimizer": dict, "step": int, "config": (str, dict)}


def _stored(state: dict) -> dict:
    """What goes into ``state.pt``: ``state`` with its config dict as YAML text and the format number."""
    stored = dict(state, format=FORMAT)
    if isinstance(stored.get("config"), dict):
        stored["config"] = yaml.safe_dump(stored["config"], sort_keys=False)
    return stored


def write(state: dict, directory: str) -> str:
    """Write ``state`` into the local ``directory`` atomically; returns the directory.

    ``state["config"]`` may be the config dict: it is stored as YAML text (``load`` parses it back).
    """
    with atomic_dir(directory, replace=True) as tmp:
        os.makedirs(tmp)
        torch.save(_stored(state), os.path.join(tmp, STATE_FILE))
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
            meta = json.load(f)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return meta if isinstance(meta, dict) and isinstance(meta.get("step"), int) else None


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
        raise HardnegError(
            f"no checkpoint found at {path} (expected {STATE_FILE}, or a run folder holding checkpoints)"
        )
    return found


def _read_bytes(directory: str, path: str) -> bytes:
    try:
        with fsspec.open(f"{directory}/{STATE_FILE}", "rb") as f:
            return f.read()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise HardnegError(f"no checkpoint found at {path}") from None


# how torch's safe unpickler names the object it refused ("Unsupported global: GLOBAL m.f", or "... load
# unsupported GLOBAL m.f whose module m is blocked")
_GLOBAL = re.compile(r"[Uu]nsupported GLOBAL ([\w.]+)|Unsupported global: GLOBAL ([\w.]+)")


def _refusal(where: str, error: Exception) -> HardnegError:
    """One line for a file the safe unpickler refused or could not read."""
    text = str(error)
    named = _GLOBAL.search(text)
    if named:
        return HardnegError(
            f"refusing to load {where}: it names the Python object {named.group(1) or named.group(2)}, which a hardneg checkpoint "
            "never holds (nothing was run). If you wrote it yourself with an older hardneg, convert it once with "
            "`hardneg upgrade-checkpoint PATH --unsafe-load`"
        )
    if isinstance(error, pickle.UnpicklingError):
        first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
        return HardnegError(f"refusing to load {where}: {first} (nothing was run)")
    if "central directory" in text or "zip archive" in text or isinstance(error, (EOFError, ValueError)):
        return HardnegError(f"{where} is truncated or not a torch file ({type(error).__name__})")
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return HardnegError(f"{where} is unreadable: {type(error).__name__}: {first}")


def check_state(state: Any, where: str) -> dict:
    """``state`` if it has every key of a hardneg checkpoint with the right type; else one HardnegError."""
    if not isinstance(state, dict):
        raise HardnegError(f"{where} is not a hardneg checkpoint: it holds a {type(state).__name__}, not a dict")
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise HardnegError(
            f"{where} is not a hardneg checkpoint: it has no {', '.join(map(repr, missing))} "
            f"(keys: {', '.join(map(str, list(state)[:8])) or 'none'})"
        )
    wrong = [k for k, kind in REQUIRED.items() if not isinstance(state[k], kind) or isinstance(state[k], bool)]
    if wrong:
        raise HardnegError(
            f"{where} is not a hardneg checkpoint: " + ", ".join(f"{k!r} is a {type(state[k]).__name__}" for k in wrong)
        )
    return state


def _parse_config(state: dict, where: str) -> dict:
    """The stored config as a dict: YAML text (format 2) or the dict itself (format 1)."""
    config = state["config"]
    if isinstance(config, str):
        try:
            config = yaml.safe_load(config)
        except yaml.YAMLError as e:
            raise HardnegError(f"{where} holds a config that is not YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(config, dict):
        raise HardnegError(f"{where} holds a config that is a {type(config).__name__}, not a mapping")
    return state | {"config": config}


def load_bytes(blob: bytes, where: str) -> dict:
    """Parse and check the bytes of a ``state.pt`` (safe unpickler only); config as a dict."""
    try:
        state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- UnpicklingError, RuntimeError (zip), EOFError...: each becomes one line
        raise _refusal(where, e) from None
    return _parse_config(check_state(state, where), where)


def load(path: str) -> dict:
    """Load the state of the checkpoint at ``path`` (see resolve) onto the CPU; ``state["config"]`` is a dict."""
    directory = resolve(path)
    return load_bytes(_read_bytes(directory, path), f"{directory}/{STATE_FILE}")


# RNG states as plain data (tensors and ints), so that the safe unpickler reads them back.
def rng_state() -> dict:
    """torch, numpy and Python RNG states of this process, as tensors and ints."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(gauss),
        },
        "python": {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64), "gauss": py_gauss},
    }


def restore_rng(rng: dict) -> None:
    """Set the RNG states ``rng_state`` captured (a format-1 checkpoint has the torch state only)."""
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    if "numpy" in rng:
        n = rng["numpy"]
        keys = n["keys"].numpy().astype(np.uint32)
        np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    if "python" in rng:
        p = rng["python"]
        random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss"]))


def _plain(value: Any, where: str, converted: list[str]) -> Any:
    """``value`` with numpy values made tensors or numbers; HardnegError on anything that is not plain data."""
    if isinstance(value, np.generic):  # before float: numpy's float64 is a subclass of it
        converted.append(where)
        return value.item()
    if isinstance(value, (torch.Tensor, str, bool, int, float, type(None))):
        return value
    if isinstance(value, dict):
        return {k: _plain(v, f"{where}.{k}", converted) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v, f"{where}[{i}]", converted) for i, v in enumerate(value))
    if isinstance(value, np.ndarray):
        converted.append(where)
        return torch.from_numpy(value.copy())
    raise HardnegError(f"cannot upgrade: {where} is a {type(value).__module__}.{type(value).__name__}, not plain data")


def upgrade(path: str, unsafe_load: bool = False) -> str:
    """Rewrite the checkpoint at ``path`` in today's format (config as YAML text, plain data only); returns
    a one-line account of what was converted. The unsafe read (pickle, which runs code the file names)
    happens only with ``unsafe_load``, after a warning."""
    directory = resolve(path)
    if "://" in directory:
        raise HardnegError(f"upgrade-checkpoint works on a local folder; copy {directory} here first")
    where = f"{directory}/{STATE_FILE}"
    blob = _read_bytes(directory, path)
    converted: list[str] = []
    try:
        state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        how = "read with the safe unpickler"
    except pickle.UnpicklingError as e:
        if not unsafe_load:
            raise _refusal(where, e) from None
        console.warn(
            f"reading {where} with pickle (weights_only=False): this runs any code the file "
            "holds. Do this only for a checkpoint you wrote yourself."
        )
        state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=False)
        how = "read with pickle (--unsafe-load)"
    except Exception as e:  # noqa: BLE001 -- pickle (asked for) may raise anything; each becomes one line
        raise _refusal(where, e) from None
    # plain first: an older writer's numpy step (np.int64) becomes the int the key check asks for
    state = _parse_config(check_state(_plain(state, "state", converted), where), where)
    was = state.get("format", 1)
    with atomic_path(where) as tmp:  # state.pt only: meta.json (and a best-mark in it) stays as it is
        torch.save(_stored(state), tmp)
    load(directory)  # proves the rewritten file reads back through the safe path
    numpy_part = f"; {len(converted)} numpy value(s) made plain ({', '.join(converted[:3])})" if converted else ""
    return f"upgraded {where} (format {was} -> {FORMAT}, {how}): config stored as YAML text{numpy_part}"
