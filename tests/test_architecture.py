"""The shape of the package: the data flow in its layout, one writer, no cycles, lazy heavy imports."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mmsearch"
HEAVY = ("torch", "open_clip", "faiss", "torchvision", "transformers")


def modules() -> dict[str, Path]:
    """Module name -> file, for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module, imported names, line) of every import in a file: at the top, inside
    functions and under TYPE_CHECKING alike (each is a dependency someone has to follow)."""
    out: list[tuple[str, list[str], int]] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            module = node.module
            if node.level:  # relative: resolve against the importing module's package
                base = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-node.level]
                module = ".".join((*base, node.module))
            out.append((module, [a.name for a in node.names], node.lineno))
    return out


def import_graph() -> dict[str, dict[str, list[str]]]:
    """Module -> {package module it imports -> where}, counting every import statement."""
    known = modules()
    graph: dict[str, dict[str, list[str]]] = {}
    for name, path in known.items():
        edges: dict[str, list[str]] = {}
        for module, names, line in _imports(path):
            if module.split(".")[0] != "mmsearch":
                continue
            targets = [f"{module}.{n}" if f"{module}.{n}" in known else module for n in names] or [module]
            for target in targets:
                if target in known and target != name and not name.startswith(target + "."):
                    edges.setdefault(target, []).append(f"{path.relative_to(PACKAGE.parent)}:{line}")
        graph[name] = edges
    return graph


# The data flow as layers, lowest first: a module may import its own package and the
# layers below it, never one above (nor a sibling on its own layer).
LAYERS = (
    ("errors",),
    ("progress", "settings", "locations"),
    ("models",),
    ("store",),
    ("ingest",),
    ("search",),
    ("export",),
    ("distributed",),
    ("engine",),
    ("eval",),
    ("train", "serve"),
    ("cli",),
    ("__main__", ""),
)


def _unit(module: str) -> str:
    """The layer unit of a module: its first-level package or module under mmsearch."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _layer(unit: str) -> int:
    for n, units in enumerate(LAYERS):
        if unit in units:
            return n
    raise AssertionError(f"mmsearch.{unit} has no layer in LAYERS: add it where it belongs")


def test_the_layout_reads_as_the_data_flow() -> None:
    names = set(modules())
    for package in ("cli", "ingest", "models", "store", "search", "eval"):
        assert f"mmsearch.{package}" in names, package
    for module in ("ingest.discover", "ingest.decode", "ingest.embed", "ingest.run",
                   "models.identity", "models.openclip", "models.texttower",
                   "store.catalog", "store.vectors", "store.store", "store.integrity",
                   "search.query", "search.search", "search.hits",
                   "eval.datasets", "eval.metrics", "eval.evaluate",
                   "cli.main", "cli.eval", "cli.common", "__main__", "engine", "settings", "errors"):
        assert f"mmsearch.{module}" in names, module


def test_no_import_cycle() -> None:
    graph = import_graph()
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == 1:
                cycle = trail[trail.index(nxt):] + [nxt] if nxt in trail else [node, nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])


def test_no_import_reaches_up_a_layer() -> None:
    offences = []
    for name, edges in import_graph().items():
        for target, where in edges.items():
            a, b = _unit(name), _unit(target)
            if a != b and _layer(b) >= _layer(a):
                offences.append(f"{where[0]}: {name} imports {target}")
    assert offences == []


def test_no_module_uses_another_modules_private_names() -> None:
    """``from x import _name`` and ``x._name`` on an imported module are refused across
    modules: what another module needs is public (and documented) in its home."""
    known = modules()
    offences = []
    for name, path in known.items():
        tree = ast.parse(path.read_text())
        aliases: dict[str, str] = {}
        for module, names, line in _imports(path):
            if module.split(".")[0] != "mmsearch" or module == name:
                continue
            offences += [f"{path.name}:{line}: {module}.{n}" for n in names
                         if n.startswith("_") and not n.startswith("__")]
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mmsearch"):
                aliases.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names
                                if f"{node.module}.{a.name}" in known})
            elif isinstance(node, ast.Import):
                aliases.update({a.asname: a.name for a in node.names if a.asname and a.name in known})
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id in aliases and node.attr.startswith("_") \
                    and not node.attr.startswith("__"):
                offences.append(f"{path.name}:{node.lineno}: {aliases[node.value.id]}.{node.attr}")
    assert offences == []


def test_only_the_store_writes_the_catalog_or_a_faiss_file() -> None:
    """Outside ``mmsearch/store/`` nothing reaches the catalog, SQLite, FAISS's writers or
    the store's private parts; readers use ``Store.read`` (queries only) and the store's verbs."""
    offences = []
    for name, path in modules().items():
        if name.startswith("mmsearch.store"):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            where = f"{path.relative_to(PACKAGE.parent)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Attribute) and node.attr in (
                    "catalog", "_catalog", "_files", "write_index", "commit_images",
                    "upsert_texts", "set_meta", "set_metas", "_index", "_loaded"):
                offences.append(f"{where}: .{node.attr}")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for mod in mods:
                    if mod.split(".")[0] in ("sqlite3", "sqlalchemy", "faiss") or mod in (
                            "mmsearch.store.catalog", "mmsearch.store.vectorfiles",
                            "mmsearch.store.integrity", "mmsearch.store.lock"):
                        offences.append(f"{where}: imports {mod}")
    assert offences == []


def test_the_readers_view_of_the_catalog_has_no_write() -> None:
    from mmsearch.store.catalog import Catalog, CatalogReader

    writes = {n for n, v in vars(Catalog).items() if callable(v) and not n.startswith("__")}
    assert writes and not writes & set(dir(CatalogReader))
    for verb in ("commit", "upsert", "delete", "set_", "touch", "drop", "forget"):
        assert not [n for n in dir(CatalogReader) if n.startswith(verb)], verb


def _imported_heavy(command: list[str], env: dict[str, str] | None = None) -> tuple[list[str], str]:
    """Heavy libraries a command imports (from ``-X importtime``'s report), and its stdout."""
    run = subprocess.run(command, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1", **(env or {})})
    assert run.returncode == 0, run.stderr[-2000:]
    loaded = {line.rsplit("|", 1)[-1].strip().split(".")[0]
              for line in run.stderr.splitlines() if line.startswith("import time:")}
    return sorted(loaded & set(HEAVY)), run.stdout


@pytest.mark.parametrize("command", [
    [sys.executable, "-c", "import mmsearch, mmsearch.engine, mmsearch.cli, mmsearch.store, "
                           "mmsearch.search, mmsearch.models, mmsearch.eval.evaluate"],
    [sys.executable, "-m", "mmsearch", "--help"],
    [str(Path(sys.executable).parent / "mmsearch"), "--help"],
    [str(Path(sys.executable).parent / "mmsearch"), "query", "--help"],
], ids=["import", "python -m mmsearch --help", "mmsearch --help", "mmsearch query --help"])
def test_help_and_import_load_no_heavy_library(command: list[str]) -> None:
    heavy, out = _imported_heavy(command)
    assert heavy == []
    if "--help" in command:
        assert "Usage" in out


def test_a_cold_text_query_imports_neither_torch_nor_open_clip(
        tmp_path: Path, home: Path, tiny_model: tuple[Path, Path]) -> None:
    """``mmsearch query`` embeds its text in numpy, from the model's text-tower file
    (written when the index was built): of the heavy libraries only FAISS is loaded."""
    from conftest import draw_shapes
    from mmsearch.engine import Engine

    config, ckpt = tiny_model
    draw_shapes(tmp_path / "photos", per_combo=1)
    with Engine.open("t", model=str(config), pretrained=str(ckpt)) as engine:
        engine.index([tmp_path / "photos"])
    cli = str(Path(sys.executable).parent / "mmsearch")
    query = [cli, "query", "a red circle", "--index", "t", "-k", "1"]
    for _ in range(2):  # the first query after indexing too
        heavy, out = _imported_heavy(query)
        assert heavy == ["faiss"]
        assert "red_circle" in out
