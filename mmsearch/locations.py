"""Where a file is: a local path or a URL, its canonical form, and whether it lies under a root.

Every layer asks these questions (the ingest scan, the catalog's queries, a distributed
plan, the server's file check, the ``--in`` filter); they are answered here only.

* :func:`is_url` tells a URL (``s3://b/k``; also ``s3:/b/k``, as ``pathlib`` folds it)
  from a local path; :func:`canonical` gives the form the catalog keeps (a local folder
  fully resolved, a file with its own name kept; a URL as fsspec spells it, without a
  trailing slash), and :func:`location` the form hits carry.
* *Under*: a path is under a root when it is the root or lies below it: equal, or the
  root followed by ``/``, or by ``#t=``: a moment of a video (:func:`moment`,
  ``clip.mp4#t=12.000``, a W3C media fragment) lies under the video. Roots are read without their trailing slashes (``/a/`` is
  ``/a``); a root that is nothing but slashes or a URL scheme keeps them (``/``,
  ``s3://``, ``file:///``) and holds every path starting with it; an empty root holds
  nothing. Paths are compared as they are written, character by character: no wildcard
  (``%``, ``_``, ``\\``), no case folding, nothing resolved. :class:`Roots` is the Python
  form (a set lookup per ancestor of the path, whatever the number of roots);
  :func:`path_ranges` the SQL form, one index range per root, in chunks of
  :data:`SQL_CHUNK` roots so that no statement grows with the number of roots
  (:func:`sql_under` builds them for a column).

Imports nothing from the package but its errors; fsspec only when a URL is canonicalised.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import lru_cache, reduce
from operator import or_
from pathlib import Path
from typing import Any, Iterable, Iterator

from mmsearch.errors import UsageError, first_line

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/")  # s3://..., or s3:/... once a Path had it
SQL_CHUNK = 200  # roots per SQL statement: ~3 terms each, far below SQLite's depth of 1000
FRAGMENT = "#t="  # a video's moment: clip.mp4#t=12.000 lies under clip.mp4


def is_url(path: Path | str) -> bool:
    """Whether ``path`` is a URL (``s3://b/k``, also as ``pathlib`` leaves it: ``s3:/b/k``)."""
    return bool(_URL.match(str(path)))


def location(path: str) -> Path | str:
    """A catalog path as hits carry it: a ``Path``, or the URL as it is (``Path`` would
    fold ``s3://b/k`` into ``s3:/b/k``)."""
    return path if is_url(path) else Path(path)


def as_url(path: Path | str) -> str:
    """The URL ``path`` stands for, with the ``//`` a ``Path`` drops put back."""
    text = str(path)
    scheme = _URL.match(text)
    if scheme and not text.startswith(f"{scheme.group(1)}://"):
        name, rest = scheme.group(1), text[len(scheme.group(1)) + 1:]  # rest: "/b/k"
        text = f"{name}://{rest}" if name in ("file", "local") else f"{name}:/{rest}"
    return text


def canonical(path: Path | str) -> str:
    """The form the catalog keeps of a root given by a user: :func:`canonical_url` of a
    URL, else :func:`canonical_root` of the path with ``~`` expanded."""
    if is_url(path):
        return canonical_url(path)
    return str(canonical_root(Path(path).expanduser()))


def given_root(path: Path | str) -> str:
    """:func:`canonical` of a folder, file or URL given to ``index``; a local path that does
    not exist is a `UsageError` (a URL is checked when it is listed)."""
    if not is_url(path) and not os.path.lexists(Path(path).expanduser()):
        raise UsageError(f"no such file or directory: {path}")
    return canonical(path)


def canonical_root(root: Path | str) -> Path:
    """Absolute root: a directory fully resolved, a file with its name kept."""
    absolute = os.path.abspath(os.fspath(root))
    if os.path.isdir(absolute):
        return Path(os.path.realpath(absolute))
    parent, name = os.path.split(absolute)
    return Path(os.path.realpath(parent)) / name


def canonical_url(url: Path | str) -> str:
    """``url`` as the catalog keeps it: protocol, then the path without a trailing slash."""
    fs, path = filesystem(as_url(url))
    return str(fs.unstrip_protocol(path))


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec file system, path inside it) of ``url``, or a one-line `UsageError`."""
    try:
        import fsspec
        from fsspec.registry import known_implementations
    except ImportError:
        raise UsageError("URLs need fsspec: pip install 'mmsearch[ray]'") from None
    protocol = url.split(":", 1)[0]
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError:
        known = known_implementations.get(protocol, {})
        package = str(known.get("class", protocol)).split(".")[0]
        raise UsageError(f"{url}: {protocol}:// URLs need the {package} package: "
                         f"pip install {package}") from None
    except ValueError as exc:
        raise UsageError(f"{url}: {first_line(exc)}") from None


def root_form(root: str) -> str:
    """``root`` as the under rule reads it: without its trailing slashes, except a root
    that is only slashes (``/``) or a URL scheme (``s3://``, ``file:///``): it keeps them."""
    stripped = root.rstrip("/")
    if not stripped:
        return "/"
    scheme = _URL.match(root)
    if scheme and len(stripped) == scheme.end() - 1:  # nothing after "scheme:"
        return root
    return stripped


def _heads(path: str) -> Iterator[str]:
    """Every root form that ``path`` is under: itself, its beginnings before and through
    each ``/`` (a root ending in ``/`` holds the paths starting with it), and before each
    ``#t=``."""
    yield path
    i = path.find("/")
    while i >= 0:
        yield path[:i]
        yield path[:i + 1]
        i = path.find("/", i + 1)
    i = path.find(FRAGMENT)
    while i >= 0:
        yield path[:i]
        i = path.find(FRAGMENT, i + 1)


def moment(video: str, seconds: float) -> str:
    """Where a moment of a video is: the video's path with a media fragment
    (``clip.mp4#t=12.000``); it lies under the video."""
    return f"{video}{FRAGMENT}{seconds:.3f}"


def video_of(path: str) -> str | None:
    """The video a :func:`moment` path is of (None for any other path)."""
    head, sep, tail = path.rpartition(FRAGMENT)
    if not sep or not head:
        return None
    try:
        float(tail)
    except ValueError:
        return None
    return head


class Roots:
    """A set of roots; ``path in roots`` says whether ``path`` is under one of them
    (the Python form of the rule: a set lookup per ancestor, whatever their number)."""

    def __init__(self, roots: Iterable[str]) -> None:
        self._forms = frozenset(root_form(str(r)) for r in roots if str(r))  # "": holds nothing

    def __contains__(self, path: object) -> bool:
        return isinstance(path, str) and not self._forms.isdisjoint(_heads(path))

    def __len__(self) -> int:
        return len(self._forms)

    def outermost(self) -> list[str]:
        """The roots (their forms, sorted) under no other one: they hold the same paths,
        and none twice."""
        return sorted(r for r in self._forms
                      if not any(h != r and h in self._forms for h in _heads(r)))


def under(path: str, roots: Roots | Iterable[str]) -> bool:
    """Whether ``path`` is one of ``roots`` or lies below one (see the module)."""
    return path in (roots if isinstance(roots, Roots) else Roots(roots))


@dataclass(frozen=True)
class PathRange:
    """The paths under one root, for an index: equal to ``equal`` (None: no such term),
    or in ``[low, high)`` (``'/'`` + 1 == ``'0'``: the range holds exactly the paths
    that start with ``low``, in SQLite's byte order as in Python's)."""

    equal: str | None
    low: str
    high: str
    moments: tuple[str, str] | None = None  # [low, high) of the paths starting root#t=


def path_range(root: str) -> PathRange:
    form = root_form(root)
    if form.endswith("/"):
        return PathRange(None, form, form[:-1] + "0")
    return PathRange(form, form + "/", form + "0", (form + FRAGMENT, form + FRAGMENT[:-1] + ">"))


def path_ranges(roots: Iterable[str], chunk: int = SQL_CHUNK) -> list[list[PathRange]]:
    """The SQL form of ``roots``: their outermost ones as ranges, ``chunk`` per statement.
    No path is in two ranges, so the chunks' results never overlap."""
    outer = Roots(roots).outermost()
    return [[path_range(r) for r in outer[i:i + chunk]] for i in range(0, len(outer), chunk)]


def sql_under(column: Any, roots: Iterable[str], chunk: int = SQL_CHUNK) -> list[Any]:
    """One condition on ``column`` (an SQLAlchemy text column) per chunk of ``roots``: the
    rows under them are the union of each condition's rows; no roots, no condition (and
    no row). Built with the column's own operators: an ``IN`` of the roots, then a range
    per root, so a statement's depth and parameters stay bounded by ``chunk``. Building
    costs ~0.1 ms a root, so the last few are kept (a run asks again for its roots)."""
    return list(_sql_under(column, tuple(roots), chunk))


@lru_cache(maxsize=4)
def _sql_under(column: Any, roots: tuple[str, ...], chunk: int) -> tuple[Any, ...]:
    out = []
    for ranges in path_ranges(roots, chunk):
        equal = [r.equal for r in ranges if r.equal is not None]
        terms = [(column >= r.low) & (column < r.high) for r in ranges]
        terms += [(column >= r.moments[0]) & (column < r.moments[1]) for r in ranges
                  if r.moments]
        out.append(reduce(or_, [column.in_(equal)] + terms if equal else terms))
    return tuple(out)
