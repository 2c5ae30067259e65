"""Objectives: a module that owns everything a method trains (encoder, heads, queues) and its loss.

``forward(x1, x2, labels=None, with_stats=False) -> (loss, stats)`` is all the step loop sees, so
SimCLR-family, PSM and MoCHi differ only there. ``after_step()`` runs after the optimiser step
(momentum updates). ``backbone`` is what evaluation uses. Gather and generator are injected.
With ``with_stats`` the objective also returns its diagnostics (pipeline/losses/diagnostics.py) as
{name: 0-dim tensor}, the same names on every rank; computing them draws nothing from any generator.

Each method's objective lives in its module under pipeline/methods/; this module asks the registry.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from pipeline.config import Config, LossConfig
from pipeline.methods import method
from pipeline.methods.base import LossFn
from pipeline.methods.in_batch import InBatchObjective
from pipeline.methods.mochi import MoCHiObjective
from pipeline.methods.psm import PSMObjective

__all__ = ["InBatchObjective", "MoCHiObjective", "PSMObjective", "bind_loss", "build_objective"]


def bind_loss(cfg: LossConfig) -> LossFn:
    """The configured in-batch loss as f(z1, z2, gather, generator) -> scalar, hyper-parameters bound."""
    chosen = method(cfg.name)
    if not chosen.IN_BATCH:
        raise ValueError(f"loss.name={cfg.name} is not an in-batch loss; build its objective instead")
    return chosen.bind_loss(cfg)  # type: ignore[attr-defined]


def build_objective(
    cfg: Config, gather: Optional[Callable] = None, generator: Optional[torch.Generator] = None
) -> nn.Module:
    """The objective module the config's loss.name selects (its method module builds it)."""
    return method(cfg.loss.name).build_objective(cfg, gather, generator)
