"""The project's one call of ray.init, so every driver keeps its own SIGTERM handling.

ray.init installs a native SIGTERM handler that ends the process on the spot. The CLI's handler turns
SIGTERM (`hardneg stop`, `ray job stop`, a scheduler's preemption) into the Ctrl-C path instead, so the
MLflow run ends KILLED and temporary files are cleaned up; this puts it back after Ray has started.
"""

from __future__ import annotations

import signal
import threading

import ray


def init_ray(**kwargs) -> None:
    """``ray.init(**kwargs)``, then restore the Python SIGTERM handler the process had before (if any)."""
    on_sigterm = signal.getsignal(signal.SIGTERM)
    try:
        ray.init(**kwargs)
    finally:
        if callable(on_sigterm) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, on_sigterm)
