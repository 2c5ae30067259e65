"""The project's one call of ray.init, so every driver keeps its own SIGTERM handling and its console.

ray.init installs a native SIGTERM handler that ends the process on the spot. The CLI's handler turns
SIGTERM (`hardneg stop`, `ray job stop`, a scheduler's preemption) into the Ctrl-C path instead, so the
MLflow run ends KILLED and temporary files are cleaned up; this puts it back after Ray has started.

Ray forwards every actor's output to the driver, prefixed "(RayTrainWorker pid=...)" in ANSI colour: its own
actors' too (the TrainController's C++ ``E ... core_worker.cc`` lines, retry tracebacks on a loaded machine).
Without --verbose, quiet_worker_logs forwards only the training workers' own lines, bare; all of it stays in
Ray's log files (/tmp/ray/session_latest/logs). Colour never reaches output that is not a terminal.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import threading
from typing import Iterator

import ray

# the training workers' actor class (Ray Train V2); every other actor is Ray's own machinery
TRAIN_WORKER_ACTOR = "RayTrainWorker"
# C++ log lines: Ray's glog "[2026-12-03 14:52:00,554 E 123 456] core_worker.cc:2465: ..." or "E1203 14:52:00 ...",
# and torch's (c10d) "[W1204 04:36:19.714673314 socket.cpp:207] [c10d] ..."
_CPP_LOG = re.compile(r"^(\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d[,.]\d+ [DIWEF] \d+ \d+\]|\[?[DIWEF]\d{4} \d\d:\d\d:\d\d)")


def init_ray(quiet: bool = False, **kwargs) -> None:
    """``ray.init(**kwargs)``, then restore the Python SIGTERM handler the process had before (if any).
    ``quiet``: C++ log lines that ray.init's native code writes straight to this process's stderr (e.g. "Failed
    to determine local IP" where there is no route) are dropped; every other line passes."""
    on_sigterm = signal.getsignal(signal.SIGTERM)
    if not sys.stdout.isatty():  # Ray's "(name pid=...)" prefixes are coloured unless this says no
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    try:
        with _native_log_lines_dropped() if quiet else contextlib.nullcontext():
            ray.init(**kwargs)
    finally:
        if callable(on_sigterm) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, on_sigterm)


@contextlib.contextmanager
def _native_log_lines_dropped() -> Iterator[None]:
    """While the block runs, file descriptor 2 is a pipe whose lines go on to the real stderr unless they are C++
    log lines. The pipe is drained until the process ends: a process started meanwhile may hold it."""
    sys.stderr.flush()
    real = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def drain() -> None:
        with os.fdopen(read_end, "rb") as pipe:
            for line in pipe:
                if not _CPP_LOG.match(line.decode("utf-8", "replace")):
                    os.write(real, line)

    threading.Thread(target=drain, name="hardneg-native-stderr", daemon=True).start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(real, 2)  # the driver's own stderr again; ``real`` stays open for lines still in the pipe


def training_lines(data: dict) -> list[str]:
    """The lines of one batch of forwarded output (Ray's ``{"actor_name", "lines", ...}``) that a quiet console
    shows: a training worker's own, without Ray's C++ log lines."""
    if TRAIN_WORKER_ACTOR not in (data.get("actor_name") or ""):
        return []
    return [line for line in data.get("lines", []) if not _CPP_LOG.match(line)]


def _print_training_lines(data: dict) -> None:
    sink = sys.stderr if data.get("is_err") else sys.stdout
    for line in training_lines(data):
        print(line, file=sink, flush=True)


def quiet_worker_logs() -> None:
    """Forward only the training workers' own lines to this driver's console, with no prefix and no colour
    (in place of Ray's printer, which ray.init registers as "ray_print_logs")."""
    from ray._private import worker as ray_worker  # Ray's log dispatcher has no public API

    dispatcher = ray_worker.global_worker_stdstream_dispatcher
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", _print_training_lines)
