"""Two gloo processes on CPU, different data per rank: gathered losses and gradients equal one process."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import save_rank, spawn_ranks

from pipeline import dist
from pipeline.losses import dcl, hcl, nt_xent, sscl

WORLD = 2
N_LOCAL = 4  # rows per rank; global batch B = 8
DIM = 6

LOSS_CASES = {
    "nt_xent": lambda a, b, g: nt_xent(a, b, temperature=0.5, gather=g),
    "dcl": lambda a, b, g: dcl(a, b, temperature=0.5, tau_plus=0.1, gather=g),
    "hcl": lambda a, b, g: hcl(a, b, temperature=0.5, tau_plus=0.1, beta=2.0, gather=g),
    "hcl_clamped": lambda a, b, g: hcl(a, b, temperature=0.5, tau_plus=0.6, beta=1.0, gather=g),
    "sscl": lambda a, b, g: sscl(
        a,
        b,
        temperature=0.5,
        tau_plus=0.05,
        beta=1.0,
        n_hard=5,
        n_synthetic=3,
        generator=torch.Generator().manual_seed(7),
        gather=g,
    ),
    "sscl_release": lambda a, b, g: sscl(
        a,
        b,
        temperature=0.5,
        tau_plus=0.05,
        beta=1.0,
        n_hard=32,
        n_synthetic=4,
        mix="release",
        generator=torch.Generator().manual_seed(8),
        gather=g,
    ),
}


def _global_data():
    """The concatenated batch; rank r holds rows [r * N_LOCAL, (r + 1) * N_LOCAL)."""
    g = torch.Generator().manual_seed(123)
    z1 = torch.randn(WORLD * N_LOCAL, DIM, generator=g, dtype=torch.float64)
    z2 = z1 + 0.7 * torch.randn(WORLD * N_LOCAL, DIM, generator=g, dtype=torch.float64)
    return z1, z2


def _model_and_inputs():
    torch.manual_seed(0)
    model = torch.nn.Linear(DIM, 3).double()
    g = torch.Generator().manual_seed(321)
    x1 = torch.randn(WORLD * N_LOCAL, DIM, generator=g, dtype=torch.float64)
    x2 = torch.randn(WORLD * N_LOCAL, DIM, generator=g, dtype=torch.float64)
    return model, x1, x2


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    ctx = dist.init_process_group("gloo", f"tcp://127.0.0.1:{port}", rank, WORLD, timeout_s=120)
    try:
        gather = dist.make_gather(ctx)
        result: dict = {"ctx": (ctx.rank, ctx.world_size, ctx.is_main), "losses": {}}
        rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
        z1_all, z2_all = _global_data()
        for name, loss_fn in LOSS_CASES.items():
            z1 = z1_all[rows].clone().requires_grad_(True)
            z2 = z2_all[rows].clone().requires_grad_(True)
            loss = loss_fn(z1, z2, gather)
            loss.backward()
            result["losses"][name] = (loss.detach(), z1.grad, z2.grad)
        result["gather_rank"] = (gather.rank, gather.world_size)  # the losses find their rows through it

        # Gather alone: forward in rank order; backward = all-reduced gradient, own slice
        x = torch.full((3, 2), float(rank + 1), dtype=torch.float64, requires_grad=True)
        y = gather(x)
        weights = torch.arange(y.numel(), dtype=torch.float64).view_as(y) * (rank + 1)
        (y * weights).sum().backward()
        result["gather"] = (y.detach(), x.grad)
        result["mean"] = dist.all_reduce_mean(torch.tensor([float(rank), 2.0 * rank]))
        # the step loop's reduction by name: inserted in a different order on each rank, one collective
        named = {"b": torch.tensor(2.0 * rank), "a": torch.tensor(rank, dtype=torch.int64)}
        result["named"] = dist.all_reduce_mean_named(
            dict(reversed(named.items())) if rank else named, torch.device("cpu")
        )
        try:
            dist.make_gather(ctx)(torch.zeros(2 + rank, 2))  # a fresh gather: its first call is checked
            result["unequal"] = None
        except ValueError as err:
            result["unequal"] = str(err)

        # DDP: parameter gradients after DDP's 1/W averaging equal the single-process gradients
        model, x1_all, x2_all = _model_and_inputs()
        ddp = dist.wrap_ddp(model, ctx)
        loss = hcl(ddp(x1_all[rows]), ddp(x2_all[rows]), temperature=0.5, tau_plus=0.1, beta=1.0, gather=gather)
        loss.backward()
        result["ddp"] = (type(ddp).__name__, loss.detach(), [p.grad.clone() for p in model.parameters()])
        dist.barrier()
        save_rank(result, rank, out_dir)
    finally:
        dist.destroy_process_group()
    # Results are on disk and the group is gone: skip the interpreter teardown, which takes seconds
    # once DDP has pulled in torch._dynamo (a failure above still exits normally, with its traceback).
    os._exit(0)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("dist"))
    return spawn_ranks(_worker, WORLD, out_dir)


def test_contexts(ranks):
    assert [r["ctx"] for r in ranks] == [(0, 2, True), (1, 2, False)]


@pytest.mark.parametrize("name", sorted(LOSS_CASES))
def test_gathered_loss_and_grads_equal_single_process(ranks, name):
    z1 = _global_data()[0].clone().requires_grad_(True)
    z2 = _global_data()[1].clone().requires_grad_(True)
    loss = LOSS_CASES[name](z1, z2, None)
    loss.backward()
    per_rank = [r["losses"][name] for r in ranks]
    mean_loss = torch.stack([p[0] for p in per_rank]).mean()
    torch.testing.assert_close(mean_loss, loss.detach(), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(per_rank[0][0], per_rank[1][0])  # the ranks really saw different data
    for rank, (_, g1, g2) in enumerate(per_rank):
        rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
        torch.testing.assert_close(g1 / WORLD, z1.grad[rows], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(g2 / WORLD, z2.grad[rows], rtol=1e-6, atol=1e-6)


def test_gather_carries_its_rank(ranks):
    assert [r["gather_rank"] for r in ranks] == [(rank, WORLD) for rank in range(WORLD)]


def test_global_gather_forward_and_backward(ranks):
    expected = torch.cat([torch.full((3, 2), 1.0), torch.full((3, 2), 2.0)]).double()
    # d/dx_r of sum_q <gather(x), w_q> with w_q = arange * (q + 1): sum of all weights, rank r's slice
    total = torch.arange(12, dtype=torch.float64).view(6, 2) * sum(q + 1 for q in range(WORLD))
    for rank, r in enumerate(ranks):
        y, grad = r["gather"]
        torch.testing.assert_close(y, expected)
        torch.testing.assert_close(grad, total[rank * 3 : (rank + 1) * 3])
        torch.testing.assert_close(r["mean"], torch.tensor([0.5, 1.0]))
        assert r["named"] == {"a": 0.5, "b": 1.0}


def test_global_gather_rejects_unequal_sizes(ranks):
    for r in ranks:
        assert r["unequal"] is not None and "[2, 3]" in r["unequal"]


def test_ddp_gradients_equal_single_process(ranks):
    model, x1, x2 = _model_and_inputs()
    loss = hcl(model(x1), model(x2), temperature=0.5, tau_plus=0.1, beta=1.0)
    loss.backward()
    for r in ranks:
        kind, _, grads = r["ddp"]
        assert kind == "DistributedDataParallel"
        for got, want in zip(grads, (p.grad for p in model.parameters()), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)
    mean_loss = torch.stack([r["ddp"][1] for r in ranks]).mean()
    torch.testing.assert_close(mean_loss, loss.detach(), rtol=1e-6, atol=1e-8)


def test_single_process_is_identity():
    ctx = dist.current_context()
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.device) == (0, 1, True, torch.device("cpu"))
    x = torch.randn(3, 2, requires_grad=True)
    gather = dist.make_gather(ctx)
    assert (gather.rank, gather.world_size) == (0, 1) and gather(x) is x
    torch.testing.assert_close(dist.all_reduce_mean(x), x.detach())
    model = torch.nn.Linear(2, 2)
    assert dist.wrap_ddp(model, ctx) is model
    dist.barrier()
    dist.destroy_process_group()  # no-op


def test_init_process_group_validates():
    with pytest.raises(ValueError, match="rank=2"):
        dist.init_process_group("gloo", "tcp://127.0.0.1:1", 2, 2)
    with pytest.raises(ValueError, match="world_size=0"):
        dist.init_process_group("gloo", "tcp://127.0.0.1:1", 0, 0)


def test_gather_checks_sizes_once_then_costs_one_collective_per_call(monkeypatch):
    """A counting fake backend (2 ranks that hold the same data): the size check runs on the first call of a shape
    only, so the training step pays one all_gather per gather, and no host sync after the first step."""
    calls = {"all_gather": 0, "all_reduce": 0}

    def fake_all_gather(parts, x):
        calls["all_gather"] += 1
        for part in parts:
            part.copy_(x)

    def fake_all_reduce(x, op=None):
        calls["all_reduce"] += 1
        x.mul_(2)

    monkeypatch.setattr(dist, "_initialized", lambda: True)
    monkeypatch.setattr(dist.dist, "all_gather", fake_all_gather)
    monkeypatch.setattr(dist.dist, "all_reduce", fake_all_reduce)
    gather = dist.Gather(rank=0, world_size=2)
    x = torch.randn(4, 3, requires_grad=True)
    for step in range(5):
        y = gather(x)
        assert y.shape == (8, 3) and torch.equal(y[4:], x.detach())
        y.sum().backward()
        assert calls == {"all_gather": step + 2, "all_reduce": step + 1}  # 1 check + one gather per call
    gather(torch.randn(2, 3))  # a new shape is checked once more
    assert calls["all_gather"] == 5 + 1 + 2
