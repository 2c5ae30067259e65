"""MoCHi, hard negative mixing on a MoCo queue (Kalantidis et al., NeurIPS 2020, arXiv:2010.01028).

For each query q (unit): its N hardest queue keys (largest q . n, detached); s mixes of two of them,
h = normalize(alpha n_a + (1 - alpha) n_b), alpha ~ U(0, 1); s' mixes of the query with one of them,
h' = normalize(beta q + (1 - beta) n_c), beta ~ U(0, 0.5). All synthetic vectors are detached and
appended as extra negative logits: InfoNCE over [positive key, queue, synthetic] with the positive first.

The training path never builds the (n, s + s', d) synthetic vectors: for unit a, b and detached h,
q . h = (alpha q.a + (1 - alpha) q.b) / |alpha a + (1 - alpha) b| with |.|^2 = alpha^2 + (1 - alpha)^2
+ 2 alpha (1 - alpha) a.b, so the logits come from the query-queue similarities already computed, and
the gradient w.r.t. q is exactly h / t, as with the vectors (``mochi_synthesize`` builds them, for
tests and diagnostics). Memory O(n (K + s + s')) instead of O(n (s + s') d).

Draw protocol (pinned so that every rank reproduces the single-process draws from one seed):
    pairs = randint(0, N, (2, B, s)); alpha = rand((B, s, 1)); picks = randint(0, N, (B, s'));
    beta = 0.5 * rand((B, s', 1))
drawn in that order on the generator's device for ALL B global queries; each rank keeps its own rows.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import tiling
from .functional import _check_t
from .precision import full_precision

BETA_MAX = 0.5
_EPS = 1e-12  # F.normalize's floor on the norm
_CHUNK = 1 << 22  # pair dot products per chunk (d-vectors gathered at once)


class MixDraws(NamedTuple):
    """This rank's mixing draws, resolved to queue ids: a, b (n, s) with alpha (n, s); c (n, s') with beta (n, s')."""

    a: Tensor
    b: Tensor
    alpha: Tensor
    c: Tensor
    beta: Tensor


def _check_counts(n_hard: int, n_mix: int, n_mix_query: int) -> None:
    for name, value, low in (("n_hard", n_hard, 1), ("n_mix", n_mix, 0), ("n_mix_query", n_mix_query, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name}={value!r}; expected an integer >= {low}")


def _unit(x: Tensor, dtype) -> Tensor:
    return F.normalize(x.to(dtype), dim=-1)


@full_precision
def draw_mixes(
    q: Tensor,
    queue: Tensor,
    *,
    n_hard: int,
    n_mix: int,
    n_mix_query: int,
    generator: Optional[torch.Generator] = None,
    row_offset: int = 0,
    n_rows_global: Optional[int] = None,
) -> MixDraws:
    """The N = min(n_hard, K) hardest queue keys of each local query and the draws over them (no grad).

    q: (n, d) this rank's queries; queue: (K, d); row_offset / n_rows_global: this rank's rows within the
    global batch (the draw protocol in the module docstring).
    """
    _check_counts(n_hard, n_mix, n_mix_query)
    n = q.shape[0]
    n_global = n if n_rows_global is None else int(n_rows_global)
    if not 0 <= row_offset <= n_global - n:
        raise ValueError(f"row_offset={row_offset}, n_rows_global={n_global}; expected rows within the global batch")
    dtype = torch.promote_types(q.dtype, torch.float32)
    with torch.no_grad():
        n_choices = min(n_hard, queue.shape[0])
        q_unit, bank = _unit(q.detach(), dtype), _unit(queue.detach(), dtype)  # (n, d), (K, d)
        hard = tiling.no_grad_rows(
            lambda start, stop: (q_unit[start:stop] @ bank.T).topk(n_choices, dim=1).indices, n
        )  # (n, N): the (n, K) similarities a tile of rows at a time under tiling.loss_tile
        device = generator.device if generator is not None else torch.device("cpu")
        pairs = torch.randint(0, n_choices, (2, n_global, n_mix), generator=generator, device=device)
        alpha = torch.rand((n_global, n_mix, 1), generator=generator, device=device)
        picks = torch.randint(0, n_choices, (n_global, n_mix_query), generator=generator, device=device)
        beta = BETA_MAX * torch.rand((n_global, n_mix_query, 1), generator=generator, device=device)
        rows = slice(row_offset, row_offset + n)
        pairs, picks = pairs[:, rows].to(q.device), picks[rows].to(q.device)  # (2, n, s), (n, s')
        return MixDraws(
            hard.gather(1, pairs[0]),
            hard.gather(1, pairs[1]),
            alpha[rows, :, 0].to(q.device, dtype),
            hard.gather(1, picks),
            beta[rows, :, 0].to(q.device, dtype),
        )


@full_precision
def mochi_synthesize(
    q: Tensor,
    queue: Tensor,
    *,
    n_hard: int,
    n_mix: int,
    n_mix_query: int,
    generator: Optional[torch.Generator] = None,
    row_offset: int = 0,
    n_rows_global: Optional[int] = None,
) -> Tensor:
    """The synthetic negatives as vectors, detached and unit (n, s + s', d): [s mixes of two keys; s' query mixes]."""
    draws = draw_mixes(
        q,
        queue,
        n_hard=n_hard,
        n_mix=n_mix,
        n_mix_query=n_mix_query,
        generator=generator,
        row_offset=row_offset,
        n_rows_global=n_rows_global,
    )
    dtype = torch.promote_types(q.dtype, torch.float32)
    with torch.no_grad():
        bank, q_unit = _unit(queue.detach(), dtype), _unit(q.detach(), dtype)  # (K, d), (n, d)
        alpha, beta = draws.alpha[..., None], draws.beta[..., None]  # (n, s, 1), (n, s', 1)
        mixed = F.normalize(alpha * bank[draws.a] + (1 - alpha) * bank[draws.b], dim=-1)  # (n, s, d)
        with_query = F.normalize(beta * q_unit[:, None] + (1 - beta) * bank[draws.c], dim=-1)  # (n, s', d)
        return torch.cat([mixed, with_query], dim=1)


def draws_of_rows(draws: MixDraws, start: int, stop: int) -> MixDraws:
    """The draws of local rows start..stop-1 (a row tile of the loss)."""
    return MixDraws(*(part[start:stop] for part in draws))


def mochi_row_losses(q: Tensor, k: Tensor, queue: Tensor, draws: MixDraws, *, temperature: float) -> Tensor:
    """MoCHi InfoNCE of each query, -log softmax(logits)[positive]: (n,), built a tile of rows at a time under
    tiling.loss_tile (the mean of this is the loss; a tile's draws are its rows' draws)."""
    logits = mochi_logits(q, k, queue, draws, temperature=temperature)  # (n, 1 + K + s + s')
    return torch.logsumexp(logits, dim=1) - logits[:, 0]


def mochi_tiled_mean(q: Tensor, k: Tensor, queue: Tensor, draws: MixDraws, *, temperature: float) -> Tensor:
    """mean over the queries of ``mochi_row_losses``, one row tile at a time (tiling.row_mean)."""
    # a snapshot: backward recomputes each tile after the objective has enqueued this step's keys in place
    queue = queue.detach().clone()

    def per_rows(start: int, stop: int) -> Tensor:
        rows = draws_of_rows(draws, start, stop)
        return mochi_row_losses(q[start:stop], k[start:stop], queue, rows, temperature=temperature)

    return tiling.row_mean(per_rows, q.shape[0])


def _pair_dots(bank: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """bank[a] . bank[b] for index tensors a, b (n, s) -> (n, s), a few rows at a time (no (n, s, d) tensor)."""
    out = bank.new_empty(a.shape)
    rows = max(1, _CHUNK // max(1, a.shape[1] * bank.shape[1]))
    for start in range(0, a.shape[0], rows):
        sl = slice(start, start + rows)
        out[sl] = (bank[a[sl]] * bank[b[sl]]).sum(dim=-1)
    return out


@full_precision
def mochi_logits(
    q: Tensor,
    k: Tensor,
    queue: Tensor,
    draws: Optional[MixDraws] = None,
    *,
    temperature: float,
    synthetic: Optional[Tensor] = None,
) -> Tensor:
    """Logits (n, 1 + K + m) / t: [q.k+, q.queue, q.synthetic]; the positive is column 0.

    q: (n, d) queries (gradient), k: (n, d) momentum keys, queue: (K, d); the synthetic columns come from
    ``draws`` (closed form, see the module docstring) or from explicit vectors ``synthetic`` (n, m, d).
    Everything but q is detached; vectors are L2-normalised here (float32 or wider).
    """
    t = _check_t(temperature)
    if q.dim() != 2 or k.shape != q.shape or queue.dim() != 2 or queue.shape[1] != q.shape[1]:
        raise ValueError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, queue {tuple(queue.shape)}: expected (n, d), (n, d), (K, d)"
        )
    dtype = torch.promote_types(q.dtype, torch.float32)
    q_unit, k_unit, bank = _unit(q, dtype), _unit(k.detach(), dtype), _unit(queue.detach(), dtype)
    sim = q_unit @ bank.T  # (n, K)
    parts = [(q_unit * k_unit).sum(dim=1, keepdim=True), sim]  # (n, 1), (n, K)
    if synthetic is not None and synthetic.shape[1] > 0:
        parts.append(torch.einsum("nd,nmd->nm", q_unit, synthetic.detach().to(dtype)))  # (n, m)
    if draws is not None:
        alpha, beta = draws.alpha, draws.beta  # (n, s), (n, s')
        with torch.no_grad():
            ab = _pair_dots(bank, draws.a, draws.b)  # (n, s) a . b
            norm_ab = (alpha**2 + (1 - alpha) ** 2 + 2 * alpha * (1 - alpha) * ab).clamp(min=0).sqrt().clamp(min=_EPS)
            qc = sim.detach().gather(1, draws.c)  # (n, s') q . c
            norm_qc = (beta**2 + (1 - beta) ** 2 + 2 * beta * (1 - beta) * qc).clamp(min=0).sqrt().clamp(min=_EPS)
        mixed = (alpha * sim.gather(1, draws.a) + (1 - alpha) * sim.gather(1, draws.b)) / norm_ab  # (n, s)
        self_dot = (q_unit * q_unit.detach()).sum(dim=1, keepdim=True)  # (n, 1): value 1, gradient q
        with_query = (beta * self_dot + (1 - beta) * sim.gather(1, draws.c)) / norm_qc  # (n, s')
        parts += [mixed, with_query]
    return torch.cat(parts, dim=1) / t


def mochi_loss(
    q: Tensor,
    k: Tensor,
    queue: Tensor,
    *,
    temperature: float,
    n_hard: int,
    n_mix: int,
    n_mix_query: int,
    generator: Optional[torch.Generator] = None,
    row_offset: int = 0,
    n_rows_global: Optional[int] = None,
) -> Tensor:
    """MoCHi InfoNCE: mean over the local queries of -log softmax(logits)[positive]. Scalar."""
    draws = draw_mixes(
        q,
        queue,
        n_hard=n_hard,
        n_mix=n_mix,
        n_mix_query=n_mix_query,
        generator=generator,
        row_offset=row_offset,
        n_rows_global=n_rows_global,
    )
    return mochi_row_losses(q, k, queue, draws, temperature=temperature).mean()
