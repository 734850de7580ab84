"""Queries over the images' metadata: which ids a filter keeps, the rows hits show, summaries.

The search layer turns user filters into an :class:`ImageSelection`; this module,
beside the schema, turns that into SQL. Ranking then happens among the ids it
returns (filters come before ranking, never after).
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterable

import numpy as np
from sqlalchemy import and_, func, or_, select
from sqlalchemy.exc import DBAPIError

from mmsearch.locations import sql_under
from mmsearch.store.catalog import CatalogReader
from mmsearch.store.schema import METADATA_COLUMNS, ImageRow
from mmsearch.store.sqlite import chunks

RECORD_COLUMNS = ("path", "size", "mtime_ns", "content_hash", *METADATA_COLUMNS)


@dataclass(frozen=True)
class ImageSelection:
    """Conditions on image rows; all must hold. Rows whose metadata is unknown fail the
    conditions on it (a date range keeps no photo without a date)."""

    within: str | None = None              # a canonical folder or file path
    taken_from: str | None = None          # ISO local date-time, inclusive
    taken_until: str | None = None         # ISO local date-time, exclusive
    camera: str | None = None              # substring of make or model, any case
    exts: tuple[str, ...] = ()             # lower-case extensions without the dot
    bbox: tuple[float, float, float, float] | None = None  # lat min, lat max, lon min, lon max
    kind: str | None = None                # "image": photos only; "video": video frames only

    @property
    def is_everything(self) -> bool:
        return self == ImageSelection()


def _conditions(sel: ImageSelection) -> list[Any]:
    out: list[Any] = []
    if sel.within is not None:
        out += sql_under(ImageRow.path, [sel.within])  # one root: one condition
    if sel.taken_from is not None:
        out.append(ImageRow.taken >= sel.taken_from)
    if sel.taken_until is not None:
        out.append(ImageRow.taken < sel.taken_until)
    if sel.camera:
        pattern = "%" + sel.camera.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        out.append(or_(func.lower(ImageRow.camera_make).like(pattern, escape="\\"),
                       func.lower(ImageRow.camera_model).like(pattern, escape="\\")))
    if sel.exts:
        out.append(ImageRow.ext.in_(sel.exts))
    if sel.bbox is not None:
        out.append(_in_box(*sel.bbox))
    if sel.kind is not None:
        out.append(ImageRow.video_id.is_(None) if sel.kind == "image"
                   else ImageRow.video_id.is_not(None))
    return out


def _in_box(lat_min: float, lat_max: float, lon_min: float, lon_max: float) -> Any:
    lat = ImageRow.gps_lat.between(lat_min, lat_max)
    if lon_min <= lon_max:
        return and_(lat, ImageRow.gps_lon.between(lon_min, lon_max))
    return and_(lat, or_(ImageRow.gps_lon >= lon_min, ImageRow.gps_lon <= lon_max))  # across 180°


def select_ids(reader: CatalogReader, sel: ImageSelection) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, latitudes, longitudes) of the images ``sel`` keeps, in id order (NaN where
    unknown; the coordinates are only read when ``sel`` has a box, else they are empty)."""
    columns = [ImageRow.id] + ([ImageRow.gps_lat, ImageRow.gps_lon] if sel.bbox else [])
    query = select(*columns)
    conditions = _conditions(sel)
    if conditions:
        query = query.where(and_(*conditions))
    with reader.connect() as conn:
        rows = _fetch_all(conn, query)  # unordered: an index range scan, sorted below
    ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
    order = np.argsort(ids, kind="stable")
    if not sel.bbox:
        return ids[order], np.zeros(0), np.zeros(0)
    lat = np.array([np.nan if r[1] is None else r[1] for r in rows], dtype=np.float64)
    lon = np.array([np.nan if r[2] is None else r[2] for r in rows], dtype=np.float64)
    return ids[order], lat[order], lon[order]


def _fetch_all(conn: Any, query: Any) -> list[tuple]:
    """All rows of ``query`` as plain tuples, straight from the SQLite cursor: SQLAlchemy's
    Row objects cost ~2 us each, which is most of the time for half a million ids."""
    compiled = query.compile(dialect=conn.dialect, compile_kwargs={"render_postcompile": True})
    params = tuple(compiled.params[name] for name in compiled.positiontup or ())
    return _fetch_sql(conn, str(compiled), params)


def _fetch_sql(conn: Any, sql: str, params: tuple) -> list[tuple]:
    cursor = conn.connection.dbapi_connection.cursor()
    try:
        return cursor.execute(sql, params).fetchall()
    except sqlite3.Error as exc:  # typed by the connection's context, as SQLAlchemy's own are
        raise DBAPIError.instance(sql, params, exc, sqlite3.Error) from exc
    finally:
        cursor.close()


@lru_cache(maxsize=32)
def _records_sql(n: int) -> str:
    """The SELECT of :func:`records` for ``n`` ids, compiled once: building and compiling
    the statement took most of a warm query's time in the catalog."""
    from sqlalchemy.dialects import sqlite

    columns = [getattr(ImageRow, c) for c in RECORD_COLUMNS]
    query = select(ImageRow.id, *columns).where(ImageRow.id.in_(range(n)))
    return str(query.compile(dialect=sqlite.dialect(),
                             compile_kwargs={"render_postcompile": True}))


def records(reader: CatalogReader, ids: Iterable[int]) -> dict[int, dict[str, Any]]:
    """id -> {path, size, mtime_ns, content_hash, and the metadata columns} for these ids."""
    out: dict[int, dict[str, Any]] = {}
    with reader.connect() as conn:
        for chunk in chunks([int(i) for i in ids], 900):
            for row in _fetch_sql(conn, _records_sql(len(chunk)), tuple(chunk)):
                out[row[0]] = dict(zip(RECORD_COLUMNS, row[1:]))
    for rec in out.values():
        rec["path"] = reader.as_text(rec["path"])
    return out


def missing_metadata(reader: CatalogReader, roots: Iterable[str] | None = None,
                     limit: int | None = None) -> list[tuple[int, str, int]]:
    """(id, path, mtime_ns) of images whose metadata was never read (under ``roots`` if
    given), in id order: the first ``limit`` of the union of one query per chunk of roots."""
    query = select(ImageRow.id, ImageRow.path, ImageRow.mtime_ns).where(
        ImageRow.taken_source.is_(None)).order_by(ImageRow.id)
    queries = [query] if roots is None else [query.where(c) for c in
                                               sql_under(ImageRow.path, roots)]
    rows: list[tuple[int, str, int]] = []
    with reader.connect() as conn:
        for q in queries:
            rows += [(r[0], reader.as_text(r[1]), r[2])
                     for r in conn.execute(q if limit is None else q.limit(limit))]
    rows.sort()  # the chunks hold disjoint paths: no row twice
    return rows if limit is None else rows[:limit]


@dataclass(frozen=True)
class MetadataSummary:
    first_taken: str | None
    last_taken: str | None
    dates_from_exif: int
    dates_from_mtime: int
    not_read: int
    cameras: dict[str, int]   # "Make Model" -> photos, most first; "" for no camera recorded


def summary(reader: CatalogReader) -> MetadataSummary:
    """Date range, where the dates come from, and photos per camera."""
    with reader.connect() as conn:
        first, last = conn.execute(select(func.min(ImageRow.taken), func.max(ImageRow.taken))).one()
        source = func.coalesce(ImageRow.taken_source, "")
        sources = dict(conn.execute(select(source, func.count()).group_by(source)).all())
        cameras = conn.execute(select(ImageRow.camera_make, ImageRow.camera_model, func.count())
                               .where(ImageRow.taken_source.is_not(None))
                               .group_by(ImageRow.camera_make, ImageRow.camera_model)).all()
    counts: Counter[str] = Counter()
    for make, model, n in cameras:
        counts[camera_name(make, model)] += n
    return MetadataSummary(first, last, sources.get("exif", 0), sources.get("mtime", 0),
                           sources.get("", 0), dict(counts.most_common()))


def camera_name(make: str | None, model: str | None) -> str:
    """"Make Model", without repeating a make the model already starts with ("Canon Canon EOS")."""
    make, model = (make or "").strip(), (model or "").strip()
    if make and model.lower().startswith(make.lower().split()[0]):
        return model
    return " ".join(p for p in (make, model) if p)
