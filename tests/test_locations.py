"""Where a file is: the under rule in Python and in SQL agree, at the edges and on random
path sets (the CLI at thousands of paths is in test_real_size.py)."""

from __future__ import annotations

import re
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Column, MetaData, Table, Text, create_engine, delete, insert, select

from mmsearch.locations import (Roots, as_url, canonical, is_url, path_range, root_form,
                                sql_under, under)

# characters that trip LIKE patterns, byte order or naive prefix tests: '%', '_', '\\',
# ' ' and '.' (below '/'), '0' (just above it), non-ASCII (multi-byte in UTF-8)
ALPHABET = "ab0/.-_%\\ é日😀~"
PREFIXES = ["/", "/a b/", "s3://b/", "s3://", "file:///", "gs://bucket", ""]
# a video's moments lie under it (clip.mp4#t=1.500); near misses must not
MOMENTS = ["", "", "", "#t=1.500", "#t=0.000", "#t=", "#t>", "#s=1", "#t=2/x"]

_metadata = MetaData()
_paths = Table("paths", _metadata, Column("path", Text, unique=True))
_db = create_engine("sqlite://")
_metadata.create_all(_db)


def reference(path: str, root: str) -> bool:
    """The rule as the module states it, spelled out on its own."""
    if not root:
        return False
    bare = root.rstrip("/")
    if not bare or re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]+:", bare):
        return path.startswith(root if bare else "/")
    return path == bare or path.startswith(bare + "/") or path.startswith(bare + "#t=")


def sql_rows(roots: list[str], chunk: int) -> list[str]:
    with _db.connect() as conn:
        return [r[0] for c in sql_under(_paths.c.path, roots, chunk)
                for r in conn.execute(select(_paths.c.path).where(c))]


@st.composite
def paths_and_roots(draw: st.DrawFn) -> tuple[list[str], list[str]]:
    paths = draw(st.lists(st.builds(lambda a, b, c: a + b + c, st.sampled_from(PREFIXES),
                                    st.text(ALPHABET, max_size=10), st.sampled_from(MOMENTS)),
                          min_size=1, max_size=30, unique=True))
    roots = []
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(st.sampled_from(["file", "folder", "free", "special"]))
        if kind == "special":
            roots.append(draw(st.sampled_from(PREFIXES + ["/", "//", "s3:///", "file://"])))
            continue
        base = draw(st.sampled_from(paths)) if kind != "free" else \
            draw(st.sampled_from(PREFIXES)) + draw(st.text(ALPHABET, max_size=6))
        if kind == "folder" and "/" in base:
            base = base[:draw(st.sampled_from([i for i, c in enumerate(base) if c == "/"]))]
        roots.append(base + "/" * draw(st.integers(0, 2)))
    return paths, roots


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(paths_and_roots(), st.sampled_from([1, 3, 200]))
def test_python_and_sql_forms_agree_with_the_rule(case, chunk) -> None:
    paths, roots = case
    with _db.begin() as conn:
        conn.execute(delete(_paths))
        conn.execute(insert(_paths), [{"path": p} for p in paths])
    want = {p for p in paths if any(reference(p, r) for r in roots)}
    held = Roots(roots)
    assert {p for p in paths if p in held} == want
    assert {p for p in paths if under(p, roots)} == want
    got = sql_rows(roots, chunk)
    assert sorted(got) == sorted(want)  # the chunks never return a row twice


def test_under_edges() -> None:
    assert under("/a/x.jpg", ["/a/"]) and under("/a", ["/a//"]) and not under("/a b/x", ["/a"])
    assert under("/a_b/x", ["/a_b"]) and not under("/axb/x", ["/a_b"])
    assert not under("/a%/x", ["/a"]) and under("/a%/x", ["/a%"]) and not under("/ab/x", ["/a%"])
    assert under("/a\\b/x", ["/a\\b"]) and not under("/a/b/x", ["/a\\b"])
    assert under("/x.jpg", ["/x.jpg"]) and not under("/x.jpg2", ["/x.jpg"])
    assert under("/anything", ["/"]) and under("/anything", ["///"]) and not under("/a", [""])
    assert under("s3://b/x/y.jpg", ["s3://b/x/"]) and not under("s3://bx/y.jpg", ["s3://b"])
    assert under("s3://b/y.jpg", ["s3://"]) and not under("gs://b/y.jpg", ["s3://"])
    assert under("file:///x/y.jpg", ["file:///"]) and under("file:///x/y.jpg", ["file:///x"])
    assert not under("file:///xy.jpg", ["file:///x"]) and not under("/x/y.jpg", ["file:///x"])
    assert [root_form(r) for r in ["/a/", "/", "//", "s3://", "s3://b//", "file:///"]] == \
        ["/a", "/", "/", "s3://", "s3://b", "file:///"]
    assert path_range("/a").high == "/a0" and path_range("/").equal is None
    assert Roots(["/a/b", "/a", "/a b", "/a/", "/"]).outermost() == ["/"]
    assert Roots(["/a/b", "/a", "/a b", "/a/"]).outermost() == ["/a", "/a b"]


def test_urls_and_canonical_forms(tmp_path: Path) -> None:
    assert is_url("s3://b/k") and is_url(Path("s3://b/k")) and not is_url("/s3://b")
    assert as_url(Path("s3://b/k")) == "s3://b/k" and as_url(Path("file:///tmp/x")) == "file:///tmp/x"
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert canonical(tmp_path / "link" / "") == str((tmp_path / "real").resolve())
    assert canonical(tmp_path / "link" / "x.jpg") == str((tmp_path / "real").resolve() / "x.jpg")
    assert canonical((tmp_path / "real").as_uri() + "/") == (tmp_path / "real").resolve().as_uri()
