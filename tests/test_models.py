"""Backbones: the CIFAR stem, widths, feature sizes; the projector's shape."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.config import ModelConfig
from pipeline.models import build_backbone, build_model


def test_cifar_stem_is_3x3_stride1_without_maxpool():
    net, dim = build_backbone("resnet18", "cifar")
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, nn.Identity) and dim == 512
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 512)


def test_imagenet_stem_and_resnet50():
    net, dim = build_backbone("resnet50", "imagenet")
    assert net.conv1.kernel_size == (7, 7) and isinstance(net.maxpool, nn.MaxPool2d) and dim == 2048


def test_width_rescales_every_stage():
    net, dim = build_backbone("resnet18", "cifar", width=16)
    assert dim == 128 and net.layer1[0].conv1.out_channels == 16 and net.layer4[0].conv1.out_channels == 128
    assert net(torch.randn(2, 3, 16, 16)).shape == (2, 128)
    standard = sum(p.numel() for p in build_backbone("resnet18", "cifar")[0].parameters())
    assert sum(p.numel() for p in net.parameters()) < standard / 10


def test_model_projects_to_proj_dim():
    model = build_model(ModelConfig(width=8, proj_hidden_dim=32, proj_dim=16))
    assert model(torch.randn(4, 3, 16, 16)).shape == (4, 16)


def test_sscl_psm_stem_keeps_a_3x3_stride1_maxpool():
    net, _ = build_backbone("resnet18", "cifar", width=8, maxpool=True)
    pool = net.maxpool
    assert isinstance(pool, nn.MaxPool2d) and (pool.kernel_size, pool.stride, pool.padding) == (3, 1, 0)
    x = torch.randn(2, 3, 16, 16)
    assert net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(x))))).shape[-1] == 14  # stride 1, no padding: 16 -> 14
    model = build_model(ModelConfig(width=8, proj_hidden_dim=32, proj_dim=16, stem_maxpool=True, proj_bn=False))
    assert isinstance(model.backbone.maxpool, nn.MaxPool2d)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in model.projector)  # MoCo-v2's Linear-ReLU-Linear
