"""augment.where=batch: per-sample crops + per-batch colour steps keep SimCLR's (torchvision's) distribution."""

from __future__ import annotations

import math

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


def test_colour_draws_match_torchvision():
    cfg = AugmentConfig()
    torch.manual_seed(0)
    p = data.color_params(N, cfg)
    torch.manual_seed(1)
    jitter = v2.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)
    image = torch.zeros(3, 2, 2)
    ref = [jitter.make_params([image]) for _ in range(N)]
    for name in ("brightness", "contrast", "saturation", "hue"):
        close_means(p[name].numpy(), [r[f"{name}_factor"] for r in ref], f"{name} factor")
    # where each of the four steps comes in the order: a uniform permutation on both sides
    ours = np.zeros((4, 4))
    theirs = np.zeros((4, 4))
    for k in range(4):
        for op in range(4):
            ours[k, op] = (p["order"][:, k] == op).float().mean()
            theirs[k, op] = np.mean([int(r["fn_idx"][k]) == op for r in ref])
    assert np.abs(ours - theirs).max() < 5 * math.sqrt(2 * 0.25 * 0.75 / N), (ours, theirs)
    calls = []
    applied = v2.RandomApply([v2.Lambda(lambda x: calls.append(1) or x)], p=cfg.jitter_p)
    for _ in range(N):
        applied(image)
    close_means(p["jitter"].float().numpy(), [1] * len(calls) + [0] * (N - len(calls)), "jitter applied", shape=False)
    grey = v2.RandomGrayscale(cfg.grayscale_p)
    colour = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
    greys = [bool(grey(colour)[1, 0, 0] > 0) for _ in range(N)]
    close_means(p["grey"].float().numpy(), greys, "greyscale", shape=False)


def test_batched_colour_is_torchvision_per_sample():
    """Each sample of one batch gets torchvision's ops, in its own order, with its own factors."""
    cfg = AugmentConfig(jitter_p=0.7, grayscale_p=0.3)
    torch.manual_seed(3)
    x = torch.rand(12, 3, 8, 8)
    p = data.color_params(12, cfg)
    assert len({tuple(o.tolist()) for o in p["order"]}) > 1  # orders differ within the batch
    got = data.apply_color(x, p, cfg)
    ops = [
        lambda y, i: F.adjust_brightness(y, float(p["brightness"][i])),
        lambda y, i: F.adjust_contrast(y, float(p["contrast"][i])),
        lambda y, i: F.adjust_saturation(y, float(p["saturation"][i])),
        lambda y, i: F.adjust_hue(y, float(p["hue"][i])),
    ]
    for i in range(12):
        want = x[i]
        if p["jitter"][i]:
            for op in p["order"][i].tolist():
                want = ops[op](want, i)
        if p["grey"][i]:
            want = F.rgb_to_grayscale(want, num_output_channels=3)
        assert torch.allclose(got[i], want, atol=1e-4), i


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
    assert all(not torch.equal(a[0], b[0]) for a, b in zip(first, first[1:]))
    assert len({tuple(b[2].tolist()) for b in first}) == 5  # five different label sequences: no duplicates
    resumed = stream(3)
    again = next(resumed)
    resumed.close()
    assert all(torch.equal(x, y) for x, y in zip(first[3], again))


@pytest.mark.slow
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
