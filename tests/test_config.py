"""Config strictness: unknown keys, wrong types, bad values and duplicate keys each name the key."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pydantic
import pytest

from pipeline import config
from pipeline.errors import HardnegError

ROOT = pathlib.Path(__file__).resolve().parents[1]


def write(tmp_path, text: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_defaults_and_yaml_and_overrides(tmp_path):
    cfg = config.load(write(tmp_path, "loss:\n  name: hcl\n  beta: 2\n"), ["train.epochs=3", "loss.tau_plus=0.05"])
    assert (cfg.loss.name, cfg.loss.beta, cfg.loss.tau_plus, cfg.train.epochs) == ("hcl", 2.0, 0.05, 3)
    assert cfg.optim == config.OptimConfig()  # untouched sections keep the defaults
    assert config.from_dict(config.to_dict(cfg)) == cfg  # round trip through plain data


def test_config_is_frozen():
    cfg = config.load()
    with pytest.raises(pydantic.ValidationError):
        cfg.train.epochs = 5


def test_unknown_key_names_key_and_allowed(tmp_path):
    with pytest.raises(HardnegError, match=r"unknown config key 'train\.epoch'.*epochs"):
        config.load(write(tmp_path, "train:\n  epoch: 3\n"))
    with pytest.raises(HardnegError, match=r"unknown config key 'trian'.*train"):
        config.load(None, ["trian.epochs=3"])


def test_wrong_type_names_key(tmp_path):
    with pytest.raises(HardnegError, match=r"train\.epochs='many'"):
        config.load(write(tmp_path, "train:\n  epochs: many\n"))
    with pytest.raises(HardnegError, match=r"model\.proj_bn"):
        config.load(None, ["model.proj_bn=[1, 2]"])


def test_bad_values_name_key_and_allowed():
    with pytest.raises(HardnegError, match=r"loss\.name='foo'.*'nt_xent'.*'sscl'"):
        config.load(None, ["loss.name=foo"])
    with pytest.raises(HardnegError, match=r"loss\.tau_plus=1\.0"):
        config.load(None, ["loss.tau_plus=1.0"])
    with pytest.raises(HardnegError, match=r"loss\.temperature=0"):
        config.load(None, ["loss.temperature=0"])
    with pytest.raises(HardnegError, match=r"crop_scale_min=0\.9.*crop_scale_max=0\.5"):
        config.load(None, ["augment.crop_scale_min=0.9", "augment.crop_scale_max=0.5"])


def test_global_batch_must_divide_by_workers():
    with pytest.raises(HardnegError, match=r"global_batch_size=129.*num_workers=2"):
        config.load(None, ["train.global_batch_size=129", "cluster.num_workers=2"])
    assert config.load(None, ["train.global_batch_size=129", "cluster.launcher=local"]).per_worker_batch_size == 129


def test_duplicate_yaml_key_refused(tmp_path):
    with pytest.raises(HardnegError, match=r"duplicate key 'epochs'"):
        config.load(write(tmp_path, "train:\n  epochs: 3\n  epochs: 4\n"))


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(HardnegError, match="config file not found"):
        config.load(str(tmp_path / "nope.yaml"))
    with pytest.raises(HardnegError, match="not valid YAML"):
        config.load(write(tmp_path, "train: [\n"))
    with pytest.raises(HardnegError, match="must hold a mapping"):
        config.load(write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(HardnegError, match="must look like"):
        config.load(None, ["train.epochs"])


def test_flatten_has_every_leaf():
    flat = config.flatten(config.load())
    assert flat["loss.name"] == "nt_xent" and flat["train.epochs"] == 10
    assert len(flat) == sum(
        len(section.model_fields) for section in (getattr(config.Config(), name) for name in config.Config.model_fields)
    )


def _modules_after(code: str) -> set[str]:
    """The top-level packages a fresh interpreter has imported after running ``code`` (this worktree first)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    probe = f"{code}\nimport sys\nprint('MODULES', *sorted({{m.split('.')[0] for m in sys.modules}}))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    last = out.stdout.splitlines()[-1].split()  # after what the code printed (a config's YAML)
    assert last[0] == "MODULES", out.stdout
    return set(last[1:])


HEAVY = {"torch", "torchvision", "timm", "numpy", "mlflow", "ray", "webdataset"}


def test_the_config_imports_no_torch():
    """Validating a config, and printing it, need pydantic and YAML only: no torch (seconds) on that path."""
    seen = _modules_after(
        "from pipeline import config\nconfig.load(None, ['loss.name=psm', 'model.backbone=vit_tiny'])"
    )
    assert "pipeline" in seen and "pydantic" in seen
    assert seen.isdisjoint(HEAVY), sorted(seen & HEAVY)


def test_print_config_and_a_config_error_import_no_torch(capsys):
    """`hardneg train --print-config` prints the resolved YAML, and a bad key fails, before the stack loads."""
    printed = _modules_after(
        "from pipeline.app.cli import main\n"
        "try:\n    main(['train', '--print-config', 'loss.name=hcl'])\n"
        "except SystemExit as done:\n    assert done.code == 0"  # --print-config exits once it has printed
    )
    failed = _modules_after("from pipeline.app.cli import main\nassert main(['train', 'loss.nope=1']) == 2")
    assert printed.isdisjoint(HEAVY) and failed.isdisjoint(HEAVY), sorted((printed | failed) & HEAVY)
