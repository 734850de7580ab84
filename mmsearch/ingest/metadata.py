"""A photo's metadata from its headers, for search filters (date, camera, place).

`read_metadata` opens the file with Pillow, which reads only the container
headers and the embedded EXIF block; pixels are never decoded (no ``load()``).

What is read:

* the capture time: EXIF ``DateTimeOriginal``, else ``DateTimeDigitized``, else
  ``DateTime``, each with its own ``OffsetTime*`` tag when that says ``±HH:MM``;
  without a usable EXIF date, the file's modification time in the machine's
  zone (``taken_source`` says which);
* camera make and model, lens (``LensModel``, else ``LensMake``);
* GPS latitude and longitude in decimal degrees (south and west negative);
* width and height as displayed, the EXIF orientation, the file extension.

What is not: pixels, thumbnails, maker notes, XMP/IPTC (Pillow's own use of
XMP orientation aside), sub-second times, GPS altitude and time.

Damaged EXIF never raises: a value of the wrong type, a rational with a zero
denominator, a blank or impossible date, a missing hemisphere... becomes None
(a bad date falls back to the modification time).  Only a file that cannot be
opened as an image at all raises `DecodeError`, as `mmsearch.ingest.decode`
does.

Pillow quirks handled here:

* ``PngImageFile.getexif`` decodes the whole image when the EXIF chunk is not
  before the pixel data; for PNG the base ``Image.getexif`` is used instead, so
  only EXIF found in the header is read.
* pillow_heif resets the EXIF orientation of HEIF files to 1 and keeps the
  stored value in ``info["original_orientation"]``; its size is already the
  displayed size (the container's transforms are authoritative), so no swap.
* A rational with a zero denominator reads as NaN, not as an error.
"""

from __future__ import annotations

import io
import math
import numbers
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from PIL import ExifTags, Image, PngImagePlugin

from mmsearch.ingest.decode import allowed_formats, open_header, open_regular

__all__ = ["ImageMetadata", "metadata_columns", "read_metadata"]

Base = ExifTags.Base
GPS = ExifTags.GPS

_DATE_TAGS: tuple[tuple[int, int], ...] = (
    (Base.DateTimeOriginal, Base.OffsetTimeOriginal),
    (Base.DateTimeDigitized, Base.OffsetTimeDigitized),
    (Base.DateTime, Base.OffsetTime),
)
"""EXIF date tags in order of preference, each with its offset tag."""

_DATE_RE = re.compile(r"(\d{4})[:\-/](\d{1,2})[:\-/](\d{1,2})[ T](\d{1,2}):(\d{2})(?::(\d{2}))?")
_OFFSET_RE = re.compile(r"([+-])(\d{2}):?(\d{2})")
_HEIF_ORIENTATION = "original_orientation"
"""Where pillow_heif keeps the EXIF orientation it reset to 1."""

_SWAPPED_ORIENTATIONS = frozenset({5, 6, 7, 8})


@dataclass(frozen=True)
class ImageMetadata:
    """What `read_metadata` found in one file's headers."""

    taken: str | None
    """Local date-time of capture, ``YYYY-MM-DDTHH:MM:SS`` (no offset; sorts as text)."""
    taken_offset: str | None
    """``+02:00`` / ``-05:00`` when known, else None."""
    taken_source: str
    """``"exif"`` or ``"mtime"`` (file modification time, local zone)."""
    camera_make: str | None
    camera_model: str | None
    lens: str | None
    gps_lat: float | None
    """Decimal degrees, south negative."""
    gps_lon: float | None
    """Decimal degrees, west negative."""
    width: int | None
    """As displayed: EXIF orientations 5-8 swap width and height."""
    height: int | None
    orientation: int | None
    """EXIF orientation 1..8 as stored, None when absent or invalid."""
    ext: str
    """Lower-case extension without the dot (``jpg``, ``heic``), ``""`` if none."""


def metadata_columns() -> tuple[str, ...]:
    """The field names of `ImageMetadata`, in order (the store's column names)."""
    return tuple(f.name for f in fields(ImageMetadata))


def read_metadata(path: Path | str, *, mtime_ns: int | None = None) -> ImageMetadata:
    """Read ``path``'s metadata from its headers, without decoding pixels.

    ``mtime_ns``: the file's modification time if the caller already has it
    (else the open file is stat'ed); used when there is no EXIF date.
    Raises `DecodeError` (one-line reason) when the file cannot be opened as an image.
    """
    formats = allowed_formats()  # registers pillow_heif's opener when installed
    with open_regular(path) as fh:
        if mtime_ns is None:
            mtime_ns = os.fstat(fh.fileno()).st_mtime_ns
        img = open_header(fh, formats)
        try:
            return _from_image(img, _extension(path), mtime_ns)
        finally:
            img.close()


def metadata_from_bytes(data: bytes, name: str, mtime_ns: int) -> ImageMetadata:
    """:func:`read_metadata` of a file's bytes already in memory (``name`` gives the
    extension); `DecodeError` when they cannot be opened as an image."""
    img = open_header(io.BytesIO(data), allowed_formats())
    try:
        return _from_image(img, _extension(name), mtime_ns)
    finally:
        img.close()


def _from_image(img: Image.Image, ext: str, mtime_ns: int) -> ImageMetadata:
    """Assemble the metadata of an opened (not loaded) image."""
    ifd0, exif_ifd, gps_ifd = _exif_dicts(img)
    taken, offset, source = _capture_time(ifd0, exif_ifd, mtime_ns)
    orientation = _orientation(img, ifd0)
    width, height = _display_size(img, orientation)
    lat, lon = _gps_position(gps_ifd)
    return ImageMetadata(
        taken=taken,
        taken_offset=offset,
        taken_source=source,
        camera_make=_text(ifd0.get(Base.Make)),
        camera_model=_text(ifd0.get(Base.Model)),
        lens=_lens(exif_ifd, ifd0),
        gps_lat=lat,
        gps_lon=lon,
        width=width,
        height=height,
        orientation=orientation,
        ext=ext,
    )


def _extension(path: Path | str) -> str:
    """``IMG_1.JPG`` -> ``jpg``; ``""`` when the name has no extension."""
    return Path(path).suffix.lower().removeprefix(".")


def _exif_dicts(img: Image.Image) -> tuple[dict[int, Any], dict[int, Any], dict[int, Any]]:
    """IFD0, the Exif sub-IFD and the GPS sub-IFD as plain dicts; empty when unreadable."""
    try:
        if isinstance(img, PngImagePlugin.PngImageFile):
            exif = Image.Image.getexif(img)  # PNG's override would load() the pixels
        else:
            exif = img.getexif()
        ifd0 = dict(exif)
    except Exception:  # a malformed EXIF block: Pillow raises SyntaxError, struct.error...
        return {}, {}, {}
    return ifd0, _sub_ifd(exif, ExifTags.IFD.Exif), _sub_ifd(exif, ExifTags.IFD.GPSInfo)


def _sub_ifd(exif: Image.Exif, tag: int) -> dict[int, Any]:
    """One sub-IFD as a dict; empty when absent or unreadable."""
    try:
        ifd = exif.get_ifd(tag)
    except Exception:  # a garbage pointer or a truncated directory
        return {}
    return dict(ifd) if isinstance(ifd, Mapping) else {}


def _lookup(tag: int, *ifds: Mapping[int, Any]) -> Any:
    """The first value of ``tag`` found in ``ifds`` (some writers misplace tags)."""
    for ifd in ifds:
        value = ifd.get(tag)
        if value is not None:
            return value
    return None


def _capture_time(
    ifd0: Mapping[int, Any], exif_ifd: Mapping[int, Any], mtime_ns: int
) -> tuple[str | None, str | None, str]:
    """(taken, taken_offset, taken_source) from the first valid EXIF date, else the mtime."""
    for date_tag, offset_tag in _DATE_TAGS:
        taken = _exif_datetime(_lookup(date_tag, exif_ifd, ifd0))
        if taken is not None:
            return taken, _exif_offset(_lookup(offset_tag, exif_ifd, ifd0)), "exif"
    taken, offset = _mtime_time(mtime_ns)
    return taken, offset, "mtime"


def _exif_datetime(value: object) -> str | None:
    """``2023:07:14 18:30:05`` -> ``2023-07-14T18:30:05``; None when blank or impossible."""
    text = _text(value)
    match = _DATE_RE.match(text) if text else None
    if match is None:
        return None
    try:
        parts = [int(p) for p in match.groups(default="0")]
        when = datetime(*parts)  # type: ignore[misc]
    except (ValueError, OverflowError):  # 0000:00:00, month 13, hour 24...
        return None
    return when.isoformat(timespec="seconds")


def _exif_offset(value: object) -> str | None:
    """``+02:00`` (or ``+0200``) -> ``+02:00``; None unless a plausible UTC offset."""
    text = _text(value)
    match = _OFFSET_RE.fullmatch(text) if text else None
    if match is None:
        return None
    sign, hours, minutes = match[1], int(match[2]), int(match[3])
    if hours > 14 or minutes > 59:
        return None
    return _format_offset(timedelta(hours=hours, minutes=minutes) * (-1 if sign == "-" else 1))


def video_taken(created: str | None, mtime_ns: int) -> tuple[str | None, str | None, str]:
    """(taken, taken_offset, taken_source) of a video: the container's creation time (UTC,
    as phones write it) in local time, source ``container``; else the file's mtime."""
    if created:
        try:
            when = datetime.fromisoformat(created.replace("Z", "+00:00"))
            if when.tzinfo is None:
                when = when.replace(tzinfo=timezone.utc)
            local = when.astimezone()
            offset = local.utcoffset()
            return (local.replace(tzinfo=None).isoformat(timespec="seconds"),
                    _format_offset(offset) if offset is not None else None, "container")
        except (ValueError, OverflowError, OSError):
            pass
    return (*_mtime_time(mtime_ns), "mtime")


def _mtime_time(mtime_ns: int) -> tuple[str | None, str | None]:
    """The modification time as local (taken, offset); (None, None) when out of range."""
    try:
        local = datetime.fromtimestamp(int(mtime_ns) // 1_000_000_000).astimezone()
    except (ValueError, OverflowError, OSError, TypeError):
        return None, None
    offset = local.utcoffset()
    taken = local.replace(tzinfo=None).isoformat(timespec="seconds")
    return taken, _format_offset(offset) if offset is not None else None


def _format_offset(offset: timedelta) -> str:
    """A UTC offset as ``±HH:MM`` (seconds, as in old local mean times, dropped)."""
    seconds = int(offset.total_seconds())
    hours, minutes = divmod(abs(seconds) // 60, 60)
    return f"{'-' if seconds < 0 else '+'}{hours:02d}:{minutes:02d}"


def _text(value: object) -> str | None:
    """A clean one-line string from an EXIF text value; None when empty or not text."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            value = value.decode("latin-1")
    if not isinstance(value, str):
        return None
    value = value.replace("\x00", "")
    cleaned = " ".join("".join(c if c.isprintable() else " " for c in value).split())
    return cleaned or None


def _lens(exif_ifd: Mapping[int, Any], ifd0: Mapping[int, Any]) -> str | None:
    """``LensModel``, else ``LensMake``, else None."""
    model = _text(_lookup(Base.LensModel, exif_ifd, ifd0))
    return model or _text(_lookup(Base.LensMake, exif_ifd, ifd0))


def _orientation(img: Image.Image, ifd0: Mapping[int, Any]) -> int | None:
    """The stored EXIF orientation if it is an integer 1..8, else None."""
    value = ifd0.get(Base.Orientation)
    if _heif_upright(img):
        value = img.info.get(_HEIF_ORIENTATION) or value
    if isinstance(value, tuple) and len(value) == 1:
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if 1 <= value <= 8 else None


def _heif_upright(img: Image.Image) -> bool:
    """Whether pillow_heif opened ``img``: its size is upright, its EXIF orientation reset."""
    return img.format in ("HEIF", "AVIF") and _HEIF_ORIENTATION in img.info


def _display_size(img: Image.Image, orientation: int | None) -> tuple[int | None, int | None]:
    """Header size as displayed: orientations 5-8 swap it (unless pillow_heif already did)."""
    width, height = img.size
    if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
        return None, None
    if orientation in _SWAPPED_ORIENTATIONS and not _heif_upright(img):
        return height, width
    return width, height


def _gps_position(gps: Mapping[int, Any]) -> tuple[float | None, float | None]:
    """(lat, lon) in signed decimal degrees; both None unless both are valid.

    (0, 0) is what receivers without a fix write, so it counts as no position.
    """
    lat = _coordinate(gps.get(GPS.GPSLatitude), gps.get(GPS.GPSLatitudeRef), 90.0, "NS")
    lon = _coordinate(gps.get(GPS.GPSLongitude), gps.get(GPS.GPSLongitudeRef), 180.0, "EW")
    if lat is None or lon is None or (lat == 0.0 and lon == 0.0):
        return None, None
    return lat, lon


def _coordinate(value: object, ref: object, limit: float, hemispheres: str) -> float | None:
    """Degrees, minutes, seconds and a hemisphere letter -> signed decimal degrees.

    ``hemispheres`` is ``"NS"`` or ``"EW"``: the first is positive.  Fewer than
    three parts are accepted (decimal degrees or minutes); None when anything is off.
    """
    letter = (_text(ref) or "")[:1].upper()
    parts = value if isinstance(value, (tuple, list)) else (value,)
    if not letter or letter not in hemispheres or not 1 <= len(parts) <= 3:
        return None
    nums = [_number(p) for p in parts]
    if any(n is None or n < 0 for n in nums):
        return None
    degrees, minutes, seconds = (list(nums) + [0.0, 0.0])[:3]  # type: ignore[misc]
    if minutes > 60 or seconds > 60:
        return None
    total = degrees + minutes / 60 + seconds / 3600
    if total > limit:
        return None
    return -total if letter == hemispheres[1] else total


def _number(value: object) -> float | None:
    """A finite float from an EXIF number or rational; None otherwise (NaN from x/0 too)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        out = float(value)
    except (ValueError, ZeroDivisionError, OverflowError, TypeError):
        return None
    return out if math.isfinite(out) else None
