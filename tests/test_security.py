"""Security defaults: the suite's servers on loopback, Ray's token authentication kept on, and an
authenticated MLflow server whose credentials are checked before training and never logged."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ARTIFACTS_ON, logged_text, mlflow_server, tiny_config, tiny_overrides
from mlflow.tracking import MlflowClient

from cluster.train import AUTH_OVERRIDE, local_ray, require_token_auth
from pipeline.app import train_command
from pipeline.errors import HardnegError

ROOT = Path(__file__).resolve().parents[1]
HARDNEG = os.path.join(os.path.dirname(sys.executable), "hardneg")
ADMIN, ADMIN_PASSWORD = "admin", "adm1n-Pa55-for-tests"
USER, USER_PASSWORD = "alice", "al1ce-Pa55-never-logged"
WRONG_PASSWORD = "not-alices-Pa55"
IN_NAMESPACE = os.environ.get("HARDNEG_LOOPBACK_NS") == "1"


def hardneg(*args: str, env: dict) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING_", "RAY_AUTH_MODE"))}
    return subprocess.run([HARDNEG, *args], capture_output=True, text=True, env=clean | env, timeout=300)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hardneg: error: ") and "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.ray
@pytest.mark.skipif(not IN_NAMESPACE, reason="the suite runs outside a loopback-only namespace (make test says why)")
def test_private_ray_is_on_loopback_in_the_namespace(shared_ray):
    import ray

    with local_ray(2):  # the session's shared Ray, started as a private one
        gcs = ray.get_runtime_context().gcs_address
        nodes = [n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]]
    print(f"GCS address of the test Ray: {gcs}; raylets at {nodes}")
    assert gcs.startswith("127.0.0.1:"), gcs
    assert nodes == ["127.0.0.1"], nodes


def test_nothing_in_the_repository_turns_ray_authentication_off():
    """No code, config, script or Makefile sets RAY_AUTH_MODE to disabled (the docs may name the setting)."""
    setting = re.compile(r"RAY_AUTH_MODE[\"'\]]*\s*[:=,]\s*[\"']?disabled", re.IGNORECASE)
    tracked = subprocess.run(["git", "-C", str(ROOT), "ls-files"], capture_output=True, text=True, check=True)
    offenders = [
        name
        for name in tracked.stdout.split()
        if not name.endswith(".md")
        and name != "tests/test_security.py"
        and (ROOT / name).is_file()
        and setting.search((ROOT / name).read_text(errors="ignore"))
    ]
    assert offenders == []
    assert setting.search('env["RAY_AUTH_MODE"] = "disabled"') and setting.search("RAY_AUTH_MODE=disabled ray start")


def test_token_authentication_is_required_unless_overridden():
    require_token_auth({})  # Ray's default: token authentication on
    require_token_auth({"RAY_AUTH_MODE": "token"})
    with pytest.raises(HardnegError, match=f"RAY_AUTH_MODE=disabled .* {AUTH_OVERRIDE}=1"):
        require_token_auth({"RAY_AUTH_MODE": "disabled"})
    require_token_auth({"RAY_AUTH_MODE": "disabled", AUTH_OVERRIDE: "1"})


def test_train_refuses_a_private_ray_without_token_auth(tmp_path, digits_shards):
    overrides = tiny_overrides(tmp_path, digits_shards, "cluster.launcher=ray")  # refused before Ray starts
    proc = hardneg("train", *overrides, env={"RAY_AUTH_MODE": "disabled"})
    assert_one_line_error(proc, "RAY_AUTH_MODE=disabled", AUTH_OVERRIDE)
    assert not any((tmp_path / "runs").glob("*/checkpoint_*"))


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """`mlflow server --app-name basic-auth` on 127.0.0.1 with an admin and one user account."""
    root = tmp_path_factory.mktemp("mlflow-auth")
    ini = root / "auth.ini"
    ini.write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{root / 'auth.db'}\nadmin_username = {ADMIN}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        "grant_default_workspace_access = false\n"
        "auth_cache_ttl_seconds = 60\n"
    )  # PBKDF2 per request costs seconds on a loaded 2-core machine
    env = {
        "MLFLOW_AUTH_CONFIG_PATH": str(ini),
        "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-only-flask-key",
    }
    with mlflow_server(root, "--app-name", "basic-auth", env=env) as url:
        from mlflow.server.auth.client import AuthServiceClient

        os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = ADMIN, ADMIN_PASSWORD
        try:
            AuthServiceClient(url).create_user(USER, USER_PASSWORD)
        finally:
            del os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]
        yield url


@pytest.mark.server
def test_training_logs_with_credentials_which_are_never_stored(tmp_path, digits_shards, auth_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", USER_PASSWORD)
    cfg = tiny_config(
        tmp_path,
        digits_shards,
        "cluster.launcher=local",
        f"tracking.uri={auth_server}",
        "tracking.run_name=authed",
        "tracking.experiment=secured",
        *ARTIFACTS_ON,  # the plots and the exported model must not carry the credentials either
    )
    result = train_command.train_run(cfg)
    client = MlflowClient(auth_server)
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.metrics  # training logged normally, as alice
    text = logged_text(client, run.info.run_id)
    assert USER_PASSWORD not in text and ADMIN_PASSWORD not in text
    for path in Path(result["run_dir"]).rglob("*"):
        if path.is_file():
            assert USER_PASSWORD.encode() not in path.read_bytes(), path


@pytest.mark.server
@pytest.mark.parametrize(
    "credentials, needles",
    [
        ({}, ["asks for credentials (HTTP 401)", "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD is not set"]),
        (
            {"MLFLOW_TRACKING_USERNAME": USER, "MLFLOW_TRACKING_PASSWORD": WRONG_PASSWORD},
            [f"refused MLFLOW_TRACKING_USERNAME={USER} (HTTP 401)"],
        ),
    ],
)
def test_train_refuses_missing_or_wrong_credentials_before_training(
    tmp_path, digits_shards, auth_server, credentials, needles
):
    overrides = tiny_overrides(
        tmp_path, digits_shards, "cluster.launcher=ray", f"tracking.uri={auth_server}", "tracking.run_name=refused"
    )
    line = assert_one_line_error(hardneg("train", *overrides, env=credentials), f"tracking.uri={auth_server}", *needles)
    assert WRONG_PASSWORD not in line  # a password is never echoed
    assert not (tmp_path / "runs" / "refused").exists()  # refused before Ray, the MLflow run or a checkpoint
