"""What a run is, said once when it starts: params (the chosen method's only), tags, a one-paragraph note,
and the dataset as MLflow shows it. Pure apart from reading git; the tracker writes what this returns.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import platform
import subprocess
from importlib import metadata
from typing import Any

from pipeline import config as config_mod
from pipeline.config import Config

# set by the launcher or derived from other keys: not hyper-parameters
BOOKKEEPING = ("tracking.run_id", "tracking.run_name")
SOURCE_NAME = "hardneg train"  # what MLflow's "Source" shows (not the Ray worker's script)
_VERSIONED_PACKAGES = ("torch", "torchvision", "ray", "mlflow", "webdataset", "fsspec", "numpy", "pydantic")


def run_params(cfg: Config) -> dict[str, Any]:
    """The flattened resolved config without other methods' loss.* keys and without bookkeeping."""
    own = {f"loss.{k}" for k in config_mod.loss_keys(cfg.loss.name)}
    return {
        k: v
        for k, v in config_mod.flatten(cfg).items()
        if k not in BOOKKEEPING and (not k.startswith("loss.") or k in own)
    }


def method_settings(cfg: Config) -> str:
    """``temperature=0.5, tau_plus=0.1, ...``: the method's own loss settings, in words for a note."""
    values = config_mod.to_dict(cfg)["loss"]
    return ", ".join(f"{k}={values[k]}" for k in config_mod.loss_keys(cfg.loss.name) if k != "name")


def _git(repo: str, *args: str) -> str:
    try:
        done = subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def source_tags(repo: str | None = None) -> dict[str, str]:
    """MLflow's own source tags (so the UI's "Source" shows the program and the commit), plus git.dirty."""
    repo = repo or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tags = {"mlflow.source.name": SOURCE_NAME, "mlflow.source.type": "LOCAL"}
    try:
        tags["mlflow.user"] = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry in some containers
        pass
    commit = _git(repo, "rev-parse", "HEAD")
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["git.dirty"] = str(bool(_git(repo, "status", "--porcelain", "--untracked-files=no")))
        branch = _git(repo, "rev-parse", "--abbrev-ref", "HEAD")
        if branch and branch != "HEAD":
            tags["mlflow.source.git.branch"] = branch
        remote = _git(repo, "config", "--get", "remote.origin.url")
        if remote:
            tags["mlflow.source.git.repoURL"] = remote
    return tags


def _count(manifest: dict, splits) -> int:
    return sum(manifest["splits"][s]["num_samples"] for s in splits if s in manifest["splits"])


def dataset_digest(manifest: dict) -> str:
    """16 hex digits naming the prepared data: the prep fingerprint, else a hash of every shard's sha256."""
    fingerprint = manifest.get("prep", {}).get("fingerprint")
    if fingerprint:
        return str(fingerprint)[:16]
    shards = sorted(s["sha256"] for split in manifest["splits"].values() for s in split["shards"])
    return hashlib.sha256("".join(shards).encode()).hexdigest()[:16]


def dataset_input(cfg: Config, manifest: dict) -> dict[str, Any]:
    """Name, digest, source and counts of the training data, for an MLflow dataset input."""
    splits = manifest["splits"]
    first = next(iter(splits.values()))
    profile = {
        "num_rows": _count(manifest, cfg.data.pretrain),
        "pretrain_splits": list(cfg.data.pretrain),
        "splits": {name: s["num_samples"] for name, s in splits.items()},
        "classes": len(first["classes"]),
        "shards": cfg.data.path,
        "format": cfg.data.format,
    }
    source = str(manifest.get("dataset") or cfg.data.path)
    return {
        "name": source.split("://")[-1].replace("builtin:", "").rstrip("/").rsplit("/", 1)[-1] or source,
        "digest": dataset_digest(manifest),
        "source_type": "http" if source.startswith(("http://", "https://")) else "local",
        "source": json.dumps({"url": source} if source.startswith(("http://", "https://")) else {"uri": source}),
        "schema": json.dumps(
            {"mlflow_colspec": [{"name": "image", "type": "binary"}, {"name": "label", "type": "long"}]}
        ),
        "profile": json.dumps(profile),
    }


def run_tags(cfg: Config, manifest: dict, world_size: int) -> dict[str, str]:
    """Tags a reader filters and sorts by: method, dataset, world size, and the source tags."""
    return {
        "method": cfg.loss.label(),
        "dataset": str(manifest.get("dataset") or cfg.data.path),
        "world_size": str(world_size),
        **source_tags(),
    }


def run_note(cfg: Config, manifest: dict, world_size: int) -> str:
    """Two sentences for MLflow's run description: what was trained on what, and how it is scored."""
    m, t = cfg.model, cfg.train
    dataset = manifest.get("dataset") or cfg.data.path
    return (
        f"{cfg.loss.label()} ({method_settings(cfg)}) pretraining of a {m.backbone} (width {m.width}) on {dataset}: "
        f"{_count(manifest, cfg.data.pretrain)} images of split(s) {', '.join(cfg.data.pretrain)}, "
        f"{t.epochs} epochs of global batch {t.global_batch_size} on {world_size} worker(s). "
        f"Scored by weighted kNN top-1 (k={cfg.eval.knn_k}) of split {cfg.data.eval_split} "
        f"against split {cfg.data.train_split}; metrics are grouped as train/, eval/, negatives/, perf/."
    )


def run_context() -> dict[str, str]:
    """Params describing where a run ran: package versions, hardware (the commit is a source tag: run_info)."""
    context = {"hardware.platform": platform.platform(), "hardware.cpus": str(os.cpu_count())}
    try:
        import torch

        if torch.cuda.is_available():
            context["hardware.gpu"] = torch.cuda.get_device_name(0)
            context["hardware.gpus"] = str(torch.cuda.device_count())
    except Exception:  # noqa: BLE001 -- hardware probing must never stop a run
        pass
    for package in _VERSIONED_PACKAGES:
        try:
            context[f"version.{package}"] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return context
