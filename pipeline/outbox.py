"""A bounded, ordered outbox between the step loop and the tracking server: training never waits on it.

Records (metrics, tags, params, artifacts, the final status) are queued and sent by one thread, in
order. When the server is unreachable the thread keeps the record and retries with a backoff, so an
outage only delays records; a full queue (a long outage) moves new records straight to the spool.
At close the outbox waits a bounded time for the queue to drain; whatever is still unsent is written
to ``SPOOL_DIR`` under the run directory (JSON lines, artifacts as copies) and uploaded later with
``hardneg runs sync RUN_DIR``.

Why not MLflow's own asynchronous logging (``log_batch(..., synchronous=False)``)? Its queue drops a
batch whose request fails (the exception is only logged), logs no artifacts asynchronously, and keeps
nothing for later: it cannot serve a 60 s outage, nor a server that never returns.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import threading
import time
import uuid
from typing import Callable, Optional

from data_prep.atomic import write_json_atomic
from pipeline import console

SPOOL_DIR = "tracking-spool"
RECORDS_FILE = "records.jsonl"
MAX_QUEUED = 10_000


class Outbox:
    """One sender thread; ``put`` never blocks. ``send(record)`` raises when the server cannot take it."""

    def __init__(self, send: Callable[[dict], None], spool_dir: str, describe: str):
        self.send, self.spool_dir, self.describe = send, spool_dir, describe
        self._queue: queue.Queue = queue.Queue(MAX_QUEUED)
        self._overflow: list[dict] = []  # records that found the queue full: spooled at close
        self._lock = threading.Lock()
        self._pending = 0  # queued or in flight
        self._idle = threading.Condition(self._lock)
        self.failures = 0  # failed attempts so far (an outage shows here)
        self.down_since: Optional[float] = None
        self._closing = self._abandoned = False
        self._inflight: Optional[dict] = None
        self._thread = threading.Thread(target=self._run, name="hardneg-tracking-outbox", daemon=True)
        self._thread.start()

    def put(self, record: dict) -> None:
        """Queue one record (artifacts: call ``stage`` first); never blocks."""
        with self._lock:
            if self._closing:
                self._overflow.append(record)
                return
            try:
                self._queue.put_nowait(record)
                self._pending += 1
            except queue.Full:
                self._overflow.append(record)

    def stage(self, local_path: str) -> str:
        """A private copy of a file or directory the caller may delete once this returns."""
        target = os.path.join(self.spool_dir, "artifacts", uuid.uuid4().hex[:12])
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if os.path.isdir(local_path):
            shutil.copytree(local_path, target)
        else:
            os.makedirs(target)
            shutil.copy2(local_path, target)
            target = os.path.join(target, os.path.basename(local_path))
        return target

    def _run(self) -> None:
        backoff = 0.5
        while True:
            record = self._queue.get()
            if record is None:
                return
            with self._lock:
                self._inflight = record
            while True:
                try:
                    self.send(record)
                    break
                except Exception:  # noqa: BLE001 -- an unreachable server, a timeout, a 5xx: keep the record, try again
                    self.failures += 1
                    self.down_since = self.down_since or time.time()
                    if self._abandoned:
                        return  # close() spooled this record with the rest
                    time.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
            with self._lock:
                if self._abandoned:
                    return  # sent after all; close() kept a copy too (sync skips metric steps already stored)
                self._inflight = None
            self.down_since, backoff = None, 0.5
            _discard_staged(record)
            self._done(1)

    def _done(self, n: int) -> None:
        with self._lock:
            self._pending -= n
            self._idle.notify_all()

    def flush(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for every queued record to be sent; True when all were."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self._pending > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(min(left, 0.5))
        return True

    def close(self, timeout_s: float) -> int:
        """Drain for up to ``timeout_s``, then spool what is left; returns the number of records spooled."""
        sent = self.flush(timeout_s)
        left: list[dict] = []
        with self._lock:
            self._closing = True
            if not sent:
                self._abandoned = True
                if self._inflight is not None:
                    left.append(self._inflight)
                while True:
                    try:
                        record = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    left.append(record)
            left += self._overflow
            self._overflow = []
        self._queue.put(None)
        self._thread.join(timeout=1.0 if sent else 0.1)
        if left:
            self._keep(left)
        return len(left)

    def _keep(self, records: list[dict]) -> None:
        """Append records to the spool file (whole lines, fsynced): ``hardneg runs sync`` sends them."""
        os.makedirs(self.spool_dir, exist_ok=True)
        with open(os.path.join(self.spool_dir, RECORDS_FILE), "a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in records))
            f.flush()
            os.fsync(f.fileno())


def _discard_staged(record: dict) -> None:
    path = record.get("staged")
    if path:
        root = path
        while os.path.basename(os.path.dirname(root)) != "artifacts":
            root = os.path.dirname(root)
        shutil.rmtree(root, ignore_errors=True)


def write_target(spool_dir: str, uri: str, run_id: str) -> None:
    """Note where the spooled records belong (read by ``hardneg runs sync``); written atomically."""
    os.makedirs(spool_dir, exist_ok=True)
    write_json_atomic(os.path.join(spool_dir, "target.json"), {"uri": uri, "run_id": run_id})


def read_target(spool_dir: str) -> dict:
    """{"uri", "run_id"} of a spool, {} when absent."""
    try:
        with open(os.path.join(spool_dir, "target.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def read_spool(spool_dir: str) -> list[dict]:
    """The records a run could not send (empty when none)."""
    path = os.path.join(spool_dir, RECORDS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def warn_spooled(count: int, describe: str, run_dir: str) -> None:
    """The one-line warning of a run that ends with records it could not send."""
    console.warn(
        f"the tracking server {describe} was unreachable; {count} records are kept in "
        f"{os.path.join(run_dir, SPOOL_DIR)}; upload them later with `hardneg runs sync {run_dir}`"
    )
