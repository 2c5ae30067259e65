"""Cluster launch without starting Ray: scaling from config, LR scaling, resource and shard checks,
bad addresses and storage, the job spec of `hardneg launch`, and the cluster YAMLs Ray and KubeRay read."""

from __future__ import annotations

import configparser
import math
import os
import pathlib
import shlex
import subprocess

import pytest
import yaml
from conftest import free_port, tiny_config

from pipeline import config
from pipeline.app import train_command
from pipeline.errors import HardnegError

ROOT = pathlib.Path(__file__).resolve().parents[1]


# --- scaling, derived in one place -------------------------------------------------------------------------


@pytest.mark.parametrize("scaling, expected", [("none", 0.3), ("linear", 0.3 * 4), ("sqrt", 0.3 * 2)])
def test_scaled_lr_is_relative_to_the_reference_batch(scaling, expected):
    cfg = config.load(None, ["optim.lr=0.3", f"optim.lr_scaling={scaling}", "train.global_batch_size=1024"])
    assert math.isclose(cfg.scaled_lr, expected)
    assert cfg.per_worker_batch_size == 512  # 2 workers by default
    half = config.load(
        None, ["optim.lr=0.3", "optim.lr_scaling=linear", "train.global_batch_size=128", "optim.lr_reference_batch=256"]
    )
    assert math.isclose(half.scaled_lr, 0.15)


def test_bad_scaling_values_name_the_key():
    with pytest.raises(HardnegError, match="optim.lr_scaling"):
        config.load(None, ["optim.lr_scaling=cubic"])
    with pytest.raises(HardnegError, match="global_batch_size=100 must divide by cluster.num_workers=3"):
        config.load(None, ["train.global_batch_size=100", "cluster.num_workers=3"])
    with pytest.raises(HardnegError, match="cluster.gpus_per_worker"):
        config.load(None, ["cluster.gpus_per_worker=0"])


def test_more_workers_than_the_cluster_holds_is_refused():
    from cluster.train import missing_resources

    cfg = config.load(None, ["cluster.num_workers=4"])
    assert missing_resources(cfg, {"CPU": 4.0}) is None
    assert missing_resources(cfg, {"CPU": 2.0}) == (
        "cluster.num_workers=4 x cluster.cpus_per_worker=1 needs 4 CPUs; the Ray cluster has 2"
    )
    gpu = config.load(None, ["cluster.num_workers=4", "cluster.use_gpu=true"])
    assert "needs 4 GPUs; the Ray cluster has 0" in missing_resources(gpu, {"CPU": 64.0})
    shared = config.load(None, ["cluster.num_workers=4", "cluster.use_gpu=true", "cluster.gpus_per_worker=0.5"])
    assert missing_resources(shared, {"CPU": 8.0, "GPU": 2.0}) is None


def test_multi_node_warnings_name_local_storage_and_file_stores():
    from cluster.train import multi_node_warnings

    cfg = config.load(None, ["cluster.storage_path=/data/runs", "tracking.uri=sqlite:////data/mlflow.db"])
    assert multi_node_warnings(cfg, 1) == []
    warned = multi_node_warnings(cfg, 3)
    assert len(warned) == 2 and "shared storage" in warned[0] and "MLflow server" in warned[1]
    remote = config.load(None, ["cluster.storage_path=s3://b/runs", "tracking.uri=http://10.0.0.1:5000"])
    assert multi_node_warnings(remote, 3) == []


# --- preflight: each a one-line error before any Ray or MLflow run exists -----------------------------------


def test_too_few_shards_for_the_readers(tmp_path, digits_shards):
    # digits has 6 train shards: 2 workers x 4 loader workers = 8 readers
    cfg = tiny_config(tmp_path, digits_shards, "cluster.launcher=ray", "data.loader_workers=4")  # 2 workers
    with pytest.raises(
        HardnegError,
        match=r"split\(s\) train of .* hold 6 shards, fewer than the 8 readers of "
        r"cluster.num_workers=2 x data.loader_workers=4",
    ):
        train_command.train_run(cfg)
    manifest = {"splits": {"train": {"shards": [{}] * 6}, "unlabeled": {"shards": [{}] * 2}}}
    train_command.check_shards_per_reader(
        tiny_config(tmp_path, digits_shards, "cluster.launcher=ray", "data.loader_workers=3"), manifest
    )
    # pretraining on several splits pools their shards: 6 + 2 = 8 streams for 8 readers
    train_command.check_shards_per_reader(
        tiny_config(
            tmp_path,
            digits_shards,
            "cluster.launcher=ray",
            "data.loader_workers=4",
            "data.pretrain_splits=[train,unlabeled]",
        ),
        manifest,
    )
    assert not (tmp_path / "mlflow.db").exists()


def test_no_ray_at_the_address_fails_fast_before_an_mlflow_run(tmp_path, digits_shards):
    cfg = tiny_config(tmp_path, digits_shards, "cluster.launcher=ray", f"cluster.address=127.0.0.1:{free_port()}")
    with pytest.raises(HardnegError, match=r"no Ray cluster reachable at cluster.address=127.0.0.1:\d+: "):
        train_command.train_run(cfg)
    with pytest.raises(HardnegError, match="is a dashboard URL"):
        train_command.train_run(
            tiny_config(tmp_path, digits_shards, "cluster.launcher=ray", "cluster.address=http://127.0.0.1:8265")
        )
    assert not (tmp_path / "mlflow.db").exists()  # checked before the launcher creates the run


def test_storage_that_cannot_be_written(tmp_path, digits_shards):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(HardnegError, match=r"cannot write to cluster.storage_path=.*a-file/runs: "):
        train_command.train_run(
            tiny_config(tmp_path, digits_shards, f"cluster.storage_path={tmp_path / 'a-file' / 'runs'}")
        )
    with pytest.raises(HardnegError, match=r"cannot use cluster.storage_path=nosuchfs://x"):
        train_command.train_run(tiny_config(tmp_path, digits_shards, "cluster.storage_path=nosuchfs://x"))


# --- hardneg launch: the job it would submit ---------------------------------------------------------------


def test_job_spec_runs_train_in_the_uploaded_repo():
    from cluster.submit import EXCLUDES, job_spec

    spec = job_spec(
        "configs/demo.yaml",
        ["data.path=s3://b/digits", "cluster.storage_path=s3://b/runs", "tracking.uri=http://10.0.0.1:5000"],
        working_dir=ROOT,
    )
    args = shlex.split(spec["entrypoint"])
    assert args[:6] == ["python", "-m", "pipeline.app.cli", "train", "--config", "configs/demo.yaml"]
    assert args[-1] == "cluster.address=auto" and "data.path=s3://b/digits" in args
    env = spec["runtime_env"]
    assert env["working_dir"] == str(ROOT) and {".venv", "runs", "data", "mlruns", "mlflow.db"} <= set(EXCLUDES)
    assert any(p.startswith("torch") for p in env["pip"]) and not any(p.startswith("ray") for p in env["pip"])
    resumed = job_spec(
        None,
        ["data.path=/d", "cluster.storage_path=/r", "tracking.uri=sqlite:////m.db"],
        working_dir=ROOT,
        pip=False,
        resume=True,
    )
    assert "pip" not in resumed["runtime_env"] and "--resume" in shlex.split(resumed["entrypoint"])
    assert "--verbose" not in args
    remote = ["data.path=/d", "cluster.storage_path=/r", "tracking.uri=sqlite:////m.db"]
    verbose = job_spec(None, remote, working_dir=ROOT, verbose=True)
    assert shlex.split(verbose["entrypoint"])[:5] == ["python", "-m", "pipeline.app.cli", "train", "--verbose"]
    # no MLflow account in this environment: only the stop wait travels (hardneg stop checkpoints first)
    assert env["env_vars"] == {"RAY_JOB_STOP_WAIT_TIME_S": os.environ.get("RAY_JOB_STOP_WAIT_TIME_S", "300")}
    authed = job_spec(
        None,
        ["data.path=/d", "cluster.storage_path=/r", "tracking.uri=http://10.0.0.1:5000"],
        working_dir=ROOT,
        environ={"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": "pw1"},
    )
    assert authed["runtime_env"]["env_vars"] == {
        "MLFLOW_TRACKING_USERNAME": "alice",
        "MLFLOW_TRACKING_PASSWORD": "pw1",
        "RAY_JOB_STOP_WAIT_TIME_S": "300",
    }
    assert "pw1" not in authed["entrypoint"]


def test_job_spec_refuses_what_cannot_run_on_a_cluster(tmp_path):
    from cluster.submit import job_spec

    remote = ["data.path=s3://b/d", "cluster.storage_path=s3://b/r", "tracking.uri=http://m:5000"]
    with pytest.raises(HardnegError, match="cluster.storage_path=runs is relative"):
        job_spec(None, ["data.path=s3://b/d", "tracking.uri=http://m:5000"], working_dir=ROOT)
    with pytest.raises(HardnegError, match="tracking.uri=sqlite:///mlflow.db is relative"):
        job_spec(None, ["data.path=s3://b/d", "cluster.storage_path=s3://b/r"], working_dir=ROOT)
    (tmp_path / "c.yaml").write_text("train:\n  epochs: 2\n")
    with pytest.raises(HardnegError, match="lies outside"):
        job_spec(str(tmp_path / "c.yaml"), remote, working_dir=ROOT)
    with pytest.raises(HardnegError, match="cluster.launcher=local cannot run on a cluster"):
        job_spec(None, [*remote, "cluster.launcher=local"], working_dir=ROOT)
    with pytest.raises(HardnegError, match="unknown config key 'train.epoch'"):
        job_spec(None, [*remote, "train.epoch=3"], working_dir=ROOT)


@pytest.mark.parametrize(
    "argv",
    [
        ["launch", "--no-pip", "data.path=/d", "cluster.storage_path=/r", "tracking.uri=sqlite:////m.db"],
        ["status", "raysubmit_x"],
        ["stop", "raysubmit_x"],
    ],
)
def test_cli_without_a_cluster_is_one_line(argv):
    from test_cli import HARDNEG, assert_one_line_error

    address = f"http://127.0.0.1:{free_port()}"
    proc = subprocess.run(
        [HARDNEG, *argv[:1], "--address", address, *argv[1:]], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert_one_line_error(proc, f"no Ray cluster reachable at --address {address}")


# --- the cluster definitions -------------------------------------------------------------------------------


@pytest.mark.parametrize("name, storage", [("aws.yaml", "s3://"), ("gcp.yaml", "gs://")])
def test_cluster_launcher_yaml_is_what_ray_up_accepts(name, storage):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "cluster" / name).read_text())
    for key in (
        "cluster_name",
        "provider",
        "available_node_types",
        "head_node_type",
        "setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
    ):
        assert key in raw, key
    assert raw["provider"]["type"] == name.split(".")[0]
    types = raw["available_node_types"]
    assert raw["head_node_type"] in types
    workers = {k: v for k, v in types.items() if k != raw["head_node_type"]}
    assert workers and all(0 <= v["min_workers"] <= v["max_workers"] <= raw["max_workers"] for v in workers.values())
    gpu = [v["node_config"] for v in workers.values()]
    assert all(c.get("InstanceType", "").startswith(("g", "p")) or c.get("guestAccelerators") for c in gpu)
    assert raw["docker"]["image"].startswith("rayproject/ray:2.60.")  # the Ray the project pins
    setup = " ".join(raw["setup_commands"])
    assert "pip install" in setup and "/home/ray/hardneg" in setup
    head = " ".join(raw["head_start_ray_commands"])
    assert "ray start --head" in head and "--dashboard-host=0.0.0.0" in head
    assert "mlflow server" in head and "--port 5000" in head and storage in head
    # MLflow asks for an account and listens on the head's private address; the admin password is read from
    # the cloud's secret store at start, so no literal credential sits in the YAML
    mlflow_start = head[head.index("mlflow server") :]
    assert "--app-name basic-auth" in mlflow_start and '--host "$HEAD_IP"' in mlflow_start
    assert "0.0.0.0" not in mlflow_start and 'MLFLOW_AUTH_ADMIN_PASSWORD="$(' in head
    auth = configparser.ConfigParser()
    auth.read(ROOT / "cluster" / "mlflow_auth.ini")
    assert "cluster/mlflow_auth.ini" in head and "admin_password" not in auth["mlflow"]
    validate_config(prepare_config(raw))  # Ray's own schema and defaults, as `ray up` runs them


def test_kuberay_rayjob_manifest():
    job = yaml.safe_load((ROOT / "cluster" / "kuberay-rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob" and job["metadata"]["name"]
    spec = job["spec"]
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"].startswith("2.60.")
    head = cluster["headGroupSpec"]
    assert "rayStartParams" in head and head["template"]["spec"]["containers"][0]["image"]
    (gpu,) = cluster["workerGroupSpecs"]
    assert gpu["groupName"] and gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) == 1
    # the entrypoint is a `hardneg train` whose overrides our config accepts, with as many workers as GPU pods
    args = shlex.split(spec["entrypoint"])
    assert args[:2] == ["hardneg", "train"] and "cluster.address=auto" in args
    overrides = [a for a in args if "=" in a]
    cfg = config.load(str(ROOT / "configs" / "demo.yaml"), overrides)
    assert cfg.cluster.use_gpu and cfg.cluster.num_workers == gpu["replicas"] * int(limits["nvidia.com/gpu"])
    assert cfg.cluster.storage_path.startswith("s3://") and cfg.tracking.uri.startswith("http://")


def test_the_documented_launch_commands_are_valid():
    """docs/cluster.md's `hardneg launch` lines parse and would submit (config checked as launch checks it)."""
    from cluster.submit import job_spec
    from pipeline.app.cli import build_parser

    text = (ROOT / "docs" / "cluster.md").read_text().replace("\\\n", " ")
    commands = [line.split("#")[0] for line in text.splitlines() if line.startswith(".venv/bin/hardneg launch")]
    commands = [
        c.replace("$BUCKET", "bucket").replace("$PWD", "/repo").replace("$HEAD_PRIVATE_IP", "10.0.0.1")
        for c in commands
        if "..." not in c
    ]
    assert len(commands) >= 2
    for command in commands:
        args = build_parser().parse_args(shlex.split(command)[1:])
        if args.grid:  # `launch --grid`: every cell of the grid checked as launch checks it
            from pipeline.app.job_commands import _grid_spec

            assert "reproduce" in _grid_spec(args)["entrypoint"]
            continue
        spec = job_spec(args.config, args.overrides, working_dir=ROOT, pip=not args.no_pip)
        assert "train" in spec["entrypoint"]
