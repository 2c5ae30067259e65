"""What happens at an epoch's end: kNN, plots, checkpoints (last, and best), the final model.

No test-set selection: the kNN monitor queries data.val_split (held out of train by `hardneg prep
--val-fraction`) and checkpoints/best is chosen on it, or by the lowest epoch-mean training loss with
train.best_by=loss (PSM's release). Without that split in the manifest there is no kNN monitor and, with
best_by=knn, no checkpoints/best: the test split is read only by the final evaluation (hardneg eval).

Every rank calls ``EpochReporter.epoch_end`` at the same steps, because the launcher's report is a
barrier; only rank 0 evaluates, plots and writes to the tracker.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Callable, Optional

import torch
import yaml

from pipeline import augment, checkpoint, config as config_mod, data, evaluate, plots
from pipeline.config import Config
from pipeline.dist import DistContext
from pipeline.tracking import redact


class EpochReporter:
    """Rank-0 evaluation and artifacts around the launcher's ``hooks.report``."""

    def __init__(self, cfg: Config, ctx: DistContext, tracker, hooks, objective, make_state: Callable[[int, int], dict]):
        self.cfg, self.ctx, self.tracker, self.hooks = cfg, ctx, tracker, hooks
        self.objective, self.make_state = objective, make_state
        self.best_knn: Optional[float] = None
        self.best_loss: Optional[float] = None
        self.knn_top1: Optional[float] = None
        splits = data.read_manifest(cfg.data.path)["splits"]
        self.monitor_split: Optional[str] = cfg.data.val_split if cfg.data.val_split in splits else None
        if self.monitor_split is None and ctx.is_main:
            print(f"[hardneg] no '{cfg.data.val_split}' split in {cfg.data.path}: no kNN monitor during training"
                  + (" and no checkpoints/best" if cfg.train.best_by == "knn" else "")
                  + " (hardneg prep --val-fraction holds one out of train)", flush=True)
        self.tmp = tempfile.mkdtemp(prefix="hardneg-report-")

    def start(self, new_run: bool, extra_params: dict) -> None:
        """Log params and the (redacted) resolved config once per run."""
        if new_run:
            from pipeline.tracking import run_context

            self.tracker.log_params(config_mod.flatten(self.cfg) | run_context() | extra_params)
            self.tracker.log_text(yaml.safe_dump(redact(config_mod.to_dict(self.cfg)), sort_keys=False), "config.yaml")

    def _knn_due(self, epoch: int, last: bool) -> bool:
        every = self.cfg.train.knn_every_epochs
        return self.monitor_split is not None and (last or bool(every and epoch % every == 0))

    def _features(self, split: str):
        transform = augment.eval_transform(self.cfg.augment, self.cfg.eval.eval_image_size)
        batches = data.eval_batches(self.cfg.data.path, split, transform, self.cfg.eval.batch_size)
        return evaluate.extract_features(self.objective.backbone, batches, self.ctx.device)

    def _evaluate(self, step: int, last: bool, batch) -> float:
        bank, bank_y = self._features(self.cfg.data.train_split)
        query, query_y = self._features(self.monitor_split)
        top1 = evaluate.knn_top1(bank, bank_y, query, query_y, k=self.cfg.eval.knn_k,
                                 temperature=self.cfg.eval.knn_temperature)
        self.tracker.log_metrics({"knn_top1": top1}, step=step)
        if self.cfg.tracking.plots:
            self._similarity_histogram(step, batch)
            if last:
                path = plots.embedding_png(query, query_y, os.path.join(self.tmp, "embedding.png"),
                                           f"{self.monitor_split} split, step {step}, kNN top-1 {top1:.3f}")
                self.tracker.log_artifact(path, "plots")
        return top1

    def _similarity_histogram(self, step: int, batch) -> None:
        sample = getattr(self.objective, "similarity_samples", None)
        if sample is None or batch is None:
            return
        x1, x2 = batch
        was_training = self.objective.training
        self.objective.eval()
        try:
            with torch.no_grad():
                samples = sample(x1.to(self.ctx.device), x2.to(self.ctx.device))
        finally:
            self.objective.train(was_training)
        path = plots.similarity_histogram_png(samples, os.path.join(self.tmp, f"similarities_step{step:08d}.png"),
                                              f"{self.cfg.loss.name}, step {step}")
        self.tracker.log_artifact(path, "plots/similarities")

    def epoch_end(self, step: int, epoch: int, last: bool, metrics: dict, batch=None) -> None:
        """Evaluate and checkpoint as configured; every rank reports (rank 0 attaches the checkpoint)."""
        improved = False
        if self.ctx.is_main and self._knn_due(epoch, last):
            self.knn_top1 = self._evaluate(step, last, batch)
            metrics = metrics | {"knn_top1": self.knn_top1}
            if self.cfg.train.best_by == "knn":
                improved = self.best_knn is None or self.knn_top1 > self.best_knn
                self.best_knn = self.knn_top1 if improved else self.best_knn
        if self.ctx.is_main and self.cfg.train.best_by == "loss" and metrics.get("epoch_loss") is not None:
            improved = self.best_loss is None or metrics["epoch_loss"] <= self.best_loss  # <=: as PSM's train.py
            self.best_loss = metrics["epoch_loss"] if improved else self.best_loss
        save = last or epoch % self.cfg.train.checkpoint_every_epochs == 0
        if not (self.ctx.is_main and (save or improved)):
            self.hooks.report(metrics, None)
            return
        directory = checkpoint.write(self.make_state(step, epoch), os.path.join(self.tmp, "checkpoint"))
        try:
            if improved:
                self.tracker.log_artifacts(directory, "checkpoints/best")
            if save:
                self.tracker.log_artifacts(directory, "checkpoints/last")
            self.hooks.report(metrics | {"mlflow_run_id": self.tracker.run_id}, directory if save else None)
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    def finish(self) -> None:
        """Curves, the MLflow model of the encoder, then close the run."""
        try:
            if self.ctx.is_main and self.cfg.tracking.plots:
                histories = {k: self.tracker.history(k) for k in ("loss", "knn_top1", "lr")}
                if any(histories.values()):
                    path = plots.curves_png(histories, os.path.join(self.tmp, "curves.png"), self.cfg.loss.name)
                    self.tracker.log_artifact(path, "plots")
            if self.ctx.is_main and self.cfg.tracking.log_model:
                size = self.cfg.augment.image_size
                self.tracker.log_model(self.objective.backbone.cpu() if self.ctx.device.type != "cpu"
                                       else self.objective.backbone, "encoder", torch.zeros(1, 3, size, size))
            self.tracker.finish()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)
