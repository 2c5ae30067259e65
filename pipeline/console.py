"""What the user sees: one progress line per epoch, libraries quiet unless ``--verbose``.

Ray's per-report lines, MLflow's INFO chatter and library warnings (torch.export, starlette, ...) bury the
few lines that matter, so they are off by default; ``--verbose`` (or HARDNEG_VERBOSE=1) brings them back.
Errors are unaffected: they reach the user as one ``hardneg: error:`` line either way.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from typing import Optional

from tqdm import tqdm

VERBOSE_ENV = "HARDNEG_VERBOSE"
# library loggers that speak at INFO on every run; hardneg prints what matters itself
CHATTY_LOGGERS = ("mlflow", "ray", "ray.train", "ray.tune", "ray.data", "alembic", "urllib3", "fsspec", "s3fs")


def is_verbose() -> bool:
    """Whether ``--verbose`` (or HARDNEG_VERBOSE=1) asked for the libraries' own output."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def configure(verbose: Optional[bool] = None) -> bool:
    """Quiet (or, verbose, restore) library logging and warnings in this process; the setting travels to
    subprocesses and local Ray workers through HARDNEG_VERBOSE (and PYTHONWARNINGS). Returns the setting."""
    verbose = is_verbose() if verbose is None else verbose
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    level = logging.INFO if verbose else logging.WARNING
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(level)
    # MLflow sets its logger's level from this variable when it is first imported (here or in a worker)
    os.environ["MLFLOW_LOGGING_LEVEL"] = "INFO" if verbose else "WARNING"
    # torch.export's shape-specialisation notes while logging the model are warnings about our example input
    logging.getLogger("torch._export").setLevel(logging.WARNING if verbose else logging.ERROR)
    if verbose:
        warnings.resetwarnings()
        os.environ.pop("PYTHONWARNINGS", None)
    else:
        warnings.simplefilter("ignore")
        os.environ["PYTHONWARNINGS"] = "ignore"
    return verbose


def say(message: str) -> None:
    """One line for the user on stdout (rank 0's job: the caller decides who speaks)."""
    print(message, flush=True)


def warn(message: str) -> None:
    """One ``hardneg: warning:`` line on stderr: the run goes on, but the user should know."""
    print(f"hardneg: warning: {message}", file=sys.stderr, flush=True)


def note(message: str) -> None:
    """One ``hardneg: note:`` line on stderr: how something the user gave was read."""
    print(f"hardneg: note: {message}", file=sys.stderr, flush=True)


def error(message: str) -> None:
    """The one ``hardneg: error:`` line of a command that failed (the CLI's, for a HardnegError)."""
    print(f"hardneg: error: {message}", file=sys.stderr, flush=True)


def tell(message: str) -> None:
    """One line for the user on stderr, without a prefix (a notice while stdout carries a command's output)."""
    print(message, file=sys.stderr, flush=True)


class Progress:
    """Rank 0's progress: a live bar on a terminal, and one line per epoch everywhere
    (step, loss, images/s over the epoch, ETA of the run)."""

    def __init__(self, total_steps: int, start_step: int, global_batch: int, enabled: bool) -> None:
        self.total, self.batch, self.enabled = total_steps, global_batch, enabled
        self.epoch_step, self.epoch_t = start_step, time.perf_counter()
        live = enabled and sys.stdout.isatty()
        self.bar = tqdm(
            total=total_steps, initial=start_step, disable=not live, leave=False, unit="step", dynamic_ncols=True
        )

    def step(self, loss: Optional[float] = None) -> None:
        """One optimizer step done (loss: the latest logged mean, shown on the bar)."""
        self.bar.update(1)
        if loss is not None and not self.bar.disable:
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def epoch_line(self, epoch: int, epochs: int, done: int, loss: float, extra: str = "") -> str:
        """'epoch e/E step d/T loss L [extra] | N img/s | ETA h:mm:ss', printed once per epoch."""
        now = time.perf_counter()
        steps = max(done - self.epoch_step, 1)
        per_step = max(now - self.epoch_t, 1e-9) / steps
        eta = tqdm.format_interval(per_step * (self.total - done))
        line = (
            f"epoch {epoch}/{epochs} step {done}/{self.total} loss {loss:.4f}{extra} | "
            f"{self.batch / per_step:.0f} img/s | ETA {eta}"
        )
        self.epoch_step, self.epoch_t = done, now
        if self.enabled:
            if self.bar.disable:
                print(line, flush=True)
            else:
                self.bar.write(line)
        return line

    def close(self) -> None:
        """Remove the live bar (the epoch lines stay)."""
        self.bar.close()


def stage_bar(desc: str, total: int, unit: str = "img", enabled: bool = True) -> tqdm:
    """A progress bar on stderr for one stage of a long command (hardneg eval): live on a terminal; elsewhere
    (a log file) one line naming the stage when it starts, so no carriage returns reach the file."""
    live = enabled and sys.stderr.isatty()
    if enabled and not live:
        print(f"{desc}: {total} {unit}", file=sys.stderr, flush=True)
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not live, leave=False, dynamic_ncols=True)


def counted(batches, bar: tqdm):
    """Pass (x, y) batches through, advancing ``bar`` by each batch's size."""
    for x, y in batches:
        yield x, y
        bar.update(len(y))
