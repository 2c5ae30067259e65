"""Backbones and heads: torchvision ResNets with the CIFAR or ImageNet stem, and the MLP projector.

Modules hold parameters only; no collectives and no device moves happen in here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # annotations only: config builds its loss union from the methods, which build models
    from pipeline.config import ModelConfig

# name -> (torchvision block class name, blocks per stage)
_BLOCKS = {
    "resnet18": ("BasicBlock", [2, 2, 2, 2]),
    "resnet34": ("BasicBlock", [3, 4, 6, 3]),
    "resnet50": ("Bottleneck", [3, 4, 6, 3]),
}


def build_backbone(name: str, stem: str, width: int = 64, maxpool: bool = False) -> tuple[nn.Module, int]:
    """torchvision ResNet without its classifier: (B, 3, H, W) -> (B, feat_dim); returns (module, feat_dim).

    stem="cifar" is the 3x3 stride-1 conv used by SimCLR/HCL on 32 px images, without max-pool unless
    ``maxpool`` (SSCL/PSM's network keeps a 3x3 stride-1 one); width rescales every stage (64 = the
    standard network) so small demos fit a CPU.
    """
    # imported here, not at the top: torchvision pulls in torch._dynamo (seconds), and `import pipeline.config`
    # (every CLI call, even one that fails on a bad flag) reaches this module through the method registry
    from torchvision.models import resnet

    block_name, layers = _BLOCKS[name]
    block = getattr(resnet, block_name)
    net = resnet.ResNet(block, layers)
    if width != 64:
        # Rebuild the stages with torchvision's own blocks at the requested width.
        net.inplanes = width
        net.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        net.bn1 = nn.BatchNorm2d(width)
        net.layer1 = net._make_layer(block, width, layers[0])
        net.layer2 = net._make_layer(block, width * 2, layers[1], stride=2)
        net.layer3 = net._make_layer(block, width * 4, layers[2], stride=2)
        net.layer4 = net._make_layer(block, width * 8, layers[3], stride=2)
    if stem == "cifar":
        net.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.MaxPool2d(kernel_size=3, stride=1, padding=0) if maxpool else nn.Identity()  # 32 -> 30 px
    feat_dim = width * 8 * block.expansion
    net.fc = nn.Identity()
    return net, feat_dim


def projection_head(in_dim: int, hidden_dim: int, out_dim: int, batch_norm: bool = True) -> nn.Sequential:
    """Two-layer MLP projector g(h) (SimCLR; HCL uses Linear(no bias)-BN-ReLU-Linear): (B, in) -> (B, out)."""
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm1d(hidden_dim))
    layers += [nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim)]
    return nn.Sequential(*layers)


class ContrastiveModel(nn.Module):
    """Encoder f and projector g: forward(x (B,3,H,W)) -> projections (B, proj_dim), un-normalised."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.backbone, self.feat_dim = build_backbone(cfg.backbone, cfg.stem, cfg.width, cfg.stem_maxpool)
        self.projector = projection_head(self.feat_dim, cfg.proj_hidden_dim, cfg.proj_dim, cfg.proj_bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))


def build_model(cfg: ModelConfig) -> ContrastiveModel:
    """The model a config names."""
    return ContrastiveModel(cfg)


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
