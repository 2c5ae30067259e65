"""From a loaded config to a finished run: resolve paths, name the run, pick the launcher.

Everything that can be checked before a worker starts is checked here, so bad input fails in one
line before any training: unreadable data, a run name that already exists without --resume, a
resume whose checkpoint came from a different config.
"""
from __future__ import annotations

import os
import time
from typing import Optional

import fsspec

from data_prep.manifest import read_manifest
from pipeline import checkpoint, config as config_mod, data, dist, train
from pipeline.config import Config
from pipeline.errors import HardnegError
from pipeline.tracking import absolute_uri, create_run


def _absolute(url: str) -> str:
    return url if "://" in url else os.path.abspath(url)


def _with(cfg: Config, section: str, **values) -> Config:
    """A new validated config with ``values`` replaced in ``section`` (configs are frozen)."""
    data = config_mod.to_dict(cfg)
    data[section] = data[section] | values
    return config_mod.from_dict(data)


def resolve_paths(cfg: Config) -> Config:
    """The same config with every relative path made absolute (Ray workers run in other directories)."""
    cfg = _with(cfg, "data", path=_absolute(cfg.data.path))
    cfg = _with(cfg, "cluster", storage_path=_absolute(cfg.cluster.storage_path))
    return _with(cfg, "tracking", uri=absolute_uri(cfg.tracking.uri, os.getcwd()))


def latest_run_name(storage_path: str) -> Optional[str]:
    """The most recently modified run directory under ``storage_path`` that holds a checkpoint."""
    fs, root = fsspec.core.url_to_fs(storage_path)
    if not fs.isdir(root):
        return None
    runs = [e for e in fs.ls(root, detail=True) if e["type"] == "directory"]
    runs = [e for e in runs if checkpoint.latest(e["name"]) is not None]
    if not runs:
        return None
    return os.path.basename(max(runs, key=lambda e: e.get("mtime") or e.get("LastModified") or 0)["name"].rstrip("/"))


def choose_run_name(cfg: Config, resume: Optional[str]) -> str:
    """``resume`` ("" = latest run), tracking.run_name, or a fresh timestamped name."""
    storage = cfg.cluster.storage_path
    if resume is not None:
        name = resume or latest_run_name(storage)
        if not name:
            raise HardnegError(f"--resume: no run with a checkpoint under cluster.storage_path={storage}")
        if checkpoint.latest(f"{storage.rstrip('/')}/{name}") is None:
            raise HardnegError(f"--resume: run '{name}' has no checkpoint under {storage}")
        return name
    name = cfg.tracking.run_name or f"{cfg.loss.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if checkpoint.latest(f"{storage.rstrip('/')}/{name}") is not None:
        raise HardnegError(f"run '{name}' already exists under {storage}; pass --resume {name} to continue it")
    return name


def _check_writable(url: str) -> None:
    fs, root = fsspec.core.url_to_fs(url)
    try:
        fs.makedirs(root, exist_ok=True)
        probe = f"{root.rstrip('/')}/.hardneg-write-probe"
        with fs.open(probe, "wb") as f:
            f.write(b"ok")
        fs.rm(probe)
    except OSError as e:
        raise HardnegError(f"cannot write to cluster.storage_path={url}: {e.strerror or e}") from None


def preflight(cfg: Config, run_name: str) -> None:
    """Fail early and in one line on anything a worker would trip over later."""
    manifest = read_manifest(cfg.data.path)
    for split in (cfg.data.train_split, cfg.data.eval_split):
        if split not in manifest["splits"]:
            raise HardnegError(f"data split '{split}' not in {cfg.data.path}; it has: {', '.join(manifest['splits'])}")
    data.steps_per_epoch(manifest, cfg.data.train_split, cfg.train.global_batch_size)
    _check_writable(cfg.cluster.storage_path)
    found = checkpoint.latest(f"{cfg.cluster.storage_path.rstrip('/')}/{run_name}")
    if found is not None:
        mismatches = train.resume_mismatches(checkpoint.load(found)["config"], cfg)
        if mismatches:
            raise HardnegError("cannot resume: the config differs from the checkpoint's: " + "; ".join(mismatches))


def train_run(cfg: Config, resume: Optional[str] = None) -> dict:
    """Train as configured (Ray Train or one local process); returns final metrics incl. run name."""
    cfg = resolve_paths(cfg)
    run_name = choose_run_name(cfg, resume)
    cfg = _with(cfg, "tracking", run_name=run_name)
    preflight(cfg, run_name)
    if cfg.tracking.enabled and resume is None and cfg.tracking.run_id is None:
        # Created here, not in a worker, so a worker group restarted before its first checkpoint
        # attaches to the same MLflow run instead of opening a second one.
        cfg = _with(cfg, "tracking", run_id=create_run(cfg.tracking))
    run_dir = f"{cfg.cluster.storage_path.rstrip('/')}/{run_name}"
    if cfg.cluster.launcher == "local":
        result = train.run(cfg, dist.current_context(), train.LocalHooks(run_dir))
        result["checkpoint"] = checkpoint.latest(run_dir)
    else:
        from cluster.train import launch  # Ray is imported only under cluster/

        result = launch(cfg, run_name)
    result["run_name"] = run_name
    result["run_dir"] = run_dir
    result["tracking_uri"] = cfg.tracking.uri
    return result
