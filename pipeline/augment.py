"""Two-view augmentation (SimCLR, Chen et al. 2020) and the plain evaluation transform.

One recipe, two implementations of its steps: torchvision v2 per image (augment.where=loader) and kornia on
batches with per-sample parameters (where=device; and, after a per-sample crop and flip, where=batch and
data.format=ffcv through BatchColour). The blur kernel and sigma range are defined once, here.
"""

from __future__ import annotations

from typing import Optional

import torch
from torchvision.transforms import v2

from pipeline.config import AugmentConfig

BLUR_SIGMA = (0.1, 2.0)  # SimCLR's Gaussian blur: sigma uniform in this range
GREY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's luma weights: kornia's greyscale then equals RandomGrayscale


def blur_kernel(image_size: int) -> int:
    """SimCLR's Gaussian-blur kernel side for ``image_size`` views: ~10% of the side, odd, at least 3."""
    return max(3, (image_size // 10) | 1)


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
        kernel = blur_kernel(cfg.image_size)
        steps.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=BLUR_SIGMA)], p=cfg.blur_p))
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


def kornia_colour_steps(cfg: AugmentConfig) -> list:
    """SimCLR's steps after crop, rotation and flip as kornia modules: colour jitter (p = jitter_p), greyscale,
    Gaussian blur, normalisation. Factors, sigmas and the apply draws are per sample; kornia draws the order of
    the four jitter steps once per call (torchvision: once per image), so a batch shares it."""
    import kornia.augmentation as K

    steps: list = []
    if cfg.jitter_p > 0:
        steps.append(K.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue, p=cfg.jitter_p))
    if cfg.grayscale_p > 0:
        steps.append(K.RandomGrayscale(rgb_weights=torch.tensor(GREY_WEIGHTS), p=cfg.grayscale_p))
    if cfg.blur_p > 0:
        kernel = blur_kernel(cfg.image_size)
        steps.append(K.RandomGaussianBlur((kernel, kernel), BLUR_SIGMA, p=cfg.blur_p))
    steps.append(K.Normalize(mean=torch.tensor(cfg.mean), std=torch.tensor(cfg.std)))
    return steps


class DeviceTwoViews(torch.nn.Module):
    """Both SimCLR views made in one batch on the training device (kornia, per-sample random parameters).

    forward(images uint8 (B, 3, H, W) on any device) -> (view1, view2), each float (B, 3, S, S), normalised.
    The same policy as view_transform, so switching augment.where changes speed, not the recipe.
    """

    def __init__(self, cfg: AugmentConfig):
        super().__init__()
        import kornia.augmentation as K

        steps: list = [  # kornia augmentation modules, in order
            K.RandomResizedCrop((cfg.image_size, cfg.image_size), scale=(cfg.crop_scale_min, cfg.crop_scale_max))
        ]
        if cfg.rotation_degrees > 0:
            steps.append(K.RandomRotation(cfg.rotation_degrees, p=1.0))
        if cfg.hflip_p > 0:
            steps.append(K.RandomHorizontalFlip(p=cfg.hflip_p))
        steps += kornia_colour_steps(cfg)
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
    The colour steps then run per batch, with per-sample parameters (BatchColour)."""

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
        box = (left, top, left + width, top + height)
        out = image.crop(box).resize((self.size, self.size), Image.Resampling.BILINEAR)
        if flip:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.array(out)).permute(2, 0, 1)  # a writable copy

    def __call__(self, image):
        return self.view(image), self.view(image)


class BatchColour(torch.nn.Module):
    """The rest of the recipe for views already cropped and flipped per sample (augment.where=batch, FFCV):
    rotation (when set), then kornia_colour_steps, on the whole batch with per-sample parameters.

    forward(uint8 (B, 3, S, S) on any device) -> float (B, 3, S, S), normalised, on the same device.
    Rotation after the flip rather than before: the angle's law is symmetric, so the views' law is the same.
    """

    def __init__(self, cfg: AugmentConfig):
        super().__init__()
        import kornia.augmentation as K

        steps = [K.RandomRotation(cfg.rotation_degrees, p=1.0)] if cfg.rotation_degrees > 0 else []
        self.steps = K.AugmentationSequential(*steps, *kornia_colour_steps(cfg))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.steps(images.float().div_(255.0)).contiguous()
