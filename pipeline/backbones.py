"""Backbones as a table: ``model.backbone`` -> a builder (torchvision ResNets, timm ViTs).

Each entry builds ``(B, 3, H, W) -> (B, feat_dim)`` without a classifier and says which ``model.*`` keys
are its own, so a setting of another family is refused in one line (config.ModelConfig). Adding a
backbone is one builder plus one line in BACKBONES (docs/methods.md, "Adding a backbone").

Nothing heavy is imported at module level: the config reads the table's names and keys without torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from torch import nn

    from pipeline.config import ModelConfig

RESNET_KEYS = ("stem", "width", "stem_maxpool")
VIT_KEYS = ("patch_size",)
# name -> (torchvision block class name, blocks per stage)
_RESNET_BLOCKS = {
    "resnet18": ("BasicBlock", [2, 2, 2, 2]),
    "resnet34": ("BasicBlock", [3, 4, 6, 3]),
    "resnet50": ("Bottleneck", [3, 4, 6, 3]),
}
# name -> timm architecture (DeiT/ViT sizes: tiny 192-d x 12 blocks x 3 heads, small 384-d x 12 x 6)
_VIT_ARCH = {"vit_tiny": "vit_tiny_patch16_224", "vit_small": "vit_small_patch16_224"}


@dataclass(frozen=True)
class Backbone:
    """One row of the table: its family, the model.* keys it owns, its builder and its build code as text."""

    family: str
    keys: tuple[str, ...]
    build: Callable[["ModelConfig", int], tuple["nn.Module", int]]  # (model config, image size) -> (net, feat_dim)
    code: Callable[["ModelConfig", int], str]  # Python source that builds the same net as ``net``


def _resnet(name: str) -> Backbone:
    return Backbone("resnet", RESNET_KEYS, lambda m, size: build_resnet(name, m), lambda m, size: resnet_code(name, m))


def _vit(name: str) -> Backbone:
    return Backbone("vit", VIT_KEYS, lambda m, size: build_vit(name, m, size), lambda m, size: vit_code(name, m, size))


BACKBONES: dict[str, Backbone] = {
    "resnet18": _resnet("resnet18"),
    "resnet34": _resnet("resnet34"),
    "resnet50": _resnet("resnet50"),
    "vit_tiny": _vit("vit_tiny"),
    "vit_small": _vit("vit_small"),
}


def build_backbone(m: "ModelConfig", image_size: int) -> tuple["nn.Module", int]:
    """The backbone ``model.backbone`` names for ``image_size`` px inputs: (module, feat_dim)."""
    return BACKBONES[m.backbone].build(m, image_size)


def build_code(m: "ModelConfig", image_size: int) -> str:
    """Python source (torch + torchvision, or timm) that builds the same backbone as ``net``."""
    return BACKBONES[m.backbone].code(m, image_size)


def build_resnet(name: str, m: "ModelConfig") -> tuple["nn.Module", int]:
    """torchvision ResNet without its classifier: (B, 3, H, W) -> (B, feat_dim).

    stem="cifar" is the 3x3 stride-1 conv used by SimCLR/HCL on 32 px images, without max-pool unless
    ``stem_maxpool`` (SSCL/PSM's network keeps a 3x3 stride-1 one); width rescales every stage (64 = the
    standard network) so small demos fit a CPU.
    """
    # imported here: torchvision pulls in torch._dynamo (seconds), and the config reads this module
    from torch import nn
    from torchvision.models import resnet

    block_name, layers = _RESNET_BLOCKS[name]
    block = getattr(resnet, block_name)
    width = m.width
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
    if m.stem == "cifar":
        net.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.MaxPool2d(kernel_size=3, stride=1, padding=0) if m.stem_maxpool else nn.Identity()
    net.fc = nn.Identity()
    return net, width * 8 * block.expansion


def resnet_code(name: str, m: "ModelConfig") -> str:
    """The torchvision lines that build what build_resnet builds, as ``net``."""
    block, layers = _RESNET_BLOCKS[name]
    width = m.width
    lines = [
        "import torch",
        "from torchvision.models import resnet",
        f"net = resnet.ResNet(resnet.{block}, {layers})",
    ]
    if width != 64:  # the stages rebuilt at another width with torchvision's own blocks
        lines += [
            f"net.inplanes = {width}",
            f"net.conv1 = torch.nn.Conv2d(3, {width}, kernel_size=7, stride=2, padding=3, bias=False)",
            f"net.bn1 = torch.nn.BatchNorm2d({width})",
            *(
                f"net.layer{i + 1} = net._make_layer(resnet.{block}, {width * 2**i}, {n}{', stride=2' if i else ''})"
                for i, n in enumerate(layers)
            ),
        ]
    if m.stem == "cifar":
        lines.append(f"net.conv1 = torch.nn.Conv2d(3, {width}, kernel_size=3, stride=1, padding=1, bias=False)")
        pool = "torch.nn.MaxPool2d(kernel_size=3, stride=1, padding=0)" if m.stem_maxpool else "torch.nn.Identity()"
        lines.append(f"net.maxpool = {pool}")
    lines.append("net.fc = torch.nn.Identity()")
    return "\n".join(lines) + "\n"


def vit_patch_size(m: "ModelConfig", image_size: int) -> int:
    """model.patch_size, or the default for the image size: 16 from 128 px on (ImageNet), else size // 8."""
    if m.patch_size is not None:
        return m.patch_size
    return 16 if image_size >= 128 else max(1, image_size // 8)


def _vit_kwargs(m: "ModelConfig", image_size: int) -> dict:
    # dynamic_img_size: the kNN monitor and the probe may resize (eval.eval_image_size); the position
    # embeddings are interpolated then. num_classes=0: the pooled class token is the feature.
    return {
        "img_size": image_size,
        "patch_size": vit_patch_size(m, image_size),
        "num_classes": 0,
        "dynamic_img_size": True,
    }


def build_vit(name: str, m: "ModelConfig", image_size: int) -> tuple["nn.Module", int]:
    """timm ViT (class-token pooling, no head), randomly initialised: (B, 3, H, W) -> (B, embed_dim)."""
    import timm

    net = timm.create_model(_VIT_ARCH[name], pretrained=False, **_vit_kwargs(m, image_size))
    # timm sets num_features (the embedding width); getattr: to mypy an nn.Module attribute is Tensor | Module
    return net, int(getattr(net, "num_features"))  # noqa: B009


def vit_code(name: str, m: "ModelConfig", image_size: int) -> str:
    """The timm lines that build what build_vit builds, as ``net``."""
    kwargs = ", ".join(f"{k}={v!r}" for k, v in _vit_kwargs(m, image_size).items())
    return f"import timm\nnet = timm.create_model({_VIT_ARCH[name]!r}, pretrained=False, {kwargs})\n"
