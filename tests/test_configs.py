"""Every shipped config loads, names what its file name says, cites its source, and keeps the demo's setup."""

from __future__ import annotations

import pathlib

import pytest
import yaml

from pipeline import config

ROOT = pathlib.Path(__file__).resolve().parents[1] / "configs"
DIGITS = ["nt_xent", "dcl", "hcl", "sscl", "psm", "mochi", "moco_v2"]
LOSS_OF = {"moco_v2": "mochi"}  # MoCo-v2 is MoCHi with s = s' = 0
# MoCo-v2's head and shuffle-BN are the only model settings a digits config may change from the demo
MOCO_MODEL = {"proj_hidden_dim", "proj_bn", "shuffle_bn_groups"}
BASELINES = [
    "simclr_hcl_stl10",
    "simclr_hcl_cifar10",
    "simclr_hcl_cifar100",
    "simclr_sscl_cifar10",
    "simclr_sscl_cifar100",
    "simclr_sscl_tinyimagenet",
    "mocov2_imagenet100",
    "mochi_imagenet100",
]
RECIPES = [
    "hcl_stl10",
    "hcl_cifar10",
    "hcl_cifar100",
    "dcl_stl10",
    "dcl_cifar10",
    "dcl_cifar100",
    "sscl_cifar10",
    "sscl_cifar100",
    "sscl_tinyimagenet",
    "psm_cifar10",
    "psm_cifar100",
    "psm_tinyimagenet",
]
# Run configs: the demo, the digits methods and the papers' recipes (other folders, e.g. grids/, hold other formats)
ALL = ["demo.yaml"] + sorted(
    str(p.relative_to(ROOT)) for sub in ("digits", "recipes") for p in (ROOT / sub).glob("*.yaml")
)


def test_the_expected_files_exist():
    expected = {"demo.yaml"} | {f"digits/{n}.yaml" for n in DIGITS} | {f"recipes/{n}.yaml" for n in RECIPES + BASELINES}
    assert expected <= set(ALL)


@pytest.mark.parametrize("rel", ALL)
def test_every_config_loads(rel):
    cfg = config.load(str(ROOT / rel))
    assert config.from_dict(config.to_dict(cfg)) == cfg


@pytest.mark.parametrize("name", DIGITS)
def test_digits_configs_are_the_demo_plus_the_method(name):
    demo = yaml.safe_load((ROOT / "demo.yaml").read_text())
    mine = yaml.safe_load((ROOT / "digits" / f"{name}.yaml").read_text())
    if name in ("mochi", "moco_v2"):  # MoCo family: Linear-ReLU-Linear head (hidden = feature width) and shuffle-BN
        assert set(mine["model"]) - set(demo["model"]) <= MOCO_MODEL and mine["model"]["proj_bn"] is False
        mine["model"] = {k: v for k, v in mine["model"].items() if k not in MOCO_MODEL}
        demo["model"] = {k: v for k, v in demo["model"].items() if k not in MOCO_MODEL}
    assert {k: v for k, v in mine.items() if k != "loss"} == {k: v for k, v in demo.items() if k != "loss"}
    assert config.load(str(ROOT / "digits" / f"{name}.yaml")).loss.name == LOSS_OF.get(name, name)


@pytest.mark.parametrize("name", RECIPES + BASELINES)
def test_recipes_name_their_method_and_cite_their_source(name):
    """The file name says the method and the dataset; the header cites the paper and the release. (The values
    themselves are the releases': docs/recipes.md gives each one's source line; a test restating them could not
    tell a wrong value from a right one.)"""
    path = ROOT / "recipes" / f"{name}.yaml"
    text = path.read_text()
    header = "".join(line for line in text.splitlines(keepends=True) if line.startswith("#"))
    assert "arXiv:" in header and "github.com/" in header, f"{name}: the header must cite paper and repository"
    cfg = config.load(str(path))
    method, dataset = name.rsplit("_", 1)
    loss = {"simclr_hcl": "nt_xent", "simclr_sscl": "nt_xent", "mocov2": "mochi"}.get(method, method)
    assert cfg.loss.name == loss and dataset in cfg.data.path
    assert cfg.model.stem == ("imagenet" if dataset in ("tinyimagenet", "imagenet100") else "cifar")


def test_demo_trains_sscl_with_n_hard_within_the_negatives():
    cfg = config.load(str(ROOT / "demo.yaml"))
    assert cfg.loss.name == "sscl"
    n_negatives = 2 * cfg.train.global_batch_size - 2
    assert 1 <= cfg.loss.n_hard <= n_negatives and cfg.world_size == 2


def test_new_loss_names_and_values_are_validated():
    from pipeline.errors import HardnegError

    with pytest.raises(HardnegError, match=r"loss\.name='simsiam'.*'psm'.*'mochi'"):
        config.load(None, ["loss.name=simsiam"])
    with pytest.raises(HardnegError, match=r"loss\.psm_momentum=1\.5"):
        config.load(None, ["loss.psm_momentum=1.5"])
    with pytest.raises(HardnegError, match=r"loss\.mochi_s=-1"):
        config.load(None, ["loss.mochi_s=-1"])
    with pytest.raises(HardnegError, match=r"loss\.psm_accept_a=-0\.1"):
        config.load(None, ["loss.psm_accept_a=-0.1"])


@pytest.mark.parametrize("name", RECIPES + BASELINES)
def test_recipes_follow_their_release_protocol(name):
    """Evaluation and selection settings the releases use (docs/recipes.md cites the lines)."""
    cfg = config.load(str(ROOT / "recipes" / f"{name}.yaml"))
    text = (ROOT / "recipes" / f"{name}.yaml").read_text()
    assert "arXiv:" in text and "github.com/" in text
    family = (
        "moco"
        if "imagenet100" in name
        else ("hcl" if name.split("_")[0] in ("hcl", "dcl") or "_hcl_" in name else "sscl")
    )
    if family == "hcl":
        assert (cfg.eval.probe_transform, cfg.eval.probe_batch_size, cfg.train.best_by) == ("train", 512, "knn")
        assert cfg.eval.eval_image_size == (96 if name.endswith("stl10") else None)  # STL-10 tested at native 96 px
        assert not cfg.model.stem_maxpool
    elif family == "sscl":
        assert (cfg.eval.probe_transform, cfg.eval.probe_blur_p, cfg.train.best_by) == ("train", 0.5, "loss")
        cifar = "cifar" in name
        assert cfg.model.stem_maxpool == cifar and cfg.eval.probe_crop_min == (0.25 if cifar else None)
        assert "--val-fraction" in text and not cfg.model.proj_bn or cfg.loss.name == "psm"
    else:
        c = cfg.loss
        assert (c.temperature, c.mochi_momentum, c.mochi_queue_size, cfg.optim.lr) == (0.2, 0.999, 65536, 0.03)
        assert (cfg.model.proj_bn, cfg.model.shuffle_bn_groups, cfg.model.proj_hidden_dim) == (False, 8, 2048)
        assert (c.mochi_s, c.mochi_s_prime) == ((0, 0) if name.startswith("mocov2") else (1024, 512))
    if name.startswith("simclr"):
        assert cfg.loss.name == "nt_xent"
