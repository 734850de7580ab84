"""Where a Chinese-CLIP split's images come from: a folder, or a base64 tsv decoded once.

A folder holds files named ``<image_id>.<ext>`` (any image extension, not
recursive); :func:`images_in_folder` finds the ones a split's texts refer to.
Chinese-CLIP ships its images instead as ``{split}_imgs.tsv`` rows of
``image_id<TAB>base64 image bytes``; :func:`images_from_tsv` decodes them once
into a cache folder (written atomically; a file already there with the right
size is reused), so the engine can read them like any other photo.  Both map
image id to path and raise one-line :class:`DatasetError` messages.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import tempfile
from pathlib import Path

from mmsearch.errors import DatasetError
from mmsearch.eval.datasets.base import iter_lines, short_repr
from mmsearch.ingest.discover import IMAGE_EXTENSIONS

#: base64's URL-safe alphabet mapped onto the standard one (Chinese-CLIP
#: writes ``b64encode`` output and reads it back with ``urlsafe_b64decode``).
_URLSAFE_TO_STD = bytes.maketrans(b"-_", b"+/")


def images_in_folder(folder: Path, wanted: set[int]) -> dict[int, Path]:
    """Files of ``folder`` (not recursive) named ``<image_id>.<image ext>``, for ``wanted`` ids."""
    if not folder.is_dir():
        raise DatasetError(f"images directory not found: {folder}")
    by_stem = {str(i): i for i in wanted}
    found: dict[int, Path] = {}
    try:
        names = sorted(os.listdir(folder))
    except OSError as exc:
        raise DatasetError(f"{folder}: cannot list: {exc.strerror or exc}") from exc
    for file_name in names:
        stem, dot, ext = file_name.rpartition(".")
        if not dot or f".{ext.lower()}" not in IMAGE_EXTENSIONS or stem not in by_stem:
            continue
        image_id = by_stem[stem]
        if image_id in found:
            raise DatasetError(
                f"{folder}: two image files for image id {image_id}: "
                f"{found[image_id].name}, {file_name}"
            )
        found[image_id] = folder / file_name
    return found


def _decode_b64_image(cell: str, where: str) -> bytes:
    """The bytes of one base64 image cell (standard or URL-safe alphabet, padding optional)."""
    try:
        raw = cell.strip().encode("ascii").translate(_URLSAFE_TO_STD)
        data = base64.b64decode(raw + b"=" * (-len(raw) % 4), validate=True)
    except (UnicodeEncodeError, binascii.Error) as exc:
        raise DatasetError(f"{where}: image data is not valid base64") from exc
    if not data:
        raise DatasetError(f"{where}: image data is empty")
    return data


def _cache_image(target: Path, data: bytes) -> None:
    """Write ``data`` to ``target`` atomically, unless a file of that size is already there."""
    try:
        if target.stat().st_size == len(data):
            return
    except FileNotFoundError:
        pass
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _split_tsv_row(line: str, where: str) -> tuple[int, str]:
    """``(image_id, base64 cell)`` of one ``*_imgs.tsv`` row."""
    cells = line.split("\t")
    if len(cells) != 2:
        raise DatasetError(
            f"{where}: expected 2 tab-separated columns (image_id, base64), got {len(cells)}"
        )
    if not re.fullmatch(r"\s*-?[0-9]+\s*", cells[0]):
        raise DatasetError(f"{where}: image_id must be an integer, got {short_repr(cells[0])}")
    return int(cells[0]), cells[1]


def images_from_tsv(tsv: Path, cache: Path) -> dict[int, Path]:
    """Decode ``image_id<TAB>base64`` rows of ``tsv`` into ``cache/<image_id>.jpg`` files.

    Files already in the cache with the decoded size are reused, not rewritten.
    """
    if not tsv.is_file():
        raise DatasetError(f"image file not found: {tsv} (or pass an images folder)")
    try:
        cache.mkdir(exist_ok=True)
    except OSError as exc:
        raise DatasetError(
            f"cannot create image cache {cache}: {exc.strerror or exc} "
            f"(extract the images to a folder and pass it instead)"
        ) from exc
    paths: dict[int, Path] = {}
    for lineno, line in iter_lines(tsv):
        if not line.strip():
            continue
        where = f"{tsv}:{lineno}"
        image_id, cell = _split_tsv_row(line, where)
        if image_id in paths:
            raise DatasetError(f"{where}: image_id {image_id} appears twice")
        paths[image_id] = cache / f"{image_id}.jpg"
        try:
            _cache_image(paths[image_id], _decode_b64_image(cell, where))
        except OSError as exc:
            raise DatasetError(f"cannot write image cache {cache}: {exc.strerror or exc}") from exc
    if not paths:
        raise DatasetError(f"{tsv}: no images (the split is empty)")
    return paths
