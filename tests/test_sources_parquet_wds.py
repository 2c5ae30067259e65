"""parquet:PATH and wds:URL_PATTERN: real parquet files written with pyarrow, real shards with webdataset's writer."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from webdataset import TarWriter

from data_prep.prep import prepare
from data_prep.sources import open_source
from pipeline.errors import HardnegError

CLASSES = ["cat", "dog", "fish"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HARDNEG_CACHE_DIR", str(tmp_path / "cache"))


def one_line_error(fn, *words):
    with pytest.raises(HardnegError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    return msg


def jpeg(seed: int, size: int = 40, fmt: str = "JPEG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size + 4, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, quality=90)
    return buf.getvalue()


def hf_parquet(path, rows: list, hf_meta: bool = True, image="image", label="label", struct=True) -> None:
    """A parquet file as ``datasets`` exports it: image {"bytes", "path"} + ClassLabel int64 label."""
    images = [
        None if b is None else ({"bytes": b, "path": f"img{i}.jpg"} if struct else b) for i, (b, _) in enumerate(rows)
    ]
    kind = pa.struct([("bytes", pa.binary()), ("path", pa.string())]) if struct else pa.binary()
    table = pa.table({image: pa.array(images, type=kind), label: pa.array([y for _, y in rows], type=pa.int64())})
    if hf_meta:
        features = {image: {"_type": "Image"}, label: {"names": CLASSES, "_type": "ClassLabel"}}
        table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    pq.write_table(table, str(path), row_group_size=4)


def hf_export(root) -> dict:
    """data/train-0000{0,1}-of-00002.parquet and data/test-00000-of-00001.parquet; one corrupt, one null image."""
    os.makedirs(root / "data", exist_ok=True)
    train = [(jpeg(i), i % 3) for i in range(13)]
    train[5] = (b"not a jpeg at all", 1)
    train[9] = (None, 2)
    test = [(jpeg(100 + i), i % 3) for i in range(5)]
    hf_parquet(root / "data" / "train-00000-of-00002.parquet", train[:7])
    hf_parquet(root / "data" / "train-00001-of-00002.parquet", train[7:])
    hf_parquet(root / "data" / "test-00000-of-00001.parquet", test)
    return {"train": train, "test": test}


def shard_digests(out) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.tar"))}


def test_parquet_hf_export_records_classes_and_splits(tmp_path):
    rows = hf_export(tmp_path / "ds")
    src = open_source(f"parquet:{tmp_path / 'ds'}")
    assert src.sizes == {"test": 5, "train": 13} and src.classes == CLASSES
    for i in (0, 6, 7, 12):  # across the two train files
        r = src.record("train", i)
        assert r.label == rows["train"][i][1] and r.data == rows["train"][i][0]  # the JPEG bytes themselves
        assert r.image.shape == (40, 44, 3)
    assert src.record("test", 4).data == rows["test"][4][0]
    assert src.record("train", 8).file == "data/train-00001-of-00002.parquet:1"


def test_parquet_prep_skips_lists_is_byte_identical_and_resumes(tmp_path):
    hf_export(tmp_path / "ds")
    spec = f"parquet:{tmp_path / 'ds'}"
    manifest = prepare(spec, str(tmp_path / "out"), shard_size=4)
    assert manifest["splits"]["train"]["num_samples"] == 11 and manifest["splits"]["test"]["num_samples"] == 5
    assert manifest["splits"]["train"]["classes"] == CLASSES
    skipped = {s["file"]: s["error"] for s in manifest["skipped"]}
    assert set(skipped) == {"data/train-00000-of-00002.parquet:5", "data/train-00001-of-00002.parquet:2"}
    assert "null" in skipped["data/train-00001-of-00002.parquet:2"]
    first = shard_digests(tmp_path / "out")
    prepare(spec, str(tmp_path / "again"), shard_size=4)  # a fresh run: the same bytes
    assert shard_digests(tmp_path / "again") == first
    # resume: lose one shard and the manifest; the rest stays untouched, the result is the same
    victim = sorted((tmp_path / "out").glob("train-*.tar"))[1]
    others = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.tar") if p != victim}
    victim.unlink()
    (tmp_path / "out" / "manifest.json").unlink()
    prepare(spec, str(tmp_path / "out"), shard_size=4)
    assert shard_digests(tmp_path / "out") == first
    assert all(p.stat().st_mtime_ns == t for p, t in others.items())
    one_line_error(lambda: prepare(spec, str(tmp_path / "strict"), shard_size=4, strict=True), "--strict", "parquet:")


def test_parquet_raw_bytes_custom_columns_single_file_and_fsspec(tmp_path):
    rows = [(jpeg(i, fmt="PNG"), i % 2) for i in range(6)]
    hf_parquet(tmp_path / "plain.parquet", rows, hf_meta=False, image="img", label="y", struct=False)
    src = open_source(f"parquet:{tmp_path / 'plain.parquet'}?image=img&label=y")
    assert src.sizes == {"train": 6} and src.classes == ["0", "1"]
    assert [src.record("train", i).label for i in range(6)] == [0, 1, 0, 1, 0, 1]
    assert (src.record("train", 3).image == np.asarray(Image.open(io.BytesIO(rows[3][0])).convert("RGB"))).all()
    unlabelled = open_source(f"parquet:{tmp_path / 'plain.parquet'}?image=img&label=")
    assert unlabelled.record("train", 2).label == -1
    import fsspec

    with fsspec.open("memory://pq/train.parquet", "wb") as f:
        f.write((tmp_path / "plain.parquet").read_bytes())
    manifest = prepare("parquet:memory://pq?image=img&label=y", "memory://pq-out", shard_size=4)
    assert manifest["splits"]["train"]["num_samples"] == 6


def test_parquet_bad_inputs_are_one_line_errors(tmp_path):
    rows = [(jpeg(i), 0) for i in range(3)]
    hf_parquet(tmp_path / "ok.parquet", rows)
    spec = f"parquet:{tmp_path / 'ok.parquet'}"
    one_line_error(
        lambda: open_source(spec + "?image=picture"), "no column 'picture'", "columns: image, label", "?image=COLUMN"
    )
    one_line_error(lambda: open_source(spec + "?label=target"), "no column 'target'", "?label=COLUMN")
    one_line_error(lambda: open_source(spec + "?colour=red"), "option 'colour=red'", "image=")
    pq.write_table(pa.table({"image": [b"x"], "label": ["cat"]}), str(tmp_path / "strlabel.parquet"))
    one_line_error(
        lambda: open_source(f"parquet:{tmp_path / 'strlabel.parquet'}"), "column 'label'", "string", "expected integer"
    )
    pq.write_table(pa.table({"image": [3], "label": [1]}), str(tmp_path / "intimage.parquet"))
    one_line_error(
        lambda: open_source(f"parquet:{tmp_path / 'intimage.parquet'}"),
        "column 'image'",
        "int64",
        "expected image bytes",
    )
    (tmp_path / "junk.parquet").write_bytes(b"this is not parquet" * 10)
    one_line_error(
        lambda: open_source(f"parquet:{tmp_path / 'junk.parquet'}"), "cannot read parquet file", "junk.parquet"
    )
    one_line_error(lambda: open_source(f"parquet:{tmp_path / 'missing.parquet'}"), "does not exist")
    (tmp_path / "empty").mkdir()
    one_line_error(lambda: open_source(f"parquet:{tmp_path / 'empty'}"), "has no .parquet files")


def write_shards(folder, shards: list[list[dict]], compress=False) -> list[str]:
    """Shards written by webdataset's own TarWriter (its default encoders: int cls -> ASCII)."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for k, samples in enumerate(shards):
        path = os.path.join(folder, f"data-{k:06d}.tar" + (".gz" if compress else ""))
        with TarWriter(path, compress=compress) as w:
            for s in samples:
                w.write(s)
        paths.append(path)
    return paths


def wds_samples(n: int, start: int = 0) -> list[dict]:
    return [
        {
            "__key__": f"sample{start + i:05d}",
            "jpg": jpeg(start + i),
            "cls": (start + i) % 4,
            "txt": f"caption {start + i}",
        }
        for i in range(n)
    ]


def test_wds_reshards_with_manifest_skips_and_is_byte_identical(tmp_path):
    first, second = wds_samples(6), wds_samples(5, start=6)
    second[1]["jpg"] = b"\xff\xd8 broken"
    del second[2]["cls"]
    second[3]["cls"] = "seven"
    write_shards(tmp_path / "in", [first, second])
    spec = f"wds:{tmp_path / 'in'}/data-{{000000..000001}}.tar"
    src = open_source(spec)
    assert src.sizes == {"train": 11} and src.classes == ["0", "1", "2", "3"]
    assert src.record("train", 3).data == first[3]["jpg"] and src.record("train", 3).label == 3
    manifest = prepare(spec, str(tmp_path / "out"), shard_size=4)
    assert manifest["splits"]["train"]["num_samples"] == 8
    errors = {s["file"]: s["error"] for s in manifest["skipped"]}
    assert set(errors) == {"data-000001.tar:sample00007", "data-000001.tar:sample00008", "data-000001.tar:sample00009"}
    assert "no .cls" in errors["data-000001.tar:sample00008"]
    assert "not an integer" in errors["data-000001.tar:sample00009"]
    digests = shard_digests(tmp_path / "out")
    prepare(spec, str(tmp_path / "out2"), shard_size=4)
    assert shard_digests(tmp_path / "out2") == digests
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.tar")}
    prepare(spec, str(tmp_path / "out"), shard_size=4)  # a rerun writes nothing
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.tar")} == stamps
    one_line_error(lambda: prepare(spec, str(tmp_path / "strict"), strict=True), "--strict", "sample0000")
    prepare(spec, str(tmp_path / "jpg"), shard_size=20, image_format="jpg")  # the original JPEG bytes are kept
    with tarfile.open(tmp_path / "jpg" / "train-000000.tar") as tar:
        jpgs = {tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")}
    assert jpgs == {s["jpg"] for s in first + second} - {second[1]["jpg"], second[3]["jpg"]} - {second[2]["jpg"]}


def test_wds_folder_gz_splits_json_labels_and_other_extensions(tmp_path):
    train = [{"__key__": f"a{i}", "png": jpeg(i, fmt="PNG"), "json": {"label": i % 2}} for i in range(4)]
    write_shards(tmp_path / "in" / "train", [train], compress=True)
    val = [{"__key__": f"v{i}", "png": jpeg(50 + i, fmt="PNG"), "json": {"label": 1}} for i in range(3)]
    write_shards(tmp_path / "in" / "val", [val])
    src = open_source(f"wds:{tmp_path / 'in'}?image=png&label=json")
    assert src.sizes == {"train": 4, "val": 3} and src.classes == ["0", "1"]
    assert [src.record("train", i).label for i in range(4)] == [0, 1, 0, 1]
    nolabel = open_source(f"wds:{tmp_path / 'in'}?image=png&label=")
    assert nolabel.record("val", 0).label == -1


def test_wds_bad_inputs_are_one_line_errors(tmp_path):
    paths = write_shards(tmp_path / "in", [wds_samples(3), wds_samples(3, start=3)])
    one_line_error(
        lambda: open_source(f"wds:{tmp_path / 'in'}/data-{{000000..000002}}.tar"), "does not exist", "data-000002.tar"
    )
    data = open(paths[1], "rb").read()
    with open(paths[1], "wb") as f:
        f.write(data[: len(data) // 2 + 100])
    one_line_error(lambda: open_source(f"wds:{paths[1]}"), "cannot read WebDataset shard", "truncated or corrupt")
    one_line_error(lambda: open_source(f"wds:{tmp_path / 'nothing'}"), "does not exist")
    msg = one_line_error(lambda: prepare(f"wds:{paths[0]}?image=webp", str(tmp_path / "o")), "no readable images")
    assert "3 skipped" in msg


def test_parquet_with_worker_processes_matches_one_process(tmp_path):
    hf_export(tmp_path / "ds")
    spec = f"parquet:{tmp_path / 'ds'}"
    prepare(spec, str(tmp_path / "one"), shard_size=3)
    prepare(spec, str(tmp_path / "two"), shard_size=3, workers=2)  # forked workers read the spool themselves
    assert shard_digests(tmp_path / "two") == shard_digests(tmp_path / "one")
