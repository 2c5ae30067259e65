"""The step loop: ``run(cfg, ctx, hooks)`` runs unchanged in one process or inside a Ray Train worker.

The launcher supplies ``ctx`` (rank, world, device; see dist.py) and ``hooks`` (where checkpoints
come from and go to). Everything here is the same on every rank except that rank 0 tracks and
evaluates; every rank reports at the same steps, because Ray Train's ``report`` is a barrier.
"""

from __future__ import annotations

import contextlib
import os
import resource
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterator, Optional, Protocol

import torch

from data_prep.manifest import read_manifest
from pipeline import checkpoint, console, data, dist, epoch_order, faults, outbox, schedule
from pipeline import config as config_mod
from pipeline.chunked_step import CHUNKED_PARTS, chunked_step, supports_chunks
from pipeline.config import Config, OptimConfig, TrainConfig
from pipeline.errors import HardnegError
from pipeline.losses import tiling
from pipeline.metric_names import grouped
from pipeline.objectives import build_objective
from pipeline.redaction import redact
from pipeline.reporting import EpochReporter
from pipeline.tracking import make_tracker

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
    "train.loss_tile",  # exact: the same loss and gradients, built in tiles
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
    """The run's length in steps (schedule.planned_steps of the config's epochs and train.max_steps)."""
    return schedule.planned_steps(cfg.train.epochs, spe, cfg.train.max_steps)


def build_optimizer(cfg: OptimConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """SGD (momentum) / Adam / AdamW over all parameters, as the config names."""
    params = model.parameters()
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


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


def _resume(cfg: Config, state: Optional[dict], objective: torch.nn.Module, optimizer) -> Optional[dict]:
    """Load a restored checkpoint's weights, optimiser and RNG states (refusing a different config); the state."""
    if state is not None:
        mismatches = resume_mismatches(state["config"], cfg)
        if mismatches:
            raise HardnegError("cannot resume: the config differs from the checkpoint's: " + "; ".join(mismatches))
        objective.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        checkpoint.restore_rng(state.get("rng", {}))
    return state


def run(cfg: Config, ctx: dist.DistContext, hooks: Hooks) -> dict:
    """Train per ``cfg`` on this rank; returns {"step", "epoch", "knn_top1", "mlflow_run_id"}."""
    torch.set_num_threads(cfg.train.threads_per_worker)
    manifest = read_manifest(cfg.data.path)
    spe = data.steps_per_epoch(manifest, cfg.data.pretrain, cfg.train.global_batch_size)

    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    generator = torch.Generator()  # same seed on every rank: SSCL's synthetic draws must agree
    objective = build_objective(cfg, dist.make_gather(ctx), generator).to(ctx.device)
    optimizer = build_optimizer(cfg.optim, objective)
    state = _resume(cfg, hooks.restore(), objective, optimizer)
    start_step = state["step"] if state else 0
    run_id = (state or {}).get("mlflow_run_id") or cfg.tracking.run_id
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
            parts = dict(objective=objective, optimizer=optimizer, generator=generator, tracker=tracker)
            parts |= dict(reporter=reporter, base=base, counters=counters)
            loop = _prepare(cfg, ctx, stop, start_step, spe, state, **parts)
            return _loop(loop, start_step, resumed=state is not None)
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


@dataclass
class Run:
    """What one run's loop works with, built once by ``_prepare`` (the loop's inputs, instead of 16 arguments)."""

    cfg: Config
    ctx: dist.DistContext
    # an nn.Module with forward(x1, x2, labels, with_stats), after_step() and backbone (pipeline/objectives.py);
    # Any: to mypy an nn.Module's attributes are Tensor | Module, so after_step() would not type-check
    objective: Any
    net: torch.nn.Module  # the objective, DDP-wrapped on several ranks
    optimizer: torch.optim.Optimizer
    generator: torch.Generator  # the same seed on every rank: SSCL's and MoCHi's shared draws
    tracker: Any  # tracking.MlflowTracker on rank 0, a no-op tracker elsewhere
    reporter: EpochReporter
    stop: faults.StopRequest
    guard: faults.NonfiniteGuard
    ledger: data.SkipLedger
    batches: Iterator
    device_views: Optional[Callable]
    autocast: Any
    progress: console.Progress
    lr_of: Callable[[int], float]
    spe: int
    total_steps: int
    base: dict  # the counters as the run (or its checkpoint) started
    counters: dict  # ... as of the last log step: checkpoints store them
    run_dir: str


@dataclass
class RunState:
    """What the loop carries from step to step: the last checkpoint, the log window's and the epoch's sums."""

    saved_step: Optional[int]  # the step of the newest checkpoint of this run (None: none yet)
    saved_at: float  # time.monotonic() of that checkpoint (or the loop's start)
    tick: float  # time.perf_counter() at the log window's start
    tick_step: int  # the step the log window started at
    loss_sum: Any = 0.0  # the window's applied losses (a tensor once one is added: no sync per step)
    loss_count: int = 0
    wait: float = 0.0  # seconds the window waited for data
    epoch_loss_sum: Any = 0.0
    epoch_loss_count: int = 0
    mean_loss: float = float("nan")  # the last logged mean over ranks
    time_due: float = 0.0  # > 0: train.checkpoint_every_minutes fell due at the last log step (any rank)
    stop_now: bool = False  # a stop was requested on some rank, as of the last log step

    def add_loss(self, loss: torch.Tensor) -> None:
        self.loss_sum, self.loss_count = self.loss_sum + loss, self.loss_count + 1
        self.epoch_loss_sum, self.epoch_loss_count = self.epoch_loss_sum + loss, self.epoch_loss_count + 1

    def new_window(self, done: int) -> None:
        self.loss_sum, self.loss_count, self.wait, self.tick, self.tick_step = 0.0, 0, 0.0, time.perf_counter(), done


def _prepare(cfg: Config, ctx: dist.DistContext, stop, start_step: int, spe: int, state, **parts) -> Run:
    """The loop's Run: ``parts`` (objective, optimizer, generator, tracker, reporter, base, counters) plus what is
    built here, in the order the loop always built it (params, DDP, compile, loader, guard, schedule)."""
    objective, reporter = parts["objective"], parts["reporter"]
    reporter.start(new_run=state is None, extra_params={"world_size": ctx.world_size, "steps_per_epoch": spe})
    total_steps = planned_steps(cfg, spe)
    if cfg.train.chunk_size is not None and not supports_chunks(objective):
        raise HardnegError(
            f"loss.name={cfg.loss.name} cannot run with train.chunk_size: its objective has no "
            f'{"/".join(CHUNKED_PARTS)} (docs/methods.md, "The chunked step"); set train.chunk_size=null'
        )
    # the chunked step averages gradients itself, once per step (DDP would hook every chunk's backward)
    net = dist.wrap_ddp(objective, ctx) if cfg.train.chunk_size is None else objective
    if cfg.train.channels_last:
        objective.to(memory_format=torch.channels_last)
    if cfg.train.compile:
        objective.backbone.compile()  # in place: state_dict keys stay those of the plain module
    ledger = data.SkipLedger(announce=True)
    if cfg.data.order == "epoch":
        batches, device_views = epoch_order.train_loader(
            cfg, ctx.rank, ctx.world_size, ctx.device, start_step, spe, ledger
        )
    else:
        batches, device_views = data.train_loader(cfg, ctx.rank, ctx.world_size, ctx.device, start_step, spe, ledger)
    train = cfg.train
    guard = faults.NonfiniteGuard(
        train.on_nonfinite,
        train.max_nonfinite_steps,
        objective,
        ctx.device,
        start_step,
        parts["base"]["nonfinite_steps"],
    )
    lr_of = partial(
        schedule.lr_at,
        base_lr=cfg.scaled_lr,
        warmup_steps=int(cfg.optim.warmup_epochs * spe),
        total_steps=total_steps,
        min_ratio=cfg.optim.min_lr_ratio,
    )
    return Run(
        cfg=cfg,
        ctx=ctx,
        net=net,
        stop=stop,
        guard=guard,
        ledger=ledger,
        batches=batches,
        device_views=device_views,
        autocast=torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=train.precision == "bf16"),
        progress=console.Progress(total_steps, start_step, train.global_batch_size, enabled=ctx.is_main),
        lr_of=lr_of,
        spe=spe,
        total_steps=total_steps,
        run_dir=_run_dir(cfg),
        **parts,
    )


def _loop(run: Run, start_step: int, resumed: bool) -> dict:
    """The steps from ``start_step`` to the end: train, then log, checkpoint, end an epoch or stop as planned."""
    cfg, ctx = run.cfg, run.ctx
    st = RunState(
        saved_step=start_step if resumed else None,
        saved_at=time.monotonic(),
        tick=time.perf_counter(),
        tick_step=start_step,
    )
    for step in range(start_step, run.total_steps):
        if run.stop.requested and ctx.world_size == 1:  # several ranks agree on a stop at a log step (_log)
            _stop(run, st, step)
        plan = schedule.plan_step(
            step, run.spe, run.total_steps, cfg.train.log_every_steps, cfg.train.checkpoint_every_steps
        )
        batch, stats, lr = _train_step(run, st, step, plan)
        if plan.log_now:
            _log(run, st, plan, lr, stats)
        run.progress.step(st.mean_loss if plan.log_now else None)
        if plan.epoch_end:
            _end_epoch(run, st, plan, batch)
    run.progress.close()
    run.reporter.finish()
    return {
        "step": run.total_steps,
        "epoch": schedule.epoch_of(run.total_steps, run.spe),
        "knn_top1": run.reporter.knn_top1,
        "mlflow_run_id": run.tracker.run_id,
    }


def _train_step(run: Run, st: RunState, step: int, plan: schedule.StepPlan) -> tuple[tuple, dict, float]:
    """One optimizer step on this rank's next batch (skipped when the loss is not finite); (batch, stats, lr)."""
    cfg, ctx = run.cfg, run.ctx
    _seed_step(cfg, ctx.rank, step, run.generator)
    lr = run.lr_of(step)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    fetch = time.perf_counter()
    *images, labels = next(run.batches)
    st.wait += time.perf_counter() - fetch
    images = [x.to(ctx.device, non_blocking=True) for x in images]
    x1, x2 = run.device_views(images[0]) if run.device_views is not None else images
    if cfg.train.channels_last:
        x1, x2 = (x.contiguous(memory_format=torch.channels_last) for x in (x1, x2))
    run.guard.before_step()
    loss, stats = _loss_and_gradients(run, x1, x2, labels.to(ctx.device), plan.log_now)
    ok = run.guard.finite(loss)
    if run.guard.apply_update(ok, lr, plan.done, faults.describe_checkpoint(st.saved_step, run.run_dir)):
        run.optimizer.step()
        run.objective.after_step()
        st.add_loss(loss.detach())
    else:
        run.optimizer.zero_grad(set_to_none=True)
    return (x1, x2, labels), stats, lr


def _loss_and_gradients(run: Run, x1, x2, labels, with_stats: bool) -> tuple[torch.Tensor, dict]:
    """``loss_and_gradients`` with the run's network, objective, optimizer and autocast."""
    parts = dict(net=run.net, objective=run.objective, optimizer=run.optimizer, autocast=run.autocast)
    return loss_and_gradients(run.cfg.train, x1, x2, labels, with_stats, **parts)


def loss_and_gradients(
    train: TrainConfig,
    x1: torch.Tensor,
    x2: torch.Tensor,
    labels: torch.Tensor,
    with_stats: bool,
    *,
    net: torch.nn.Module,
    objective: Any,
    optimizer: torch.optim.Optimizer,
    autocast: Any = None,
) -> tuple[torch.Tensor, dict]:
    """The step's loss (and stats) with its gradients in .grad: one pass through ``net`` (the objective, DDP-wrapped
    on several ranks), or chunk by chunk (train.chunk_size) through ``objective``; `hardneg bench memory` measures it.
    autocast: the run's bf16 autocast context (None: none)."""
    with (
        autocast or contextlib.nullcontext(),
        tiling.loss_tile(train.loss_tile),
    ):  # objectives compute losses in float32 whatever the net ran in
        if train.chunk_size is None:
            loss, stats = net(x1, x2, labels, with_stats=with_stats)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            return loss, stats
        optimizer.zero_grad(set_to_none=True)
        loss, stats = chunked_step(objective, x1, x2, labels, chunk_size=train.chunk_size, with_stats=with_stats)
    dist.average_gradients_(objective)  # the one all-reduce of the step (the chunked step bypasses DDP)
    return loss, stats


def _log(run: Run, st: RunState, plan: schedule.StepPlan, lr: float, stats: dict) -> None:
    """Reduce the window's loss, the objective's diagnostics and the fault counters over ranks (one collective,
    by name), log them, and act on what every rank now agrees on: a non-finite step, a stop, a checkpoint."""
    cfg, ctx, done = run.cfg, run.ctx, plan.done
    every_s = cfg.train.checkpoint_every_minutes * 60
    due = ctx.is_main and schedule.time_checkpoint_due(time.monotonic(), st.saved_at, every_s)
    mean = st.loss_sum / st.loss_count if st.loss_count else torch.tensor(float("nan"), device=ctx.device)
    on_host = {
        "data_skipped": run.ledger.skipped,
        "data_read": run.ledger.read,
        "time_due": due,
        "stop": run.stop.poll(),
    }
    reduced = dist.all_reduce_mean_named(
        {"loss": mean.float(), "bad": run.guard.bad_flag().float()}
        | {f"stat/{k}": v.detach().float() for k, v in stats.items()}
        | {f"host/{k}": torch.tensor(float(v), dtype=torch.float64) for k, v in on_host.items()},
        ctx.device,
    )
    summed = {k: reduced[f"host/{k}"] * ctx.world_size for k in on_host}  # counts and flags: over all ranks
    st.time_due, st.stop_now = summed["time_due"], summed["stop"] > 0
    run.guard.raise_if_seen(reduced["bad"], run.lr_of, faults.describe_checkpoint(st.saved_step, run.run_dir))
    counters = run.counters
    counters.update(
        data_skipped=run.base["data_skipped"] + summed["data_skipped"],
        data_read=run.base["data_read"] + summed["data_read"],
        nonfinite_steps=run.guard.count,
    )
    faults.check_skip_budget(
        counters["data_skipped"], counters["data_read"], cfg.data.max_skip_fraction, run.ledger.worst(), cfg.data.path
    )
    st.mean_loss = reduced["loss"]
    elapsed = max(time.perf_counter() - st.tick, 1e-9)
    counters["train_seconds"] += elapsed  # a resume's idle gap and a later `eval --track` are not in it
    run.tracker.log_metrics(
        grouped(
            {
                "loss": st.mean_loss,
                "lr": lr,
                "data_wait_share": st.wait / elapsed,
                "images_per_s": (done - st.tick_step) * cfg.train.global_batch_size / elapsed,
                "data_skipped": counters["data_skipped"],
                "nonfinite_steps": run.guard.count,
                "train_seconds": counters["train_seconds"],
                "chunks_per_step": _chunks_per_step(cfg, ctx.world_size),
                "peak_memory_mib": _peak_memory_mib(ctx.device),
            }
            | {k: reduced[f"stat/{k}"] for k in sorted(stats)}
        ),
        step=done,
    )
    st.new_window(done)
    if st.stop_now and not plan.epoch_end:
        _stop(run, st, done)
    if (plan.step_save or st.time_due > 0) and not plan.epoch_end:
        run.reporter.checkpoint(done, done // run.spe, {"step": done, "epoch": done // run.spe, "loss": st.mean_loss})
        st.saved_step, st.saved_at = done, time.monotonic()


def _chunks_per_step(cfg: Config, world_size: int) -> int:
    """Forward passes per step on each of ``world_size`` workers (the worker count of this attempt)."""
    per_worker = cfg.train.global_batch_size // world_size
    return -(-per_worker // (cfg.train.chunk_size or per_worker))


def _peak_memory_mib(device: torch.device) -> float:
    """On a GPU the most allocated since the last call (then reset); on CPU the process's peak resident set."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return peak / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _end_epoch(run: Run, st: RunState, plan: schedule.StepPlan, batch: tuple) -> None:
    """The epoch's mean loss over ranks, then the reporter's kNN, plots and checkpoints, the epoch line, a stop."""
    ctx, done, last = run.ctx, plan.done, plan.last
    epoch = schedule.epoch_of(done, run.spe)
    mean_epoch = st.epoch_loss_sum / st.epoch_loss_count if st.epoch_loss_count else float("nan")
    epoch_loss = dist.all_reduce_mean(torch.as_tensor(mean_epoch).reshape(1).float().to(ctx.device)).item()
    st.epoch_loss_sum, st.epoch_loss_count = 0.0, 0
    metrics = {"step": done, "epoch": epoch, "loss": st.mean_loss, "epoch_loss": epoch_loss}
    if run.reporter.epoch_end(done, epoch, last, metrics, batch=batch, save_due=plan.step_due or st.time_due > 0):
        st.saved_step, st.saved_at = done, time.monotonic()
    knn = f" knn_top1 {run.reporter.knn_top1:.4f}" if ctx.is_main and run.reporter.knn_due(epoch, last) else ""
    run.progress.epoch_line(epoch, schedule.epoch_of(run.total_steps, run.spe), done, st.mean_loss, knn)
    if st.stop_now and not last:
        _stop(run, st, done, saved=st.saved_step == done)


def _stop(run: Run, st: RunState, done: int, saved: bool = False) -> None:
    """A stop request: checkpoint at ``done`` (unless a non-finite step makes it bad, or it exists), then end."""
    if done > 0 and not saved and done != st.saved_step:
        run.guard.raise_if_seen(
            run.guard.bad_flag().item(), run.lr_of, faults.describe_checkpoint(st.saved_step, run.run_dir)
        )
        run.reporter.checkpoint(done, done // run.spe, {"step": done, "epoch": done // run.spe, "stopped": True})
    if run.ctx.is_main:
        console.say(f"stopped at step {done}: checkpoint saved in {run.run_dir}")
    raise faults.Stopped(done)
