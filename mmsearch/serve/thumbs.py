"""Thumbnails, cached beside the index (never in the photo folders).

A thumbnail is the photo EXIF-rotated, converted to RGB and shrunk to at most
:data:`SIZE` pixels on its long side, as WebP. Files are keyed by the photo's
content hash and the size (``thumbs/ab/abcdef...-320.webp``), so a moved photo
keeps its thumbnail and a changed one gets a new one; each is written to a
temporary file and renamed into place. A moment of a video has the frame shown at
its time, keyed by the video's content hash, the time in milliseconds and the size
(``thumbs/cd/cdef...-t12000-320.webp``). A frame at any other time a client asks for is
made for that response alone: cached, those would grow without bound.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

from PIL import Image

from mmsearch.ingest.decode import decode_bytes, load_image
from mmsearch.ingest.remote import read_url
from mmsearch.locations import is_url

SIZE = 320
QUALITY = 80


def thumbnail(cache: Path, source: Path | str, content_hash: str, size: int = SIZE) -> Path:
    """The cached thumbnail of ``source``, a file or a URL (made now if missing). Raises
    DecodeError, OSError."""
    def make() -> Image.Image:
        if isinstance(source, str) and is_url(source):
            return decode_bytes(read_url(source), draft_size=size)
        return load_image(source, draft_size=size)

    return _cached(cache, f"{content_hash}-{size}", size, make)


def frame_thumbnail(cache: Path, video: Path, video_hash: str, seconds: float,
                    size: int = SIZE) -> Path:
    """The cached thumbnail of the frame of ``video`` shown at ``seconds`` (a moment's time,
    rounded to the millisecond; made now if missing). Raises DecodeError, OSError."""
    ms = max(0, round(seconds * 1000))
    return _cached(cache, f"{video_hash}-t{ms}-{size}", size, lambda: _frame(video, ms, size))


def frame_thumbnail_bytes(video: Path, seconds: float, size: int = SIZE) -> bytes:
    """The WebP thumbnail of the frame of ``video`` shown at ``seconds``, not cached.
    Raises DecodeError, OSError."""
    out = io.BytesIO()
    _write_webp(_frame(video, max(0, round(seconds * 1000)), size), size, out)
    return out.getvalue()


def _frame(video: Path, ms: int, size: int) -> Image.Image:
    from mmsearch.ingest.video import frame_at

    return frame_at(video, ms / 1000, max_side=size).image


def _cached(cache: Path, key: str, size: int, make: Callable[[], Image.Image]) -> Path:
    """``cache/<key[:2]>/<key>.webp``, written from ``make()`` when missing."""
    target = cache / key[:2] / f"{key}.webp"
    if target.is_file():
        return target
    image = make()
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            _write_webp(image, size, f)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _write_webp(image: Image.Image, size: int, out: BinaryIO) -> None:
    """``image`` shrunk to at most ``size`` pixels on its long side, as WebP into ``out``."""
    image.thumbnail((size, size))
    image.save(out, "WEBP", quality=QUALITY, method=4)
