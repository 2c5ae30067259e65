"""What a long run meets, as inputs the step loop handles: bad samples, non-finite steps, a stop request.

Every decision that ends or changes a step is taken identically on every rank: the counts reach the
loop through the one all-reduce at log steps (see train.run), and a skipped step is agreed on with a
one-element all-reduce, so no rank waits in a collective the others have left.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Optional

import fsspec
import torch

from pipeline import dist
from pipeline.errors import HardnegError

SKIP_WARMUP_SAMPLES = 500  # the skip budget applies once this many samples were read (all ranks)


def check_skip_budget(
    skipped: float, read: float, max_fraction: float, worst: tuple[Optional[str], int], data_path: str
) -> None:
    """HardnegError naming the worst shard when ``skipped`` of ``read`` samples exceed the budget."""
    if read < SKIP_WARMUP_SAMPLES or skipped <= max_fraction * read:
        return
    url, count = worst
    where = f"worst shard {url} ({count} skipped on this rank)" if url else "the bad shards were read by another rank"
    raise HardnegError(
        f"bad samples: {int(skipped)} of {int(read)} read ({skipped / read:.2%}) exceed "
        f"data.max_skip_fraction={max_fraction:g}; {where}; check the data with "
        f"`hardneg prep verify {data_path}`"
    )


def grad_norm(params) -> torch.Tensor:
    """The global 2-norm of the gradients (0-dim, on their device; no host sync)."""
    return grad_norm_of([p.grad for p in params if p.grad is not None])


def grad_norm_of(tensors: list) -> torch.Tensor:
    """The global 2-norm of ``tensors`` (0-dim; no host sync)."""
    if not tensors:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors)))


class NonfiniteGuard:
    """Watches the loss and gradient norm of every step for NaN/inf (train.on_nonfinite).

    ``stop``: flags are kept on the device (no per-step host sync) and read at log steps and before
    every checkpoint, so a bad step never reaches a checkpoint. ``skip``: the step's verdict is read on
    the host (one sync per step, agreed over ranks) so its update, buffer changes and momentum step can
    be dropped; train.max_nonfinite_steps bad steps in a row end the run.
    """

    def __init__(
        self, mode: str, max_in_row: int, module: torch.nn.Module, device: torch.device, done: int, count: int = 0
    ):
        self.mode, self.max_in_row, self.module = mode, max_in_row, module
        self.seen = torch.zeros((), dtype=torch.bool, device=device)
        self.first = torch.zeros((), dtype=torch.long, device=device)
        self.counter = torch.full((), done, dtype=torch.long, device=device)  # the step number (1-based) on device
        self.count, self.in_row = count, 0  # skip mode: steps dropped (cumulative, resumed), and in a row
        self._saved: list[torch.Tensor] = []

    def before_step(self) -> None:
        """Skip mode: keep the buffers (BatchNorm statistics, queues) the forward pass may change."""
        self.counter += 1
        if self.mode == "skip":
            self._saved = [b.detach().clone() for b in self.module.buffers()]

    def finite(self, loss: torch.Tensor) -> torch.Tensor:
        """0-dim bool on the device: this step's loss and gradient norm are finite; noted for ``stop``."""
        ok = torch.isfinite(loss.detach()) & torch.isfinite(grad_norm(self.module.parameters()))
        self.first = torch.where(~self.seen & ~ok, self.counter, self.first)
        self.seen |= ~ok
        return ok

    def apply_update(self, ok: torch.Tensor, lr: float, step: int, last_checkpoint: str) -> bool:
        """Skip mode: whether to apply this step (else buffers are restored); stop mode: always True."""
        if self.mode != "skip":
            return True
        if float(dist.all_reduce_mean(ok.float())) == 1.0:  # the one host sync per step of skip mode
            self.in_row = 0
            return True
        for buffer, saved in zip(self.module.buffers(), self._saved, strict=True):
            buffer.copy_(saved)
        self.count, self.in_row = self.count + 1, self.in_row + 1
        if self.in_row >= self.max_in_row:
            raise HardnegError(
                f"non-finite loss or gradient norm in {self.in_row} steps in a row up to step {step} "
                f"(lr {lr:.4g}; train.max_nonfinite_steps={self.max_in_row}); {last_checkpoint}"
            )
        return False

    def bad_flag(self) -> torch.Tensor:
        """1.0 when a non-finite step was seen (stop mode), as a float for the log-step all-reduce. Also checks
        the parameters and buffers themselves: a finite gradient times a huge learning rate can still overflow
        them, and BatchNorm's running statistics with them."""
        if self.mode != "stop":
            return torch.zeros((), device=self.seen.device)
        state = [t.detach() for t in (*self.module.parameters(), *self.module.buffers()) if t.is_floating_point()]
        params_ok = torch.isfinite(grad_norm_of(state))
        self.first = torch.where(~self.seen & ~params_ok, self.counter, self.first)
        self.seen |= ~params_ok
        return self.seen.float()

    def raise_if_seen(self, any_rank_bad: float, lr_of, last_checkpoint: str) -> None:
        """Stop mode: HardnegError naming the first bad step when any rank saw one."""
        if self.mode != "stop" or any_rank_bad <= 0:
            return
        step = int(self.first) if bool(self.seen) else None
        where = f"at step {step} (lr {lr_of(step - 1):.4g})" if step is not None else "on another rank"
        raise HardnegError(
            f"non-finite loss or gradient norm {where}: training stopped (train.on_nonfinite=stop; "
            f"lower optim.lr or set train.on_nonfinite=skip); {last_checkpoint}"
        )


def describe_checkpoint(step: Optional[int], run_dir: str) -> str:
    """'last good checkpoint: ...' for the one-line errors."""
    if step is None:
        return "no checkpoint was written yet"
    return f"last good checkpoint: step {step} in {run_dir} (continue with `hardneg train ... --resume`)"


STOP_FILE = "STOP_REQUESTED"


class Stopped(Exception):
    """Raised by the loop after it checkpointed for a stop request; the launcher ends the run KILLED."""

    def __init__(self, step: int):
        super().__init__(f"stopped at step {step}")
        self.step = step


def _stop_file(run_dir: str) -> tuple:
    fs, root = fsspec.core.url_to_fs(run_dir)
    return fs, f"{root.rstrip('/')}/{STOP_FILE}"


def request_stop(run_dir: str) -> None:
    """Ask the workers of the run in ``run_dir`` to checkpoint and stop at their next log step."""
    fs, path = _stop_file(run_dir)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "w") as f:
        f.write("stop\n")


def clear_stop(run_dir: str) -> None:
    """Forget a stop request (a resumed run starts without one)."""
    try:
        fs, path = _stop_file(run_dir)
        if fs.exists(path):
            fs.rm(path)
    except OSError:
        pass


class StopRequest:
    """SIGTERM (`hardneg stop`, a scheduler's preemption) during training: noted, not raised, so the loop
    checkpoints at the current step first and then ends as an interrupt. A second SIGTERM ends at once.
    Ray Train workers get no signal: their driver writes STOP_FILE into the run directory (see
    request_stop), which ``poll`` notices (at most every few seconds; read at log steps, agreed over ranks)."""

    def __init__(self, run_dir: Optional[str] = None, every_s: float = 2.0) -> None:
        self.requested = False
        self._previous = None
        self.run_dir, self.every_s, self._checked = run_dir, every_s, time.monotonic()

    def poll(self) -> bool:
        """A signal arrived, or the run directory holds a stop request."""
        if not self.requested and self.run_dir and time.monotonic() - self._checked >= self.every_s:
            self._checked = time.monotonic()
            try:
                fs, path = _stop_file(self.run_dir)
                self.requested = fs.exists(path)
            except OSError:
                pass
        return self.requested

    def _handler(self, signum, frame) -> None:
        if self.requested:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            raise KeyboardInterrupt(f"signal {signum}")
        self.requested = True

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
