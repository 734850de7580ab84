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
``k`` row ``r`` of an npy file (``shard``, ``shard_row``; see :mod:`.storage`). v5:
videos. A ``videos`` row is a video file (its path, size, mtime, content hash and what
the container says: duration, frame rate, size, codec, rotation, creation time); its
sampled frames are ``images`` rows (an id and a vector in the same FAISS index as the
photos) with ``video_id``, the span of the video they stand for (``start_s`` to
``end_s``) and the time of the frame (``time_s``). A frame row's path is the video's with
a media fragment, ``clip.mp4#t=12.000`` (paths stay unique), its content hash the video's
with the same fragment, and its metadata the video's (taken, size, extension).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
from sqlalchemy import Float, ForeignKey, Index, Integer, LargeBinary, String, Text, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

SCHEMA_VERSION = 5
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
    # v5: a video's frame (NULL for a photo): which video, the span it stands for, its time
    video_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    start_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    end_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    time_s: Mapped[float | None] = mapped_column(Float, nullable=True)

    # a video's frames in time order: a moment's neighbours are an index range
    __table_args__ = (Index("ix_images_video_time", "video_id", "time_s"),)


class VideoRow(Base):
    """v5: a video file; its frames are image rows (``ImageRow.video_id``)."""

    __tablename__ = "videos"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(Text, unique=True)
    size: Mapped[int] = mapped_column(Integer)
    mtime_ns: Mapped[int] = mapped_column(Integer)
    content_hash: Mapped[str] = mapped_column(Text, index=True)
    duration: Mapped[float] = mapped_column(Float)
    fps: Mapped[float | None] = mapped_column(Float, nullable=True)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    codec: Mapped[str] = mapped_column(Text)
    rotation: Mapped[int] = mapped_column(Integer)
    taken: Mapped[str | None] = mapped_column(Text, nullable=True)
    frames: Mapped[int] = mapped_column(Integer)


FRAME_COLUMNS = ("video_id", "start_s", "end_s", "time_s")
VIDEO_COLUMNS = tuple(c.key for c in VideoRow.__table__.columns if c.key != "id")
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
    _add_columns(conn, "images", ("taken", "taken_offset", "taken_source", "camera_make",
                                  "camera_model", "lens", "gps_lat", "gps_lon", "width",
                                  "height", "orientation", "ext"))
    conn.exec_driver_sql("CREATE INDEX IF NOT EXISTS ix_images_taken ON images (taken)")


def _add_columns(conn: Connection, table: str, columns: Iterable[str]) -> None:
    """Add these columns of the ORM's ``table`` that the file lacks (a file made whole by
    create_all has them), with the ORM's types."""
    have = {row[1] for row in conn.exec_driver_sql(f"PRAGMA table_info({table})")}
    for column in columns:
        if column not in have:
            kind = Base.metadata.tables[table].columns[column].type.compile(conn.dialect)
            conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")


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


def _migrate_4_to_5(conn: Connection) -> None:
    """Videos: the ``videos`` table, and image rows that can be a video's frames (every
    row of an older index is a photo: the new columns stay NULL)."""
    _add_columns(conn, "images", FRAME_COLUMNS)
    conn.exec_driver_sql("CREATE INDEX IF NOT EXISTS ix_images_video_time "
                         "ON images (video_id, time_s)")
    Base.metadata.create_all(conn, tables=[VideoRow.__table__])


# version n -> n + 1; version 0 is an empty file.
MIGRATIONS: dict[int, Callable[[Connection], None]] = {0: _migrate_0_to_1, 1: _migrate_1_to_2,
                                                        2: _migrate_2_to_3, 3: _migrate_3_to_4,
                                                        4: _migrate_4_to_5}
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
class VideoFile:
    """A video file as found on disk and probed: what a new ``videos`` row records.
    ``info``: values of :data:`VIDEO_COLUMNS` beyond the file's (duration, fps, width,
    height, codec, rotation, taken, frames)."""

    path: str
    size: int
    mtime_ns: int
    content_hash: str
    info: dict[str, Any] = field(default_factory=dict, compare=False)

    def row(self, video_id: int) -> dict[str, Any]:
        return {**{k: self.info.get(k) for k in VIDEO_COLUMNS}, "id": video_id,
                "path": self.path, "size": self.size, "mtime_ns": self.mtime_ns,
                "content_hash": self.content_hash}


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
