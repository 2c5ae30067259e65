"""PSM, potential sample mining (Dong, Long, Li, arXiv:2311.00358; github.com/dhkdhk/PSM src/model/psm.py).

Pure pieces: the FIFO memory bank and its nearest-neighbour lookup (mined positives), the acceptance
rule for negatives "neither too hard nor too easy", and the two loss terms L_soft and L_hard (whose mean
runs over anchors, as the paper writes it, or over every anchor x negative-sum pair, as the release's
broadcast computes it: docs/methods.md).

Acceptance draws. Each negative n of anchor i is kept with probability
p = clip(exp(-a (s_in - s_i+ - b)^2), 0, 0.999), computed on cosines and not differentiated. The
uniform u compared with p is a counter-based draw u(seed, global row, global column) (SplitMix64 of
the pair's index): one seed per call comes from the injected torch.Generator (identical on every rank),
and each rank evaluates only its own rows. So every rank reproduces the single-process draws at
O(local rows x global columns) cost, with no (global rows x global columns) tensor anywhere.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import tiling
from .functional import Gather, _batch, _check_t, _columns, _rows
from .precision import full_precision

WEIGHTINGS = ("soft", "hard")
ACCEPTANCE_ON = ("cosine", "raw")
HARD_MEANS = ("anchors", "pairs")
# loss.psm_variant -> (positive weighting, what L_hard's acceptance rule reads, what L_hard averages over)
VARIANTS = {
    "release": ("hard", "raw", "pairs"),  # the release as it runs: src/model/psm.py:245,279,281 broadcast
    "release_rowwise": ("hard", "raw", "anchors"),  # the release's settings with the paper's per-anchor mean
    "paper": ("soft", "cosine", "anchors"),
}

# SplitMix64 constants as signed int64 (multiplication wraps modulo 2^64 either way)
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)


def _srl(x: Tensor, shift: int) -> Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> shift) & ((1 << (64 - shift)) - 1)


def counter_uniform(seed: int, rows: Tensor, n_cols: int) -> Tensor:
    """U[0, 1) float32 (R, n_cols): u[r, c] = SplitMix64(seed + (rows[r] * n_cols + c + 1) * golden) / 2^64.

    A pure function of (seed, global row, column): any subset of rows gives the same values it has
    in the full matrix. 24-bit resolution (exact in float32).
    """
    cols = torch.arange(1, n_cols + 1, device=rows.device, dtype=torch.int64)  # (C,)
    x = rows.to(torch.int64)[:, None] * n_cols + cols  # (R, C) the pair's counter, in place from here on
    x.mul_(_GOLDEN).add_(int(seed) & ((1 << 63) - 1))
    x.bitwise_xor_(_srl(x, 30)).mul_(_MIX1)
    x.bitwise_xor_(_srl(x, 27)).mul_(_MIX2)
    x.bitwise_xor_(_srl(x, 31))
    return _srl(x, 40).to(torch.float32).mul_(1.0 / (1 << 24))  # (R, C)


def draw_seed(generator: Optional[torch.Generator]) -> int:
    """One non-negative int64 seed from the generator (the global RNG when None)."""
    device = generator.device if generator is not None else torch.device("cpu")
    return int(torch.randint(0, 1 << 62, (1,), generator=generator, device=device).item())


def acceptance_probability(s_neg: Tensor, s_pos: Tensor, a: float, b: float) -> Tensor:
    """p = clip(exp(-a (s_neg - s_pos - b)^2), 0, 0.999): s_neg (R, C), s_pos (R,) cosines -> (R, C), no grad."""
    x = s_neg.detach() - (s_pos.detach()[:, None] + b)  # (R, C), a new tensor: the rest is in place
    return x.square_().mul_(-a).exp_().clamp_(0.0, 0.999)


@full_precision
def nearest_neighbors(keys: Tensor, bank: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k cosine neighbours in the bank: keys (n, d), bank (M, d) -> (values (n, k, d) unit, indices (n, k)).

    Sorted by decreasing similarity, as torch.topk in the release; no gradient.
    """
    if not 0 <= k <= bank.shape[0]:
        raise ValueError(f"k={k}; expected 0 <= k <= bank size {bank.shape[0]}")
    with torch.no_grad():
        unit_bank = F.normalize(bank.detach().float(), dim=1)  # (M, d)
        unit_keys = F.normalize(keys.detach().float(), dim=1)  # (n, d)
        idx = (unit_keys @ unit_bank.T).topk(k, dim=1).indices  # (n, k)
        return unit_bank[idx], idx  # (n, k, d), (n, k)


def fifo_enqueue(bank: Tensor, ptr: int, keys: Tensor) -> tuple[Tensor, int]:
    """A new bank with ``keys`` (n, ...) written at ring positions ptr, ptr+1, ... (mod M); returns (bank, ptr').

    A true ring: a batch that crosses the end wraps to the start (the lightly MemoryBankModule used by
    the release drops that remainder instead), and only the last M keys of an oversized batch are kept.
    """
    size, n = bank.shape[0], keys.shape[0]
    if not 0 <= ptr < size:
        raise ValueError(f"ptr={ptr}; expected 0 <= ptr < bank size {size}")
    if keys.shape[1:] != bank.shape[1:]:
        raise ValueError(f"keys {tuple(keys.shape)} do not fit bank {tuple(bank.shape)}")
    kept = min(n, size)
    start = (ptr + n - kept) % size
    idx = (start + torch.arange(kept, device=bank.device)) % size  # (kept,)
    new = bank.index_copy(0, idx, keys[n - kept :].detach().to(bank.dtype))
    return new, (ptr + n) % size


class SoftParts(NamedTuple):
    """L_soft and what the diagnostics read from it (local rows i, global columns c = (j, m))."""

    loss: Tensor  # scalar
    sim: Tensor  # (n, C) cosines q_i . keep_c, C = B (K + 1)
    pos_sim: Tensor  # (n, K + 1) cosines to [own key, its K neighbours]
    kept: Tensor  # (n, C) bool: negatives accepted by the draw (never a positive)
    weights: Tensor  # (n, K + 1) positive weights w_ip


def _check_psm(temperature: float, accept_a: float, accept_b: float) -> float:
    t = _check_t(temperature)
    if not (math.isfinite(accept_a) and accept_a >= 0):
        raise ValueError(f"accept_a={accept_a!r}; expected a finite float >= 0")
    if not math.isfinite(accept_b):
        raise ValueError(f"accept_b={accept_b!r}; expected a finite float")
    return t


def soft_weights(q_pre: Tensor, neighbors: Tensor, weighting: str) -> Tensor:
    """Positive weights (n, K + 1): 1 for the augmented key, then the K neighbours'.

    "soft" (paper): softmax_j(q_pre_i . NN_ij) on cosines, not detached (as the release's soft path);
    "hard" (the release forces it): all 1. q_pre: (n, d) un-predicted query, neighbors: (n, K, d).
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting={weighting!r}; expected one of {WEIGHTINGS}")
    n, k = neighbors.shape[0], neighbors.shape[1]
    ones = q_pre.new_ones((n, 1))
    if weighting == "hard" or k == 0:
        return torch.cat([ones, q_pre.new_ones((n, k))], dim=1)
    unit = F.normalize(q_pre, dim=1)  # (n, d)
    attn = torch.einsum("nd,nkd->nk", unit, F.normalize(neighbors.detach().to(unit.dtype), dim=-1))  # (n, K)
    return torch.cat([ones, attn.softmax(dim=1)], dim=1)  # (n, K + 1)


@full_precision
def psm_soft_parts(
    q: Tensor,
    q_pre: Tensor,
    keep: Tensor,
    *,
    temperature: float,
    accept_a: float = 0.5,
    accept_b: float = 0.0,
    weighting: str = "soft",
    row_offset: int = 0,
    generator: Optional[torch.Generator] = None,
    accept: Optional[Tensor] = None,
) -> SoftParts:
    """L_soft(q; k) with its intermediates. See ``psm_soft_loss``."""
    t = _check_psm(temperature, accept_a, accept_b)
    if q.dim() != 2 or q_pre.shape != q.shape or keep.dim() != 3 or keep.shape[2] != q.shape[1]:
        raise ValueError(
            f"q {tuple(q.shape)}, q_pre {tuple(q_pre.shape)}, keep {tuple(keep.shape)}: "
            "expected (n, d), (n, d), (B, K + 1, d)"
        )
    n, d = q.shape
    n_global, k1, _ = keep.shape
    if not 0 <= row_offset <= n_global - n:
        raise ValueError(f"row_offset={row_offset}; expected 0 <= row_offset <= B - n = {n_global - n}")
    dtype = torch.promote_types(q.dtype, torch.float32)
    cols = F.normalize(keep.detach().to(dtype), dim=-1).reshape(n_global * k1, d)  # (C, d)
    if accept is not None and accept.shape != (n, n_global * k1):
        raise ValueError(f"accept {tuple(accept.shape)}; expected {(n, n_global * k1)}")
    seed = draw_seed(generator) if accept is None else 0  # once: every row tile reads the same counters
    soft: dict[str, Any] = dict(cols=cols, keep=keep, k1=k1, row_offset=row_offset, dtype=dtype, temperature=t)
    soft |= dict(accept_a=accept_a, accept_b=accept_b, weighting=weighting, seed=seed, accept=accept)
    if tiling.tiled(n) is None:
        parts = _soft_rows(q, q_pre, 0, **soft)
        return parts._replace(loss=parts.loss.mean())
    loss = tiling.row_mean(lambda start, stop: _soft_rows(q, q_pre, start, stop, **soft).loss, n)
    with torch.no_grad():  # what the diagnostics read: the whole (n, C) matrices, without a graph
        whole = _soft_rows(q.detach(), q_pre.detach(), 0, **soft)
    return whole._replace(loss=loss)


def _soft_rows(
    q: Tensor, q_pre: Tensor, start: int, stop: Optional[int] = None, *, cols, keep, k1, row_offset, dtype, **rule
) -> SoftParts:
    """SoftParts of the local rows start..stop-1 (all from start when stop is None), ``loss`` per row (rows,)."""
    q, q_pre = q[start:stop], q_pre[start:stop]
    n = q.shape[0]
    t, seed, accept = rule["temperature"], rule["seed"], rule["accept"]
    q_unit = F.normalize(q.to(dtype), dim=1)  # (n, d)
    sim = q_unit @ cols.T  # (n, C)
    rows = row_offset + start + torch.arange(n, device=q.device)  # (n,) global row ids
    pos_cols = rows[:, None] * k1 + torch.arange(k1, device=q.device)  # (n, K + 1)
    pos_sim = sim.gather(1, pos_cols)  # (n, K + 1): [s_i+, neighbours]
    is_pos = (torch.arange(cols.shape[0], device=q.device) // k1)[None, :] == rows[:, None]  # (n, C)
    with torch.no_grad():
        if accept is None:
            p = acceptance_probability(sim, pos_sim[:, 0], rule["accept_a"], rule["accept_b"])  # (n, C)
            chosen = counter_uniform(seed, rows, cols.shape[0]).to(p.device) < p
        else:
            chosen = accept[start : start + n].bool()
        kept = chosen & ~is_pos  # (n, C)
    logits = sim / t
    neg = logits.masked_fill(~kept, float("-inf"))  # (n, C)
    pos = pos_sim / t  # (n, K + 1)
    log_den = torch.logsumexp(torch.cat([pos, neg], dim=1), dim=1)  # (n,) always finite: positives included
    weights = soft_weights(q_pre.to(dtype), keep[rows, 1:].to(dtype), rule["weighting"])  # (n, K + 1)
    return SoftParts(((log_den[:, None] - pos) * weights).sum(dim=1), sim, pos_sim, kept, weights)


def psm_soft_loss(
    q: Tensor,
    q_pre: Tensor,
    keep: Tensor,
    *,
    temperature: float,
    accept_a: float = 0.5,
    accept_b: float = 0.0,
    weighting: str = "soft",
    row_offset: int = 0,
    generator: Optional[torch.Generator] = None,
    accept: Optional[Tensor] = None,
) -> Tensor:
    """PSM's L_soft: mean_i sum_{p in P_i} w_ip -log(e^{s_ip/t} / (sum_{p'} e^{s_ip'/t} + sum_{kept n} e^{s_in/t})).

    q: (n, d) this rank's predictor outputs (view v); q_pre: (n, d) their projections (soft weights);
    keep: (B, K + 1, d) the GLOBAL momentum keys of the other view, each followed by its K bank
    neighbours (detached); row_offset: global index of local row 0. P_i = keep[row_offset + i]; the
    negatives are every other sample's key and neighbours, each kept by the acceptance draw (``accept``:
    an explicit (n, B (K + 1)) bool mask instead, for tests). Scalar, mean over the local rows.
    """
    return psm_soft_parts(
        q,
        q_pre,
        keep,
        temperature=temperature,
        accept_a=accept_a,
        accept_b=accept_b,
        weighting=weighting,
        row_offset=row_offset,
        generator=generator,
        accept=accept,
    ).loss


def _log_negative_sum(neg: Tensor, kept: Tensor) -> Tensor:
    """log sum_{kept n} e^{neg_in}: neg (R, C) logits, kept (R, C) bool -> (R,), -inf (zero gradient) if none kept."""
    some = kept.any(dim=1)  # (R,)
    safe = neg.masked_fill(~some[:, None], 0.0)  # (R, C): no all -inf row, whose logsumexp backward is NaN
    return torch.logsumexp(safe, dim=1).masked_fill(~some, float("-inf"))


@full_precision
def psm_hard_loss(
    q: Tensor,
    k: Tensor,
    *,
    temperature: float,
    accept_a: float = 0.5,
    accept_b: float = 0.0,
    generator: Optional[torch.Generator] = None,
    accept: Optional[Tensor] = None,
    gather: Optional[Gather] = None,
    acceptance_on: str = "cosine",
    mean_over: str = "anchors",
) -> Tensor:
    """PSM's L_hard: the in-batch loss between predictor outputs q (n, d) and momentum keys k (n, d).

    Rows [q; k] (2n local anchors) against the gathered columns [Q; K] (2B): row i's positive is its
    partner (s_i+ = cos(q_i, k_i) for both), the other 2B - 2 columns are negatives, each kept by the
    acceptance rule, Ng_i = sum_kept e^{s_in/t}. ``mean_over``: "anchors" (the paper's equation)
    mean_i -log(pos_i / (pos_i + Ng_i)); "pairs" (the release as it runs: its pos (2B, 1) and Ng (2B,)
    broadcast, src/model/psm.py:245,279,281) mean_{i,j} -log(pos_i / (pos_i + Ng_j)) over every anchor i
    and every row j of the global batch (Ng gathered with its gradient). k is detached (momentum keys).
    ``acceptance_on``: "raw" computes the acceptance on raw (un-normalised) dot products of q and k, as
    the release does (hard_contrastive in github.com/dhkdhk/PSM src/model/psm.py): with BN outputs of
    norm ~sqrt(d) it rejects nearly every negative once s_in and s_i+ differ, so L_hard ~ 0; "cosine"
    (the paper's reading) on cosines. The logits are cosines / t either way. ``accept``: an explicit
    (2n, 2B) bool mask over the columns, for tests.

    Long on purpose: most of it is the docstring and the argument checks; the math is the release's two means.
    """
    if acceptance_on not in ACCEPTANCE_ON:
        raise ValueError(f"acceptance_on={acceptance_on!r}; expected one of {ACCEPTANCE_ON}")
    if mean_over not in HARD_MEANS:
        raise ValueError(f"mean_over={mean_over!r}; expected one of {HARD_MEANS}")
    t = _check_psm(temperature, accept_a, accept_b)
    if tiling.tiled(2 * q.shape[0]) is not None:
        return _tiled_hard_loss(q, k, t, accept_a, accept_b, generator, accept, gather, acceptance_on, mean_over)
    b = _batch(q, k.detach(), t, gather)
    n_rows, n_cols = b.logits.shape
    pos_ids = (b.row_ids + n_cols // 2) % n_cols  # (R,)
    with torch.no_grad():
        sim = b.sim  # (R, C) cosines, for the acceptance rule
        if acceptance_on == "raw":  # back to raw dot products: cos x |row| x |column|
            norms = torch.stack([q.detach().float().norm(dim=1), k.detach().float().norm(dim=1)], dim=1)  # (n, 2)
            gathered = gather(norms) if gather is not None else norms  # (B, 2)
            sim = (
                sim
                * torch.cat([norms[:, 0], norms[:, 1]])[:, None].to(sim.dtype)
                * torch.cat([gathered[:, 0], gathered[:, 1]])[None, :].to(sim.dtype)
            )  # (R, C)
        s_pos = sim.gather(1, pos_ids[:, None]).squeeze(1)  # (R,) cosine of the positive pair
        if accept is None:
            p = acceptance_probability(sim, s_pos, accept_a, accept_b)  # (R, C)
            accept = counter_uniform(draw_seed(generator), b.row_ids, n_cols).to(p.device) < p
        elif accept.shape != sim.shape:
            raise ValueError(f"accept {tuple(accept.shape)}; expected {tuple(sim.shape)}")
        kept = accept.bool() & b.neg_mask  # (R, C)
    neg = b.logits.masked_fill(~kept, float("-inf"))  # (R, C)
    if mean_over == "anchors":
        log_den = torch.logsumexp(torch.cat([b.pos[:, None], neg], dim=1), dim=1)  # (R,)
        return (log_den - b.pos).mean()
    log_ng = _log_negative_sum(neg, kept)  # (R,) log Ng_i of the local rows
    n = q.shape[0]
    by_view = torch.stack([log_ng[:n], log_ng[n:]], dim=1)  # (n, 2): one collective for both views
    every = gather(by_view) if gather is not None else by_view  # (B, 2)
    log_ng_all = torch.cat([every[:, 0], every[:, 1]])  # (C,) log Ng_j of every global row, column order
    return (torch.logaddexp(b.pos[:, None], log_ng_all[None, :]) - b.pos[:, None]).mean()  # (R, C) pairs


def _tiled_hard_loss(q, k, t, accept_a, accept_b, generator, accept, gather, acceptance_on, mean_over) -> Tensor:
    """psm_hard_loss a tile of rows at a time (tiling.loss_tile): the same rows, columns, draws and means."""
    c = _columns(q, k.detach(), t, gather)
    n_rows, n_cols = c.rows.shape[0], c.cols.shape[0]
    if accept is not None and accept.shape != (n_rows, n_cols):
        raise ValueError(f"accept {tuple(accept.shape)}; expected {(n_rows, n_cols)}")
    seed = draw_seed(generator) if accept is None else 0  # once: every tile reads the same counters
    scale = None
    if acceptance_on == "raw":  # back to raw dot products: cos x |row| x |column|
        with torch.no_grad():
            norms = torch.stack([q.detach().float().norm(dim=1), k.detach().float().norm(dim=1)], dim=1)  # (n, 2)
            gathered = gather(norms) if gather is not None else norms  # (B, 2)
            scale = (torch.cat([norms[:, 0], norms[:, 1]]), torch.cat([gathered[:, 0], gathered[:, 1]]))  # (R,), (C,)

    def pos_and_negatives(start: int, stop: int) -> tuple[Tensor, Tensor, Tensor]:
        b = _rows(c, start, stop)
        with torch.no_grad():
            sim = b.sim  # (r, C) cosines, for the acceptance rule
            if scale is not None:
                sim = sim * scale[0][start:stop, None].to(sim.dtype) * scale[1][None, :].to(sim.dtype)
            s_pos = sim.gather(1, c.pos_ids[start:stop, None]).squeeze(1)  # (r,)
            if accept is None:
                p = acceptance_probability(sim, s_pos, accept_a, accept_b)  # (r, C)
                chosen = counter_uniform(seed, b.row_ids, n_cols).to(p.device) < p
            else:
                chosen = accept[start:stop].bool()
            kept = chosen & b.neg_mask  # (r, C)
        return b.pos, b.logits.masked_fill(~kept, float("-inf")), kept

    if mean_over == "anchors":

        def anchor_losses(start: int, stop: int) -> Tensor:
            pos, neg, _ = pos_and_negatives(start, stop)
            return torch.logsumexp(torch.cat([pos[:, None], neg], dim=1), dim=1) - pos  # (r,)

        return tiling.row_mean(anchor_losses, n_rows)

    def pos_and_log_ng(start: int, stop: int) -> Tensor:
        pos, neg, kept = pos_and_negatives(start, stop)
        return torch.stack([pos, _log_negative_sum(neg, kept)], dim=1)  # (r, 2)

    tile = tiling.tiled(n_rows)
    assert tile is not None
    both = tiling.tiled_rows(pos_and_log_ng, n_rows, tile)  # (R, 2)
    pos, log_ng = both[:, 0], both[:, 1]
    n = q.shape[0]
    by_view = torch.stack([log_ng[:n], log_ng[n:]], dim=1)  # (n, 2): one collective for both views
    every = gather(by_view) if gather is not None else by_view  # (B, 2)
    log_ng_all = torch.cat([every[:, 0], every[:, 1]])  # (C,) log Ng_j of every global row, column order
    return tiling.row_mean(
        lambda start, stop: (torch.logaddexp(pos[start:stop, None], log_ng_all[None, :]) - pos[start:stop, None]).mean(
            1
        ),
        n_rows,
    )  # the mean over every (anchor, row) pair, a tile of anchors at a time
