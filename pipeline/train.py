"""The step loop: ``run(cfg, ctx, hooks)`` runs unchanged in one process or inside a Ray Train worker.

The launcher supplies ``ctx`` (rank, world, device; see dist.py) and ``hooks`` (where checkpoints
come from and go to). Everything here is the same on every rank except that rank 0 tracks and
evaluates; every rank reports at the same steps, because Ray Train's ``report`` is a barrier.
"""

from __future__ import annotations

import math
import os
import time
from functools import partial
from typing import Optional, Protocol

import torch

from data_prep.manifest import read_manifest
from pipeline import augment, checkpoint, console, data, dist, faults, outbox
from pipeline import config as config_mod
from pipeline.config import Config, OptimConfig
from pipeline.errors import HardnegError
from pipeline.metric_names import grouped
from pipeline.objectives import build_objective
from pipeline.reporting import EpochReporter
from pipeline.tracking import make_tracker, redact

# Keys that may change between a run and its resumption: length, launcher, bookkeeping.
RESUMABLE_CHANGES = (
    "train.epochs",
    "train.max_steps",
    "train.log_every_steps",
    "train.knn_every_epochs",
    "train.checkpoint_every_epochs",
    "train.checkpoint_every_steps",
    "train.checkpoint_every_minutes",
    "train.on_nonfinite",
    "train.max_nonfinite_steps",
    "data.max_skip_fraction",
    "train.threads_per_worker",
    "train.compile",
    "train.channels_last",
    "augment.where",
    "data.path",
    "data.loader_workers",
    "data.format",
    "data.cache_dir",
    "cluster.",
    "tracking.",
    "eval.",
)


class Hooks(Protocol):
    """What a launcher provides: the checkpoint to resume from, and where reports go."""

    def restore(self) -> Optional[dict]: ...
    def report(self, metrics: dict, checkpoint_dir: Optional[str]) -> None: ...


class LocalHooks:
    """Plain-process launcher: checkpoints live in ``run_dir`` (local path)."""

    def __init__(self, run_dir: str, keep: Optional[int] = None):
        self.run_dir, self.keep = run_dir, keep  # keep: the newest checkpoints that stay (None: all)

    def restore(self) -> Optional[dict]:
        found = checkpoint.latest(self.run_dir)
        return checkpoint.load(found) if found else None

    def report(self, metrics: dict, checkpoint_dir: Optional[str]) -> None:
        if checkpoint_dir is not None:
            checkpoint.publish(checkpoint_dir, os.path.join(self.run_dir, checkpoint.dir_name(metrics["step"])))
            if self.keep is not None:
                checkpoint.prune(self.run_dir, self.keep)


def planned_steps(cfg: Config, spe: int) -> int:
    """The run's length in steps: train.epochs of ``spe`` steps, cut to train.max_steps when that is shorter
    (the learning-rate schedule follows the shorter run)."""
    total = spe * cfg.train.epochs
    return min(total, cfg.train.max_steps) if cfg.train.max_steps is not None else total


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
    then = config_mod.flatten(config_mod.from_dict(config_mod.upgrade(saved)))  # upgrade: pre-union checkpoints
    return [
        f"{k}: {then.get(k)!r} -> {now[k]!r}"
        for k in now
        if now[k] != then.get(k) and not k.startswith(RESUMABLE_CHANGES)
    ]


def _state(
    objective, optimizer, step: int, epoch: int, cfg: Config, run_id: Optional[str], counters: Optional[dict] = None
) -> dict:
    state = {
        "model": objective.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "epoch": epoch,
        "mlflow_run_id": run_id,
        # redacted: checkpoints travel as MLflow artifacts; credentials belong in the environment, not here
        "config": redact(config_mod.to_dict(cfg)),
        # torch's stream is re-seeded from (seed, rank, step) at each step (see _seed_step); numpy's and Python's
        # are restored on resume, so code that draws from them continues as it would have
        "rng": checkpoint.rng_state(),
        "counters": dict(counters or {}),  # all ranks: data_skipped, data_read, nonfinite_steps up to ``step``
    }
    state["config"]["config_format"] = config_mod.CONFIG_FORMAT  # what its names meant when written: config.upgrade
    return state


def _run_dir(cfg: Config) -> str:
    return f"{cfg.cluster.storage_path.rstrip('/')}/{cfg.tracking.run_name}"


def _spool_dir(cfg: Config) -> str:
    """Where tracking records the server could not take are kept: the run directory when it is local."""
    run_dir = _run_dir(cfg)
    if "://" in run_dir:  # object storage: a local directory, named after the run
        run_dir = os.path.join(
            os.environ.get("HARDNEG_CACHE_DIR") or os.path.expanduser("~/.cache/hardneg"),
            "runs",
            str(cfg.tracking.run_name),
        )
    return os.path.join(run_dir, outbox.SPOOL_DIR)


def _seed_step(cfg: Config, rank: int, step: int, generator: torch.Generator) -> None:
    """Every RNG stream of a step is a function of (seed, rank, step), so a resume at any step is exact."""
    torch.manual_seed(data.hash_seed(cfg.train.seed, rank, step))  # also seeds every CUDA device
    generator.manual_seed(data.hash_seed(cfg.train.seed, step))  # the same on every rank: SSCL's shared draws


def run(cfg: Config, ctx: dist.DistContext, hooks: Hooks) -> dict:
    """Train per ``cfg`` on this rank; returns {"step", "epoch", "knn_top1", "mlflow_run_id"}."""
    torch.set_num_threads(cfg.train.threads_per_worker)
    manifest = read_manifest(cfg.data.path)
    spe = data.steps_per_epoch(manifest, cfg.data.pretrain, cfg.train.global_batch_size)
    total_steps = planned_steps(cfg, spe)
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
        checkpoint.restore_rng(state.get("rng", {}))
        start_step, run_id = state["step"], state["mlflow_run_id"] or run_id
    base = {"data_skipped": 0.0, "data_read": 0.0, "nonfinite_steps": 0, "train_seconds": 0.0}
    base |= (state or {}).get("counters", {})  # train_seconds: this run's time in the step loop, over its attempts
    counters = dict(base)
    tracker = make_tracker(cfg.tracking, ctx.is_main, run_id, spool_dir=_spool_dir(cfg))
    reporter = EpochReporter(
        cfg,
        ctx,
        tracker,
        hooks,
        objective,
        lambda step, epoch: _state(objective, optimizer, step, epoch, cfg, tracker.run_id, counters),
    )
    try:
        with faults.StopRequest(_run_dir(cfg)) as stop:
            return _loop(
                cfg,
                ctx,
                hooks,
                objective,
                optimizer,
                generator,
                tracker,
                reporter,
                stop,
                start_step,
                spe,
                total_steps,
                warmup_steps,
                state,
                base,
                counters,
            )
    except faults.Stopped as stopped:  # checkpointed: the run ends KILLED, resumable from here
        reporter.discard()
        tracker.finish("KILLED")
        return {
            "step": stopped.step,
            "epoch": stopped.step // spe,
            "knn_top1": reporter.knn_top1,
            "mlflow_run_id": tracker.run_id,
            "stopped": True,
        }
    except BaseException as e:  # close the run (sending what is queued) before the launcher reports it
        reporter.discard()
        if isinstance(e, HardnegError):
            tracker.set_tags({"failure_reason": str(e)})
        tracker.finish("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise


def _batches(cfg: Config, ctx: dist.DistContext, start_step: int, spe: int, ledger: data.SkipLedger):
    """(endless batches from ``start_step`` on, the on-device view maker or None) for this rank."""
    if cfg.data.format == "ffcv":  # FFCV makes the two views itself (crop/flip in its pipeline)
        return data.ffcv_train_batches(
            cfg.data.path,
            cfg.data.pretrain[0],
            cfg.augment,
            cfg.train.global_batch_size // ctx.world_size,  # one split: validated
            rank=ctx.rank,
            world_size=ctx.world_size,
            seed=cfg.train.seed * 1_000_003 + start_step,
            loader_workers=cfg.data.loader_workers,
            cache_dir=cfg.data.cache_dir,
            device=ctx.device,
            ledger=ledger,
        ), None
    if cfg.augment.where == "batch":  # both views made per batch in the loader workers, seekable by step
        return data.batched_train_batches(
            cfg.data.path,
            cfg.data.pretrain,
            cfg.augment,
            cfg.train.global_batch_size // ctx.world_size,
            rank=ctx.rank,
            seed=cfg.train.seed,
            shuffle_buffer=cfg.data.shuffle_buffer,
            loader_workers=cfg.data.loader_workers,
            start_step=start_step,
            steps_per_epoch=spe,
            ledger=ledger,
        ), None
    if cfg.augment.where == "device":
        device_views = augment.DeviceTwoViews(cfg.augment).to(ctx.device)
        two_views = _single(augment.to_uint8_tensor(cfg.augment.image_size))
    else:
        device_views, two_views = None, augment.TwoViews(augment.view_transform(cfg.augment))
    return data.train_batches(
        cfg.data.path,
        cfg.data.pretrain,
        two_views,
        cfg.train.global_batch_size // ctx.world_size,
        rank=ctx.rank,
        seed=cfg.train.seed,
        shuffle_buffer=cfg.data.shuffle_buffer,
        loader_workers=cfg.data.loader_workers,
        start_step=start_step,
        steps_per_epoch=spe,
        ledger=ledger,
    ), device_views


def _loop(
    cfg,
    ctx,
    hooks,
    objective,
    optimizer,
    generator,
    tracker,
    reporter,
    stop,
    start_step,
    spe,
    total_steps,
    warmup_steps,
    state,
    base,
    counters,
) -> dict:
    reporter.start(new_run=state is None, extra_params={"world_size": ctx.world_size, "steps_per_epoch": spe})
    run_dir = _run_dir(cfg)
    saved_step = start_step if state is not None else None
    net = dist.wrap_ddp(objective, ctx)
    if cfg.train.channels_last:
        objective.to(memory_format=torch.channels_last)
    if cfg.train.compile:
        objective.backbone.compile()  # in place: state_dict keys stay those of the plain module
    autocast = torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16")
    ledger = data.SkipLedger(announce=True)
    batches, device_views = _batches(cfg, ctx, start_step, spe, ledger)
    guard = faults.NonfiniteGuard(
        cfg.train.on_nonfinite,
        cfg.train.max_nonfinite_steps,
        objective,
        ctx.device,
        start_step,
        count=base["nonfinite_steps"],
    )
    lr_of = partial(
        lr_at,
        base_lr=cfg.scaled_lr,
        warmup_steps=warmup_steps,
        total_steps=total_steps,
        min_ratio=cfg.optim.min_lr_ratio,
    )
    every_steps, every_s = cfg.train.checkpoint_every_steps, cfg.train.checkpoint_every_minutes * 60
    saved_at = time.monotonic()
    loss_sum, loss_count, wait, tick, tick_step = 0.0, 0, 0.0, time.perf_counter(), start_step
    mean_loss, stop_now, time_due = float("nan"), False, 0.0
    epoch_loss_sum, epoch_loss_count = 0.0, 0  # the epoch-mean loss (train.best_by=loss)
    progress = console.Progress(total_steps, start_step, cfg.train.global_batch_size, enabled=ctx.is_main)
    for step in range(start_step, total_steps):
        if stop.requested and ctx.world_size == 1:  # several ranks agree on a stop at a log step (below)
            _stop(reporter, guard, lr_of, step, spe, run_dir, saved_step)
        _seed_step(cfg, ctx.rank, step, generator)
        lr = lr_of(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        done = step + 1
        epoch_end = done % spe == 0 or done == total_steps  # train.max_steps may end the run mid-epoch
        step_due = bool(every_steps) and done % every_steps == 0
        step_save = step_due and not epoch_end  # on an epoch end, the epoch's checkpoint serves (below)
        log_now = done % cfg.train.log_every_steps == 0 or epoch_end or step_save
        fetch = time.perf_counter()
        *images, labels = next(batches)
        wait += time.perf_counter() - fetch
        images = [x.to(ctx.device, non_blocking=True) for x in images]
        x1, x2 = device_views(images[0]) if device_views is not None else images
        if cfg.train.channels_last:
            x1, x2 = (x.contiguous(memory_format=torch.channels_last) for x in (x1, x2))
        guard.before_step()
        with autocast:  # the objectives compute their losses in float32 whatever the network ran in
            loss, stats = net(x1, x2, labels.to(ctx.device), with_stats=log_now)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        ok = guard.finite(loss)
        if guard.apply_update(ok, lr, done, faults.describe_checkpoint(saved_step, run_dir)):
            optimizer.step()
            objective.after_step()
            loss_sum, loss_count = loss_sum + loss.detach(), loss_count + 1
            epoch_loss_sum, epoch_loss_count = epoch_loss_sum + loss.detach(), epoch_loss_count + 1
        else:
            optimizer.zero_grad(set_to_none=True)

        if log_now:
            # one collective for the loss, every diagnostic the objective reported and the fault counters
            names = sorted(stats)
            time_due = ctx.is_main and every_s > 0 and time.monotonic() - saved_at >= every_s
            mean = loss_sum / loss_count if loss_count else torch.tensor(float("nan"), device=ctx.device)
            on_device = torch.stack([mean] + [stats[k].detach().float() for k in names] + [guard.bad_flag()]).double()
            on_host = torch.tensor(
                [ledger.skipped, ledger.read, float(time_due), float(stop.poll())],
                dtype=torch.float64,
                device=ctx.device,
            )
            values = dist.all_reduce_mean(torch.cat([on_device, on_host])).tolist()
            bad = values[-5]
            skipped, read, time_due, stop_any = (v * ctx.world_size for v in values[-4:])
            stop_now = stop_any > 0
            guard.raise_if_seen(bad, lr_of, faults.describe_checkpoint(saved_step, run_dir))
            counters.update(
                data_skipped=base["data_skipped"] + skipped,
                data_read=base["data_read"] + read,
                nonfinite_steps=guard.count,
            )
            faults.check_skip_budget(
                counters["data_skipped"],
                counters["data_read"],
                cfg.data.max_skip_fraction,
                ledger.worst(),
                cfg.data.path,
            )
            mean_loss = values[0]
            elapsed = max(time.perf_counter() - tick, 1e-9)
            counters["train_seconds"] += elapsed  # a resume's idle gap and a later `eval --track` are not in it
            tracker.log_metrics(
                grouped(
                    {
                        "loss": mean_loss,
                        "lr": lr,
                        "data_wait_share": wait / elapsed,
                        "images_per_s": (done - tick_step) * cfg.train.global_batch_size / elapsed,
                        "data_skipped": counters["data_skipped"],
                        "nonfinite_steps": guard.count,
                        "train_seconds": counters["train_seconds"],
                    }
                    | dict(zip(names, values[1:-5]))
                ),
                step=done,
            )
            loss_sum, loss_count, wait, tick, tick_step = 0.0, 0, 0.0, time.perf_counter(), done
            if stop_now and not epoch_end:
                _stop(reporter, guard, lr_of, done, spe, run_dir, saved_step)
            if (step_save or time_due > 0) and not epoch_end:
                reporter.checkpoint(done, done // spe, {"step": done, "epoch": done // spe, "loss": mean_loss})
                saved_step, saved_at = done, time.monotonic()
        progress.step(mean_loss if log_now else None)
        if not epoch_end:
            continue
        epoch = -(-done // spe)  # a last, partial epoch (train.max_steps) counts as one
        last = done == total_steps
        mean_epoch = epoch_loss_sum / epoch_loss_count if epoch_loss_count else float("nan")
        epoch_loss = dist.all_reduce_mean(torch.as_tensor(mean_epoch).reshape(1).float().to(ctx.device)).item()
        epoch_loss_sum, epoch_loss_count = 0.0, 0
        if reporter.epoch_end(
            done,
            epoch,
            last,
            {"step": done, "epoch": epoch, "loss": mean_loss, "epoch_loss": epoch_loss},
            batch=(x1, x2, labels),
            save_due=step_due or time_due > 0,
        ):
            saved_step, saved_at = done, time.monotonic()
        knn_text = f" knn_top1 {reporter.knn_top1:.4f}" if ctx.is_main and reporter._knn_due(epoch, last) else ""
        progress.epoch_line(epoch, -(-total_steps // spe), done, mean_loss, knn_text)
        if stop_now and not last:
            _stop(reporter, guard, lr_of, done, spe, run_dir, saved_step, saved=saved_step == done)
    progress.close()
    reporter.finish()
    return {
        "step": total_steps,
        "epoch": -(-total_steps // spe),
        "knn_top1": reporter.knn_top1,
        "mlflow_run_id": tracker.run_id,
    }


def _stop(reporter, guard, lr_of, done: int, spe: int, run_dir: str, saved_step, saved: bool = False) -> None:
    """A stop request: checkpoint at ``done`` (unless a non-finite step makes it bad, or it exists), then end."""
    if done > 0 and not saved and done != saved_step:
        guard.raise_if_seen(guard.bad_flag().item(), lr_of, faults.describe_checkpoint(saved_step, run_dir))
        reporter.checkpoint(done, done // spe, {"step": done, "epoch": done // spe, "stopped": True})
    if reporter.ctx.is_main:
        print(f"stopped at step {done}: checkpoint saved in {run_dir}", flush=True)
    raise faults.Stopped(done)
