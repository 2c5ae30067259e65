"""Synthetic hard negatives (Dong et al., SSCL, arXiv:2304.02971): loss.name=sscl."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, ClassVar, Literal, Optional

import torch
from pydantic import Field

from pipeline.losses.functional import sscl
from pipeline.methods.base import Beta, LossFn, TauPlus
from pipeline.methods.in_batch import InBatchConfig, InBatchObjective

if TYPE_CHECKING:
    from pipeline.config import Config

IN_BATCH = True


class Settings(InBatchConfig):
    """SSCL: HCL's settings plus the synthesizer (n_hard = s hardest, n_synthetic mixes, mix rule)."""

    name: Literal["sscl"] = "sscl"
    tau_plus: TauPlus = 0.1
    beta: Beta = 1.0
    n_synthetic: int = Field(8, ge=0)
    mix: Literal["paper", "release"] = "paper"
    DIAGNOSTIC_KEYS: ClassVar[tuple[str, ...]] = ()  # n_hard is SSCL's own s

    def beta_for_stats(self) -> float:
        return self.beta

    def synthetic_for_stats(self) -> tuple[int, Literal["paper", "release"]]:
        return self.n_synthetic, self.mix


def bind_loss(cfg: Settings) -> LossFn:
    """sscl as f(z1, z2, gather, generator): every setting bound; the generator draws the mixes."""
    kw = dict(
        temperature=cfg.temperature,
        tau_plus=cfg.tau_plus,
        beta=cfg.beta,
        n_hard=cfg.n_hard,
        n_synthetic=cfg.n_synthetic,
        mix=cfg.mix,
    )
    return lambda z1, z2, gather, generator: sscl(z1, z2, gather=gather, generator=generator, **kw)


def build_objective(
    cfg: Config, gather: Optional[Callable] = None, generator: Optional[torch.Generator] = None
) -> InBatchObjective:
    """Encoder + projector trained with HCL's loss plus synthetic hard negatives over the global batch."""
    return InBatchObjective(cfg, bind_loss(cfg.loss), gather, generator)  # type: ignore[arg-type]
