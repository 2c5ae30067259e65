"""Frozen features of an encoder over labelled batches: what the kNN monitor and the linear probe both read."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def extract_features(
    encoder: nn.Module, batches, device: torch.device = torch.device("cpu")
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``encoder`` in eval mode over (x, y) batches -> (features (n, d), labels (n,)); restores its mode."""
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    try:
        for x, y in batches:
            feats.append(encoder(x.to(device)).float().cpu())
            labels.append(y)
    finally:
        encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels)
