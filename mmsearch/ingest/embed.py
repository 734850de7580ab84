"""Embedding many images: decode in worker threads while the model runs.

Pillow's decoders and resizers release the GIL, so a small thread pool decodes
and preprocesses upcoming images while the main thread runs the model on the
current batch. At most ``prefetch`` images are in flight, so memory stays flat
however many files there are.
"""

from __future__ import annotations

import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from mmsearch.ingest.decode import load_image
from mmsearch.errors import DecodeError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from mmsearch.models.openclip import Embedder

Identity = tuple[int, int]  # (size, mtime_ns) of a file, as the scan saw it
CHANGED = "changed while being indexed; run index again"


@dataclass
class StageTimes:
    """Seconds spent per stage: decode and prepare are summed over worker threads."""

    decode: float = 0.0
    prepare: float = 0.0
    model: float = 0.0
    images: int = 0


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


def prepare(path: Path, embedder: "Embedder", draft_size: int | None,
            expect: Identity | None = None) -> tuple[Any, float, float]:
    """Decode one file into the model's input; returns (input, decode s, prepare s).

    ``expect``: the (size, mtime_ns) the scan recorded before hashing; a file that no
    longer has it once decoded fails with `CHANGED`, so its vector is never stored
    under the hash of other content.
    """
    t0 = time.perf_counter()
    image = load_image(path, draft_size=draft_size)
    if expect is not None:
        check_unchanged(path, expect)
    t1 = time.perf_counter()
    try:
        return embedder.prepare(image), t1 - t0, time.perf_counter() - t1
    except Exception as exc:  # a transform failing on a strange image is a decode failure
        raise DecodeError(f"preprocessing failed: {exc}") from exc


def check_unchanged(path: Path, expect: Identity) -> None:
    """Raise `DecodeError` unless ``path`` still has the (size, mtime_ns) ``expect``."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise DecodeError(CHANGED) from exc
    if (st.st_size, st.st_mtime_ns) != expect:
        raise DecodeError(CHANGED)


def embed_paths(embedder: "Embedder", paths: Sequence[Path], *, batch_size: int = 32,
                workers: int = 0, draft: bool = True, times: StageTimes | None = None,
                expect: Mapping[Path, Identity] | None = None) -> Iterator[Batch]:
    """Yield :class:`Batch` es covering ``paths`` in order; undecodable files go to ``failed``.

    ``expect``: per path, the (size, mtime_ns) it must still have after decoding
    (checked in the decode thread); a file that changed meanwhile goes to ``failed``.
    """
    draft_size = embedder.image_size if draft else None
    workers = workers or default_workers()
    expect = expect or {}
    with ThreadPoolExecutor(workers, thread_name_prefix="mmsearch-decode") as pool:
        tensors = _prefetch(pool, paths,
                            lambda p: prepare(p, embedder, draft_size, expect.get(p)),
                            ahead=max(2 * batch_size, 4 * workers))
        times = times if times is not None else StageTimes()
        for chunk in _batches(tensors, batch_size):
            ok = [(p, t) for p, t in chunk if not isinstance(t, str)]
            failed = [(p, t) for p, t in chunk if isinstance(t, str)]
            t0 = time.perf_counter()
            if ok:
                vectors = embedder.encode_images(embedder.collate([t[0] for _, t in ok]))
            else:
                vectors = np.zeros((0, 0), np.float32)
            times.model += time.perf_counter() - t0
            times.decode += sum(t[1] for _, t in ok)
            times.prepare += sum(t[2] for _, t in ok)
            times.images += len(ok)
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
