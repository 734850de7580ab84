"""Files behind fsspec URLs (``s3://bucket/photos/``, ``gs://``, ``file://``...).

The driver of a Ray run lists them (:func:`list_url`: size and modification time from
the listing, no file opened); the cluster's tasks read each one whole
(:func:`read_url`) and hash, read and decode its bytes with the local code. Paths are
kept as full URLs (``s3://bucket/photos/a.jpg``). What a URL is, its canonical form and
its fsspec file system are :mod:`mmsearch.locations`' (fsspec is imported only when a URL
is used; a protocol whose package, ``s3fs``, ``gcsfs``..., is missing raises a `UsageError`
naming it).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mmsearch.errors import DecodeError, UsageError, first_line
from mmsearch.ingest.discover import has_image_extension, supported_extensions
from mmsearch.locations import as_url, filesystem

_MTIME_KEYS = ("mtime", "LastModified", "last_modified", "updated", "modified", "created")


@dataclass(frozen=True)
class RemoteFile:
    """An image file found under a URL: its full URL, size and mtime (ns)."""

    path: str
    size: int
    mtime_ns: int


def list_url(url: Path | str, stop: threading.Event | None = None
             ) -> tuple[str, bool, list[RemoteFile]]:
    """(canonical URL, whether it is a folder, its image files sorted by URL); dot-names
    below the root are skipped, as locally. A URL that names nothing is a `UsageError`."""
    text = as_url(url)
    fs, root = filesystem(text)
    try:
        folder = bool(fs.isdir(root))
        if not folder and not fs.exists(root):
            raise UsageError(f"no such file or directory: {text}")
        listing = fs.find(root, detail=True)
    except OSError as exc:
        raise UsageError(f"{text}: cannot list: {first_line(exc)}") from None
    exts = supported_extensions()
    found = []
    for name, info in sorted(listing.items()):
        if stop is not None and stop.is_set():
            break
        below = name[len(root):].strip("/").split("/") if folder else [name.rsplit("/", 1)[-1]]
        if info.get("type", "file") != "file" or any(p.startswith(".") for p in below[:-1]) \
                or below[-1].startswith(".") or not has_image_extension(below[-1], exts):
            continue
        found.append(RemoteFile(str(fs.unstrip_protocol(name)), int(info.get("size") or 0),
                                mtime_ns(info)))
    return str(fs.unstrip_protocol(root)), folder, found


def mtime_ns(info: dict[str, Any]) -> int:
    """A listing entry's modification time as integer ns (0 when it has none)."""
    value = next((info[k] for k in _MTIME_KEYS if info.get(k) is not None), None)
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        epoch = datetime(1970, 1, 1, tzinfo=timezone.utc)
        delta = value - epoch
        return (delta.days * 86_400 + delta.seconds) * 10**9 + delta.microseconds * 1000
    if isinstance(value, (int, float)):
        return int(round(value * 1e9))
    return 0


def read_url(url: str) -> bytes:
    """The whole file at ``url``, or `DecodeError` with a one-line reason."""
    fs, path = filesystem(url)
    try:
        with fs.open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise DecodeError("vanished before it was read") from None
    except PermissionError:
        raise DecodeError("unreadable: permission denied") from None
    except OSError as exc:
        raise DecodeError(f"unreadable: {first_line(exc)}") from None
    if not data:
        raise DecodeError("empty file")
    return bytes(data)
