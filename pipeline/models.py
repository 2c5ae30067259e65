"""Heads and the encoder + projector module; the backbones themselves are a table in backbones.py.

Modules hold parameters only; no collectives and no device moves happen in here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from pipeline.backbones import build_backbone

if TYPE_CHECKING:  # annotations only
    from pipeline.config import ModelConfig


def projection_head(in_dim: int, hidden_dim: int, out_dim: int, batch_norm: bool = True) -> nn.Sequential:
    """Two-layer MLP projector g(h) (SimCLR; HCL uses Linear(no bias)-BN-ReLU-Linear): (B, in) -> (B, out)."""
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm1d(hidden_dim))
    layers += [nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim)]
    return nn.Sequential(*layers)


class ContrastiveModel(nn.Module):
    """Encoder f and projector g: forward(x (B,3,H,W)) -> projections (B, proj_dim), un-normalised."""

    def __init__(self, cfg: ModelConfig, image_size: int):
        super().__init__()
        self.backbone, self.feat_dim = build_backbone(cfg, image_size)
        self.projector = projection_head(self.feat_dim, cfg.proj_hidden_dim, cfg.proj_dim, cfg.proj_bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))


def build_model(cfg: ModelConfig, image_size: int) -> ContrastiveModel:
    """The model a config names, for ``image_size`` px inputs (a ViT's patch grid depends on it)."""
    return ContrastiveModel(cfg, image_size)


def bn_mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """PSM / MoCo-v3 MLP: Linear(no bias)-BN-ReLU-Linear(no bias)-BN(affine=False): (B, in) -> (B, out).

    The projector and the predictor of PSM (github.com/dhkdhk/PSM `_build_mlp(2, ..., last_bn=True)`).
    """
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim, bias=False),
        nn.BatchNorm1d(out_dim, affine=False),
    )


def momentum_copy(module: nn.Module) -> nn.Module:
    """A frozen deep copy (requires_grad=False) to be updated only by ``ema_update_``."""
    import copy

    twin = copy.deepcopy(module)
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


@torch.no_grad()
def ema_update_(target: nn.Module, source: nn.Module, momentum: float) -> None:
    """In place, parameters only (MoCo/PSM): target = momentum * target + (1 - momentum) * source."""
    for p_t, p_s in zip(target.parameters(), source.parameters(), strict=True):
        p_t.mul_(momentum).add_(p_s.detach(), alpha=1.0 - momentum)
