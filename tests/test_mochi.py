"""MoCHi: float64 references for the synthetic negatives and the logits, limits, gradcheck, queue, 2 gloo ranks."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from conftest import save_rank, spawn_ranks

from pipeline import config, dist
from pipeline.losses import draw_mixes, mochi_logits, mochi_loss, mochi_synthesize
from pipeline.objectives import MoCHiObjective, build_objective

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n=5, d=4, size=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, d, generator=g, dtype=torch.float64)
    k = q + 0.6 * torch.randn(n, d, generator=g, dtype=torch.float64)
    queue = torch.randn(size, d, generator=g, dtype=torch.float64) * 2
    return q, k, queue


def ref_synthetic(q, queue, n_hard, s, s_prime, seed):
    """Transcribed from docs/methods.md with the pinned draw protocol (one generator, B = all rows here)."""
    q = F.normalize(q.double(), dim=1)
    bank = F.normalize(queue.double(), dim=1)
    b = q.shape[0]
    n = min(n_hard, bank.shape[0])
    gen = torch.Generator().manual_seed(seed)
    pairs = torch.randint(0, n, (2, b, s), generator=gen)
    alpha = torch.rand((b, s, 1), generator=gen).double()
    picks = torch.randint(0, n, (b, s_prime), generator=gen)
    beta = 0.5 * torch.rand((b, s_prime, 1), generator=gen).double()
    out = []
    for i in range(b):
        hardest = sorted(range(bank.shape[0]), key=lambda j: -float(q[i] @ bank[j]))[:n]
        row = [
            F.normalize(
                alpha[i, m, 0] * bank[hardest[pairs[0, i, m]]] + (1 - alpha[i, m, 0]) * bank[hardest[pairs[1, i, m]]],
                dim=0,
            )
            for m in range(s)
        ]
        row += [
            F.normalize(beta[i, m, 0] * q[i] + (1 - beta[i, m, 0]) * bank[hardest[picks[i, m]]], dim=0)
            for m in range(s_prime)
        ]
        out.append(torch.stack(row) if row else torch.zeros(0, q.shape[1], dtype=torch.float64))
    return torch.stack(out)


def ref_loss(q, k, queue, synthetic, t):
    """-log( e^{q.k/t} / (e^{q.k/t} + sum_queue e^{q.n/t} + sum_synthetic e^{q.h/t}) ), mean over queries."""
    qn, kn, bank = (F.normalize(x.double(), dim=-1) for x in (q, k, queue))
    terms = []
    for i in range(q.shape[0]):
        pos = torch.exp(qn[i] @ kn[i] / t)
        neg = sum(torch.exp(qn[i] @ bank[j] / t) for j in range(bank.shape[0]))
        neg = neg + sum(torch.exp(qn[i] @ h / t) for h in synthetic[i])
        terms.append(-torch.log(pos / (pos + neg)))
    return torch.stack(terms).mean()


@pytest.mark.parametrize("n_hard,s,s_prime", [(4, 3, 2), (1, 2, 0), (100, 0, 3), (6, 5, 5)])
def test_synthetic_matches_reference(n_hard, s, s_prime):
    q, _, queue = _data()
    got = mochi_synthesize(
        q, queue, n_hard=n_hard, n_mix=s, n_mix_query=s_prime, generator=torch.Generator().manual_seed(3)
    )
    torch.testing.assert_close(got, ref_synthetic(q, queue, n_hard, s, s_prime, 3))
    assert not got.requires_grad and got.shape == (5, s + s_prime, 4)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(5, s + s_prime, dtype=torch.float64))


@pytest.mark.parametrize("t", [0.2, 0.07])
def test_loss_matches_reference(t):
    q, k, queue = _data(seed=1)
    kw = dict(n_hard=4, n_mix=3, n_mix_query=2)
    synthetic = ref_synthetic(q, queue, 4, 3, 2, seed=9)

    def f(a):
        return mochi_loss(a, k, queue, temperature=t, generator=torch.Generator().manual_seed(9), **kw)

    qa = q.clone().requires_grad_(True)
    qb = q.clone().requires_grad_(True)
    got, want = f(qa), ref_loss(qb, k, queue, synthetic, t)
    torch.testing.assert_close(got, want)
    got.backward()
    want.backward()  # the reference's synthetic vectors are constants too: detached, gradient via q only
    torch.testing.assert_close(qa.grad, qb.grad)


@pytest.mark.parametrize("t", [0.2, 0.05])
def test_closed_form_logits_equal_the_explicit_vectors(t):
    """The training path (no (n, m, d) tensor) gives the logits and gradients of the synthetic vectors."""
    q, k, queue = _data(n=7, size=20, seed=8)
    kw = dict(n_hard=6, n_mix=5, n_mix_query=4)
    draws = draw_mixes(q, queue, generator=torch.Generator().manual_seed(2), **kw)
    synthetic = mochi_synthesize(q, queue, generator=torch.Generator().manual_seed(2), **kw)
    qa = q.clone().requires_grad_(True)
    qb = q.clone().requires_grad_(True)
    fast = mochi_logits(qa, k, queue, draws, temperature=t)
    slow = mochi_logits(qb, k, queue, synthetic=synthetic, temperature=t)
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)
    w = torch.randn(fast.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    (fast * w).sum().backward()
    (slow * w).sum().backward()
    torch.testing.assert_close(qa.grad, qb.grad, rtol=1e-10, atol=1e-12)


def test_logit_layout_and_moco_limit():
    """Column 0 is the positive, then the queue, then the synthetics; without mixing it is MoCo's InfoNCE."""
    q, k, queue = _data(seed=2)
    logits = mochi_logits(q, k, queue, None, temperature=0.2)
    qn, kn, bank = F.normalize(q, dim=1), F.normalize(k, dim=1), F.normalize(queue, dim=1)
    torch.testing.assert_close(logits, torch.cat([(qn * kn).sum(1, keepdim=True), qn @ bank.T], 1) / 0.2)
    plain = mochi_loss(q, k, queue, temperature=0.2, n_hard=4, n_mix=0, n_mix_query=0)
    torch.testing.assert_close(plain, F.cross_entropy(logits, torch.zeros(5, dtype=torch.long)))


def test_query_mixes_are_closer_to_the_query_than_their_negative():
    """beta in [0, 0.5]: h' lies on the arc between n_c and q, so q.h' >= q.n_c; n_hard = 1: the hardest key."""
    q, _, queue = _data(n=8, size=30, seed=3)
    h = mochi_synthesize(q, queue, n_hard=1, n_mix=4, n_mix_query=6, generator=torch.Generator().manual_seed(0))
    qn, bank = F.normalize(q, dim=1), F.normalize(queue, dim=1)
    hardest = bank[(qn @ bank.T).argmax(1)]  # (n, d)
    torch.testing.assert_close(h[:, :4], hardest[:, None].expand(-1, 4, -1))  # a mix of a key with itself
    cos_mix = torch.einsum("nd,nmd->nm", qn, h[:, 4:])
    assert (cos_mix >= (qn * hardest).sum(1, keepdim=True) - 1e-12).all()
    assert (cos_mix < 1).all()  # never the query itself (beta < 0.5)


def test_rows_split_over_ranks_reproduce_the_draws():
    q, k, queue = _data(n=6, seed=4)
    kw = dict(temperature=0.2, n_hard=5, n_mix=3, n_mix_query=2)
    whole = mochi_loss(q, k, queue, generator=torch.Generator().manual_seed(1), **kw)
    halves = [
        mochi_loss(
            q[r * 3 : (r + 1) * 3],
            k[r * 3 : (r + 1) * 3],
            queue,
            generator=torch.Generator().manual_seed(1),
            row_offset=3 * r,
            n_rows_global=6,
            **kw,
        )
        for r in range(2)
    ]
    torch.testing.assert_close(torch.stack(halves).mean(), whole)


def test_gradcheck_and_low_temperature():
    q, k, queue = _data(n=3, d=3, size=6, seed=5)
    synthetic = mochi_synthesize(q, queue, n_hard=3, n_mix=2, n_mix_query=2, generator=torch.Generator().manual_seed(0))

    def f(a):
        logits = mochi_logits(a, k, queue, synthetic=synthetic, temperature=0.2)
        return (torch.logsumexp(logits, 1) - logits[:, 0]).mean()

    # Frozen synthetic vectors: finite differences must not move them (they are detached by design);
    # the closed-form path has the same gradient (test_closed_form_logits_equal_the_explicit_vectors).
    assert torch.autograd.gradcheck(f, (q.clone().requires_grad_(True),), eps=1e-6, atol=1e-5)
    got = mochi_loss(
        q.float(),
        k.float(),
        queue.float(),
        temperature=0.02,
        n_hard=3,
        n_mix=2,
        n_mix_query=2,
        generator=torch.Generator().manual_seed(0),
    )
    assert got.dtype == torch.float32 and torch.isfinite(got)
    torch.testing.assert_close(got.double(), ref_loss(q, k, queue, synthetic, 0.02), rtol=1e-4, atol=1e-4)


def test_bf16_autocast_still_computes_in_float32():
    q, k, queue = (x.float() for x in _data(seed=7))
    kw = dict(temperature=0.07, n_hard=4, n_mix=3, n_mix_query=2)
    plain = mochi_loss(q, k, queue, generator=torch.Generator().manual_seed(0), **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = mochi_loss(q, k, queue, generator=torch.Generator().manual_seed(0), **kw)
    assert auto.dtype == torch.float32 and torch.equal(auto, plain)


def test_argument_validation():
    q, k, queue = _data()
    with pytest.raises(ValueError, match="n_hard=0"):
        mochi_synthesize(q, queue, n_hard=0, n_mix=1, n_mix_query=1)
    with pytest.raises(ValueError, match="n_mix=-1"):
        mochi_synthesize(q, queue, n_hard=2, n_mix=-1, n_mix_query=1)
    with pytest.raises(ValueError, match="temperature"):
        mochi_logits(q, k, queue, None, temperature=0)
    with pytest.raises(ValueError, match="row_offset"):
        mochi_synthesize(q, queue, n_hard=2, n_mix=1, n_mix_query=1, row_offset=2, n_rows_global=6)


TINY = [
    "model.width=4",
    "model.proj_hidden_dim=16",
    "model.proj_dim=8",
    "loss.name=mochi",
    "loss.mochi_queue_size=16",
    "loss.mochi_n_hard=4",
    "loss.mochi_s=3",
    "loss.mochi_s_prime=2",
    "loss.temperature=0.2",
]


def _images(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randn(n, 3, 8, 8, generator=g), torch.arange(n) % 3


def test_objective_uses_the_queue_before_enqueue_and_moves_the_key_encoder():
    torch.manual_seed(0)
    obj = build_objective(config.load(None, TINY), None, torch.Generator().manual_seed(0))
    assert isinstance(obj, MoCHiObjective) and obj.backbone is obj.encoder.backbone
    queue0 = obj.queue.clone()
    x1, x2, labels = _images(5, 1)
    loss, stats = obj(x1, x2, labels, with_stats=True)
    with torch.no_grad():
        q, k = obj.encoder(x1), F.normalize(obj.momentum(x2), dim=1)
    expected = mochi_loss(
        q, k, queue0, temperature=0.2, n_hard=4, n_mix=3, n_mix_query=2, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(loss.detach(), expected)  # the loss saw the queue before this step's keys
    torch.testing.assert_close(obj.queue[:5], k)
    assert torch.equal(obj.queue[5:], queue0[5:]) and int(obj.queue_ptr) == 5
    assert obj.queue_labels[:5].tolist() == labels.tolist()
    assert {"sim_pos_mean", "sim_neg_max", "sim_syn_mean", "false_neg_rate"} <= set(stats)
    loss.backward()
    assert all(p.grad is None for p in obj.momentum.parameters())
    before = [p.clone() for p in obj.momentum.parameters()]
    with torch.no_grad():
        for p in obj.encoder.parameters():
            p.add_(1.0)
    obj.after_step()
    for b, t, s in zip(before, obj.momentum.parameters(), obj.encoder.parameters(), strict=True):
        torch.testing.assert_close(t, 0.999 * b + 0.001 * s)
    for _ in range(3):  # 4 steps x 5 keys = 20 > 16: the ring wraps around
        obj(*_images(5, 2))
    assert int(obj.queue_ptr) == 20 % 16


def test_config_defaults_and_validation():
    from pipeline.errors import HardnegError

    c = config.load(None, ["loss.name=mochi"]).loss
    assert (c.mochi_momentum, c.mochi_queue_size, c.mochi_n_hard, c.mochi_s, c.mochi_s_prime) == (
        0.999,
        65536,
        1024,
        1024,
        512,
    )
    with pytest.raises(HardnegError, match="mochi_n_hard=64 must be <= loss.mochi_queue_size=32"):
        config.load(None, ["loss.name=mochi", "loss.mochi_queue_size=32", "loss.mochi_n_hard=64"])


# ---------------------------------------------------------------------------------------------------
# Two gloo ranks: the queue stays identical; the per-rank losses average to the single-process one
# ---------------------------------------------------------------------------------------------------

WORLD, N_LOCAL = 2, 3


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    ctx = dist.init_process_group("gloo", f"tcp://127.0.0.1:{port}", rank, WORLD, timeout_s=120)
    try:
        q_all, k_all, queue = _data(n=WORLD * N_LOCAL, seed=6)
        rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
        q = q_all[rows].clone().requires_grad_(True)
        loss = mochi_loss(
            q,
            k_all[rows],
            queue,
            temperature=0.2,
            n_hard=5,
            n_mix=3,
            n_mix_query=2,
            generator=torch.Generator().manual_seed(2),
            row_offset=rank * N_LOCAL,
            n_rows_global=WORLD * N_LOCAL,
        )
        loss.backward()
        result = {"loss": (loss.detach(), q.grad)}
        torch.manual_seed(0)
        obj = build_objective(config.load(None, TINY), dist.make_gather(ctx), torch.Generator().manual_seed(0))
        net = dist.wrap_ddp(obj, ctx)
        for step in range(3):
            x1, x2, labels = _images(N_LOCAL, 10 * step + rank)
            loss, _ = net(x1, x2, labels + 10 * rank, with_stats=step == 1)
            loss.backward()
            obj.after_step()
        result["queue"] = (obj.queue.clone(), int(obj.queue_ptr), obj.queue_labels.clone())
        dist.barrier()
        save_rank(result, rank, out_dir)
    finally:
        dist.destroy_process_group()
    os._exit(0)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("mochi_dist"))
    return spawn_ranks(_worker, WORLD, out_dir)


def test_gathered_loss_and_grads_equal_single_process(ranks):
    q, k, queue = _data(n=WORLD * N_LOCAL, seed=6)
    q.requires_grad_(True)
    loss = mochi_loss(
        q, k, queue, temperature=0.2, n_hard=5, n_mix=3, n_mix_query=2, generator=torch.Generator().manual_seed(2)
    )
    loss.backward()
    torch.testing.assert_close(torch.stack([r["loss"][0] for r in ranks]).mean(), loss.detach())
    for rank, r in enumerate(ranks):
        torch.testing.assert_close(r["loss"][1] / WORLD, q.grad[rank * N_LOCAL : (rank + 1) * N_LOCAL])


def test_queue_is_identical_on_every_rank(ranks):
    (q0, p0, l0), (q1, p1, l1) = ranks[0]["queue"], ranks[1]["queue"]
    assert torch.equal(q0, q1) and torch.equal(l0, l1) and p0 == p1 == (3 * WORLD * N_LOCAL) % 16
    # the GLOBAL keys in rank order, 18 of them through a ring of 16: the last two wrapped to the front
    assert l0.tolist() == [11, 12, 2, 10, 11, 12, 0, 1, 2, 10, 11, 12, 0, 1, 2, 10]


def test_shuffle_bn_keys_use_other_sub_batch_statistics_and_return_in_order():
    from torch import nn

    from pipeline.methods.mochi import _shuffled_bn_forward  # moved from pipeline/objectives.py

    bn = nn.BatchNorm1d(3).train()
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_shuffled_bn_forward(bn, x, 1), bn(x))
    torch.manual_seed(5)
    got = _shuffled_bn_forward(bn, x, 2)
    torch.manual_seed(5)
    perm = torch.randperm(8)
    expected = torch.empty_like(x)
    for part in perm.chunk(2):  # each row normalised with the statistics of its shuffled half
        expected[part] = (x[part] - x[part].mean(0)) / torch.sqrt(x[part].var(0, unbiased=False) + bn.eps)
    torch.testing.assert_close(got, expected)
    cfg = config.load(
        None, [*TINY, "model.shuffle_bn_groups=2", "model.proj_bn=false", "loss.mochi_s=0", "loss.mochi_s_prime=0"]
    )
    obj = build_objective(cfg, None, torch.Generator().manual_seed(0))
    loss, _ = obj(*_images(6, 1))
    assert torch.isfinite(loss) and obj.bn_groups == 2
