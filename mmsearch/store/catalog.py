"""The SQLite catalog: the queries and writes of an index's source of truth.

The catalog is the source of truth of an index (its tables: :mod:`.schema`; its file and
connections: :mod:`.sqlite`). The FAISS file is a derived cache that can always be
rebuilt from here; how image vectors are read depends on the index's storage, the
:class:`~mmsearch.store.storage.VectorSource` the catalog picks when it opens.

Ids are never reused (the highest one given out is kept in ``meta``), so an id
names one vector for ever: a FAISS file left behind by a crash is stale only in
which ids it holds, never in what an id means. Every SQLite failure leaves this
module typed: :class:`CorruptIndexError` for a damaged file (checked before
SQLite opens it: header, truncation), :class:`StorageError` for the rest.

:class:`CatalogReader` has every query and no write; :class:`Catalog` adds the
writes, which only :class:`mmsearch.store.Store` calls.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
from sqlalchemy import bindparam, delete, func, insert, select, text, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, OperationalError

from mmsearch.errors import CorruptIndexError, MMSearchError
from mmsearch.locations import sql_under
from mmsearch.models.identity import ModelIdentity
from mmsearch.store.schema import (METADATA_COLUMNS, MIGRATIONS, READABLE_UNMIGRATED, SCHEMA_VERSION,
                                   STORAGE, EmbeddingRow, ImageFile, ImageRow, MetaRow, StoredImage,
                                   TextRow, VideoFile, VideoRow, damaged_blob, to_blob)
from mmsearch.store.sqlite import (SQLITE_BUSY, SQLITE_LOCKED, ReadConn, WriteTxn, check_sqlite_file,
                                   chunks, frozen, make_engine, primary_code, typed_error)
from mmsearch.store.storage import VectorSource, vector_source

__all__ = ["Catalog", "CatalogReader", "EmptyCatalogError", "ImageFile", "StoredImage",
           "METADATA_COLUMNS", "SCHEMA_VERSION"]


def _vector_select(kind: str, located: tuple[Any, ...] = ()) -> tuple[Any, Any]:
    """(SELECT id, vector[, located...] ... ORDER BY id, the id column) for ``kind``: images
    (with the columns saying where a vector lies, :attr:`VectorSource.located`) or texts."""
    if kind == "images":
        return (select(ImageRow.id, EmbeddingRow.vector, *located)
                .join(EmbeddingRow, ImageRow.content_hash == EmbeddingRow.content_hash)
                .order_by(ImageRow.id)), ImageRow.id
    return select(TextRow.id, TextRow.vector).order_by(TextRow.id), TextRow.id


class EmptyCatalogError(CorruptIndexError):
    """The catalog file exists but holds no schema: nothing was ever committed to it."""


class _Held:
    """The catalog's vector source, shared with its readers' views: a new index records its
    storage after the catalog opened, a reader sees one recorded by another process."""

    def __init__(self, source: VectorSource) -> None:
        self.source = source


class CatalogReader:
    """Every query of one SQLite catalog, and no write: what readers outside the store get.

    Every SQLite failure leaves this class as a typed error: a damaged file as
    :class:`CorruptIndexError`, anything else (disk full, read-only, I/O) as
    :class:`StorageError`.
    """

    def __init__(self, engine: Engine, path: Path, held: _Held) -> None:
        self._engine = engine
        self.path = path
        self._held = held

    @property
    def vector_source(self) -> VectorSource:
        """How this index keeps its image vectors (its storage; :mod:`.storage`)."""
        return self._held.source

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
        """Where the image vectors are kept: ``catalog`` or ``shards`` (see :mod:`.storage`)."""
        return self.vector_source.name

    def recorded_dim(self) -> int | None:
        """The vectors' dimension as recorded with the model (None: none recorded yet)."""
        raw = self.get_meta("dim")
        if not raw:
            return None
        if not raw.isdigit() or int(raw) < 1:
            raise CorruptIndexError(f"catalog {self.path}: invalid dimension {raw!r}")
        return int(raw)

    def recorded_model(self) -> ModelIdentity | None:
        """The model the index was built with; None until one is recorded with its dimension."""
        raw = self.get_meta("model")
        if not raw or self.recorded_dim() is None:
            return None
        try:
            return ModelIdentity.from_json(raw)
        except (ValueError, TypeError) as exc:
            raise CorruptIndexError(f"catalog {self.path}: the model record is "
                                    f"unreadable ({exc})") from None

    def _read(self) -> "ReadConn":
        return ReadConn(self._engine, self.path)

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
        """Every stored image file (not a video's frame) whose path is one of ``roots`` or
        below one (:func:`mmsearch.locations.sql_under`: one query per chunk of roots)."""
        out: dict[str, StoredImage] = {}
        with self._read() as conn:
            for condition in _under(roots):
                rows = conn.execute(select(ImageRow.id, ImageRow.path, ImageRow.size,
                                           ImageRow.mtime_ns, ImageRow.content_hash)
                                    .where(condition, ImageRow.video_id.is_(None)))
                out.update({self.as_text(r.path): StoredImage(*r) for r in rows})
        return out

    def videos_under(self, roots: str | Iterable[str]) -> dict[str, StoredImage]:
        """Every stored video file under ``roots``, as :meth:`images_under` (video ids)."""
        out: dict[str, StoredImage] = {}
        with self._read() as conn:
            for condition in _under(roots, VideoRow.path):
                rows = conn.execute(select(VideoRow.id, VideoRow.path, VideoRow.size,
                                           VideoRow.mtime_ns, VideoRow.content_hash)
                                    .where(condition))
                out.update({self.as_text(r.path): StoredImage(*r) for r in rows})
        return out

    def frame_ids(self, video_ids: Iterable[int]) -> np.ndarray:
        """The image ids of these videos' frames, sorted."""
        ids: list[tuple[int]] = []
        with self._read() as conn:  # (plain SQL: a video has thousands of frames)
            for chunk in chunks([int(i) for i in video_ids], 900):
                ids += conn.exec_driver_sql(
                    f"SELECT id FROM images WHERE video_id IN ({','.join('?' * len(chunk))})",
                    tuple(chunk)).fetchall()
        return np.sort(np.asarray([i for i, in ids], dtype=np.int64))

    def frames(self) -> tuple[np.ndarray, np.ndarray]:
        """(image ids, their video ids) of every video frame, in image id order."""
        with self._read() as conn:  # (plain SQL: rows by the hundred thousand)
            rows = conn.exec_driver_sql("SELECT id, video_id FROM images WHERE video_id IS NOT "
                                        "NULL ORDER BY id").fetchall()
        pairs = np.asarray(rows, dtype=np.int64).reshape(-1, 2)
        return pairs[:, 0], pairs[:, 1]

    def videos_by_id(self, ids: Iterable[int]) -> dict[int, dict[str, Any]]:
        """id -> the ``videos`` row (path, duration, codec...) of these videos."""
        out: dict[int, dict[str, Any]] = {}
        with self._read() as conn:
            for chunk in chunks(sorted({int(i) for i in ids}), 900):
                for r in conn.execute(select(VideoRow).where(VideoRow.id.in_(chunk))):
                    row = {c.key: getattr(r, c.key) for c in VideoRow.__table__.columns}
                    out[row["id"]] = {**row, "path": self.as_text(row["path"])}
        return out

    def frames_of(self, video_id: int, near: tuple[float, int] | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(ids, start_s, end_s, time_s) of one video's frames, in time order: all, or
        ``near=(seconds, n)``: the n before that time and the n from it on."""
        query = select(ImageRow.id, ImageRow.start_s, ImageRow.end_s,
                       ImageRow.time_s).where(ImageRow.video_id == video_id)
        with self._read() as conn:
            if near is None:
                rows = conn.execute(query.order_by(ImageRow.time_s)).all()
            else:
                at, n = near
                rows = conn.execute(query.where(ImageRow.time_s < at)
                                    .order_by(ImageRow.time_s.desc()).limit(n)).all()[::-1]
                rows += conn.execute(query.where(ImageRow.time_s >= at)
                                     .order_by(ImageRow.time_s).limit(n)).all()
        cols = list(zip(*rows)) if rows else [(), (), (), ()]
        return (np.asarray(cols[0], dtype=np.int64),
                *(np.asarray(c, dtype=np.float64) for c in cols[1:]))

    def video_count(self) -> int:
        with self._read() as conn:
            return int(conn.execute(select(func.count()).select_from(VideoRow)).scalar())

    def distinct_photo_count(self) -> int:
        """How many distinct contents the photos (not the frames) have."""
        with self._read() as conn:
            return int(conn.execute(select(func.count(func.distinct(ImageRow.content_hash)))
                                    .where(ImageRow.video_id.is_(None))).scalar())

    def frame_count(self) -> int:
        """How many image rows are videos' frames."""
        with self._read() as conn:
            return int(conn.execute(select(func.count()).select_from(ImageRow)
                                    .where(ImageRow.video_id.is_not(None))).scalar())

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
            for chunk in chunks(list(paths), 900):
                rows = conn.execute(select(ImageRow.id, ImageRow.path, ImageRow.size,
                                           ImageRow.mtime_ns, ImageRow.content_hash)
                                    .where(ImageRow.path.in_(chunk)))
                out.update({self.as_text(r.path): StoredImage(*r) for r in rows})
        return out

    def image_paths(self, ids: Iterable[int]) -> dict[int, str]:
        ids = [int(i) for i in ids]
        out: dict[int, str] = {}
        with self._read() as conn:
            for chunk in chunks(ids, 900):
                rows = conn.execute(select(ImageRow.id, ImageRow.path).where(ImageRow.id.in_(chunk)))
                out.update({r.id: self.as_text(r.path) for r in rows})
        return out

    def as_text(self, value: object) -> str:
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
        source = self.vector_source
        with self._read() as conn:
            for chunk in chunks(list(set(hashes)), 900):
                for r in conn.execute(select(EmbeddingRow.content_hash, EmbeddingRow.vector,
                                             *source.located)
                                      .where(EmbeddingRow.content_hash.in_(chunk))):
                    keys.append(r[0])
                    blobs.append(r[1])
                    places.append(source.place(r[2:]))
        good = [i for i, (b, p) in enumerate(zip(blobs, places)) if p or not damaged_blob(b, dim)]
        vectors = source.assemble([blobs[i] for i in good], [places[i] for i in good], dim)
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
        parts = [None] if ids is None else list(chunks(sorted({int(i) for i in ids}), 900))
        out_ids: list[int] = []
        blobs: list[Any] = []
        places: list[tuple[int, int] | None] = []
        size = 4 * dim
        damaged = 0
        source = self.vector_source
        located = source.located if kind == "images" else ()  # (texts: always in their blobs)
        with self._read() as conn:
            query, id_col = _vector_select(kind, located)
            if after is not None:
                query = query.where(id_col > after)
            for chunk in parts:
                q = query if chunk is None else query.where(id_col.in_(chunk))
                for r in conn.execute(q if limit is None else q.limit(limit)):
                    out_ids.append(r[0])
                    blobs.append(r[1])
                    place = source.place(r[2:]) if located else None  # (per row: kept cheap)
                    places.append(place)
                    damaged += place is None and (not isinstance(r[1], bytes)
                                                  or len(r[1]) != size or not size)
            if damaged:
                raise CorruptIndexError(f"catalog {self.path} holds {damaged} damaged vectors: "
                                        "run `mmsearch check --repair`")
        return np.asarray(out_ids, dtype=np.int64), source.assemble(blobs, places, dim)

    def shard_locations(self) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(shard, image ids, rows) of the images whose vectors lie in npy shards, a shard
        at a time (an index stored as shards; none otherwise): what a build on a cluster
        hands its tasks, which read the vectors themselves."""
        with self._read() as conn:
            yield from self.vector_source.locations(conn)

    def image_parts(self, dim: int, size: int) -> tuple[int, Iterator[Any]]:
        """(how many, the parts) of the image vectors a build on a cluster adds, each read
        where it is built (``part.read()``: ids, vectors); see :meth:`VectorSource.parts`."""
        return self.vector_source.parts(self, dim, size)

    def shard_count(self) -> int:
        """How many npy shards hold vectors the catalog points to."""
        with self._read() as conn:
            return self.vector_source.shard_count(conn)

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
                yield i, self.as_text(path)

    def text_keys(self) -> set[tuple[str, str]]:
        with self._read() as conn:
            return {(r.key, r.text) for r in conn.execute(select(TextRow.key, TextRow.text))}

    def text_vectors(self, dim: int, ids: Iterable[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        return self._vectors("texts", dim, ids)

    def texts_by_id(self, ids: Iterable[int]) -> dict[int, tuple[str, str]]:
        out: dict[int, tuple[str, str]] = {}
        with self._read() as conn:
            for chunk in chunks([int(i) for i in ids], 900):
                rows = conn.execute(select(TextRow.id, TextRow.key, TextRow.text)
                                    .where(TextRow.id.in_(chunk)))
                out.update({r.id: (self.as_text(r.key), self.as_text(r.text)) for r in rows})
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
            return self.vector_source.damaged(conn, dim)

    def damaged_texts(self, dim: int) -> dict[int, tuple[str, str]]:
        """Texts whose stored vector has the wrong length or is not finite: id -> (key, text)."""
        with self._read() as conn:
            rows = conn.execute(select(TextRow.id, TextRow.key, TextRow.text, TextRow.vector))
            return {i: (key, txt) for i, key, txt, blob in rows if damaged_blob(blob, dim)}

    def vector_sizes(self) -> dict[int, int]:
        """Byte length -> how many stored vectors (images and texts) have it."""
        sizes: dict[int, int] = {}
        with self._read() as conn:
            for table in self.vector_source.vector_tables:
                for size, n in conn.exec_driver_sql(
                        f"SELECT length(vector), count(*) FROM {table} GROUP BY 1"):
                    sizes[int(size or 0)] = sizes.get(int(size or 0), 0) + n
        return sizes

    def connect(self) -> "ReadConn":
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
        self._held = _Held(vector_source(None, path.parent))
        check_sqlite_file(path)
        self._engine: Engine = make_engine(path)
        try:
            try:
                self._upgrade(require_schema)
            except DBAPIError as exc:
                if create or not frozen(path) or isinstance(typed_error(exc, "", path),
                                                            CorruptIndexError):
                    raise
                # a reader on a read-only or full file system, where SQLite cannot create the
                # WAL index (-shm): nobody can be writing, so read the file as it is
                self._engine.dispose()
                self._engine = make_engine(path, immutable=True)
                self._upgrade(require_schema, migrate=False)
            self.reread_storage()
        except (DBAPIError, UnicodeDecodeError) as exc:
            self._engine.dispose()
            error = typed_error(exc, "open", path)
            if isinstance(error, CorruptIndexError):
                error = CorruptIndexError(f"catalog {path} is not a readable SQLite database: "
                                          f"{getattr(exc, 'orig', exc)}")
            raise error from exc
        except MMSearchError:
            self._engine.dispose()
            raise

    def close(self) -> None:
        self._engine.dispose()

    def reread_storage(self) -> None:
        """Pick the vector source of the storage recorded now (a new index records it with
        its model, after the catalog opened; another process may have)."""
        self._use_storage(self.get_meta(STORAGE))

    def _use_storage(self, name: str | None) -> None:
        source = vector_source(name, self.path.parent)
        if type(source) is not type(self._held.source):  # (a source keeps caches: keep it)
            self._held.source = source

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
                        MIGRATIONS[version](conn)
                        version += 1
                        self._put_meta(conn, "schema_version", str(version))
                return
            except OperationalError as exc:
                # Two processes creating the same new index: the loser's snapshot is stale
                # (SQLITE_BUSY_SNAPSHOT) or the lock is held; look again once it has committed.
                if primary_code(exc) not in (SQLITE_BUSY, SQLITE_LOCKED) or attempt == 99:
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
        if STORAGE in values:
            self._use_storage(values[STORAGE])

    def revector_texts(self, vectors: dict[int, np.ndarray], metas: dict[str, str]) -> None:
        """One transaction: new vectors for these text ids, and these meta keys."""
        with self._write() as conn:
            if vectors:
                conn.execute(update(TextRow).where(TextRow.id == bindparam("tid"))
                             .values(vector=bindparam("vec")),
                             [{"tid": i, "vec": to_blob(v)} for i, v in vectors.items()])
            for key, value in metas.items():
                self._put_meta(conn, key, value)

    def _write(self) -> "WriteTxn":
        return WriteTxn(self._engine, self.path)

    def commit_images(self, new_vectors: dict[str, np.ndarray], files: list[ImageFile],
                      delete_ids: Iterable[int] = (), ids: Iterable[int] | None = None,
                      locations: dict[str, tuple[int, int]] | None = None,
                      video: VideoFile | None = None,
                      replaces_video: int | None = None) -> np.ndarray:
        """One transaction: store new embeddings (``locations``: content hash -> (shard, row)
        of vectors kept in npy shards), add rows for ``files`` under fresh ids
        (returned, in order; ``ids``: ids reserved before, see ``reserve_image_ids``),
        delete the rows ``delete_ids``. A content already stored keeps its vector.
        ``video``: ``files`` are its frames; its row is added (replacing the video row
        ``replaces_video``) in the same transaction."""
        delete_ids = [int(i) for i in delete_ids]
        with self._write() as conn:
            if video is not None:
                video_id = self._last_id(conn, VideoRow, "videos_last_id") + 1
                if replaces_video is not None:
                    conn.execute(delete(VideoRow).where(VideoRow.id == replaces_video))
                conn.execute(insert(VideoRow), [video.row(video_id)])
                self._put_meta(conn, "videos_last_id", str(video_id))
                files = [ImageFile(f.path, f.size, f.mtime_ns, f.content_hash,
                                   {**f.meta, "video_id": video_id}) for f in files]
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
            for chunk in chunks(delete_ids, 900):
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
        """Record path, size and mtime of rows whose content did not change (touched or
        moved files)."""
        if rows:
            with self._write() as conn:
                stmt = (update(ImageRow).where(ImageRow.id == bindparam("row_id"))
                        .values(path=bindparam("new_path"), size=bindparam("new_size"),
                                mtime_ns=bindparam("new_mtime")))
                conn.execute(stmt, [{"row_id": r.id, "new_path": r.path, "new_size": r.size,
                                     "new_mtime": r.mtime_ns} for r in rows])

    def move_videos(self, rows: list[StoredImage]) -> None:
        """Record path, size and mtime of videos whose content did not change (touched or
        moved): a moved video's frames follow it (their paths are its own plus ``#t=``)."""
        with self._write() as conn:
            for r in rows:
                old = conn.execute(select(VideoRow.path).where(VideoRow.id == r.id)).scalar()
                conn.execute(update(VideoRow).where(VideoRow.id == r.id)
                             .values(path=r.path, size=r.size, mtime_ns=r.mtime_ns))
                if old is not None and old != r.path:
                    conn.execute(update(ImageRow).where(ImageRow.video_id == r.id)
                                 .values(path=r.path + func.substr(ImageRow.path, len(old) + 1)))

    def delete_videos(self, ids: Iterable[int]) -> None:
        """Delete these video rows (their frames are image rows, forgotten as images)."""
        with self._write() as conn:
            for chunk in chunks([int(i) for i in ids], 900):
                conn.execute(delete(VideoRow).where(VideoRow.id.in_(chunk)))

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
            for chunk in chunks(keys, 900):
                old.update({r.key: (r.id, r.text) for r in conn.execute(
                    select(TextRow.key, TextRow.id, TextRow.text).where(TextRow.key.in_(chunk)))})
            replaced = [old[k][0] for k, t, _ in rows if k in old and old[k][1] != t]
            fresh = [(k, t, v) for k, t, v in rows if k not in old or old[k][1] != t]
            first = self._last_id(conn, TextRow, "texts_last_id") + 1  # before the deletes
            for chunk in chunks(replaced, 900):
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
            for chunk in chunks(list(keys), 900):
                ids += conn.execute(select(TextRow.id).where(TextRow.key.in_(chunk))).scalars().all()
                conn.execute(delete(TextRow).where(TextRow.key.in_(chunk)))
        return np.asarray(ids, dtype=np.int64)

    def delete_text_ids(self, ids: Iterable[int]) -> None:
        with self._write() as conn:
            for chunk in chunks([int(i) for i in ids], 900):
                conn.execute(delete(TextRow).where(TextRow.id.in_(chunk)))

    def forget_embeddings(self, hashes: list[str]) -> list[str]:
        """Delete these embeddings and the image rows using them; returns those rows' paths."""
        paths: list[str] = []
        with self._write() as conn:
            for chunk in chunks(hashes, 900):
                paths += conn.execute(select(ImageRow.path)
                                      .where(ImageRow.content_hash.in_(chunk))).scalars().all()
                conn.execute(delete(ImageRow).where(ImageRow.content_hash.in_(chunk)))
                conn.execute(delete(EmbeddingRow).where(EmbeddingRow.content_hash.in_(chunk)))
        return paths

    def reader(self) -> CatalogReader:
        """A view of this catalog with the queries only (sharing its vector source)."""
        return CatalogReader(self._engine, self.path, self._held)


def _under(roots: str | Iterable[str], column: Any = ImageRow.path) -> list[Any]:
    """Conditions on ``column`` (``images.path``), one per chunk of ``roots`` (a root alone:
    one), whose rows together are those under them: index ranges, never a term per root in
    one statement (SQLite refuses an expression 1,000 deep)."""
    return sql_under(column, [roots] if isinstance(roots, str) else roots)
