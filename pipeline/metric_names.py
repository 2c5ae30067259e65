"""The names metrics carry in MLflow: grouped by a ``group/`` prefix, each with its meaning and how to read it.

Training code keeps short internal keys (``loss``, ``sim_neg_hardest`` ...); ``grouped`` renames them at the
logging edge, so MLflow's UI shows four sections: ``train/``, ``eval/``, ``negatives/``, ``perf/``
(its own ``system/`` is a fifth). ``docs/metrics.md`` holds ``markdown_table()`` (a test keeps the two equal).
Runs logged before the renaming used the internal keys; ``LEGACY`` maps a new name to its old one.
"""

from __future__ import annotations

import math
from typing import Mapping, NamedTuple, Optional

GROUPS = ("train", "eval", "negatives", "perf")  # the order of MLflow's chart sections in the docs


class MetricName(NamedTuple):
    """A logged metric: its MLflow name, what it measures, how to read it."""

    name: str
    meaning: str
    reading: str


# internal key -> MetricName; a key mapped to None is not logged (it says nothing a reader can use)
METRICS: dict[str, Optional[MetricName]] = {
    "loss": MetricName(
        "train/loss",
        "training loss of the method, mean over the steps since the last log and over ranks",
        "falls fast, then slowly; not comparable across methods or temperatures",
    ),
    "lr": MetricName(
        "train/lr",
        "learning rate at the logged step (linear warm-up, then cosine)",
        "the schedule; check warm-up length and the final value",
    ),
    "knn_top1": MetricName(
        "eval/knn_top1",
        "weighted kNN top-1 of the frozen backbone: eval split queried against the train split's features",
        "the main quality signal; rises with training",
    ),
    "knn_top1_best": MetricName(
        "eval/knn_top1_best",
        "best eval/knn_top1 so far in this run (what chose checkpoints/best)",
        "flat where a later epoch did not beat an earlier one",
    ),
    "linear_top1": MetricName(
        "eval/probe_top1",
        "linear-probe top-1 on frozen features (`hardneg eval --protocol linear|all --track`)",
        "the papers' headline number; a few points above kNN is usual",
    ),
    "eval_knn_top1": MetricName(
        "eval/knn_top1_checkpoint",
        "kNN top-1 of a checkpoint evaluated afterwards (`hardneg eval --track`), at the checkpoint's step",
        "equals eval/knn_top1 at that step when the settings are the same",
    ),
    "sim_pos_mean": MetricName(
        "negatives/cos_positive_mean",
        "mean cosine of each anchor with its positive (the other view)",
        "rises towards 1 as views align; near 1 from the start: the augmentations are too weak",
    ),
    "sim_pos_max": None,  # always ~1: one easy pair in every batch
    "sim_neg_mean": MetricName(
        "negatives/cos_negative_mean",
        "mean cosine of an anchor with its (real) negatives",
        "near 0 when the embedding spreads over the sphere; rising: collapse",
    ),
    "sim_neg_max": MetricName(
        "negatives/cos_negative_max",
        "largest anchor-negative cosine in the batch (mean of the per-rank maxima)",
        "near 1: some negative is a near-duplicate or same-class image",
    ),
    "sim_neg_hardest": MetricName(
        "negatives/cos_hardest_negative_mean",
        "mean over anchors of the cosine with their single hardest (most similar) real negative",
        "how hard the hardest negatives are; compare with cos_positive_mean: the gap is what the loss pushes open",
    ),
    "sim_syn_mean": MetricName(
        "negatives/cos_synthetic_mean",
        "mean anchor cosine of the synthetic negatives (SSCL, MoCHi)",
        "above cos_hardest_negative_mean: the synthetic ones are harder than any real one",
    ),
    "sim_syn_max": MetricName(
        "negatives/cos_synthetic_max",
        "largest anchor cosine of a synthetic negative",
        "near 1: a mix is almost the anchor itself (MoCHi's s' query mixes)",
    ),
    "sim_mined_mean": MetricName(
        "negatives/cos_mined_positive_mean",
        "mean cosine of an anchor with its mined positives (PSM's nearest bank neighbours)",
        "between cos_negative_mean and cos_positive_mean",
    ),
    "sim_mined_max": MetricName(
        "negatives/cos_mined_positive_max",
        "largest cosine of a mined positive",
        "near 1: the bank holds near-copies of the anchor",
    ),
    "eff_negatives": MetricName(
        "negatives/hcl_effective_count",
        "exp(entropy) of the HCL importance weights "
        "softmax(beta * s / t) over an anchor's real negatives, mean over anchors",
        "equals the number of negatives at beta=0; falling towards 1: a few hardest negatives carry all the weight",
    ),
    "false_neg_rate": MetricName(
        "negatives/same_class_share_of_hardest",
        "share of same-class samples among "
        "each anchor's loss.n_hard (MoCHi: loss.mochi_n_hard) hardest negatives; labels "
        "serve this diagnostic only",
        "the false negatives tau+ debiases; about 1/classes at random init, rising as classes cluster",
    ),
    "accept_rate": MetricName(
        "negatives/psm_accept_rate",
        "share of candidate negatives PSM's acceptance rule keeps",
        "low: most candidates judged too close to the positive",
    ),
    "mined_same_class": MetricName(
        "negatives/mined_positive_same_class_share",
        "share of PSM's mined positives that have the anchor's class",
        "the mining's precision; higher is better",
    ),
    "images_per_s": MetricName(
        "perf/images_per_s",
        "training throughput over the steps since the last log, all ranks",
        "dips at evaluation and checkpoint steps are expected",
    ),
    "train_seconds": MetricName(
        "perf/train_seconds",
        "seconds the run has spent in its step loop so far, over all its attempts (rank 0's clock)",
        "what `hardneg runs` shows as train time: a resume's idle gap and a later `hardneg eval --track` are not in it",
    ),
    "chunks_per_step": MetricName(
        "perf/chunks_per_step",
        "forward passes per optimizer step on each worker: per-worker batch / train.chunk_size (1: the plain step)",
        "doubles when an elastic restart halves the workers: the global batch and the chunk stay as they were",
    ),
    "peak_memory_mib": MetricName(
        "perf/peak_memory_mib",
        "rank 0's peak memory: on a GPU the most allocated in one log window, on CPU the process's peak resident set",
        "flat with train.chunk_size set, whatever the global batch or the worker count",
    ),
    "data_wait_share": MetricName(
        "perf/data_wait_share",
        "share of wall time the step loop waited for the next batch since the last log",
        "above ~0.05: the loader is the bottleneck (more data.loader_workers, augment.where=device, FFCV)",
    ),
}

LEGACY: dict[str, str] = {m.name: key for key, m in METRICS.items() if m is not None}


def name_of(key: str) -> Optional[str]:
    """The MLflow name of internal ``key`` (unknown keys keep their name; None: not logged)."""
    if key not in METRICS:
        return key
    entry = METRICS[key]
    return None if entry is None else entry.name


def _tidy(value: float) -> float:
    """Six significant digits: enough for any of these metrics, readable in the UI."""
    value = float(value)
    return value if not math.isfinite(value) or value == 0 else float(f"{value:.6g}")


def grouped(metrics: Mapping[str, float]) -> dict[str, float]:
    """``metrics`` under their grouped MLflow names, values to six significant digits."""
    out = {}
    for key, value in metrics.items():
        name = name_of(key)
        if name is not None:
            out[name] = _tidy(value)
    return out


def markdown_table() -> str:
    """The docs table: metric, meaning, how to read it (one row per logged metric, grouped)."""
    rows = sorted((m for m in METRICS.values() if m is not None), key=lambda m: GROUPS.index(m.name.split("/")[0]))
    lines = ["| metric | meaning | how to read it |", "|---|---|---|"]
    lines += [f"| `{m.name}` | {m.meaning} | {m.reading} |" for m in rows]
    return "\n".join(lines) + "\n"
