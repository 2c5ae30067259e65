"""prepare() at work: parallel = serial, resumable after a kill, byte caps, full disks, one-line CLI errors."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import signal
import subprocess
import sys
import tarfile
import time

import pytest
from fsspec.implementations.local import LocalFileSystem

import data_prep.jobs as jobs
from data_prep import synthetic
from data_prep.manifest import RUN_NAME, verify
from data_prep.prep import prepare
from pipeline.app.cli import main
from pipeline.errors import HardnegError


@pytest.fixture(scope="module")
def cifar(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("src") / "cifar-10-python.tar.gz"
    return synthetic.write_cifar10(str(path), n_train=300, n_test=60)


def digests(out) -> dict[str, str]:
    """sha256 of every visible file, the manifest included, but prep_run.json (the time and workers of the run)."""
    return {
        n: hashlib.sha256((out / n).read_bytes()).hexdigest()
        for n in sorted(os.listdir(out))
        if n != RUN_NAME and not n.startswith(".")
    }


def hidden(out) -> list[str]:
    return [n for n in os.listdir(out) if n.startswith(".")]


def without_time(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k not in ("created", "prep")} | {
        "prep": {k: v for k, v in manifest["prep"].items() if k != "workers"}
    }


@pytest.fixture(scope="module")
def reference(cifar, tmp_path_factory):
    """An uninterrupted, single-process run: (out, manifest)."""
    out = tmp_path_factory.mktemp("ref") / "out"
    return out, prepare(f"cifar10:{cifar}", str(out), shard_size=40, seed=7)


def test_workers_give_the_same_bytes(cifar, reference, tmp_path):
    ref_out, ref = reference
    out = tmp_path / "out"
    manifest = prepare(f"cifar10:{cifar}", str(out), shard_size=40, seed=7, workers=2)
    assert without_time(manifest) == without_time(ref)
    assert digests(out) == digests(ref_out)
    assert [s["num_samples"] for s in ref["splits"]["train"]["shards"]] == [40] * 7 + [20]
    assert verify(str(out)) == [] and hidden(out) == []


def test_killed_run_resumes_without_rewriting_and_ends_identical(cifar, reference, tmp_path, monkeypatch):
    ref_out, ref = reference
    out = tmp_path / "out"
    real, calls = jobs.write_shard, []

    def dies_after_three(records, url, image_format):
        if len(calls) == 3:
            raise KeyboardInterrupt  # what Ctrl-C (or a kill between two shards) looks like
        calls.append(url)
        return real(records, url, image_format)

    monkeypatch.setattr(jobs, "write_shard", dies_after_three)
    with pytest.raises(KeyboardInterrupt):
        prepare(f"cifar10:{cifar}", str(out), shard_size=40, seed=7)
    monkeypatch.undo()
    assert not (out / "manifest.json").exists()
    finished = sorted(os.path.basename(u) for u in calls)
    assert sorted(n for n in os.listdir(out) if n.endswith(".tar")) == finished
    (out / ".train-000005.tar.tmp-0123456789abcdef0123456789abcdef").write_bytes(b"half a shard")  # a kill mid-write
    before = {n: os.stat(out / n) for n in finished}

    written = []
    monkeypatch.setattr(jobs, "write_shard", lambda *a: written.append(a[1]) or real(*a))
    manifest = prepare(f"cifar10:{cifar}", str(out), shard_size=40, seed=7)
    total = sum(len(v["shards"]) for v in ref["splits"].values())
    assert total == 10 and len(written) == total - 3, "only the unfinished shards are written"
    for name, st in before.items():
        now = os.stat(out / name)
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), f"{name} was rewritten"
    assert without_time(manifest) == without_time(ref)
    assert digests(out) == digests(ref_out)
    assert verify(str(out)) == [] and hidden(out) == []
    written.clear()
    prepare(f"cifar10:{cifar}", str(out), shard_size=40, seed=7)  # a complete run: nothing to do
    assert written == []


def test_sigkill_mid_run_then_rerun_matches_an_uninterrupted_run(tmp_path):
    src = synthetic.write_cifar10(str(tmp_path / "c10.tar.gz"), n_train=1500, n_test=100)
    ref = tmp_path / "ref"
    prepare(f"cifar10:{src}", str(ref), shard_size=10)
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "pipeline.app.cli",
        "prep",
        f"cifar10:{src}",
        str(out),
        "--shard-size",
        "10",
        "--quiet",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and len([n for n in os.listdir(out) if n.endswith(".tar")]) >= 5:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(n for n in os.listdir(out) if n.endswith(".tar"))
    assert 5 <= len(done) < 160 and not (out / "manifest.json").exists(), "killed mid-run"
    for name in done:  # every shard under its final name is whole
        with tarfile.open(out / name) as tar:
            assert len(tar.getmembers()) == 3 * 10
    before = {n: os.stat(out / n).st_mtime_ns for n in done}
    subprocess.run(cmd, check=True)
    assert {n: os.stat(out / n).st_mtime_ns for n in done} == before, "finished shards were not rewritten"
    assert digests(out) == digests(ref) and verify(str(out)) == [] and hidden(out) == []


def test_changed_settings_do_not_reuse_old_shards(cifar, reference, tmp_path):
    ref_out, _ = reference
    out = tmp_path / "out"
    prepare(f"cifar10:{cifar}", str(out), shard_size=40, seed=8)
    prepare(f"cifar10:{cifar}", str(out), shard_size=40, seed=7)
    assert digests(out) == digests(ref_out)


def test_shard_bytes(cifar, tmp_path):
    out = tmp_path / "out"
    manifest = prepare(f"cifar10:{cifar}", str(out), shard_bytes="100KB")
    sizes = [s["bytes"] for s in manifest["splits"]["train"]["shards"]]
    assert manifest["prep"]["shard_bytes"] == 100_000 and len(sizes) > 2
    assert max(sizes) <= 110_000 and sorted(sizes)[-2] >= 70_000, sizes
    with pytest.raises(HardnegError, match="shard_bytes='lots'"):
        prepare(f"cifar10:{cifar}", str(tmp_path / "o2"), shard_bytes="lots")


class _FillsUp:
    """A file that takes half of what it is given, then fails like a full disk."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        self.f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_disk_filling_up_mid_shard(cifar, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    real_open = LocalFileSystem.open

    def open_(self, path, mode="rb", **kw):
        f = real_open(self, path, mode, **kw)
        return _FillsUp(f) if "w" in mode and ".tar.tmp-" in path else f

    monkeypatch.setattr(LocalFileSystem, "open", open_)
    with pytest.raises(HardnegError, match="No space left on device") as e:
        prepare(f"cifar10:{cifar}", str(out), shard_size=40)
    assert "\n" not in str(e.value) and "partial file was removed" in str(e.value)
    assert not [n for n in os.listdir(out) if n.endswith(".tar") or ".tmp-" in n]
    assert not (out / "manifest.json").exists()


def test_progress_bar_shows_rate_and_eta(cifar, tmp_path, capsys):
    prepare(f"cifar10:{cifar}", str(tmp_path / "out"), shard_size=40, progress=True)
    err = capsys.readouterr().err
    assert "img/s" in err and re.search(r"\d\d:\d\d<\d\d:\d\d", err), err[-300:]


def test_memory_out_with_worker_processes_is_refused(cifar):
    with pytest.raises(HardnegError, match="memory:// is private"):
        prepare(f"cifar10:{cifar}", "memory://hardneg-x/out", workers=2)


def cli_error(capsys, *argv) -> str:
    """Run the CLI expecting a user error: exit code 2 and exactly one line on stderr, no traceback."""
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hardneg: error: "), err
    return lines[0]


def test_cli_bad_inputs_are_one_line(cifar, tmp_path, capsys):
    c100 = synthetic.write_cifar100(str(tmp_path / "c100.tar.gz"), n_train=5, n_test=5)
    trunc = tmp_path / "trunc.tar.gz"
    trunc.write_bytes(open(cifar, "rb").read()[:5000])
    (tmp_path / "pets" / "cat").mkdir(parents=True)
    (tmp_path / "pets" / "cat" / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (tmp_path / "pets" / "cat" / "y.png").write_bytes(open(cifar, "rb").read()[:100])
    out = str(tmp_path / "out")
    assert "not the CIFAR-10" in cli_error(capsys, "prep", f"cifar10:{c100}", out, "--quiet")
    assert "truncated or corrupt" in cli_error(capsys, "prep", f"cifar10:{trunc}", out, "--quiet")
    assert "x.png" in cli_error(capsys, "prep", f"imagefolder:{tmp_path / 'pets'}", out, "--quiet", "--strict")
    assert "no readable images" in cli_error(capsys, "prep", f"imagefolder:{tmp_path / 'pets'}", out, "--quiet")
    assert "workers=0" in cli_error(capsys, "prep", f"cifar10:{cifar}", out, "--workers", "0")
    assert not os.path.exists(out)


def test_cli_prep_and_verify(cifar, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["prep", f"cifar10:{cifar}", str(out), "--shard-size", "100", "--workers", "2", "--quiet"]) == 0
    assert "train: 300 in 3 shards, test: 60 in 1 shards" in capsys.readouterr().out
    assert main(["prep", "verify", str(out)]) == 0
    with open(out / "train-000001.tar", "r+b") as f:
        f.seek(2000)
        f.write(b"\0\1\2")
    line = cli_error(capsys, "prep", "verify", str(out))
    assert "1 problem(s)" in line
