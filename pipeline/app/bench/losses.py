"""`hardneg bench losses`: forward+backward time and memory of every loss relative to NT-Xent, in one run.

Two tables. (1) Each loss at global batch B (d = 128 by default) on one process: best time of
forward+backward and its memory, both as ratios to NT-Xent at the same B. (2) The per-worker memory
of the local-rows x global-columns layout for a simulated W-worker run (rank 0 of W holds B/W anchor
pairs against the 2B gathered columns; the other ranks' blocks are constants) relative to a replicated
layout where every worker computes the full 2B x 2B similarity matrix.

Memory: on CUDA the peak of torch.cuda.max_memory_allocated above the inputs during forward+backward;
on CPU the bytes of the tensors autograd saves for backward (torch.autograd.graph.saved_tensors_hooks,
each storage counted once), i.e. the graph's footprint, not transient temporaries. The output says which.
Ratios are what to compare; absolute numbers depend on the machine. Not a timed test.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

from pipeline.losses import dcl, hcl, mochi_loss, nt_xent, psm_hard_loss, psm_soft_loss, sscl

GOALS = {"hcl": ("time", 1.2), "sscl(32,8)": ("time", 1.5)}
PER_WORKER_GOAL = "~1/W"


def _psm(z1, z2, gather, generator, keep):
    """One PSM step's loss terms: 1/2 (L_soft x 2) + 1/2 (L_hard x 2), K = 5, soft weights (z2 stands in for q_pre)."""
    offset = getattr(gather, "rank", 0) * z1.shape[0] if gather is not None else 0
    soft = dict(temperature=0.5, weighting="soft", row_offset=offset, generator=generator)
    hard = dict(temperature=0.5, generator=generator, gather=gather)
    return 0.5 * (psm_soft_loss(z1, z2, keep[1], **soft) + psm_soft_loss(z2, z1, keep[0], **soft)) + 0.5 * (
        psm_hard_loss(z1, z2.detach(), **hard) + psm_hard_loss(z2, z1.detach(), **hard)
    )


def loss_cases() -> dict[str, Callable]:
    """name -> f(z1, z2, gather, generator, extra) -> scalar; NT-Xent first (the reference)."""
    return {
        "nt_xent": lambda a, b, g, gen, x: nt_xent(a, b, temperature=0.5, gather=g),
        "dcl": lambda a, b, g, gen, x: dcl(a, b, temperature=0.5, tau_plus=0.1, gather=g),
        "hcl": lambda a, b, g, gen, x: hcl(a, b, temperature=0.5, tau_plus=0.1, beta=1.0, gather=g),
        "sscl(32,8)": lambda a, b, g, gen, x: sscl(
            a, b, temperature=0.5, tau_plus=0.1, beta=1.0, n_hard=32, n_synthetic=8, generator=gen, gather=g
        ),
        "psm(K=5)": lambda a, b, g, gen, x: _psm(a, b, g, gen, x["keep"]),
        "mochi(Q=16384)": lambda a, b, g, gen, x: mochi_loss(
            a, b.detach(), x["queue"], temperature=0.2, n_hard=1024, n_mix=1024, n_mix_query=512, generator=gen
        ),
    }


class _SimulatedGather:
    """Rank ``rank`` of ``world`` in one process: the other ranks' rows are fixed tensors (no gradient)."""

    def __init__(self, rank: int, world: int, n_local: int, width: int, device, generator: torch.Generator):
        self.rank, self.world_size = rank, world
        self.blocks = [torch.randn(n_local, width, generator=generator, device=device) for _ in range(world)]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        parts = list(self.blocks)
        parts[self.rank] = x
        return torch.cat(parts)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _inputs(n: int, dim: int, device, seed: int):
    g = torch.Generator(device=device).manual_seed(seed)
    z1 = torch.randn(n, dim, device=device, generator=g)
    z2 = z1 + 0.5 * torch.randn(n, dim, device=device, generator=g)
    return z1.requires_grad_(True), z2.requires_grad_(True)


def _extras(n_global: int, dim: int, device) -> dict:
    g = torch.Generator(device=device).manual_seed(99)
    return {
        "keep": torch.randn(2, n_global, 6, dim, device=device, generator=g),
        "queue": torch.randn(16384, dim, device=device, generator=g),
    }


def _step(fn, z1, z2, gather, extra, device) -> None:
    gen = torch.Generator(device=device).manual_seed(0)
    fn(z1, z2, gather, gen, extra).backward()
    z1.grad = z2.grad = None


def measure_times(fns: dict[str, Callable], n: int, dim: int, repeats: int, device) -> dict[str, float]:
    """Best (minimum) seconds of forward+backward per loss over ``repeats`` rounds after a warm-up.

    The rounds interleave the losses, so a load change on a shared machine hits all of them alike, and
    the minimum discards runs slowed by other processes. Within a round each loss runs once untimed
    first, so its timed run never pays for the allocator state another loss left behind.
    """
    z1, z2 = _inputs(n, dim, device, 0)
    extra = _extras(n, dim, device)
    for fn in fns.values():
        _step(fn, z1, z2, None, extra, device)
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _step(fn, z1, z2, None, extra, device)
            _sync(device)
            start = time.perf_counter()
            _step(fn, z1, z2, None, extra, device)
            _sync(device)
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def measure_memory(fn, n: int, dim: int, device, gather=None, extra=None) -> int:
    """Bytes: CUDA peak above the inputs during forward+backward, else bytes saved by autograd for backward."""
    z1, z2 = _inputs(n, dim, device, 1)
    extra = extra if extra is not None else _extras(n, dim, device)
    gen = torch.Generator(device=device).manual_seed(0)
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn(z1, z2, gather, gen, extra).backward()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    seen: dict[tuple, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        seen[(storage.data_ptr(), t.device.type)] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn(z1, z2, gather, gen, extra)
    loss.backward()
    return sum(seen.values())


def memory_method(device: torch.device) -> str:
    if device.type == "cuda":
        return "peak CUDA memory allocated during forward+backward (torch.cuda.max_memory_allocated)"
    return "bytes of tensors saved for backward (torch.autograd.graph.saved_tensors_hooks), storages counted once"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hardneg bench losses", description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="256,1024,4096", help="global batch sizes B, comma-separated")
    p.add_argument("--dim", type=int, default=128, help="embedding dimension d")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per size (the minimum is reported)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    p.add_argument("--workers", type=int, default=8, help="simulated workers for the per-worker memory table")
    p.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test (B = 32, 64; d = 16; 1 repeat)")
    return p


def main(argv: list[str]) -> int:
    """Long on purpose: its argparse declarations and the report's tables, in the order they print."""
    args = _parser().parse_args(argv)
    if args.quick:
        args.sizes, args.dim, args.repeats = "32,64", 16, 1
    sizes = [int(s) for s in str(args.sizes).split(",") if s.strip()]
    if not sizes or any(b < 2 for b in sizes) or args.dim < 1 or args.repeats < 1 or args.workers < 1:
        print("hardneg bench losses: --sizes need B >= 2, --dim, --repeats and --workers >= 1")
        return 2
    if any(b % args.workers for b in sizes):
        print(f"hardneg bench losses: every size must divide by --workers={args.workers}; got {sizes}")
        return 2
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    cases = loss_cases()
    print(
        f"# hardneg bench losses: device={device} ({torch.get_num_threads()} CPU threads), d={args.dim}, "
        f"best of {args.repeats} interleaved forward+backward runs after a warm-up"
    )
    print(f"# memory: {memory_method(device)}")
    print(
        "# psm(K=5): 2 L_soft over B(K+1) key columns + 2 L_hard, as one PSM step (bank lookup excluded); "
        "mochi(Q=16384): queue logits + 1024 + 512 mixes per query (N = 1024), no in-batch negatives"
    )
    print(
        "# goals: "
        + ", ".join(f"{k} <= {v[1]}x nt_xent {v[0]}" for k, v in GOALS.items())
        + f"; per-worker memory {PER_WORKER_GOAL} of the replicated layout"
    )
    print(f"\n{'B':>6} {'loss':<16} {'time ms':>10} {'time/ntx':>9} {'mem MiB':>10} {'mem/ntx':>8}  goal")
    for b in sizes:
        times = measure_times(cases, b, args.dim, args.repeats, device)
        mems = {name: measure_memory(fn, b, args.dim, device) for name, fn in cases.items()}
        ref_t, ref_m = times["nt_xent"], mems["nt_xent"]
        for name in cases:
            t, m = times[name], mems[name]
            goal = GOALS.get(name)
            verdict = ""
            if goal:
                verdict = f"time <= {goal[1]}x: {'met' if t / ref_t <= goal[1] else 'NOT met'}"
            print(
                f"{b:>6} {name:<16} {t * 1e3:>10.2f} {t / ref_t:>8.2f}x {m / 2**20:>10.1f} "
                f"{m / max(ref_m, 1):>7.2f}x  {verdict}",
                flush=True,
            )
    w = args.workers
    print(
        f"\n# per-worker memory, simulated {w} workers: rank 0 (B/{w} anchor pairs x 2B gathered columns) "
        f"vs replicated (2B x 2B on every worker); goal {PER_WORKER_GOAL} = {1 / w:.3f}"
    )
    print(f"{'B':>6} {'loss':<16} {'local MiB':>10} {'replic. MiB':>12} {'ratio':>7}  goal")
    for b in sizes:
        for name in ("nt_xent", "hcl", "sscl(32,8)"):
            fn = cases[name]
            gather = _SimulatedGather(0, w, b // w, 2 * args.dim, device, torch.Generator(device=device).manual_seed(5))
            local = measure_memory(fn, b // w, args.dim, device, gather=gather, extra={})
            full = measure_memory(fn, b, args.dim, device, extra={})
            ratio = local / max(full, 1)
            print(
                f"{b:>6} {name:<16} {local / 2**20:>10.2f} {full / 2**20:>12.2f} {ratio:>7.3f}  "
                f"~{1 / w:.3f}: {'met' if ratio <= 1.5 / w else 'NOT met'}",
                flush=True,
            )
    return 0
