"""Image vectors kept in npy shards instead of the catalog: an index stored as ``shards``.

An index's *storage* is recorded with its model when it is made, and never changes:

``catalog``  (every local index, the default) each distinct content's float32 vector is a
             blob in the catalog's ``embeddings`` table.
``shards``   (made by ``mmsearch index --runner ray``, the default there) the catalog keeps
             the rows (id, path, metadata) and, per distinct content, where its vector
             lies: shard ``k``, row ``r`` of ``<index>/shards/img_emb/img_emb_{k}.npy``
             (clip-retrieval's layout: float16, L2-normalised). At 10^9 x 512 that is
             ~1 TB of vectors that stay out of SQLite; FAISS is rebuilt from the shards,
             and compressed indexes are re-ranked with them.

A shard's npy file is written whole under its final name (a temporary file renamed into
place) before any catalog row points into it, and is never changed after (shard numbers
are never reused), so a location, once committed, names one vector for ever. This
module reads them (memory-mapped, a file opened once while it is unchanged) and writes
them; the catalog resolves its locations through :class:`ShardVectors`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mmsearch.errors import CorruptIndexError, StorageError

FOLDER = "shards"
STORAGES = ("catalog", "shards")
OPEN_FILES = 64  # memory maps kept open


def npy_path(shards_folder: Path, k: int) -> Path:
    """Shard ``k``'s vectors under a ``shards/`` folder."""
    return shards_folder / "img_emb" / f"img_emb_{k}.npy"


def write_npy(path: Path, vectors: np.ndarray) -> None:
    """Save ``vectors`` as float16 under ``path``: to a temporary name, then renamed."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(vectors, dtype="<f2"))
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StorageError(f"cannot write {path}: {exc.strerror or exc}") from None


def as_stored(vectors: np.ndarray) -> np.ndarray:
    """``vectors`` as a shard gives them back (through float16), as float32."""
    return np.asarray(vectors, dtype=np.float32).astype("<f2").astype(np.float32)


class ShardVectors:
    """The npy shards of one index folder, read by (shard, row) locations."""

    def __init__(self, index_root: Path) -> None:
        self.folder = index_root / FOLDER
        self._open: dict[int, tuple[tuple[int, int, int], np.ndarray]] = {}

    def path(self, k: int) -> Path:
        return npy_path(self.folder, k)

    def gather(self, shards: np.ndarray, rows: np.ndarray, dim: int) -> np.ndarray:
        """float32 vectors at these locations, in order; a location whose file is missing
        or too short, or a file of another dimension, raises :class:`CorruptIndexError`."""
        shards, rows = np.asarray(shards, np.int64), np.asarray(rows, np.int64)
        out = np.empty((shards.size, dim), dtype=np.float32)
        for k in np.unique(shards):
            at = np.flatnonzero(shards == k)
            array = self._array(int(k), dim)
            wanted = rows[at]
            if wanted.size and (wanted.min() < 0 or wanted.max() >= array.shape[0]):
                raise CorruptIndexError(f"{self.path(int(k))} holds {array.shape[0]} vectors; "
                                        f"the catalog points to row {int(wanted.max())}: run "
                                        "`mmsearch check`")
            out[at] = array[wanted]
        return out

    def damaged(self, shards: np.ndarray, rows: np.ndarray, dim: int) -> np.ndarray:
        """A mask of the locations whose vector cannot be read or is not finite."""
        shards, rows = np.asarray(shards, np.int64), np.asarray(rows, np.int64)
        bad = np.zeros(shards.size, dtype=bool)
        for k in np.unique(shards):
            at = np.flatnonzero(shards == k)
            try:
                array = self._array(int(k), dim)
            except CorruptIndexError:
                bad[at] = True
                continue
            inside = (rows[at] >= 0) & (rows[at] < array.shape[0])
            bad[at[~inside]] = True
            ok = at[inside]
            bad[ok] = ~np.isfinite(np.asarray(array[rows[ok]], dtype=np.float32)).all(axis=1)
        return bad

    def _array(self, k: int, dim: int) -> np.ndarray:
        """Shard ``k`` memory-mapped (kept open while its file is unchanged)."""
        path = self.path(k)
        try:
            st = path.stat()
        except FileNotFoundError:
            raise CorruptIndexError(f"vector shard {path} is missing: run `mmsearch check`") from None
        except OSError as exc:
            raise StorageError(f"cannot read {path}: {exc.strerror or exc}") from None
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        cached = self._open.get(k)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        try:
            try:
                array = np.load(path, mmap_mode="r")
            except ValueError:  # an empty shard (every file failed) cannot be mapped
                array = np.load(path)
        except (OSError, ValueError) as exc:
            raise CorruptIndexError(f"vector shard {path} is unreadable ({exc}): run "
                                    "`mmsearch check`") from None
        if array.ndim != 2 or array.shape[1] != dim or array.dtype.kind != "f":
            raise CorruptIndexError(f"vector shard {path} holds {array.dtype} {array.shape}, "
                                    f"not (n, {dim}) vectors: run `mmsearch check`")
        if len(self._open) >= OPEN_FILES:
            self._open.pop(next(iter(self._open)))
        self._open[k] = (stamp, array)
        return array
