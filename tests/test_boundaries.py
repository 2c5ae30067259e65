"""The house rules (DESIGN.md), kept true by tests.

One home per heavy dependency, and one direction: the application (pipeline/app) uses the training core
(the rest of pipeline/), cluster/ and data_prep/; cluster/ uses the core and data_prep/; the core uses
data_prep/'s schema, manifest and error type; data_prep/ uses nobody. No import cycle between modules.
Imports are read with ``ast`` from every node, so an import inside a function counts like one at the top.
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "data_prep", "cluster")

# module prefix -> where it may be imported (paths relative to the repo root, prefixes allowed)
HOMES = {
    "torch.distributed": ("pipeline/dist.py",),
    "ray": ("cluster/",),
    "mlflow": (
        "pipeline/tracking.py",
        "pipeline/tracking_spool.py",
        "pipeline/tracking_runs.py",
        "pipeline/tracking_grid.py",
    ),
    "webdataset": ("pipeline/data.py", "pipeline/epoch_order.py", "data_prep/wds.py"),
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
        "data_prep.errors",
        "data_prep.errors.HardnegError",
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
            continue  # the application orchestrates both sides (prep, then train); the core only reads
        for name in imports_of(path):
            if name.startswith("data_prep"):
                # data_prep.atomic: the one atomic-write helper every writer uses (not a shard writer)
                assert name in allowed or name.startswith(("data_prep.schema", "data_prep.atomic")), (
                    f"{rel} imports {name}"
                )


# --- the direction -----------------------------------------------------------------------------------------
APP = "pipeline.app"


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its file (top level or inside functions).

    Relative imports are resolved; ``from pkg import mod`` points at ``pkg.mod`` when that is a module,
    else at ``pkg`` (a name defined in the package); ``import a.b.c`` at the longest module prefix.
    """
    files = {_module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}

    def known(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets: set[str] = set()
        tree = ast.parse(path.read_text(), filename=str(path))
        type_only = _type_only(tree)
        for node in ast.walk(tree):
            if node in type_only:
                continue
            if isinstance(node, ast.Import):
                targets.update(filter(None, (known(alias.name) for alias in node.names)))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base_parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                for alias in node.names:
                    target = f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else known(base)
                    if target:
                        targets.add(target)
        graph[module] = targets - {module}
    return graph


def _type_only(tree: ast.Module) -> set[ast.AST]:
    """Imports under ``if TYPE_CHECKING:``: read by the type checker, never executed, so no edge at run time.

    pipeline/backbones.py annotates with pipeline.config.ModelConfig while the config reads its table.
    """
    found: set[ast.AST] = set()
    for node in ast.walk(tree):
        test = node.test if isinstance(node, ast.If) else None
        if (
            isinstance(test, ast.Name)
            and test.id == "TYPE_CHECKING"
            or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
        ):
            found.update(n for stmt in node.body for n in ast.walk(stmt) if isinstance(n, (ast.Import, ast.ImportFrom)))
    return found


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_import_graph_sees_function_level_and_relative_imports():
    """The graph below is only as good as its reader: a lazy import and a relative one both show up."""
    graph = import_graph()
    assert "cluster.train" in graph["pipeline.app.train_command"]  # imported inside train_run
    assert "pipeline.losses.functional" in graph["pipeline.losses.psm"]  # from .functional import ...
    assert "pipeline.config" in graph["pipeline.app.cli"]  # from pipeline import config, inside a function
    assert "pipeline.methods.settings" in graph["pipeline.methods"]  # from pipeline.methods.settings import (...)
    assert "pipeline.config" not in graph["pipeline.methods.psm"]  # only under TYPE_CHECKING: never runs


def test_data_prep_imports_nobody():
    """data_prep/ (the offline side) imports nothing from pipeline/ or cluster/."""
    offenders = [
        f"{module} imports {target}"
        for module, targets in import_graph().items()
        if _in(module, "data_prep")
        for target in sorted(targets)
        if not _in(target, "data_prep")
    ]
    assert offenders == [], offenders


def test_core_imports_neither_cluster_nor_the_app():
    """The training core (pipeline/ outside pipeline/app) imports neither cluster/ nor the application."""
    offenders = [
        f"{module} imports {target}"
        for module, targets in import_graph().items()
        if _in(module, "pipeline") and not _in(module, APP)
        for target in sorted(targets)
        if _in(target, "cluster") or _in(target, APP)
    ]
    assert offenders == [], offenders


def test_cluster_uses_the_core_not_the_app():
    """cluster/ may import the core (pipeline.train, ...) and data_prep/, never the application."""
    offenders = [
        f"{module} imports {target}"
        for module, targets in import_graph().items()
        if _in(module, "cluster")
        for target in sorted(targets)
        if _in(target, APP)
    ]
    assert offenders == [], offenders


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for root in sorted(graph):
        if root in state:
            continue
        path, stack = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            elif nxt not in state and nxt in graph:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_find_cycle_reports_the_path():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycles():
    """No two modules import each other, directly or around a loop, at any level of the file."""
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_redaction_is_shared_not_borrowed_from_the_tracker():
    """Checkpoints (train.py), the logged config (reporting.py) and the tracker redact through pipeline.redaction,
    which imports nothing of the project or beyond the standard library: none of them imports the others for it."""
    graph = import_graph()
    assert graph["pipeline.redaction"] == set()
    assert {name.split(".")[0] for name in imports_of(ROOT / "pipeline" / "redaction.py")} <= {
        "__future__",
        "re",
        "typing",
    }
    for user in ("pipeline.train", "pipeline.reporting", "pipeline.tracking", "pipeline.tracking_store"):
        assert "pipeline.redaction" in graph[user], user
    assert (
        "pipeline.tracking" not in graph["pipeline.reporting"]
        and "pipeline.tracking" not in graph["pipeline.checkpoint"]
    )


def test_messages_to_the_user_go_through_the_console():
    """Warnings, notes and errors reach stderr through pipeline/console.py only: one format (hardneg: warning: ...),
    one place that decides how they look. cluster/connect.py forwards Ray's own worker output as it came."""
    allowed = {"pipeline/console.py", "cluster/connect.py"}
    offenders = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel in allowed:
                continue
            for node in ast.walk(ast.parse(path.read_text(), filename=rel)):
                if isinstance(node, ast.Attribute) and node.attr == "stderr" and getattr(node.value, "id", "") == "sys":
                    offenders.append(f"{rel}:{node.lineno}")
    assert offenders == [], offenders
