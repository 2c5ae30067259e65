"""Evaluation: the weighted kNN monitor of InstDisc/SimCLR/HCL (Wu et al. 2018) on frozen features."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pipeline import console, data
from pipeline.features import extract_features


def knn_predict(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    *,
    k: int,
    temperature: float,
    num_classes: int,
    chunk: int = 1024,
) -> torch.Tensor:
    """Weighted kNN: bank (M, d), bank_labels (M,), queries (Q, d) -> predicted labels (Q,).

    Features are L2-normalised; each of the k nearest bank items votes for its class with weight
    exp(cos / temperature). k is clamped to the bank size.
    """
    bank = F.normalize(bank.float(), dim=1)
    queries = F.normalize(queries.float(), dim=1)
    k = min(k, bank.shape[0])
    preds = []
    for start in range(0, queries.shape[0], chunk):
        sim = queries[start : start + chunk] @ bank.T  # (q, M)
        top_sim, top_idx = sim.topk(k, dim=1)  # (q, k)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(sim.shape[0], num_classes, dtype=weights.dtype)
        votes.scatter_add_(1, bank_labels[top_idx], weights)  # (q, C)
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)


def knn_top1(bank, bank_labels, queries, query_labels, *, k: int, temperature: float) -> float:
    """Top-1 accuracy of knn_predict: a float in [0, 1]."""
    num_classes = int(max(bank_labels.max(), query_labels.max())) + 1
    pred = knn_predict(bank, bank_labels, queries, k=k, temperature=temperature, num_classes=num_classes)
    return (pred == query_labels).float().mean().item()


def knn_eval(
    encoder: nn.Module,
    data_path: str,
    bank_split: str,
    query_split: str,
    transform: Callable,
    *,
    k: int,
    temperature: float,
    batch_size: int = 512,
    device: torch.device = torch.device("cpu"),
    progress: bool = False,
) -> float:
    """kNN top-1 of ``encoder``'s features: memory = bank_split, queries = query_split (progress: bars on stderr)."""
    feats = []
    for split in (bank_split, query_split):
        batches = data.eval_batches(data_path, split, transform, batch_size)
        if progress:
            total = data.read_manifest(data_path)["splits"][split]["num_samples"]
            with console.stage_bar(f"kNN: features of split {split}", total) as bar:
                feats.append(extract_features(encoder, console.counted(batches, bar), device))
        else:
            feats.append(extract_features(encoder, batches, device))
    (bank, bank_y), (query, query_y) = feats
    return knn_top1(bank, bank_y, query, query_y, k=k, temperature=temperature)


def raw_pixel_knn(data_path: str, bank_split: str, query_split: str, *, k: int, temperature: float) -> float:
    """The raw-pixel baseline: kNN top-1 on flattened images, computed like knn_eval."""
    bank, bank_y = data.raw_pixels(data_path, bank_split)
    query, query_y = data.raw_pixels(data_path, query_split)
    return knn_top1(bank, bank_y, query, query_y, k=k, temperature=temperature)


def encoder_from_checkpoint(path: str, overrides=()) -> tuple[nn.Module, "object", dict]:
    """(backbone with trained weights, its resolved config incl. overrides, the checkpoint state)."""
    from pipeline import checkpoint
    from pipeline import config as config_mod
    from pipeline.objectives import build_objective

    state = checkpoint.load(path)
    saved = config_mod.upgrade(state["config"])  # checkpoints from before the per-method loss union
    for override in overrides:
        config_mod.apply_override(saved, override)
    cfg = config_mod.from_dict(saved)
    objective = build_objective(cfg)
    objective.load_state_dict(state["model"])
    return objective.backbone, cfg, state


PROTOCOLS = ("knn", "linear", "all")


def evaluate_checkpoint(
    path: str, data_path: str, overrides=(), protocol: str = "knn", track: bool = False, progress: bool = False
) -> dict:
    """kNN and/or linear-probe top-1 of a checkpoint's backbone on ``data_path`` (settings: its eval section).

    With ``track``, the results go into the checkpoint's MLflow run (or a new run when it had none);
    ``progress``: a bar per stage on stderr.
    """
    from pipeline import augment
    from pipeline.probe import linear_probe

    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol={protocol!r}; expected one of {PROTOCOLS}")
    backbone, cfg, state = encoder_from_checkpoint(path, overrides)
    result = {
        "checkpoint": path,
        "step": state["step"],
        "bank_split": cfg.data.train_split,
        "query_split": cfg.data.eval_split,
    }
    if protocol in ("knn", "all"):
        result["knn_top1"] = knn_eval(
            backbone,
            data_path,
            cfg.data.train_split,
            cfg.data.eval_split,
            augment.eval_transform(cfg.augment, cfg.eval.eval_image_size),
            k=cfg.eval.knn_k,
            temperature=cfg.eval.knn_temperature,
            batch_size=cfg.eval.batch_size,
            progress=progress,
        )
        result |= {"k": cfg.eval.knn_k, "temperature": cfg.eval.knn_temperature}
    if protocol in ("linear", "all"):
        result |= linear_probe(
            backbone,
            data_path,
            cfg.data.train_split,
            cfg.data.eval_split,
            cfg.eval,
            cfg.augment,
            seed=cfg.train.seed,
            progress=progress,
        )
    if track and cfg.tracking.enabled:
        from pipeline.metric_names import grouped
        from pipeline.tracking import MlflowTracker

        tracker = MlflowTracker(cfg.tracking, state.get("mlflow_run_id"))
        metrics = {k: result[k] for k in ("knn_top1", "linear_top1") if k in result}
        tracker.log_metrics(
            grouped({("eval_knn_top1" if k == "knn_top1" else k): v for k, v in metrics.items()}), step=state["step"]
        )
        tracker.finish(status=tracker.previous_status or "FINISHED")  # evaluating does not reopen a run
        result["mlflow_run_id"] = tracker.run_id
    return result


def random_init_knn(cfg, data_path: str) -> float:
    """Baseline: the same network at random initialisation (seed from cfg), evaluated like a checkpoint."""
    from pipeline import augment
    from pipeline.objectives import build_objective

    torch.manual_seed(cfg.train.seed)
    backbone = build_objective(cfg).backbone
    return knn_eval(
        backbone,
        data_path,
        cfg.data.train_split,
        cfg.data.eval_split,
        augment.eval_transform(cfg.augment, cfg.eval.eval_image_size),
        k=cfg.eval.knn_k,
        temperature=cfg.eval.knn_temperature,
        batch_size=cfg.eval.batch_size,
    )
