"""Objectives: a module that owns everything a method trains (encoder, heads, queues) and its loss.

``forward(x1, x2, labels=None, with_stats=False) -> (loss, stats)`` is all the step loop sees, so
SimCLR-family, PSM and MoCHi differ only there. ``after_step()`` runs after the optimiser step
(momentum updates). ``backbone`` is what evaluation uses. Gather and generator are injected.
With ``with_stats`` the objective also returns its diagnostics (pipeline/losses/diagnostics.py) as
{name: 0-dim tensor}, the same names on every rank; computing them draws nothing from any generator.

This module asks the registry (pipeline/methods/__init__.py) which objective a config trains, and binds an
in-batch method's loss to its settings.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from pipeline.config import Config
from pipeline.methods import method
from pipeline.methods.base import InBatchMethod, LossFn, MethodConfig, resolve
from pipeline.methods.in_batch import InBatchObjective
from pipeline.methods.mochi import MoCHiObjective
from pipeline.methods.psm import PSMObjective
from pipeline.methods.settings import InBatchConfig

__all__ = ["InBatchObjective", "MoCHiObjective", "PSMObjective", "bind_loss", "build_objective"]


def bind_loss(cfg: MethodConfig) -> LossFn:
    """The configured in-batch loss as f(z1, z2, gather, generator) -> scalar, hyper-parameters bound."""
    chosen = method(cfg.name)
    if not isinstance(chosen, InBatchMethod) or not isinstance(cfg, InBatchConfig):
        raise ValueError(f"loss.name={cfg.name} is not an in-batch loss; build its objective instead")
    loss, kwargs = resolve(chosen.loss), cfg.loss_kwargs()
    if chosen.draws:  # the loss draws from the step's generator (SSCL's synthetic mixes)
        return lambda z1, z2, gather, generator: loss(z1, z2, gather=gather, generator=generator, **kwargs)
    return lambda z1, z2, gather, generator: loss(z1, z2, gather=gather, **kwargs)


def build_objective(
    cfg: Config, gather: Optional[Callable] = None, generator: Optional[torch.Generator] = None
) -> nn.Module:
    """The objective module the config's loss.name selects: InBatchObjective with the row's loss, or its own class."""
    chosen = method(cfg.loss.name)
    if isinstance(chosen, InBatchMethod):
        return InBatchObjective(cfg, bind_loss(cfg.loss), gather, generator)
    return resolve(chosen.objective)(cfg, gather, generator)
