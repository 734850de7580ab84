"""Finding image files under a directory.

`walk` yields one `FoundFile` per image file and one `SkippedFile` per entry
it had to pass over for a reason worth telling the user (unreadable directory,
broken symlink, symlink loop, file vanished during the walk...).

Behaviour, in short:

* Order is deterministic: entries of each directory are visited sorted by
  name (code-point order), depth first, so re-walking an unchanged tree yields
  the same sequence.
* Paths: the root is made absolute and canonical
  (:func:`mmsearch.locations.canonical_root`), so the
  same library reached through a relative path or a symlink gives the same
  keys.  Below the root, paths are *as traversed*: a symlink inside the tree
  appears under its own name, not under its target's.
* Hidden entries (names starting with ``.``: ``.git``, ``.thumbnails``,
  macOS ``._IMG_0001.JPG`` resource forks...) are skipped silently unless
  ``include_hidden=True``.  An explicitly given hidden root is still walked.
* Every directory is entered at most once, tracked by ``(st_dev, st_ino)``,
  so symlink loops terminate and a directory linked twice is not listed twice.
  Files are not de-duplicated (hard links and file symlinks appear under each
  name; `mmsearch.decode.content_hash` is the tool for duplicates).
* Only regular files (after following symlinks) are yielded; FIFOs, sockets and
  devices with an image extension are reported, never opened.
* File names that are not valid UTF-8 are reported and skipped, since they
  cannot be stored as text in the catalog.
* A root that is missing or unreadable yields a single `SkippedFile`; nothing
  is raised.
"""

from __future__ import annotations

import importlib.util
import os
import stat
from collections.abc import Collection, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path

from mmsearch.locations import canonical_root

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
)
"""Extensions (lower case, with the dot) always recognised as images."""

HEIF_EXTENSIONS: frozenset[str] = frozenset({".heic", ".heif"})
"""Extensions recognised only when ``pillow_heif`` is importable."""

VIDEO_EXTENSIONS: frozenset[str] = frozenset(
    {".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi", ".3gp"}
)
"""Extensions of the video files an index run finds (decoded with PyAV: the video extra)."""


def is_video(path: Path | str) -> bool:
    """Whether ``path`` names a video file, by its extension (any case)."""
    return has_image_extension(Path(path).name, VIDEO_EXTENSIONS)


@dataclass(frozen=True)
class FoundFile:
    """An image file found by `walk`; size and mtime are the target's."""

    path: Path
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class SkippedFile:
    """An entry `walk` passed over, with a short human reason."""

    path: Path
    reason: str


WalkItem = FoundFile | SkippedFile


def heif_available() -> bool:
    """Whether ``pillow_heif`` can be imported (checked without importing it)."""
    try:
        return importlib.util.find_spec("pillow_heif") is not None
    except (ImportError, ValueError):
        return False


def supported_extensions() -> frozenset[str]:
    """The image extensions usable now: the base set, plus HEIF when available."""
    if heif_available():
        return IMAGE_EXTENSIONS | HEIF_EXTENSIONS
    return IMAGE_EXTENSIONS


def has_image_extension(name: str, extensions: Collection[str]) -> bool:
    """Whether ``name`` ends with one of ``extensions`` (case-insensitive)."""
    dot = name.rfind(".")
    return dot > 0 and name[dot:].lower() in extensions


def walk(
    root: Path | str,
    *,
    follow_symlinks: bool = True,
    include_hidden: bool = False,
    extensions: Collection[str] | None = None,
) -> Iterator[WalkItem]:
    """Yield every image file under ``root`` and every entry skipped on the way.

    ``root`` may be a directory (walked recursively) or a single file (yielded
    when it has an image extension).  ``extensions`` defaults to
    `supported_extensions()`, evaluated once per call; give extensions with
    their dot (case is ignored).  See the module docstring for the rules.
    """
    chosen = supported_extensions() if extensions is None else extensions
    exts = frozenset(e.lower() for e in chosen)
    walker = _Walker(exts, follow_symlinks, include_hidden)
    return walker.run(root)


def _os_reason(exc: OSError, prefix: str = "unreadable") -> str:
    """A short reason for an OSError met while walking."""
    if isinstance(exc, FileNotFoundError):
        return "vanished during the walk"
    if isinstance(exc, PermissionError):
        return f"{prefix}: permission denied"
    return f"{prefix}: {exc.strerror or exc}"


def _valid_utf8(name: str) -> bool:
    """Whether a name from the file system encodes to UTF-8 (no surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class _Walker:
    """The state of one walk: options and the directories already entered."""

    def __init__(self, exts: frozenset[str], follow: bool, hidden: bool) -> None:
        self.exts = exts
        self.follow = follow
        self.hidden = hidden
        self.visited: set[tuple[int, int]] = set()

    def run(self, root: Path | str) -> Iterator[WalkItem]:
        """Walk from ``root``; an explicit stack, so depth never hits the recursion limit."""
        top = canonical_root(root)
        try:
            st = os.stat(top)
        except OSError as exc:
            reason = "does not exist" if isinstance(exc, FileNotFoundError) else ""
            yield SkippedFile(top, reason or _os_reason(exc))
            return
        if not stat.S_ISDIR(st.st_mode):
            if not has_image_extension(top.name, self.exts):
                yield SkippedFile(top, "not an image file extension")
                return
            yield from self._file(top, top.name, st)
            return
        self.visited.add((st.st_dev, st.st_ino))
        stack: list[tuple[Path, Iterator[os.DirEntry[str]]]] = []
        yield from self._push(stack, top)
        while stack:
            parent, entries = stack[-1]
            entry = next(entries, None)
            if entry is None:
                stack.pop()
                continue
            yield from self._entry(stack, parent / entry.name, entry)

    def _push(
        self, stack: list[tuple[Path, Iterator[os.DirEntry[str]]]], path: Path
    ) -> Iterator[WalkItem]:
        """List ``path`` (sorted) onto the stack, or report why it cannot be."""
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except NotADirectoryError:
            yield SkippedFile(path, "vanished during the walk")
        except OSError as exc:
            yield SkippedFile(path, _os_reason(exc, "unreadable directory"))
        else:
            stack.append((path, iter(entries)))

    def _entry(
        self,
        stack: list[tuple[Path, Iterator[os.DirEntry[str]]]],
        path: Path,
        entry: os.DirEntry[str],
    ) -> Iterator[WalkItem]:
        """Handle one directory entry: recurse, yield, report or ignore."""
        name = entry.name
        if name.startswith(".") and not self.hidden:
            return
        is_image = has_image_extension(name, self.exts)
        try:
            if entry.is_symlink():
                st = yield from self._follow_link(path, entry, is_image)
                if st is None:
                    return
            elif is_image or entry.is_dir(follow_symlinks=False):
                st = entry.stat(follow_symlinks=False)
            else:
                return
        except OSError as exc:
            yield SkippedFile(path, _os_reason(exc))
            return
        if not _valid_utf8(name):
            if stat.S_ISDIR(st.st_mode) or is_image:
                yield SkippedFile(path, "name is not valid UTF-8")
            return
        if stat.S_ISDIR(st.st_mode):
            yield from self._dir(stack, path, st, entry.is_symlink())
        elif is_image:
            yield from self._file(path, name, st)

    def _follow_link(
        self, path: Path, entry: os.DirEntry[str], is_image: bool
    ) -> Generator[WalkItem, None, os.stat_result | None]:
        """Stat a symlink's target; return None (after reporting) to skip it."""
        if not self.follow:
            if is_image or entry.is_dir():
                yield SkippedFile(path, "symlink not followed")
            return None
        try:
            return entry.stat()
        except FileNotFoundError:
            yield SkippedFile(path, "broken symlink")
        except OSError as exc:
            yield SkippedFile(path, _os_reason(exc, "unreadable symlink"))
        return None

    def _dir(
        self,
        stack: list[tuple[Path, Iterator[os.DirEntry[str]]]],
        path: Path,
        st: os.stat_result,
        via_link: bool,
    ) -> Iterator[WalkItem]:
        """Enter a directory unless it was already entered (loop or alias)."""
        key = (st.st_dev, st.st_ino)
        if key in self.visited:
            if via_link:
                yield SkippedFile(path, "directory already visited (symlink loop)")
            return
        self.visited.add(key)
        yield from self._push(stack, path)

    def _file(self, path: Path, name: str, st: os.stat_result) -> Iterator[WalkItem]:
        """Yield a file if it is a regular image file, report it otherwise."""
        if not has_image_extension(name, self.exts):
            return
        if not stat.S_ISREG(st.st_mode):
            yield SkippedFile(path, "not a regular file")
            return
        yield FoundFile(path, st.st_size, st.st_mtime_ns)
