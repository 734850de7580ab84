"""Export an index's vectors and metadata in clip-retrieval's layout (``mmsearch export``).

``fmt="npy"`` writes what clip-retrieval's inference writes, so autofaiss and
clip-retrieval's back end read it as they read their own::

    DIR/img_emb/img_emb_{i}.npy               float16 (n_i, dim), L2-normalised as stored
    DIR/metadata/metadata_{i}.parquet         one row per vector, same order: image_path, id,
                                              size, mtime_ns and the photo metadata columns
    DIR/text_emb/text_emb_{i}.npy             the indexed texts likewise (only when there are any)
    DIR/text_metadata/metadata_{i}.parquet    id, key, caption

``fmt="parquet"`` writes one table per shard with the vectors in an ``embedding``
column (a fixed-size list of float32), as LanceDB and Milvus bulk import expect::

    DIR/images/part_{i}.parquet               the metadata columns above + embedding
    DIR/texts/part_{i}.parquet                id, key, caption, embedding

Shard ``i`` holds rows ``[i * shard_size, (i + 1) * shard_size)`` in id order. Vectors
are read from the store a chunk at a time and every file is written as it goes (a
``.npy`` header is fixed up once its row count is known), so memory stays bounded by
the chunk size however large the index. Each file is written to ``NAME.tmp`` beside
it and renamed into place; a failed export removes what it wrote. pyarrow is needed
(``pip install 'mmsearch[export]'``) and imported only when exporting.
"""

from __future__ import annotations

import math
import os
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Collection, Iterable, Iterator, Sequence

import numpy as np

from mmsearch.errors import EmptyIndexError, StorageError, UsageError
from mmsearch.store.schema import FLOAT_COLUMNS, INTEGER_COLUMNS
from mmsearch.store.selection import RECORD_COLUMNS

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa

    from mmsearch.store import Store

FORMATS = ("npy", "parquet")
CHUNK = 16_384  # vectors read from the store at a time
METADATA_COLUMNS = RECORD_COLUMNS[3:]  # after path, size, mtime_ns: the photo metadata
IMAGE_COLUMNS = ("image_path", "id", "size", "mtime_ns", *METADATA_COLUMNS)
TEXT_COLUMNS = ("id", "key", "caption")
# kind -> format -> (vector folder, vector file stem, table folder, table file stem)
_LAYOUT = {
    "images": {"npy": ("img_emb", "img_emb", "metadata", "metadata"),
               "parquet": (None, None, "images", "part")},
    "texts": {"npy": ("text_emb", "text_emb", "text_metadata", "metadata"),
              "parquet": (None, None, "texts", "part")},
}
EXPORT_FOLDERS = ("img_emb", "metadata", "text_emb", "text_metadata", "images", "texts")

Progress = Callable[[str, int, int], None]
Rows = tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]  # ids, float32 vectors, table rows


@dataclass(frozen=True)
class ExportReport:
    directory: Path
    images: int
    texts: int
    shards: int          # image shards written
    files: list[str]     # relative paths written, sorted


def export_index(store: "Store", directory: Path, *, fmt: str = "npy", shard_size: int = 1_000_000,
                 progress: Progress | None = None) -> ExportReport:
    """Write the index's image (and text) vectors with their metadata under ``directory``.

    Raises :class:`UsageError` (unknown format, bad shard size, pyarrow missing, a folder
    that is not empty), :class:`EmptyIndexError` (nothing indexed) or
    :class:`StorageError` (a file could not be written).
    """
    if fmt not in FORMATS:
        raise UsageError(f"unknown export format {fmt!r}: choose {' or '.join(FORMATS)}")
    if shard_size < 1:
        raise UsageError(f"shard size must be at least 1, not {shard_size}")
    _pyarrow()
    counts = _counts(store)
    directory = Path(directory).expanduser()
    _check_target(directory)
    written: list[Path] = []
    try:
        done = {kind: _export_kind(store, kind, fmt, directory, shard_size, total,
                                   progress, written)
                for kind, total in counts.items()}
    except BaseException:
        _remove(written)
        raise
    files = sorted(p.relative_to(directory).as_posix() for p in written)
    return ExportReport(directory, done["images"][0], done["texts"][0], done["images"][1], files)


def _pyarrow() -> Any:
    """The pyarrow module, or the one-line error that says how to install it."""
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise UsageError("exporting needs pyarrow: pip install 'mmsearch[export]'") from None
    return pyarrow


def _counts(store: "Store") -> dict[str, int]:
    """Rows to export per kind; :class:`EmptyIndexError` when there is nothing at all."""
    counts = {"images": store.read.image_count(), "texts": store.read.text_count()}
    if store.dim is None or not any(counts.values()):
        raise EmptyIndexError(f"index {store.root.name!r} holds nothing to export "
                              "(run `mmsearch index FOLDER` first)")
    return counts


def _check_target(directory: Path) -> None:
    """Refuse a target that is a file or a folder holding anything (an export above all)."""
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"{directory} is a file; choose an empty folder to export to")
    try:
        names = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
    except OSError as exc:
        raise StorageError(f"cannot read {directory}: {exc.strerror or exc}") from None
    if set(names) & set(EXPORT_FOLDERS):
        raise UsageError(f"{directory} already holds an export; choose an empty folder")
    if names:
        raise UsageError(f"{directory} is not empty (it holds {names[0]!r}"
                         f"{' and more' if len(names) > 1 else ''}); choose an empty folder")


def _export_kind(store: "Store", kind: str, fmt: str, directory: Path, shard_size: int,
                 total: int, progress: Progress | None, written: list[Path]) -> tuple[int, int]:
    """Write every shard of ``kind``; returns (rows, shards) written."""
    rows, shard, writer = 0, -1, None
    try:
        for index, ids, vectors, records in _pieces(_rows(store, kind), shard_size):
            if index != shard:
                if writer is not None:
                    writer.finish(written)
                shard, writer = index, _ShardWriter(directory, kind, fmt, index, shard_size,
                                                    store.dim or 0)
            writer.add(ids, vectors, records)
            rows += len(ids)
            if progress is not None:
                progress(kind, rows, max(total, rows))
        if writer is not None:
            writer.finish(written)
    finally:
        if writer is not None:
            writer.discard()
    return rows, shard + 1


def _rows(store: "Store", kind: str) -> Iterator[Rows]:
    """(ids, vectors, table rows) of ``kind`` in id order, a chunk at a time.

    Rows forgotten by another process between the two reads are left out.
    """
    for ids, vectors in store.read.vector_chunks(kind, store.dim or 0, CHUNK):
        records = _image_rows(store, ids) if kind == "images" else _text_rows(store, ids)
        keep = np.fromiter((int(i) in records for i in ids), dtype=bool, count=len(ids))
        yield ids[keep], vectors[keep], [records[int(i)] for i in ids[keep]]


def _image_rows(store: "Store", ids: np.ndarray) -> dict[int, dict[str, Any]]:
    """id -> the metadata table's row of these images."""
    out = {}
    for i, rec in store.image_records(ids).items():
        row = {"image_path": rec["path"], "id": int(i), "size": rec["size"],
               "mtime_ns": rec["mtime_ns"]}
        out[int(i)] = {**row, **{c: rec.get(c) for c in METADATA_COLUMNS}}
    return out


def _text_rows(store: "Store", ids: np.ndarray) -> dict[int, dict[str, Any]]:
    """id -> the text table's row (id, key, caption) of these texts."""
    return {int(i): {"id": int(i), "key": key, "caption": text}
            for i, (key, text) in store.read.texts_by_id(ids).items()}


def _pieces(chunks: Iterable[Rows], shard_size: int) -> Iterator[tuple[int, np.ndarray, np.ndarray, list]]:
    """(shard index, ids, vectors, rows): the chunks cut where a shard ends."""
    shard, filled = 0, 0
    for ids, vectors, records in chunks:
        start = 0
        while start < len(ids):
            stop = start + min(len(ids) - start, shard_size - filled)
            yield shard, ids[start:stop], vectors[start:stop], records[start:stop]
            filled += stop - start
            start = stop
            if filled == shard_size:
                shard, filled = shard + 1, 0


def columns(names: Sequence[str], integers: Collection[str] = ()) -> list["pa.Field"]:
    """Arrow fields of these catalog columns (and of ``integers``), typed as the catalog
    types them; every one nullable but ``id``."""
    pa = _pyarrow()
    return [pa.field(n, pa.int64() if n in INTEGER_COLUMNS or n in integers else
                     pa.float64() if n in FLOAT_COLUMNS else pa.string(), nullable=n != "id")
            for n in names]


def _schema(kind: str, dim: int, with_embedding: bool) -> "pa.Schema":
    """The table's columns: nullable metadata, typed even where a shard holds only nulls."""
    pa = _pyarrow()
    fields = columns(IMAGE_COLUMNS if kind == "images" else TEXT_COLUMNS)
    if with_embedding:
        fields.append(pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False))
    return pa.schema(fields)


def _table(schema: "pa.Schema", records: list[dict[str, Any]], vectors: np.ndarray | None) -> "pa.Table":
    """The rows (and their vectors, when the schema has an embedding column) as a table."""
    pa = _pyarrow()
    columns = [pa.array([r[f.name] for r in records], type=f.type)
               for f in schema if f.name != "embedding"]
    if vectors is not None:
        flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).ravel(), type=pa.float32())
        columns.append(pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1]))
    return pa.Table.from_arrays(columns, schema=schema)


class _ShardWriter:
    """The files of one shard of one kind, written as rows come and renamed at :meth:`finish`."""

    def __init__(self, directory: Path, kind: str, fmt: str, index: int, shard_size: int,
                 dim: int) -> None:
        vec_dir, vec_stem, table_dir, table_stem = _LAYOUT[kind][fmt]
        self.schema = _schema(kind, dim, with_embedding=fmt == "parquet")
        self.npy = None
        if vec_dir is not None:
            self.npy = _NpyFile(directory / vec_dir / f"{vec_stem}_{index}.npy", shard_size, dim)
        try:
            self.table = _ParquetFile(directory / table_dir / f"{table_stem}_{index}.parquet",
                                      self.schema)
        except BaseException:
            if self.npy is not None:
                self.npy.discard()
            raise

    def add(self, ids: np.ndarray, vectors: np.ndarray, records: list[dict[str, Any]]) -> None:
        if self.npy is not None:
            self.npy.add(vectors)
        self.table.add(_table(self.schema, records, None if self.npy else vectors))

    def finish(self, written: list[Path]) -> None:
        """Close and rename the shard's files into place, adding each to ``written``."""
        for f in (self.npy, self.table):
            if f is not None:
                written.append(f.finish())

    def discard(self) -> None:
        for f in (self.npy, self.table):
            if f is not None:
                f.discard()


class _AtomicFile:
    """A file written as ``NAME.tmp`` in its folder and renamed to ``NAME`` when complete."""

    def __init__(self, path: Path) -> None:
        self.path, self.tmp = path, path.with_name(path.name + ".tmp")
        self.done = False
        with _storage(f"cannot create {path.parent}"):
            path.parent.mkdir(parents=True, exist_ok=True)

    def rename(self) -> Path:
        with _storage(f"cannot write {self.path}"):
            os.replace(self.tmp, self.path)
        self.done = True
        return self.path

    def discard(self) -> None:
        """Remove the temporary file of a shard that was not finished."""
        if not self.done:
            self.tmp.unlink(missing_ok=True)


class _NpyFile(_AtomicFile):
    """A float16 ``.npy`` of ``dim`` columns, appended a chunk at a time.

    The header is reserved for ``max_rows`` rows and rewritten, padded to the same
    length, once the real row count is known."""

    def __init__(self, path: Path, max_rows: int, dim: int) -> None:
        super().__init__(path)
        self.dim, self.rows = dim, 0
        self.header_size = len(_npy_header(max_rows, dim))
        with _storage(f"cannot write {self.tmp}"):
            self.file = open(self.tmp, "wb")
            self.file.write(b"\0" * self.header_size)

    def add(self, vectors: np.ndarray) -> None:
        with _storage(f"cannot write {self.tmp}"):
            self.file.write(np.ascontiguousarray(vectors, dtype="<f2").tobytes())
        self.rows += len(vectors)

    def finish(self) -> Path:
        with _storage(f"cannot write {self.tmp}"):
            self.file.seek(0)
            self.file.write(_npy_header(self.rows, self.dim, self.header_size))
            self.file.close()
        return self.rename()

    def discard(self) -> None:
        self.file.close()
        super().discard()


def _npy_header(rows: int, dim: int, size: int | None = None) -> bytes:
    """An ``.npy`` (version 1.0) header for a C-order float16 (rows, dim) array, padded with
    spaces to ``size`` bytes (default: the next multiple of 64, as numpy writes)."""
    text = repr({"descr": "<f2", "fortran_order": False, "shape": (rows, dim)})
    size = size or 64 * math.ceil((10 + len(text) + 1) / 64)
    body = text.ljust(size - 10 - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(body)) + body.encode("latin1")


class _ParquetFile(_AtomicFile):
    """A Parquet file of ``schema``, written a table (row group) at a time."""

    def __init__(self, path: Path, schema: "pa.Schema") -> None:
        super().__init__(path)
        pq = _pyarrow().parquet
        with _storage(f"cannot write {self.tmp}"):
            self.writer = pq.ParquetWriter(str(self.tmp), schema)

    def add(self, table: "pa.Table") -> None:
        with _storage(f"cannot write {self.tmp}"):
            self.writer.write_table(table)

    def finish(self) -> Path:
        with _storage(f"cannot write {self.tmp}"):
            self.writer.close()
        return self.rename()

    def discard(self) -> None:
        try:
            self.writer.close()
        except OSError:
            pass
        super().discard()


@contextmanager
def _storage(doing: str) -> Iterator[None]:
    """Turns an :class:`OSError` inside the block (permission, disk full...) into a
    one-line :class:`StorageError`."""
    try:
        yield
    except OSError as exc:
        lines = str(exc).splitlines()
        detail = exc.strerror or (lines[0] if lines else type(exc).__name__)
        raise StorageError(f"{doing}: {detail}") from None


def _remove(paths: list[Path]) -> None:
    """Remove the files a failed export had written, and the folders it left empty."""
    for path in paths:
        path.unlink(missing_ok=True)
    for folder in {p.parent for p in paths}:
        try:
            folder.rmdir()
        except OSError:
            pass
