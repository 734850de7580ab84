"""An exact index's GPU backend: a matrix product and a top-k in torch, used when the
installed FAISS has no GPU support (faiss-cpu, the only FAISS on PyPI).

:class:`TorchExact` holds the vectors on the device (float16 on CUDA, float32 on the
CPU), scores a query batch in one product and keeps the best ``k + margin`` by
``torch.topk``; those candidates are re-scored in float32 from the index's own vectors,
so the scores are FAISS's exact cosines and float16's rounding can only matter between
candidates whose cosines differ by less than it. The store decides when this is used
(:meth:`mmsearch.store.vectors.VectorIndex.search`): an exact index, a CUDA device,
FAISS without GPUs, and vectors that fit in the GPU's free memory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch

MARGIN = 16             # candidates beyond k re-scored exactly (float16 ranks near-ties loosely)
SCORES_BYTES = 1 << 30  # queries are scored in chunks of at most this many bytes of scores
UPLOAD_ROWS = 1 << 16   # rows converted and copied to the device at a time
FREE_SHARE = 0.5        # the vectors may take at most this share of the GPU's free memory


class TorchExact:
    """``search(queries, k)`` -> (scores, ids) over ``vectors`` (N, D) float32 with ``ids``."""

    returns_ids = True

    def __init__(self, ids: np.ndarray, vectors: np.ndarray, device: str,
                 owner: object = None) -> None:
        import torch

        self.owner = owner  # whatever owns the memory ``vectors`` views (a FAISS index)
        self.ids = np.ascontiguousarray(ids, dtype=np.int64)
        self.vectors = vectors  # float32 (N, D): a view of the index's own storage
        self.device = torch.device(device)
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.table = _upload(vectors, self.device, self.dtype)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` ids per query row by inner product, best first (exact float32 scores)."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        n = len(self.ids)
        k = min(k, n)
        if k <= 0 or n == 0:
            empty = np.zeros((len(queries), 0))
            return empty.astype(np.float32), empty.astype(np.int64)
        pool = min(n, k + MARGIN) if self.dtype != _float32() else k
        rows = max(1, SCORES_BYTES // (n * self.table.element_size()))
        found = [self._candidates(queries[i:i + rows], pool) for i in range(0, len(queries), rows)]
        return self._rescore(queries, np.concatenate(found), k)

    def _candidates(self, queries: np.ndarray, pool: int) -> np.ndarray:
        """Positions of the ``pool`` best-scored vectors per query (device arithmetic)."""
        import torch

        with torch.inference_mode():
            q = torch.from_numpy(queries).to(self.device, self.dtype)
            scores = q @ self.table.T
            return scores.topk(pool, dim=1, sorted=False).indices.cpu().numpy()

    def _rescore(self, queries: np.ndarray, pos: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact float32 scores of the candidates; the best ``k``, ties by smaller id."""
        exact = np.einsum("qd,qkd->qk", queries, self.vectors[pos])
        ids = self.ids[pos]
        order = np.lexsort((ids, -exact), axis=1)[:, :k]
        return (np.take_along_axis(exact, order, axis=1).astype(np.float32),
                np.take_along_axis(ids, order, axis=1))


def _float32() -> "torch.dtype":
    import torch

    return torch.float32


def _upload(vectors: np.ndarray, device: "torch.device", dtype: "torch.dtype") -> "torch.Tensor":
    """``vectors`` as a ``dtype`` tensor on ``device``, converted a chunk at a time there."""
    import torch

    if device.type == "cpu":
        return torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
    table = torch.empty(vectors.shape, dtype=dtype, device=device)
    for start in range(0, len(vectors), UPLOAD_ROWS):
        chunk = torch.from_numpy(np.ascontiguousarray(vectors[start:start + UPLOAD_ROWS]))
        table[start:start + len(chunk)] = chunk.to(device).to(dtype)
    return table


def fits(n: int, dim: int, device: str) -> bool:
    """Whether ``n`` x ``dim`` float16 vectors fit in ``FREE_SHARE`` of ``device``'s free memory."""
    import torch

    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return n * dim * 2 <= FREE_SHARE * free


def too_soon(gpu: int | None, searches: int) -> bool:
    """With ``gpu`` -1 (auto), CUDA is started only from the second search in a process, or
    when it already runs here: a one-off ``mmsearch query`` never spends seconds starting
    CUDA for one search, while a server or a batch of searches gets the GPU."""
    import sys

    if gpu != -1 or searches >= 1:
        return False
    torch = sys.modules.get("torch")
    return not (torch is not None and torch.cuda.is_initialized())


def cuda_device(gpu: int | None) -> str | None:
    """The CUDA device for the store's ``gpu`` setting (None: CPU only; N: GPU N; -1: GPU 0
    when there is one), or None where torch sees no such GPU."""
    import sys

    if gpu is None or (gpu == -1 and "torch" not in sys.modules and not _nvidia_devices()):
        return None  # (auto on a machine without NVIDIA devices: no torch import for that)
    import torch

    index = max(gpu, 0)
    if not torch.cuda.is_available() or torch.cuda.device_count() <= index:
        return None
    return f"cuda:{index}"


def _nvidia_devices() -> bool:
    """Whether the kernel shows NVIDIA device files (cheap; no driver or torch loaded)."""
    import glob

    return bool(glob.glob("/dev/nvidia[0-9]*"))
