"""The conftest guard: a test that starts Ray without the ``ray`` marker fails, naming itself (tests/conftest.py).

The inner tests run in a pytest of their own over a copy of this suite's conftest; none of them starts a Ray.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

INNER = """
import pytest


def test_calls_ray_init():
    import ray

    ray.init(num_cpus=1)


def test_trains_on_the_default_launcher(tmp_path):
    from cluster.train import local_ray

    with local_ray(1):
        pass


def test_a_tiny_config_trains_in_one_process(tmp_path):
    from conftest import tiny_config

    assert tiny_config(tmp_path, "unused").cluster.launcher == "local"


@pytest.mark.ray
def test_marked_sees_the_real_ray():
    import ray

    assert ray.init.__module__.startswith("ray")
"""


def test_starting_ray_without_the_marker_fails(tmp_path):
    shutil.copy(os.path.join(ROOT, "tests", "conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_inner.py").write_text(INNER)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore", "-rf", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=os.environ | {"PYTHONPATH": ROOT},
        timeout=300,
    )
    out = proc.stdout
    assert "2 failed, 2 passed" in out, out[-3000:]
    for name in ("test_calls_ray_init", "test_trains_on_the_default_launcher"):
        assert f"FAILED test_inner.py::{name}" in out, out
        assert f"\ntest_inner.py::{name} starts Ray without @pytest.mark.ray" in out, out
