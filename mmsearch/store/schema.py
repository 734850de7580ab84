"""The catalog's schema: its tables, their versions and migrations, and how a vector is a blob.

The catalog holds, through SQLAlchemy 2: ``images`` (one row per path; its ``id`` is the
vector's id in FAISS), ``embeddings`` (one float32 vector per distinct file content, so
duplicates and moved files are embedded once), ``texts`` (indexed texts with their
vectors) and ``meta`` (schema version, model identity).

Schema changes go in :data:`MIGRATIONS`: bump ``SCHEMA_VERSION`` and add a step.
v1: the tables above. v2: the stored model identity names its backend and its
text tower (``backend``, ``text_pretrained``, ``text_fingerprint``). v3: image
rows carry the photo's metadata (date taken, camera, lens, GPS, size after
orientation, extension; :data:`METADATA_COLUMNS`). v4: an index records its *storage*
(meta ``storage``: ``catalog``, every index before v4, or ``shards``); in an index stored
as ``shards`` an embedding row holds no vector (an empty blob) but where it lies, shard
``k`` row ``r`` of an npy file (``shard``, ``shard_row``; see :mod:`.storage`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
from sqlalchemy import Float, ForeignKey, Integer, LargeBinary, String, Text, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

SCHEMA_VERSION = 4
STORAGE = "storage"  # meta: where image vectors are kept (storage.STORAGES)


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


FILE_COLUMNS = ("id", "path", "size", "mtime_ns", "content_hash")
# the photo metadata columns, in the table's order: what export, hits and filters read
METADATA_COLUMNS = tuple(c.key for c in ImageRow.__table__.columns if c.key not in FILE_COLUMNS)
# the image columns by the type their values take outside SQLite (export, Ray status files)
INTEGER_COLUMNS = frozenset(c.key for c in ImageRow.__table__.columns if isinstance(c.type, Integer))
FLOAT_COLUMNS = frozenset(c.key for c in ImageRow.__table__.columns if isinstance(c.type, Float))


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
MIGRATIONS: dict[int, Callable[[Connection], None]] = {0: _migrate_0_to_1, 1: _migrate_1_to_2,
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


def to_blob(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype=np.float32).tobytes()


def from_blobs(blobs: Iterable[bytes], dim: int) -> np.ndarray:
    data = b"".join(blobs)
    if not data:
        return np.zeros((0, dim), dtype=np.float32)
    return np.frombuffer(data, dtype=np.float32).reshape(-1, dim).copy()


def damaged_blob(blob: object, dim: int) -> bool:
    """Whether a stored blob is not ``dim`` finite float32 values."""
    vec = _as_vector(blob)
    return vec is None or vec.shape != (dim,) or not bool(np.isfinite(vec).all())


def _as_vector(blob: object) -> np.ndarray | None:
    if not isinstance(blob, bytes) or len(blob) % 4:
        return None
    return np.frombuffer(blob, np.float32)
