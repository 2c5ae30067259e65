"""scripts/loopback_only.py, which `make test` runs the suite in: a fresh /tmp, HOME and caches, every time."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import loopback_only  # noqa: E402


def _tmp_is_a_mount() -> bool:
    try:
        with open("/proc/self/mountinfo") as f:
            return any(line.split()[4] == "/tmp" for line in f)
    except OSError:
        return False


IN_SANDBOX = os.environ.get(loopback_only.MARKER) == "1" and _tmp_is_a_mount()


def test_fresh_environ_points_home_and_caches_inside_and_keeps_pips_cache():
    env = loopback_only.fresh_environ(
        {"HOME": "/root", "HARDNEG_CACHE_DIR": "/data/cache", "RAY_ADDRESS": "10.0.0.1:6379", "PATH": "/bin"}, "/t"
    )
    assert env["HOME"] == "/t/home" and env["TMPDIR"] == "/t" and env["PATH"] == "/bin"
    assert all(env[k].startswith("/t/home/") for k in ("XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME"))
    assert env["PIP_CACHE_DIR"] == "/root/.cache/pip"  # the caller's: a second run installs nothing again
    assert "HARDNEG_CACHE_DIR" not in env and "RAY_ADDRESS" not in env


def test_without_unshare_it_says_so_and_still_gives_a_fresh_home_removed_afterwards(tmp_path):
    probe = "import json, os; print(json.dumps({'home': os.environ['HOME'], 'empty': os.listdir(os.environ['HOME'])}))"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "loopback_only.py"), sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k not in (loopback_only.MARKER, loopback_only.FRESH_TMP)}
        | {"PATH": str(tmp_path)},  # as from outside the suite's namespaces, with no unshare on PATH
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    *notes, last = proc.stdout.strip().splitlines()
    assert len(notes) == 2 and all(n.startswith("note: ") and "unshare is not installed" in n for n in notes)
    seen = json.loads(last)
    assert seen["empty"] == [] and os.path.basename(seen["home"]) == "home"
    assert not os.path.exists(os.path.dirname(seen["home"]))  # the fresh folder is gone


@pytest.mark.skipif(not IN_SANDBOX, reason="the suite runs outside scripts/loopback_only.py's namespaces")
def test_the_suite_runs_on_a_fresh_tmp_with_home_inside():
    assert os.path.expanduser("~") == "/tmp/home" and os.environ["XDG_CACHE_HOME"] == "/tmp/home/.cache"
    assert os.path.realpath(sys.prefix) != "/tmp" and not os.path.realpath(sys.prefix).startswith("/tmp/")
