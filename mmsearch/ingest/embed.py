"""Embedding many images: decode ahead of the model, in threads, processes or on the GPU.

Upcoming images are decoded and resized while the model runs on the current batch; at
most ``ahead`` of them are in flight, so memory stays flat however many files there
are. Where the model's transform is open_clip's standard one, batches stay uint8 until
they reach the model's device, where ToTensor + Normalize run (a quarter of float32's
bytes to copy; on the CPU the same float32 steps, so vectors are bit-identical).

Decoders (``decoder=``):

* ``threads`` -- Pillow in a thread pool (it releases the GIL while it decodes);
* ``processes`` -- Pillow in worker processes, pixels back through shared memory
  (:mod:`mmsearch.ingest.procdecode`): no GIL, for many cores feeding a GPU;
* ``nvjpeg`` -- threads read the bytes; baseline JPEGs are decoded, resized and
  cropped as a batch on the GPU (:mod:`mmsearch.ingest.gpudecode`), every other file
  by Pillow in the threads. On a CPU device the same code runs on torchvision's CPU
  decoder (for tests);
* ``auto`` -- threads on a CPU (the model is the bottleneck there, by far); on a CUDA
  device nvjpeg where torchvision can decode there, else processes (4+ cores).

Bad files are reported the same way by every decoder: Pillow's path decides the reason.
On a CUDA device the next batch is decoded while the model runs the current one (the
model call waits for its vectors, which the catalog commit needs).
"""

from __future__ import annotations

import inspect
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from mmsearch.errors import DecodeError, UsageError
from mmsearch.ingest.decode import (CHANGED, check_unchanged, decode_bytes, load_image,
                                    read_bytes)
from mmsearch.ingest.steps import CropSpec, crop_spec
from mmsearch.models.device import cores
from mmsearch.settings import BATCH_SIZE, DECODERS, DRAFT, WORKERS

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from mmsearch.models.openclip import Embedder

__all__ = ["CHANGED", "DECODERS", "Batch", "StageTimes", "check_unchanged", "choose_decoder",
           "decode_workers", "default_workers", "embed_paths", "prepare"]

Identity = tuple[int, int]  # (size, mtime_ns) of a file, as the scan saw it
PROCESS_MIN_CORES = 4  # auto: fewer cores than this feed a GPU from threads


@dataclass
class StageTimes:
    """Seconds spent per stage: decode and prepare are summed over workers; ``gpu_decode``
    is the batched tensor decode + resize (nvjpeg), ``model`` the model calls."""

    decode: float = 0.0
    prepare: float = 0.0
    model: float = 0.0
    images: int = 0
    gpu_decode: float = 0.0


@dataclass(frozen=True)
class Batch:
    """One model batch: the paths embedded, their vectors, and the paths that failed."""

    paths: list[Path]
    vectors: np.ndarray
    failed: list[tuple[Path, str]]


Chunk = tuple[list[Path], list[tuple[Path, str]], "torch.Tensor | None"]  # ok, failed, batch


def default_workers() -> int:
    """Decode threads: the cores the model leaves free, at least one."""
    return max(1, min(8, cores()))


def decode_workers(kind: str, asked: int = 0) -> int:
    """Workers for a decoder: as asked, else threads as :func:`default_workers`, processes
    (and nvjpeg's reading threads) one per core up to 16."""
    return asked or (default_workers() if kind == "threads" else max(1, min(16, cores())))


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
    return model_input(image, embedder), t1 - t0, time.perf_counter() - t1


def prepare_bytes(data: bytes, embedder: "Embedder", draft_size: int | None) -> Any:
    """:func:`prepare` of a file's bytes already in memory (read from a URL)."""
    return model_input(decode_bytes(data, draft_size=draft_size), embedder)


def model_input(image: Any, embedder: "Embedder") -> Any:
    """The model's input for a decoded image; a failing transform is a `DecodeError`."""
    try:
        return embedder.prepare(image)
    except Exception as exc:  # a transform failing on a strange image is a decode failure
        raise DecodeError(f"preprocessing failed: {exc}") from exc


def uint8_spec(embedder: Any) -> CropSpec | None:
    """The resize/crop of an embedder whose batches can stay uint8 to the device, else None."""
    collate = getattr(embedder, "collate", None)
    if collate is None or "uint8" not in inspect.signature(collate).parameters:
        return None
    spec = crop_spec(getattr(embedder, "preprocess", None))
    return spec if spec is not None and spec.out_size is not None else None


def choose_decoder(asked: str, embedder: Any) -> str:
    """The decoder ``asked`` comes to for this embedder (see the module's docstring).

    Models without open_clip's standard transform decode in threads whatever is asked
    (and nvjpeg needs a resize torch has: bilinear, bicubic or nearest).
    """
    if asked not in DECODERS:
        raise UsageError(f"decoder must be one of {', '.join(DECODERS)}, got {asked!r}")
    spec = uint8_spec(embedder)
    if asked == "threads" or spec is None or (asked == "nvjpeg" and not spec.tensor_ok):
        return "threads"
    if asked != "auto":
        return asked
    device = str(getattr(embedder, "device", "cpu"))
    if not device.startswith("cuda"):
        return "threads"
    from mmsearch.models.device import cuda_jpeg_decoding

    if spec.tensor_ok and cuda_jpeg_decoding(device):
        return "nvjpeg"
    return "processes" if cores() >= PROCESS_MIN_CORES else "threads"


def embed_paths(embedder: "Embedder", paths: Sequence[Path], *, batch_size: int = BATCH_SIZE,
                workers: int = WORKERS, draft: bool = DRAFT, times: StageTimes | None = None,
                expect: Mapping[Path, Identity] | None = None, decoder: str = "auto",
                overlap: bool | None = None) -> Iterator[Batch]:
    """Yield :class:`Batch` es covering ``paths`` in order; undecodable files go to ``failed``.

    ``expect``: per path, the (size, mtime_ns) it must still have after decoding
    (checked where it is decoded); a file that changed meanwhile goes to ``failed``.
    ``decoder``: see the module's docstring. ``overlap``: decode the next batch while
    the model runs this one in another thread (default: on a CUDA device).
    """
    kind = choose_decoder(decoder, embedder)
    workers = decode_workers(kind, workers)
    times = times if times is not None else StageTimes()
    ahead = max(2 * batch_size, 4 * workers)
    source = _open_source(kind, embedder, embedder.image_size if draft else None, workers,
                          expect or {}, ahead)
    ahead = min(ahead, getattr(source, "slots", ahead))
    if overlap is None:
        overlap = str(getattr(embedder, "device", "cpu")).startswith("cuda")
    try:
        prepared = _prefetch(source.submit, paths, ahead=ahead)
        chunks = (source.collate(chunk, times) for chunk in _batches(prepared, batch_size))
        yield from (_overlapped if overlap else _in_turn)(embedder, chunks, times)
    finally:
        source.close()


def _open_source(kind: str, embedder: "Embedder", draft_size: int | None, workers: int,
                 expect: Mapping[Path, Identity], ahead: int) -> "_Threads":
    if kind == "processes":
        return _Processes(embedder, draft_size, workers, expect, ahead)
    if kind == "nvjpeg":
        return _TensorJpeg(embedder, draft_size, workers, expect)
    return _Threads(embedder, draft_size, workers, expect)


class _Threads:
    """Pillow in a thread pool; batches collated by the embedder (uint8 where it can)."""

    def __init__(self, embedder: "Embedder", draft_size: int | None, workers: int,
                 expect: Mapping[Path, Identity]) -> None:
        self.embedder, self.draft_size, self.expect = embedder, draft_size, expect
        self.uint8 = uint8_spec(embedder) is not None
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="mmsearch-decode")

    def submit(self, path: Path) -> Future:
        return self.pool.submit(prepare, path, self.embedder, self.draft_size, self.expect.get(path))

    def collate(self, chunk: list[tuple[Path, Any]], times: StageTimes) -> Chunk:
        ok = [(p, t) for p, t in chunk if not isinstance(t, str)]
        failed = [(p, t) for p, t in chunk if isinstance(t, str)]
        times.decode += sum(t[1] for _, t in ok)
        times.prepare += sum(t[2] for _, t in ok)
        items = [t[0] for _, t in ok]
        batch = None
        if items:
            batch = self.embedder.collate(items, uint8=True) if self.uint8 else \
                self.embedder.collate(items)
        return [p for p, _ in ok], failed, batch

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class _Processes(_Threads):
    """Pillow in worker processes (:class:`~mmsearch.ingest.procdecode.ProcessDecoder`)."""

    def __init__(self, embedder: "Embedder", draft_size: int | None, workers: int,
                 expect: Mapping[Path, Identity], slots: int) -> None:
        from mmsearch.ingest.procdecode import ProcessDecoder

        super().__init__(embedder, draft_size, 1, expect)
        spec = uint8_spec(embedder)
        assert spec is not None
        self.decoder = ProcessDecoder(workers, spec, draft_size, slots)
        self.slots = self.decoder.slots

    def submit(self, path: Path) -> Future:
        return self.decoder.submit(path, self.expect.get(path))

    def close(self) -> None:
        self.decoder.close()
        super().close()


@dataclass(frozen=True)
class _Jpeg:
    """A file's bytes, for the tensor decoder, and the seconds reading them took."""

    data: "torch.Tensor"
    read_s: float


class _TensorJpeg(_Threads):
    """Threads read bytes (and decode with Pillow what the tensor decoder does not take);
    each batch's JPEGs are decoded, resized and cropped together on the model's device."""

    def __init__(self, embedder: "Embedder", draft_size: int | None, workers: int,
                 expect: Mapping[Path, Identity]) -> None:
        super().__init__(embedder, draft_size, workers, expect)
        spec = uint8_spec(embedder)
        assert spec is not None
        self.spec = spec
        self.device = str(embedder.device)

    def submit(self, path: Path) -> Future:
        return self.pool.submit(self._read, path)

    def _read(self, path: Path) -> "_Jpeg | tuple[Any, float, float]":
        import torch

        from mmsearch.ingest.gpudecode import tensor_decodable

        t0 = time.perf_counter()
        try:
            data = read_bytes(path)
        except DecodeError:
            data = bytearray()  # Pillow's path gives the reason
        if not tensor_decodable(data, self.draft_size):
            return prepare(path, self.embedder, self.draft_size, self.expect.get(path))
        if path in self.expect:
            check_unchanged(path, self.expect[path])
        return _Jpeg(torch.frombuffer(data, dtype=torch.uint8), time.perf_counter() - t0)

    def collate(self, chunk: list[tuple[Path, Any]], times: StageTimes) -> Chunk:
        from mmsearch.ingest.gpudecode import decode_resize

        at = [i for i, (_, t) in enumerate(chunk) if isinstance(t, _Jpeg)]
        t0 = time.perf_counter()
        images = decode_resize([chunk[i][1].data for i in at], self.spec, self.device)
        times.gpu_decode += time.perf_counter() - t0
        times.decode += sum(chunk[i][1].read_s for i in at)
        chunk = list(chunk)
        for i, image in zip(at, images):
            path = chunk[i][0]
            chunk[i] = (path, image if image is not None else self._pillow(path))
        return self._assemble(chunk, times)

    def _pillow(self, path: Path) -> "tuple[Any, float, float] | str":
        """A file the tensor decoder refused: Pillow decodes it or says why it is bad."""
        try:
            return prepare(path, self.embedder, self.draft_size, self.expect.get(path))
        except DecodeError as exc:
            return str(exc)

    def _assemble(self, chunk: list[tuple[Path, Any]], times: StageTimes) -> Chunk:
        """One uint8 (N, H, W, 3) batch on the device, in the chunk's order."""
        import torch

        from mmsearch.models.device import stack_uint8

        ok = [(p, t) for p, t in chunk if not isinstance(t, str)]
        failed = [(p, t) for p, t in chunk if isinstance(t, str)]
        if not ok:
            return [], failed, None
        pil = [t for _, t in ok if isinstance(t, tuple)]
        times.decode += sum(t[1] for t in pil)
        times.prepare += sum(t[2] for t in pil)
        uploaded: Iterator[torch.Tensor] = iter(())
        if pil:
            host = stack_uint8([t[0] for t in pil], pin=self.device.startswith("cuda"))
            uploaded = iter(host.to(self.device, non_blocking=True).permute(0, 3, 1, 2))
        images = [t if isinstance(t, torch.Tensor) else next(uploaded) for _, t in ok]
        return [p for p, _ in ok], failed, torch.stack(images).permute(0, 2, 3, 1)


def _in_turn(embedder: "Embedder", chunks: Iterable[Chunk], times: StageTimes) -> Iterator[Batch]:
    for paths, failed, batch in chunks:
        yield Batch(paths, _encode(embedder, batch, times), failed)


def _overlapped(embedder: "Embedder", chunks: Iterable[Chunk],
                times: StageTimes) -> Iterator[Batch]:
    """The model runs batch i in a thread while this one collects (and uploads) batch i+1."""
    with ThreadPoolExecutor(1, thread_name_prefix="mmsearch-model") as model:
        pending: tuple[list[Path], list[tuple[Path, str]], Future] | None = None
        for paths, failed, batch in chunks:
            job = model.submit(_encode, embedder, batch, times)
            if pending is not None:
                yield Batch(pending[0], pending[2].result(), pending[1])
            pending = (paths, failed, job)
        if pending is not None:
            yield Batch(pending[0], pending[2].result(), pending[1])


def _encode(embedder: "Embedder", batch: "torch.Tensor | None", times: StageTimes) -> np.ndarray:
    if batch is None:
        return np.zeros((0, 0), np.float32)
    t0 = time.perf_counter()
    vectors = embedder.encode_images(batch)
    times.model += time.perf_counter() - t0
    times.images += len(vectors)
    return vectors


def _prefetch(submit: Callable[[Path], Future], items: Iterable[Path],
              ahead: int) -> Iterator[tuple[Path, Any]]:
    """``submit`` each item with at most ``ahead`` results pending; results in order, a
    `DecodeError` as its message."""
    pending: deque[tuple[Path, Future]] = deque()
    it = iter(items)
    try:
        for item in it:
            pending.append((item, submit(item)))
            if len(pending) >= ahead:
                yield _result(*pending.popleft())
        while pending:
            yield _result(*pending.popleft())
    finally:
        for _, fut in pending:
            fut.cancel()


def _result(item: Path, fut: Future) -> tuple[Path, Any]:
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
