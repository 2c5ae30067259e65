"""Where the tracking store is, and whether it will take a run: checked before any run or run folder exists.

A local store (sqlite:///FILE, file://DIR) must be creatable where its URI says; an http(s) server must answer
one authenticated request. Also where a new experiment's artifacts go and how to open the UI on a store.
No MLflow here: these run before the tracker (and in ``hardneg launch``), in one request or none.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional

from pipeline.config import TrackingConfig
from pipeline.errors import HardnegError
from pipeline.redaction import redact_value


def absolute_uri(uri: str, base_dir: str) -> str:
    """Make a relative ``sqlite:///file.db`` URI absolute against ``base_dir``."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + os.path.abspath(os.path.join(base_dir, uri[len("sqlite:///") :]))
    return uri


def local_store_path(uri: str) -> Optional[str]:
    """The local file (SQLite) or directory (file store) a tracking URI names, or None for a server."""
    if uri.startswith("sqlite:///"):
        return uri[len("sqlite:///") :] or None
    if uri.startswith("file://"):
        return uri[len("file://") :] or None
    return None if "://" in uri else uri


def check_store_path(cfg: TrackingConfig) -> None:
    """A local tracking store (sqlite:///FILE, file://DIR) can be created where the URI says: its nearest
    existing ancestor is a writable directory and the store is not the wrong kind of file. HardnegError else,
    before any run or run folder exists (MLflow would raise FileExistsError from its own makedirs)."""
    path = local_store_path(cfg.uri) if cfg.enabled else None
    if path is None:
        return
    sqlite = cfg.uri.startswith("sqlite:")
    if sqlite and os.path.isdir(path):
        raise HardnegError(
            f"tracking.uri={cfg.uri}: {path} is a directory; name a database file in it, e.g. {path}/mlflow.db"
        )
    if not sqlite and os.path.exists(path) and not os.path.isdir(path):
        raise HardnegError(f"tracking.uri={cfg.uri}: {path} is a file; a file store needs a directory")
    parent = os.path.dirname(os.path.abspath(path)) if sqlite else os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise HardnegError(
            f"tracking.uri={cfg.uri}: {parent} is a file, not a directory, so the store cannot be created under it"
        )
    if not os.access(parent, os.W_OK | os.X_OK) and not (sqlite and os.access(path, os.W_OK)):
        raise HardnegError(f"tracking.uri={cfg.uri}: cannot write in {parent} (permission denied)")


def default_artifact_location(cfg: TrackingConfig) -> Optional[str]:
    """Where a new experiment's artifacts go: tracking.artifact_location, else beside a SQLite file."""
    if cfg.artifact_location:
        return cfg.artifact_location
    if cfg.uri.startswith("sqlite:///"):
        db_dir = os.path.dirname(cfg.uri[len("sqlite:///") :]) or "."
        return "file://" + os.path.abspath(os.path.join(db_dir, "mlartifacts", cfg.experiment))
    return None  # a tracking server decides (its --artifacts-destination)


def ui_command(uri: str) -> str:
    """The shell command that opens the MLflow UI on ``uri``'s store, bound to localhost."""
    if uri.startswith(("http://", "https://")):
        return f"open {redact_value('uri', uri)} in a browser"
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"


CREDENTIAL_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def check_server_access(cfg: TrackingConfig, environ: Mapping[str, str] = os.environ, timeout_s: float = 60.0) -> None:
    """One authenticated request to an http(s) tracking server, so a server that is down or refuses the
    credentials (MLFLOW_TRACKING_USERNAME / _PASSWORD, as MLflow's client sends them) fails before training.

    File and SQLite stores need no check. The password is never part of a message.
    """
    if not (cfg.enabled and cfg.uri.startswith(("http://", "https://"))):
        return
    import requests  # MLflow's own HTTP client; one request, without MLflow's minutes of retries

    uri = redact_value("uri", cfg.uri)
    user, password = (environ.get(name) for name in CREDENTIAL_VARS)
    auth = (user, password) if user and password else None
    try:
        response = requests.get(
            f"{cfg.uri.rstrip('/')}/api/2.0/mlflow/experiments/search",
            params={"max_results": 1},
            auth=auth,
            timeout=timeout_s,
        )
    except requests.RequestException as e:
        raise HardnegError(
            f"tracking.uri={uri}: no MLflow server answers ({type(e).__name__}); start it or fix the URI"
        ) from None
    if response.status_code == 401:
        if auth is None:
            missing = " and ".join(name for name in CREDENTIAL_VARS if not environ.get(name))
            raise HardnegError(
                f"tracking.uri={uri} asks for credentials (HTTP 401) and {missing} is not set; "
                f"export both for your MLflow account"
            )
        raise HardnegError(
            f"tracking.uri={uri} refused MLFLOW_TRACKING_USERNAME={user} (HTTP 401): wrong user "
            f"name or MLFLOW_TRACKING_PASSWORD"
        )
    if response.status_code == 403:
        raise HardnegError(
            f"tracking.uri={uri}: MLFLOW_TRACKING_USERNAME={user} may not read experiments (HTTP 403); "
            f"ask the server's admin for access"
        )
    if not response.ok:
        raise HardnegError(
            f"tracking.uri={uri}: the server answered HTTP {response.status_code} to an experiment "
            f"search; is it an MLflow tracking server?"
        )
