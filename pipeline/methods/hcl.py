"""Hard negative sampling (Robinson et al. 2021, arXiv:2010.04592): loss.name=hcl."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Literal, Optional

import torch

from pipeline.losses.functional import hcl
from pipeline.methods.base import Beta, LossFn, TauPlus
from pipeline.methods.in_batch import InBatchConfig, InBatchObjective

if TYPE_CHECKING:
    from pipeline.config import Config

IN_BATCH = True


class Settings(InBatchConfig):
    """HCL: temperature, class prior tau_plus, hardness beta (n_hard: diagnostics)."""

    name: Literal["hcl"] = "hcl"
    tau_plus: TauPlus = 0.1
    beta: Beta = 1.0

    def beta_for_stats(self) -> float:
        return self.beta


def bind_loss(cfg: Settings) -> LossFn:
    """hcl as f(z1, z2, gather, generator), temperature, tau_plus and beta bound."""
    t, tau_plus, beta = cfg.temperature, cfg.tau_plus, cfg.beta
    return lambda z1, z2, gather, generator: hcl(z1, z2, gather=gather, temperature=t, tau_plus=tau_plus, beta=beta)


def build_objective(
    cfg: Config, gather: Optional[Callable] = None, generator: Optional[torch.Generator] = None
) -> InBatchObjective:
    """Encoder + projector trained with the hardness-weighted debiased loss over the global batch."""
    return InBatchObjective(cfg, bind_loss(cfg.loss), gather, generator)  # type: ignore[arg-type]
