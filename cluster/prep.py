"""Ray tasks mapping the shard writer over shard specs: `hardneg prep ... --ray ADDRESS`.

The only prep code that knows Ray exists. One task per shard; results come back as tasks finish.
The opened source goes into the object store once and is fetched once per worker process.
OUT (and the source PATH) must be reachable from every node: an object store or a shared filesystem.
"""

from __future__ import annotations

from typing import Callable, Iterator

from pipeline.errors import HardnegError

_CONTEXTS: dict = {}  # object ref hex -> context, per Ray worker process


def _connect(address: str) -> None:
    import ray

    from cluster.connect import init_ray

    if ray.is_initialized():
        return
    try:
        init_ray(address=address, log_to_driver=False, include_dashboard=False)
    except Exception as e:  # noqa: BLE001 -- ConnectionError, a bad address, a version mismatch
        msg = str(e).splitlines()[0] if str(e) else ""
        raise HardnegError(f"cannot reach Ray at '{address}': {type(e).__name__}: {msg}") from None


def _run(fn: Callable, boxed_ref: list, job):
    """The task: ``fn(context, job)``, the context fetched from the object store once per process."""
    import ray

    ref = boxed_ref[0]  # boxed, so Ray does not fetch it for every task
    key = ref.hex()
    if key not in _CONTEXTS:
        _CONTEXTS.clear()
        _CONTEXTS[key] = ray.get(ref)
    return fn(_CONTEXTS[key], job)


def map_on_ray(fn: Callable, context, jobs: list, address: str, max_in_flight: int = 256) -> Iterator:
    """``fn(context, job)`` for every job as one Ray task each; results in completion order."""
    import ray

    _connect(address)
    ref = ray.put(context)
    task = ray.remote(num_cpus=1, max_retries=2)(_run)
    pending, todo = [], list(jobs)
    while todo or pending:
        while todo and len(pending) < max_in_flight:
            pending.append(task.remote(fn, [ref], todo.pop(0)))
        done, pending = ray.wait(pending, num_returns=1)
        try:
            yield ray.get(done[0])
        except ray.exceptions.RayTaskError as e:
            cause = e.cause if getattr(e, "cause", None) is not None else e
            if isinstance(cause, HardnegError):
                raise HardnegError(str(cause)) from None
            raise HardnegError(f"a prep task failed: {type(cause).__name__}: {str(cause).splitlines()[0]}") from None


def ray_mapper(address: str) -> Callable[[Callable, object, list], Iterator]:
    """The mapper `data_prep.prep.prepare` takes: one Ray task per shard on the cluster at ``address``."""
    return lambda fn, context, jobs: map_on_ray(fn, context, jobs, address)
