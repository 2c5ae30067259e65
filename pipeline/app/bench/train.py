"""`hardneg bench train`: images/s of the training step in a plain process vs under Ray Train, in one run.

The same step loop (the training objective: ResNet-18 with the CIFAR stem + projection head + NT-Xent
over the gathered batch, SGD, DDP when there are several ranks) on synthetic 32 px images is timed
  1. in this process (1 worker),
  2. under Ray Train with 1 worker,
  3. as plain torch DDP with 2 processes (gloo/NCCL, spawned here),
  4. under Ray Train with 2 workers,
all at the same global batch. Ray Train's overhead is the images/s lost at equal worker count
(2 vs 1, 4 vs 3); the goal is <= 5%. Each mode warms up, then times --repeats windows of --steps
steps and keeps the best window (the one least disturbed by other load on a shared machine). On a GPU machine with fewer than 2 GPUs the 2-worker modes are
skipped. Every worker runs --threads CPU threads (default 1: on a small shared CPU, two OpenMP
threads in one process run slower than one), and the table shows the count each worker really used.
Not a timed test: ratios measured in one run are what to read.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from pipeline import config as config_mod
from pipeline import dist
from pipeline.objectives import build_objective
from pipeline.train import build_optimizer

GOAL_OVERHEAD = 0.05


def _config(args: dict, world: int) -> config_mod.Config:
    return config_mod.load(
        None,
        [
            "model.backbone=resnet18",
            "model.stem=cifar",
            f"model.width={args['width']}",
            f"augment.image_size={args['image_size']}",
            "loss.name=nt_xent",
            f"train.global_batch_size={args['batch']}",
            f"cluster.num_workers={world}",
        ],
    )


def step_loop(args: dict, device: torch.device) -> dict:
    """Time the training step on this rank (any launcher); every rank returns the same images/s."""
    torch.set_num_threads(args["threads"])
    ctx = dist.current_context(device)
    cfg = _config(args, ctx.world_size)
    torch.manual_seed(0)
    objective = build_objective(cfg, dist.make_gather(ctx), torch.Generator()).to(device)
    optimizer = build_optimizer(cfg.optim, objective)
    net = dist.wrap_ddp(objective, ctx)
    b, s = cfg.train.global_batch_size // ctx.world_size, args["image_size"]
    x1, x2 = torch.randn(b, 3, s, s, device=device), torch.randn(b, 3, s, s, device=device)  # (b, 3, S, S)

    def step() -> None:
        loss, _ = net(x1, x2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier()

    for _ in range(args["warmup"]):
        step()
    rates = []
    for _ in range(args["repeats"]):
        sync()
        start = time.perf_counter()
        for _ in range(args["steps"]):
            step()
        sync()
        # the slowest rank sets the pace: average the window times, then turn them into a rate
        elapsed = float(dist.all_reduce_mean(torch.tensor([time.perf_counter() - start]))[0])
        rates.append(args["steps"] * args["batch"] / elapsed)
    return {"images_per_s": max(rates), "world_size": ctx.world_size, "threads": torch.get_num_threads()}


def _ddp_rank(rank: int, world: int, port: int, args: dict, queue) -> None:
    device = torch.device("cuda", rank) if args["device"] == "cuda" else torch.device("cpu")
    dist.init_process_group("nccl" if args["device"] == "cuda" else "gloo", f"tcp://127.0.0.1:{port}", rank, world)
    try:
        result = step_loop(args, device)
        if rank == 0:
            queue.put(result)
    finally:
        dist.destroy_process_group()


def plain_ddp(args: dict, world: int) -> dict:
    """step_loop in ``world`` spawned processes joined by torch.distributed (the native-DDP reference)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ddp_rank, args=(r, world, port, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    result = queue.get(timeout=3600)
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs):
        raise RuntimeError(f"a DDP process failed: exit codes {[p.exitcode for p in procs]}")
    return result


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="hardneg bench train", description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20, help="steps per timed window (default 20)")
    p.add_argument("--repeats", type=int, default=3, help="timed windows per mode; the best counts (default 3)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--batch", type=int, default=64, help="GLOBAL batch, the same in every mode (default 64)")
    p.add_argument("--width", type=int, default=64, help="ResNet-18 first-stage channels (64 = standard)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="CPU threads per worker, every mode (default 1)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes, to check that it runs (a test uses it)")
    a = p.parse_args(argv)
    if a.quick:
        a.steps, a.repeats, a.warmup, a.batch, a.width = 2, 1, 1, 16, 8
    if a.batch % 2:
        p.error(f"--batch={a.batch} must divide by 2 workers")
    return a


def main(argv: list[str]) -> int:
    """Long on purpose: its argparse declarations and the two runs it compares, in order."""
    a = parse_args(argv)
    from cluster.train import local_ray, run_on_workers  # Ray lives under cluster/

    base = {
        "steps": a.steps,
        "repeats": a.repeats,
        "warmup": a.warmup,
        "batch": a.batch,
        "width": a.width,
        "image_size": a.image_size,
        "device": a.device,
    }
    gpus = torch.cuda.device_count() if a.device == "cuda" else 0
    two = a.device == "cpu" or gpus >= 2
    use_gpu = a.device == "cuda"

    def args(workers: int) -> dict:
        return base | {"threads": a.threads}

    print(
        f"hardneg bench train: ResNet-18 (CIFAR stem, width {a.width}) + NT-Xent at {a.image_size} px, "
        f"global batch {a.batch}, best of {a.repeats} x {a.steps} steps, {a.device}, "
        f"{a.threads} CPU thread(s) per worker, {os.cpu_count()} cores here",
        flush=True,
    )
    rows = [("plain process", 1, step_loop(args(1), torch.device("cuda", 0) if use_gpu else torch.device("cpu")))]
    if two:
        rows.append(("torch DDP, 2 processes", 2, plain_ddp(args(2), 2)))
    with tempfile.TemporaryDirectory(prefix="hardneg-bench-") as storage, local_ray(2):
        rows.insert(
            1,
            ("Ray Train", 1, run_on_workers(step_loop, args(1), num_workers=1, use_gpu=use_gpu, storage_path=storage)),
        )
        if two:
            rows.append(
                (
                    "Ray Train",
                    2,
                    run_on_workers(step_loop, args(2), num_workers=2, use_gpu=use_gpu, storage_path=storage),
                )
            )
    plain = rows[0][2]["images_per_s"]
    print(f"{'mode':<24}{'workers':>8}{'threads':>8}{'images/s':>11}{'vs plain':>10}")
    for name, workers, result in rows:
        print(
            f"{name:<24}{workers:>8}{result['threads']:>8}{result['images_per_s']:>11.1f}"
            f"{result['images_per_s'] / plain:>10.3f}"
        )
    rate = {(name.split(",")[0], w): r["images_per_s"] for name, w, r in rows}
    pairs = [(1, rate[("plain process", 1)], rate[("Ray Train", 1)])]
    if two:
        pairs.append((2, rate[("torch DDP", 2)], rate[("Ray Train", 2)]))
    for workers, native, ray_rate in pairs:
        overhead = 1 - ray_rate / native
        verdict = "meets" if overhead <= GOAL_OVERHEAD else "misses"
        print(
            f"Ray Train overhead at {workers} worker{'s' if workers > 1 else ''}: {overhead:+.1%} "
            f"({verdict} the goal <= {GOAL_OVERHEAD:.0%})"
        )
    if not two:
        print(f"2-worker modes skipped: {gpus} GPU(s) here")
    return 0
