"""Pure in-batch contrastive losses in log space: NT-Xent, DCL, HCL, SSCL (see docs/methods.md).

Layout: rows are this worker's 2n anchors [z1_local; z2_local]; columns are the gathered global batch
[z1 of all ranks; z2 of all ranks] (2B columns, B the global batch), i.e. the single-process layout of
the concatenated batch. Masks come from global indices, so the per-rank cost is O(n * B).
Every loss is mean_i -log(pos_i / (pos_i + Ng_i)); only Ng_i differs, and all of them share
`_log_ng_hcl`. Computation runs in float32 or wider whatever the input dtype.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import tiling
from .precision import full_precision
from .synth import check_synth_args, draw_mixing, synthesize_hard_negatives

# x (n_local, ...) -> (world_size * n_local, ...) in rank order; dist.Gather in training, None or identity in tests
Gather = Callable[[Tensor], Tensor]
_LN2 = math.log(2.0)


class _Columns(NamedTuple):
    """What every row tile shares: the normalised local anchors, the gathered columns and the global ids."""

    rows: Tensor  # (R, d) unit local anchors [z1; z2], R = 2n
    cols: Tensor  # (C, d) unit global columns [Z1; Z2], C = 2B
    row_ids: Tensor  # (R,) each anchor's own column index
    pos_ids: Tensor  # (R,) each anchor's positive's column index
    temperature: float
    n_neg: int  # C - 2, the N of every row


class _Batch(NamedTuple):
    rows: Tensor  # (R, d) unit local anchors [z1; z2], R = 2n (or a tile of them)
    cols: Tensor  # (C, d) unit global columns [Z1; Z2], C = 2B
    row_ids: Tensor  # (R,) each anchor's own column index
    logits: Tensor  # (R, C) cosine similarities / t
    temperature: float
    neg_mask: Tensor  # (R, C) True on the C - 2 real negatives of each row
    pos: Tensor  # (R,) s_{i,i+} / t
    neg: Tensor  # (R, C) s_ij / t on the real negatives, -inf on self and positive
    n_neg: int  # C - 2, the N of every row

    @property
    def sim(self) -> Tensor:
        """(R, C) cosine similarities (a fresh pass: the losses themselves need only the logits)."""
        return self.logits * self.temperature


def _check_float(
    name: str,
    value: float,
    low: float,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = True,
    expected: str,
) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r}; expected {expected}") from None
    ok_low = v > low if low_open else v >= low
    ok_high = v < high if high_open else v <= high
    if not (math.isfinite(v) and ok_low and ok_high):
        raise ValueError(f"{name}={value!r}; expected {expected}")
    return v


def _check_t(temperature: float) -> float:
    return _check_float("temperature", temperature, 0.0, low_open=True, expected="a finite float > 0")


def _check_tau_plus(tau_plus: float) -> float:
    return _check_float("tau_plus", tau_plus, 0.0, 1.0, expected="a float in [0, 1)")


def _check_beta(beta: float) -> float:
    return _check_float("beta", beta, 0.0, expected="a finite float >= 0")


def _columns(z1: Tensor, z2: Tensor, temperature: float, gather: Gather | None) -> _Columns:
    """Normalise (in float32+), gather the columns and give each local anchor its global ids."""
    if z1.dim() != 2 or z1.shape != z2.shape:
        raise ValueError(f"z1 {tuple(z1.shape)} and z2 {tuple(z2.shape)}: expected two (B, d) tensors of equal shape")
    if not (z1.is_floating_point() and z2.is_floating_point()):
        raise ValueError(f"z1 dtype {z1.dtype}, z2 dtype {z2.dtype}: expected floating point")
    n, d = z1.shape
    if n < 1:
        raise ValueError("z1, z2: expected a batch of at least one pair")
    dtype = torch.promote_types(torch.promote_types(z1.dtype, z2.dtype), torch.float32)
    z1n = F.normalize(z1.to(dtype), dim=1)  # (n, d)
    z2n = F.normalize(z2.to(dtype), dim=1)  # (n, d)
    pairs = torch.cat([z1n, z2n], dim=1)  # (n, 2d): one collective for both views
    gathered = gather(pairs) if gather is not None else pairs  # (B, 2d)
    n_global = gathered.shape[0]
    rank = getattr(gather, "rank", None)
    if rank is None and n_global != n:
        raise ValueError("gather: a gather that collects several ranks must expose .rank (e.g. dist.Gather)")
    rank = int(rank or 0)
    if gathered.shape[1:] != pairs.shape[1:] or n_global % n or not 0 <= rank < n_global // n:
        raise ValueError(
            f"gather returned {tuple(gathered.shape)} for local {tuple(pairs.shape)} at rank {rank}; "
            "expected (world_size * n, 2d) in rank order"
        )
    if n_global < 2:
        raise ValueError(f"global batch B={n_global}; expected B >= 2 so that every anchor has a negative")
    cols = torch.cat([gathered[:, :d], gathered[:, d:]], dim=0)  # (C, d), C = 2B
    rows = torch.cat([z1n, z2n], dim=0)  # (R, d), R = 2n
    local = rank * n + torch.arange(n, device=z1.device)  # (n,)
    row_ids = torch.cat([local, local + n_global])  # (R,)
    pos_ids = torch.cat([local + n_global, local])  # (R,)
    return _Columns(rows, cols, row_ids, pos_ids, temperature, 2 * n_global - 2)


def _rows(c: _Columns, start: int, stop: int, in_place: bool = False) -> _Batch:
    """Logits and masks of the anchor rows start..stop-1 against every column (all rows: the whole batch).

    in_place: mask the logits themselves (``logits`` is then ``neg``), for a loss that reads only ``pos`` and
    ``neg`` afterwards: one (R, C) buffer fewer; the same values and gradients.
    """
    rows, row_ids, pos_ids = c.rows[start:stop], c.row_ids[start:stop], c.pos_ids[start:stop]
    col_ids = torch.arange(c.cols.shape[0], device=rows.device)  # (C,)
    neg_mask = (col_ids != row_ids[:, None]) & (col_ids != pos_ids[:, None])  # (R, C)
    logits = (rows / c.temperature) @ c.cols.T  # (R, C): 1/t folded into the (R, d) side, not a pass over (R, C)
    # -inf rather than masked_select: no (R, N) copy, and no host sync for its size on a GPU
    if in_place:  # indexing saves only the indices for backward (gather would keep the logits it reads)
        pos = logits.reshape(-1)[torch.arange(rows.shape[0], device=rows.device) * logits.shape[1] + pos_ids]
        neg = logits.masked_fill_(~neg_mask, float("-inf"))  # logits is neg from here: one (R, C) buffer fewer
    else:
        pos = logits.gather(1, pos_ids[:, None]).squeeze(1)  # (R,)
        neg = logits.masked_fill(~neg_mask, float("-inf"))  # (R, C)
    return _Batch(rows, c.cols, row_ids, logits, c.temperature, neg_mask, pos, neg, c.n_neg)


def _batch(z1: Tensor, z2: Tensor, temperature: float, gather: Gather | None) -> _Batch:
    """Normalise (in float32+), gather the columns and build the global-index masks of every local row."""
    c = _columns(z1, z2, temperature, gather)
    return _rows(c, 0, c.rows.shape[0])


def _log1mexp(d: Tensor) -> Tensor:
    """log(1 - exp(d)) for d < 0, accurate at both ends, with finite gradients on both branches."""
    near = torch.log(-torch.expm1(d))  # accurate for d in (-ln2, 0)
    far = torch.log1p(-torch.exp(torch.clamp(d, max=-_LN2)))  # accurate for d <= -ln2
    return torch.where(d > -_LN2, near, far)


class _LogHardnessWeightedSum(torch.autograd.Function):
    """log sum_j w_ij exp(neg_ij), w_i. = softmax(beta * neg_i.), for beta > 0: (R, M) -> (R,).

    Equals logsumexp((beta+1) neg) - logsumexp(beta neg) (HCL's importance-weighted negative sum), in one
    fused pass instead of two autograd logsumexps: the row max shifts both sums (so each holds a term equal
    to 1: no overflow, no underflow), -inf entries weigh 0, and backward is one multiply by the saved
    d/dneg = (beta+1) softmax((beta+1) neg) - beta softmax(beta neg) -- the gradient HCL's official code
    gets from autograd (the weights are not detached)."""

    @staticmethod
    def forward(ctx, neg: Tensor, beta: float) -> Tensor:
        top = neg.amax(dim=1, keepdim=True)  # (R, 1)
        shifted = neg - top  # (R, M) <= 0
        by_beta = torch.mul(shifted, beta).exp_()  # (R, M) e^{beta s}, 0 off the negatives
        by_beta_plus_one = shifted.exp_().mul_(by_beta)  # (R, M) e^{(beta+1) s}; in place: two (R, M) buffers in all
        sum_a = by_beta_plus_one.sum(dim=1, keepdim=True)  # (R, 1) >= 1
        sum_b = by_beta.sum(dim=1, keepdim=True)  # (R, 1) >= 1
        grad = by_beta_plus_one.mul_((beta + 1.0) / sum_a).sub_(by_beta.mul_(beta / sum_b))  # (R, M)
        ctx.save_for_backward(grad)
        return (top + torch.log(sum_a) - torch.log(sum_b)).squeeze(1)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_out[:, None], None


class _LogHardnessWeightedSumOfParts(torch.autograd.Function):
    """``_LogHardnessWeightedSum`` of the column-wise concatenation of ``parts`` (R, M_k), without building it:
    a tiled SSCL loss keeps its real and synthetic negatives apart (one (R, M) buffer fewer)."""

    @staticmethod
    def forward(ctx, beta: float, *parts: Tensor) -> Tensor:
        top = torch.stack([p.amax(dim=1) for p in parts], dim=1).amax(dim=1, keepdim=True)  # (R, 1)
        sum_a: Tensor | float = 0.0
        sum_b: Tensor | float = 0.0
        exps = []
        for part in parts:
            shifted = part - top  # (R, M_k) <= 0
            by_beta = torch.mul(shifted, beta).exp_()
            by_beta_plus_one = shifted.exp_().mul_(by_beta)
            sum_a = sum_a + by_beta_plus_one.sum(dim=1, keepdim=True)
            sum_b = sum_b + by_beta.sum(dim=1, keepdim=True)
            exps.append((by_beta_plus_one, by_beta))
        assert isinstance(sum_a, Tensor) and isinstance(sum_b, Tensor)
        grads = [a.mul_((beta + 1.0) / sum_a).sub_(b.mul_(beta / sum_b)) for a, b in exps]
        ctx.save_for_backward(*grads)
        return (top + torch.log(sum_a) - torch.log(sum_b)).squeeze(1)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        return (None, *(g * grad_out[:, None] for g in ctx.saved_tensors))


def _log_ng_hcl(
    pos: Tensor,
    neg: Tensor,
    *,
    n_neg: int,
    temperature: float,
    tau_plus: float,
    beta: float,
    clamp: bool = True,
    extra: Tensor | None = None,
) -> Tensor:
    """log Ng: (R,) of the HCL estimator (N/tau-)(sum_j w_ij neg_ij - tau+ pos_i), clamped at N e^{-1/t}.

    pos: (R,) positive logits, neg: (R, M) negative logits (s/t) with -inf where a column is no negative
    (exactly n_neg = N finite per row), w = softmax(beta * neg) (not detached).
    beta = 0 gives DCL, beta = 0 and tau+ = 0 gives NT-Xent (clamp=False: plain cross-entropy).
    extra: (R, k) more negative logits, counted as if concatenated to ``neg`` (SSCL's synthetic ones, tiled).
    """
    if tau_plus > 0.0 and not clamp:
        raise ValueError("tau_plus > 0 needs the clamp: the debiased estimate can be negative")
    if extra is not None:
        if beta == 0.0:
            log_sum = torch.logaddexp(torch.logsumexp(neg, dim=1), torch.logsumexp(extra, dim=1))
        else:
            log_sum = math.log(n_neg) + _LogHardnessWeightedSumOfParts.apply(beta, neg, extra)
    elif beta == 0.0:
        log_sum = torch.logsumexp(neg, dim=1)  # (R,) log sum_j neg_ij
    else:
        log_sum = math.log(n_neg) + _LogHardnessWeightedSum.apply(neg, beta)  # (R,) log N sum_j w_ij neg_ij
    floor = math.log(n_neg) - 1.0 / temperature  # log(N e^{-1/t})
    if tau_plus == 0.0:
        if not clamp:
            return log_sum
        return torch.where(log_sum < floor, floor, log_sum)  # torch.clamp(min=floor), as the official code
    # (N sum w neg - tau+ N pos) / tau-  in log space: log_sum + log(1 - e^d) - log tau-
    d = math.log(tau_plus * n_neg) + pos - log_sum  # (R,) log(tau+ N pos / N sum w neg)
    positive = d < 0  # else the debiased estimate is <= 0 and only the clamp is defined
    d_safe = torch.where(positive, d, -1.0)  # (R,)
    raw = log_sum + _log1mexp(d_safe) - math.log1p(-tau_plus)  # (R,)
    return torch.where(positive & (raw >= floor), raw, floor)


def _row_losses(pos: Tensor, log_ng: Tensor) -> Tensor:
    """-log(pos_i / (pos_i + Ng_i)) of each row from logits: pos (R,), log_ng (R,) -> (R,)."""
    return torch.logaddexp(pos, log_ng) - pos


def _hcl_mean(c: _Columns, *, tau_plus: float, beta: float, clamp: bool = True) -> Tensor:
    """The HCL-estimator loss (DCL at beta = 0, NT-Xent also at tau_plus = 0 unclamped), mean over the rows,
    built a tile of rows at a time under tiling.loss_tile."""

    def per_rows(start: int, stop: int) -> Tensor:
        b = _rows(c, start, stop, in_place=True)
        log_ng = _log_ng_hcl(
            b.pos, b.neg, n_neg=b.n_neg, temperature=c.temperature, tau_plus=tau_plus, beta=beta, clamp=clamp
        )
        return _row_losses(b.pos, log_ng)

    return tiling.row_mean(per_rows, c.rows.shape[0])


@full_precision
def nt_xent(z1: Tensor, z2: Tensor, *, temperature: float, gather: Gather | None = None) -> Tensor:
    """SimCLR NT-Xent (Chen et al. 2020, arXiv:2002.05709): z1, z2 (n, d) -> scalar mean over 2n anchors."""
    t = _check_t(temperature)
    return _hcl_mean(_columns(z1, z2, t, gather), tau_plus=0.0, beta=0.0, clamp=False)


@full_precision
def dcl(z1: Tensor, z2: Tensor, *, temperature: float, tau_plus: float, gather: Gather | None = None) -> Tensor:
    """Debiased contrastive loss (Chuang et al., NeurIPS 2020): z1, z2 (n, d) -> scalar mean over 2n anchors."""
    t, tp = _check_t(temperature), _check_tau_plus(tau_plus)
    return _hcl_mean(_columns(z1, z2, t, gather), tau_plus=tp, beta=0.0)


@full_precision
def hcl(
    z1: Tensor, z2: Tensor, *, temperature: float, tau_plus: float, beta: float, gather: Gather | None = None
) -> Tensor:
    """Hard-negative loss (Robinson et al., ICLR 2021): z1, z2 (n, d) -> scalar mean over 2n anchors."""
    t, tp, bt = _check_t(temperature), _check_tau_plus(tau_plus), _check_beta(beta)
    return _hcl_mean(_columns(z1, z2, t, gather), tau_plus=tp, beta=bt)


@full_precision
def sscl(
    z1: Tensor,
    z2: Tensor,
    *,
    temperature: float,
    tau_plus: float,
    beta: float,
    n_hard: int,
    n_synthetic: int,
    mix: str = "paper",
    generator: torch.Generator | None = None,
    gather: Gather | None = None,
) -> Tensor:
    """Synthetic hard negatives + HCL (Dong et al., arXiv:2304.02971): z1, z2 (n, d) -> scalar mean over 2n anchors."""
    t, tp, bt = _check_t(temperature), _check_tau_plus(tau_plus), _check_beta(beta)
    check_synth_args(n_hard, n_synthetic, mix, generator)
    c = _columns(z1, z2, t, gather)
    # drawn once for every global row, before any tile: a tiled loss draws what the untiled one does
    draws = draw_mixing(c.cols.shape[0], n_synthetic, min(n_hard, c.n_neg), generator) if n_synthetic > 0 else None

    def per_rows(start: int, stop: int) -> Tensor:
        b = _rows(c, start, stop, in_place=True)  # the synthesizer reads only the masked logits (hardness)
        neg = b.neg  # (R, C), N finite
        synthetic: Tensor | None = None
        if draws is not None:
            h = synthesize_hard_negatives(
                b.logits,
                b.neg_mask,
                b.cols,
                b.row_ids,
                n_hard=n_hard,
                n_synthetic=n_synthetic,
                mix=mix,
                n_neg=b.n_neg,
                hardness=b.neg,
                draws=draws,
            )  # (R, k, d)
            synthetic = torch.einsum("rd,rkd->rk", b.rows, h) / t  # (R, k): gradient via the anchor only
            if not tiled:
                neg, synthetic = torch.cat([neg, synthetic], dim=1), None  # (R, C + k), N + k finite
        log_ng = _log_ng_hcl(
            b.pos, neg, n_neg=b.n_neg + n_synthetic, temperature=t, tau_plus=tp, beta=bt, extra=synthetic
        )  # tiled: the synthetic columns apart from the real ones, no (R, C + k) copy
        return _row_losses(b.pos, log_ng)

    tiled = tiling.tiled(c.rows.shape[0]) is not None
    return tiling.row_mean(per_rows, c.rows.shape[0])
