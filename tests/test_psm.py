"""PSM: float64 references transcribed from docs/methods.md, limits, invariances, gradcheck, bank and EMA, 2 gloo ranks."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import save_rank, spawn_ranks

from pipeline import config, dist
from pipeline.losses import nt_xent
from pipeline.losses.psm import (
    VARIANTS,
    acceptance_probability,
    counter_uniform,
    draw_seed,
    fifo_enqueue,
    nearest_neighbors,
    psm_hard_loss,
    psm_soft_loss,
    psm_soft_parts,
    soft_weights,
)
from pipeline.models import bn_mlp, ema_update_, momentum_copy
from pipeline.objectives import PSMObjective, build_objective

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------------
# References: literal loops in float64, the acceptance draw given as a fixed mask
# --------------------------------------------------------------------------------------------------


def ref_soft(q, q_pre, keep, accept, t, weighting):
    """L_soft = mean_i sum_{p in P_i} w_ip -log(e^{s_ip/t} / (sum_{p'} e^{s_ip'/t} + sum_{kept n} e^{s_in/t}))."""
    q = F.normalize(q.double(), dim=1)
    q_pre = F.normalize(q_pre.double(), dim=1)
    keep = F.normalize(keep.double(), dim=-1)
    b, k1, _ = keep.shape
    terms = []
    for i in range(q.shape[0]):
        pos = [q[i] @ keep[i, m] for m in range(k1)]
        negs = [
            torch.exp(q[i] @ keep[j, m] / t) for j in range(b) for m in range(k1) if j != i and accept[i, j * k1 + m]
        ]
        den = sum(torch.exp(p / t) for p in pos) + (sum(negs) if negs else 0.0)
        if weighting == "hard" or k1 == 1:
            w = [1.0] * k1
        else:
            att = torch.stack([q_pre[i] @ keep[i, m] for m in range(1, k1)])
            w = [1.0] + list(torch.softmax(att, dim=0))
        terms.append(sum(w[m] * -torch.log(torch.exp(pos[m] / t) / den) for m in range(k1)))
    return torch.stack(terms).mean()


def ref_hard(q, k, accept, t):
    """Rows [q; k] (2B): positive = the partner, negatives = the other 2B - 2 rows where accepted."""
    out = torch.cat([F.normalize(q.double(), dim=1), F.normalize(k.double(), dim=1)])
    b = q.shape[0]
    terms = []
    for i in range(2 * b):
        j_pos = (i + b) % (2 * b)
        pos = torch.exp(out[i] @ out[j_pos] / t)
        negs = [torch.exp(out[i] @ out[j] / t) for j in range(2 * b) if j not in (i, j_pos) and accept[i, j]]
        ng = sum(negs) if negs else 0.0
        terms.append(-torch.log(pos / (pos + ng)))
    return torch.stack(terms).mean()


def release_hard_contrastive(out_1, out_2, selected, t):
    """The release's hard_contrastive (dhkdhk/PSM src/model/psm.py:234-282, commit 724775d) given its draw.

    ``selected`` (2B, 2B - 2) is the Bernoulli sample of lines 260-261 over the masked_select-ed negatives
    (self and partner removed, row order). Everything after the draw as the release runs it, in float64:
    pos (2B, 1) + Ng (2B,) broadcast to (2B, 2B) before the mean, and the x55 == 1 entries dropped.
    """
    out_1, out_2 = out_1.double(), out_2.double()
    feat_q, feat_k = F.normalize(out_1, dim=1), F.normalize(out_2, dim=1)
    pos = torch.exp((feat_q * feat_k).sum(dim=1)[:, None] / t)  # (B, 1), lines 242-244
    pos = torch.cat([pos, pos], dim=0)  # (2B, 1), line 245
    out = torch.cat([feat_q, feat_k], dim=0)  # (2B, d), line 264
    b = out_1.shape[0]
    mask = torch.ones(2 * b, 2 * b, dtype=torch.bool)  # get_negative_mask: no self, no partner
    mask[torch.arange(2 * b), torch.arange(2 * b)] = False
    mask[torch.arange(2 * b), (torch.arange(2 * b) + b) % (2 * b)] = False
    neg_true = (out @ out.T).masked_select(mask).view(2 * b, -1)  # (2B, 2B - 2), lines 265-268
    x55 = torch.exp(neg_true * selected.double() / t)  # lines 270-271: a rejected negative gives e^0 = 1
    x55 = x55 * (x55 != 1).double()  # lines 273-276: ... and every 1 is removed
    ng = x55.sum(dim=-1)  # (2B,), line 279
    return (-torch.log(pos / (pos + ng))).mean()  # line 281: (2B, 1) against (2B,) -> (2B, 2B)


def _release_draw(q, k, a, b_shift, generator):
    """The release's acceptance draw (lines 239-261): Bernoulli on raw dot products -> (2B, 2B - 2) and our (2B, 2B) mask."""
    b = q.shape[0]
    raw = torch.cat([q, k]) @ torch.cat([q, k]).T  # (2B, 2B)
    pos = (q * k).sum(dim=1).repeat(2)[:, None]  # (2B, 1)
    off = ~torch.eye(2 * b, dtype=torch.bool)
    off[torch.arange(2 * b), (torch.arange(2 * b) + b) % (2 * b)] = False
    neg = raw.masked_select(off).view(2 * b, -1)
    p = torch.exp(-a * (neg - pos - b_shift) ** 2).clamp(0.0, 0.999)
    selected = torch.bernoulli(p, generator=generator)  # (2B, 2B - 2)
    accept = torch.zeros(2 * b, 2 * b, dtype=torch.bool)
    accept[off] = selected.bool().reshape(-1)
    return selected, accept


def _data(b=5, d=4, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, d, generator=g, dtype=torch.float64)
    q_pre = q + 0.5 * torch.randn(b, d, generator=g, dtype=torch.float64)
    keys = q + 0.7 * torch.randn(b, d, generator=g, dtype=torch.float64)
    keep = torch.cat([keys[:, None], keys[:, None] + 0.8 * torch.randn(b, k, d, generator=g, dtype=torch.float64)], 1)
    accept = torch.rand(b, b * (k + 1), generator=g) < 0.6
    return q, q_pre, keep, accept


def _vg(f, *xs):
    xs = [x.detach().clone().requires_grad_(True) for x in xs]
    loss = f(*xs)
    return (loss.detach(), *torch.autograd.grad(loss, xs, allow_unused=True, materialize_grads=True))


def _close(a, b, rtol=1e-10, atol=1e-12):
    for u, v in zip(a, b, strict=True):
        torch.testing.assert_close(u, v.to(u.dtype), rtol=rtol, atol=atol)


@pytest.mark.parametrize("weighting", ["soft", "hard"])
@pytest.mark.parametrize("t", [0.5, 0.2])
def test_soft_matches_reference(weighting, t):
    q, q_pre, keep, accept = _data()
    f = lambda a, b: psm_soft_loss(a, b, keep, temperature=t, weighting=weighting, accept=accept)  # noqa: E731
    r = lambda a, b: ref_soft(a, b, keep, accept, t, weighting)  # noqa: E731
    _close(_vg(f, q, q_pre), _vg(r, q, q_pre))


@pytest.mark.parametrize("t", [0.5, 0.2])
def test_hard_matches_reference(t):
    q, _, keep, _ = _data(b=6)
    k = keep[:, 0]
    accept = torch.rand(12, 12, generator=torch.Generator().manual_seed(3)) < 0.5
    f = lambda a: psm_hard_loss(a, k, temperature=t, accept=accept)  # noqa: E731
    _close(_vg(f, q), _vg(lambda a: ref_hard(a, k, accept, t), q))


@pytest.mark.parametrize("scale", [0.25, 0.5, 1.0])
@pytest.mark.parametrize("t", [0.5, 0.2])
def test_release_variant_is_the_release_broadcast(t, scale):
    """loss.psm_variant=release: L_hard equals a transcription of the release's lines, loss and gradient to 1e-12."""
    g = torch.Generator().manual_seed(17)
    b, d = 6, 8
    q = scale * torch.randn(b, d, generator=g, dtype=torch.float64)
    k = q + scale * 0.8 * torch.randn(b, d, generator=g, dtype=torch.float64)
    selected, accept = _release_draw(q, k, 0.5, 0.0, torch.Generator().manual_seed(5))
    assert 0 < selected.mean() < 1  # some negatives kept, some rejected
    _, _, mean_over = VARIANTS["release"]
    ours = _vg(lambda a: psm_hard_loss(a, k, temperature=t, accept=accept, mean_over=mean_over), q)
    theirs = _vg(lambda a: release_hard_contrastive(a, k, selected, t), q)
    torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(ours[1], theirs[1], rtol=0, atol=1e-12)
    rowwise = psm_hard_loss(q, k, temperature=t, accept=accept, mean_over=VARIANTS["release_rowwise"][2])
    torch.testing.assert_close(rowwise, ref_hard(q, k, accept, t), rtol=0, atol=1e-12)  # the paper's equation
    assert abs(rowwise - ours[0]) > 1e-3  # the two reductions are different losses


def test_hard_pairs_limits():
    """Pairs mean: equal to the row mean when every Ng_j is the same; 0 with nothing kept, with a zero gradient."""
    q, _, keep, _ = _data(b=6)
    k = keep[:, 0]
    kw = dict(temperature=0.5, mean_over="pairs")
    none = torch.zeros(12, 12, dtype=torch.bool)
    got = _vg(lambda a: psm_hard_loss(a, k, accept=none, **kw), q)
    assert got[0].item() == 0.0 and torch.equal(got[1], torch.zeros_like(q))
    # q = k, B = 2, every negative kept: all four rows have the same positive and the same Ng
    z = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=torch.float64)
    every = torch.ones(4, 4, dtype=torch.bool)
    pairs = psm_hard_loss(z, z, temperature=0.5, accept=every, mean_over="pairs")
    rows = psm_hard_loss(z, z, temperature=0.5, accept=every, mean_over="anchors")
    torch.testing.assert_close(pairs, rows, rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="mean_over='rows'"):
        psm_hard_loss(q, k, temperature=0.5, mean_over="rows")


def test_soft_k0_accept_all_is_infonce():
    """K = 0 and every negative kept: L_soft is the cross-entropy of q against all keys."""
    q, q_pre, keep, _ = _data(b=6, k=0)
    t = 0.3
    got = psm_soft_loss(q, q_pre, keep, temperature=t, accept=torch.ones(6, 6, dtype=torch.bool))
    logits = F.normalize(q, dim=1) @ F.normalize(keep[:, 0], dim=1).T / t
    torch.testing.assert_close(got, F.cross_entropy(logits, torch.arange(6)))


def test_hard_accept_all_is_nt_xent():
    q, _, keep, _ = _data(b=6)
    got = psm_hard_loss(q, keep[:, 0], temperature=0.5, accept=torch.ones(12, 12, dtype=torch.bool))
    torch.testing.assert_close(got, nt_xent(q, keep[:, 0], temperature=0.5))


def test_nothing_accepted_leaves_the_positives_only():
    q, q_pre, keep, _ = _data(b=4, k=2)
    none = torch.zeros(4, 12, dtype=torch.bool)
    got = psm_soft_loss(q, q_pre, keep, temperature=0.5, weighting="hard", accept=none)
    s = torch.einsum("nd,nkd->nk", F.normalize(q, dim=1), F.normalize(keep, dim=-1)) / 0.5  # (n, K+1)
    torch.testing.assert_close(got, (torch.logsumexp(s, 1, keepdim=True) - s).sum(1).mean())
    assert psm_hard_loss(q, keep[:, 0], temperature=0.5, accept=torch.zeros(8, 8, dtype=torch.bool)).item() == 0.0


def test_acceptance_probability_values():
    s_pos = torch.tensor([0.5, 0.5, 0.5, 0.2])
    s_neg = torch.tensor([[0.5], [1.5], [-0.5], [0.2]])
    p = acceptance_probability(s_neg, s_pos, a=0.5, b=0.0).squeeze(1)
    torch.testing.assert_close(p, torch.tensor([0.999, math.exp(-0.5), math.exp(-0.5), 0.999]))
    p_b = acceptance_probability(torch.tensor([[0.7]]), torch.tensor([0.5]), a=2.0, b=0.2)
    assert p_b.item() == pytest.approx(0.999)  # s_neg - s_pos = b: the peak, clipped
    p_far = acceptance_probability(torch.tensor([[-1.0]]), torch.tensor([1.0]), a=0.5, b=0.0)
    assert p_far.item() == pytest.approx(math.exp(-2.0))  # the easiest negative is still kept sometimes
    assert acceptance_probability(torch.rand(3, 4), torch.rand(3), a=0.0, b=0.0).eq(0.999).all()
    s = torch.rand(2, 3, requires_grad=True)
    assert not acceptance_probability(s, s[:, 0], 0.5, 0.0).requires_grad  # the draw is not differentiated


def _splitmix_numpy(seed, index):
    with np.errstate(over="ignore"):
        x = np.uint64(seed) + index.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(40)).astype(np.float64) / 2**24


def test_counter_uniform_is_splitmix64_and_row_local():
    seed, rows, n_cols = 123456789, torch.tensor([0, 3, 7]), 5
    got = counter_uniform(seed, rows, n_cols)
    index = rows.numpy()[:, None] * n_cols + np.arange(n_cols) + 1
    np.testing.assert_array_equal(got.double().numpy(), _splitmix_numpy(seed, index))
    full = counter_uniform(seed, torch.arange(8), n_cols)
    assert torch.equal(full[rows], got)  # any subset of rows reproduces the full matrix
    big = counter_uniform(7, torch.arange(400), 500)
    assert 0.0 <= big.min() and big.max() < 1.0 and abs(big.mean().item() - 0.5) < 0.005
    assert not torch.equal(counter_uniform(8, torch.arange(4), 5), counter_uniform(7, torch.arange(4), 5))


def test_seeded_acceptance_follows_p_and_the_generator():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(64, 8, generator=g)
    keep = (q + 0.5 * torch.randn(64, 8, generator=g))[:, None]  # K = 0
    parts = psm_soft_parts(q, q, keep, temperature=0.5, generator=torch.Generator().manual_seed(5))
    again = psm_soft_parts(q, q, keep, temperature=0.5, generator=torch.Generator().manual_seed(5))
    assert torch.equal(parts.kept, again.kept) and torch.equal(parts.loss, again.loss)
    assert not parts.kept.diagonal().any()  # a positive is never a negative
    p = acceptance_probability(parts.sim, parts.pos_sim[:, 0], 0.5, 0.0)
    off = ~torch.eye(64, dtype=torch.bool)
    assert abs(parts.kept[off].float().mean() - p[off].mean()) < 0.02  # Bernoulli(p)
    seed = draw_seed(torch.Generator().manual_seed(5))
    expected = (counter_uniform(seed, torch.arange(64), 64) < p) & off
    assert torch.equal(parts.kept, expected)


@pytest.mark.parametrize("weighting", ["soft", "hard"])
def test_soft_invariances(weighting):
    """Permuting the batch (with the mask), or the neighbours within a row, leaves L_soft unchanged."""
    q, q_pre, keep, accept = _data(b=5, k=3, seed=4)
    f = lambda a, b, c, m: psm_soft_loss(a, b, c, temperature=0.5, weighting=weighting, accept=m)  # noqa: E731
    base = f(q, q_pre, keep, accept)
    perm = torch.tensor([3, 0, 4, 1, 2])
    cols = (perm[:, None] * 4 + torch.arange(4)).reshape(-1)
    torch.testing.assert_close(f(q[perm], q_pre[perm], keep[perm], accept[perm][:, cols]), base)
    nn_perm = torch.tensor([0, 2, 3, 1])
    cols = (torch.arange(5)[:, None] * 4 + nn_perm).reshape(-1)
    torch.testing.assert_close(f(q, q_pre, keep[:, nn_perm], accept[:, cols]), base)
    torch.testing.assert_close(f(3.0 * q, 0.5 * q_pre, 2.0 * keep, accept), base)  # scale invariance


def test_soft_rows_split_over_ranks_average_to_the_whole():
    q, q_pre, keep, accept = _data(b=6, k=2, seed=5)
    whole = psm_soft_loss(q, q_pre, keep, temperature=0.5, accept=accept)
    halves = [
        psm_soft_loss(
            q[r * 3 : (r + 1) * 3],
            q_pre[r * 3 : (r + 1) * 3],
            keep,
            temperature=0.5,
            row_offset=3 * r,
            accept=accept[r * 3 : (r + 1) * 3],
        )
        for r in range(2)
    ]
    torch.testing.assert_close(torch.stack(halves).mean(), whole)
    seeded = [
        psm_soft_loss(
            q[r * 3 : (r + 1) * 3],
            q_pre[r * 3 : (r + 1) * 3],
            keep,
            temperature=0.5,
            row_offset=3 * r,
            generator=torch.Generator().manual_seed(1),
        )
        for r in range(2)
    ]
    one = psm_soft_loss(q, q_pre, keep, temperature=0.5, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(torch.stack(seeded).mean(), one)  # same draws at any layout


def test_soft_weights():
    q_pre = torch.tensor([[1.0, 0.0]])
    nbrs = torch.tensor([[[2.0, 0.0], [0.0, 1.0]]])
    w = soft_weights(q_pre, nbrs, "soft")
    e = math.e
    torch.testing.assert_close(w, torch.tensor([[1.0, e / (e + 1), 1 / (e + 1)]]))
    assert torch.equal(soft_weights(q_pre, nbrs, "hard"), torch.ones(1, 3))
    with pytest.raises(ValueError, match="weighting='x'"):
        soft_weights(q_pre, nbrs, "x")


def test_low_temperature_is_finite_and_exact():
    q, q_pre, keep, accept = _data(b=6, k=3, seed=6)
    for t in (0.1, 0.05):
        got = psm_soft_loss(q.float(), q_pre.float(), keep.float(), temperature=t, accept=accept)
        assert got.dtype == torch.float32 and torch.isfinite(got)
        torch.testing.assert_close(got.double(), ref_soft(q, q_pre, keep, accept, t, "soft"), rtol=2e-5, atol=2e-5)
        hard_mask = torch.ones(12, 12, dtype=torch.bool)
        got = psm_hard_loss(q.float(), keep[:, 0].float(), temperature=t, accept=hard_mask)
        torch.testing.assert_close(got.double(), ref_hard(q, keep[:, 0], hard_mask, t), rtol=2e-5, atol=2e-5)
        k = keep[:, 0]
        selected, accept_release = _release_draw(q, k, 0.5, 0.0, torch.Generator().manual_seed(1))
        got = psm_hard_loss(q.float(), k.float(), temperature=t, accept=accept_release, mean_over="pairs")
        assert torch.isfinite(got)  # e^{1/t} ~ e^20 in float64 inside the transcription; log space here
        torch.testing.assert_close(got.double(), release_hard_contrastive(q, k, selected, t), rtol=2e-5, atol=2e-5)


def test_bf16_autocast_still_computes_in_float32():
    q, q_pre, keep, accept = (x.float() if x.is_floating_point() else x for x in _data(b=6, k=3, seed=9))
    hard_accept = torch.ones(12, 12, dtype=torch.bool)
    plain = (
        psm_soft_loss(q, q_pre, keep, temperature=0.1, accept=accept),
        psm_hard_loss(q, keep[:, 0], temperature=0.1, accept=hard_accept),
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = (
            psm_soft_loss(q, q_pre, keep, temperature=0.1, accept=accept),
            psm_hard_loss(q, keep[:, 0], temperature=0.1, accept=hard_accept),
        )
    for a, p in zip(auto, plain, strict=True):
        assert a.dtype == torch.float32 and torch.equal(a, p)  # the matmuls did not drop to bf16


@pytest.mark.parametrize("weighting", ["soft", "hard"])
def test_gradcheck(weighting):
    q, q_pre, keep, accept = _data(b=3, d=3, k=2, seed=7)
    q.requires_grad_(True)
    q_pre.requires_grad_(True)
    f = lambda a, b: psm_soft_loss(a, b, keep, temperature=0.5, weighting=weighting, accept=accept)  # noqa: E731
    assert torch.autograd.gradcheck(f, (q, q_pre), eps=1e-6, atol=1e-5)
    hard_accept = torch.rand(6, 6, generator=torch.Generator().manual_seed(2)) < 0.5
    for mean_over in ("anchors", "pairs"):
        assert torch.autograd.gradcheck(
            lambda a, mean_over=mean_over: psm_hard_loss(
                a, keep[:, 0], temperature=0.5, accept=hard_accept, mean_over=mean_over
            ),
            (q,),
            eps=1e-6,
            atol=1e-5,
        )


def test_argument_validation():
    q, q_pre, keep, _ = _data(b=4, k=1)
    with pytest.raises(ValueError, match="temperature"):
        psm_soft_loss(q, q_pre, keep, temperature=0.0)
    with pytest.raises(ValueError, match="accept_a"):
        psm_soft_loss(q, q_pre, keep, temperature=0.5, accept_a=-1.0)
    with pytest.raises(ValueError, match="row_offset"):
        psm_soft_loss(q, q_pre, keep, temperature=0.5, row_offset=1)
    with pytest.raises(ValueError, match="accept"):
        psm_soft_loss(q, q_pre, keep, temperature=0.5, accept=torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="expected"):
        psm_soft_loss(q, q_pre[:, :2], keep, temperature=0.5)


# --------------------------------------------------------------------------------------------------
# Memory bank, neighbours, EMA
# --------------------------------------------------------------------------------------------------


def test_nearest_neighbors_match_brute_force():
    g = torch.Generator().manual_seed(8)
    keys, bank = torch.randn(6, 5, generator=g), torch.randn(20, 5, generator=g) * 3
    vals, idx = nearest_neighbors(keys, bank, 4)
    for i in range(6):
        cos = [float(F.normalize(keys[i], dim=0) @ F.normalize(bank[j], dim=0)) for j in range(20)]
        assert idx[i].tolist() == sorted(range(20), key=lambda j: -cos[j])[:4]
    torch.testing.assert_close(vals, F.normalize(bank, dim=1)[idx])
    assert nearest_neighbors(keys, bank, 0)[0].shape == (6, 0, 5)
    with pytest.raises(ValueError, match="k=21"):
        nearest_neighbors(keys, bank, 21)


def test_fifo_order_and_wrap_around():
    bank = torch.zeros(5, 1)
    bank, ptr = fifo_enqueue(bank, 0, torch.tensor([[1.0], [2.0]]))
    assert ptr == 2 and bank.squeeze(1).tolist() == [1, 2, 0, 0, 0]
    bank, ptr = fifo_enqueue(bank, ptr, torch.tensor([[3.0], [4.0]]))
    before = bank.clone()
    bank, ptr = fifo_enqueue(bank, ptr, torch.tensor([[5.0], [6.0]]))  # crosses the end: wraps to slot 0
    assert ptr == 1 and bank.squeeze(1).tolist() == [6, 2, 3, 4, 5]
    assert before.squeeze(1).tolist() == [1, 2, 3, 4, 0]  # pure: the input bank is untouched
    bank, ptr = fifo_enqueue(bank, ptr, torch.arange(7.0, 14.0)[:, None])  # 7 keys > size 5: the last 5 stay
    assert ptr == (1 + 7) % 5 and sorted(bank.squeeze(1).tolist()) == [9, 10, 11, 12, 13]
    assert bank[(ptr - 1) % 5].item() == 13  # the newest sits just before the pointer
    with pytest.raises(ValueError, match="ptr=5"):
        fifo_enqueue(bank, 5, torch.zeros(1, 1))


def test_ema_update_and_momentum_copy():
    torch.manual_seed(0)
    online = bn_mlp(3, 4, 2)
    twin = momentum_copy(online)
    assert all(not p.requires_grad for p in twin.parameters())
    assert all(torch.equal(a, b) for a, b in zip(twin.parameters(), online.parameters(), strict=True))
    old = [p.clone() for p in twin.parameters()]
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
    ema_update_(twin, online, 0.9)
    for o, t, s in zip(old, twin.parameters(), online.parameters(), strict=True):
        torch.testing.assert_close(t, 0.9 * o + 0.1 * s)
    assert isinstance(online[-1], torch.nn.BatchNorm1d) and not online[-1].affine  # ends in BN without affine


# --------------------------------------------------------------------------------------------------
# The objective
# --------------------------------------------------------------------------------------------------

TINY = [
    "model.width=4",
    "model.proj_hidden_dim=16",
    "model.proj_dim=8",
    "loss.name=psm",
    "loss.psm_bank_size=32",
    "loss.psm_n_neighbors=3",
]


def _images(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randn(n, 3, 8, 8, generator=g), torch.arange(n) % 3


def test_objective_looks_up_before_enqueue_and_updates_the_momentum_branch(monkeypatch):
    torch.manual_seed(0)
    cfg = config.load(None, TINY)
    obj = build_objective(cfg, None, torch.Generator().manual_seed(0))
    assert isinstance(obj, PSMObjective) and obj.backbone is obj.encoder
    seen = []
    import pipeline.methods.psm as objectives  # the module PSMObjective lives in (moved from objectives.py)

    real = objectives.nearest_neighbors
    monkeypatch.setattr(
        objectives, "nearest_neighbors", lambda k, bank, n: seen.append(bank.clone()) or real(k, bank, n)
    )
    bank0 = obj.bank.clone()
    x1, x2, labels = _images(6, 1)
    loss, stats = obj(x1, x2, labels, with_stats=True)
    assert torch.equal(seen[0], bank0)  # the lookup saw the bank before this step's keys
    with torch.no_grad():
        keys = F.normalize(obj.momentum_projector(obj.momentum_encoder(x2)), dim=1)
    torch.testing.assert_close(obj.bank[:6], keys)  # view-2 keys, in order
    assert torch.equal(obj.bank[6:], bank0[6:]) and int(obj.bank_ptr) == 6
    assert obj.bank_labels[:6].tolist() == labels.tolist() and (obj.bank_labels[6:] == -1).all()
    assert {"sim_pos_mean", "sim_neg_max", "accept_rate", "false_neg_rate", "mined_same_class"} <= set(stats)
    assert all(v.dim() == 0 and not v.requires_grad for v in stats.values())
    loss.backward()
    assert all(p.grad is not None for p in obj.predictor.parameters()) and obj.encoder.conv1.weight.grad is not None
    assert all(p.grad is None for p in obj.momentum_encoder.parameters())
    before = [p.clone() for p in obj.momentum_encoder.parameters()]
    with torch.no_grad():
        for p in obj.encoder.parameters():
            p.add_(0.5)
    obj.after_step()
    for b, t, s in zip(before, obj.momentum_encoder.parameters(), obj.encoder.parameters(), strict=True):
        torch.testing.assert_close(t, 0.99 * b + 0.01 * s)


def test_objective_bank_state_travels_in_the_state_dict():
    torch.manual_seed(0)
    obj = build_objective(config.load(None, TINY))
    obj(*_images(4, 2))
    state = obj.state_dict()
    assert {"bank", "bank_ptr", "bank_labels"} <= set(state) and int(state["bank_ptr"]) == 4
    other = build_objective(config.load(None, TINY))
    other.load_state_dict(state)
    assert torch.equal(other.bank, obj.bank)


def test_config_validation():
    from pipeline.errors import HardnegError

    with pytest.raises(HardnegError, match="psm_n_neighbors=9 must be <= loss.psm_bank_size=8"):
        config.load(None, ["loss.name=psm", "loss.psm_bank_size=8", "loss.psm_n_neighbors=9"])
    with pytest.raises(HardnegError, match="psm_variant"):
        config.load(None, ["loss.psm_variant=medium"])
    c = config.load(None, ["loss.name=psm"]).loss
    assert (
        c.psm_momentum,
        c.psm_bank_size,
        c.psm_n_neighbors,
        c.psm_accept_a,
        c.psm_accept_b,
        c.psm_variant,
        c.psm_aa,
    ) == (0.99, 16384, 5, 0.5, 0.0, "release", 1.0)


# --------------------------------------------------------------------------------------------------
# Two gloo ranks: same bank on both, gathered loss and gradients equal one process
# --------------------------------------------------------------------------------------------------

WORLD, N_LOCAL = 2, 3


def _global():
    q, q_pre, keep, _ = _data(b=WORLD * N_LOCAL, d=4, k=2, seed=11)
    return q, q_pre, keep


def _losses(q, q_pre, keep, gather, offset):
    soft = psm_soft_loss(q, q_pre, keep, temperature=0.5, row_offset=offset, generator=torch.Generator().manual_seed(3))
    hard = psm_hard_loss(
        q,
        keep[:, 0][offset : offset + q.shape[0]],
        temperature=0.5,
        gather=gather,
        generator=torch.Generator().manual_seed(4),
    )
    raw = psm_hard_loss(
        2 * q,
        keep[:, 0][offset : offset + q.shape[0]],
        temperature=0.5,
        gather=gather,
        generator=torch.Generator().manual_seed(4),
        acceptance_on="raw",
    )  # the release's acceptance
    pairs = psm_hard_loss(
        q,
        keep[:, 0][offset : offset + q.shape[0]],
        temperature=0.5,
        gather=gather,
        generator=torch.Generator().manual_seed(4),
        mean_over="pairs",
    )  # the release's broadcast: Ng of the other rank's rows gathered with its gradient
    return soft, hard, raw, pairs


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    ctx = dist.init_process_group("gloo", f"tcp://127.0.0.1:{port}", rank, WORLD, timeout_s=120)
    try:
        gather = dist.make_gather(ctx)
        rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
        q_all, q_pre_all, keep = _global()
        result = {}
        for which in (0, 1, 2, 3):
            q = q_all[rows].clone().requires_grad_(True)
            q_pre = q_pre_all[rows].clone().requires_grad_(True)
            loss = _losses(q, q_pre, keep, gather, rank * N_LOCAL)[which]
            loss.backward()
            result[which] = (loss.detach(), q.grad, q_pre.grad)
        torch.manual_seed(0)  # the launcher's seed: identical weights and initial bank on every rank
        obj = build_objective(config.load(None, TINY), gather, torch.Generator().manual_seed(0))
        net = dist.wrap_ddp(obj, ctx)
        for step in range(3):  # different images per rank
            x1, x2, labels = _images(N_LOCAL, 100 * step + rank)
            loss, _ = net(x1, x2, labels + 10 * rank, with_stats=step == 2)
            loss.backward()
            obj.after_step()
        result["bank"] = (obj.bank.clone(), int(obj.bank_ptr), obj.bank_labels.clone())
        dist.barrier()
        save_rank(result, rank, out_dir)
    finally:
        dist.destroy_process_group()
    os._exit(0)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("psm_dist"))
    return spawn_ranks(_worker, WORLD, out_dir)


@pytest.mark.parametrize("which", [0, 1, 2, 3], ids=["soft", "hard", "hard_raw_acceptance", "hard_pairs"])
def test_gathered_loss_and_grads_equal_single_process(ranks, which):
    q, q_pre, keep = _global()
    q.requires_grad_(True)
    q_pre.requires_grad_(True)
    loss = _losses(q, q_pre, keep, None, 0)[which]
    loss.backward()
    torch.testing.assert_close(torch.stack([r[which][0] for r in ranks]).mean(), loss.detach())
    for rank, r in enumerate(ranks):
        rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
        torch.testing.assert_close(r[which][1] / WORLD, q.grad[rows])
        if which == 0:
            torch.testing.assert_close(r[which][2] / WORLD, q_pre.grad[rows])


def test_bank_is_identical_on_every_rank(ranks):
    (bank0, ptr0, labels0), (bank1, ptr1, labels1) = ranks[0]["bank"], ranks[1]["bank"]
    assert torch.equal(bank0, bank1) and torch.equal(labels0, labels1)
    assert ptr0 == ptr1 == 3 * WORLD * N_LOCAL
    # filled from the GLOBAL keys in rank order: rank 0's labels (0..2) then rank 1's (+10)
    assert labels0[: WORLD * N_LOCAL].tolist() == [0, 1, 2, 10, 11, 12]


def test_hard_loss_acceptance_on_raw_dot_products_as_the_release():
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    kw = dict(temperature=0.5, accept_a=0.5, accept_b=0.0)

    def loss(a, b, on):
        return psm_hard_loss(a, b, acceptance_on=on, generator=torch.Generator().manual_seed(0), **kw)

    unit_q, unit_k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    torch.testing.assert_close(loss(unit_q, unit_k, "raw"), loss(unit_q, unit_k, "cosine"))  # equal on unit vectors
    torch.testing.assert_close(loss(5 * q, 5 * k, "cosine"), loss(q, k, "cosine"))  # cosines: scale-free
    # raw: the acceptance reads (s_in - s_i+)^2 on dot products of norm ~sqrt(d) x scale; at scale 30 p ~ 0,
    # every negative is rejected and the loss is -log(pos / pos) = 0 (the release's inert L_hard)
    assert loss(30 * q, 30 * k, "raw").item() == pytest.approx(0.0, abs=1e-6)
    raw = torch.cat([q, k]) @ torch.cat([q, k]).T  # (2n, 2n) the release's raw logits
    pos = (q * k).sum(dim=1).repeat(2)
    p = acceptance_probability(raw, pos, 0.5, 0.0)
    rows = torch.arange(12)
    accept = counter_uniform(draw_seed(torch.Generator().manual_seed(0)), rows, 12) < p
    torch.testing.assert_close(loss(q, k, "raw"), psm_hard_loss(q, k, accept=accept, **kw))
    with pytest.raises(ValueError, match="acceptance_on"):
        loss(q, k, "dot")


def test_variant_release_is_hard_weighting_raw_acceptance_and_the_pairs_mean():
    assert VARIANTS == {
        "release": ("hard", "raw", "pairs"),
        "release_rowwise": ("hard", "raw", "anchors"),
        "paper": ("soft", "cosine", "anchors"),
    }
    assert config.load(None, ["loss.name=psm"]).loss.psm_variant == "release"
    assert config.load(None, ["loss.name=psm", "loss.psm_variant=release_rowwise"]).loss.psm_variant == (
        "release_rowwise"
    )


def test_checkpoints_stored_before_the_pairs_mean_load_as_release_rowwise(capsys):
    """A config stored without the format stamp (before 2026-12-04) that names `release` ran the per-anchor mean."""
    from pipeline import train

    cfg = config.load(None, ["loss.name=psm"])  # psm_variant=release: today's pair mean
    old = config.to_dict(cfg)  # as checkpoints stored it before: no "config_format"
    assert config.from_dict(config.upgrade(old)).loss.psm_variant == "release_rowwise"
    note = capsys.readouterr().err
    assert note.count("\n") == 1 and "loaded as release_rowwise" in note  # one line, at load time
    assert train.resume_mismatches(old, cfg) == ["loss.psm_variant: 'release_rowwise' -> 'release'"]
    capsys.readouterr()
    stored = train._state(torch.nn.Linear(2, 2), torch.optim.SGD([torch.zeros(1)], lr=0.1), 3, 1, cfg, None)["config"]
    assert stored["config_format"] == config.CONFIG_FORMAT == 2
    assert config.from_dict(config.upgrade(stored)) == cfg and train.resume_mismatches(stored, cfg) == []
    paper = config.to_dict(config.load(None, ["loss.name=psm", "loss.psm_variant=paper"]))
    assert config.from_dict(config.upgrade(paper)).loss.psm_variant == "paper"  # only `release` changed meaning
    assert capsys.readouterr().err == ""
