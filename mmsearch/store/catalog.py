"""The SQLite catalog: the one module that knows the schema.

The catalog is the source of truth of an index. It holds, through SQLAlchemy 2:
``images`` (one row per path; its ``id`` is the vector's id in FAISS),
``embeddings`` (one float32 vector per distinct file content, so duplicates and
moved files are embedded once), ``texts`` (indexed texts with their vectors) and
``meta`` (schema version, model identity). The FAISS file is a derived cache
that can always be rebuilt from here.

Ids are never reused (the highest one given out is kept in ``meta``), so an id
names one vector for ever: a FAISS file left behind by a crash is stale only in
which ids it holds, never in what an id means. Every SQLite failure leaves this
module typed: :class:`CorruptIndexError` for a damaged file (checked before
SQLite opens it: header, truncation), :class:`StorageError` for the rest.

Schema changes go in ``_MIGRATIONS``: bump ``SCHEMA_VERSION`` and add a step.
v1: the tables above. v2: the stored model identity names its backend and its
text tower (``backend``, ``text_pretrained``, ``text_fingerprint``). v3: image
rows carry the photo's metadata (date taken, camera, lens, GPS, size after
orientation, extension; :data:`METADATA_COLUMNS`). v4: an index records its *storage*
(meta ``storage``: ``catalog``, every index before v4, or ``shards``); in an index stored
as ``shards`` an embedding row holds no vector (an empty blob) but where it lies, shard
``k`` row ``r`` of an npy file (``shard``, ``shard_row``; see :mod:`.shardvectors`).

:class:`CatalogReader` has every query and no write; :class:`Catalog` adds the
writes, which only :class:`mmsearch.store.Store` calls.
"""

from __future__ import annotations

import json
import os
import sqlite3
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator
from urllib.parse import quote

import numpy as np
from sqlalchemy import (Float, ForeignKey, bindparam, Integer, LargeBinary, String, Text, create_engine, delete,
                        event, func, insert, select, text, update)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from mmsearch.errors import CorruptIndexError, MMSearchError, StorageError
from mmsearch.locations import sql_under
from mmsearch.store.shardvectors import ShardVectors

SCHEMA_VERSION = 4
STORAGE = "storage"  # meta: where image vectors are kept (shardvectors.STORAGES)


class Base(DeclarativeBase):
    pass


class MetaRow(Base):
    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(String, primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class EmbeddingRow(Base):
    __tablename__ = "embeddings"
    content_hash: Mapped[str] = mapped_column(String, primary_key=True)
    vector: Mapped[bytes] = mapped_column(LargeBinary)  # empty when the vector is in a shard
    # v4: where the vector lies in an index stored as shards (NULL: in ``vector``)
    shard: Mapped[int | None] = mapped_column(Integer, nullable=True)
    shard_row: Mapped[int | None] = mapped_column(Integer, nullable=True)


class ImageRow(Base):
    __tablename__ = "images"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(Text, unique=True)
    size: Mapped[int] = mapped_column(Integer)
    mtime_ns: Mapped[int] = mapped_column(Integer)
    content_hash: Mapped[str] = mapped_column(ForeignKey("embeddings.content_hash"), index=True)
    # v3: photo metadata read from the file's headers (NULL taken_source: not read yet)
    taken: Mapped[str | None] = mapped_column(Text, nullable=True, index=True)
    taken_offset: Mapped[str | None] = mapped_column(Text, nullable=True)
    taken_source: Mapped[str | None] = mapped_column(Text, nullable=True)
    camera_make: Mapped[str | None] = mapped_column(Text, nullable=True)
    camera_model: Mapped[str | None] = mapped_column(Text, nullable=True)
    lens: Mapped[str | None] = mapped_column(Text, nullable=True)
    gps_lat: Mapped[float | None] = mapped_column(Float, nullable=True)
    gps_lon: Mapped[float | None] = mapped_column(Float, nullable=True)
    width: Mapped[int | None] = mapped_column(Integer, nullable=True)
    height: Mapped[int | None] = mapped_column(Integer, nullable=True)
    orientation: Mapped[int | None] = mapped_column(Integer, nullable=True)
    ext: Mapped[str | None] = mapped_column(Text, nullable=True)


METADATA_COLUMNS = ("taken", "taken_offset", "taken_source", "camera_make", "camera_model", "lens",
                    "gps_lat", "gps_lon", "width", "height", "orientation", "ext")


class TextRow(Base):
    __tablename__ = "texts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(Text, unique=True)
    text: Mapped[str] = mapped_column(Text)
    vector: Mapped[bytes] = mapped_column(LargeBinary)


def _migrate_0_to_1(conn: Connection) -> None:
    Base.metadata.create_all(conn)


def _migrate_1_to_2(conn: Connection) -> None:
    """The model record gains its backend (open_clip, the only one v1 knew) and text tower."""
    row = conn.execute(select(MetaRow.value).where(MetaRow.key == "model")).first()
    if not row:
        return
    try:
        model = json.loads(row[0])
    except (TypeError, ValueError):
        return  # unreadable either way; `mmsearch check` reports it
    if isinstance(model, dict):
        model = {"backend": "open_clip", "text_pretrained": None, "text_fingerprint": None,
                 **model}
        conn.execute(update(MetaRow).where(MetaRow.key == "model")
                     .values(value=json.dumps(model, sort_keys=True)))


def _migrate_2_to_3(conn: Connection) -> None:
    """Image rows gain the photo's metadata columns, empty until the next index run (or
    `check --repair`) reads them from the files' headers: nothing is embedded again."""
    have = {row[1] for row in conn.exec_driver_sql("PRAGMA table_info(images)")}
    for column in METADATA_COLUMNS:
        if column not in have:  # a new file was made whole by create_all
            kind = {"gps_lat": "FLOAT", "gps_lon": "FLOAT", "width": "INTEGER",
                    "height": "INTEGER", "orientation": "INTEGER"}.get(column, "TEXT")
            conn.exec_driver_sql(f"ALTER TABLE images ADD COLUMN {column} {kind}")
    conn.exec_driver_sql("CREATE INDEX IF NOT EXISTS ix_images_taken ON images (taken)")


def _migrate_3_to_4(conn: Connection) -> None:
    """Embedding rows can say where their vector lies in an npy shard; an index made
    before records its storage: ``catalog`` (its vectors stay where they are)."""
    have = {row[1] for row in conn.exec_driver_sql("PRAGMA table_info(embeddings)")}
    for column in ("shard", "shard_row"):
        if column not in have:  # a new file was made whole by create_all
            conn.exec_driver_sql(f"ALTER TABLE embeddings ADD COLUMN {column} INTEGER")
    if conn.execute(select(MetaRow.value).where(MetaRow.key == "model")).first():
        conn.execute(insert(MetaRow).prefix_with("OR IGNORE").values(key=STORAGE,
                                                                      value="catalog"))


# version n -> n + 1; version 0 is an empty file.
_MIGRATIONS: dict[int, Callable[[Connection], None]] = {0: _migrate_0_to_1, 1: _migrate_1_to_2,
                                                        2: _migrate_2_to_3, 3: _migrate_3_to_4}
READABLE_UNMIGRATED = 1  # older schemas this code still reads as they are (a read-only file)


@dataclass(frozen=True)
class ImageFile:
    """An image file as found on disk: what a new catalog row records (its id comes on commit).

    ``meta``: values of :data:`METADATA_COLUMNS` (those missing are stored empty).
    """

    path: str
    size: int
    mtime_ns: int
    content_hash: str
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def row(self, image_id: int) -> dict[str, Any]:
        meta = {k: v for k, v in self.meta.items() if k in METADATA_COLUMNS}
        return {"id": image_id, "path": self.path, "size": self.size, "mtime_ns": self.mtime_ns,
                "content_hash": self.content_hash, **meta}


@dataclass(frozen=True)
class StoredImage:
    """An image row of the catalog."""

    id: int
    path: str
    size: int
    mtime_ns: int
    content_hash: str


def _on_connect(dbapi_conn: sqlite3.Connection, _record: object) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")       # readers keep working while a run writes
    cur.execute("PRAGMA synchronous=NORMAL")     # durable at each checkpoint, safe against corruption
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


def _engine(path: Path, *, immutable: bool = False) -> Engine:
    if immutable:
        uri = f"file:{quote(str(path))}?immutable=1"
        engine = create_engine("sqlite://", creator=lambda: sqlite3.connect(
            uri, uri=True, check_same_thread=False))
    else:
        engine = create_engine(f"sqlite:///{path}")
    event.listen(engine, "connect", _on_connect)
    return engine


def _frozen(path: Path) -> bool:
    """Whether the catalog's file system cannot be written (read-only, or full) and no
    committed data waits in the write-ahead log, so that reading the file alone is safe."""
    try:
        if path.with_name(path.name + "-wal").stat().st_size > 0:
            return False
    except FileNotFoundError:
        pass
    except OSError:
        return False
    return fs_hint(path) != ""


def fs_hint(path: Path) -> str:
    """`` (read-only file system)`` or `` (the disk is full)`` when so, else empty."""
    try:
        st = os.statvfs(path.parent)
    except OSError:
        return ""
    if st.f_flag & os.ST_RDONLY:
        return " (read-only file system)"
    if st.f_bavail * st.f_frsize < (1 << 20):
        return " (the disk is full)"
    return ""


def to_blob(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype=np.float32).tobytes()


def _vector_select(kind: str, sharded: bool = False) -> tuple[Any, Any]:
    """(SELECT id, vector[, shard, shard_row] ... ORDER BY id, the id column) for ``kind``:
    images or texts; ``sharded``: an index stored as shards (whose images' vectors may lie
    in npy files)."""
    if kind == "images":
        where = (EmbeddingRow.shard, EmbeddingRow.shard_row) if sharded else ()
        return (select(ImageRow.id, EmbeddingRow.vector, *where)
                .join(EmbeddingRow, ImageRow.content_hash == EmbeddingRow.content_hash)
                .order_by(ImageRow.id)), ImageRow.id
    return select(TextRow.id, TextRow.vector).order_by(TextRow.id), TextRow.id


def from_blobs(blobs: Iterable[bytes], dim: int) -> np.ndarray:
    data = b"".join(blobs)
    if not data:
        return np.zeros((0, dim), dtype=np.float32)
    return np.frombuffer(data, dtype=np.float32).reshape(-1, dim).copy()


class EmptyCatalogError(CorruptIndexError):
    """The catalog file exists but holds no schema: nothing was ever committed to it."""


class CatalogReader:
    """Every query of one SQLite catalog, and no write: what readers outside the store get.

    Every SQLite failure leaves this class as a typed error: a damaged file as
    :class:`CorruptIndexError`, anything else (disk full, read-only, I/O) as
    :class:`StorageError`.
    """

    def __init__(self, engine: Engine, path: Path) -> None:
        self._engine = engine
        self.path = path
        self._shards = ShardVectors(path.parent)

    @staticmethod
    def _version(conn: Connection) -> int:
        has_meta = conn.execute(text(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'")).first()
        if not has_meta:
            return 0
        row = conn.execute(select(MetaRow.value).where(MetaRow.key == "schema_version")).first()
        try:
            return int(row[0]) if row else 0
        except (ValueError, TypeError):
            raise CorruptIndexError(f"catalog has an unreadable schema version {row[0]!r}; "
                                    "see `mmsearch check`") from None

    @property
    def schema_version(self) -> int:
        with self._read() as conn:
            return self._version(conn)

    def get_meta(self, key: str) -> str | None:
        with self._read() as conn:
            row = conn.execute(select(MetaRow.value).where(MetaRow.key == key)).first()
        return row[0] if row else None

    @property
    def storage(self) -> str:
        """Where the image vectors are kept: ``catalog`` or ``shards`` (see :mod:`.shardvectors`)."""
        with self._read() as conn:
            return "shards" if self._sharded(conn) else "catalog"

    @staticmethod
    def _sharded(conn: Connection) -> bool:
        row = conn.execute(select(MetaRow.value).where(MetaRow.key == STORAGE)).first()
        return bool(row) and row[0] == "shards"

    def _read(self) -> "_ReadConn":
        return _ReadConn(self._engine, self.path)

    @staticmethod
    def _last_id(conn: Connection, table, key: str) -> int:
        """The highest id ever given out in ``table`` (ids are never reused).

        A FAISS file saved before a crash may still hold a deleted id; were the id
        given to a new row, that stale vector would pass for the new row's.
        """
        top = int(conn.execute(select(func.coalesce(func.max(table.id), 0))).scalar())
        return max(top, CatalogReader._meta_int(conn, key))

    @staticmethod
    def _meta_int(conn: Connection, key: str) -> int:
        row = conn.execute(select(MetaRow.value).where(MetaRow.key == key)).first()
        return int(row[0]) if row and isinstance(row[0], str) and row[0].isdigit() else 0

    def images_under(self, roots: str | Iterable[str]) -> dict[str, StoredImage]:
        """Every stored image whose path is one of ``roots`` or below one
        (:func:`mmsearch.locations.sql_under`: one query per chunk of roots)."""
        out: dict[str, StoredImage] = {}
        with self._read() as conn:
            for condition in _under(roots):
                rows = conn.execute(select(ImageRow.id, ImageRow.path, ImageRow.size,
                                           ImageRow.mtime_ns, ImageRow.content_hash)
                                    .where(condition))
                out.update({self._str(r.path): StoredImage(*r) for r in rows})
        return out

    def image_ids_under(self, roots: str | Iterable[str]) -> np.ndarray:
        """The ids of :meth:`images_under`, sorted."""
        ids: list[int] = []
        with self._read() as conn:
            for condition in _under(roots):
                ids += conn.execute(select(ImageRow.id).where(condition)).scalars().all()
        return np.asarray(sorted(ids), dtype=np.int64)

    def images_at(self, paths: Iterable[str]) -> dict[str, StoredImage]:
        """The stored rows of exactly these paths (one query per 900, not one per path)."""
        out: dict[str, StoredImage] = {}
        with self._read() as conn:
            for chunk in _chunks(list(paths), 900):
                rows = conn.execute(select(ImageRow.id, ImageRow.path, ImageRow.size,
                                           ImageRow.mtime_ns, ImageRow.content_hash)
                                    .where(ImageRow.path.in_(chunk)))
                out.update({self._str(r.path): StoredImage(*r) for r in rows})
        return out

    def image_paths(self, ids: Iterable[int]) -> dict[int, str]:
        ids = [int(i) for i in ids]
        out: dict[int, str] = {}
        with self._read() as conn:
            for chunk in _chunks(ids, 900):
                rows = conn.execute(select(ImageRow.id, ImageRow.path).where(ImageRow.id.in_(chunk)))
                out.update({r.id: self._str(r.path) for r in rows})
        return out

    def _str(self, value: object) -> str:
        """A text value as stored; anything else means the file was damaged under SQLite's feet."""
        if not isinstance(value, str):
            raise CorruptIndexError(f"catalog {self.path} is damaged (a {type(value).__name__} "
                                    "where text belongs); see `mmsearch check`")
        return value

    def known_vectors(self, hashes: Iterable[str], dim: int) -> dict[str, np.ndarray]:
        """The stored vectors of these content hashes (those known and undamaged)."""
        keys: list[str] = []
        blobs: list[Any] = []
        places: list[tuple[int, int] | None] = []
        with self._read() as conn:
            where = (EmbeddingRow.shard, EmbeddingRow.shard_row) if self._sharded(conn) else ()
            for chunk in _chunks(list(set(hashes)), 900):
                for r in conn.execute(select(EmbeddingRow.content_hash, EmbeddingRow.vector, *where)
                                      .where(EmbeddingRow.content_hash.in_(chunk))):
                    keys.append(r[0])
                    blobs.append(r[1])
                    places.append((r[2], r[3]) if where and r[2] is not None else None)
        good = [i for i, (b, p) in enumerate(zip(blobs, places)) if p or not _damaged(b, dim)]
        vectors = self._assemble([blobs[i] for i in good], [places[i] for i in good], dim)
        return {keys[i]: v for i, v in zip(good, vectors)}

    def next_image_id(self) -> int:  # for messages and tests; commit_images allocates
        """An id no image row has ever had (see :meth:`_last_id`)."""
        with self._read() as conn:
            return self._last_id(conn, ImageRow, "images_last_id") + 1

    def image_vectors(self, dim: int, ids: Iterable[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of stored images, all or the given ids, ordered by id."""
        return self._vectors("images", dim, ids)

    def vector_chunks(self, kind: str, dim: int,
                      size: int = 65_536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, vectors) of every stored image (or text) in id order, ``size`` at a time,
        so building an index over millions of vectors never holds them all in memory."""
        last = -(1 << 62)
        while True:
            ids, vecs = self._vectors(kind, dim, None, after=last, limit=size)
            if not ids.size:
                return
            yield ids, vecs
            last = int(ids[-1])

    def _vectors(self, kind: str, dim: int, ids: Iterable[int] | None, *,
                 after: int | None = None, limit: int | None = None):
        chunks = [None] if ids is None else list(_chunks(sorted({int(i) for i in ids}), 900))
        out_ids: list[int] = []
        blobs: list[Any] = []
        places: list[tuple[int, int] | None] = []
        size = 4 * dim
        damaged = 0
        with self._read() as conn:
            sharded = kind == "images" and self._sharded(conn)
            query, id_col = _vector_select(kind, sharded)
            if after is not None:
                query = query.where(id_col > after)
            for chunk in chunks:
                q = query if chunk is None else query.where(id_col.in_(chunk))
                for r in conn.execute(q if limit is None else q.limit(limit)):
                    out_ids.append(r[0])
                    blobs.append(r[1])
                    place = (r[2], r[3]) if sharded and r[2] is not None else None
                    places.append(place)
                    damaged += place is None and (not isinstance(r[1], bytes)
                                                  or len(r[1]) != size or not size)
            if damaged:
                raise CorruptIndexError(f"catalog {self.path} holds {damaged} damaged vectors: "
                                        "run `mmsearch check --repair`")
        return np.asarray(out_ids, dtype=np.int64), self._assemble(blobs, places, dim)

    def _assemble(self, blobs: list[Any], places: list[tuple[int, int] | None],
                  dim: int) -> np.ndarray:
        """Vectors from catalog blobs, and from npy shards where ``places[i]`` says (k, row)."""
        located = [i for i, p in enumerate(places) if p is not None]
        if not located:
            return from_blobs(blobs, dim)
        out = np.empty((len(blobs), dim), dtype=np.float32)
        at = np.asarray(located, dtype=np.int64)
        where = np.asarray([places[i] for i in located], dtype=np.int64)
        out[at] = self._shards.gather(where[:, 0], where[:, 1], dim)
        rest = [i for i, p in enumerate(places) if p is None]
        if rest:
            out[rest] = from_blobs([blobs[i] for i in rest], dim)
        return out

    def shard_locations(self) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(shard, image ids, rows) of the images whose vectors lie in npy shards, a shard
        at a time (an index stored as shards): what a build on a cluster hands its tasks,
        which read the vectors themselves."""
        query = (select(ImageRow.id, EmbeddingRow.shard, EmbeddingRow.shard_row)
                 .join(EmbeddingRow, ImageRow.content_hash == EmbeddingRow.content_hash)
                 .where(EmbeddingRow.shard.is_not(None))
                 .order_by(EmbeddingRow.shard, ImageRow.id))
        with self._read() as conn:
            if not self._sharded(conn):
                return
            current, ids, rows = None, [], []
            for image_id, k, row in conn.execute(query):
                if k != current and ids:
                    yield current, np.asarray(ids, np.int64), np.asarray(rows, np.int64)
                    ids, rows = [], []
                current = k
                ids.append(image_id)
                rows.append(row)
            if ids:
                yield current, np.asarray(ids, np.int64), np.asarray(rows, np.int64)

    def shard_count(self) -> int:
        """How many npy shards hold vectors the catalog points to."""
        with self._read() as conn:
            if not self._sharded(conn):
                return 0
            return int(conn.execute(select(func.count(func.distinct(EmbeddingRow.shard)))
                                    .where(EmbeddingRow.shard.is_not(None))).scalar())

    def image_count(self) -> int:
        with self._read() as conn:
            return int(conn.execute(select(func.count()).select_from(ImageRow)).scalar())

    def embedding_count(self) -> int:
        with self._read() as conn:
            return int(conn.execute(select(func.count()).select_from(EmbeddingRow)).scalar())

    def all_image_ids(self) -> np.ndarray:
        with self._read() as conn:
            return np.asarray(conn.execute(select(ImageRow.id)).scalars().all(), dtype=np.int64)

    def id_summary(self, kind: str) -> tuple[int, int, int, int]:
        """(count, min, max, sum) of the image or text ids: computed inside SQLite, so a
        million ids cost milliseconds, not a round trip each."""
        table = ImageRow if kind == "images" else TextRow
        with self._read() as conn:
            row = conn.execute(select(func.count(table.id), func.coalesce(func.min(table.id), 0),
                                      func.coalesce(func.max(table.id), 0),
                                      func.coalesce(func.sum(table.id), 0))).one()
        return int(row[0]), int(row[1]), int(row[2]), int(row[3])

    def all_image_paths(self) -> Iterator[tuple[int, str]]:
        with self._read() as conn:
            for i, path in conn.execute(select(ImageRow.id, ImageRow.path).order_by(ImageRow.id)):
                yield i, self._str(path)

    def text_keys(self) -> set[tuple[str, str]]:
        with self._read() as conn:
            return {(r.key, r.text) for r in conn.execute(select(TextRow.key, TextRow.text))}

    def text_vectors(self, dim: int, ids: Iterable[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        return self._vectors("texts", dim, ids)

    def texts_by_id(self, ids: Iterable[int]) -> dict[int, tuple[str, str]]:
        out: dict[int, tuple[str, str]] = {}
        with self._read() as conn:
            for chunk in _chunks([int(i) for i in ids], 900):
                rows = conn.execute(select(TextRow.id, TextRow.key, TextRow.text)
                                    .where(TextRow.id.in_(chunk)))
                out.update({r.id: (self._str(r.key), self._str(r.text)) for r in rows})
        return out

    def text_count(self) -> int:
        with self._read() as conn:
            return int(conn.execute(select(func.count()).select_from(TextRow)).scalar())

    def all_text_ids(self) -> np.ndarray:
        with self._read() as conn:
            return np.asarray(conn.execute(select(TextRow.id)).scalars().all(), dtype=np.int64)

    def integrity_problems(self) -> list[str]:
        try:
            with self._read() as conn:
                rows = conn.execute(text("PRAGMA integrity_check")).scalars().all()
        except CorruptIndexError as exc:
            return [str(exc)]
        return [] if rows == ["ok"] else [f"sqlite: {r}" for r in rows]

    def damaged_embeddings(self, dim: int) -> list[str]:
        """Content hashes whose stored vector has the wrong length or is not finite (or,
        kept in a shard, cannot be read there: a missing, short or damaged npy file)."""
        with self._read() as conn:
            if not self._sharded(conn):
                rows = conn.execute(select(EmbeddingRow.content_hash, EmbeddingRow.vector))
                return [h for h, blob in rows if _damaged(blob, dim)]
            rows = conn.execute(select(EmbeddingRow.content_hash, EmbeddingRow.vector,
                                       EmbeddingRow.shard, EmbeddingRow.shard_row)).all()
        bad = [h for h, blob, k, _ in rows if k is None and _damaged(blob, dim)]
        located = [(h, k, r) for h, _, k, r in rows if k is not None]
        if located:
            mask = self._shards.damaged(np.asarray([k for _, k, _ in located], np.int64),
                                        np.asarray([r for _, _, r in located], np.int64), dim)
            bad += [h for (h, _, _), m in zip(located, mask) if m]
        return bad

    def damaged_texts(self, dim: int) -> dict[int, tuple[str, str]]:
        """Texts whose stored vector has the wrong length or is not finite: id -> (key, text)."""
        with self._read() as conn:
            rows = conn.execute(select(TextRow.id, TextRow.key, TextRow.text, TextRow.vector))
            return {i: (key, txt) for i, key, txt, blob in rows if _damaged(blob, dim)}

    def vector_sizes(self) -> dict[int, int]:
        """Byte length -> how many stored vectors (images and texts) have it."""
        sizes: dict[int, int] = {}
        with self._read() as conn:
            # (an index stored as shards keeps no image vector here: only its texts count)
            tables = ("texts",) if self._sharded(conn) else ("embeddings", "texts")
            for table in tables:
                for size, n in conn.exec_driver_sql(
                        f"SELECT length(vector), count(*) FROM {table} GROUP BY 1"):
                    sizes[int(size or 0)] = sizes.get(int(size or 0), 0) + n
        return sizes

    def connect(self) -> "_ReadConn":
        """A read connection (``with reader.connect() as conn``) for queries kept in other
        modules of the store (:mod:`.selection`); SQLite errors come out typed."""
        return self._read()

    def dangling_images(self) -> dict[int, str]:
        """Image rows whose embedding row is missing (id -> path)."""
        with self._read() as conn:
            rows = conn.execute(select(ImageRow.id, ImageRow.path)
                                .outerjoin(EmbeddingRow,
                                           ImageRow.content_hash == EmbeddingRow.content_hash)
                                .where(EmbeddingRow.content_hash.is_(None)))
            return {r.id: r.path for r in rows}


class Catalog(CatalogReader):
    """One SQLite file, opened (and migrated) for a :class:`~mmsearch.store.Store`.

    The write methods run in one transaction each; only the store calls them.
    ``require_schema`` refuses (with :class:`EmptyCatalogError`) a file that
    was never initialised instead of creating the tables in it: readers pass
    it, so they never write a schema.
    """

    def __init__(self, path: Path, *, create: bool, require_schema: bool = False) -> None:
        if not create and not path.is_file():
            raise CorruptIndexError(f"catalog missing: {path}")
        self.path = path
        self._shards = ShardVectors(path.parent)
        check_sqlite_file(path)
        self._engine: Engine = _engine(path)
        try:
            try:
                self._upgrade(require_schema)
            except DBAPIError as exc:
                if create or not _frozen(path) or isinstance(_translate(exc, "", path),
                                                            CorruptIndexError):
                    raise
                # a reader on a read-only or full file system, where SQLite cannot create the
                # WAL index (-shm): nobody can be writing, so read the file as it is
                self._engine.dispose()
                self._engine = _engine(path, immutable=True)
                self._upgrade(require_schema, migrate=False)
        except (DBAPIError, UnicodeDecodeError) as exc:
            self._engine.dispose()
            error = _translate(exc, "open", path)
            if isinstance(error, CorruptIndexError):
                error = CorruptIndexError(f"catalog {path} is not a readable SQLite database: "
                                          f"{getattr(exc, 'orig', exc)}")
            raise error from exc
        except MMSearchError:
            self._engine.dispose()
            raise

    def close(self) -> None:
        self._engine.dispose()

    def _upgrade(self, require_schema: bool, migrate: bool = True) -> None:
        """Migrate to SCHEMA_VERSION (``migrate=False``: a read-only file is read as it is,
        when its schema is at least READABLE_UNMIGRATED)."""
        for attempt in range(100):
            try:
                with self._engine.begin() as conn:
                    version = self._version(conn)
                    if version > SCHEMA_VERSION:
                        raise CorruptIndexError(
                            f"catalog {self.path} has schema v{version}; this mmsearch reads up to "
                            f"v{SCHEMA_VERSION}: upgrade mmsearch")
                    if version == 0 and require_schema:
                        raise EmptyCatalogError(f"catalog {self.path} holds no index yet")
                    if not migrate and version >= READABLE_UNMIGRATED:
                        return
                    while version < SCHEMA_VERSION:
                        _MIGRATIONS[version](conn)
                        version += 1
                        self._put_meta(conn, "schema_version", str(version))
                return
            except OperationalError as exc:
                # Two processes creating the same new index: the loser's snapshot is stale
                # (SQLITE_BUSY_SNAPSHOT) or the lock is held; look again once it has committed.
                if _primary_code(exc) not in (_SQLITE_BUSY, _SQLITE_LOCKED) or attempt == 99:
                    raise
                time.sleep(0.05)

    @staticmethod
    def _put_meta(conn: Connection, key: str, value: str) -> None:
        conn.execute(delete(MetaRow).where(MetaRow.key == key))
        conn.execute(insert(MetaRow).values(key=key, value=value))

    def set_meta(self, key: str, value: str) -> None:
        self.set_metas({key: value})

    def set_metas(self, values: dict[str, str]) -> None:
        """Several meta keys in one transaction (all or none survive a crash)."""
        with self._write() as conn:
            for key, value in values.items():
                self._put_meta(conn, key, value)

    def revector_texts(self, vectors: dict[int, np.ndarray], metas: dict[str, str]) -> None:
        """One transaction: new vectors for these text ids, and these meta keys."""
        with self._write() as conn:
            if vectors:
                conn.execute(update(TextRow).where(TextRow.id == bindparam("tid"))
                             .values(vector=bindparam("vec")),
                             [{"tid": i, "vec": to_blob(v)} for i, v in vectors.items()])
            for key, value in metas.items():
                self._put_meta(conn, key, value)

    def _write(self) -> "_WriteTxn":
        return _WriteTxn(self._engine, self.path)

    def commit_images(self, new_vectors: dict[str, np.ndarray], files: list[ImageFile],
                      delete_ids: Iterable[int] = (), ids: Iterable[int] | None = None,
                      locations: dict[str, tuple[int, int]] | None = None) -> np.ndarray:
        """One transaction: store new embeddings (``locations``: content hash -> (shard, row)
        of vectors kept in npy shards), add rows for ``files`` under fresh ids
        (returned, in order; ``ids``: ids reserved before, see ``reserve_image_ids``),
        delete the rows ``delete_ids``. A content already stored keeps its vector."""
        delete_ids = [int(i) for i in delete_ids]
        with self._write() as conn:
            last = self._last_id(conn, ImageRow, "images_last_id")
            ids = (np.arange(last + 1, last + 1 + len(files), dtype=np.int64) if ids is None
                   else np.asarray(list(ids), dtype=np.int64))
            if new_vectors:
                conn.execute(insert(EmbeddingRow).prefix_with("OR IGNORE"),
                             [{"content_hash": h, "vector": to_blob(v)} for h, v in new_vectors.items()])
            if locations:
                conn.execute(insert(EmbeddingRow).prefix_with("OR IGNORE"),
                             [{"content_hash": h, "vector": b"", "shard": k, "shard_row": r}
                              for h, (k, r) in locations.items()])
            for chunk in _chunks(delete_ids, 900):
                conn.execute(delete(ImageRow).where(ImageRow.id.in_(chunk)))
            if files:
                conn.execute(insert(ImageRow), [f.row(int(i)) for i, f in zip(ids, files)])
                self._put_meta(conn, "images_last_id", str(max(last, int(ids.max()))))
        return ids

    def reserve_image_ids(self, n: int) -> int:
        """Give out ``n`` image ids for later rows (never to be given again); the first."""
        with self._write() as conn:
            last = self._last_id(conn, ImageRow, "images_last_id")
            self._put_meta(conn, "images_last_id", str(last + n))
        return last + 1

    def touch_images(self, rows: list[StoredImage]) -> None:
        """Record a new size/mtime for files whose content did not change."""
        if rows:
            with self._write() as conn:
                stmt = (update(ImageRow).where(ImageRow.id == bindparam("row_id"))
                        .values(size=bindparam("new_size"), mtime_ns=bindparam("new_mtime")))
                conn.execute(stmt, [{"row_id": r.id, "new_size": r.size, "new_mtime": r.mtime_ns}
                                    for r in rows])

    def set_metadata(self, rows: Iterable[tuple[int, dict[str, Any]]]) -> None:
        """Store (id, metadata) of existing image rows; every column is written (missing: NULL)."""
        stmt = (update(ImageRow).where(ImageRow.id == bindparam("row_id"))
                .values({c: bindparam(f"v_{c}") for c in METADATA_COLUMNS}))
        params = [{"row_id": int(i), **{f"v_{c}": meta.get(c) for c in METADATA_COLUMNS}}
                  for i, meta in rows]
        if params:
            with self._write() as conn:
                conn.execute(stmt, params)

    def drop_orphan_embeddings(self) -> int:
        with self._write() as conn:
            used = select(ImageRow.content_hash)
            return conn.execute(delete(EmbeddingRow).where(
                EmbeddingRow.content_hash.not_in(used))).rowcount

    def upsert_texts(self, rows: list[tuple[str, str, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        """Insert (key, text, vector) rows; a key already stored with another text is replaced.

        Returns (the ids of the rows inserted, in order; the ids of the rows they replaced).
        New rows get ids never used before; rows identical to a stored one are skipped.
        """
        keys = [k for k, _, _ in rows]
        with self._write() as conn:
            old = {}
            for chunk in _chunks(keys, 900):
                old.update({r.key: (r.id, r.text) for r in conn.execute(
                    select(TextRow.key, TextRow.id, TextRow.text).where(TextRow.key.in_(chunk)))})
            replaced = [old[k][0] for k, t, _ in rows if k in old and old[k][1] != t]
            fresh = [(k, t, v) for k, t, v in rows if k not in old or old[k][1] != t]
            first = self._last_id(conn, TextRow, "texts_last_id") + 1  # before the deletes
            for chunk in _chunks(replaced, 900):
                conn.execute(delete(TextRow).where(TextRow.id.in_(chunk)))
            if fresh:
                conn.execute(insert(TextRow), [{"id": first + i, "key": k, "text": t,
                                                "vector": to_blob(v)}
                                               for i, (k, t, v) in enumerate(fresh)])
                self._put_meta(conn, "texts_last_id", str(first + len(fresh) - 1))
        return (np.arange(first, first + len(fresh), dtype=np.int64),
                np.asarray(replaced, dtype=np.int64))

    def delete_texts(self, keys: Iterable[str] | None = None) -> np.ndarray:
        """Delete the texts with these keys (all with None); returns their ids."""
        with self._write() as conn:
            if keys is None:
                ids = list(conn.execute(select(TextRow.id)).scalars())
                conn.execute(delete(TextRow))
                return np.asarray(ids, dtype=np.int64)
            ids = []
            for chunk in _chunks(list(keys), 900):
                ids += conn.execute(select(TextRow.id).where(TextRow.key.in_(chunk))).scalars().all()
                conn.execute(delete(TextRow).where(TextRow.key.in_(chunk)))
        return np.asarray(ids, dtype=np.int64)

    def delete_text_ids(self, ids: Iterable[int]) -> None:
        with self._write() as conn:
            for chunk in _chunks([int(i) for i in ids], 900):
                conn.execute(delete(TextRow).where(TextRow.id.in_(chunk)))

    def forget_embeddings(self, hashes: list[str]) -> list[str]:
        """Delete these embeddings and the image rows using them; returns those rows' paths."""
        paths: list[str] = []
        with self._write() as conn:
            for chunk in _chunks(hashes, 900):
                paths += conn.execute(select(ImageRow.path)
                                      .where(ImageRow.content_hash.in_(chunk))).scalars().all()
                conn.execute(delete(ImageRow).where(ImageRow.content_hash.in_(chunk)))
                conn.execute(delete(EmbeddingRow).where(EmbeddingRow.content_hash.in_(chunk)))
        return paths

    def reader(self) -> CatalogReader:
        """A view of this catalog with the queries only (sharing its cache of shard headers)."""
        view = CatalogReader(self._engine, self.path)
        view._shards = self._shards
        return view


class _WriteTxn:
    """``with catalog._write() as conn``: one transaction, storage errors made typed."""

    def __init__(self, engine: Engine, path: Path) -> None:
        self._ctx = engine.begin()
        self._path = path

    def __enter__(self) -> Connection:
        try:
            return self._ctx.__enter__()
        except _DB_ERRORS as exc:
            raise _translate(exc, "write", self._path) from exc

    def __exit__(self, *exc_info) -> bool:
        try:
            self._ctx.__exit__(*exc_info)  # commit, or roll back when the block raised
        except _DB_ERRORS as exc:
            raise _translate(exc, "write", self._path) from exc
        if exc_info[0] is not None and issubclass(exc_info[0], _DB_ERRORS):
            raise _translate(exc_info[1], "write", self._path) from exc_info[1]
        return False


class _ReadConn:
    """``with catalog._read() as conn``: a connection whose SQLite errors are made typed."""

    def __init__(self, engine: Engine, path: Path) -> None:
        self._engine = engine
        self._path = path
        self._conn: Connection | None = None

    def __enter__(self) -> Connection:
        try:
            self._conn = self._engine.connect()
        except _DB_ERRORS as exc:
            raise _translate(exc, "read", self._path) from exc
        return self._conn

    def __exit__(self, *exc_info) -> bool:
        assert self._conn is not None
        try:
            self._conn.close()
        except _DB_ERRORS:
            pass
        if exc_info[0] is not None and issubclass(exc_info[0], _DB_ERRORS):
            raise _translate(exc_info[1], "read", self._path) from exc_info[1]
        if exc_info[0] is not None and issubclass(exc_info[0], (TypeError, ValueError,
                                                                 OverflowError)):
            # only SQLite's typeless storage can hand back a value of another type than the
            # schema's (a string id, a number for a path): the file was damaged
            raise CorruptIndexError(f"catalog {self._path} is damaged (a value of the wrong "
                                    f"type: {exc_info[1]}); see `mmsearch check`") from exc_info[1]
        return False


# what SQLite failures surface as; Python's sqlite3 raises UnicodeDecodeError for text
# (or an error message quoting text) that a damaged file turned into invalid UTF-8
_DB_ERRORS = (DBAPIError, UnicodeDecodeError)

# SQLite primary result codes (https://sqlite.org/rescode.html)
_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_CORRUPT, _SQLITE_NOTADB = 5, 6, 11, 26


def _primary_code(exc: DBAPIError) -> int | None:
    message = str(exc.orig).lower()
    if any(m in message for m in ("malformed", "corrupt", "unsupported file format",
                                  "no such table", "no such column")):
        return _SQLITE_CORRUPT  # the schema is ours and fixed: a damaged one (plain SQLITE_ERROR)
    code = getattr(exc.orig, "sqlite_errorcode", None)  # Python >= 3.11
    if isinstance(code, int):
        return code & 0xFF
    if "not a database" in message:
        return _SQLITE_NOTADB
    if "locked" in message:
        return _SQLITE_BUSY
    return None


def _translate(exc: "DBAPIError | UnicodeDecodeError", doing: str, path: Path) -> MMSearchError:
    """A damaged file is :class:`CorruptIndexError`; any other SQLite failure :class:`StorageError`."""
    if isinstance(exc, UnicodeDecodeError) or "decode to UTF-8" in str(exc.orig):
        return CorruptIndexError(f"catalog {path} is damaged (text that is not UTF-8); "
                                 "see `mmsearch check`")
    if _primary_code(exc) in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
        return CorruptIndexError(f"catalog {path} is damaged ({exc.orig}); "
                                 "see `mmsearch check`")
    return StorageError(f"cannot {doing} the catalog {path}: {exc.orig}{fs_hint(path)}")


_SQLITE_MAGIC = b"SQLite format 3\x00"


def check_sqlite_file(path: Path) -> None:
    """Refuse, before SQLite reads it, a file that is not SQLite or is shorter than its header says.

    A truncated database would otherwise open fine and fail (or return nothing)
    only once a query reaches a missing page. An empty file is accepted: it is
    a new database. While a write-ahead log holds data the size is not judged:
    a checkpoint copies page 1 (with the new size) first and the log still holds
    the pages past the end of the file (a disk that filled up mid-checkpoint
    leaves it so), and SQLite finishes the copy from the log.
    """
    try:
        with open(path, "rb") as f:
            header = f.read(100)
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        return  # a new database
    except OSError as exc:
        raise StorageError(f"cannot read the catalog {path}: {exc.strerror or exc}") from exc
    if not header:
        return
    bad = f"catalog {path} is not a readable SQLite database"
    if len(header) < 100 or not header.startswith(_SQLITE_MAGIC):
        raise CorruptIndexError(f"{bad}: not an SQLite file")
    page_size = struct.unpack(">H", header[16:18])[0]
    page_size = 65536 if page_size == 1 else page_size
    if page_size < 512 or page_size & (page_size - 1):
        raise CorruptIndexError(f"{bad}: invalid page size {page_size}")
    change_counter, pages = struct.unpack(">II", header[24:32])
    valid_for = struct.unpack(">I", header[92:96])[0]
    if valid_for != change_counter or size >= pages * page_size:
        return
    try:
        if path.with_name(path.name + "-wal").stat().st_size > 0:
            return
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise StorageError(f"cannot read the catalog {path}: {exc.strerror or exc}") from exc
    raise CorruptIndexError(f"{bad}: truncated ({size} bytes, its header says "
                            f"{pages * page_size})")


def _under(roots: str | Iterable[str]) -> list[Any]:
    """Conditions on ``images.path``, one per chunk of ``roots`` (a root alone: one), whose
    rows together are the images under them: index ranges, never a term per root in one
    statement (SQLite refuses an expression 1,000 deep)."""
    return sql_under(ImageRow.path, [roots] if isinstance(roots, str) else roots)


def _chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _as_vector(blob: object) -> np.ndarray | None:
    if not isinstance(blob, bytes) or len(blob) % 4:
        return None
    return np.frombuffer(blob, np.float32)


def _damaged(blob: object, dim: int) -> bool:
    vec = _as_vector(blob)
    return vec is None or vec.shape != (dim,) or not bool(np.isfinite(vec).all())
