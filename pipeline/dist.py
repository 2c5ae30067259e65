"""The only module that imports torch.distributed: process context, gathers with gradient, DDP wrap.

Everything here is the identity on a single process (not initialised, or world size 1), so the same
training code runs as one CPU process, under torchrun, or inside a Ray Train worker.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: global rank, world size, rank on its node, and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on global rank 0 (the process that logs and writes checkpoints)."""
        return self.rank == 0


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def _world() -> tuple[int, int]:
    """(rank, world_size) of the default group, or (0, 1) when there is none."""
    if _initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def current_context(device: torch.device | str | None = None) -> DistContext:
    """The context of this process: from torch.distributed if initialised, else rank 0 of world 1.

    local_rank comes from the LOCAL_RANK environment variable (set by torchrun and Ray Train), else
    it is the global rank (single-node launch). device defaults to CPU.
    """
    rank, world_size = _world()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    dev = torch.device(device) if device is not None else torch.device("cpu")
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def init_process_group(
    backend: str, init_method: str, rank: int, world_size: int, *, timeout_s: float | None = None
) -> DistContext:
    """Join the default process group (e.g. backend="gloo", init_method="tcp://127.0.0.1:PORT").

    timeout_s bounds rendezvous and every collective (torch's default, 10-30 min, when None).
    """
    if world_size < 1:
        raise ValueError(f"world_size={world_size}; expected an integer >= 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank}; expected 0 <= rank < world_size={world_size}")
    if _initialized():
        raise RuntimeError("init_process_group: the default process group is already initialised")
    timeout = None if timeout_s is None else timedelta(seconds=timeout_s)
    dist.init_process_group(backend=backend, init_method=init_method, rank=rank, world_size=world_size, timeout=timeout)
    device = None
    if backend == "nccl":
        local_rank = int(os.environ.get("LOCAL_RANK", rank)) % max(torch.cuda.device_count(), 1)
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    return current_context(device)


def destroy_process_group() -> None:
    """Leave the default process group; a no-op when none is initialised."""
    if _initialized():
        dist.destroy_process_group()


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sum-reduces the gathered gradient and returns this rank's slice.

    Rank r's loss L_r reads every rank's rows, so d(sum_r L_r)/dx_rank = sum_r dL_r/d gathered[slice].
    DDP then divides parameter gradients by W, which gives the gradient of mean_r L_r: exactly the
    single-process loss on the concatenated batch.
    """

    @staticmethod
    def forward(ctx, x: Tensor, rank: int, world_size: int) -> Tensor:
        x = x.contiguous()
        ctx.rank, ctx.n = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(parts, x)
        return torch.cat(parts, dim=0)  # (world_size * n, ...)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        grad = torch.clone(grad, memory_format=torch.contiguous_format)  # never reduce in place
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n], None, None


def _check_equal_shapes(x: Tensor, world_size: int) -> None:
    """Raise ValueError (on every rank alike) unless all ranks hold tensors of the same shape."""
    if x.dim() == 0:
        raise ValueError("gather: expected a tensor with a leading batch dimension; got a scalar")
    rest = 1
    for size in x.shape[1:]:
        rest *= int(size)
    mine = torch.tensor([x.dim(), x.shape[0], rest], dtype=torch.long, device=x.device)
    parts = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(parts, mine)
    shapes = [tuple(int(v) for v in p.tolist()) for p in parts]
    if any(s != shapes[0] for s in shapes):
        sizes = [s[1] for s in shapes]
        raise ValueError(
            f"gather needs equal local tensors on every rank; got leading sizes per rank {sizes} "
            f"(ndim, size, elements per row) = {shapes}"
        )


class Gather:
    """The gather the losses take: x (n_local, ...) -> (world_size * n_local, ...) in rank order, with gradient.

    The identity on one process. On W ranks it is one all_gather (backward: one all_reduce). Local shapes are
    compared across ranks once per distinct shape (an extra all_gather and a host sync, on the first step only):
    the loaders give every rank equal batches, so the first check covers the run.
    """

    def __init__(self, rank: int = 0, world_size: int = 1):
        self.rank, self.world_size = rank, world_size
        self._checked: set[tuple[int, ...]] = set()

    def __call__(self, x: Tensor) -> Tensor:
        if self.world_size == 1:
            return x
        if not _initialized():
            raise RuntimeError("Gather: torch.distributed is not initialised")
        if tuple(x.shape) not in self._checked:
            _check_equal_shapes(x, self.world_size)
            self._checked.add(tuple(x.shape))
        return _AllGatherWithGrad.apply(x, self.rank, self.world_size)

    def __repr__(self) -> str:
        return f"Gather(rank={self.rank}, world_size={self.world_size})"


def all_reduce_mean(x: Tensor) -> Tensor:
    """A new detached tensor holding the mean of x over ranks (x's value on one process)."""
    _, world_size = _world()
    y = x.detach().clone()
    if world_size > 1:
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y / world_size


def all_reduce_mean_named(values: dict[str, Tensor], device: torch.device) -> dict[str, float]:
    """The mean over ranks of each named scalar, in one collective: a dict in, a dict out (same keys).

    Every rank must pass the same names; the values are reduced in float64, in sorted-name order.
    """
    names = sorted(values)
    stacked = torch.stack([values[k].detach().reshape(()).to(device=device, dtype=torch.float64) for k in names])
    return dict(zip(names, all_reduce_mean(stacked).tolist(), strict=True))


def average_gradients_(module: nn.Module) -> None:
    """Replace every parameter gradient by its mean over ranks, in one collective per dtype (what DDP's
    reducer does for one backward); a no-op on one process. The chunked step calls it once per step."""
    _, world_size = _world()
    if world_size == 1:
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    for dtype in sorted({g.dtype for g in grads}, key=str):
        same = [g for g in grads if g.dtype == dtype]
        flat = torch.cat([g.reshape(-1) for g in same])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world_size
        offset = 0
        for g in same:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def barrier() -> None:
    """Wait for every rank; a no-op on one process."""
    if _world()[1] > 1:
        dist.barrier()


def wrap_ddp(model: nn.Module, ctx: DistContext) -> nn.Module:
    """DistributedDataParallel(model) when ctx.world_size > 1, else the model unchanged."""
    if ctx.world_size == 1:
        return model
    device_ids = [ctx.device] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def make_gather(ctx: DistContext) -> Gather:
    """The gather to inject into the losses for this process (the identity on one process)."""
    return Gather(ctx.rank, ctx.world_size)
