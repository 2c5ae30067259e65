"""Shared fixtures: real digits shards on disk, free ports, a tiny training config, one Ray for the tests that only
need "a Ray", and the guard that fails a test which starts Ray without the ``ray`` marker."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from typing import Iterator, Optional

import pytest

from pipeline import config

# Ray Train's controller looks at its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default): a finished
# run, a dead worker and a reported checkpoint are seen only then. The suite's runs last seconds, so each paid
# up to 2 s per such moment; the driver passes the setting on to the controller (jobs and CLI runs inherit it).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- Ray: the marker, the guard, one shared instance -----------------------------------------------------------

_RAY_DAEMONS = ("raylet", "gcs_server")


def _children(pid: int) -> list[int]:
    """The child processes of ``pid`` (Linux's /proc/PID/task/TID/children; none where that is missing)."""
    kids: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += [int(k) for k in f.read().split()]
    except OSError:
        pass
    return kids


def _ray_daemons() -> set[int]:
    """Ray's daemons (raylet, GCS server) below this process: what starting a Ray leaves running."""
    found, frontier = set(), _children(os.getpid())
    while frontier:
        pid = frontier.pop()
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() in _RAY_DAEMONS:
                    found.add(pid)
        except OSError:
            continue
        frontier += _children(pid)
    return found


@pytest.fixture(autouse=True)
def _ray_only_with_the_marker(request, monkeypatch):
    """A test without ``@pytest.mark.ray`` sees no Ray: ray.init fails it at once, the session's shared Ray is
    hidden (ray.is_initialized() is False), and Ray daemons it leaves running below pytest fail it at teardown."""
    if request.node.get_closest_marker("ray") is not None:
        yield
        return
    try:
        import ray
    except ImportError:
        yield
        return
    message = f"{request.node.nodeid} starts Ray without @pytest.mark.ray"
    hint = "mark it, or train with cluster.launcher=local"

    def refuse(*args, **kwargs):
        pytest.fail(f"{message}: {hint}", pytrace=False)

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    before = _ray_daemons()
    yield
    started = _ray_daemons() - before
    if started:
        pytest.fail(f"{message} (its Ray daemons {sorted(started)} still run at teardown): {hint}", pytrace=False)


_SHARED: dict = {}


@pytest.fixture(scope="session")
def _shared_ray_session():
    """Shuts the shared Ray down at the end of the session (when one was started)."""
    yield _SHARED
    if _SHARED.pop("up", False):
        import ray

        ray.shutdown()
    shutil.rmtree(_SHARED.pop("tmp", ""), ignore_errors=True)


@pytest.fixture
def shared_ray(_shared_ray_session):
    """A local Ray with 2 CPUs in this process, started once and kept for every test that only needs "a Ray"
    (conftest runs those tests last, together, so it starts once). Train runs with cluster.launcher=ray use it."""
    import ray

    from cluster.connect import init_ray

    if not ray.is_initialized():
        tmp = _SHARED.setdefault("tmp", tempfile.mkdtemp(prefix="hnray-", dir="/tmp"))  # short: socket paths
        init_ray(num_cpus=2, include_dashboard=False, _temp_dir=tmp)
        _SHARED["up"] = True
    yield


@pytest.fixture
def own_ray():
    """For a test that starts its own Ray (a cluster, or one that inherits this test's environment): no Ray is
    connected in this process when it begins, and none is left when it ends."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
        _SHARED.pop("up", None)
    yield
    if ray.is_initialized():
        ray.shutdown()


def pytest_collection_modifyitems(config, items):
    """The tests on the shared Ray run last and together, so it starts once; the rest keep their order."""
    items.sort(key=lambda item: "shared_ray" in getattr(item, "fixturenames", ()))


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> str:
    """builtin:digits prepared once per session into real WebDataset shards (6 train shards)."""
    from data_prep.prep import prepare

    out = tmp_path_factory.mktemp("digits") / "shards"
    prepare("builtin:digits", str(out), shard_size=256)
    return str(out)


ARTIFACTS_ON = ("tracking.plots=true", "tracking.log_model=true")  # what a real run logs besides metrics


def tiny_overrides(tmp_path, shards: str, *overrides: str) -> list[str]:
    """The dotted overrides of tiny_config, for tests that go through the real CLI."""
    return [
        "cluster.launcher=local",  # one plain process; a test that wants Ray says cluster.launcher=ray
        f"data.path={shards}",
        "data.shuffle_buffer=200",
        "augment.image_size=8",
        "augment.hflip_p=0",
        "augment.crop_scale_min=0.6",
        "model.width=4",
        "model.proj_hidden_dim=32",
        "model.proj_dim=16",
        "train.global_batch_size=128",
        "train.log_every_steps=4",
        "train.epochs=1",
        "eval.knn_k=20",
        "optim.lr=0.1",
        f"cluster.storage_path={tmp_path / 'runs'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        # the plots (t-SNE, histograms) and the exported model cost ~10 s a run; the tests of what a run logs
        # (test_tracking, test_mlflow_ui, test_security) turn them back on with ARTIFACTS_ON
        "tracking.plots=false",
        "tracking.log_model=false",
        *overrides,
    ]


def tiny_config(tmp_path, shards: str, *overrides: str) -> config.Config:
    """A config that trains a 4-channel ResNet-18 on 8 px digits in seconds."""
    return config.load(None, tiny_overrides(tmp_path, shards, *overrides))


@contextmanager
def mlflow_server(root, *extra_args: str, env: Optional[dict] = None) -> Iterator[str]:
    """`mlflow server` on a free 127.0.0.1 port (SQLite backend, proxied artifacts under ``root``); yields its URL."""
    port = free_port()
    mlflow_bin = os.path.join(os.path.dirname(sys.executable), "mlflow")
    log = open(os.path.join(root, "server.log"), "w")
    proc = subprocess.Popen(
        [
            mlflow_bin,
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{os.path.join(root, 'server.db')}",
            "--artifacts-destination",
            os.path.join(root, "art"),
            *extra_args,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=os.environ | (env or {}),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240  # a loaded 2-core machine takes over a minute to start the auth app
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except urllib.error.HTTPError:
                break  # it answers (an auth app may ask for credentials even here)
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("mlflow server did not start:\n" + open(log.name).read()[-3000:])
            time.sleep(0.5)
        yield url
    finally:
        # the whole group (its own session): `mlflow server` leaves its uvicorn worker to unwind slowly otherwise
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 20)):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=wait)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        log.close()


@pytest.fixture(scope="session")
def shared_mlflow_server(tmp_path_factory) -> Iterator[str]:
    """One `mlflow server` for the session, for the tests that only need "a server" (not one they stop): each
    logs runs and registered models of its own there, so they do not see each other's."""
    with mlflow_server(tmp_path_factory.mktemp("shared-mlflow")) as url:
        yield url


def logged_text(client, run_id: str) -> str:
    """Params, tags, config.yaml and the config inside the logged checkpoints of an MLflow run."""
    from pipeline import checkpoint

    run = client.get_run(run_id)
    parts = [f"{k}={v}" for k, v in run.data.params.items()] + [f"{k}={v}" for k, v in run.data.tags.items()]
    with open(client.download_artifacts(run_id, "config.yaml")) as f:
        parts.append(f.read())
    for which in ("last", "best"):
        parts.append(repr(checkpoint.load(client.download_artifacts(run_id, f"checkpoints/{which}"))["config"]))
    return "\n".join(parts)


def _rank_file(out_dir: str, rank: int) -> str:
    import os

    return os.path.join(out_dir, f"rank{rank}.pt")


def save_rank(result, rank: int, out_dir: str) -> None:
    """In a spawn_ranks worker: save this rank's result where spawn_ranks loads it."""
    import torch

    torch.save(result, _rank_file(out_dir, rank))


def spawn_ranks(worker, world: int, out_dir: str) -> list:
    """Run ``worker(rank, port, out_dir)`` on ``world`` spawned processes (gloo on a free port) and load
    what each saved with save_rank."""
    import torch
    import torch.multiprocessing as mp

    mp.spawn(worker, args=(free_port(), out_dir), nprocs=world, join=True)
    return [torch.load(_rank_file(out_dir, r), weights_only=False) for r in range(world)]


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread is faster, and far faster on a loaded machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
