"""From a loaded config to a finished run: resolve paths, name the run, pick the launcher.

Everything that can be checked before a worker starts is checked here (or, for the cluster itself,
in cluster.train.ray_session), so bad input fails in one line before any training: a local tracking
store that cannot be created, unreadable data, a data.format the data lacks, cluster.use_gpu without a
GPU, too few shards for the readers (these before anything is written: no run folder, no MLflow run), a
storage path (local or s3:// / gs://) that cannot be written, a run name that already exists without
--resume, a resume whose checkpoint came from a different config, no Ray at cluster.address, more
workers than the cluster's CPUs/GPUs.
"""

from __future__ import annotations

import os
import time
import uuid
from contextlib import contextmanager
from datetime import datetime
from typing import Iterator, Optional

import fsspec
import torch

from data_prep.manifest import read_manifest
from pipeline import checkpoint, console, data, dist, faults, train
from pipeline import config as config_mod
from pipeline.config import Config
from pipeline.errors import HardnegError
from pipeline.tracking import MlflowTracker, create_run
from pipeline.tracking_store import absolute_uri, check_server_access, check_store_path


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


def _storage_fs(url: str):
    """(filesystem, root) of cluster.storage_path; HardnegError when fsspec cannot open it (e.g. s3fs missing)."""
    try:
        return fsspec.core.url_to_fs(url)
    except Exception as e:  # noqa: BLE001 -- unknown protocol, missing driver, bad URL
        raise HardnegError(f"cannot use cluster.storage_path={url}: {type(e).__name__}: {e}") from None


def _modified(fs, path: str) -> float:
    """Modification time of a file as epoch seconds, whatever the filesystem calls it (local, S3, GCS)."""
    info = fs.info(path)
    stamp = info.get("mtime") or info.get("LastModified") or info.get("updated") or info.get("last_modified") or 0
    if isinstance(stamp, str):
        stamp = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    return stamp.timestamp() if isinstance(stamp, datetime) else float(stamp)


def latest_run_name(storage_path: str) -> Optional[str]:
    """The run under ``storage_path`` whose newest checkpoint was written last (object stores have no dir mtimes)."""
    fs, root = _storage_fs(storage_path)
    if not fs.isdir(root):
        return None
    newest: dict[str, float] = {}
    for entry in fs.ls(root, detail=True):
        if entry["type"] != "directory":
            continue
        name = entry["name"].rstrip("/")
        found = checkpoint.latest(fs.unstrip_protocol(name) if "://" in storage_path else name)
        if found is not None:
            newest[os.path.basename(name)] = _modified(fs, f"{found.rstrip('/')}/{checkpoint.META_FILE}")
    return max(newest, key=newest.get) if newest else None


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

    def taken(candidate: str) -> bool:
        return checkpoint.latest(f"{storage.rstrip('/')}/{candidate}") is not None

    name = cfg.tracking.run_name
    if name:
        if taken(name):
            raise HardnegError(f"run '{name}' already exists under {storage}; pass --resume {name} to continue it")
        return name
    # a fresh timestamped name; two runs started within one second get -2, -3, ...
    stamp = f"{cfg.loss.label()}-{time.strftime('%Y%m%d-%H%M%S')}"
    name, n = stamp, 1
    while taken(name):
        n += 1
        name = f"{stamp}-{n}"
    return name


def _check_writable(url: str) -> None:
    """Create, write and delete a probe file under ``url`` (any fsspec URL); HardnegError naming why not."""
    fs, root = _storage_fs(url)
    fs.invalidate_cache()  # object-store listings are cached per process; Ray wrote through its own client
    probe = f"{root.rstrip('/')}/.hardneg-write-probe-{uuid.uuid4().hex[:8]}"
    try:
        fs.makedirs(root, exist_ok=True)
        with fs.open(probe, "wb") as f:
            f.write(b"ok")
        fs.rm(probe)
    except Exception as e:  # noqa: BLE001 -- OSError locally; botocore/google errors (credentials, no bucket) on object stores
        text = str(e).strip()
        reason = getattr(e, "strerror", None) or (text.splitlines()[0] if text else type(e).__name__)
        raise HardnegError(f"cannot write to cluster.storage_path={url}: {reason}") from None


def check_shards_per_reader(cfg: Config, manifest: dict) -> None:
    """Every (rank, loader worker) reads its own resampled shard stream: refuse fewer shards than readers."""
    if cfg.data.format != "wds":
        return
    shards = sum(len(manifest["splits"][name]["shards"]) for name in cfg.data.pretrain)
    per_rank = max(1, cfg.data.loader_workers)
    readers = cfg.world_size * per_rank
    if shards < readers:
        raise HardnegError(
            f"split(s) {'+'.join(cfg.data.pretrain)} of {cfg.data.path} hold {shards} shards, fewer than the {readers} readers of "
            f"cluster.num_workers={cfg.world_size} x data.loader_workers={cfg.data.loader_workers} "
            f"(each reader needs its own shard stream): re-shard smaller (hardneg prep --shard-size) "
            f"or lower data.loader_workers"
        )


def check_format(cfg: Config, manifest: dict) -> None:
    """The pretraining splits hold the files data.format reads; else one line naming the setting that fits."""
    path = cfg.data.path
    for split in cfg.data.pretrain:
        shards, beton = data.split_files(manifest, split)
        if cfg.data.format == "wds" and not shards:
            fix = "set data.format=ffcv" if beton else f"rerun `hardneg prep SOURCE {path} --format wds`"
            raise HardnegError(
                f"data.format=wds but split '{split}' of {path} has no WebDataset shards"
                + (" (it was prepared with --format ffcv)" if beton else "")
                + f": {fix}"
            )
        if cfg.data.format == "ffcv" and not beton:
            raise HardnegError(
                f"data.format=ffcv but split '{split}' of {path} has no FFCV file (it was prepared with --format wds): "
                f"set data.format=wds, or rerun `hardneg prep SOURCE {path} --format both`"
            )
    if cfg.data.format == "ffcv":
        data.require_ffcv()


NO_GPU_OVERRIDE = "HARDNEG_ALLOW_NO_GPU"


def check_gpu(cfg: Config, environ=os.environ) -> Config:
    """cluster.use_gpu=true where the workers run on this machine (local launcher, or a private Ray) and it has
    no CUDA GPU: one line, unless HARDNEG_ALLOW_NO_GPU=1 forces the run, which then trains on CPU and says so."""
    if not cfg.cluster.use_gpu or (cfg.cluster.launcher == "ray" and cfg.cluster.address):
        return cfg
    if torch.cuda.is_available():
        return cfg
    if environ.get(NO_GPU_OVERRIDE) != "1":
        raise HardnegError(
            f"cluster.use_gpu=true but this machine has no CUDA GPU (torch.cuda.is_available() is False); "
            f"set cluster.use_gpu=false, or {NO_GPU_OVERRIDE}=1 to train on CPU anyway"
        )
    console.warn(f"cluster.use_gpu=true without a GPU ({NO_GPU_OVERRIDE}=1): training on CPU")
    return _with(cfg, "cluster", use_gpu=False)


def check_data(cfg: Config) -> None:
    """The config against the data, before anything is written: splits, format, sizes, readers."""
    manifest = read_manifest(cfg.data.path)
    for split in dict.fromkeys((*cfg.data.pretrain, cfg.data.train_split, cfg.data.eval_split)):
        if split not in manifest["splits"]:
            raise HardnegError(f"data split '{split}' not in {cfg.data.path}; it has: {', '.join(manifest['splits'])}")
    check_format(cfg, manifest)
    data.steps_per_epoch(manifest, cfg.data.pretrain, cfg.train.global_batch_size)
    check_shards_per_reader(cfg, manifest)


def preflight(cfg: Config, run_name: str) -> None:
    """Fail early and in one line on anything a worker would trip over later."""
    check_data(cfg)
    found = checkpoint.latest(f"{cfg.cluster.storage_path.rstrip('/')}/{run_name}")
    if found is not None:
        mismatches = train.resume_mismatches(checkpoint.load(found)["config"], cfg)
        if mismatches:
            raise HardnegError("cannot resume: the config differs from the checkpoint's: " + "; ".join(mismatches))


def _attach_mlflow_run(cfg: Config, resume: Optional[str]) -> Config:
    """Create the MLflow run here, not in a worker, so a worker group restarted before its first
    checkpoint attaches to the same run instead of opening a second one."""
    if cfg.tracking.enabled and resume is None and cfg.tracking.run_id is None:
        return _with(cfg, "tracking", run_id=create_run(cfg.tracking))
    return cfg


@contextmanager
def _failed_run_marked(cfg: Config) -> Iterator[None]:
    """Mark the launcher's MLflow run FAILED (KILLED on Ctrl-C) when training does not finish."""
    try:
        yield
    except BaseException as e:
        run_id = cfg.tracking.run_id
        if cfg.tracking.enabled and run_id is not None:
            try:
                MlflowTracker(cfg.tracking, run_id).finish("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
            except Exception:  # noqa: BLE001 -- the store itself may be what failed; keep the original error
                pass
        raise


def train_run(cfg: Config, resume: Optional[str] = None) -> dict:
    """Train as configured (Ray Train or one local process); returns final metrics incl. run name."""
    cfg = resolve_paths(cfg)
    check_store_path(cfg.tracking)  # a sqlite file under a regular file: one line, before any folder exists
    check_data(cfg)  # the config against the data: nothing has been written yet
    cfg = check_gpu(cfg)
    _check_writable(cfg.cluster.storage_path)  # first touch of the storage: a bad URL or credentials fail here
    run_name = choose_run_name(cfg, resume)
    cfg = _with(cfg, "tracking", run_name=run_name)
    preflight(cfg, run_name)
    check_server_access(cfg.tracking)  # a tracking server that is down or refuses the credentials: before Ray starts
    run_dir = f"{cfg.cluster.storage_path.rstrip('/')}/{run_name}"
    faults.clear_stop(run_dir)  # a stop request answered by the previous attempt
    if cfg.cluster.launcher == "local":
        cfg = _attach_mlflow_run(cfg, resume)
        device = "cuda" if cfg.cluster.use_gpu else "cpu"  # check_gpu: there is one
        with _failed_run_marked(cfg):
            result = train.run(
                cfg, dist.current_context(device), train.LocalHooks(run_dir, cfg.cluster.checkpoints_to_keep)
            )
            if result.get("stopped"):  # SIGTERM: checkpointed at the current step, the run ends KILLED
                raise KeyboardInterrupt(f"stopped at step {result['step']}")
        result["checkpoint"] = checkpoint.latest(run_dir)
    else:
        from cluster.train import fit, ray_session  # Ray is imported only under cluster/

        with ray_session(cfg):  # reachable, enough CPUs/GPUs: checked before an MLflow run exists
            cfg = _attach_mlflow_run(cfg, resume)
            with _failed_run_marked(cfg):
                result = fit(cfg, run_name)
    result["run_name"] = run_name
    result["knn_split"] = cfg.data.val_split  # what knn_top1 was measured on (the kNN monitor's split)
    result["run_dir"] = run_dir
    result["tracking_uri"] = cfg.tracking.uri
    return result
