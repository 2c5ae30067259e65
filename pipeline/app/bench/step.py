"""`hardneg bench step`: where a training step's time goes — data wait, network, loss (+ synthesizer), gather.

Measured in one run on real digits shards with the configured method: each phase is timed with a
device synchronisation around it, so the shares add up to the step. The gather is timed in a
2-process gloo group (CPU) or on the training device, forward + backward of the real payload.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from itertools import pairwise

import torch
import torch.multiprocessing as mp

from pipeline import augment, data, dist, faults
from pipeline import config as config_mod
from pipeline.errors import HardnegError
from pipeline.methods import method
from pipeline.methods.base import InBatchMethod
from pipeline.objectives import build_objective
from pipeline.train import build_optimizer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine(device: torch.device) -> dict:
    """What the figures were measured on."""
    info = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def step_breakdown(cfg: config_mod.Config, steps: int, warmup: int, device: torch.device) -> dict:
    """Mean seconds per step in each phase (single process) and their shares of the step.

    Long on purpose: the phases are timed inline, one synchronised mark after another, so the shares add up to the step.
    """
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    # the phases below are the in-batch objective's .model and .loss_fn
    if not isinstance(method(cfg.loss.name), InBatchMethod):
        raise HardnegError(f"bench step times the in-batch methods; loss.name={cfg.loss.name} is not one")
    objective = build_objective(cfg, None, generator).to(device)
    optimizer = build_optimizer(cfg.optim, objective)
    device_views = augment.DeviceTwoViews(cfg.augment).to(device) if cfg.augment.where == "device" else None
    views = (
        (lambda image: (augment.to_uint8_tensor(cfg.augment.image_size)(image),))
        if device_views
        else augment.TwoViews(augment.view_transform(cfg.augment))
    )
    batches = data.train_batches(
        cfg.data.path,
        cfg.data.pretrain,
        views,
        cfg.train.global_batch_size,
        rank=0,
        seed=0,
        shuffle_buffer=cfg.data.shuffle_buffer,
        loader_workers=cfg.data.loader_workers,
    )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16")
    totals = {
        "data_wait": 0.0,
        "augment_on_device": 0.0,
        "network_forward": 0.0,
        "loss_forward": 0.0,
        "backward_and_step": 0.0,
        "nonfinite_check": 0.0,
    }
    guard = faults.NonfiniteGuard(cfg.train.on_nonfinite, cfg.train.max_nonfinite_steps, objective, device, 0)
    for step in range(warmup + steps):
        marks = [time.perf_counter()]
        *images, _ = next(batches)
        images = [x.to(device, non_blocking=True) for x in images]
        _sync(device)
        marks.append(time.perf_counter())
        x1, x2 = device_views(images[0]) if device_views else images
        _sync(device)
        marks.append(time.perf_counter())
        with autocast:
            z1, z2 = objective.model(torch.cat([x1, x2])).chunk(2)
        _sync(device)
        marks.append(time.perf_counter())
        loss = objective.loss_fn(z1, z2, None, generator)
        _sync(device)
        marks.append(time.perf_counter())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        _sync(device)
        marks.append(time.perf_counter())
        guard.before_step()  # skip mode: the buffer copy; the same work, timed after the step
        ok = guard.finite(loss)  # stop mode: device flags only; skip mode: also the host read below
        if cfg.train.on_nonfinite == "skip":
            bool(ok)
        _sync(device)
        marks.append(time.perf_counter())
        if step >= warmup:
            for key, (start, end) in zip(totals, pairwise(marks), strict=True):
                totals[key] += end - start
    per_step = {k: v / steps for k, v in totals.items()}
    step_s = sum(per_step.values())
    return {
        "seconds_per_step": per_step,
        "step_s": step_s,
        "views_per_s": 2 * cfg.train.global_batch_size / step_s,
        "shares": {k: v / step_s for k, v in per_step.items()},
    }


def _gather_worker(rank: int, world: int, port: int, rows: int, dim: int, repeats: int, out: str) -> None:
    dist.init_process_group("gloo", f"tcp://127.0.0.1:{port}", rank, world)
    try:
        gather = dist.make_gather(dist.current_context())
        x = torch.randn(rows, dim, requires_grad=True)
        for _ in range(2):  # warm-up
            gather(x).sum().backward()
        start = time.perf_counter()
        for _ in range(repeats):
            gather(x).square().sum().backward()
        elapsed = (time.perf_counter() - start) / repeats
        if rank == 0:
            with open(out, "w") as f:
                json.dump({"gather_s": elapsed}, f)
    finally:
        dist.destroy_process_group()


def gather_seconds(rows: int, dim: int, repeats: int = 10, world: int = 2) -> float:
    """Seconds for dist.Gather forward + backward of (rows, dim) per rank, 2 gloo processes."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "gather.json")
        mp.spawn(_gather_worker, args=(world, port, rows, dim, repeats, out), nprocs=world, join=True)
        with open(out) as f:
            return json.load(f)["gather_s"]


def run(config_path: str, overrides: list[str], steps: int, warmup: int, device: str) -> dict:
    """Breakdown + gather share for the given config, on digits shards prepared in a temporary folder."""
    from data_prep.prep import prepare

    with tempfile.TemporaryDirectory() as tmp:
        shards = os.path.join(tmp, "shards")
        prepare("builtin:digits", shards, shard_size=256)
        cfg = config_mod.load(config_path, [f"data.path={shards}", "cluster.launcher=local", *overrides])
        torch.set_num_threads(max(1, os.cpu_count() or 1))
        dev = torch.device(device)
        result = step_breakdown(cfg, steps, warmup, dev)
    # Per-rank payload of the in-batch losses: both views' projections, (n, 2 * proj_dim), float32.
    gather_s = gather_seconds(cfg.per_worker_batch_size, 2 * cfg.model.proj_dim)
    result["gather_s_2proc_gloo"] = gather_s
    result["shares"]["gather (2-proc gloo, estimated)"] = gather_s / (result["step_s"] + gather_s)
    result["config"] = {
        "loss": cfg.loss.name,
        "backbone": cfg.model.backbone,
        "width": cfg.model.width,
        "image_size": cfg.augment.image_size,
        "batch": cfg.train.global_batch_size,
        "augment.where": cfg.augment.where,
        "precision": cfg.train.precision,
        "on_nonfinite": cfg.train.on_nonfinite,
    }
    result["machine"] = machine(dev)
    return result


def print_table(result: dict) -> None:
    print(f"step breakdown ({result['config']}) on {result['machine']['device']}:")
    print(f"  {'phase':40s} {'s/step':>10s} {'share':>8s}")
    for key, share in result["shares"].items():
        seconds = result["seconds_per_step"].get(key, result.get("gather_s_2proc_gloo"))
        print(f"  {key:40s} {seconds:10.4f} {share:8.1%}")
    print(f"  augmented views/s: {result['views_per_s']:.0f}")
    loss_share = result["shares"]["loss_forward"] + result["shares"]["gather (2-proc gloo, estimated)"]
    print(
        f"  non-finite check (train.on_nonfinite={result['config']['on_nonfinite']}): "
        f"{result['shares']['nonfinite_check']:.2%} of the step"
    )
    print(
        f"  goals (one H100): loss + synthesizer + gather <= 3% (here {loss_share:.1%}); "
        f"data wait <= 5% (here {result['shares']['data_wait']:.1%})"
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="hardneg bench step", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    result = run(args.config, args.overrides, args.steps, args.warmup, args.device)
    print_table(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0
