"""`hardneg launch / status / stop`: training as a Ray Job on an existing cluster.

The job is `python -m pipeline.app.cli train --config FILE [overrides] cluster.address=auto`, run in
this repository's directory uploaded as the job's working dir (minus virtual envs, runs, data and
MLflow stores), with the project's dependencies as a pip runtime env unless told otherwise. The
config is loaded and checked here first, so a bad key or a path that only exists on this machine
fails in one line before anything is submitted.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Mapping, Optional, Sequence

import tomllib
from ray.exceptions import AuthenticationError
from ray.job_submission import JobStatus, JobSubmissionClient

from pipeline import config as config_mod
from pipeline import console
from pipeline.errors import HardnegError
from pipeline.tracking_store import CREDENTIAL_VARS

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# Never uploaded with the working dir (Ray also honours .gitignore): environments, outputs, stores.
EXCLUDES = [
    ".git",
    ".venv",
    "venv",
    ".ci",
    "runs",
    "data",
    "demo_out",
    "mlruns",
    "mlartifacts",
    "mlflow.db",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    "build",
    "dist",
    "*.tar",
    "*.beton",
]


def pip_requirements(root: Path = PROJECT_ROOT) -> list[str]:
    """The project's dependencies from pyproject.toml, less Ray (a job must use the cluster's own Ray)."""
    with open(root / "pyproject.toml", "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    return [d for d in deps if not d.replace("_", "-").lower().startswith("ray")]


def _local_only(value: str) -> bool:
    """True for a relative path: on the cluster it would resolve inside the job's temporary working dir."""
    if value.startswith("sqlite:///"):
        return not value.startswith("sqlite:////")
    return "://" not in value and not value.startswith("/")


STOP_WAIT_S = 300  # seconds `hardneg stop` lets a job checkpoint before Ray kills it


def _check_remote_paths(cfg: config_mod.Config, allow_local: bool = False) -> None:
    """HardnegError when a path of ``cfg`` would only exist in the job's temporary working dir (or, unless
    ``allow_local``: a grid's cell may be one process in a trial, when cfg trains in the driver process)."""
    if cfg.cluster.launcher != "ray" and not allow_local:
        raise HardnegError("cluster.launcher=local cannot run on a cluster; drop the override")
    for key, value in (
        ("data.path", cfg.data.path),
        ("cluster.storage_path", cfg.cluster.storage_path),
        ("tracking.uri", cfg.tracking.uri),
    ):
        if _local_only(value):
            raise HardnegError(
                f"{key}={value} is relative, so on the cluster it would land in the job's temporary "
                f"working dir; give an absolute path on shared storage or a URL (s3://, gs://, "
                f"http://MLFLOW:5000 for tracking.uri)"
            )


def _inside(path: str, working_dir: Path, flag: str) -> str:
    """``path`` relative to the uploaded working dir; HardnegError when it lies outside."""
    resolved = Path(path).resolve()
    if not resolved.is_relative_to(working_dir.resolve()):
        raise HardnegError(
            f"{flag} {path} lies outside {working_dir}, the directory uploaded to the cluster; put it under configs/"
        )
    return resolved.relative_to(working_dir.resolve()).as_posix()


def _runtime_env(working_dir: Path, pip: bool, environ: Mapping[str, str]) -> dict:
    """The job's runtime env: the working dir, the stop wait, the MLflow account, the pip dependencies."""
    # `hardneg stop` (ray job stop) sends SIGTERM, then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S (Ray's default 3 s):
    # too short for the workers to reach a log step and write a checkpoint. The job supervisor reads it from here.
    env_vars = {"RAY_JOB_STOP_WAIT_TIME_S": environ.get("RAY_JOB_STOP_WAIT_TIME_S", str(STOP_WAIT_S))}
    # The job reaches an authenticated tracking server with the submitter's own account: the variables travel in
    # the job's runtime env (readable only with the cluster's Ray token), never in the config or the entrypoint.
    env_vars |= {name: environ[name] for name in CREDENTIAL_VARS if environ.get(name)}
    runtime_env: dict = {"working_dir": str(working_dir), "excludes": EXCLUDES, "env_vars": env_vars}
    if pip:
        runtime_env["pip"] = pip_requirements(working_dir)
    return runtime_env


def job_spec(
    config_path: Optional[str],
    overrides: Sequence[str],
    *,
    working_dir: Path = PROJECT_ROOT,
    pip: bool = True,
    resume: bool = False,
    verbose: bool = False,
    environ: Mapping[str, str] = os.environ,
) -> dict:
    """{"entrypoint", "runtime_env"} of the training job; HardnegError on a config that cannot run there."""
    overrides = [*overrides, "cluster.address=auto"]
    cfg = config_mod.load(config_path, overrides)  # the same validation the job will do, but now
    _check_remote_paths(cfg)
    args = ["python", "-m", "pipeline.app.cli", "train"]
    if config_path:
        args += ["--config", _inside(config_path, working_dir, "--config")]
    if resume:
        args.append("--resume")
    if verbose:  # the job's own console: Ray's and the libraries' logs, as `hardneg train --verbose` shows them
        args.append("--verbose")
    return {"entrypoint": shlex.join(args + overrides), "runtime_env": _runtime_env(working_dir, pip, environ)}


def grid_job_spec(
    grid_path: str,
    cells: Sequence[config_mod.Config],
    overrides: Sequence[str],
    *,
    out: str,
    working_dir: Path = PROJECT_ROOT,
    pip: bool = True,
    verbose: bool = False,
    max_concurrent: Optional[int] = None,
    environ: Mapping[str, str] = os.environ,
) -> dict:
    """{"entrypoint", "runtime_env"} of a grid job, `hardneg reproduce GRID --address auto [overrides]` on the head;
    ``cells``: one loaded config per method x dataset (with the overrides), checked here like a training job's;
    ``out``: the grid's folder for its records, which must outlive the job's working dir."""
    for cfg in cells:
        _check_remote_paths(cfg, allow_local=True)  # a launcher=local cell is one process in its Tune trial
    if not os.path.isabs(out):
        raise HardnegError(
            f"grid out: {out} is relative, so the grid's records and table would land in the job's temporary "
            f"working dir; give an absolute path on the head (or shared storage) with --out"
        )
    args = ["python", "-m", "pipeline.app.cli", "reproduce", _inside(grid_path, working_dir, "--grid")]
    args += ["--address", "auto", "--out", out]
    if max_concurrent is not None:
        args += ["--max-concurrent", str(max_concurrent)]
    if verbose:
        args.append("--verbose")
    return {"entrypoint": shlex.join(args + list(overrides)), "runtime_env": _runtime_env(working_dir, pip, environ)}


def _dashboard_url(address: str) -> str:
    return address if "://" in address else f"http://{address}"


def local_token() -> Optional[str]:
    """Ray's auth token as Ray itself looks it up: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def client(address: str) -> JobSubmissionClient:
    """A job client for the dashboard at ``address``; HardnegError when nothing answers there.

    A cluster with token authentication gets the token found here, and only after it asked for one."""
    url = _dashboard_url(address)
    try:
        try:
            return JobSubmissionClient(url)
        except AuthenticationError:
            token = local_token()
            if token is None:
                raise HardnegError(
                    f"the Ray cluster at {address} requires a token: set RAY_AUTH_TOKEN "
                    "(`ray get-auth-token` on its head node)"
                ) from None
            return JobSubmissionClient(url, headers={"Authorization": f"Bearer {token}"})
    except HardnegError:
        raise
    except AuthenticationError:
        raise HardnegError(
            f"the Ray cluster at {address} refused this machine's token: set RAY_AUTH_TOKEN to "
            "its own (`ray get-auth-token` on its head node)"
        ) from None
    except Exception as e:  # noqa: BLE001 -- ConnectionError, RuntimeError (version), ValueError (bad address)
        text = str(e).strip()
        reason = text.splitlines()[0] if text else type(e).__name__
        raise HardnegError(f"no Ray cluster reachable at --address {address}: {reason}") from None


def _info(jobs: JobSubmissionClient, job_id: str):
    try:
        return jobs.get_job_info(job_id)
    except RuntimeError as e:
        text = str(e).strip()
        raise HardnegError(f"job {job_id}: {text.splitlines()[-1] if text else 'not found'}") from None


def _wait_terminal(jobs: JobSubmissionClient, job_id: str, timeout_s: float) -> JobStatus:
    deadline = time.monotonic() + timeout_s
    status = _info(jobs, job_id).status
    while not status.is_terminal() and time.monotonic() < deadline:
        time.sleep(0.5)
        status = _info(jobs, job_id).status
    return status


async def _tail(jobs: JobSubmissionClient, job_id: str) -> None:
    async for chunk in jobs.tail_job_logs(job_id):
        sys.stdout.write(chunk)
        sys.stdout.flush()


def launch_job(
    address: str,
    config_path: Optional[str],
    overrides: Sequence[str],
    *,
    wait: bool = True,
    pip: bool = True,
    resume: bool = False,
    verbose: bool = False,
    working_dir: Path = PROJECT_ROOT,
    spec: Optional[dict] = None,
) -> str:
    """Submit training (or the prepared job ``spec``, e.g. a grid's) as a Ray Job, print its id, stream its logs
    until it ends (unless not ``wait``)."""
    if spec is None:
        spec = job_spec(config_path, overrides, working_dir=working_dir, pip=pip, resume=resume, verbose=verbose)
    jobs = client(address)
    try:
        job_id = jobs.submit_job(
            entrypoint=spec["entrypoint"], runtime_env=spec["runtime_env"], metadata={"submitted_by": "hardneg launch"}
        )
    except Exception as e:  # noqa: BLE001 -- runtime env upload refused, server error
        text = str(e).strip()
        raise HardnegError(
            f"submitting to {address} failed: {text.splitlines()[-1] if text else type(e).__name__}"
        ) from None
    console.say(f"submitted job {job_id}")
    console.say(f"  status: hardneg status {job_id} --address {address}")
    console.say(f"  stop:   hardneg stop {job_id} --address {address}")
    if not wait:
        return job_id
    try:
        asyncio.run(_tail(jobs, job_id))
    except KeyboardInterrupt:
        console.say(f"\nstopped following; job {job_id} keeps running (hardneg stop {job_id} --address {address})")
        raise
    status = _wait_terminal(jobs, job_id, timeout_s=60)
    console.say(f"job {job_id}: {status}")
    if status != JobStatus.SUCCEEDED:
        message = (_info(jobs, job_id).message or "").strip().splitlines()
        raise HardnegError(f"job {job_id} ended {status}" + (f": {message[0]}" if message else ""))
    return job_id


def job_status(address: str, job_id: str) -> str:
    """'JOB_ID: STATUS' (with Ray's message when there is one)."""
    info = _info(client(address), job_id)
    message = (info.message or "").strip().splitlines()
    return f"{job_id}: {info.status}" + (f" ({message[0]})" if message else "")


def stop_job(address: str, job_id: str, timeout_s: float = 60) -> str:
    """Ask the job to stop and wait (up to ``timeout_s``) until it has; 'JOB_ID: STATUS'."""
    jobs = client(address)
    status = _info(jobs, job_id).status
    if status.is_terminal():
        return f"{job_id}: already {status}"
    jobs.stop_job(job_id)
    return f"{job_id}: {_wait_terminal(jobs, job_id, timeout_s)}"
