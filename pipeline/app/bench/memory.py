"""`hardneg bench memory`: peak memory and time of one training step against the global batch, plain vs chunked.

Each (global batch G, step kind) runs in a fresh process (one worker holding the whole batch), so one
measurement's allocations never serve another's. The step is the training loop's own
(train.loss_and_gradients: the plain forward + backward, or pipeline.chunked_step under train.loss_tile)
plus the optimizer step, on random views of the config's image size. Peak memory: on CUDA
``max_memory_allocated`` above what was allocated before the step; on CPU the growth of the process's peak
resident set (``ru_maxrss``) over a step, after the model, optimizer state and the batch itself exist and after
one small warm-up step (the libraries' one-time set-up), with glibc's mmap threshold fixed so freed large
blocks leave the resident set.
A kind whose previous G already peaked above the budget is not run at a larger G (its row says so).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

from pipeline import config as config_mod
from pipeline.app.bench.step import machine
from pipeline.objectives import build_objective
from pipeline.train import build_optimizer, loss_and_gradients

GIB = 1 << 30


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure_one(cfg: config_mod.Config, device: torch.device, steps: int) -> dict:
    """Peak extra bytes of the first step and mean seconds of ``steps`` steps, for the config's G and chunking."""
    torch.manual_seed(0)
    objective = build_objective(cfg, None, torch.Generator().manual_seed(0)).to(device)
    optimizer = build_optimizer(cfg.optim, objective)
    size, batch, train = cfg.augment.image_size, cfg.train.global_batch_size, cfg.train
    x1, x2 = (torch.randn(batch, 3, size, size, device=device) for _ in range(2))
    labels = torch.arange(batch, device=device) % 10

    def step(a: torch.Tensor, b: torch.Tensor, y: torch.Tensor) -> None:
        loss_and_gradients(train, a, b, y, False, net=objective, objective=objective, optimizer=optimizer)
        optimizer.step()
        objective.after_step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for p in objective.parameters():  # gradients and optimizer state exist before the measured step
        p.grad = torch.zeros_like(p)
    optimizer.step()
    # one small step first: the libraries' one-time set-up (thread pools, kernels) is not the step's memory
    warm = train.chunk_size or max(2, min(64, batch // 4))  # chunked: one chunk; plain: a small batch
    step(x1[:warm], x2[:warm], labels[:warm])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = _peak_rss_bytes()
    start = time.perf_counter()
    step(x1, x2, labels)
    first = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _peak_rss_bytes()) - before
    times = []
    for _ in range(steps - 1):
        start = time.perf_counter()
        step(x1, x2, labels)
        times.append(time.perf_counter() - start)
    return {"peak_bytes": max(peak, 0), "step_s": sum(times) / len(times) if times else first}


def _child(argv: list[str]) -> int:
    """In the measuring process: one (config, overrides) measurement, as one JSON line on stdout."""
    args = json.loads(argv[0])
    cfg = config_mod.load(args["config"], args["overrides"])
    torch.set_num_threads(args["threads"])
    result = measure_one(cfg, torch.device(args["device"]), args["steps"])
    print(json.dumps(result), flush=True)
    return 0


def _measure(config: str, overrides: list[str], device: str, steps: int, threads: int) -> dict:
    payload = json.dumps(
        {"config": config, "overrides": overrides, "device": device, "steps": steps, "threads": threads}
    )
    # a fixed mmap threshold: glibc then returns every large freed block to the system, so the peak resident set
    # follows the live tensors (its default threshold grows with freed blocks, and the heap keeps them resident)
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.app.bench.memory", "--child", payload], capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": f"exit {proc.returncode}: {tail}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(args) -> dict:
    """Every (G, kind) row: peak bytes, step seconds, or why it was not measured."""
    kinds = {
        "plain": ["train.chunk_size=null", "train.loss_tile=null"],
        f"chunk {args.chunk}, tile {args.tile}": [f"train.chunk_size={args.chunk}", f"train.loss_tile={args.tile}"],
    }
    rows: list[dict] = []
    over: dict[str, str] = {}
    last: dict[str, dict] = {}
    for batch in args.batches:
        for kind, extra in kinds.items():
            row: dict = {"global_batch": batch, "kind": kind}
            previous = last.get(kind)
            # linear in G at worst: a run predicted far over the budget is not started (it could take the machine)
            predicted = previous["peak_bytes"] * batch / previous["global_batch"] if previous else 0.0
            if kind in over:
                row["skipped"] = over[kind]
            elif predicted > 1.5 * args.budget_gib * GIB:
                row["skipped"] = f"predicted {predicted / GIB:.1f} GiB (linear from G={previous['global_batch']})"
            else:
                overrides = [f"train.global_batch_size={batch}", "cluster.launcher=local", *extra, *args.overrides]
                row |= _measure(args.config, overrides, args.device, args.steps, args.threads)
                if "error" in row:
                    over[kind] = f"failed at G={batch}"
                elif row["peak_bytes"] > args.budget_gib * GIB:
                    over[kind] = f"over budget at G={batch}"
                else:
                    last[kind] = row
            rows.append(row)
            print(_row_line(row), flush=True)
    return {"machine": machine(torch.device(args.device)), "config": args.config, "rows": rows, "args": vars(args)}


def _row_line(row: dict) -> str:
    what = f"G={row['global_batch']:>6d} {row['kind']:22s}"
    if "skipped" in row:
        return f"  {what} not run: {row['skipped']}"
    if "error" in row:
        return f"  {what} failed: {row['error']}"
    return f"  {what} peak {row['peak_bytes'] / 2**20:10.1f} MiB   step {row['step_s']:8.3f} s"


def summary(result: dict, budget_gib: float, tile: int) -> list[str]:
    """The goals' figures: the largest G within budget per kind, the chunked peak's growth, the time ratio."""
    rows = [r for r in result["rows"] if "peak_bytes" in r]
    lines = []
    for kind in dict.fromkeys(r["kind"] for r in result["rows"]):
        fits = [r["global_batch"] for r in rows if r["kind"] == kind and r["peak_bytes"] <= budget_gib * GIB]
        lines.append(f"largest G within {budget_gib:g} GiB, {kind}: {max(fits) if fits else 'none measured'}")
    chunked = sorted((r for r in rows if r["kind"] != "plain"), key=lambda r: r["global_batch"])
    if len(chunked) >= 2:
        low, high = chunked[0], chunked[-1]
        allowed = 4 * tile * 2 * high["global_batch"] * 4
        growth = high["peak_bytes"] - low["peak_bytes"]
        lines.append(
            f"chunked peak growth G={low['global_batch']} -> {high['global_batch']}: {growth / 2**20:.1f} MiB "
            f"(goal <= 4 loss-tile buffers = {allowed / 2**20:.1f} MiB)"
        )
    both = {}
    for r in rows:
        both.setdefault(r["global_batch"], {})[r["kind"] == "plain"] = r["step_s"]
    common = [g for g, kinds in both.items() if len(kinds) == 2]
    if common:
        g = max(common)
        lines.append(
            f"step time at G={g}: chunked / plain = {both[g][False] / both[g][True]:.2f} (goal <= 1.4: one extra forward)"
        )
    return lines


def main(argv: list[str]) -> int:
    if argv[:1] == ["--child"]:
        return _child(argv[1:])
    parser = argparse.ArgumentParser(prog="hardneg bench memory", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--batches", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--budget-gib", type=float, default=8.0)
    parser.add_argument("--steps", type=int, default=2, help="steps per measurement (the first is the peak's)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    print(f"peak memory of one training step ({args.config}, {args.device}):", flush=True)
    result = run(args)
    for line in summary(result, args.budget_gib, args.tile):
        print(f"  {line}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
