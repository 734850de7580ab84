"""Filters on which images a search may return, applied before ranking.

:class:`Filters` is what the CLI's ``--in --after --before --camera --ext --near
--km`` options and the HTTP API's parameters build; :func:`selection` turns it
into the store's :class:`~mmsearch.store.ImageSelection` (SQL), and
:func:`within_km` finishes ``--near`` with the exact great-circle distance.
Result shaping (``min_score``, ``sort``, ``dedup``) happens after ranking.

Dates: ``--after X`` keeps photos taken from the start of period X on, ``--before
X`` up to the end of period X, where X is a year (``2023``), a month
(``2023-07``), a day (``2023-07-14``) or a time (``2023-07-14T18:30``), in the
photos' local time. So ``--after 2023-07 --before 2023-07`` is July 2023; a period
that runs to the end of the calendar (``--before 9999``) has no upper bound.

:data:`OPTIONS` declares each filter once, as the CLI's ``mmsearch query`` options,
the HTTP API's parameters and the page's fields all offer it: its name, help text
and, for free text, the most characters it takes; :func:`from_options` builds
:class:`Filters` from those raw values, and :func:`check` enforces every bound.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

from mmsearch.errors import UsageError
from mmsearch.settings import DEDUP_THRESHOLD

EARTH_KM = 6371.0088          # mean Earth radius (IUGG)
SORTS = ("score", "date", "date-asc")
EXT_ALIASES = {"jpg": ("jpg", "jpeg"), "jpeg": ("jpg", "jpeg"), "tif": ("tif", "tiff"),
               "tiff": ("tif", "tiff"), "heic": ("heic", "heif"), "heif": ("heic", "heif")}
_PERIOD = re.compile(r"^(\d{4})(?:-(\d{1,2})(?:-(\d{1,2})(?:[T ](\d{1,2}):(\d{2})(?::(\d{2}))?)?)?)?$",
                     re.ASCII)


@dataclass(frozen=True)
class Option:
    """One filter as every shell offers it: the API parameter ``name`` (the CLI option
    ``--name``, ``_`` written ``-``), its help, and for free text its most characters."""

    name: str
    help: str
    max_chars: int | None = None


OPTIONS: dict[str, Option] = {o.name: o for o in (
    Option("in", "Only images at or under this folder.", 4096),
    Option("after", "Taken from the start of this period on: 2023, 2023-07, 2023-07-14, "
           "2023-07-14T18:30.", 32),
    Option("before", "Taken up to the end of this period (inclusive).", 32),
    Option("camera", "Camera make or model contains this (any case).", 200),
    Option("ext", "Only these file types, comma-separated: jpg,heic,png ...", 200),
    Option("near", "LAT,LON in degrees: with a radius in km, only photos taken within it "
           "(from their GPS tags).", 64),
    Option("km", "The radius around LAT,LON, in kilometres."),
    Option("min_score", "Only hits with at least this cosine score (-1..1)."),
    Option("sort", "score, date (newest first) or date-asc: the order of the k best hits.", 16),
    Option("dedup", "Hide hits that are near-duplicates of a better one."),
    Option("type", "image or video: only photos, or only moments of videos.", 8),
    Option("moments", "Several moments per video (default: each video's best one)."),
)}
TYPES = ("image", "video")


@dataclass(frozen=True)
class Filters:
    """Which images may be returned, and how the ranked hits are shaped.

    ``within``: a folder (or file); ``after``/``before``: periods (see the module);
    ``camera``: a substring of make or model, any case; ``ext``: extensions;
    ``near`` + ``km``: (latitude, longitude) and a radius; ``min_score``: the lowest
    cosine kept; ``sort``: score (default), date (newest first) or date-asc;
    ``dedup``: hide hits within cosine ``dedup_threshold`` of a better one.
    """

    within: Path | str | None = None
    after: str | None = None
    before: str | None = None
    camera: str | None = None
    ext: tuple[str, ...] = ()
    near: tuple[float, float] | None = None
    km: float | None = None
    min_score: float | None = None
    sort: str = "score"
    dedup: bool = False
    dedup_threshold: float = DEDUP_THRESHOLD
    type: str | None = None
    moments: bool = False

    def __post_init__(self) -> None:
        check(self)

    @property
    def selects(self) -> bool:
        """Whether these filters restrict which images are ranked at all."""
        return any((self.within is not None, self.after, self.before, self.camera, self.ext,
                    self.near is not None, self.type))


def from_options(*, within: Path | str | None = None, after: str | None = None,
                 before: str | None = None, camera: str | None = None, ext: str | None = None,
                 near: str | None = None, km: float | None = None,
                 min_score: float | None = None, sort: str = "score", dedup: bool = False,
                 dedup_threshold: float = DEDUP_THRESHOLD, type: str | None = None,
                 moments: bool = False) -> Filters:
    """:class:`Filters` from the raw values of :data:`OPTIONS` (empty text: no filter)."""
    return Filters(within=within or None, after=after or None, before=before or None,
                   camera=camera or None, ext=tuple(ext.split(",")) if ext else (),
                   near=lat_lon(near), km=km, min_score=min_score, sort=sort, dedup=dedup,
                   dedup_threshold=dedup_threshold, type=type or None, moments=moments)


def bounded(name: str, value: object) -> None:
    """Refuse a free-text value longer than its option allows (SQLite refuses long LIKE
    patterns, and nothing legitimate is that long)."""
    limit = OPTIONS[name].max_chars
    if value is not None and limit is not None and len(str(value)) > limit:
        raise UsageError(f"{name}: too long ({len(str(value))} characters, at most {limit})")


def check(f: Filters) -> None:
    """Refuse contradictory, malformed or oversized filters with one clear line."""
    for name, value in (("in", f.within), ("after", f.after), ("before", f.before),
                        ("camera", f.camera), ("ext", ",".join(f.ext)), ("sort", f.sort),
                        ("type", f.type)):
        bounded(name, value)
    if f.type is not None and f.type not in TYPES:
        raise UsageError(f"--type {f.type!r}: use image or video")
    if f.within is not None and "\0" in str(f.within):
        raise UsageError("in: a path has no NUL character")
    if (f.near is None) != (f.km is None):
        raise UsageError("--near LAT,LON and --km R go together")
    if f.near is not None:
        lat, lon = f.near
        if not (-90 <= lat <= 90 and -180 <= lon <= 180):
            raise UsageError(f"--near {lat},{lon}: latitude is -90..90, longitude -180..180")
        if not (f.km is not None and f.km > 0 and math.isfinite(f.km)):
            raise UsageError(f"--km must be a positive distance, got {f.km}")
    if f.sort not in SORTS:
        raise UsageError(f"--sort {f.sort!r}: use one of {', '.join(SORTS)}")
    if f.min_score is not None and not -1 <= f.min_score <= 1:
        raise UsageError(f"--min-score is a cosine between -1 and 1, got {f.min_score}")
    if not 0 < f.dedup_threshold <= 1:
        raise UsageError(f"the dedup threshold is a cosine in (0, 1], got {f.dedup_threshold}")
    for bound in (f.after, f.before):
        if bound is not None:
            period(bound)


def period(text: str) -> tuple[str, str | None]:
    """(start, end) of a period as ISO local date-times, the end exclusive (None: the period
    runs to the end of the calendar); see the module."""
    m = _PERIOD.match(text.strip())
    if not m:
        raise UsageError(f"cannot read the date {text!r}: use 2023, 2023-07, 2023-07-14 "
                         "or 2023-07-14T18:30")
    parts = [int(p) if p else None for p in m.groups()]
    try:
        start = datetime(parts[0], parts[1] or 1, parts[2] or 1, parts[3] or 0, parts[4] or 0,
                         parts[5] or 0)
    except ValueError as exc:
        raise UsageError(f"cannot read the date {text!r}: {exc}") from None
    try:
        end: str | None = _period_end(start, parts).isoformat(timespec="seconds")
    except (OverflowError, ValueError):  # past 9999-12-31T23:59:59: no upper bound
        end = None
    return start.isoformat(timespec="seconds"), end


def _period_end(start: datetime, parts: list[int | None]) -> datetime:
    """The first moment after the period that starts at ``start``; OverflowError or
    ValueError past the last year ``datetime`` holds."""
    if parts[1] is None:
        return start.replace(year=start.year + 1)
    if parts[2] is None:
        return (start.replace(day=28) + timedelta(days=4)).replace(day=1)
    if parts[3] is None:
        return start + timedelta(days=1)
    return start + timedelta(seconds=1 if parts[5] is not None else 60)


def extensions(values: tuple[str, ...] | str) -> tuple[str, ...]:
    """``"jpg,heic"`` or ``("JPG", ".heic")`` -> the stored extensions they stand for."""
    items = values.split(",") if isinstance(values, str) else list(values)
    out: list[str] = []
    for item in items:
        ext = item.strip().lower().lstrip(".")
        if ext:
            out += EXT_ALIASES.get(ext, (ext,))
    return tuple(dict.fromkeys(out))


def lat_lon(text: str | None) -> tuple[float, float] | None:
    """``"38.71,-9.14"`` -> (38.71, -9.14); None for nothing; one usage line otherwise."""
    if not text:
        return None
    bounded("near", text)
    try:
        lat, lon = (float(p) for p in text.split(","))
    except ValueError:
        raise UsageError(f"--near {text!r}: give LAT,LON in degrees, e.g. 38.7139,-9.1393") from None
    return lat, lon


def bounding_box(lat: float, lon: float, km: float) -> tuple[float, float, float, float]:
    """A latitude/longitude box holding every point within ``km`` of (lat, lon)."""
    dlat = math.degrees(km / EARTH_KM)
    lat_min, lat_max = max(-90.0, lat - dlat), min(90.0, lat + dlat)
    if lat_min <= -89.9 or lat_max >= 89.9 or dlat >= 90:
        return lat_min, lat_max, -180.0, 180.0
    dlon = math.degrees(km / (EARTH_KM * math.cos(math.radians(max(abs(lat_min), abs(lat_max))))))
    if dlon >= 180:
        return lat_min, lat_max, -180.0, 180.0
    lo, hi = lon - dlon, lon + dlon
    return lat_min, lat_max, (lo + 540) % 360 - 180, (hi + 540) % 360 - 180


def haversine_km(lat: np.ndarray, lon: np.ndarray, lat0: float, lon0: float) -> np.ndarray:
    """Great-circle distances (km) from (lat0, lon0); NaN in, NaN out."""
    p, p0 = np.radians(lat), math.radians(lat0)
    dp, dl = p - p0, np.radians(lon - lon0)
    a = np.sin(dp / 2) ** 2 + np.cos(p) * math.cos(p0) * np.sin(dl / 2) ** 2
    return 2 * EARTH_KM * np.arcsin(np.sqrt(np.clip(a, 0, 1)))


def within_km(ids: np.ndarray, lat: np.ndarray, lon: np.ndarray, f: Filters) -> np.ndarray:
    """The ``ids`` within ``f.km`` of ``f.near`` (all of them when there is no --near)."""
    if f.near is None or not ids.size:
        return ids
    with np.errstate(invalid="ignore"):
        keep = haversine_km(lat, lon, *f.near) <= f.km
    return ids[keep]
