"""The trained encoder outside hardneg: its weights as safetensors plus a JSON of how to build it, and its
features of a prepared split (what one does next with a self-supervised encoder).

The export holds no code and no pickle: ``encoder.safetensors`` is the backbone's plain state dict (the
keys of a torchvision ResNet without ``fc``) and ``encoder.json`` names the architecture, the input it
expects (size, normalisation) and, as text to read or copy, the torchvision (ResNets) or timm (ViTs) lines
that build the module.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import numpy as np
import torch

from data_prep.atomic import atomic_dir, atomic_path, write_json_atomic
from data_prep.manifest import read_manifest
from pipeline import augment, console, data
from pipeline.backbones import BACKBONES, build_code, vit_patch_size
from pipeline.errors import HardnegError
from pipeline.evaluate import encoder_from_checkpoint
from pipeline.features import extract_features

WEIGHTS_FILE = "encoder.safetensors"
SPEC_FILE = "encoder.json"
SPEC_FORMAT = "hardneg-encoder/1"


def encoder_spec(cfg, state: dict, feat_dim: int) -> dict:
    """The JSON that says how to build and feed the exported backbone."""
    m, a = cfg.model, cfg.augment
    size = cfg.eval.eval_image_size or a.image_size
    family = BACKBONES[m.backbone].family
    own = {k: getattr(m, k) for k in BACKBONES[m.backbone].keys}
    if family == "vit":
        own["patch_size"] = vit_patch_size(m, a.image_size)
    return {
        "format": SPEC_FORMAT,
        "architecture": f"{'timm' if family == 'vit' else 'torchvision'} {m.backbone} without its head",
        "backbone": m.backbone,
        "family": family,
        **own,
        "feature_dim": feat_dim,
        "input": {
            "shape": ["N", 3, size, size],
            "dtype": "float32",
            "transform": f"resize to {size}x{size}, scale to [0, 1], then normalise with mean and std",
            "mean": list(a.mean),
            "std": list(a.std),
        },
        "weights": WEIGHTS_FILE,
        "build_code": build_code(m, a.image_size),
        "trained": {
            "method": cfg.loss.name,
            "step": state["step"],
            "run": cfg.tracking.run_name,
            "dataset": cfg.data.path,
        },
    }


def export_encoder(checkpoint_path: str, out: str) -> dict:
    """Write ``out``/encoder.safetensors (the backbone's state dict) and ``out``/encoder.json; returns the spec."""
    from safetensors.torch import save_file

    if "://" in out:
        raise HardnegError(f"hardneg export writes a local folder; got {out}")
    _check_replaceable(out, SPEC_FILE)
    backbone, cfg, state = encoder_from_checkpoint(checkpoint_path)
    spec = encoder_spec(cfg, state, _feature_dim(backbone, cfg))
    weights = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    with atomic_dir(out, replace=True) as tmp:  # a folder appears whole: weights and spec together
        os.makedirs(tmp)
        save_file(weights, os.path.join(tmp, WEIGHTS_FILE), metadata={"format": SPEC_FORMAT})
        write_json_atomic(os.path.join(tmp, SPEC_FILE), spec, indent=2)
    return spec


def _check_replaceable(out: str, marker: str) -> None:
    """``out`` may be written whole (and replaced): absent, empty, or an earlier output holding ``marker``."""
    if os.path.isfile(out):
        raise HardnegError(f"cannot write to {out}: it is a file, not a folder (a .parquet path for embed)")
    if os.path.isdir(out) and os.listdir(out) and not os.path.exists(os.path.join(out, marker)):
        raise HardnegError(f"refusing to replace {out}: it holds other files (give a new or empty folder)")


def _feature_dim(backbone: torch.nn.Module, cfg) -> int:
    size = cfg.eval.eval_image_size or cfg.augment.image_size
    was = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            return int(backbone(torch.zeros(1, 3, size, size)).shape[1])
    finally:
        backbone.train(was)


def embed_split(
    checkpoint_path: str, data_path: str, out: str, split: Optional[str] = None, batch_size: Optional[int] = None
) -> dict:
    """Features (n, d) and labels (n,) of ``split`` of prepared data, written to ``out``: a ``.parquet`` file
    (columns label, feature) or a folder of features.npy + labels.npy; returns a summary."""
    if "://" in out:
        raise HardnegError(f"hardneg embed writes a local file or folder; got {out}")
    if not out.endswith(".parquet"):
        _check_replaceable(out, "features.npy")  # before minutes of feature extraction
    backbone, cfg, state = encoder_from_checkpoint(checkpoint_path)
    split = split or cfg.data.eval_split
    splits = read_manifest(data_path)["splits"]
    if split not in splits:
        raise HardnegError(f"split '{split}' not in {data_path}; it has: {', '.join(splits)}")
    total = int(splits[split]["num_samples"])
    transform = augment.eval_transform(cfg.augment, cfg.eval.eval_image_size)
    batches = data.eval_batches(data_path, split, transform, batch_size or cfg.eval.batch_size)
    with console.stage_bar(f"embed {split}", total) as bar:  # the bar hardneg eval shows
        features, labels = extract_features(backbone, console.counted(batches, bar))
    feats, ys = features.numpy().astype(np.float32), labels.numpy().astype(np.int64)
    if out.endswith(".parquet"):
        _write_parquet(out, feats, ys)
    else:
        with atomic_dir(out, replace=True) as tmp:
            os.makedirs(tmp)
            np.save(os.path.join(tmp, "features.npy"), feats)
            np.save(os.path.join(tmp, "labels.npy"), ys)
    return {
        "out": out,
        "split": split,
        "samples": int(len(ys)),
        "feature_dim": int(feats.shape[1]) if feats.ndim == 2 else 0,
        "checkpoint_step": state["step"],
        "batches": math.ceil(total / (batch_size or cfg.eval.batch_size)),
    }


def _write_parquet(out: str, feats: np.ndarray, labels: np.ndarray) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(directory):
        raise HardnegError(f"cannot write {out}: folder {directory} does not exist")
    dim = feats.shape[1]
    column = pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1), type=pa.float32()), dim)
    table = pa.table({"label": pa.array(labels, type=pa.int64()), "feature": column})
    with atomic_path(out) as tmp:
        pq.write_table(table, tmp)
