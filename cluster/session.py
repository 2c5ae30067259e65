"""One Ray session spanning several trainings (the reproduce grid), started only when needed."""
from __future__ import annotations

import contextlib

import ray

from cluster.train import _start_ray
from pipeline.config import Config


@contextlib.contextmanager
def ray_session(cfg: Config):
    """Connect to or start Ray as ``cfg`` says for the duration of the block; shut down what we started."""
    started = _start_ray(cfg)
    try:
        yield
    finally:
        if started:
            ray.shutdown()
