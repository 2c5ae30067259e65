"""SimCLR's NT-Xent (Chen et al. 2020, arXiv:2002.05709): loss.name=nt_xent."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Literal, Optional

import torch

from pipeline.losses.functional import nt_xent
from pipeline.methods.base import LossFn
from pipeline.methods.in_batch import InBatchConfig, InBatchObjective

if TYPE_CHECKING:
    from pipeline.config import Config

IN_BATCH = True


class Settings(InBatchConfig):
    """NT-Xent: the temperature only (n_hard: diagnostics)."""

    name: Literal["nt_xent"] = "nt_xent"


def bind_loss(cfg: Settings) -> LossFn:
    """nt_xent as f(z1, z2, gather, generator), the temperature bound."""
    t = cfg.temperature
    return lambda z1, z2, gather, generator: nt_xent(z1, z2, gather=gather, temperature=t)


def build_objective(
    cfg: Config, gather: Optional[Callable] = None, generator: Optional[torch.Generator] = None
) -> InBatchObjective:
    """Encoder + projector trained with NT-Xent over the global batch."""
    return InBatchObjective(cfg, bind_loss(cfg.loss), gather, generator)  # type: ignore[arg-type]
