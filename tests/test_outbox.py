"""The tracking outbox on its own: put never blocks, order is kept across an outage, leftovers are spooled,
and `hardneg runs sync` sends a spool into a real SQLite MLflow store (skipping steps it already holds)."""

from __future__ import annotations

import os
import threading

from mlflow.tracking import MlflowClient

from pipeline import outbox, tracking
from pipeline.app.cli import main as cli_main
from pipeline.config import TrackingConfig


class FlakyServer:
    """send() fails while ``down`` is set, records what it took otherwise."""

    def __init__(self):
        self.down = threading.Event()
        self.got: list[int] = []

    def send(self, record: dict) -> None:
        if self.down.is_set():
            raise ConnectionError("server down")
        self.got.append(record["n"])


def test_records_wait_out_an_outage_in_order(tmp_path):
    server = FlakyServer()
    server.down.set()
    box = outbox.Outbox(server.send, str(tmp_path / "spool"), "test")
    for n in range(50):
        box.put({"n": n})  # returns at once although nothing can be sent
    assert not box.flush(0.3) and server.got == [] and box.failures > 0
    server.down.clear()
    assert box.flush(30)
    assert server.got == list(range(50))
    assert box.close(5) == 0 and not os.path.exists(tmp_path / "spool" / outbox.RECORDS_FILE)


def test_a_server_that_never_returns_leaves_a_spool(tmp_path):
    server = FlakyServer()
    server.down.set()
    box = outbox.Outbox(server.send, str(tmp_path / "spool"), "test")
    for n in range(5):
        box.put({"n": n})
    assert box.close(0.5) == 5
    assert [r["n"] for r in outbox.read_spool(str(tmp_path / "spool"))] == list(range(5))


def test_runs_sync_uploads_a_spool_once(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    tracker = tracking.MlflowTracker(TrackingConfig(uri=uri, run_name="spooled"))
    tracker.log_metrics({"loss": 1.0}, step=1)  # already in the store
    run_dir = tmp_path / "runs" / "spooled"
    spool = str(run_dir / outbox.SPOOL_DIR)
    outbox.write_target(spool, uri, tracker.run_id)
    records = [
        {"kind": "batch", "run_id": tracker.run_id, "metrics": [["loss", float(s), 0, s] for s in (1, 2, 3)]},
        {"kind": "batch", "run_id": tracker.run_id, "tags": [["failure_reason", "none"]]},
        {"kind": "terminated", "run_id": tracker.run_id, "status": "FINISHED"},
    ]
    box = outbox.Outbox(lambda r: (_ for _ in ()).throw(ConnectionError()), spool, "test")
    box._keep(records)
    box.close(0)
    assert cli_main(["runs", "sync", str(run_dir)]) == 0
    assert "3 records (2 metric steps)" in capsys.readouterr().out
    client = MlflowClient(uri)
    assert sorted(m.step for m in client.get_metric_history(tracker.run_id, "loss")) == [1, 2, 3]
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["failure_reason"] == "none"
    assert cli_main(["runs", "sync", str(run_dir)]) == 2  # nothing left: one line, exit 2
    assert "nothing to upload" in capsys.readouterr().err
