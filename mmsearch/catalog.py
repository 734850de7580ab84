"""The SQLite catalog: the one module that knows the schema.

The catalog is the source of truth of an index. It holds, through SQLAlchemy 2:
``images`` (one row per path; its ``id`` is the vector's id in FAISS),
``embeddings`` (one float32 vector per distinct file content, so duplicates and
moved files are embedded once), ``texts`` (indexed texts with their vectors) and
``meta`` (schema version, model identity). The FAISS file is a derived cache
that can always be rebuilt from here.

Schema changes go in ``_MIGRATIONS``: bump ``SCHEMA_VERSION`` and add a step.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from sqlalchemy import (ForeignKey, bindparam, Integer, LargeBinary, String, Text, create_engine, delete,
                        event, func, insert, select, text, update)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DatabaseError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from mmsearch.errors import CorruptIndexError, StorageError

SCHEMA_VERSION = 1


class Base(DeclarativeBase):
    pass


class MetaRow(Base):
    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(String, primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class EmbeddingRow(Base):
    __tablename__ = "embeddings"
    content_hash: Mapped[str] = mapped_column(String, primary_key=True)
    vector: Mapped[bytes] = mapped_column(LargeBinary)


class ImageRow(Base):
    __tablename__ = "images"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(Text, unique=True)
    size: Mapped[int] = mapped_column(Integer)
    mtime_ns: Mapped[int] = mapped_column(Integer)
    content_hash: Mapped[str] = mapped_column(ForeignKey("embeddings.content_hash"), index=True)


class TextRow(Base):
    __tablename__ = "texts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(Text, unique=True)
    text: Mapped[str] = mapped_column(Text)
    vector: Mapped[bytes] = mapped_column(LargeBinary)


def _migrate_0_to_1(conn: Connection) -> None:
    Base.metadata.create_all(conn)


# version n -> n + 1; version 0 is an empty file.
_MIGRATIONS: dict[int, Callable[[Connection], None]] = {0: _migrate_0_to_1}


@dataclass(frozen=True)
class StoredImage:
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


def to_blob(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype=np.float32).tobytes()


def from_blobs(blobs: Iterable[bytes], dim: int) -> np.ndarray:
    data = b"".join(blobs)
    if not data:
        return np.zeros((0, dim), dtype=np.float32)
    return np.frombuffer(data, dtype=np.float32).reshape(-1, dim).copy()


class Catalog:
    """One SQLite file. Methods that write run in one transaction each."""

    def __init__(self, path: Path, *, create: bool) -> None:
        if not create and not path.is_file():
            raise CorruptIndexError(f"catalog missing: {path}")
        self.path = path
        self._engine: Engine = create_engine(f"sqlite:///{path}")
        event.listen(self._engine, "connect", _on_connect)
        try:
            self._upgrade()
        except DatabaseError as exc:
            self._engine.dispose()
            raise CorruptIndexError(f"catalog {path} is not a readable SQLite database: "
                                    f"{exc.orig}") from exc

    def close(self) -> None:
        self._engine.dispose()

    # -- schema --------------------------------------------------------------
    def _upgrade(self) -> None:
        with self._engine.begin() as conn:
            version = self._version(conn)
            if version > SCHEMA_VERSION:
                raise CorruptIndexError(
                    f"catalog {self.path} has schema v{version}; this mmsearch reads up to "
                    f"v{SCHEMA_VERSION}: upgrade mmsearch")
            while version < SCHEMA_VERSION:
                _MIGRATIONS[version](conn)
                version += 1
                self._put_meta(conn, "schema_version", str(version))

    @staticmethod
    def _version(conn: Connection) -> int:
        has_meta = conn.execute(text(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'")).first()
        if not has_meta:
            return 0
        row = conn.execute(select(MetaRow.value).where(MetaRow.key == "schema_version")).first()
        return int(row[0]) if row else 0

    @property
    def schema_version(self) -> int:
        with self._engine.connect() as conn:
            return self._version(conn)

    # -- meta ----------------------------------------------------------------
    @staticmethod
    def _put_meta(conn: Connection, key: str, value: str) -> None:
        conn.execute(delete(MetaRow).where(MetaRow.key == key))
        conn.execute(insert(MetaRow).values(key=key, value=value))

    def get_meta(self, key: str) -> str | None:
        with self._engine.connect() as conn:
            row = conn.execute(select(MetaRow.value).where(MetaRow.key == key)).first()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        with self._write() as conn:
            self._put_meta(conn, key, value)

    # -- transactions ----------------------------------------------------------
    def _write(self):
        return _WriteTxn(self._engine)

    # -- images ----------------------------------------------------------------
    def images_under(self, root: str) -> dict[str, StoredImage]:
        """Every stored image whose path is ``root`` or below it."""
        with self._engine.connect() as conn:
            rows = conn.execute(select(ImageRow.id, ImageRow.path, ImageRow.size,
                                       ImageRow.mtime_ns, ImageRow.content_hash)
                                .where(_under(root)))
            return {r.path: StoredImage(*r) for r in rows}

    def image_ids_under(self, root: str) -> np.ndarray:
        with self._engine.connect() as conn:
            ids = conn.execute(select(ImageRow.id).where(_under(root))).scalars().all()
        return np.asarray(ids, dtype=np.int64)

    def image_paths(self, ids: Iterable[int]) -> dict[int, str]:
        ids = list(ids)
        out: dict[int, str] = {}
        with self._engine.connect() as conn:
            for chunk in _chunks(ids, 900):
                rows = conn.execute(select(ImageRow.id, ImageRow.path).where(ImageRow.id.in_(chunk)))
                out.update({r.id: r.path for r in rows})
        return out

    def known_vectors(self, hashes: Iterable[str], dim: int) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        with self._engine.connect() as conn:
            for chunk in _chunks(list(set(hashes)), 900):
                rows = conn.execute(select(EmbeddingRow.content_hash, EmbeddingRow.vector)
                                    .where(EmbeddingRow.content_hash.in_(chunk)))
                out.update({r.content_hash: np.frombuffer(r.vector, np.float32).copy() for r in rows})
        return {h: v for h, v in out.items() if v.shape == (dim,)}

    def next_image_id(self) -> int:
        with self._engine.connect() as conn:
            return int(conn.execute(select(func.coalesce(func.max(ImageRow.id), 0))).scalar()) + 1

    def commit_images(self, new_vectors: dict[str, np.ndarray], upserts: list[StoredImage],
                      delete_ids: Iterable[int] = ()) -> None:
        """One transaction: store new embeddings, insert/replace image rows, delete rows."""
        delete_ids = [int(i) for i in delete_ids]
        with self._write() as conn:
            if new_vectors:
                conn.execute(insert(EmbeddingRow).prefix_with("OR IGNORE"),
                             [{"content_hash": h, "vector": to_blob(v)} for h, v in new_vectors.items()])
            for chunk in _chunks(delete_ids + [u.id for u in upserts], 900):
                conn.execute(delete(ImageRow).where(ImageRow.id.in_(chunk)))
            if upserts:
                conn.execute(insert(ImageRow), [u.__dict__ for u in upserts])

    def touch_images(self, rows: list[StoredImage]) -> None:
        """Record a new size/mtime for files whose content did not change."""
        if rows:
            with self._write() as conn:
                stmt = (update(ImageRow).where(ImageRow.id == bindparam("row_id"))
                        .values(size=bindparam("new_size"), mtime_ns=bindparam("new_mtime")))
                conn.execute(stmt, [{"row_id": r.id, "new_size": r.size, "new_mtime": r.mtime_ns}
                                    for r in rows])

    def drop_orphan_embeddings(self) -> int:
        with self._write() as conn:
            used = select(ImageRow.content_hash)
            return conn.execute(delete(EmbeddingRow).where(
                EmbeddingRow.content_hash.not_in(used))).rowcount

    def image_vectors(self, dim: int, ids: Iterable[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of stored images, all or the given ids, ordered by id."""
        query = (select(ImageRow.id, EmbeddingRow.vector)
                 .join(EmbeddingRow, ImageRow.content_hash == EmbeddingRow.content_hash)
                 .order_by(ImageRow.id))
        return self._vectors(query, ImageRow.id, dim, ids)

    def _vectors(self, query, id_col, dim: int, ids: Iterable[int] | None):
        chunks = [None] if ids is None else list(_chunks(sorted({int(i) for i in ids}), 900))
        out_ids: list[int] = []
        blobs: list[bytes] = []
        with self._engine.connect() as conn:
            for chunk in chunks:
                q = query if chunk is None else query.where(id_col.in_(chunk))
                for r in conn.execute(q):
                    out_ids.append(r[0])
                    blobs.append(r[1])
        return np.asarray(out_ids, dtype=np.int64), from_blobs(blobs, dim)

    def image_count(self) -> int:
        with self._engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(ImageRow)).scalar())

    def embedding_count(self) -> int:
        with self._engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(EmbeddingRow)).scalar())

    def all_image_ids(self) -> np.ndarray:
        with self._engine.connect() as conn:
            return np.asarray(conn.execute(select(ImageRow.id)).scalars().all(), dtype=np.int64)

    def all_image_paths(self) -> Iterator[tuple[int, str]]:
        with self._engine.connect() as conn:
            yield from conn.execute(select(ImageRow.id, ImageRow.path).order_by(ImageRow.id))

    # -- texts -----------------------------------------------------------------
    def upsert_texts(self, rows: list[tuple[str, str, np.ndarray]]) -> tuple[int, int, int]:
        """Insert (key, text, vector) rows; a key already stored with another text is replaced.

        Returns the ids that were (added, replaced) as counts plus the first new id.
        """
        keys = [k for k, _, _ in rows]
        with self._write() as conn:
            old = {}
            for chunk in _chunks(keys, 900):
                old.update({r.key: (r.id, r.text) for r in conn.execute(
                    select(TextRow.key, TextRow.id, TextRow.text).where(TextRow.key.in_(chunk)))})
            replaced = [old[k][0] for k, t, _ in rows if k in old and old[k][1] != t]
            for chunk in _chunks(replaced, 900):
                conn.execute(delete(TextRow).where(TextRow.id.in_(chunk)))
            fresh = [(k, t, v) for k, t, v in rows if k not in old or old[k][1] != t]
            if fresh:
                conn.execute(insert(TextRow), [{"key": k, "text": t, "vector": to_blob(v)}
                                               for k, t, v in fresh])
        return len(fresh) - len(replaced), len(replaced), len(rows) - len(fresh)

    def text_keys(self) -> set[tuple[str, str]]:
        with self._engine.connect() as conn:
            return {(r.key, r.text) for r in conn.execute(select(TextRow.key, TextRow.text))}

    def text_vectors(self, dim: int, ids: Iterable[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        query = select(TextRow.id, TextRow.vector).order_by(TextRow.id)
        return self._vectors(query, TextRow.id, dim, ids)

    def texts_by_id(self, ids: Iterable[int]) -> dict[int, tuple[str, str]]:
        out: dict[int, tuple[str, str]] = {}
        with self._engine.connect() as conn:
            for chunk in _chunks(list(ids), 900):
                rows = conn.execute(select(TextRow.id, TextRow.key, TextRow.text)
                                    .where(TextRow.id.in_(chunk)))
                out.update({r.id: (r.key, r.text) for r in rows})
        return out

    def text_count(self) -> int:
        with self._engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(TextRow)).scalar())

    def all_text_ids(self) -> np.ndarray:
        with self._engine.connect() as conn:
            return np.asarray(conn.execute(select(TextRow.id)).scalars().all(), dtype=np.int64)

    def delete_texts(self, keys: Iterable[str] | None = None) -> int:
        with self._write() as conn:
            if keys is None:
                return conn.execute(delete(TextRow)).rowcount
            return sum(conn.execute(delete(TextRow).where(TextRow.key.in_(c))).rowcount
                       for c in _chunks(list(keys), 900))

    def integrity_problems(self) -> list[str]:
        with self._engine.connect() as conn:
            rows = conn.execute(text("PRAGMA integrity_check")).scalars().all()
        return [] if rows == ["ok"] else [f"sqlite: {r}" for r in rows]


class _WriteTxn:
    """``with catalog._write() as conn``: one transaction, storage errors made typed."""

    def __init__(self, engine: Engine) -> None:
        self._ctx = engine.begin()

    def __enter__(self) -> Connection:
        try:
            return self._ctx.__enter__()
        except OperationalError as exc:
            raise StorageError(f"cannot write the catalog: {exc.orig}") from exc

    def __exit__(self, *exc_info) -> bool:
        try:
            self._ctx.__exit__(*exc_info)
        except OperationalError as exc:
            raise StorageError(f"cannot write the catalog: {exc.orig}") from exc
        if exc_info[0] is not None and issubclass(exc_info[0], OperationalError):
            raise StorageError(f"cannot write the catalog: {exc_info[1].orig}") from exc_info[1]
        return False


def _under(root: str):
    """Paths equal to ``root`` or inside it, as a range on the unique index ('/' + 1 == '0')."""
    root = root.rstrip("/") or "/"
    if root == "/":
        return ImageRow.path.startswith("/")
    return (ImageRow.path == root) | ((ImageRow.path >= root + "/") & (ImageRow.path < root + "0"))


def _chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def bad_embeddings(catalog: Catalog, dim: int) -> list[str]:
    """Content hashes whose stored vector has the wrong length or is not finite."""
    bad = []
    with catalog._engine.connect() as conn:
        for h, blob in conn.execute(select(EmbeddingRow.content_hash, EmbeddingRow.vector)):
            vec = np.frombuffer(blob, np.float32) if len(blob) % 4 == 0 else None
            if vec is None or vec.shape != (dim,) or not np.isfinite(vec).all():
                bad.append(h)
    return bad


def forget_embeddings(catalog: Catalog, hashes: list[str]) -> list[str]:
    """Delete these embeddings and the image rows using them; returns those rows' paths."""
    paths: list[str] = []
    with catalog._write() as conn:
        for chunk in _chunks(hashes, 900):
            paths += conn.execute(select(ImageRow.path)
                                  .where(ImageRow.content_hash.in_(chunk))).scalars().all()
            conn.execute(delete(ImageRow).where(ImageRow.content_hash.in_(chunk)))
            conn.execute(delete(EmbeddingRow).where(EmbeddingRow.content_hash.in_(chunk)))
    return paths
