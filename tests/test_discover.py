"""Tests for mmsearch.discover: walking photo trees, hostile ones included."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from mmsearch.ingest import discover
from mmsearch.ingest.discover import (
    HEIF_EXTENSIONS,
    IMAGE_EXTENSIONS,
    FoundFile,
    SkippedFile,
    has_image_extension,
    supported_extensions,
    walk,
)


def touch(path: Path, data: bytes = b"x") -> Path:
    """Create ``path`` (and its parents) holding ``data``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def found(root: Path, **kwargs: object) -> list[Path]:
    """Paths of the files `walk` finds, in walk order."""
    return [i.path for i in walk(root, **kwargs) if isinstance(i, FoundFile)]  # type: ignore[arg-type]


def skipped(root: Path, **kwargs: object) -> list[SkippedFile]:
    """Entries `walk` reports as skipped, in walk order."""
    return [i for i in walk(root, **kwargs) if isinstance(i, SkippedFile)]  # type: ignore[arg-type]


def test_extensions_case_insensitive_and_heif_optional(monkeypatch: pytest.MonkeyPatch) -> None:
    exts = supported_extensions()
    assert exts >= IMAGE_EXTENSIONS
    names = ["a.jpg", "a.JPG", "b.JpEg", "c.png", "d.WEBP", "e.gif", "f.bmp", "g.TIF", "h.tiff"]
    for name in names:
        assert has_image_extension(name, exts), name
    for name in ["a.txt", "a.jpg.xmp", "jpg", ".jpg", "a.jpgx", "a.raw", "a"]:
        assert not has_image_extension(name, exts), name
    monkeypatch.setattr(discover, "heif_available", lambda: False)
    assert supported_extensions() == IMAGE_EXTENSIONS
    monkeypatch.setattr(discover, "heif_available", lambda: True)
    assert supported_extensions() == IMAGE_EXTENSIONS | HEIF_EXTENSIONS
    assert has_image_extension("IMG_0001.HEIC", supported_extensions())


def test_walk_finds_images_sorted_recursive_with_stat(tmp_path: Path) -> None:
    touch(tmp_path / "b.jpg", b"12345")
    touch(tmp_path / "a.PNG")
    touch(tmp_path / "sub" / "z.JPEG")
    touch(tmp_path / "sub" / "deeper" / "c.webp")
    touch(tmp_path / "notes.txt")
    touch(tmp_path / "sub" / "IMG.CR2")
    touch(tmp_path / "sub" / "a.jpg.xmp")
    items = list(walk(tmp_path))
    assert all(isinstance(i, FoundFile) for i in items)
    assert [i.path for i in items] == [
        tmp_path / "a.PNG",
        tmp_path / "b.jpg",
        tmp_path / "sub" / "deeper" / "c.webp",
        tmp_path / "sub" / "z.JPEG",
    ]
    b = next(i for i in items if isinstance(i, FoundFile) and i.path.name == "b.jpg")
    st = os.stat(tmp_path / "b.jpg")
    assert (b.size, b.mtime_ns) == (5, st.st_mtime_ns)
    assert list(walk(tmp_path)) == items  # deterministic


def test_paths_are_absolute_and_root_canonical(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = tmp_path / "real"
    touch(real / "x.jpg")
    (tmp_path / "alias").symlink_to(real)
    monkeypatch.chdir(tmp_path)
    assert found(Path("real")) == [real.resolve() / "x.jpg"]
    assert found(Path("alias")) == [real.resolve() / "x.jpg"]
    assert found(Path("real/../real/")) == [real.resolve() / "x.jpg"]
    assert found("real") == [real.resolve() / "x.jpg"]  # type: ignore[arg-type]


def test_hidden_entries_skipped_unless_asked(tmp_path: Path) -> None:
    touch(tmp_path / ".git" / "objects" / "a.jpg")
    touch(tmp_path / ".thumbnails" / "t.png")
    touch(tmp_path / "._IMG_0001.JPG")  # macOS resource fork, not an image
    touch(tmp_path / "visible" / "v.jpg")
    assert found(tmp_path) == [tmp_path / "visible" / "v.jpg"]
    assert skipped(tmp_path) == []
    assert len(found(tmp_path, include_hidden=True)) == 4
    # An explicitly named hidden root is walked.
    assert found(tmp_path / ".thumbnails") == [tmp_path / ".thumbnails" / "t.png"]


def test_single_file_root(tmp_path: Path) -> None:
    img = touch(tmp_path / "photo.JPG", b"abc")
    assert list(walk(img)) == [FoundFile(img, 3, os.stat(img).st_mtime_ns)]
    txt = touch(tmp_path / "notes.txt")
    assert list(walk(txt)) == [SkippedFile(txt, "not an image file extension")]


def test_single_file_root_through_symlink_keeps_link_name(tmp_path: Path) -> None:
    target = touch(tmp_path / "blob", b"abcd")
    link = tmp_path / "IMG_1.jpg"
    link.symlink_to(target)
    assert list(walk(link)) == [FoundFile(link, 4, os.stat(target).st_mtime_ns)]


def test_missing_root_is_reported_not_raised(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    assert list(walk(missing)) == [SkippedFile(missing, "does not exist")]


def test_symlink_loop_terminates_without_duplicates(tmp_path: Path) -> None:
    touch(tmp_path / "a" / "x.jpg")
    touch(tmp_path / "a" / "b" / "y.jpg")
    (tmp_path / "a" / "b" / "up").symlink_to("..")  # loop to parent
    (tmp_path / "a" / "self").symlink_to(".")  # loop to itself
    (tmp_path / "a" / "root").symlink_to(tmp_path)  # loop to the root
    items = list(walk(tmp_path))
    paths = [i.path for i in items if isinstance(i, FoundFile)]
    assert paths == [tmp_path / "a" / "b" / "y.jpg", tmp_path / "a" / "x.jpg"]
    reasons = {i.path.name: i.reason for i in items if isinstance(i, SkippedFile)}
    assert set(reasons) == {"up", "self", "root"}
    assert all("already visited" in r for r in reasons.values())


def test_self_referencing_symlink_is_reported(tmp_path: Path) -> None:
    (tmp_path / "me.jpg").symlink_to("me.jpg")  # ELOOP when followed
    [item] = list(walk(tmp_path))
    assert isinstance(item, SkippedFile) and item.path == tmp_path / "me.jpg"
    assert item.reason.startswith("unreadable symlink")


def test_symlinked_dir_outside_tree_followed_by_default(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    touch(outside / "o.jpg")
    lib = tmp_path / "lib"
    touch(lib / "l.jpg")
    (lib / "more").symlink_to(outside)
    (lib / "pic.jpg").symlink_to(outside / "o.jpg")
    assert found(lib) == [lib / "l.jpg", lib / "more" / "o.jpg", lib / "pic.jpg"]
    assert found(lib, follow_symlinks=False) == [lib / "l.jpg"]
    assert skipped(lib, follow_symlinks=False) == [
        SkippedFile(lib / "more", "symlink not followed"),
        SkippedFile(lib / "pic.jpg", "symlink not followed"),
    ]


def test_broken_symlink_reported(tmp_path: Path) -> None:
    touch(tmp_path / "ok.jpg")
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "missing.jpg")
    (tmp_path / "gonedir").symlink_to(tmp_path / "missing_dir")
    assert found(tmp_path) == [tmp_path / "ok.jpg"]
    assert skipped(tmp_path) == [
        SkippedFile(tmp_path / "gone.jpg", "broken symlink"),
        SkippedFile(tmp_path / "gonedir", "broken symlink"),
    ]


def test_unicode_and_newline_names(tmp_path: Path) -> None:
    names = ["été.jpg", "写真.png", "emoji 📷.webp", "new\nline.jpg", "tab\tx.gif", " sp .bmp"]
    for name in names:
        touch(tmp_path / "dossier ü" / name)
    got = found(tmp_path)
    assert sorted(p.name for p in got) == sorted(names)
    assert all(p.exists() for p in got)


def test_non_utf8_name_reported(tmp_path: Path) -> None:
    raw = os.fsencode(tmp_path) + b"/bad\xff.jpg"
    try:
        fd = os.open(raw, os.O_CREAT | os.O_WRONLY, 0o644)
    except OSError as exc:
        pytest.skip(f"file system refuses non-UTF-8 names: {exc}")
    os.close(fd)
    touch(tmp_path / "good.jpg")
    items = list(walk(tmp_path))
    assert found(tmp_path) == [tmp_path / "good.jpg"]
    [skip] = [i for i in items if isinstance(i, SkippedFile)]
    assert skip.reason == "name is not valid UTF-8"


def test_fifo_with_image_name_is_not_yielded(tmp_path: Path) -> None:
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    os.mkfifo(tmp_path / "pipe.jpg")
    os.mkfifo(tmp_path / "pipe.txt")
    assert list(walk(tmp_path)) == [SkippedFile(tmp_path / "pipe.jpg", "not a regular file")]


def test_unreadable_directory_reported(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    touch(locked / "secret.jpg")
    touch(tmp_path / "open.jpg")
    locked.chmod(0)
    try:
        if os.access(locked, os.R_OK):
            pytest.skip("running as root (or with CAP_DAC_OVERRIDE): permissions are not enforced")
        assert found(tmp_path) == [tmp_path / "open.jpg"]
        assert skipped(tmp_path) == [SkippedFile(locked, "unreadable directory: permission denied")]
    finally:
        locked.chmod(0o755)


def test_file_vanishing_during_walk(tmp_path: Path) -> None:
    touch(tmp_path / "1.jpg")
    touch(tmp_path / "2.jpg")
    touch(tmp_path / "a" / "x.jpg")
    touch(tmp_path / "b" / "y.jpg")
    it = walk(tmp_path)
    first = next(it)
    assert isinstance(first, FoundFile) and first.path.name == "1.jpg"
    (tmp_path / "2.jpg").unlink()
    shutil.rmtree(tmp_path / "b")
    rest = list(it)
    assert rest == [
        SkippedFile(tmp_path / "2.jpg", "vanished during the walk"),
        FoundFile(tmp_path / "a" / "x.jpg", 1, rest[1].mtime_ns),  # type: ignore[union-attr]
        SkippedFile(tmp_path / "b", "vanished during the walk"),
    ]


def test_very_deep_tree_does_not_recurse(tmp_path: Path) -> None:
    """A tree deeper than the recursion limit walks fine (explicit stack).

    The limit is lowered for the call instead of building a >1000-level tree,
    which shutil.rmtree (and so pytest's tmp cleanup) could not delete.
    """
    import sys
    import traceback

    depth = 300
    deep = tmp_path.joinpath(*["d"] * depth)
    os.makedirs(deep)
    touch(deep / "bottom.jpg")
    old_limit = sys.getrecursionlimit()
    sys.setrecursionlimit(len(traceback.extract_stack()) + 100)
    try:
        result = found(tmp_path)
    finally:
        sys.setrecursionlimit(old_limit)
    assert result == [deep / "bottom.jpg"]


def test_custom_extensions(tmp_path: Path) -> None:
    touch(tmp_path / "a.jpg")
    touch(tmp_path / "b.PNG")
    assert found(tmp_path, extensions={".PNG"}) == [tmp_path / "b.PNG"]


def test_walk_many_files_is_quick(tmp_path: Path) -> None:
    """A smoke test against accidental quadratic behaviour (generous bound)."""
    import time

    for d in range(10):
        folder = tmp_path / f"dir{d:02d}"
        folder.mkdir()
        for f in range(200):
            for ext in (".jpg", ".xmp"):
                os.close(os.open(folder / f"IMG_{f:04d}{ext}", os.O_CREAT | os.O_WRONLY, 0o644))
    start = time.perf_counter()
    paths = found(tmp_path)
    elapsed = time.perf_counter() - start
    assert len(paths) == 2000 and paths == sorted(paths)
    assert elapsed < 3.0, f"walking 4,000 entries took {elapsed:.2f}s"


def test_permission_error_mapping_even_as_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Simulate EACCES on one directory, since root bypasses chmod 000."""
    locked = tmp_path / "locked"
    touch(locked / "secret.jpg")
    touch(tmp_path / "open.jpg")
    real_scandir = os.scandir

    def scandir(path: Path) -> object:
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    assert list(walk(tmp_path)) == [
        SkippedFile(locked, "unreadable directory: permission denied"),
        FoundFile(tmp_path / "open.jpg", 1, os.stat(tmp_path / "open.jpg").st_mtime_ns),
    ]
