"""Linear evaluation: a linear classifier trained on the frozen backbone's features (the papers' protocol).

HCL/DCL: Adam 1e-3, 100 epochs; SSCL/PSM: SGD lr 10, cosine schedule, batch 256 (docs/methods.md). With
``probe_augment`` the training split is re-augmented every epoch (random crop + flip), so features
are recomputed each epoch; without it they are computed once and the probe trains in seconds.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Optional

import torch
from torch import nn
from torchvision.transforms import v2

from pipeline import augment, console, data
from pipeline.config import AugmentConfig, EvalConfig
from pipeline.features import extract_features


def probe_transform(cfg: AugmentConfig, eval_cfg: Optional[EvalConfig] = None) -> v2.Compose:
    """Training-split augmentation of the linear probe (eval.probe_transform), then normalise.

    crop_flip: RandomResizedCrop(probe_crop_min or crop_scale_min, 1) + flip; train: the pretraining view
    with probe_crop_min and probe_blur_p where set (HCL/DCL's linear.py trains on train_transform).
    """
    eval_cfg = eval_cfg or EvalConfig()
    crop_min = eval_cfg.probe_crop_min or cfg.crop_scale_min
    if eval_cfg.probe_transform == "train":
        blur = cfg.blur_p if eval_cfg.probe_blur_p is None else eval_cfg.probe_blur_p
        return augment.view_transform(cfg.model_copy(update={"crop_scale_min": crop_min, "blur_p": blur}))
    steps = [v2.RandomResizedCrop(cfg.image_size, scale=(crop_min, 1.0), antialias=True)]
    if cfg.hflip_p > 0:
        steps.append(v2.RandomHorizontalFlip(cfg.hflip_p))
    return v2.Compose(steps + [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(cfg.mean, cfg.std)])


def _optimizer(cfg: EvalConfig, params) -> torch.optim.Optimizer:
    if cfg.probe_optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.probe_lr, momentum=0.9, weight_decay=cfg.probe_weight_decay)
    return torch.optim.Adam(params, lr=cfg.probe_lr, weight_decay=cfg.probe_weight_decay)


def fit_linear(
    epoch_batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    feat_dim: int,
    num_classes: int,
    cfg: EvalConfig,
) -> nn.Linear:
    """Train nn.Linear(feat_dim, num_classes) with cross-entropy; epoch_batches(e) yields (feats (b,d), labels (b,))."""
    classifier = nn.Linear(feat_dim, num_classes)
    optimizer = _optimizer(cfg, classifier.parameters())
    for epoch in range(cfg.probe_epochs):
        if cfg.probe_optimizer == "sgd":  # cosine schedule per epoch, as in SSCL/PSM's linear eval
            for group in optimizer.param_groups:
                group["lr"] = cfg.probe_lr * 0.5 * (1 + math.cos(math.pi * epoch / cfg.probe_epochs))
        for feats, labels in epoch_batches(epoch):
            loss = nn.functional.cross_entropy(classifier(feats), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return classifier


@torch.no_grad()
def accuracy(classifier: nn.Module, feats: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 of ``classifier`` on (feats (n,d), labels (n,))."""
    return (classifier(feats).argmax(dim=1) == labels).float().mean().item()


def _shuffled(feats: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int):
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        yield feats[idx], labels[idx]


def linear_probe(
    backbone: nn.Module,
    data_path: str,
    train_split: str,
    test_split: str,
    eval_cfg: EvalConfig,
    augment_cfg: AugmentConfig,
    *,
    seed: int = 0,
    device: torch.device = torch.device("cpu"),
    num_classes: Optional[int] = None,
    progress: bool = False,
) -> dict:
    """Linear top-1 of a frozen ``backbone``: train on ``train_split``, test on ``test_split`` (progress: bars on
    stderr, one for the test features and one over all probe epochs).

    Long on purpose: the probe's epoch loop and its schedule belong together, as in the papers' linear.py.
    """
    backbone = backbone.to(device).eval()
    test_tf = augment.eval_transform(augment_cfg, eval_cfg.eval_image_size)
    sizes = {name: info["num_samples"] for name, info in data.read_manifest(data_path)["splits"].items()}
    with console.stage_bar(f"probe: features of split {test_split}", sizes[test_split], enabled=progress) as bar:
        test_feats, test_y = extract_features(
            backbone,
            console.counted(data.eval_batches(data_path, test_split, test_tf, eval_cfg.batch_size), bar),
            device,
        )
    if eval_cfg.probe_augment:
        train_tf = probe_transform(augment_cfg, eval_cfg)

        def epoch_batches(epoch: int):
            for x, y in data.labelled_batches(
                data_path, train_split, train_tf, eval_cfg.probe_batch_size, seed=seed * 1000 + epoch
            ):
                with torch.no_grad():
                    feats = backbone(x.to(device)).float().cpu()
                yield feats, y  # outside no_grad: the classifier's step runs while we are suspended
    else:
        train_feats, train_y = extract_features(
            backbone, data.eval_batches(data_path, train_split, test_tf, eval_cfg.batch_size), device
        )

        def epoch_batches(epoch: int):
            return _shuffled(train_feats, train_y, eval_cfg.probe_batch_size, seed * 1000 + epoch)

    if num_classes is None:
        num_classes = len(data.read_manifest(data_path)["splits"][train_split]["classes"])
    torch.manual_seed(seed)
    desc = f"probe: {eval_cfg.probe_epochs} epochs over split {train_split}"
    with console.stage_bar(desc, eval_cfg.probe_epochs * sizes[train_split], enabled=progress) as bar:
        classifier = fit_linear(
            lambda epoch: console.counted(epoch_batches(epoch), bar), test_feats.shape[1], num_classes, eval_cfg
        )
    top1 = accuracy(classifier, test_feats, test_y)
    chance = float(torch.bincount(test_y).max()) / max(len(test_y), 1)  # always answering the commonest class
    result = {
        "linear_top1": top1,
        "chance_top1": chance,
        "probe_epochs": eval_cfg.probe_epochs,
        "probe_optimizer": eval_cfg.probe_optimizer,
        "probe_augment": eval_cfg.probe_augment,
    }
    if top1 < chance:
        result["warning"] = below_chance(top1, chance, eval_cfg)
    return result


def below_chance(top1: float, chance: float, eval_cfg: EvalConfig) -> str:
    """The one line saying a probe scored below chance, with the settings it was trained with."""
    return (
        f"linear-probe top-1 {top1:.4f} is below chance ({chance:.4f}: always answering the commonest test class) "
        f"after eval.probe_epochs={eval_cfg.probe_epochs} with eval.probe_optimizer={eval_cfg.probe_optimizer}, "
        f"eval.probe_lr={eval_cfg.probe_lr:g}, eval.probe_batch_size={eval_cfg.probe_batch_size}, "
        f"eval.probe_augment={str(eval_cfg.probe_augment).lower()}: the probe is undertrained "
        f"(the papers train it for 100 epochs), not a measure of the encoder"
    )
