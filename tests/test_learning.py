"""Training learns: the demo recipe, shortened to 4 epochs in one process, beats its own random init and chance."""

from __future__ import annotations

import pytest

from pipeline.app.demo import run_demo

pytestmark = pytest.mark.slow  # minutes of CPU: not in make test-fast

# Measured on 2026-12-04 (2-core CPU, this exact run): trained 0.953, random init 0.873, raw pixels 0.963 kNN
# top-1 on the 300 test digits (10 epochs gave 0.950 / 0.873 / 0.960 on 2026-11-29: the margin is there after 4).
# The bound keeps about half of that 0.080 margin for seed and machine noise.
MARGIN = 0.04


def test_demo_recipe_beats_random_init_and_chance(tmp_path):
    result = run_demo(
        "configs/demo.yaml",
        str(tmp_path / "demo"),
        [
            "cluster.launcher=local",
            "train.epochs=4",
            "train.knn_every_epochs=0",
            "tracking.log_model=false",
            "tracking.plots=false",
            "train.threads_per_worker=2",
        ],
    )
    assert result["trained"] >= result["random_init"] + MARGIN, result
    assert result["trained"] > 0.5  # ten balanced classes: chance is 0.1
