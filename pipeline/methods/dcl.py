"""Debiased contrastive learning (Chuang et al. 2020, arXiv:2007.00224): loss.name=dcl."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Literal, Optional

import torch

from pipeline.losses.functional import dcl
from pipeline.methods.base import LossFn, TauPlus
from pipeline.methods.in_batch import InBatchConfig, InBatchObjective

if TYPE_CHECKING:
    from pipeline.config import Config

IN_BATCH = True


class Settings(InBatchConfig):
    """DCL: temperature and the class prior tau_plus (n_hard: diagnostics)."""

    name: Literal["dcl"] = "dcl"
    tau_plus: TauPlus = 0.1


def bind_loss(cfg: Settings) -> LossFn:
    """dcl as f(z1, z2, gather, generator), temperature and tau_plus bound."""
    t, tau_plus = cfg.temperature, cfg.tau_plus
    return lambda z1, z2, gather, generator: dcl(z1, z2, gather=gather, temperature=t, tau_plus=tau_plus)


def build_objective(
    cfg: Config, gather: Optional[Callable] = None, generator: Optional[torch.Generator] = None
) -> InBatchObjective:
    """Encoder + projector trained with the debiased loss over the global batch."""
    return InBatchObjective(cfg, bind_loss(cfg.loss), gather, generator)  # type: ignore[arg-type]
