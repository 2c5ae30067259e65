"""Losses against slow float64 references transcribed from docs/methods.md, plus every listed property."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch
import torch.nn.functional as F

from pipeline.losses import LOSSES, dcl, hcl, nt_xent, sscl
from pipeline.losses import functional as fn

# --------------------------------------------------------------------------------------------------
# References: literal, official-code style (exp space, loops over anchor rows), float64.
# --------------------------------------------------------------------------------------------------


def _ref_rows(z1, z2):
    z1 = F.normalize(z1.double(), dim=1)
    z2 = F.normalize(z2.double(), dim=1)
    return torch.cat([z1, z2], dim=0), z1.shape[0]


def _ref_negatives(out, i, b, t):
    """Row i's positive exp(s/t) and its 2B-2 negatives exp(s/t), self and positive excluded."""
    j_pos = (i + b) % (2 * b)
    pos = torch.exp(out[i] @ out[j_pos] / t)
    negs = [torch.exp(out[i] @ out[j] / t) for j in range(2 * b) if j not in (i, j_pos)]
    return pos, negs


def ref_nt_xent(z1, z2, t):
    out, b = _ref_rows(z1, z2)
    terms = []
    for i in range(2 * b):
        pos, negs = _ref_negatives(out, i, b, t)
        ng = torch.stack(negs).sum()
        terms.append(-torch.log(pos / (pos + ng)))
    return torch.stack(terms).mean()


def ref_dcl(z1, z2, t, tau_plus):
    out, b = _ref_rows(z1, z2)
    n = 2 * b - 2
    terms = []
    for i in range(2 * b):
        pos, negs = _ref_negatives(out, i, b, t)
        ng = (-tau_plus * n * pos + torch.stack(negs).sum()) / (1 - tau_plus)
        ng = torch.clamp(ng, min=n * math.e ** (-1 / t))
        terms.append(-torch.log(pos / (pos + ng)))
    return torch.stack(terms).mean()


def _ref_hcl_term(pos, negs, t, tau_plus, beta):
    neg = torch.stack(negs)
    n = neg.shape[0]
    imp = (beta * neg.log()).exp()
    reweight_neg = (imp * neg).sum() / imp.mean()
    ng = (-tau_plus * n * pos + reweight_neg) / (1 - tau_plus)
    ng = torch.clamp(ng, min=n * math.e ** (-1 / t))
    return -torch.log(pos / (pos + ng))


def ref_hcl(z1, z2, t, tau_plus, beta):
    out, b = _ref_rows(z1, z2)
    terms = []
    for i in range(2 * b):
        pos, negs = _ref_negatives(out, i, b, t)
        terms.append(_ref_hcl_term(pos, negs, t, tau_plus, beta))
    return torch.stack(terms).mean()


def ref_sscl(z1, z2, t, tau_plus, beta, n_hard, n_synthetic, mix, seed):
    """SSCL with the pinned draw protocol: randint (2, 2B, k) then rand (2B, k, 1) from one Generator."""
    out, b = _ref_rows(z1, z2)
    s = min(n_hard, 2 * b - 2)
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, s, (2, 2 * b, n_synthetic), generator=gen)
    alpha = torch.rand((2 * b, n_synthetic, 1), generator=gen).double()
    bank = out.detach()
    terms = []
    for i in range(2 * b):
        j_pos = (i + b) % (2 * b)
        candidates = [j for j in range(2 * b) if j not in (i, j_pos)]
        hardest = sorted(candidates, key=lambda j: -float(bank[i] @ bank[j]))[:s]
        pos, negs = _ref_negatives(out, i, b, t)
        for m in range(n_synthetic):
            za, zb = bank[hardest[picks[0, i, m]]], bank[hardest[picks[1, i, m]]]
            h = alpha[i, m, 0] * za + (1 - alpha[i, m, 0]) * zb if mix == "paper" else za
            h = F.normalize(h, dim=0)
            negs.append(torch.exp(out[i] @ h / t))
        terms.append(_ref_hcl_term(pos, negs, t, tau_plus, beta))
    return torch.stack(terms).mean()


def _pair(b=6, d=5, seed=0, dtype=torch.float64, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(b, d, generator=g, dtype=torch.float64) * scale
    z2 = z1 + 0.8 * torch.randn(b, d, generator=g, dtype=torch.float64)
    return z1.to(dtype), z2.to(dtype)


def _value_and_grad(f, z1, z2):
    z1 = z1.detach().clone().requires_grad_(True)
    z2 = z2.detach().clone().requires_grad_(True)
    loss = f(z1, z2)
    g1, g2 = torch.autograd.grad(loss, (z1, z2))
    return loss.detach(), g1, g2


def _assert_matches(f, ref, z1, z2, rtol=1e-10, atol=1e-12):
    loss, g1, g2 = _value_and_grad(f, z1, z2)
    rloss, r1, r2 = _value_and_grad(ref, z1, z2)
    torch.testing.assert_close(loss, rloss, rtol=rtol, atol=atol)
    torch.testing.assert_close(g1, r1.to(g1.dtype), rtol=rtol * 100, atol=atol * 100)
    torch.testing.assert_close(g2, r2.to(g2.dtype), rtol=rtol * 100, atol=atol * 100)


# --------------------------------------------------------------------------------------------------
# Agreement with the references (values and gradients)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [0.5, 0.2])
@pytest.mark.parametrize("seed", [0, 1])
def test_nt_xent_matches_reference(t, seed):
    z1, z2 = _pair(seed=seed)
    _assert_matches(lambda a, b: nt_xent(a, b, temperature=t), lambda a, b: ref_nt_xent(a, b, t), z1, z2)


def test_nt_xent_is_cross_entropy():
    z1, z2 = _pair(b=5)
    out = F.normalize(torch.cat([z1, z2]), dim=1)
    b = z1.shape[0]
    logits = (out @ out.T / 0.3).fill_diagonal_(float("-inf"))
    labels = (torch.arange(2 * b) + b) % (2 * b)
    torch.testing.assert_close(nt_xent(z1, z2, temperature=0.3), F.cross_entropy(logits, labels))


@pytest.mark.parametrize("t,tau_plus", [(0.5, 0.0), (0.5, 0.1), (0.2, 0.3), (0.5, 0.6)])
def test_dcl_matches_reference(t, tau_plus):
    z1, z2 = _pair(seed=2)
    _assert_matches(
        lambda a, b: dcl(a, b, temperature=t, tau_plus=tau_plus), lambda a, b: ref_dcl(a, b, t, tau_plus), z1, z2
    )


@pytest.mark.parametrize(
    "t,tau_plus,beta", [(0.5, 0.1, 1.0), (0.5, 0.0, 0.5), (0.2, 0.05, 2.0), (0.5, 0.3, 6.0), (0.5, 0.6, 1.0)]
)
@pytest.mark.parametrize("seed", [3, 4])
def test_hcl_matches_reference(t, tau_plus, beta, seed):
    z1, z2 = _pair(seed=seed)
    _assert_matches(
        lambda a, b: hcl(a, b, temperature=t, tau_plus=tau_plus, beta=beta),
        lambda a, b: ref_hcl(a, b, t, tau_plus, beta),
        z1,
        z2,
    )


def test_some_rows_clamped_in_reference_settings():
    """The tau+ = 0.6 settings above really exercise the clamp on some rows and not on others."""
    z1, z2 = _pair(seed=3)
    b = fn._batch(z1, z2, 0.5, None)
    log_ng = fn._log_ng_hcl(b.pos, b.neg, n_neg=b.n_neg, temperature=0.5, tau_plus=0.6, beta=1.0)
    floor = math.log(b.n_neg) - 1 / 0.5
    clamped = log_ng == floor
    assert clamped.any() and not clamped.all()


@pytest.mark.parametrize("mix", ["paper", "release"])
@pytest.mark.parametrize("n_hard,n_synthetic", [(3, 4), (1, 2), (10, 3), (100, 5)])
def test_sscl_matches_reference(mix, n_hard, n_synthetic):
    z1, z2 = _pair(seed=5)
    t, tau_plus, beta, seed = 0.5, 0.05, 1.0, 11

    def f(a, b):
        return sscl(
            a,
            b,
            temperature=t,
            tau_plus=tau_plus,
            beta=beta,
            n_hard=n_hard,
            n_synthetic=n_synthetic,
            mix=mix,
            generator=torch.Generator().manual_seed(seed),
        )

    _assert_matches(f, lambda a, b: ref_sscl(a, b, t, tau_plus, beta, n_hard, n_synthetic, mix, seed), z1, z2)


def test_frozen_closed_form():
    """B=2, z1 = z2 = (e1, e2), t = 0.5: every negative has s = 0, the positive s = 1."""
    z = torch.eye(2, dtype=torch.float64)
    t, n, pos = 0.5, 2, math.exp(2.0)
    assert nt_xent(z, z, temperature=t).item() == pytest.approx(math.log1p(n / pos), rel=1e-12)
    ng = (n - 0.1 * n * pos) / 0.9  # (2 - 0.2 e^2) / 0.9 > floor 2 e^-2
    for value in (dcl(z, z, temperature=t, tau_plus=0.1), hcl(z, z, temperature=t, tau_plus=0.1, beta=3.0)):
        assert value.item() == pytest.approx(math.log1p(ng / pos), rel=1e-12)
    floor = n * math.exp(-1 / t)  # tau+ = 0.5 makes the estimate negative: the clamp decides
    assert dcl(z, z, temperature=t, tau_plus=0.5).item() == pytest.approx(math.log1p(floor / pos), rel=1e-12)


# --------------------------------------------------------------------------------------------------
# Identities and limits
# --------------------------------------------------------------------------------------------------


def _grads(f, z1, z2):
    return _value_and_grad(f, z1, z2)


def test_hcl_beta0_tau0_equals_dcl0_equals_nt_xent_exactly():
    z1, z2 = _pair(b=16, d=8, seed=6, dtype=torch.float32)
    a = _grads(lambda x, y: hcl(x, y, temperature=0.5, tau_plus=0.0, beta=0.0), z1, z2)
    b = _grads(lambda x, y: dcl(x, y, temperature=0.5, tau_plus=0.0), z1, z2)
    c = _grads(lambda x, y: nt_xent(x, y, temperature=0.5), z1, z2)
    for u, v, w in zip(a, b, c, strict=True):
        assert torch.equal(u, v) and torch.equal(v, w)


@pytest.mark.parametrize("tau_plus", [0.05, 0.3, 0.7])
def test_hcl_beta0_equals_dcl_exactly(tau_plus):
    z1, z2 = _pair(b=16, d=8, seed=7, dtype=torch.float32)
    a = _grads(lambda x, y: hcl(x, y, temperature=0.5, tau_plus=tau_plus, beta=0.0), z1, z2)
    b = _grads(lambda x, y: dcl(x, y, temperature=0.5, tau_plus=tau_plus), z1, z2)
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)


def test_sscl_without_synthetics_equals_hcl_exactly():
    z1, z2 = _pair(b=16, d=8, seed=8, dtype=torch.float32)
    a = _grads(
        lambda x, y: sscl(
            x,
            y,
            temperature=0.5,
            tau_plus=0.1,
            beta=1.0,
            n_hard=4,
            n_synthetic=0,
            generator=torch.Generator().manual_seed(0),
        ),
        z1,
        z2,
    )
    b = _grads(lambda x, y: hcl(x, y, temperature=0.5, tau_plus=0.1, beta=1.0), z1, z2)
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)


@pytest.mark.parametrize("b", [2, 5])
@pytest.mark.parametrize("t", [0.5, 0.1])
def test_identical_embeddings(b, t):
    z = torch.randn(1, 7).repeat(b, 1)
    expected = math.log(2 * b - 1)
    torch.testing.assert_close(nt_xent(z, z, temperature=t), torch.tensor(expected))
    for tau_plus in (0.0, 0.1, 0.5):
        torch.testing.assert_close(dcl(z, z, temperature=t, tau_plus=tau_plus), torch.tensor(expected))
        for beta in (0.0, 1.0, 10.0):
            torch.testing.assert_close(hcl(z, z, temperature=t, tau_plus=tau_plus, beta=beta), torch.tensor(expected))
            for k, mix in ((3, "paper"), (8, "release")):
                got = sscl(
                    z,
                    z,
                    temperature=t,
                    tau_plus=tau_plus,
                    beta=beta,
                    n_hard=4,
                    n_synthetic=k,
                    mix=mix,
                    generator=torch.Generator().manual_seed(1),
                )
                torch.testing.assert_close(got, torch.tensor(math.log(2 * b - 1 + k)))


@pytest.mark.parametrize("tau_plus", [0.0, 0.1])
def test_hcl_non_decreasing_in_beta(tau_plus):
    z1, z2 = _pair(b=8, d=6, seed=9)
    betas = [0.0, 0.1, 0.5, 1.0, 2.0, 4.0, 10.0, 30.0, 100.0]
    losses = [hcl(z1, z2, temperature=0.5, tau_plus=tau_plus, beta=beta).item() for beta in betas]
    assert all(b >= a - 1e-12 for a, b in pairwise(losses)), losses
    assert losses[-1] > losses[0]


def test_hcl_beta_infinity_limit_is_n_times_max_negative():
    z1, z2 = _pair(b=6, d=4, seed=10)
    t = 0.5
    out, b = _ref_rows(z1, z2)
    n = 2 * b - 2
    terms = []
    for i in range(2 * b):
        pos, negs = _ref_negatives(out, i, b, t)
        terms.append(torch.log1p(n * torch.stack(negs).max() / pos))
    limit = torch.stack(terms).mean()
    torch.testing.assert_close(hcl(z1, z2, temperature=t, tau_plus=0.0, beta=1e6), limit, rtol=1e-5, atol=0)
    gap_small = (limit - hcl(z1, z2, temperature=t, tau_plus=0.0, beta=10.0)).item()
    gap_large = (limit - hcl(z1, z2, temperature=t, tau_plus=0.0, beta=1e3)).item()
    assert 0 <= gap_large < gap_small


# --------------------------------------------------------------------------------------------------
# Invariances
# --------------------------------------------------------------------------------------------------

_CASES = {
    "nt_xent": lambda a, b: nt_xent(a, b, temperature=0.5),
    "dcl": lambda a, b: dcl(a, b, temperature=0.5, tau_plus=0.1),
    "hcl": lambda a, b: hcl(a, b, temperature=0.5, tau_plus=0.1, beta=2.0),
    # n_hard = 1: every draw is the row's hardest negative, so the draws cannot depend on row order
    "sscl": lambda a, b: sscl(
        a,
        b,
        temperature=0.5,
        tau_plus=0.1,
        beta=1.0,
        n_hard=1,
        n_synthetic=4,
        mix="release",
        generator=torch.Generator().manual_seed(3),
    ),
    "sscl_paper_s1": lambda a, b: sscl(
        a,
        b,
        temperature=0.5,
        tau_plus=0.1,
        beta=1.0,
        n_hard=1,
        n_synthetic=4,
        mix="paper",
        generator=torch.Generator().manual_seed(3),
    ),
}


@pytest.mark.parametrize("name", sorted(_CASES))
def test_view_swap_invariance(name):
    z1, z2 = _pair(b=8, seed=12)
    torch.testing.assert_close(_CASES[name](z1, z2), _CASES[name](z2, z1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(_CASES))
def test_batch_permutation_invariance(name):
    z1, z2 = _pair(b=8, seed=13)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    loss, g1, g2 = _value_and_grad(_CASES[name], z1, z2)
    ploss, p1, p2 = _value_and_grad(_CASES[name], z1[perm], z2[perm])
    torch.testing.assert_close(loss, ploss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g1[perm], p1, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g2[perm], p2, rtol=1e-10, atol=1e-12)


def test_sscl_permutation_with_matching_draws_reference():
    """General n_hard: the permuted batch equals the reference fed the same seed on the permuted rows."""
    z1, z2 = _pair(b=6, seed=14)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(1))
    got = sscl(
        z1[perm],
        z2[perm],
        temperature=0.5,
        tau_plus=0.1,
        beta=1.0,
        n_hard=4,
        n_synthetic=3,
        generator=torch.Generator().manual_seed(5),
    )
    torch.testing.assert_close(got, ref_sscl(z1[perm], z2[perm], 0.5, 0.1, 1.0, 4, 3, "paper", 5))


# --------------------------------------------------------------------------------------------------
# Clamp, stability, gradcheck
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_clamped_row_has_zero_grad_wrt_its_negatives(beta):
    b, d, t, tau_plus = 4, 6, 0.5, 0.5
    z1 = torch.randn(b, d, dtype=torch.float64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    z2 = (z1.detach() + 0.01 * torch.randn(b, d, dtype=torch.float64)).requires_grad_(True)
    with torch.no_grad():  # row 0's positive is nearly identical; its negatives point away
        z1[0] = torch.eye(d, dtype=torch.float64)[0]
        z2[0] = z1[0] + 0.01
        z1[1:, 0] -= 5.0
        z2[1:, 0] -= 5.0
    batch = fn._batch(z1, z2, t, None)
    log_ng = fn._log_ng_hcl(batch.pos, batch.neg, n_neg=batch.n_neg, temperature=t, tau_plus=tau_plus, beta=beta)
    floor = math.log(2 * b - 2) - 1 / t
    assert log_ng[0].item() == floor  # the clamp is active on row 0 ...
    assert log_ng[1].item() > floor  # ... and not on row 1
    row_terms = torch.logaddexp(batch.pos, log_ng) - batch.pos
    g1, g2 = torch.autograd.grad(row_terms[0], (z1, z2), retain_graph=True)
    assert torch.all(g1[1:] == 0) and torch.all(g2[1:] == 0)  # negatives of row 0: other samples
    assert g1[0].abs().sum() > 0  # the anchor still gets a gradient through pos
    h1, h2 = torch.autograd.grad(row_terms[1], (z1, z2))
    assert h1[0].abs().sum() > 0 and h2[0].abs().sum() > 0  # an unclamped row does reach its negatives


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_temperature_large_beta_is_finite_and_exact(dtype):
    t, beta, tau_plus = 0.1, 10.0, 0.1
    z1, z2 = _pair(b=16, d=8, seed=15, dtype=dtype)
    z1 = z1.detach().requires_grad_(True)
    z2 = z2.detach().requires_grad_(True)
    exact = {  # float64 references on the very same (rounded) inputs
        "hcl": ref_hcl(z1.detach().double(), z2.detach().double(), t, tau_plus, beta),
        "sscl": ref_sscl(z1.detach().double(), z2.detach().double(), t, tau_plus, beta, 8, 4, "paper", 2),
    }
    got = {
        "hcl": hcl(z1, z2, temperature=t, tau_plus=tau_plus, beta=beta),
        "sscl": sscl(
            z1,
            z2,
            temperature=t,
            tau_plus=tau_plus,
            beta=beta,
            n_hard=8,
            n_synthetic=4,
            generator=torch.Generator().manual_seed(2),
        ),
    }
    for name in got:
        assert got[name].dtype == torch.float32
        assert torch.isfinite(got[name])
        torch.testing.assert_close(got[name].double(), exact[name], rtol=2e-5, atol=2e-5)
        g1, g2 = torch.autograd.grad(got[name], (z1, z2))
        assert torch.isfinite(g1.float()).all() and torch.isfinite(g2.float()).all()
    # the literal official formula overflows here in float32: neg^beta = e^{beta s / t} > float32 max
    neg = torch.exp(torch.tensor([9.9, 9.5], dtype=torch.float32))
    imp = (beta * neg.log()).exp()
    assert not torch.isfinite((imp * neg).sum() / imp.mean())


_GRADCHECK = {
    "nt_xent": lambda a, b: nt_xent(a, b, temperature=0.5),
    "dcl": lambda a, b: dcl(a, b, temperature=0.5, tau_plus=0.1),
    "hcl": lambda a, b: hcl(a, b, temperature=0.5, tau_plus=0.1, beta=1.5),
    "sscl": lambda a, b: sscl(
        a,
        b,
        temperature=0.5,
        tau_plus=0.1,
        beta=1.0,
        n_hard=3,
        n_synthetic=2,
        generator=torch.Generator().manual_seed(4),
    ),
}


@pytest.mark.parametrize("name", sorted(_GRADCHECK))
def test_gradcheck(name, monkeypatch):
    z1, z2 = _pair(b=3, d=4, seed=16)
    if name == "sscl":
        # The synthetic vectors are detached by design, so finite differences (which move them) and
        # autograd (which does not) disagree. Freeze them at their values at the base point.
        frozen = []

        def frozen_synth(*args, _real=fn.synthesize_hard_negatives, **kwargs):
            if not frozen:
                frozen.append(_real(*args, **kwargs))
            return frozen[0]

        monkeypatch.setattr(fn, "synthesize_hard_negatives", frozen_synth)
    z1.requires_grad_(True)
    z2.requires_grad_(True)
    assert torch.autograd.gradcheck(_GRADCHECK[name], (z1, z2), eps=1e-6, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Arguments and registry
# --------------------------------------------------------------------------------------------------


def test_every_registered_loss_meets_the_identical_embeddings_limit():
    """Through the registry: with all 2B embeddings equal, each loss is log(2B - 1), SSCL log(2B - 1 + k)."""
    z = torch.randn(1, 8, dtype=torch.float64).expand(6, 8)  # B = 6
    extra = {
        "dcl": {"tau_plus": 0.0},
        "hcl": {"tau_plus": 0.0, "beta": 1.0},
        "sscl": {
            "tau_plus": 0.0,
            "beta": 1.0,
            "n_hard": 4,
            "n_synthetic": 3,
            "generator": torch.Generator().manual_seed(0),
        },
    }
    assert set(LOSSES) >= {"nt_xent", "dcl", "hcl", "sscl"}
    for name, loss_fn in LOSSES.items():
        k = extra.get(name, {}).get("n_synthetic", 0)
        got = loss_fn(z.clone(), z.clone(), temperature=0.5, **extra.get(name, {}))
        assert got.item() == pytest.approx(math.log(2 * 6 - 1 + k), rel=1e-9), name


_GOOD = dict(temperature=0.5, tau_plus=0.1, beta=1.0, n_hard=4, n_synthetic=2, mix="paper")


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("temperature", 0.0, "temperature"),
        ("temperature", -1.0, "temperature"),
        ("temperature", float("nan"), "temperature"),
        ("tau_plus", 1.0, "tau_plus"),
        ("tau_plus", -0.1, "tau_plus"),
        ("beta", -0.5, "beta"),
        ("beta", float("inf"), "beta"),
        ("n_hard", 0, "n_hard"),
        ("n_hard", 2.5, "n_hard"),
        ("n_synthetic", -1, "n_synthetic"),
        ("mix", "mixup", r"mix='mixup'.*paper.*release"),
        ("generator", 42, "generator"),
    ],
)
def test_sscl_argument_validation(key, value, match):
    z1, z2 = _pair(b=4)
    with pytest.raises(ValueError, match=match):
        sscl(z1, z2, **{**_GOOD, key: value})


def test_other_losses_validate_arguments():
    z1, z2 = _pair(b=4)
    with pytest.raises(ValueError, match="temperature"):
        nt_xent(z1, z2, temperature=0)
    with pytest.raises(ValueError, match="tau_plus"):
        dcl(z1, z2, temperature=0.5, tau_plus=1.5)
    with pytest.raises(ValueError, match="beta"):
        hcl(z1, z2, temperature=0.5, tau_plus=0.1, beta=-1)


def test_shape_validation():
    z1, z2 = _pair(b=4)
    with pytest.raises(ValueError, match="equal shape"):
        nt_xent(z1, z2[:3], temperature=0.5)
    with pytest.raises(ValueError, match="equal shape"):
        nt_xent(z1[0], z2[0], temperature=0.5)
    with pytest.raises(ValueError, match="B >= 2"):
        hcl(z1[:1], z2[:1], temperature=0.5, tau_plus=0.1, beta=1.0)
    with pytest.raises(ValueError, match="floating"):
        nt_xent(z1.long(), z2.long(), temperature=0.5)
    with pytest.raises(ValueError, match="must expose .rank"):
        nt_xent(z1, z2, temperature=0.5, gather=lambda x: torch.cat([x, x]))
    with pytest.raises(ValueError, match="gather returned"):
        nt_xent(z1, z2, temperature=0.5, gather=_FakeGather(0, [torch.zeros(4, 10), torch.zeros(3, 10)]))


class _FakeGather:
    """Simulates rank `rank` in one process: the other ranks' rows are fixed tensors (no gradient)."""

    def __init__(self, rank, blocks):
        self.rank, self.world_size, self.blocks = rank, len(blocks), blocks

    def __call__(self, x):
        parts = list(self.blocks)
        parts[self.rank] = x
        return torch.cat(parts)


@pytest.mark.parametrize("name", sorted(_GRADCHECK))
def test_local_rows_against_global_columns(name):
    """Per-rank losses with a layout-faithful gather average to the single-process loss (values only)."""
    world, n = 3, 2
    z1, z2 = _pair(b=world * n, seed=17)
    pairs = F.normalize(torch.cat([z1, z2], 1).view(world * n, 2, -1), dim=2).view(world * n, -1)
    blocks = list(pairs.split(n))
    per_rank = [
        _GATHERED[name](z1[r * n : (r + 1) * n], z2[r * n : (r + 1) * n], _FakeGather(r, blocks)) for r in range(world)
    ]
    torch.testing.assert_close(torch.stack(per_rank).mean(), _GATHERED[name](z1, z2, None), rtol=1e-12, atol=1e-12)


_GATHERED = {
    "nt_xent": lambda a, b, g: nt_xent(a, b, temperature=0.5, gather=g),
    "dcl": lambda a, b, g: dcl(a, b, temperature=0.5, tau_plus=0.1, gather=g),
    "hcl": lambda a, b, g: hcl(a, b, temperature=0.5, tau_plus=0.1, beta=1.5, gather=g),
    "sscl": lambda a, b, g: sscl(
        a,
        b,
        temperature=0.5,
        tau_plus=0.1,
        beta=1.0,
        n_hard=3,
        n_synthetic=2,
        generator=torch.Generator().manual_seed(4),
        gather=g,
    ),
}


@pytest.mark.parametrize("name", ["nt_xent", "dcl", "hcl", "sscl"])
def test_losses_stay_float32_under_bf16_autocast(name):
    from pipeline.losses import LOSSES

    g = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g)
    kwargs = {"temperature": 0.1}
    if name != "nt_xent":
        kwargs["tau_plus"] = 0.05
    if name in ("hcl", "sscl"):
        kwargs["beta"] = 2.0
    if name == "sscl":
        kwargs |= {"n_hard": 4, "n_synthetic": 3}
    draw = (lambda: {"generator": torch.Generator().manual_seed(0)}) if name == "sscl" else dict
    plain = LOSSES[name](z1, z2, **kwargs, **draw())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = LOSSES[name](z1, z2, **kwargs, **draw())
    assert under.dtype == torch.float32 and torch.equal(under, plain)
