"""A toy method, written as docs/methods.md ("Adding a method") tells: NT-Xent scaled by loss.toy_scale.

tests/test_methods.py registers it with one registry line (``METHODS["toy"] = toy_method.METHOD``) and
trains it for a step.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipeline.losses import nt_xent
from pipeline.methods.base import InBatchMethod
from pipeline.methods.settings import InBatchConfig


class Settings(InBatchConfig):
    """The toy's loss: section: name, temperature, n_hard (inherited) and its own toy_scale."""

    name: Literal["toy"] = "toy"
    toy_scale: float = Field(2.0, gt=0.0)


def toy_loss(z1, z2, *, temperature: float, toy_scale: float, gather=None):
    """toy_scale x NT-Xent; called with the settings (but name and n_hard, a diagnostic) as keywords."""
    return toy_scale * nt_xent(z1, z2, gather=gather, temperature=temperature)


METHOD = InBatchMethod(Settings, toy_loss)  # the registry row: the settings and the loss function
