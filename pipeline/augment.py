"""Two-view augmentation (SimCLR, Chen et al. 2020) and the plain evaluation transform, torchvision v2."""
from __future__ import annotations

import torch
from torchvision.transforms import v2

from pipeline.config import AugmentConfig


def _to_normalised_tensor(cfg: AugmentConfig) -> list:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(cfg.mean, cfg.std)]


def view_transform(cfg: AugmentConfig) -> v2.Compose:
    """One random view: PIL RGB image -> (3, S, S) float tensor, S = cfg.image_size."""
    steps: list = [
        v2.RandomResizedCrop(cfg.image_size, scale=(cfg.crop_scale_min, cfg.crop_scale_max), antialias=True)
    ]
    if cfg.rotation_degrees > 0:
        steps.append(v2.RandomRotation(cfg.rotation_degrees))
    if cfg.hflip_p > 0:
        steps.append(v2.RandomHorizontalFlip(cfg.hflip_p))
    if cfg.jitter_p > 0:
        jitter = v2.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)
        steps.append(v2.RandomApply([jitter], p=cfg.jitter_p))
    if cfg.grayscale_p > 0:
        steps.append(v2.RandomGrayscale(cfg.grayscale_p))
    if cfg.blur_p > 0:
        # kernel ~10% of the image side, odd, as in SimCLR
        kernel = max(3, (cfg.image_size // 10) | 1)
        steps.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=cfg.blur_p))
    return v2.Compose(steps + _to_normalised_tensor(cfg))


def eval_transform(cfg: AugmentConfig) -> v2.Compose:
    """Deterministic: PIL RGB image -> (3, S, S) float tensor, resized to cfg.image_size."""
    return v2.Compose([v2.Resize((cfg.image_size, cfg.image_size), antialias=True)] + _to_normalised_tensor(cfg))


class TwoViews:
    """Callable: image -> (view1, view2), two independent draws of the same transform."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image):
        return self.transform(image), self.transform(image)
