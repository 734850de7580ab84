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


def _top_level_imports(tree: ast.Module) -> list[ast.stmt]:
    """Import statements run when the module is imported (not in functions or TYPE_CHECKING)."""
    out: list[ast.stmt] = []
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.append(node)
        elif isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
            out += [n for n in node.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        elif isinstance(node, ast.Try):
            out += [n for n in node.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports when it is imported."""
    known = modules()
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        edges: set[str] = set()
        for node in _top_level_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in known}
            elif node.module and node.module.split(".")[0] == "mmsearch" and node.level == 0:
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    edges.add(sub if sub in known else node.module)
        graph[name] = edges - {name}
    return graph


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
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = trail[trail.index(nxt):] + [nxt] if nxt in trail else [node, nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])


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
