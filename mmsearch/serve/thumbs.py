"""Thumbnails, cached beside the index (never in the photo folders).

A thumbnail is the photo EXIF-rotated, converted to RGB and shrunk to at most
:data:`SIZE` pixels on its long side, as WebP. Files are keyed by the photo's
content hash and the size (``thumbs/ab/abcdef...-320.webp``), so a moved photo
keeps its thumbnail and a changed one gets a new one; each is written to a
temporary file and renamed into place.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from mmsearch.ingest.decode import decode_bytes, load_image
from mmsearch.ingest.remote import read_url
from mmsearch.locations import is_url

SIZE = 320
QUALITY = 80


def thumbnail(cache: Path, source: Path | str, content_hash: str, size: int = SIZE) -> Path:
    """The cached thumbnail of ``source``, a file or a URL (made now if missing). Raises
    DecodeError, OSError."""
    target = cache / content_hash[:2] / f"{content_hash}-{size}.webp"
    if target.is_file():
        return target
    if isinstance(source, str) and is_url(source):
        image = decode_bytes(read_url(source), draft_size=size)
    else:
        image = load_image(source, draft_size=size)
    image.thumbnail((size, size))
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, "WEBP", quality=QUALITY, method=4)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
