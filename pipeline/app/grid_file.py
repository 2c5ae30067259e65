"""Is a file a reproduce grid? Answered with YAML alone, before `hardneg reproduce` imports the training stack.

The full validation (types, unknown keys, config files) is pipeline.app.reproduce.load_grid; this is the cheap
first look that turns "a config, a manifest or an empty file given as the grid" into one line in a second.
"""

from __future__ import annotations

import os

import yaml

from pipeline.errors import HardnegError

REQUIRED = ("name", "datasets", "methods")  # the keys of reproduce.Grid without a default


def check_grid_file(path: str) -> None:
    """HardnegError unless ``path`` is a readable YAML mapping holding a grid's required keys."""
    if not os.path.isfile(path):
        raise HardnegError(f"grid file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise HardnegError(f"grid file {path} is not valid YAML: {getattr(e, 'problem', None) or e}{where}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise HardnegError(f"cannot read grid file {path}: {e}") from None
    if not isinstance(raw, dict):
        raise HardnegError(
            f"{path} is not a grid: it holds {type(raw).__name__}, not a mapping of {', '.join(REQUIRED)}"
        )
    missing = [k for k in REQUIRED if k not in raw]
    if missing:
        hint = " (it looks like a training config; pass it to `hardneg train --config`)" if "loss" in raw else ""
        raise HardnegError(
            f"{path} is not a grid: it lacks {', '.join(missing)}{hint}; a grid names its methods' configs, "
            f"datasets and seeds, e.g. configs/grids/digits.yaml"
        )
