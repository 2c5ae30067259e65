"""What happens at an epoch's end: kNN, plots, checkpoints (last, and best), the final model.

No test-set selection: the kNN monitor queries data.val_split (held out of train by `hardneg prep
--val-fraction`) and checkpoints/best is chosen on it, or by the lowest epoch-mean training loss with
train.best_by=loss (PSM's release). Without that split in the manifest there is no kNN monitor and, with
best_by=knn, no checkpoints/best: the test split is read only by the final evaluation (hardneg eval).

Every rank calls ``EpochReporter.epoch_end`` at the same steps, because the launcher's report is a
barrier; only rank 0 evaluates, plots and writes to the tracker.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from typing import Callable, Optional

import torch
import yaml

from data_prep.atomic import write_json_atomic
from data_prep.manifest import read_manifest
from pipeline import augment, checkpoint, console, data, evaluate, plots, run_info
from pipeline import config as config_mod
from pipeline.config import Config
from pipeline.dist import DistContext
from pipeline.metric_names import LEGACY, grouped, name_of
from pipeline.redaction import redact


class EpochReporter:
    """Rank-0 evaluation and artifacts around the launcher's ``hooks.report``."""

    def __init__(
        self, cfg: Config, ctx: DistContext, tracker, hooks, objective, make_state: Callable[[int, int], dict]
    ):
        self.cfg, self.ctx, self.tracker, self.hooks = cfg, ctx, tracker, hooks
        self.objective, self.make_state = objective, make_state
        # the internal metric key that chooses checkpoints/best with train.best_by=knn (higher is better);
        # train.best_by=loss chooses by the lowest epoch-mean training loss instead (best_loss)
        self.best_by = "knn_top1"
        self.best_knn: Optional[float] = None
        self.best_loss: Optional[float] = None
        self.best_step: Optional[int] = None
        self.best_encoder: Optional[dict] = None  # CPU copy of the best backbone's weights, for the "best" model
        self.knn_top1: Optional[float] = None
        self.last_step, self.epoch = 0, 0
        splits = data.read_manifest(cfg.data.path)["splits"]
        self.monitor_split: Optional[str] = cfg.data.val_split if cfg.data.val_split in splits else None
        if self.monitor_split is None and ctx.is_main:
            console.say(
                f"[hardneg] no '{cfg.data.val_split}' split in {cfg.data.path}: no kNN monitor during training"
                + (" and no checkpoints/best" if cfg.train.best_by == "knn" else "")
                + " (hardneg prep --val-fraction holds one out of train)"
            )
        self.tmp = tempfile.mkdtemp(prefix="hardneg-report-")

    def start(self, new_run: bool, extra_params: dict) -> None:
        """Log params, tags, the run's description, the dataset and the (redacted) resolved config once per run;
        a resumed run picks up its best-so-far value instead."""
        if not new_run:
            self._restore_best()
            return
        if not self.ctx.is_main:
            return
        world_size = extra_params.get("world_size", self.ctx.world_size)
        self.tracker.log_params(run_info.run_params(self.cfg) | run_info.run_context() | extra_params)
        self.tracker.log_text(yaml.safe_dump(redact(config_mod.to_dict(self.cfg)), sort_keys=False), "config.yaml")
        manifest = read_manifest(self.cfg.data.path)
        self.tracker.describe(
            run_info.run_tags(self.cfg, manifest, world_size), run_info.run_note(self.cfg, manifest, world_size)
        )
        self.tracker.log_dataset(run_info.dataset_input(self.cfg, manifest))

    def _restore_best(self) -> None:
        """Best-so-far value and step of a resumed run, from its metric history (grouped or older name)."""
        name = name_of(self.best_by)
        history = self.tracker.history(name) or self.tracker.history(LEGACY.get(name, name))
        if history:
            self.best_step, self.best_knn = max(history, key=lambda sv: (sv[1], -sv[0]))

    def knn_due(self, epoch: int, last: bool) -> bool:
        every = self.cfg.train.knn_every_epochs
        return self.monitor_split is not None and (last or bool(every and epoch % every == 0))

    def _features(self, split: str):
        transform = augment.eval_transform(self.cfg.augment, self.cfg.eval.eval_image_size)
        batches = data.eval_batches(self.cfg.data.path, split, transform, self.cfg.eval.batch_size)
        return evaluate.extract_features(self.objective.backbone, batches, self.ctx.device)

    def _evaluate(self, step: int, last: bool, batch) -> float:
        bank, bank_y = self._features(self.cfg.data.train_split)
        query, query_y = self._features(self.monitor_split)
        top1 = evaluate.knn_top1(
            bank, bank_y, query, query_y, k=self.cfg.eval.knn_k, temperature=self.cfg.eval.knn_temperature
        )
        self.tracker.log_metrics(grouped({"knn_top1": top1}), step=step)
        if self.cfg.tracking.plots:
            self._similarity_histogram(step, batch)
            if last:
                dataset = read_manifest(self.cfg.data.path).get("dataset") or self.cfg.data.path
                path = plots.embedding_png(
                    query,
                    query_y,
                    os.path.join(self.tmp, "embedding.png"),
                    f"{dataset}, {self.monitor_split} split, step {step}, kNN top-1 {top1:.3f}",
                )
                self.tracker.log_artifact(path, "plots")
        return top1

    def _similarity_histogram(self, step: int, batch) -> None:
        sample = getattr(self.objective, "similarity_samples", None)
        if sample is None or batch is None:
            return
        x1, x2, *rest = batch
        labels = rest[0].to(self.ctx.device) if rest and rest[0] is not None else None
        was_training = self.objective.training
        self.objective.eval()
        try:
            with torch.no_grad():
                samples = sample(x1.to(self.ctx.device), x2.to(self.ctx.device), labels)
        finally:
            self.objective.train(was_training)
        path = plots.similarity_histogram_png(
            samples,
            os.path.join(self.tmp, f"similarities_step{step:08d}.png"),
            f"{self.cfg.loss.label()}: cosine similarities of one training batch, epoch {self.epoch}, step {step}",
        )
        self.tracker.log_artifact(path, "plots/similarities")

    def epoch_end(self, step: int, epoch: int, last: bool, metrics: dict, batch=None, save_due: bool = False) -> bool:
        """Evaluate and checkpoint as configured (save_due: a step or time checkpoint falls on this epoch end);
        every rank reports (rank 0 attaches the checkpoint). Returns whether this epoch end is a checkpoint
        (the same answer on every rank)."""
        improved = False
        self.last_step, self.epoch = step, epoch
        if self.ctx.is_main and self.knn_due(epoch, last):
            self.knn_top1 = self._evaluate(step, last, batch)
            metrics = metrics | {"knn_top1": self.knn_top1}
            if self.cfg.train.best_by == "knn":
                improved = self._note_best(metrics.get(self.best_by), step)
        if self.ctx.is_main and self.cfg.train.best_by == "loss" and metrics.get("epoch_loss") is not None:
            improved = self.best_loss is None or metrics["epoch_loss"] <= self.best_loss  # <=: as PSM's train.py
            if improved:
                self.best_loss, self.best_step = metrics["epoch_loss"], step
                self._keep_best_encoder()
        save = save_due or last or epoch % self.cfg.train.checkpoint_every_epochs == 0
        if not (self.ctx.is_main and (save or improved)):
            self.hooks.report(metrics, None)
            return save
        directory = checkpoint.write(self.make_state(step, epoch), os.path.join(self.tmp, "checkpoint"))
        try:
            if improved:
                self._mark_best(directory)
                self.tracker.log_artifacts(directory, "checkpoints/best")
            if save:
                self.tracker.log_artifacts(directory, "checkpoints/last")
            self.hooks.report(metrics | {"mlflow_run_id": self.tracker.run_id}, directory if save else None)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        return save

    def checkpoint(self, step: int, epoch: int, metrics: dict) -> None:
        """A checkpoint between epoch ends (by steps, minutes or a stop request): every rank reports."""
        if not self.ctx.is_main:
            self.hooks.report(metrics, None)
            return
        directory = checkpoint.write(self.make_state(step, epoch), os.path.join(self.tmp, "checkpoint"))
        try:
            self.hooks.report(metrics | {"mlflow_run_id": self.tracker.run_id}, directory)
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    def discard(self) -> None:
        """Remove the temporary files of a run that ends early."""
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _note_best(self, value: Optional[float], step: int) -> bool:
        """Log the best-so-far value of ``best_by``; True when ``value`` beats it (then keep the encoder's weights)."""
        if value is None:
            return False
        improved = self.best_knn is None or value > self.best_knn
        if improved:
            self.best_knn, self.best_step = value, step
            self._keep_best_encoder()
        self.tracker.log_metrics(grouped({f"{self.best_by}_best": self.best_knn}), step=step)
        return improved

    def _keep_best_encoder(self) -> None:
        """A CPU copy of the backbone's weights, logged as the "best" model at the end when it is not the last."""
        if self.cfg.tracking.log_model:
            weights = self.objective.backbone.state_dict()
            self.best_encoder = {k: v.detach().cpu().clone() for k, v in weights.items()}

    def _best_record(self) -> dict:
        """Which metric chose checkpoints/best, its value, direction and split."""
        if self.cfg.train.best_by == "loss":
            return {"metric": "epoch-mean " + name_of("loss"), "value": self.best_loss, "mode": "min", "split": "train"}
        return {"metric": name_of(self.best_by), "value": self.best_knn, "mode": "max", "split": self.monitor_split}

    def _mark_best(self, directory: str) -> None:
        """Record in the checkpoint's meta.json which metric chose it and its value (temp file, then rename)."""
        path = os.path.join(directory, checkpoint.META_FILE)
        with open(path) as f:
            meta = json.load(f)
        meta["best_by"] = self._best_record()
        write_json_atomic(path, meta)

    def _model_description(self, which: str, step: int) -> str:
        record = self._best_record()
        best = (
            f"{record['metric']} = {record['value']:.4f} at step {self.best_step}"
            if record["value"] is not None
            else "no kNN evaluated"
        )
        return (
            f"Backbone (encoder without projection head) of run {self.cfg.tracking.run_name} "
            f"(MLflow run {self.tracker.run_id}): {self.cfg.loss.label()} on "
            f"{read_manifest(self.cfg.data.path).get('dataset') or self.cfg.data.path}, "
            f"{which} weights, from step {step}. Best: {best}. Input: (N, 3, {self.cfg.augment.image_size}, "
            f"{self.cfg.augment.image_size}) float images as the eval transform makes them."
        )

    def _knn_at(self, step: Optional[int]) -> Optional[float]:
        """The kNN top-1 the monitor logged at ``step``, or None (no monitor split, or not evaluated then)."""
        name = name_of("knn_top1")
        history = self.tracker.history(name) or self.tracker.history(LEGACY.get(name, name))
        return next((value for s, value in reversed(history) if s == step), None)

    def _log_models(self) -> None:
        """The last encoder (alias "last"; MLflow reserves "latest") and, where it is not the last, the best one
        (alias "last-run-best"); a resumed run whose best epoch came before the restart has only the last. Each
        carries its kNN top-1, and the registry's "best" alias follows the highest across all versions."""
        size = self.cfg.augment.image_size
        example = torch.zeros(2, 3, size, size)  # a batch of 2: torch.export keeps the batch dimension dynamic
        backbone = self.objective.backbone
        backbone = backbone.cpu() if self.ctx.device.type != "cpu" else backbone  # training is over
        links = [name_of(self.best_by), name_of(f"{self.best_by}_best")]
        best_is_last = self.best_step is None or self.best_step == self.last_step
        tags = run_info.source_tags()
        self.tracker.log_model(
            backbone,
            "encoder",
            example,
            step=self.last_step,
            link_metrics=links,
            description=self._model_description("last" + (" (= best)" if best_is_last else ""), self.last_step),
            aliases=("last", "last-run-best") if best_is_last else ("last",),
            tags=tags,
            knn_top1=self._knn_at(self.last_step),
        )
        if not best_is_last and self.best_encoder is not None:
            best = copy.deepcopy(backbone).cpu()
            best.load_state_dict(self.best_encoder)
            self.tracker.log_model(
                best,
                "encoder-best",
                example,
                step=self.best_step,
                link_metrics=links,
                description=self._model_description("best", self.best_step),
                aliases=("last-run-best",),
                tags=tags,
                knn_top1=self._knn_at(self.best_step),
            )

    def finish(self) -> None:
        """The MLflow models of the encoder (last, best), then close the run."""
        try:
            if self.ctx.is_main and self.cfg.tracking.log_model:
                self._log_models()
            self.tracker.finish()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)
