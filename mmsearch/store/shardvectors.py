"""Image vectors kept in npy shards instead of the catalog: an index stored as ``shards``.

An index's *storage* is recorded with its model when it is made, and never changes:

``catalog``  (every local index, the default) each distinct content's float32 vector is a
             blob in the catalog's ``embeddings`` table.
``shards``   (made by ``mmsearch index --runner ray``, the default there) the catalog keeps
             the rows (id, path, metadata) and, per distinct content, where its vector
             lies: shard ``k``, row ``r`` of ``<index>/shards/img_emb/img_emb_{k}.npy``
             (clip-retrieval's layout: float16, L2-normalised). At 10^9 x 512 that is
             ~1 TB of vectors that stay out of SQLite (which would take ~4 TB for
             them as float32 blobs: ``benchmarks/bench_storage.py``); FAISS is rebuilt from the shards,
             and compressed indexes are re-ranked with them.

A shard's npy file is written whole under its final name (a temporary file renamed into
place) before any catalog row points into it, and is never changed after (shard numbers
are never reused), so a location, once committed, names one vector for ever. This
module reads them (:class:`ShardVectors`, through which the storage object,
:class:`~mmsearch.store.storage.NpyShards`, resolves the catalog's locations) and writes
them (:func:`write_npy`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mmsearch.errors import CorruptIndexError, StorageError

FOLDER = "shards"
HEADERS = 1 << 16  # shard headers kept (a few dozen bytes each)
MAPPED_ROWS = 256  # more rows than this from one shard are read through a memory map


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
    """``vectors`` as a shard gives them back: through float16, as float32, unit length."""
    return _unit(np.asarray(vectors, dtype=np.float32).astype("<f2"))


def _unit(stored: np.ndarray) -> np.ndarray:
    """float16 rows as float32 of length 1 again (rounding moved it by ~1e-4: a vector's
    cosine with itself would read 1.0002); float32 rows are divided in place."""
    out = np.asarray(stored, dtype=np.float32)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return np.divide(out, norms, out=out, where=norms > 0)


class ShardVectors:
    """The npy shards of one index folder, read by (shard, row) locations.

    Each file's header is read once (while the file is unchanged); a few rows are then
    read with ``pread``, many through a memory map made for the call. No file stays
    open, so 10^4 shards cost no file descriptors.
    """

    def __init__(self, index_root: Path) -> None:
        self.folder = index_root / FOLDER
        self._prefix = str(npy_path(self.folder, 0))[:-len("0.npy")]  # ".../img_emb_"
        self._headers: dict[int, tuple[tuple[int, int, int],
                                       tuple[int, tuple[int, int], np.dtype]]] = {}

    def path(self, k: int) -> Path:
        return npy_path(self.folder, k)

    def _file(self, k: int) -> str:
        return f"{self._prefix}{k}.npy"  # (a Path per read costs more than the read)

    def gather(self, shards: np.ndarray, rows: np.ndarray, dim: int) -> np.ndarray:
        """float32 vectors at these locations, in order; a location whose file is missing
        or too short, or a file of another dimension, raises :class:`CorruptIndexError`."""
        shards, rows = np.asarray(shards, np.int64), np.asarray(rows, np.int64)
        out = np.empty((shards.size, dim), dtype=np.float32)
        for k, at in _by_shard(shards):
            out[at] = self._read(k, rows[at], dim)
        return _unit(out)

    def damaged(self, shards: np.ndarray, rows: np.ndarray, dim: int) -> np.ndarray:
        """A mask of the locations whose vector cannot be read or is not finite."""
        shards, rows = np.asarray(shards, np.int64), np.asarray(rows, np.int64)
        bad = np.zeros(shards.size, dtype=bool)
        for k, at in _by_shard(shards):
            try:
                n = self._header(k, dim)[1]
            except CorruptIndexError:
                bad[at] = True
                continue
            inside = (rows[at] >= 0) & (rows[at] < n)
            bad[at[~inside]] = True
            ok = at[inside]
            if ok.size:
                bad[ok] = ~np.isfinite(self._read(k, rows[ok], dim)).all(axis=1)
        return bad

    def _read(self, k: int, rows: np.ndarray, dim: int) -> np.ndarray:
        """Rows ``rows`` of shard ``k`` as float32."""
        offset, n, dtype = self._header(k, dim)
        path = self._file(k)
        if rows.size and (rows.min() < 0 or rows.max() >= n):
            raise CorruptIndexError(f"{path} holds {n} vectors; the catalog points to row "
                                    f"{int(rows.max())}: run `mmsearch check`")
        width = dim * dtype.itemsize
        try:
            if rows.size > MAPPED_ROWS:
                data = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(n, dim))
                return np.asarray(data[rows], dtype=np.float32)
            fd = os.open(path, os.O_RDONLY)
            try:
                buf = b"".join(os.pread(fd, width, offset + int(r) * width) for r in rows)
            finally:
                os.close(fd)
        except FileNotFoundError:
            raise CorruptIndexError(f"vector shard {path} is missing: run `mmsearch check`") from None
        except OSError as exc:
            raise StorageError(f"cannot read {path}: {exc.strerror or exc}") from None
        if len(buf) != rows.size * width:
            raise CorruptIndexError(f"vector shard {path} is truncated: run `mmsearch check`")
        return np.frombuffer(buf, dtype=dtype).reshape(-1, dim).astype(np.float32)

    def _header(self, k: int, dim: int) -> tuple[int, int, np.dtype]:
        """(data offset, rows, dtype) of shard ``k``, read once while its file is unchanged."""
        path = self._file(k)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise CorruptIndexError(f"vector shard {path} is missing: run `mmsearch check`") from None
        except OSError as exc:
            raise StorageError(f"cannot read {path}: {exc.strerror or exc}") from None
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        cached = self._headers.get(k)
        if cached is None or cached[0] != stamp:
            cached = (stamp, self._parse(path))
            if len(self._headers) >= HEADERS:
                self._headers.pop(next(iter(self._headers)))
            self._headers[k] = cached
        offset, shape, dtype = cached[1]
        if shape[1] != dim:
            raise CorruptIndexError(f"vector shard {path} holds {dtype} {shape}, "
                                    f"not (n, {dim}) vectors: run `mmsearch check`")
        if _bytes_needed(offset, shape, dtype) > st.st_size:
            raise CorruptIndexError(f"vector shard {path} is truncated: run `mmsearch check`")
        return offset, shape[0], dtype

    @staticmethod
    def _parse(path: str) -> tuple[int, tuple[int, int], np.dtype]:
        """(data offset, shape, dtype) from an npy file's header."""
        fmt = np.lib.format
        try:
            with open(path, "rb") as f:
                version = fmt.read_magic(f)
                read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
                shape, fortran, dtype = read(f)
                offset = f.tell()
        except (OSError, ValueError) as exc:
            raise CorruptIndexError(f"vector shard {path} is unreadable ({exc}): run "
                                    "`mmsearch check`") from None
        if len(shape) != 2 or dtype.kind != "f" or fortran:
            raise CorruptIndexError(f"vector shard {path} holds {dtype} {shape}, not "
                                    "(n, dim) vectors: run `mmsearch check`")
        return offset, (int(shape[0]), int(shape[1])), dtype


def _bytes_needed(offset: int, shape: tuple[int, int], dtype: np.dtype) -> int:
    return offset + shape[0] * shape[1] * dtype.itemsize


def _by_shard(shards: np.ndarray):
    """(shard, positions in ``shards``) for each shard named, in shard order."""
    order = np.argsort(shards, kind="stable")
    ordered = shards[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]]) if shards.size else []
    ends = list(starts[1:]) + [shards.size]
    for a, b in zip(starts, ends):
        yield int(ordered[a]), order[a:b]
