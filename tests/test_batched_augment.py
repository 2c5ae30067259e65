"""augment.where=batch (and FFCV): per-sample crops + kornia colour steps per batch keep SimCLR's (torchvision's)
distribution."""

from __future__ import annotations

import math
from itertools import pairwise

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from pipeline import augment, data
from pipeline.config import AugmentConfig

N = 10000  # draws per side; tolerances are 5 standard errors of a difference of two means


def close_means(a, b, what: str, shape: bool = True) -> None:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    se = math.sqrt(a.var() / len(a) + b.var() / len(b)) + 1e-12
    assert abs(a.mean() - b.mean()) < 5 * se, f"{what}: mean {a.mean():.4f} vs torchvision {b.mean():.4f}"
    for q in (0.1, 0.5, 0.9) if shape else ():  # a continuous draw: its shape too, not only the mean
        spread = max(np.quantile(b, 0.9) - np.quantile(b, 0.1), 1e-6)
        assert abs(np.quantile(a, q) - np.quantile(b, q)) < 0.08 * spread, f"{what}: quantile {q}"


def test_crop_and_flip_draws_match_torchvision():
    cfg = AugmentConfig()
    views = augment.CropFlipViews(cfg)
    image = Image.fromarray(np.zeros((32, 40, 3), np.uint8))
    torch.manual_seed(0)
    ours = np.array([views.params(image) for _ in range(N)], dtype=np.float64)  # top, left, h, w, flip
    torch.manual_seed(1)
    crop = v2.RandomResizedCrop(cfg.image_size, scale=(cfg.crop_scale_min, cfg.crop_scale_max))
    ref = [crop.make_params([image]) for _ in range(N)]
    ref = np.array([[p["top"], p["left"], p["height"], p["width"]] for p in ref], dtype=np.float64)
    close_means(ours[:, 2] * ours[:, 3] / (32 * 40), ref[:, 2] * ref[:, 3] / (32 * 40), "crop area fraction")
    close_means(np.log(ours[:, 3] / ours[:, 2]), np.log(ref[:, 3] / ref[:, 2]), "crop log aspect ratio")
    close_means(ours[:, 0], ref[:, 0], "crop top", shape=False)  # integers: means only
    close_means(ours[:, 1], ref[:, 1], "crop left", shape=False)
    probe = torch.arange(2.0).view(1, 1, 2)  # flipped iff it comes back reversed
    flip = v2.RandomHorizontalFlip(cfg.hflip_p)
    flips = [bool(flip(probe)[0, 0, 0] == 1) for _ in range(N)]
    close_means(ours[:, 4], flips, "flip rate", shape=False)


def kornia_params(colour: augment.BatchColour, images: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """(output, step name -> its parameters) of one pass of the kornia steps; factors exist for applied rows only."""
    out = colour(images)
    return out, {item.name.rsplit("_", 1)[0]: item.data for item in colour.steps._params}


def test_colour_draws_match_torchvision():
    cfg = AugmentConfig()
    colour = augment.BatchColour(cfg)
    torch.manual_seed(0)
    _, p = kornia_params(colour, torch.zeros(N, 3, 2, 2, dtype=torch.uint8))
    jit = p["ColorJitter"]
    torch.manual_seed(1)
    jitter = v2.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)
    image = torch.zeros(3, 2, 2)
    ref = [jitter.make_params([image]) for _ in range(N)]
    for name in ("brightness", "contrast", "saturation", "hue"):
        close_means(jit[f"{name}_factor"].numpy(), [r[f"{name}_factor"] for r in ref], f"{name} factor")
    # where each of the four steps comes in the order: a uniform permutation on both sides (kornia: one per call)
    generator = next(m for m in colour.steps.children() if type(m).__name__ == "ColorJitter")._param_generator
    orders = torch.stack([generator(torch.Size((1, 3, 2, 2)))["order"] for _ in range(N // 5)])
    ours = np.zeros((4, 4))
    theirs = np.zeros((4, 4))
    for k in range(4):
        for op in range(4):
            ours[k, op] = (orders[:, k] == op).float().mean()
            theirs[k, op] = np.mean([int(r["fn_idx"][k]) == op for r in ref])
    assert np.abs(ours - theirs).max() < 5 * math.sqrt(0.25 * 0.75 * (5 / N + 1 / N)), (ours, theirs)
    calls = []
    applied = v2.RandomApply([v2.Lambda(lambda x: calls.append(1) or x)], p=cfg.jitter_p)
    for _ in range(N):
        applied(image)
    close_means(
        (jit["batch_prob"] > 0.5).float().numpy(),
        [1] * len(calls) + [0] * (N - len(calls)),
        "jitter applied",
        shape=False,
    )
    grey = v2.RandomGrayscale(cfg.grayscale_p)
    red = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
    greys = [bool(grey(red)[1, 0, 0] > 0) for _ in range(N)]
    close_means((p["RandomGrayscale"]["batch_prob"] > 0.5).float().numpy(), greys, "greyscale", shape=False)


def test_batched_colour_is_torchvision_per_sample():
    """Each sample of one batch gets torchvision's ops with its own factors, in the order kornia drew for the call."""
    cfg = AugmentConfig(jitter_p=0.7, grayscale_p=0.3)
    torch.manual_seed(3)
    x = torch.randint(0, 256, (12, 3, 8, 8), dtype=torch.uint8)
    got, p = kornia_params(augment.BatchColour(cfg), x)
    jit, grey = p["ColorJitter"], p["RandomGrayscale"]["batch_prob"] > 0.5
    applied = jit["batch_prob"] > 0.5
    assert 0 < int(applied.sum()) < 12 and 0 < int(grey.sum()) < 12  # both branches of both steps are met
    assert sorted(jit["order"].tolist()) == [0, 1, 2, 3]
    factor = {name: iter(jit[f"{name}_factor"].tolist()) for name in ("brightness", "contrast", "saturation", "hue")}
    mean, std = torch.tensor(cfg.mean).view(3, 1, 1), torch.tensor(cfg.std).view(3, 1, 1)
    for i in range(12):
        want = x[i].float() / 255
        if applied[i]:
            f = {name: next(values) for name, values in factor.items()}  # factors are drawn for applied rows only
            ops = [
                lambda y, f=f: F.adjust_brightness(y, f["brightness"]),
                lambda y, f=f: F.adjust_contrast(y, f["contrast"]),
                lambda y, f=f: F.adjust_saturation(y, f["saturation"]),
                lambda y, f=f: F.adjust_hue(y, f["hue"]),
            ]
            for op in jit["order"].tolist():
                want = ops[op](want)
        if grey[i]:
            want = F.rgb_to_grayscale(want, num_output_channels=3)
        # 2e-4: kornia's contrast takes the mean of its own greyscale (0.299 R where torchvision has 0.2989)
        assert torch.allclose(got[i] * std + mean, want, atol=2e-4), i


def test_blur_is_one_recipe():
    """torchvision's and kornia's blur use augment.blur_kernel's side and augment.BLUR_SIGMA's range."""
    cfg = AugmentConfig(image_size=64, blur_p=0.5)
    assert augment.blur_kernel(64) == 7 and augment.blur_kernel(32) == 3 and augment.blur_kernel(224) == 23
    tv = [t for step in augment.view_transform(cfg).transforms for t in getattr(step, "transforms", [step])]
    blur = next(t for t in tv if isinstance(t, v2.GaussianBlur))
    assert list(blur.kernel_size) == [7, 7] and list(blur.sigma) == list(augment.BLUR_SIGMA)
    for steps in (augment.BatchColour(cfg).steps, augment.DeviceTwoViews(cfg).view):
        kornia_blur = next(m for m in steps.children() if type(m).__name__ == "RandomGaussianBlur")
        assert tuple(kornia_blur.flags["kernel_size"]) == (7, 7) and kornia_blur.p == 0.5


def test_crop_flip_view_is_torchvisions_resized_crop_on_pil():
    cfg = AugmentConfig(image_size=16)
    views = augment.CropFlipViews(cfg)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 30, 3), dtype=np.uint8))
    for seed in range(8):
        torch.manual_seed(seed)
        top, left, h, w, flip = views.params(image)
        torch.manual_seed(seed)
        got = views.view(image)
        want = F.resized_crop(image, top, left, h, w, [16, 16], antialias=True)
        want = F.horizontal_flip(want) if flip else want
        assert got.dtype == torch.uint8 and got.shape == (3, 16, 16)
        assert (got.permute(1, 2, 0).numpy() == np.asarray(want)).all()


@pytest.mark.parametrize("workers", [0, 1])
def test_batched_train_batches_reads_real_shards(digits_shards, workers):
    cfg = AugmentConfig(image_size=8)
    batches = data.batched_train_batches(digits_shards, "train", cfg, 16, rank=0, seed=0, loader_workers=workers)
    v1, v2_, labels = next(batches)
    assert v1.shape == v2_.shape == (16, 3, 8, 8) and v1.dtype == torch.float32 and labels.shape == (16,)
    assert torch.isfinite(v1).all() and not torch.equal(v1, v2_)  # two different views
    assert labels.dtype == torch.int64 and 0 <= int(labels.min()) and int(labels.max()) <= 9
    batches.close()


def test_batched_stream_is_a_function_of_the_step(digits_shards):
    """With 2 loader workers each step gets its own batch (none served twice) and a stream started at step 3
    yields, bit for bit, what the stream from step 0 yields at step 3 (the colour step included)."""
    cfg = AugmentConfig(image_size=8)

    def stream(start: int):
        return data.batched_train_batches(
            digits_shards, "train", cfg, 16, rank=0, seed=0, loader_workers=2, start_step=start, steps_per_epoch=10
        )

    whole = stream(0)
    first = [next(whole) for _ in range(5)]
    whole.close()
    assert all(not torch.equal(a[0], b[0]) for a, b in pairwise(first))
    assert len({tuple(b[2].tolist()) for b in first}) == 5  # five different label sequences: no duplicates
    resumed = stream(3)
    again = next(resumed)
    resumed.close()
    assert all(torch.equal(x, y) for x, y in zip(first[3], again, strict=True))


def test_batched_views_are_a_function_of_the_step(digits_shards):
    """kornia's colour draws come from the step-seeded RNG too: a stream started at step 3 yields step 3's views."""
    cfg = AugmentConfig(image_size=8)

    def stream(start):
        return data.batched_train_batches(
            digits_shards, "train", cfg, 16, rank=0, seed=1, shuffle_buffer=50, start_step=start, steps_per_epoch=5
        )

    whole = stream(0)
    batches = [next(whole) for _ in range(4)]
    got = next(stream(3))
    assert all(torch.equal(x, y) for x, y in zip(got, batches[3], strict=True))
    assert not torch.equal(batches[2][0], batches[3][0])


def test_training_with_augment_where_batch(tmp_path, digits_shards):
    """augment.where=batch drives the step loop (the loader makes both views): finite loss, full epoch."""
    from conftest import tiny_config

    from pipeline.app import train_command

    cfg = tiny_config(
        tmp_path,
        digits_shards,
        "cluster.launcher=local",
        "tracking.enabled=false",
        "train.knn_every_epochs=0",
        "augment.where=batch",
    )
    result = train_command.train_run(cfg)
    assert result["step"] == 1347 // 128 and math.isfinite(result["knn_top1"])  # train after the 150-image holdout
