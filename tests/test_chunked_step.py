"""The chunked step (gradient caching + row-tiled losses) is exact, for every method, in float64.

Reference: the same chunks forwarded with a graph all at once (each chunk its own BatchNorm group), the
loss on their concatenated embeddings, one backward. The chunked step must give the same loss, every
parameter gradient, the same BatchNorm running statistics and banks, and after 5 optimizer steps the same
parameters. At W=2 (gloo) the chunked step on each rank's half equals the chunked step on the whole
global batch in one process.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from conftest import save_rank, spawn_ranks

from pipeline import config, dist
from pipeline.chunked_step import chunk_bounds, chunked_step, running_stats_frozen
from pipeline.errors import HardnegError
from pipeline.losses import tiling
from pipeline.objectives import build_objective

N = 12  # per-worker batch: chunks of 12, 6 and 3
SMALL = ["model.width=4", "model.proj_hidden_dim=16", "model.proj_dim=8", "augment.image_size=8"]
METHODS = {
    "nt_xent": ["loss.name=nt_xent"],
    "dcl": ["loss.name=dcl"],
    "hcl": ["loss.name=hcl", "loss.beta=1.0"],
    "sscl": ["loss.name=sscl", "loss.n_hard=6", "loss.n_synthetic=4"],
    "sscl_beta0": ["loss.name=sscl", "loss.n_hard=6", "loss.n_synthetic=4", "loss.beta=0"],  # DCL + synthetic
    "psm": ["loss.name=psm", "loss.psm_bank_size=40", "loss.psm_n_neighbors=2"],
    "moco_v2": [
        "loss.name=mochi",
        "loss.mochi_queue_size=40",
        "loss.mochi_n_hard=8",
        "loss.mochi_s=0",
        "loss.mochi_s_prime=0",
    ],  # fmt: skip
    "mochi": [
        "loss.name=mochi",
        "loss.mochi_queue_size=40",
        "loss.mochi_n_hard=8",
        "loss.mochi_s=5",
        "loss.mochi_s_prime=3",
    ],  # fmt: skip
}


def _objective(method: str, *extra: str, gather=None) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = config.load(None, [*SMALL, *METHODS[method], *extra])
    return build_objective(cfg, gather, torch.Generator().manual_seed(0)).double()


def _views(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64)
    x2 = torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64)
    return x1, x2, torch.arange(n) % 3


def _reference(objective, x1, x2, labels, chunk: int) -> torch.Tensor:
    """The same chunks with a graph, all at once: embed and keys per chunk, one loss, one backward."""
    embedded, keyed = [], []
    for start, stop in chunk_bounds(x1.shape[0], chunk):
        embedded.append(objective.embed(x1[start:stop], x2[start:stop]))
        keyed.append(objective.keys(x1[start:stop], x2[start:stop]))
    keys = None if keyed[0] is None else torch.cat(keyed)
    loss, _ = objective.loss_from(torch.cat(embedded), keys, labels)
    loss.backward()
    return loss.detach()


def _seeded(objective, seed: int) -> None:
    torch.manual_seed(seed)
    objective.generator.manual_seed(seed)


def _relative(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-300) -> float:
    """|a - b| / max(|b|, floor)."""
    return float((a - b).norm() / b.norm().clamp(min=floor))


def _grads(objective) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in objective.named_parameters() if p.grad is not None}


def _worst(one, other) -> float:
    """The largest relative difference over every parameter gradient and every buffer."""
    ga, gb = _grads(one), _grads(other)
    assert ga.keys() == gb.keys() and ga
    worst = max(_relative(ga[k], gb[k]) for k in ga)
    for (name, a), (_, b) in zip(one.named_buffers(), other.named_buffers(), strict=True):
        if a.is_floating_point():  # floored: a buffer that is zero up to rounding (the running mean of a
            worst = max(worst, _relative(a, b, floor=1.0))  # BatchNorm whose input is batch-normalised already)
        else:
            assert torch.equal(a, b), name
    return worst


WORST: dict[str, float] = {}


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("chunk", [N, N // 2, N // 4])
@pytest.mark.parametrize("tile", [None, 2 * N // 3])
def test_one_chunked_step_equals_the_reference(method, chunk, tile, one_thread):
    base = _objective(method)
    x1, x2, labels = _views(N, seed=1)
    chunked, reference = copy.deepcopy(base), copy.deepcopy(base)
    _seeded(reference, 5)
    ref_loss = _reference(reference, x1, x2, labels, chunk)
    _seeded(chunked, 5)
    with tiling.loss_tile(tile):
        loss, _ = chunked_step(chunked, x1, x2, labels, chunk_size=chunk)
    worst = max(_relative(loss, ref_loss), _worst(chunked, reference))
    WORST[method] = max(WORST.get(method, 0.0), worst)
    assert worst < 1e-10, (method, chunk, tile, worst)
    assert torch.equal(torch.get_rng_state(), _rng_after(reference, x1, x2, labels, chunk))


def _rng_after(objective, x1, x2, labels, chunk: int) -> torch.Tensor:
    """The global RNG's state after the reference step (the chunked step must leave it there too)."""
    twin = copy.deepcopy(objective)
    _seeded(twin, 5)
    _reference(twin, x1, x2, labels, chunk)
    return torch.get_rng_state()


@pytest.mark.parametrize("method", ["nt_xent", "hcl", "sscl", "psm", "mochi"])
def test_the_whole_batch_as_one_chunk_is_the_plain_step(method, one_thread):
    base = _objective(method)
    x1, x2, labels = _views(N, seed=2)
    plain, chunked = copy.deepcopy(base), copy.deepcopy(base)
    _seeded(plain, 3)
    loss, _ = plain(x1, x2, labels)
    loss.backward()
    _seeded(chunked, 3)
    chunked_loss, _ = chunked_step(chunked, x1, x2, labels, chunk_size=N)
    assert _relative(chunked_loss, loss.detach()) < 1e-12
    assert _worst(chunked, plain) < 1e-12


@pytest.mark.parametrize("method", ["hcl", "sscl", "psm", "mochi"])
def test_five_optimizer_steps_agree(method, one_thread):
    base = _objective(method)
    chunked, reference = copy.deepcopy(base), copy.deepcopy(base)
    optims = {id(m): torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in (chunked, reference)}
    for step in range(5):
        x1, x2, labels = _views(N, seed=10 + step)
        for model, chunk in ((reference, None), (chunked, N // 2)):
            optims[id(model)].zero_grad(set_to_none=True)
            _seeded(model, 100 + step)
            if chunk is None:
                _reference(model, x1, x2, labels, N // 2)
            else:
                with tiling.loss_tile(5):
                    chunked_step(model, x1, x2, labels, chunk_size=chunk)
            optims[id(model)].step()
            model.after_step()
    for (name, a), (_, b) in zip(chunked.state_dict().items(), reference.state_dict().items(), strict=True):
        if a.is_floating_point():
            assert _relative(a, b, floor=1.0 if "running" in name else 1e-300) < 1e-9, name
        else:
            assert torch.equal(a, b), name


def test_a_vit_without_batchnorm_chunks_to_the_plain_step_outright(one_thread):
    vit = ["model.backbone=vit_tiny", "model.patch_size=4", "model.proj_bn=false", "model.width=64"]
    base = _objective("sscl", *vit)
    x1, x2, labels = _views(N, seed=4)
    plain, chunked = copy.deepcopy(base), copy.deepcopy(base)
    _seeded(plain, 7)
    loss, _ = plain(x1, x2, labels)
    loss.backward()
    _seeded(chunked, 7)
    with tiling.loss_tile(7):
        chunked_loss, _ = chunked_step(chunked, x1, x2, labels, chunk_size=N // 4)
    assert _relative(chunked_loss, loss.detach()) < 1e-10
    assert _worst(chunked, plain) < 1e-10


def test_the_second_pass_leaves_running_statistics_alone():
    bn = torch.nn.BatchNorm1d(3).train()
    x = torch.randn(8, 3)
    with running_stats_frozen(bn):
        frozen_out = bn(x)
    assert torch.equal(bn.running_mean, torch.zeros(3)) and int(bn.num_batches_tracked) == 0
    assert bn.track_running_stats
    assert torch.equal(frozen_out, bn(x))  # the same batch statistics as a tracked train-mode pass
    assert int(bn.num_batches_tracked) == 1


def test_chunk_size_must_divide_every_per_worker_batch():
    with pytest.raises(HardnegError, match=r"train.chunk_size=5 must divide .* 12 at 2 workers"):
        config.load(None, ["train.global_batch_size=24", "cluster.num_workers=2", "train.chunk_size=5",
                           "cluster.min_workers=1"])  # fmt: skip
    with pytest.raises(HardnegError, match=r"does not divide 8 at 3 workers"):
        config.load(None, ["train.global_batch_size=24", "cluster.num_workers=3", "cluster.min_workers=1",
                           "train.chunk_size=3"])  # fmt: skip
    ok = config.load(None, ["train.global_batch_size=24", "cluster.num_workers=2", "cluster.min_workers=1",
                            "train.chunk_size=6"])  # fmt: skip
    assert ok.train.chunk_size == 6


# ---- W=2: each rank chunks its half of the global batch -------------------------------------------------------

WORLD = 2


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    ctx = dist.init_process_group("gloo", f"tcp://127.0.0.1:{port}", rank, WORLD, timeout_s=120)
    try:
        result = {}
        rows = slice(rank * N // WORLD, (rank + 1) * N // WORLD)
        for method in sorted(METHODS):
            objective = _objective(method, gather=dist.make_gather(ctx))
            x1, x2, labels = _views(N, seed=1)
            _seeded(objective, 5)
            with tiling.loss_tile(3):
                loss, _ = chunked_step(objective, x1[rows], x2[rows], labels[rows], chunk_size=N // 4)
            dist.average_gradients_(objective)
            result[method] = (dist.all_reduce_mean(loss), _grads(objective))
        save_rank(result, rank, out_dir)
    finally:
        dist.destroy_process_group()
    os._exit(0)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return spawn_ranks(_worker, WORLD, str(tmp_path_factory.mktemp("chunked")))


@pytest.mark.slow  # two spawned processes, every method
@pytest.mark.parametrize("method", sorted(METHODS))
def test_two_workers_give_the_one_worker_objective(two_ranks, method, one_thread):
    single = _objective(method)
    x1, x2, labels = _views(N, seed=1)
    _seeded(single, 5)
    loss, _ = chunked_step(single, x1, x2, labels, chunk_size=N // 4)
    grads = _grads(single)
    for rank_result in two_ranks:
        rank_loss, rank_grads = rank_result[method]
        assert _relative(rank_loss, loss) < 1e-10
        assert rank_grads.keys() == grads.keys()
        assert max(_relative(rank_grads[k], grads[k]) for k in grads) < 1e-10, method


# ---- through the training loop ---------------------------------------------------------------------------------


@pytest.mark.slow  # three short local trainings
def test_training_runs_chunked_and_one_whole_chunk_matches_the_plain_loop(tmp_path, digits_shards):
    from conftest import tiny_config

    from pipeline import checkpoint
    from pipeline.app import train_command

    def weights(name: str, *extra: str) -> dict:
        cfg = tiny_config(
            tmp_path / name, digits_shards, "tracking.enabled=false", "train.knn_every_epochs=0",
            "train.max_steps=3", "eval.knn_k=5", *extra,
        )  # fmt: skip
        result = train_command.train_run(cfg)
        assert result["step"] == 3
        return checkpoint.load(result["checkpoint"])["model"]

    plain = weights("plain")
    whole = weights("whole", "train.chunk_size=128")
    chunked = weights("chunked", "train.chunk_size=32", "train.loss_tile=64")
    for key, value in plain.items():
        if value.is_floating_point():
            assert torch.allclose(whole[key], value, rtol=1e-4, atol=1e-6), key
    moved = [k for k, v in chunked.items() if v.is_floating_point() and not torch.equal(v, plain[k])]
    assert moved and all(torch.isfinite(v).all() for v in chunked.values() if v.is_floating_point())
