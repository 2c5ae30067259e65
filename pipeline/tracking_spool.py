"""``hardneg runs sync RUN_DIR``: upload what a run could not send to its tracking server (its outbox spool)."""

from __future__ import annotations

import os
import shutil
from typing import Optional

import mlflow
from mlflow.tracking import MlflowClient

from pipeline import outbox as outbox_mod
from pipeline.errors import HardnegError
from pipeline.redaction import REDACTED, redact_value
from pipeline.tracking import send_record


def sync_spool(path: str, uri: Optional[str] = None) -> dict:
    """Upload what a run could not send (``hardneg runs sync RUN_DIR``); metric steps already stored are skipped."""
    spool = (
        path if os.path.basename(path.rstrip("/")) == outbox_mod.SPOOL_DIR else os.path.join(path, outbox_mod.SPOOL_DIR)
    )
    target = outbox_mod.read_target(spool)
    records = outbox_mod.read_spool(spool)
    if not records:
        raise HardnegError(f"nothing to upload: no {outbox_mod.SPOOL_DIR}/{outbox_mod.RECORDS_FILE} under {path}")
    uri = uri or target.get("uri")
    if not uri or REDACTED in uri:
        raise HardnegError(f"the spool under {path} does not name a usable tracking URI; pass --tracking-uri")
    client = MlflowClient(tracking_uri=uri)
    stored: dict[tuple[str, str], set[int]] = {}
    sent = {"records": 0, "metric_steps": 0}
    try:
        for record in records:
            if record["kind"] == "batch" and record.get("metrics"):
                fresh = []
                for k, v, t, s in record["metrics"]:
                    key = (record["run_id"], k)
                    if key not in stored:
                        stored[key] = {m.step for m in client.get_metric_history(record["run_id"], k)}
                    if s not in stored[key]:
                        fresh.append([k, v, t, s])
                        stored[key].add(s)
                sent["metric_steps"] += len(fresh)
                record = record | {"metrics": fresh}
            send_record(client, record)
            sent["records"] += 1
    except mlflow.exceptions.MlflowException as e:
        raise HardnegError(
            f"MLflow store {redact_value('uri', uri)}: {str(e).splitlines()[0]}; "
            f"{sent['records']} of {len(records)} records sent, rerun to send the rest"
        ) from None
    except Exception as e:  # noqa: BLE001 -- unreachable server: keep the spool for a rerun
        raise HardnegError(
            f"cannot reach {redact_value('uri', uri)} ({type(e).__name__}); "
            f"{sent['records']} of {len(records)} records sent, rerun to send the rest"
        ) from None
    shutil.rmtree(spool)
    return sent | {"uri": redact_value("uri", uri)}
