"""Backbones as a table: the CIFAR stem, widths, feature sizes, timm ViTs; keys of another family are refused;
the projector's shape; the printed build code builds the same network."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline import config
from pipeline.backbones import BACKBONES, build_backbone, build_code, vit_patch_size
from pipeline.config import ModelConfig
from pipeline.errors import HardnegError
from pipeline.models import build_model


def test_cifar_stem_is_3x3_stride1_without_maxpool():
    net, dim = build_backbone(ModelConfig(backbone="resnet18", stem="cifar"), 32)
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, nn.Identity) and dim == 512
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 512)


def test_imagenet_stem_and_resnet50():
    net, dim = build_backbone(ModelConfig(backbone="resnet50", stem="imagenet"), 224)
    assert net.conv1.kernel_size == (7, 7) and isinstance(net.maxpool, nn.MaxPool2d) and dim == 2048


def test_width_rescales_every_stage():
    net, dim = build_backbone(ModelConfig(width=16), 16)
    assert dim == 128 and net.layer1[0].conv1.out_channels == 16 and net.layer4[0].conv1.out_channels == 128
    assert net(torch.randn(2, 3, 16, 16)).shape == (2, 128)
    standard = sum(p.numel() for p in build_backbone(ModelConfig(), 32)[0].parameters())
    assert sum(p.numel() for p in net.parameters()) < standard / 10


def test_model_projects_to_proj_dim():
    model = build_model(ModelConfig(width=8, proj_hidden_dim=32, proj_dim=16), 16)
    assert model(torch.randn(4, 3, 16, 16)).shape == (4, 16)


def test_sscl_psm_stem_keeps_a_3x3_stride1_maxpool():
    net, _ = build_backbone(ModelConfig(width=8, stem_maxpool=True), 16)
    pool = net.maxpool
    assert isinstance(pool, nn.MaxPool2d) and (pool.kernel_size, pool.stride, pool.padding) == (3, 1, 0)
    x = torch.randn(2, 3, 16, 16)
    assert net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(x))))).shape[-1] == 14  # stride 1, no padding: 16 -> 14
    model = build_model(ModelConfig(width=8, proj_hidden_dim=32, proj_dim=16, stem_maxpool=True, proj_bn=False), 16)
    assert isinstance(model.backbone.maxpool, nn.MaxPool2d)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in model.projector)  # MoCo-v2's Linear-ReLU-Linear


@pytest.mark.parametrize(
    "name, size, patch, dim, tokens",
    [("vit_tiny", 16, None, 192, 64), ("vit_tiny", 32, 4, 192, 64), ("vit_small", 224, None, 384, 196)],
)
def test_vits_come_from_timm_sized_for_small_and_imagenet_images(name, size, patch, dim, tokens):
    m = ModelConfig(backbone=name, patch_size=patch)
    net, feat = build_backbone(m, size)
    assert feat == dim and type(net).__module__.startswith("timm.")
    assert net.patch_embed.proj.kernel_size == (vit_patch_size(m, size),) * 2
    assert net.patch_embed.num_patches == tokens
    assert not any(isinstance(mod, nn.modules.batchnorm._BatchNorm) for mod in net.modules())  # LayerNorm only
    if size <= 32:
        net.eval()
        assert net(torch.randn(3, 3, size, size)).shape == (3, dim)
        assert net(torch.randn(2, 3, size * 2, size * 2)).shape == (2, dim)  # eval_image_size may differ


def test_keys_of_another_backbone_family_are_one_line_errors():
    with pytest.raises(HardnegError, match=r"model.patch_size does not apply to model.backbone=resnet18 \(resnet\)"):
        config.load(None, ["model.patch_size=4"])
    with pytest.raises(HardnegError, match=r"model.width does not apply to model.backbone=vit_tiny \(vit\)"):
        config.load(None, ["model.backbone=vit_tiny", "model.width=16"])
    with pytest.raises(HardnegError, match="model.backbone='vgg'; expected one of resnet18, resnet34, resnet50, vit"):
        config.load(None, ["model.backbone=vgg"])
    vit = config.load(None, ["model.backbone=vit_tiny", "model.patch_size=2"])
    assert config.from_dict(config.to_dict(vit)) == vit  # a stored ViT config (ResNet keys at defaults) reloads


@pytest.mark.parametrize("backbone, extra", [("resnet34", {"width": 8, "stem": "imagenet"}), ("vit_tiny", {})])
def test_build_code_builds_the_same_network(backbone, extra):
    m = ModelConfig(backbone=backbone, **extra)
    net, _ = build_backbone(m, 16)
    scope: dict = {}
    exec(build_code(m, 16), scope)  # our own generated text, as a user would paste it
    twin = scope["net"]
    twin.load_state_dict(net.state_dict())  # same keys and shapes
    net.eval(), twin.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), net(x))
    assert set(BACKBONES) >= {"resnet18", "resnet34", "resnet50", "vit_tiny", "vit_small"}
