"""Diagnostics: values against brute force, limits, and the objectives' with_stats path (no gradient, no draws)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline import config
from pipeline.losses import diagnostics, functional
from pipeline.objectives import build_objective

pytestmark = pytest.mark.usefixtures("one_thread")


def _pair(b=6, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(b, d, generator=g, dtype=torch.float64)
    return z1, z1 + 0.7 * torch.randn(b, d, generator=g, dtype=torch.float64)


def test_similarity_summary_and_hardest():
    values = torch.tensor([[0.1, 0.9, -0.3], [0.5, 0.2, 0.4]])
    valid = torch.tensor([[True, False, True], [True, True, False]])
    s = diagnostics.similarity_summary("neg", values, valid)
    assert s["sim_neg_mean"].item() == pytest.approx((0.1 - 0.3 + 0.5 + 0.2) / 4)
    assert s["sim_neg_max"].item() == pytest.approx(0.5)
    assert diagnostics.hardest_mean(values, valid).item() == pytest.approx((0.1 + 0.5) / 2)
    empty = diagnostics.similarity_summary("syn", torch.zeros(3, 0))
    assert empty["sim_syn_mean"].item() == 0.0 and empty["sim_syn_max"].item() == 0.0


def test_effective_negatives_limits_and_value():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 9, generator=g, dtype=torch.float64)
    torch.testing.assert_close(diagnostics.effective_negatives(logits, 0.0), torch.tensor(9.0))
    assert diagnostics.effective_negatives(logits, 1e4).item() == pytest.approx(1.0, abs=1e-6)
    beta = 1.5
    expected = []
    for row in logits:
        w = torch.softmax(beta * row, 0)
        expected.append(math.exp(float(-(w * w.log()).sum())))
    assert diagnostics.effective_negatives(logits, beta).item() == pytest.approx(sum(expected) / 4, rel=1e-6)
    valid = torch.zeros(4, 9, dtype=torch.bool)
    valid[:, :3] = True
    assert diagnostics.effective_negatives(logits, 0.0, valid).item() == pytest.approx(3.0)
    prev = 10.0
    for b in (0.0, 0.5, 1.0, 2.0, 8.0):  # more concentration, fewer effective negatives
        now = diagnostics.effective_negatives(logits, b).item()
        assert now <= prev + 1e-9
        prev = now


def test_false_negative_rate_matches_brute_force():
    g = torch.Generator().manual_seed(2)
    sim = torch.randn(6, 10, generator=g)
    mask = torch.rand(6, 10, generator=g) > 0.2
    row_labels = torch.randint(0, 3, (6,), generator=g)
    col_labels = torch.randint(-1, 3, (10,), generator=g)  # -1: unknown, never a match
    n_hard = 4
    k = min(n_hard, int(mask.sum(1).min()))
    same = 0
    for i in range(6):
        cols = sorted([j for j in range(10) if mask[i, j]], key=lambda j: -float(sim[i, j]))[:k]
        same += sum(int(col_labels[j] == row_labels[i] and col_labels[j] >= 0) for j in cols)
    got = diagnostics.false_negative_rate(sim, mask, row_labels, col_labels, n_hard)
    assert got.item() == pytest.approx(same / (6 * k))
    assert diagnostics.false_negative_rate(sim, mask, row_labels, torch.full((10,), -1), n_hard).item() == 0.0
    # n_hard past the smallest row's negatives: every row takes that many (the brute force at k = that count)
    k_all = int(mask.sum(1).min())
    same_all = 0
    for i in range(6):
        cols = sorted([j for j in range(10) if mask[i, j]], key=lambda j: -float(sim[i, j]))[:k_all]
        same_all += sum(int(col_labels[j] == row_labels[i] and col_labels[j] >= 0) for j in cols)
    assert n_hard < k_all < 1000  # a k of its own, not the one above
    got = diagnostics.false_negative_rate(sim, mask, row_labels, col_labels, 1000)
    assert got.item() == pytest.approx(same_all / (6 * k_all))
    # anchors of unknown label (unlabeled data) are left out of the mean rather than counted as 0
    partly = torch.cat([row_labels[:3], torch.full((3,), -1)])
    same_known = sum(
        sum(
            int(col_labels[j] == row_labels[i] and col_labels[j] >= 0)
            for j in sorted([j for j in range(10) if mask[i, j]], key=lambda j: -float(sim[i, j]))[:k]
        )
        for i in range(3)
    )
    got = diagnostics.false_negative_rate(sim, mask, partly, col_labels, n_hard)
    assert got.item() == pytest.approx(same_known / (3 * k))
    assert diagnostics.false_negative_rate(sim, mask, torch.full((6,), -1), col_labels, n_hard).item() == 0.0


def test_in_batch_stats_against_brute_force():
    z1, z2 = _pair()
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    t, beta = 0.5, 2.0
    stats = diagnostics.in_batch_stats(z1, z2, temperature=t, beta=beta, n_hard=3, labels=labels)
    out = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = out @ out.T
    b = 6
    pos = torch.stack([sim[i, (i + b) % (2 * b)] for i in range(2 * b)])
    negs = [[float(sim[i, j]) for j in range(2 * b) if j not in (i, (i + b) % (2 * b))] for i in range(2 * b)]
    flat = [v for row in negs for v in row]
    assert stats["sim_pos_mean"].item() == pytest.approx(pos.mean().item())
    assert stats["sim_pos_max"].item() == pytest.approx(pos.max().item())
    assert stats["sim_neg_mean"].item() == pytest.approx(sum(flat) / len(flat))
    assert stats["sim_neg_max"].item() == pytest.approx(max(flat))
    assert stats["sim_neg_hardest"].item() == pytest.approx(sum(max(r) for r in negs) / len(negs))
    neg_logits = torch.tensor(negs, dtype=torch.float64) / t
    assert stats["eff_negatives"].item() == pytest.approx(diagnostics.effective_negatives(neg_logits, beta).item())
    all_labels = torch.cat([labels, labels])
    rate = 0
    for i in range(2 * b):
        cand = [j for j in range(2 * b) if j not in (i, (i + b) % (2 * b))]
        hardest = sorted(cand, key=lambda j: -float(sim[i, j]))[:3]
        rate += sum(int(all_labels[j] == all_labels[i]) for j in hardest)
    assert stats["false_neg_rate"].item() == pytest.approx(rate / (2 * b * 3))
    assert "sim_syn_mean" not in stats and all(v.dim() == 0 for v in stats.values())


class _FakeGather:
    """Rank ``rank`` of a simulated world: the other ranks' rows are fixed tensors."""

    def __init__(self, rank, blocks):
        self.rank, self.world_size, self.blocks = rank, len(blocks), blocks

    def __call__(self, x):
        parts = [blk.to(x.dtype) for blk in self.blocks]
        parts[self.rank] = x
        return torch.cat(parts)


def test_labels_are_gathered_to_match_the_global_columns():
    """Rank 1 of 2: its rows' false-negative rate equals the single-process one restricted to those rows."""
    z1, z2 = _pair(b=8, seed=3)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    pairs = torch.cat([F.normalize(z1, dim=1), F.normalize(z2, dim=1)], 1)
    gather = _Routing(1, [pairs[:4], pairs[4:]], [labels[:4, None], labels[4:, None]])
    got = diagnostics.in_batch_stats(
        z1[4:], z2[4:], temperature=0.5, beta=1.0, n_hard=3, labels=labels[4:], gather=gather
    )
    b = functional._batch(z1, z2, 0.5, None)
    rows = torch.tensor([4, 5, 6, 7, 12, 13, 14, 15])
    want = diagnostics.false_negative_rate(
        b.sim[rows], b.neg_mask[rows], torch.cat([labels, labels])[rows], torch.cat([labels, labels]), 3
    )
    torch.testing.assert_close(got["false_neg_rate"], want)


class _Routing(_FakeGather):
    """A fake gather for both payloads: float embeddings and integer labels."""

    def __init__(self, rank, emb_blocks, label_blocks):
        super().__init__(rank, emb_blocks)
        self.label_blocks = label_blocks

    def __call__(self, x):
        if x.is_floating_point():
            return super().__call__(x)
        parts = list(self.label_blocks)
        parts[self.rank] = x
        return torch.cat(parts)


TINY = ["model.width=4", "model.proj_hidden_dim=16", "model.proj_dim=8"]


def _images(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randn(n, 3, 8, 8, generator=g), torch.arange(n) % 3


@pytest.mark.parametrize("name", ["nt_xent", "dcl", "hcl", "sscl"])
def test_in_batch_objective_stats_leave_loss_and_generator_alone(name, monkeypatch):
    synth = ["loss.n_synthetic=3"] if name == "sscl" else []  # another method's key is an error (issue 12)
    cfg = config.load(None, TINY + [f"loss.name={name}", "loss.n_hard=4", *synth])
    x1, x2, labels = _images()
    runs = []
    synth_seen = []
    real = functional.synthesize_hard_negatives

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        synth_seen.append(out)
        return out

    monkeypatch.setattr(functional, "synthesize_hard_negatives", spy)
    for with_stats in (False, True):
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(5)
        obj = build_objective(cfg, None, gen)
        loss, stats = obj(x1, x2, labels, with_stats=with_stats)
        runs.append((loss.detach(), gen.get_state(), stats, torch.rand(1)))
    (loss0, state0, stats0, rng0), (loss1, state1, stats1, rng1) = runs
    assert stats0 == {} and torch.equal(loss0, loss1)
    assert torch.equal(state0, state1) and torch.equal(rng0, rng1)  # neither RNG moved for the diagnostics
    expected = {
        "sim_pos_mean",
        "sim_pos_max",
        "sim_neg_mean",
        "sim_neg_max",
        "sim_neg_hardest",
        "eff_negatives",
        "false_neg_rate",
    }
    assert expected <= set(stats1) and all(v.dim() == 0 and not v.requires_grad for v in stats1.values())
    n_neg = 2 * 8 - 2
    if name in ("nt_xent", "dcl"):
        assert stats1["eff_negatives"].item() == pytest.approx(n_neg)  # beta = 0: uniform weights
    else:
        assert stats1["eff_negatives"].item() < n_neg
    if name == "sscl":
        # the diagnostics saw the very synthetic negatives the loss used (a forked generator state)
        used = synth_seen[-1]
        with torch.no_grad():
            z1, z2 = obj.model(torch.cat([x1, x2])).chunk(2)
        rows = F.normalize(torch.cat([z1, z2]), dim=1)
        cos = torch.einsum("rd,rkd->rk", rows, used)
        assert stats1["sim_syn_mean"].item() == pytest.approx(cos.mean().item(), abs=1e-5)
        assert stats1["sim_syn_max"].item() == pytest.approx(cos.max().item(), abs=1e-5)
    else:
        assert "sim_syn_mean" not in stats1


def test_queue_objectives_report_stats():
    for extra in (
        ["loss.name=psm", "loss.psm_bank_size=16", "loss.psm_n_neighbors=2"],
        [
            "loss.name=mochi",
            "loss.mochi_queue_size=16",
            "loss.mochi_n_hard=4",
            "loss.mochi_s=2",
            "loss.mochi_s_prime=2",
        ],
    ):
        torch.manual_seed(0)
        obj = build_objective(config.load(None, TINY + extra), None, torch.Generator().manual_seed(0))
        loss, stats = obj(*_images(6), with_stats=True)
        assert {"sim_pos_mean", "sim_neg_mean", "sim_neg_max", "false_neg_rate"} <= set(stats)
        assert all(v.dim() == 0 and torch.isfinite(v) for v in stats.values())
        _, none = obj(*_images(6, 1), with_stats=False)
        assert none == {}


# --------------------------------------------------------------------------------------------------
# Two gloo ranks: labels travel through the real gather; the loop's rank average equals one process
# --------------------------------------------------------------------------------------------------

WORLD, N_LOCAL = 2, 4
MEAN_KEYS = ("sim_pos_mean", "sim_neg_mean", "sim_neg_hardest", "eff_negatives", "false_neg_rate", "sim_syn_mean")


def _global_batch():
    z1, z2 = _pair(b=WORLD * N_LOCAL, d=6, seed=9)
    return z1, z2, torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])


def _stats(z1, z2, labels, gather):
    return diagnostics.in_batch_stats(
        z1,
        z2,
        temperature=0.5,
        beta=1.0,
        n_hard=3,
        labels=labels,
        gather=gather,
        n_synthetic=3,
        generator=torch.Generator().manual_seed(4),
    )


def _worker(rank: int, port: int, out_dir: str) -> None:
    import os

    from conftest import save_rank

    from pipeline import dist

    torch.set_num_threads(1)
    ctx = dist.init_process_group("gloo", f"tcp://127.0.0.1:{port}", rank, WORLD, timeout_s=120)
    try:
        z1, z2, labels = _global_batch()
        rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
        stats = _stats(z1[rows], z2[rows], labels[rows], dist.make_gather(ctx))
        names = sorted(stats)
        averaged = dist.all_reduce_mean(torch.stack([stats[k].double() for k in names]))  # as the loop does
        save_rank(dict(zip(names, averaged, strict=True)), rank, out_dir)
    finally:
        dist.destroy_process_group()
    os._exit(0)


def test_rank_averaged_stats_equal_single_process(tmp_path):
    from conftest import spawn_ranks

    ranks = spawn_ranks(_worker, WORLD, str(tmp_path))
    z1, z2, labels = _global_batch()
    whole = _stats(z1, z2, labels, None)
    for key in MEAN_KEYS:
        assert ranks[0][key].item() == pytest.approx(whole[key].item(), rel=1e-6), key
        assert ranks[1][key].item() == pytest.approx(whole[key].item(), rel=1e-6), key
