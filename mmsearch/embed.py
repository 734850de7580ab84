"""Embedding many images: decode in worker threads while the model runs.

Pillow's decoders and resizers release the GIL, so a small thread pool decodes
and preprocesses upcoming images while the main thread runs the model on the
current batch. At most ``prefetch`` images are in flight, so memory stays flat
however many files there are.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

import numpy as np

from mmsearch.decode import load_image
from mmsearch.errors import DecodeError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from mmsearch.models import Embedder


@dataclass(frozen=True)
class Batch:
    """One model batch: the paths embedded, their vectors, and the paths that failed."""

    paths: list[Path]
    vectors: np.ndarray
    failed: list[tuple[Path, str]]


def default_workers() -> int:
    """Decode threads: the cores the model leaves free, at least one."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cores))


def prepare(path: Path, preprocess: Callable, draft_size: int | None) -> "torch.Tensor":
    """Decode one file and turn it into the model's input tensor (raises DecodeError)."""
    image = load_image(path, draft_size=draft_size)
    try:
        return preprocess(image)
    except Exception as exc:  # a transform failing on a strange image is a decode failure
        raise DecodeError(f"preprocessing failed: {exc}") from exc


def embed_paths(embedder: "Embedder", paths: Sequence[Path], *, batch_size: int = 32,
                workers: int = 0, draft: bool = True) -> Iterator[Batch]:
    """Yield :class:`Batch` es covering ``paths`` in order; undecodable files go to ``failed``."""
    import torch

    draft_size = embedder.image_size if draft else None
    workers = workers or default_workers()
    with ThreadPoolExecutor(workers, thread_name_prefix="mmsearch-decode") as pool:
        tensors = _prefetch(pool, paths, lambda p: prepare(p, embedder.preprocess, draft_size),
                            ahead=max(2 * batch_size, 4 * workers))
        for chunk in _batches(tensors, batch_size):
            ok = [(p, t) for p, t in chunk if not isinstance(t, str)]
            failed = [(p, t) for p, t in chunk if isinstance(t, str)]
            if ok:
                vectors = embedder.encode_images(torch.stack([t for _, t in ok]))
            else:
                vectors = np.zeros((0, 0), np.float32)
            yield Batch([p for p, _ in ok], vectors, failed)


def _prefetch(pool: ThreadPoolExecutor, items: Iterable[Path], fn: Callable,
              ahead: int) -> Iterator[tuple[Path, "torch.Tensor | str"]]:
    """Run ``fn`` over ``items`` in ``pool`` with at most ``ahead`` results pending, in order."""
    pending: deque[tuple[Path, Future]] = deque()
    it = iter(items)
    try:
        for item in it:
            pending.append((item, pool.submit(fn, item)))
            if len(pending) >= ahead:
                yield _result(*pending.popleft())
        while pending:
            yield _result(*pending.popleft())
    finally:
        for _, fut in pending:
            fut.cancel()


def _result(item: Path, fut: Future) -> tuple[Path, "torch.Tensor | str"]:
    try:
        return item, fut.result()
    except DecodeError as exc:
        return item, str(exc)


def _batches(items: Iterable, size: int) -> Iterator[list]:
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
