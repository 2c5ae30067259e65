"""data_prep/atomic.py: every writer's file appears whole or not at all, and a failure leaves no temp behind."""

from __future__ import annotations

import json
import os

import fsspec
import pytest

from data_prep.atomic import atomic_dir, atomic_open, put_atomic, put_file_atomic, write_atomic, write_json_atomic
from data_prep.errors import HardnegError


def test_a_write_appears_whole_and_a_failed_one_not_at_all(tmp_path):
    target = tmp_path / "report.json"
    write_json_atomic(str(target), {"a": 1}, indent=2)
    assert json.loads(target.read_text()) == {"a": 1}
    with pytest.raises(RuntimeError):
        with atomic_open(str(target), "w") as f:
            f.write('{"half": ')
            raise RuntimeError("disk full")
    assert json.loads(target.read_text()) == {"a": 1}  # the old file is untouched
    assert sorted(os.listdir(tmp_path)) == ["report.json"]  # and no temp is left
    write_atomic(str(target), b"bytes")
    assert target.read_bytes() == b"bytes"


def test_a_directory_is_renamed_whole_replacing_the_old_one(tmp_path):
    target = tmp_path / "ckpt"
    for version in ("1", "2"):
        with atomic_dir(str(target), replace=True) as tmp:
            os.makedirs(tmp)
            with open(os.path.join(tmp, "v"), "w") as f:
                f.write(version)
    assert (target / "v").read_text() == "2"
    with pytest.raises(ValueError):
        with atomic_dir(str(target), replace=True) as tmp:
            os.makedirs(tmp)
            raise ValueError("crash mid-write")
    assert (target / "v").read_text() == "2" and sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_fsspec_writes_go_through_a_temp_name(tmp_path):
    fs = fsspec.filesystem("memory")
    put_atomic(fs, "/bucket/shard.tar", b"payload")
    assert fs.cat("/bucket/shard.tar") == b"payload" and fs.ls("/bucket", detail=False) == ["/bucket/shard.tar"]
    local = tmp_path / "local.bin"
    local.write_bytes(b"file")
    put_file_atomic(fs, str(local), "/bucket/file.bin")
    assert fs.cat("/bucket/file.bin") == b"file"
    moved = tmp_path / "moved.bin"
    put_file_atomic(fsspec.filesystem("file"), str(local), str(moved))
    assert moved.read_bytes() == b"file" and not local.exists()
    with pytest.raises(HardnegError, match="cannot write"):
        put_atomic(fsspec.filesystem("file"), str(tmp_path / "no" / "such" / "dir" / "x"), b"x")
