"""The files of a distributed run, in clip-retrieval's layout, under ``<index>/shards/``.

::

    run.json                         the run in progress (gone once it finished)
    manifest/manifest_{k}.parquet    the files shard k must process: id, path, size,
                                     mtime_ns, old_id, old_hash (kept until the run ends)
    img_emb/img_emb_{k}.npy          float16 (n_k, dim), L2-normalised: the shard's vectors
    metadata/metadata_{k}.parquet    one row per vector, same order: image_path, id, size,
                                     mtime_ns, content_hash and the photo metadata columns
    status/status_{k}.parquet        every manifest row: id, image_path, status (ok, same,
                                     failed), reason, content_hash, meta (JSON); written
                                     last, so it marks shard k complete

Shard numbers are never reused (a later run continues after the highest), so names are
deterministic: a killed run re-run writes the same files. Every file is written to a
temporary name beside it and renamed into place; temporaries of a killed writer are
removed by :meth:`ShardLayout.clean`. pyarrow is imported when a file is read or written.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from mmsearch.errors import StorageError, UsageError
from mmsearch.export import IMAGE_COLUMNS, columns
from mmsearch.store.shardvectors import FOLDER as FOLDER  # re-exported: the folder of the files
from mmsearch.store.shardvectors import as_stored, npy_path, write_npy

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa

MANIFEST_COLUMNS = ("id", "path", "size", "mtime_ns", "old_id", "old_hash")
STATUS_COLUMNS = ("id", "image_path", "size", "mtime_ns", "status", "reason", "content_hash",
                  "meta", "old_id")
_NUMBER = re.compile(r"_(\d+)\.(?:npy|parquet)$")


@dataclass(frozen=True)
class Run:
    """A planned run: shards ``first .. first + count - 1``, ``rows`` files in all."""

    first: int
    count: int
    rows: int
    model: str       # the model's fingerprint: a run is only resumed with the same weights
    roots: list[str]

    @property
    def shards(self) -> range:
        return range(self.first, self.first + self.count)


def pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise UsageError("--runner ray needs pyarrow: pip install 'mmsearch[ray]'") from None
    return pyarrow


@dataclass(frozen=True)
class ShardLayout:
    """Where each file of shard ``k`` lives under ``root``."""

    root: Path

    def npy(self, k: int) -> Path:
        return npy_path(self.root, k)

    def metadata(self, k: int) -> Path:
        return self.root / "metadata" / f"metadata_{k}.parquet"

    def status(self, k: int) -> Path:
        return self.root / "status" / f"status_{k}.parquet"

    def manifest(self, k: int) -> Path:
        return self.root / "manifest" / f"manifest_{k}.parquet"

    @property
    def run_file(self) -> Path:
        return self.root / "run.json"

    def complete(self, k: int) -> bool:
        return self.status(k).is_file()

    def numbers(self, folder: str = "status") -> list[int]:
        """Shard numbers with a file in ``folder``, sorted."""
        found = (_NUMBER.search(p.name) for p in (self.root / folder).glob("*_*.*"))
        return sorted(int(m.group(1)) for m in found if m)

    def next_shard(self) -> int:
        done = self.numbers("status")
        return done[-1] + 1 if done else 0

    def clean(self) -> None:
        """Remove temporary files left by a killed writer."""
        for path in self.root.glob("*/*.tmp"):
            path.unlink(missing_ok=True)
        (self.root / "run.json.tmp").unlink(missing_ok=True)

    # -- the run ---------------------------------------------------------------------
    def read_run(self) -> Run | None:
        try:
            data = json.loads(self.run_file.read_text())
            return Run(**data)
        except FileNotFoundError:
            return None
        except (ValueError, TypeError, OSError):
            return None  # a damaged record: the run is planned again (its ids stay unused)

    def write_run(self, run: Run) -> None:
        _atomic(self.run_file, lambda tmp: tmp.write_text(json.dumps(asdict(run))))

    def finish_run(self, run: Run) -> None:
        """The run is done: forget it and its manifests (the shards stay)."""
        self.run_file.unlink(missing_ok=True)
        for k in run.shards:
            self.manifest(k).unlink(missing_ok=True)


def _atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(tmp)`` then rename ``tmp`` over ``path``; a failure leaves ``path`` as it was."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StorageError(f"cannot write {path}: {exc.strerror or exc}") from None


def _schema(names: tuple[str, ...]) -> "pa.Schema":
    return pyarrow().schema(columns(names, integers={"old_id"}))


def table(rows: list[dict[str, Any]], names: tuple[str, ...]) -> "pa.Table":
    """``rows`` as a table of the columns ``names`` (missing values: null)."""
    pa = pyarrow()
    schema = _schema(names)
    return pa.Table.from_arrays([pa.array([r.get(f.name) for r in rows], type=f.type)
                                 for f in schema], schema=schema)


def write_table(path: Path, rows: list[dict[str, Any]], names: tuple[str, ...]) -> None:
    pq = pyarrow().parquet
    _atomic(path, lambda tmp: pq.write_table(table(rows, names), str(tmp)))


def read_arrow(path: Path) -> "pa.Table":
    try:
        return pyarrow().parquet.read_table(str(path))
    except (OSError, ValueError) as exc:
        raise StorageError(f"cannot read {path}: {exc}") from None


def read_table(path: Path) -> list[dict[str, Any]]:
    return read_arrow(path).to_pylist()


def write_shard(layout: ShardLayout, k: int, ids: np.ndarray, vectors: np.ndarray,
                status: list[dict[str, Any]]) -> None:
    """Write shard ``k``: its vectors (rows ``ids``, in order), their metadata, then the status
    of every manifest row, which marks the shard complete."""
    by_id = {r["id"]: r for r in status}
    meta = [_metadata_row(by_id[int(i)]) for i in ids]
    write_npy(layout.npy(k), vectors)
    write_table(layout.metadata(k), meta, IMAGE_COLUMNS)
    write_table(layout.status(k), status, STATUS_COLUMNS)


def _metadata_row(status: dict[str, Any]) -> dict[str, Any]:
    meta = json.loads(status["meta"] or "{}")
    return {**meta, "image_path": status["image_path"], "id": status["id"],
            "size": status["size"], "mtime_ns": status["mtime_ns"],
            "content_hash": status["content_hash"]}


def read_npy(npy: Path) -> np.ndarray:
    """A shard's vectors as every read gives them: float32, unit length (:func:`as_stored`)."""
    try:
        return as_stored(np.load(npy))
    except (OSError, ValueError) as exc:
        raise StorageError(f"cannot read {npy}: {exc}") from None


def read_vectors(npy: Path, metadata: Path) -> tuple[np.ndarray, np.ndarray]:
    """(ids, float32 vectors) of one shard: its ``.npy`` and the ids of its metadata file."""
    vectors = read_npy(npy)
    try:
        column = pyarrow().parquet.read_table(str(metadata), columns=["id"]).column("id")
    except (OSError, ValueError, KeyError) as exc:
        raise StorageError(f"cannot read {metadata}: {exc}") from None
    ids = np.asarray(column.to_numpy(), dtype=np.int64)
    if len(ids) != len(vectors):
        raise StorageError(f"{npy.name}: {len(ids)} metadata rows for {len(vectors)} vectors")
    return ids, vectors
