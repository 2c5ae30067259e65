"""Local parallelism for prep: a process pool mapped over jobs (Ray's version lives in cluster/prep.py).

A mapper is ``mapper(fn, context, jobs)``: it yields ``fn(context, job)`` for every job, in any order.
The ``context`` (the opened source: an on-disk file listing, or arrays) reaches each worker once --
inherited by forked workers, sent once per worker otherwise -- never once per job.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from typing import Callable, Iterator

from data_prep.errors import HardnegError

Mapper = Callable[[Callable, object, list], Iterator]
_CONTEXT: list = [None]  # this worker process's context


def _context():
    """fork where there is one: workers inherit the opened source (CIFAR's arrays) without a copy."""
    return multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)


def _set_context(context) -> None:
    _CONTEXT[0] = context


def _call(fn: Callable, job):
    return fn(_CONTEXT[0], job)


def _pool(workers: int, context) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(
        max_workers=workers, mp_context=_context(), initializer=_set_context, initargs=(context,)
    )


def local_mapper(workers: int) -> Mapper:
    """Run jobs in this process (workers <= 1) or a pool of ``workers`` processes."""
    return partial(_map_local, workers=workers)


def _map_local(fn: Callable, context, jobs: list, workers: int) -> Iterator:
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            yield fn(context, job)
        return
    with _pool(workers, context) as pool:
        futures = [pool.submit(_call, fn, job) for job in jobs]
        try:
            pending = set(futures)
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    yield future.result()
        except BrokenProcessPool:
            raise HardnegError("a worker process died (out of memory?); rerun the same command to resume") from None
        finally:
            for future in futures:
                future.cancel()


def ordered_chunks(fn: Callable, context, chunks: list, workers: int) -> Iterator:
    """``fn(context, chunk)`` for each chunk, in order, at most 2 x workers chunks in flight (bounded memory)."""
    if workers <= 1:
        for chunk in chunks:
            yield fn(context, chunk)
        return
    with _pool(workers, context) as pool:
        window: list = []
        try:
            for chunk in chunks:
                window.append(pool.submit(_call, fn, chunk))
                if len(window) >= 2 * workers:
                    yield window.pop(0).result()
            while window:
                yield window.pop(0).result()
        except BrokenProcessPool:
            raise HardnegError("a worker process died (out of memory?); rerun the same command to resume") from None
        finally:
            for future in window:
                future.cancel()
