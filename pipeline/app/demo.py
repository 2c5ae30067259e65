"""The demo job: prep builtin:digits, pretrain, evaluate, and compare with two baselines."""

from __future__ import annotations

import os
import time

from data_prep.manifest import read_manifest, verify
from data_prep.prep import prepare
from pipeline import config as config_mod
from pipeline.app.train_command import train_run
from pipeline.backbones import BACKBONES
from pipeline.evaluate import evaluate_checkpoint, random_init_knn, raw_pixel_knn
from pipeline.tracking_store import ui_command


def _shards(out: str) -> str:
    """Prepared digits shards under ``out``; reused when they exist and verify."""
    shards = os.path.join(out, "shards")
    if os.path.exists(os.path.join(shards, "manifest.json")) and not verify(shards):
        print(f"[demo] reusing verified shards in {shards}")
    else:
        manifest = prepare("builtin:digits", shards)
        print(f"[demo] wrote {sum(len(s['shards']) for s in manifest['splits'].values())} shards to {shards}")
    return shards


def run_demo(config_path: str, out: str, overrides=()) -> dict:
    """prep + train + eval on builtin:digits; prints and returns kNN top-1 of trained vs baselines."""
    start = time.perf_counter()
    out = os.path.abspath(out)
    shards = _shards(out)
    cfg = config_mod.load(
        config_path,
        [
            f"data.path={shards}",
            f"cluster.storage_path={os.path.join(out, 'runs')}",
            f"tracking.uri=sqlite:///{os.path.join(out, 'mlflow.db')}",
            *overrides,
        ],
    )
    print(
        f"[demo] training {cfg.model.backbone} "
        f"({', '.join(f'{k} {getattr(cfg.model, k)}' for k in BACKBONES[cfg.model.backbone].keys)}) with {cfg.loss.label()} "
        f"for {cfg.train.epochs} epochs on {cfg.world_size} {cfg.cluster.launcher} worker(s)",
        flush=True,
    )
    result = train_run(cfg)
    # --track: the test-split figure printed below goes into the run too (eval/knn_top1_checkpoint)
    trained = evaluate_checkpoint(result["checkpoint"], shards, track=True)["knn_top1"]
    random_init = random_init_knn(cfg, shards)
    pixels = raw_pixel_knn(
        shards, cfg.data.train_split, cfg.data.eval_split, k=cfg.eval.knn_k, temperature=cfg.eval.knn_temperature
    )
    n_test = read_manifest(shards)["splits"][cfg.data.eval_split]["num_samples"]
    print(
        f"\nkNN top-1 on the builtin:digits {cfg.data.eval_split} split ({n_test} images, "
        f"k={cfg.eval.knn_k}, T={cfg.eval.knn_temperature}):"
    )
    print(f"  trained encoder ({cfg.loss.label()})  {trained:.4f}")
    print(f"  same network, random init  {random_init:.4f}")
    print(f"  raw pixels                 {pixels:.4f}")
    print(f"MLflow run id: {result.get('mlflow_run_id')}")
    print(f"open the UI:  {ui_command(result['tracking_uri'])}")
    print(f"demo wall time: {time.perf_counter() - start:.0f} s")
    return {"trained": trained, "random_init": random_init, "raw_pixels": pixels, **result}
