"""The step loop: ``run(cfg, ctx, hooks)`` runs unchanged in one process or inside a Ray Train worker.

The launcher supplies ``ctx`` (rank, world, device; see dist.py) and ``hooks`` (where checkpoints
come from and go to). Everything here is the same on every rank except that rank 0 tracks and
evaluates; every rank reports at the same steps, because Ray Train's ``report`` is a barrier.
"""
from __future__ import annotations

import math
import os
import time
from typing import Optional, Protocol

import torch

from data_prep.manifest import read_manifest
from pipeline import augment, checkpoint, config as config_mod, data, dist
from pipeline.config import Config, OptimConfig
from pipeline.errors import HardnegError
from pipeline.metric_names import grouped
from pipeline.objectives import build_objective
from pipeline.reporting import EpochReporter
from pipeline.tracking import make_tracker, redact

# Keys that may change between a run and its resumption: length, launcher, bookkeeping.
RESUMABLE_CHANGES = ("train.epochs", "train.log_every_steps", "train.knn_every_epochs",
                     "train.checkpoint_every_epochs", "train.threads_per_worker", "train.compile",
                     "train.channels_last", "augment.where", "data.path", "data.loader_workers",
                     "data.format", "data.cache_dir",
                     "cluster.", "tracking.", "eval.")


class Hooks(Protocol):
    """What a launcher provides: the checkpoint to resume from, and where reports go."""

    def restore(self) -> Optional[dict]: ...
    def report(self, metrics: dict, checkpoint_dir: Optional[str]) -> None: ...


class LocalHooks:
    """Plain-process launcher: checkpoints live in ``run_dir`` (local path)."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir

    def restore(self) -> Optional[dict]:
        found = checkpoint.latest(self.run_dir)
        return checkpoint.load(found) if found else None

    def report(self, metrics: dict, checkpoint_dir: Optional[str]) -> None:
        if checkpoint_dir is not None:
            checkpoint.publish(checkpoint_dir, os.path.join(self.run_dir, f"checkpoint_{metrics['step']:08d}"))


def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Linear warm-up then cosine decay to base_lr*min_ratio: a pure function of the step."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def build_optimizer(cfg: OptimConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """SGD (momentum) / Adam / AdamW over all parameters, as the config names."""
    params = model.parameters()
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _single(transform):
    """Loader mapping for augment.where=device: one uint8 tensor per image (views are made on device)."""
    return lambda image: (transform(image),)


def resume_mismatches(saved: dict, cfg: Config) -> list[str]:
    """Keys whose values differ between a checkpoint's config and ``cfg``, other than RESUMABLE_CHANGES.

    Checkpoints hold the redacted config, so ``cfg`` is compared redacted too.
    """
    now = config_mod.flatten(config_mod.from_dict(redact(config_mod.to_dict(cfg))))
    then = config_mod.flatten(config_mod.from_dict(saved))
    return [
        f"{k}: {then[k]!r} -> {now[k]!r}"
        for k in now
        if now[k] != then[k] and not k.startswith(RESUMABLE_CHANGES)
    ]


def _state(objective, optimizer, step: int, epoch: int, cfg: Config, run_id: Optional[str]) -> dict:
    return {
        "model": objective.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "epoch": epoch,
        "mlflow_run_id": run_id,
        # redacted: checkpoints travel as MLflow artifacts; credentials belong in the environment, not here
        "config": redact(config_mod.to_dict(cfg)),
        "rng": {"torch": torch.get_rng_state()},
    }


def run(cfg: Config, ctx: dist.DistContext, hooks: Hooks) -> dict:
    """Train per ``cfg`` on this rank; returns {"step", "epoch", "knn_top1", "mlflow_run_id"}."""
    torch.set_num_threads(cfg.train.threads_per_worker)
    manifest = read_manifest(cfg.data.path)
    spe = data.steps_per_epoch(manifest, cfg.data.pretrain, cfg.train.global_batch_size)
    total_steps = spe * cfg.train.epochs
    warmup_steps = int(cfg.optim.warmup_epochs * spe)

    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    generator = torch.Generator()  # same seed on every rank: SSCL's synthetic draws must agree
    objective = build_objective(cfg, dist.make_gather(ctx), generator).to(ctx.device)
    optimizer = build_optimizer(cfg.optim, objective)
    state = hooks.restore()
    start_step, run_id = 0, cfg.tracking.run_id
    if state is not None:
        mismatches = resume_mismatches(state["config"], cfg)
        if mismatches:
            raise HardnegError("cannot resume: the config differs from the checkpoint's: " + "; ".join(mismatches))
        objective.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_step, run_id = state["step"], state["mlflow_run_id"] or run_id
    tracker = make_tracker(cfg.tracking, ctx.is_main, run_id)
    reporter = EpochReporter(cfg, ctx, tracker, hooks, objective,
                             lambda step, epoch: _state(objective, optimizer, step, epoch, cfg, tracker.run_id))
    reporter.start(new_run=state is None, extra_params={"world_size": ctx.world_size, "steps_per_epoch": spe})

    # Per-rank augmentation streams, re-derived from (seed, rank, step) so a resumed run is reproducible.
    torch.manual_seed(cfg.train.seed * 100_003 + ctx.rank * 7_919 + start_step)
    generator.manual_seed(cfg.train.seed + start_step)
    net = dist.wrap_ddp(objective, ctx)
    if cfg.augment.where == "device":
        device_views = augment.DeviceTwoViews(cfg.augment).to(ctx.device)
        two_views = _single(augment.to_uint8_tensor(cfg.augment.image_size))
    else:
        device_views, two_views = None, augment.TwoViews(augment.view_transform(cfg.augment))
    if cfg.train.channels_last:
        objective.to(memory_format=torch.channels_last)
    if cfg.train.compile:
        objective.backbone.compile()  # in place: state_dict keys stay those of the plain module
    autocast = torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16")
    if cfg.data.format == "ffcv":  # FFCV makes the two views itself (crop/flip in its pipeline)
        device_views = None
        batches = data.ffcv_train_batches(
            cfg.data.path, cfg.data.pretrain[0], cfg.augment, cfg.per_worker_batch_size,  # one split: validated
            rank=ctx.rank, world_size=ctx.world_size, seed=cfg.train.seed * 1_000_003 + start_step,
            loader_workers=cfg.data.loader_workers, cache_dir=cfg.data.cache_dir, device=ctx.device)
    elif cfg.augment.where == "batch":  # both views made per batch in the loader workers
        batches = data.batched_train_batches(
            cfg.data.path, cfg.data.pretrain, cfg.augment, cfg.per_worker_batch_size,
            rank=ctx.rank, seed=cfg.train.seed * 1_000_003 + start_step,
            shuffle_buffer=cfg.data.shuffle_buffer, loader_workers=cfg.data.loader_workers,
        )
    else:
        batches = data.train_batches(
            cfg.data.path, cfg.data.pretrain, two_views, cfg.per_worker_batch_size,
            rank=ctx.rank, seed=cfg.train.seed * 1_000_003 + start_step,
            shuffle_buffer=cfg.data.shuffle_buffer, loader_workers=cfg.data.loader_workers,
        )
    loss_sum, loss_count, wait, tick, tick_step = 0.0, 0, 0.0, time.perf_counter(), start_step
    epoch_loss_sum, epoch_loss_count = 0.0, 0  # the epoch-mean loss (train.best_by=loss)
    for step in range(start_step, total_steps):
        lr = lr_at(step, cfg.scaled_lr, warmup_steps, total_steps, cfg.optim.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        done = step + 1
        epoch_end = done % spe == 0
        log_now = done % cfg.train.log_every_steps == 0 or epoch_end
        fetch = time.perf_counter()
        *images, labels = next(batches)
        wait += time.perf_counter() - fetch
        images = [x.to(ctx.device, non_blocking=True) for x in images]
        x1, x2 = device_views(images[0]) if device_views is not None else images
        if cfg.train.channels_last:
            x1, x2 = (x.contiguous(memory_format=torch.channels_last) for x in (x1, x2))
        with autocast:  # the objectives compute their losses in float32 whatever the network ran in
            loss, stats = net(x1, x2, labels.to(ctx.device), with_stats=log_now)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        objective.after_step()
        loss_sum, loss_count = loss_sum + loss.detach(), loss_count + 1
        epoch_loss_sum, epoch_loss_count = epoch_loss_sum + loss.detach(), epoch_loss_count + 1

        if log_now:
            # one collective for the loss and every diagnostic the objective reported
            names = sorted(stats)
            values = torch.stack([loss_sum / loss_count] + [stats[k].detach().float() for k in names])
            values = dist.all_reduce_mean(values).tolist()
            mean_loss = values[0]
            elapsed = max(time.perf_counter() - tick, 1e-9)
            tracker.log_metrics(grouped({"loss": mean_loss, "lr": lr, "data_wait_share": wait / elapsed,
                                         "images_per_s": (done - tick_step) * cfg.train.global_batch_size / elapsed}
                                        | dict(zip(names, values[1:]))), step=done)
            loss_sum, loss_count, wait, tick, tick_step = 0.0, 0, 0.0, time.perf_counter(), done
        if not epoch_end:
            continue
        epoch = done // spe
        last = done == total_steps
        epoch_loss = dist.all_reduce_mean(torch.as_tensor(epoch_loss_sum / epoch_loss_count).reshape(1).float()).item()
        epoch_loss_sum, epoch_loss_count = 0.0, 0
        reporter.epoch_end(done, epoch, last, {"step": done, "epoch": epoch, "loss": mean_loss,
                                               "epoch_loss": epoch_loss}, batch=(x1, x2, labels))
        if ctx.is_main:
            knn_text = f" knn_top1 {reporter.knn_top1:.4f}" if reporter._knn_due(epoch, last) else ""
            print(f"epoch {epoch}/{cfg.train.epochs} step {done}/{total_steps} loss {mean_loss:.4f}{knn_text}",
                  flush=True)
    reporter.finish()
    return {"step": total_steps, "epoch": cfg.train.epochs, "knn_top1": reporter.knn_top1,
            "mlflow_run_id": tracker.run_id}
