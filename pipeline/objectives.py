"""Objectives: a module that owns everything a method trains (encoder, heads, queues) and its loss.

``forward(x1, x2, labels=None, with_stats=False) -> (loss, stats)`` is all the step loop sees, so
SimCLR-family, PSM and MoCHi differ only here. ``after_step()`` runs after the optimiser step
(momentum updates). ``backbone`` is what evaluation uses. Gather and generator are injected.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from pipeline.config import Config, LossConfig
from pipeline.losses import LOSSES
from pipeline.models import build_model


def bind_loss(cfg: LossConfig) -> Callable:
    """The configured in-batch loss as f(z1, z2, gather, generator) -> scalar, hyper-parameters bound."""
    fn = LOSSES[cfg.name]
    kwargs = {"temperature": cfg.temperature}
    if cfg.name in ("dcl", "hcl", "sscl"):
        kwargs["tau_plus"] = cfg.tau_plus
    if cfg.name in ("hcl", "sscl"):
        kwargs["beta"] = cfg.beta
    if cfg.name == "sscl":
        kwargs.update(n_hard=cfg.n_hard, n_synthetic=cfg.n_synthetic, mix=cfg.mix)
        return lambda z1, z2, gather, generator: fn(z1, z2, gather=gather, generator=generator, **kwargs)
    return lambda z1, z2, gather, generator: fn(z1, z2, gather=gather, **kwargs)


class InBatchObjective(nn.Module):
    """SimCLR / DCL / HCL / SSCL: encoder f + projector g, loss over the gathered global batch."""

    def __init__(self, cfg: Config, gather: Optional[Callable] = None, generator: Optional[torch.Generator] = None):
        super().__init__()
        self.model = build_model(cfg.model)
        self.loss_fn = bind_loss(cfg.loss)
        self.gather = gather
        self.generator = generator

    @property
    def backbone(self) -> nn.Module:
        return self.model.backbone

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, labels: Optional[torch.Tensor] = None,
                with_stats: bool = False) -> tuple[torch.Tensor, dict]:
        # One forward over both views: BN sees both and DDP sees one call per backward.
        z1, z2 = self.model(torch.cat([x1, x2])).chunk(2)  # (n, proj_dim) each
        loss = self.loss_fn(z1, z2, self.gather, self.generator)
        return loss, {}

    def after_step(self) -> None:
        """Nothing to update outside the optimiser for the in-batch family."""


OBJECTIVES = {"nt_xent": InBatchObjective, "dcl": InBatchObjective, "hcl": InBatchObjective,
              "sscl": InBatchObjective}


def build_objective(cfg: Config, gather: Optional[Callable] = None,
                    generator: Optional[torch.Generator] = None) -> nn.Module:
    """The objective module the config's loss.name selects."""
    return OBJECTIVES[cfg.loss.name](cfg, gather, generator)
