"""A toy method, written as docs/methods.md ("Adding a method") tells: NT-Xent scaled by loss.toy_scale.

tests/test_methods.py registers it with one registry line and trains it for a step.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipeline.losses import nt_xent
from pipeline.methods.in_batch import InBatchConfig, InBatchObjective

IN_BATCH = True


class Settings(InBatchConfig):
    """The toy's loss: section: name, temperature, n_hard (inherited) and its own toy_scale."""

    name: Literal["toy"] = "toy"
    toy_scale: float = Field(2.0, gt=0.0)


def bind_loss(cfg: Settings):
    """toy_scale x NT-Xent as f(z1, z2, gather, generator)."""
    return lambda z1, z2, gather, generator: cfg.toy_scale * nt_xent(z1, z2, gather=gather, temperature=cfg.temperature)


def build_objective(cfg, gather=None, generator=None):
    """Encoder + projector trained with the toy loss over the global batch."""
    return InBatchObjective(cfg, bind_loss(cfg.loss), gather, generator)
