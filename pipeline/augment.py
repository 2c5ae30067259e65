"""Two-view augmentation (SimCLR, Chen et al. 2020) and the plain evaluation transform, torchvision v2."""

from __future__ import annotations

from typing import Optional

import torch
from torchvision.transforms import v2

from pipeline.config import AugmentConfig


def _to_normalised_tensor(cfg: AugmentConfig) -> list:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(cfg.mean, cfg.std)]


def view_transform(cfg: AugmentConfig) -> v2.Compose:
    """One random view: PIL RGB image -> (3, S, S) float tensor, S = cfg.image_size."""
    steps: list = [v2.RandomResizedCrop(cfg.image_size, scale=(cfg.crop_scale_min, cfg.crop_scale_max), antialias=True)]
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


def eval_transform(cfg: AugmentConfig, size: Optional[int] = None) -> v2.Compose:
    """Deterministic: PIL RGB image -> (3, S, S) float tensor, resized to ``size`` (None: cfg.image_size)."""
    size = size or cfg.image_size
    return v2.Compose([v2.Resize((size, size), antialias=True)] + _to_normalised_tensor(cfg))


class TwoViews:
    """Callable: image -> (view1, view2), two independent draws of the same transform."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image):
        return self.transform(image), self.transform(image)


class DeviceTwoViews(torch.nn.Module):
    """Both SimCLR views made in one batch on the training device (kornia, per-sample random parameters).

    forward(images uint8 (B, 3, H, W) on any device) -> (view1, view2), each float (B, 3, S, S), normalised.
    The same policy as view_transform, so switching augment.where changes speed, not the recipe.
    """

    def __init__(self, cfg: AugmentConfig):
        super().__init__()
        import kornia.augmentation as K

        steps = [K.RandomResizedCrop((cfg.image_size, cfg.image_size), scale=(cfg.crop_scale_min, cfg.crop_scale_max))]
        if cfg.rotation_degrees > 0:
            steps.append(K.RandomRotation(cfg.rotation_degrees, p=1.0))
        if cfg.hflip_p > 0:
            steps.append(K.RandomHorizontalFlip(p=cfg.hflip_p))
        if cfg.jitter_p > 0:
            steps.append(K.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue, p=cfg.jitter_p))
        if cfg.grayscale_p > 0:
            steps.append(K.RandomGrayscale(p=cfg.grayscale_p))
        if cfg.blur_p > 0:
            kernel = max(3, (cfg.image_size // 10) | 1)
            steps.append(K.RandomGaussianBlur((kernel, kernel), (0.1, 2.0), p=cfg.blur_p))
        steps.append(K.Normalize(mean=torch.tensor(cfg.mean), std=torch.tensor(cfg.std)))
        self.view = K.AugmentationSequential(*steps)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.float().div_(255.0)  # (B, 3, H, W) in [0, 1]
        return self.view(x), self.view(x)


def to_uint8_tensor(size: int):
    """Loader-side transform for augment.where=device: PIL RGB -> uint8 (3, size, size), resized only if needed."""
    return v2.Compose([v2.ToImage(), v2.Resize((size, size), antialias=True)])


class CropFlipViews:
    """Loader-side half of augment.where=batch: PIL RGB image -> two uint8 (3, S, S) views, each with its own
    random resized crop and horizontal flip (torchvision's parameter draws, PIL's resize as v2 does on PIL).
    The colour steps then run per batch, with per-sample parameters (data.color_params)."""

    def __init__(self, cfg: AugmentConfig):
        self.size, self.hflip_p = cfg.image_size, cfg.hflip_p
        self.scale, self.ratio = [cfg.crop_scale_min, cfg.crop_scale_max], [3.0 / 4.0, 4.0 / 3.0]

    def params(self, image) -> tuple[int, int, int, int, bool]:
        """(top, left, height, width, flip) of one view: RandomResizedCrop's and RandomHorizontalFlip's draws."""
        from torchvision.transforms import RandomResizedCrop

        top, left, height, width = RandomResizedCrop.get_params(image, self.scale, self.ratio)
        return top, left, height, width, bool(torch.rand(1).item() < self.hflip_p)

    def view(self, image) -> torch.Tensor:
        """One uint8 (3, S, S) view of a PIL RGB image."""
        import numpy as np
        from PIL import Image

        top, left, height, width, flip = self.params(image)
        out = image.crop((left, top, left + width, top + height)).resize((self.size, self.size), Image.BILINEAR)
        if flip:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.array(out)).permute(2, 0, 1)  # a writable copy

    def __call__(self, image):
        return self.view(image), self.view(image)
