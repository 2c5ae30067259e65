"""Ray Train launcher: TorchTrainer around the one training function, pipeline.train.run.

This module turns a resolved config into ScalingConfig / TorchConfig / RunConfig / FailureConfig,
connects to the configured cluster (or starts a private local Ray instance), refuses more workers
than the cluster holds, and adapts Ray's checkpoint API to pipeline.train's Hooks. A lost worker
makes Ray Train restart the whole worker group from the last reported checkpoint, up to
cluster.max_failures times; the restarted rank 0 attaches to the same MLflow run (its id is in the
config and in the checkpoint).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import tempfile
import threading
from contextlib import contextmanager
from typing import Callable, Iterator, Mapping, Optional
from urllib.parse import urlparse

import ray
import ray.train
import torch
from ray.train.torch import TorchConfig, TorchTrainer

from cluster.connect import init_ray, quiet_worker_logs
from pipeline import checkpoint, console, dist, faults, train
from pipeline.config import Config, from_dict, to_dict
from pipeline.errors import HardnegError


class RayHooks:
    """Hooks for a Ray Train worker: restore from get_checkpoint(), report through ray.train.report."""

    def __init__(self) -> None:
        self.restored_step: Optional[int] = None

    def restore(self) -> Optional[dict]:
        found = ray.train.get_checkpoint()
        if found is None:
            return None
        with found.as_directory() as directory:
            state = checkpoint.load(directory)
        self.restored_step = state["step"]
        if ray.train.get_context().get_world_rank() == 0:
            console.say(f"restored from checkpoint at step {self.restored_step}")
        return state

    def report(self, metrics: dict, checkpoint_dir: Optional[str]) -> None:
        saved = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        # every rank adds the same key, so the restart step reaches Result.metrics whichever rank it comes from
        ray.train.report(
            metrics | {"restored_from_step": self.restored_step},
            checkpoint=saved,
            # named by step as under the local launcher (Ray's default is a timestamp)
            checkpoint_dir_name=checkpoint.dir_name(metrics["step"]) if saved is not None else None,
        )


def _worker_loop(loop_config: dict) -> None:
    """Entry point of every Ray Train worker: rebuild the config, then run the shared loop."""
    cfg = from_dict(loop_config["config"])
    verbose = console.configure(loop_config.get("verbose", False))  # the driver's --verbose, on every node
    if not verbose:  # one "Reporting training result" line per report per rank; its logger is named by file path
        _quiet_report_logger()
    device = ray.train.torch.get_device() if cfg.cluster.use_gpu else torch.device("cpu")
    train.run(cfg, dist.current_context(device), RayHooks())


def _quiet_report_logger() -> None:
    """Raise to WARNING the logger Ray Train's execution context logs every report with. It is named by its
    source file's path (inside Ray's private package), so it is found by that name, not imported."""
    suffix = os.path.join("train", "v2", "_internal", "execution", "context.py")
    for name in list(logging.root.manager.loggerDict):
        if name.endswith(suffix):
            logging.getLogger(name).setLevel(logging.WARNING)


def _probe(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, not minutes, when nothing listens at a HOST:PORT address (ray.init retries for long)."""
    if address.startswith(("http://", "https://")):
        raise HardnegError(
            f"cluster.address={address} is a dashboard URL; give the GCS address (HOST:6379), "
            "'auto', or ray://HOST:10001 (`hardneg launch --address` takes the dashboard URL)"
        )
    host_port = address.removeprefix("ray://")
    if address in ("auto", "local") or ":" not in host_port:
        return
    host, port = host_port.rsplit(":", 1)
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except (OSError, ValueError) as e:
        reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise HardnegError(f"no Ray cluster reachable at cluster.address={address}: {reason}") from None


def _start_ray(cfg: Config) -> bool:
    """Connect to cfg.cluster.address, or start a private local instance; True unless Ray was already up."""
    if ray.is_initialized():
        return False
    if cfg.cluster.address:
        _probe(cfg.cluster.address)
        try:
            init_ray(
                quiet=not console.is_verbose(),
                address=cfg.cluster.address,
                logging_level=logging.INFO if console.is_verbose() else logging.ERROR,
            )
        except Exception as e:  # noqa: BLE001 -- ConnectionError, RuntimeError, ValueError, TimeoutError ... all mean "not there"
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise HardnegError(f"no Ray cluster reachable at cluster.address={cfg.cluster.address}: {reason}") from None
        if not console.is_verbose():
            quiet_worker_logs()
        return True
    _init_local(cfg.cluster.num_workers * cfg.cluster.cpus_per_worker)
    if not console.is_verbose():
        quiet_worker_logs()
    return True


AUTH_OVERRIDE = "HARDNEG_ALLOW_RAY_WITHOUT_AUTH"


def require_token_auth(environ: Mapping[str, str] = os.environ) -> None:
    """Refuse a private Ray without token authentication (RAY_AUTH_MODE other than token), unless overridden.

    Ray's GCS and raylets listen on every interface of this machine, not on 127.0.0.1 alone; the token is
    what keeps anyone on the network from running code in them.
    """
    mode = environ.get("RAY_AUTH_MODE")
    if mode is None or mode.lower() == "token" or environ.get(AUTH_OVERRIDE) == "1":
        return
    raise HardnegError(
        f"RAY_AUTH_MODE={mode} would start a private Ray without token authentication, open to "
        f"anyone who can reach this machine; unset RAY_AUTH_MODE (token auth is Ray's default), "
        f"or set {AUTH_OVERRIDE}=1 to start it anyway"
    )


def _init_local(num_cpus: int) -> None:
    """A private Ray instance on this machine (logical CPUs: at least ``num_cpus``) with token authentication.

    Only the dashboard is bound to 127.0.0.1: Ray 2.60 puts its GCS at this machine's interface address and
    its GCS server and raylets listen on all interfaces, so the token (generated into ~/.ray/auth_token on
    first use) is their protection. Tests run inside a loopback-only network namespace, where all is 127.0.0.1.
    """
    require_token_auth()
    init_ray(
        quiet=not console.is_verbose(),
        num_cpus=max(num_cpus, os.cpu_count() or 1),
        # the dashboard serves the State API that Ray Train's placement-group cleaner polls
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        logging_level=logging.INFO if console.is_verbose() else logging.ERROR,
        _temp_dir=os.environ.get("HARDNEG_RAY_TMP") or None,
    )


@contextmanager
def local_ray(num_cpus: int) -> Iterator[None]:
    """A private local Ray instance for the duration (none started when Ray is already up)."""
    started = not ray.is_initialized()
    if started:
        _init_local(num_cpus)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def worker_resources(cfg: Config) -> dict[str, float]:
    """What one Ray Train worker reserves: CPUs always, GPUs with cluster.use_gpu."""
    resources = {"CPU": float(cfg.cluster.cpus_per_worker)}
    if cfg.cluster.use_gpu:
        resources["GPU"] = float(cfg.cluster.gpus_per_worker)
    return resources


def _num_workers(cfg: Config):
    """ScalingConfig's num_workers: a (min, max) range when elastic (cluster.min_workers), else the count."""
    low = cfg.cluster.min_workers
    return (
        (low, cfg.cluster.num_workers) if low is not None and low < cfg.cluster.num_workers else cfg.cluster.num_workers
    )


def missing_resources(cfg: Config, available: Mapping[str, float]) -> Optional[str]:
    """A one-line reason why ``available`` (Ray's cluster_resources) cannot hold the workers, or None."""
    n = cfg.cluster.min_workers or cfg.cluster.num_workers
    for kind, per_worker in worker_resources(cfg).items():
        need, have = n * per_worker, float(available.get(kind, 0))
        if need > have:
            key = "cluster.gpus_per_worker" if kind == "GPU" else "cluster.cpus_per_worker"
            return (
                f"cluster.num_workers={n} x {key}={per_worker:g} needs {need:g} {kind}s; the Ray cluster has {have:g}"
            )
    return None


def backend(cfg: Config) -> str:
    """The torch.distributed backend: NCCL between GPU workers, gloo between CPU workers."""
    return "nccl" if cfg.cluster.use_gpu else "gloo"


def _is_loopback(uri: str) -> bool:
    return urlparse(uri).hostname in ("127.0.0.1", "localhost", "::1")


def multi_node_warnings(cfg: Config, alive_nodes: int) -> list[str]:
    """What silently goes wrong when workers sit on other nodes than this driver."""
    if alive_nodes < 2:
        return []
    warnings = []
    if "://" not in cfg.cluster.storage_path:
        warnings.append(
            f"cluster.storage_path={cfg.cluster.storage_path} is a local path on a {alive_nodes}-node "
            "cluster: it must be shared storage (NFS) or checkpoints scatter over nodes; prefer s3:// or gs://"
        )
    if cfg.tracking.enabled and cfg.tracking.uri.startswith(("sqlite:", "file:", "/")):
        warnings.append(
            f"tracking.uri={cfg.tracking.uri} is a file on this node, but rank 0 may run on another; "
            "use an MLflow server (http://HOST:5000)"
        )
    return warnings


def _reachable_from_workers(cfg: Config) -> Config:
    """On a multi-node cluster, a loopback MLflow URI means the server beside this driver: use this node's IP."""
    uri = cfg.tracking.uri
    if not (cfg.tracking.enabled and _is_loopback(uri)) or len([n for n in ray.nodes() if n["Alive"]]) < 2:
        return cfg
    here = ray.util.get_node_ip_address()
    parts = urlparse(uri)
    netloc = here + (f":{parts.port}" if parts.port else "")
    data = to_dict(cfg)
    data["tracking"]["uri"] = parts._replace(netloc=netloc).geturl()
    console.say(f"workers reach MLflow at {data['tracking']['uri']} (tracking.uri={uri} names this node)")
    return from_dict(data)


@contextmanager
def ray_session(cfg: Config) -> Iterator[None]:
    """Connected to the configured Ray (or a private local one) with room for the workers; else HardnegError."""
    started = _start_ray(cfg)  # ray.shutdown() then disconnects from a cluster, or stops the private instance
    try:
        problem = missing_resources(cfg, ray.cluster_resources())
        if problem:
            raise HardnegError(problem)
        for warning in multi_node_warnings(cfg, len([n for n in ray.nodes() if n["Alive"]])):
            console.warn(warning)
        yield
    finally:
        if started:
            ray.shutdown()


def _failure_summary(error: Exception) -> str:
    """The last meaningful line of a Ray Train failure (usually 'SomeError: message' from the worker)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


@contextmanager
def _stop_checkpoints_first(run_dir: str) -> Iterator[dict]:
    """While the workers train, SIGTERM (`hardneg stop` -> `ray job stop`) asks them, through a file in the
    run directory, to checkpoint at their next log step and return; a second SIGTERM interrupts at once.
    `ray job stop` waits RAY_JOB_STOP_WAIT_TIME_S (Ray's default: 3 s) before SIGKILL: see docs/cluster.md."""
    state = {"requested": False}
    if threading.current_thread() is not threading.main_thread():
        yield state
        return

    def handler(signum, frame):
        if state["requested"]:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            raise KeyboardInterrupt(f"signal {signum}")
        state["requested"] = True
        faults.request_stop(run_dir)
        console.tell(
            "stop requested: the workers checkpoint at their next log step, then the run ends KILLED "
            "(SIGTERM again to stop at once)"
        )

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield state
    finally:
        signal.signal(signal.SIGTERM, previous)


def fit(cfg: Config, run_name: str) -> dict:
    """Run training on Ray Train workers (inside ray_session); rank 0's final metrics + the checkpoint path."""
    cfg = _reachable_from_workers(cfg)
    # Ray Train tees a worker's print into its logger too whenever something (MLflow) wraps sys.stdout,
    # so each line reached the console twice; the driver's setting propagates to the workers.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"config": to_dict(cfg), "verbose": console.is_verbose()},
        torch_config=TorchConfig(backend=backend(cfg)),
        scaling_config=ray.train.ScalingConfig(
            num_workers=_num_workers(cfg), use_gpu=cfg.cluster.use_gpu, resources_per_worker=worker_resources(cfg)
        ),
        run_config=ray.train.RunConfig(
            # the same (name, storage_path) on a rerun restores Ray's checkpoint manager: get_checkpoint() = latest
            name=run_name,
            storage_path=cfg.cluster.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=cfg.cluster.max_failures),
            # Ray Train's own INFO lines (worker group started, ...) only with --verbose
            logging_config=ray.train.LoggingConfig(log_level="INFO" if console.is_verbose() else "WARNING"),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.cluster.checkpoints_to_keep),
        ),
    )
    run_dir = f"{cfg.cluster.storage_path.rstrip('/')}/{run_name}"
    try:
        with _stop_checkpoints_first(run_dir) as stop:
            result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise HardnegError(
            f"training failed (cluster.max_failures={cfg.cluster.max_failures} restarts allowed): {_failure_summary(e)}"
        ) from None
    metrics = dict(result.metrics or {})
    if stop["requested"] or metrics.get("stopped"):
        faults.clear_stop(run_dir)
        raise KeyboardInterrupt(f"stopped at step {metrics.get('step')}")  # the launcher marks the run KILLED
    metrics["checkpoint"] = result.checkpoint.path if result.checkpoint else None
    if metrics["checkpoint"] and "://" in cfg.cluster.storage_path and "://" not in metrics["checkpoint"]:
        # Ray hands back the path inside its pyarrow filesystem; give the URL the config speaks
        scheme = cfg.cluster.storage_path.split("://", 1)[0]
        metrics["checkpoint"] = f"{scheme}://{metrics['checkpoint']}"
    return metrics


def _run_and_report(loop_config: dict) -> None:
    """Ray Train worker body for run_on_workers: call the function on this worker's device, report its dict."""
    use_gpu = loop_config["use_gpu"]
    here = ray.train.torch.get_device() if use_gpu else torch.device("cpu")
    result = loop_config["fn"](loop_config["args"], here)
    # Ray Train V2 keeps only metrics that come with a checkpoint: rank 0 attaches an empty one
    with tempfile.TemporaryDirectory(prefix="hardneg-result-") as empty:
        rank0 = ray.train.get_context().get_world_rank() == 0
        ray.train.report(result, checkpoint=ray.train.Checkpoint.from_directory(empty) if rank0 else None)


def run_on_workers(
    fn: Callable[[dict, torch.device], dict],
    args: dict,
    *,
    num_workers: int,
    use_gpu: bool = False,
    cpus_per_worker: int = 1,
    storage_path: Optional[str] = None,
) -> dict:
    """``fn(args, device)`` on each of ``num_workers`` Ray Train workers (process group set up, Ray started
    privately if needed); returns rank 0's dict. Lets the training benchmark time under Ray Train the
    very step loop it times in a plain process."""
    with local_ray(num_workers * cpus_per_worker):
        resources = {"CPU": float(cpus_per_worker)} | ({"GPU": 1.0} if use_gpu else {})
        trainer = TorchTrainer(
            _run_and_report,
            train_loop_config={"fn": fn, "args": args, "use_gpu": use_gpu},
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ray.train.ScalingConfig(
                num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources
            ),
            run_config=ray.train.RunConfig(storage_path=storage_path),
        )
        return dict(trainer.fit().metrics or {})
