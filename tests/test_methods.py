"""The method table (pipeline/methods): a method is its settings and its loss (or objective) plus one
registry line, and a loss key of another method is a one-line error naming it."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
import toy_method

from pipeline import config, run_info, train
from pipeline.app.cli import main as cli_main
from pipeline.errors import HardnegError
from pipeline.losses import dcl, hcl, nt_xent, sscl
from pipeline.methods import METHODS
from pipeline.methods.base import InBatchMethod
from pipeline.objectives import bind_loss, build_objective

TINY = ["model.width=4", "model.proj_hidden_dim=16", "model.proj_dim=8"]

# every loss.* key a config could hold before the per-method union: each must still belong to some method
KEYS_BEFORE_THE_UNION = {
    "name", "temperature", "tau_plus", "beta", "n_hard", "n_synthetic", "mix",
    "psm_momentum", "psm_bank_size", "psm_n_neighbors", "psm_accept_a", "psm_accept_b", "psm_variant", "psm_aa",
    "mochi_momentum", "mochi_queue_size", "mochi_n_hard", "mochi_s", "mochi_s_prime",
}  # fmt: skip


@contextmanager
def registered_toy():
    """Register tests/toy_method.py as loss.name=toy: the one registry line, and Config validates it at once."""
    METHODS["toy"] = toy_method.METHOD
    try:
        yield toy_method
    finally:
        del METHODS["toy"]


@pytest.fixture
def toy():
    with registered_toy() as module:
        yield module


def test_a_toy_method_trains_through_the_registry_only(toy):
    cfg = config.load(None, [*TINY, "loss.name=toy", "loss.toy_scale=3"])
    assert isinstance(cfg.loss, toy.Settings) and cfg.loss.toy_scale == 3.0
    assert config.to_dict(cfg)["loss"] == {"name": "toy", "temperature": 0.5, "n_hard": 32, "toy_scale": 3.0}
    assert config.from_dict(config.to_dict(cfg)) == cfg  # checkpoints and Ray workers round-trip it
    assert config.own_loss_keys("toy") == ("toy_scale",)
    assert {k for k in run_info.run_params(cfg) if k.startswith("loss.")} == {
        "loss.name",
        "loss.temperature",
        "loss.n_hard",
        "loss.toy_scale",
    }
    torch.manual_seed(0)
    objective = build_objective(cfg)
    optimizer = train.build_optimizer(cfg.optim, objective)
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.randn(6, 3, 8, 8, generator=g), torch.randn(6, 3, 8, 8, generator=g)
    before = [p.detach().clone() for p in objective.parameters()]
    loss, stats = objective(x1, x2, torch.arange(6) % 3, with_stats=True)
    with torch.no_grad():
        z1, z2 = objective.model(torch.cat([x1, x2])).chunk(2)
        expected = 3.0 * nt_xent(z1, z2, temperature=0.5)
    torch.testing.assert_close(loss, expected)
    assert "sim_pos_mean" in stats and "false_neg_rate" in stats  # the in-batch diagnostics come with it
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    objective.after_step()
    assert any(not torch.equal(b, p) for b, p in zip(before, objective.parameters(), strict=True))
    with pytest.raises(HardnegError, match=r"^loss\.toy_scale=2 is not a setting of loss\.name=hcl .*toy"):
        config.load(None, ["loss.name=hcl", "loss.toy_scale=2"])


def test_the_toy_is_gone_once_unregistered():
    """Registering and unregistering in this test itself, so it holds alone, under -k, and in any order."""
    with registered_toy():
        assert config.load(None, ["loss.name=toy"]).loss.name == "toy"
    assert "toy" not in METHODS
    with pytest.raises(HardnegError, match=r"loss\.name='toy'"):
        config.load(None, ["loss.name=toy"])
    with pytest.raises(HardnegError, match=r"^unknown config key 'loss\.toy_scale'"):
        config.load(None, ["loss.toy_scale=2"])  # nor is its key left to any method


@pytest.mark.parametrize(
    "method,key",
    [("hcl", "psm_momentum"), ("nt_xent", "tau_plus"), ("psm", "mochi_s"), ("mochi", "n_hard"), ("dcl", "beta")],
)
def test_another_methods_key_is_a_one_line_error_naming_it(tmp_path, method, key):
    with pytest.raises(HardnegError) as err:
        config.load(None, [f"loss.name={method}", f"loss.{key}=0.5"])
    message = str(err.value)
    assert "\n" not in message and f"loss.{key}=0.5" in message and f"loss.name={method}" in message
    owners = [n for n, m in METHODS.items() if key in m.Settings.model_fields]
    assert owners and all(o in message for o in owners)
    path = tmp_path / "c.yaml"
    path.write_text(f"loss:\n  name: {method}\n  {key}: 0.5\n")
    with pytest.raises(HardnegError, match=rf"loss\.{key}=0\.5 is not a setting of loss\.name={method}"):
        config.load(str(path))


def test_cli_prints_the_foreign_key_in_one_line(capsys):
    assert cli_main(["train", "--print-config", "loss.name=hcl", "loss.psm_momentum=0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "loss.psm_momentum=0.5" in err[0] and "psm" in err[0]


def test_values_are_checked_by_their_own_method():
    with pytest.raises(HardnegError, match=r"^invalid config value loss\.psm_momentum=1\.5: .*less than or equal"):
        config.load(None, ["loss.name=psm", "loss.psm_momentum=1.5"])
    with pytest.raises(HardnegError, match=r"^invalid config value loss\.tau_plus=1\.0: .*less than 1"):
        config.load(None, ["loss.name=hcl", "loss.tau_plus=1.0"])
    with pytest.raises(HardnegError, match=r"^unknown config key 'loss\.temprature'; allowed for loss\.name=sscl: "):
        config.load(None, ["loss.name=sscl", "loss.temprature=0.2"])
    assert config.load(None, ["loss.temperature=0.2"]).loss.name == "nt_xent"  # no name: the default method


def test_registry_rows_own_their_name_and_every_old_key():
    for name, row in METHODS.items():
        settings = config.load(None, [f"loss.name={name}"]).loss
        assert type(settings) is row.Settings and settings.name == name
        assert config.loss_keys(name)[:2] == ("name", "temperature")
        assert isinstance(
            build_objective(config.load(None, [*TINY, f"loss.name={name}", *_small(name)])), torch.nn.Module
        )
    assert set().union(*(m.Settings.model_fields for m in METHODS.values())) >= KEYS_BEFORE_THE_UNION


IN_BATCH_BY_HAND = [  # each in-batch row, non-default settings, and the call its row must make
    ("nt_xent", ["loss.temperature=0.3"], lambda z1, z2, g: nt_xent(z1, z2, temperature=0.3)),
    (
        "dcl",
        ["loss.temperature=0.3", "loss.tau_plus=0.2"],
        lambda z1, z2, g: dcl(z1, z2, temperature=0.3, tau_plus=0.2),
    ),
    (
        "hcl",
        ["loss.temperature=0.3", "loss.tau_plus=0.2", "loss.beta=2"],
        lambda z1, z2, g: hcl(z1, z2, temperature=0.3, tau_plus=0.2, beta=2.0),
    ),
    (
        "sscl",
        [
            "loss.temperature=0.3",
            "loss.tau_plus=0.2",
            "loss.beta=2",
            "loss.n_hard=4",
            "loss.n_synthetic=3",
            "loss.mix=release",
        ],
        lambda z1, z2, g: sscl(
            z1, z2, temperature=0.3, tau_plus=0.2, beta=2.0, n_hard=4, n_synthetic=3, mix="release", generator=g
        ),
    ),
]


@pytest.mark.parametrize("name,overrides,by_hand", IN_BATCH_BY_HAND, ids=[row[0] for row in IN_BATCH_BY_HAND])
def test_an_in_batch_row_calls_its_loss_with_its_settings(name, overrides, by_hand):
    """The table's one rule: the loss gets every setting but name and the diagnostics-only keys, by name."""
    assert isinstance(METHODS[name], InBatchMethod)
    bound = bind_loss(config.load(None, [f"loss.name={name}", *overrides]).loss)
    g = torch.Generator().manual_seed(2)
    z1, z2 = torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randn(8, 5, generator=g, dtype=torch.float64)
    got = bound(z1, z2, None, torch.Generator().manual_seed(3))
    torch.testing.assert_close(got, by_hand(z1, z2, torch.Generator().manual_seed(3)))
    default = bind_loss(config.load(None, [f"loss.name={name}"]).loss)(z1, z2, None, torch.Generator().manual_seed(3))
    assert not torch.allclose(got, default)  # the settings reached the loss


def test_every_in_batch_row_is_covered_above():
    assert {n for n, row in METHODS.items() if isinstance(row, InBatchMethod)} == {r[0] for r in IN_BATCH_BY_HAND}


def _small(name: str) -> list[str]:
    return {
        "psm": ["loss.psm_bank_size=16", "loss.psm_n_neighbors=2"],
        "mochi": ["loss.mochi_queue_size=16", "loss.mochi_n_hard=4"],
    }.get(name, [])


def test_checkpoints_written_before_the_union_still_load():
    """Old checkpoints stored every method's loss keys; upgrade() drops the ones the run's method never read."""
    cfg = config.load(None, ["loss.name=hcl", "loss.beta=2"])
    old = config.to_dict(cfg)
    for row in METHODS.values():  # the old flat LossConfig: every method's defaults beside hcl's values
        old["loss"] = row.Settings.model_validate({}).model_dump(mode="json") | old["loss"]
    old["loss"]["name"] = "hcl"
    assert "psm_momentum" in old["loss"] and "mochi_s" in old["loss"]
    with pytest.raises(HardnegError, match=r"loss\.(psm|mochi|n_synthetic|mix)"):
        config.from_dict(old)
    assert config.from_dict(config.upgrade(old)) == cfg
    assert train.resume_mismatches(old, cfg) == []
    assert train.resume_mismatches(config.to_dict(cfg), config.load(None, ["loss.name=dcl"])) == [
        "loss.name: 'hcl' -> 'dcl'"
    ]
