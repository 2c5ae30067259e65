"""Ray Train launcher: TorchTrainer around the one training function, pipeline.train.run.

The only code besides cluster/ that knows Ray exists is none: this module turns a resolved config
into ScalingConfig/RunConfig/FailureConfig, starts a private local Ray instance when no cluster
address is configured, and adapts Ray's checkpoint API to pipeline.train's Hooks.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer

from pipeline import checkpoint, dist, train
from pipeline.config import Config, from_dict, to_dict
from pipeline.errors import HardnegError


class RayHooks:
    """Hooks for a Ray Train worker: restore from get_checkpoint(), report through ray.train.report."""

    def restore(self) -> Optional[dict]:
        found = ray.train.get_checkpoint()
        if found is None:
            return None
        with found.as_directory() as directory:
            return checkpoint.load(directory)

    def report(self, metrics: dict, checkpoint_dir: Optional[str]) -> None:
        saved = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=saved)


def _worker_loop(loop_config: dict) -> None:
    """Entry point of every Ray Train worker: rebuild the config, then run the shared loop."""
    cfg = from_dict(loop_config["config"])
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # one line per report is noise
    device = ray.train.torch.get_device() if cfg.cluster.use_gpu else torch.device("cpu")
    train.run(cfg, dist.current_context(device), RayHooks())


def _start_ray(cfg: Config) -> bool:
    """Connect to cfg.cluster.address, or start a private local instance; True if we started it."""
    if ray.is_initialized():
        return False
    if cfg.cluster.address:
        try:
            ray.init(address=cfg.cluster.address, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise HardnegError(f"cannot reach Ray at cluster.address={cfg.cluster.address}: {e}") from None
        return False
    needed = cfg.cluster.num_workers * cfg.cluster.cpus_per_worker
    ray.init(
        num_cpus=max(needed, os.cpu_count() or 1),
        # the dashboard serves the State API that Ray Train's placement-group cleaner polls
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        logging_level=logging.WARNING,
        _temp_dir=os.environ.get("HARDNEG_RAY_TMP") or None,
    )
    return True


def _check_resources(cfg: Config) -> None:
    available = ray.cluster_resources()
    kind = "GPU" if cfg.cluster.use_gpu else "CPU"
    per_worker = 1 if cfg.cluster.use_gpu else cfg.cluster.cpus_per_worker
    need = cfg.cluster.num_workers * per_worker
    have = available.get(kind, 0)
    if need > have:
        raise HardnegError(
            f"cluster.num_workers={cfg.cluster.num_workers} needs {need:g} {kind}s; the Ray cluster has {have:g}"
        )


def launch(cfg: Config, run_name: str) -> dict:
    """Run training on Ray Train workers; returns the final metrics reported by rank 0 + the checkpoint path."""
    started = _start_ray(cfg)
    try:
        _check_resources(cfg)
        resources = {"CPU": cfg.cluster.cpus_per_worker}
        trainer = TorchTrainer(
            _worker_loop,
            train_loop_config={"config": to_dict(cfg)},
            scaling_config=ray.train.ScalingConfig(
                num_workers=cfg.cluster.num_workers, use_gpu=cfg.cluster.use_gpu, resources_per_worker=resources
            ),
            run_config=ray.train.RunConfig(
                name=run_name,
                storage_path=cfg.cluster.storage_path,
                failure_config=ray.train.FailureConfig(max_failures=cfg.cluster.max_failures),
            ),
        )
        result = trainer.fit()
        metrics = dict(result.metrics or {})
        metrics["checkpoint"] = result.checkpoint.path if result.checkpoint else None
        return metrics
    finally:
        if started:
            ray.shutdown()
