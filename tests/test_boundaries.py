"""One home per heavy dependency (DESIGN.md): a test keeps the house rules true."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "data_prep", "cluster")

# module prefix -> where it may be imported (paths relative to the repo root, prefixes allowed)
HOMES = {
    "torch.distributed": ("pipeline/dist.py",),
    "ray": ("cluster/",),
    "mlflow": ("pipeline/tracking.py",),
    "webdataset": ("pipeline/data.py", "data_prep/wds.py"),
    "webdataset.writer": ("data_prep/wds.py",),
    "ffcv": ("pipeline/data.py", "data_prep/ffcv.py"),
}


def imports_of(path: pathlib.Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_heavy_dependencies_have_one_home():
    offenders = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            for name in imports_of(path):
                for module, homes in HOMES.items():
                    if (name == module or name.startswith(module + ".")) and not rel.startswith(homes):
                        offenders.append(f"{rel} imports {name}")
    assert offenders == [], offenders


def test_ray_is_started_in_one_place():
    """ray.init only in cluster/connect.py, which keeps the CLI's SIGTERM handling (hardneg stop -> KILLED)."""
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            rel = path.relative_to(ROOT).as_posix()
            if rel != "cluster/connect.py":
                assert "ray.init(" not in path.read_text(), rel


def test_writers_stay_offline():
    """The WebDataset writer classes appear only in data_prep/wds.py."""
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            rel = path.relative_to(ROOT).as_posix()
            if rel != "data_prep/wds.py":
                text = path.read_text()
                assert "TarWriter" not in text and "ShardWriter" not in text, rel


def test_pipeline_imports_only_schema_and_readers_from_data_prep():
    allowed = {
        "data_prep",
        "data_prep.schema",
        "data_prep.manifest",
        "data_prep.manifest.read_manifest",
        "data_prep.manifest.shard_urls",
        "data_prep.manifest.verify",
        "data_prep.schema.MANIFEST_NAME",
    }
    for path in (ROOT / "pipeline").rglob("*.py"):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("pipeline/app/"):
            continue  # the application (CLI, demo, bench) orchestrates both sides
        for name in imports_of(path):
            if name.startswith("data_prep"):
                assert name in allowed or name.startswith("data_prep.schema"), f"{rel} imports {name}"
