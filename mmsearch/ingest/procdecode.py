"""Decoding in worker processes, the pixels handed back through shared memory.

Threads share one interpreter: Pillow releases the GIL while it decodes and resizes,
but the Python between those calls does not, and with many cores decoding is then
bound by the GIL (decode time summed over 16 threads was 3-5x one thread's). Worker
processes have no such limit. Each decodes a file with the same code as the threads
(:func:`mmsearch.ingest.decode.load_image`: formats, size limits, EXIF orientation,
the same one-line reasons), runs the resize and crop with Pillow alone
(:mod:`mmsearch.ingest.steps`; no torch in the workers) and writes the uint8 result
into a slot of a shared-memory ring; only the slot number crosses the pipe.

Workers are started with ``forkserver`` (``spawn`` where that is missing), never a
bare fork of a process that runs torch's threads, and without importing the caller's
``__main__`` (so a script needs no ``if __name__ == "__main__"`` guard for them). A worker that dies (a decoder
crash) makes the pool unusable: the file in hand and every later one are then decoded
in the calling process instead, so a run never loses files to it.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.context as mpc
import os
import sys
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from mmsearch.errors import DecodeError
from mmsearch.ingest.decode import check_unchanged, load_image
from mmsearch.ingest.steps import CropSpec, apply_pil

Prepared = tuple[np.ndarray, float, float]  # (uint8 HxWx3, decode s, prepare s)
Identity = tuple[int, int]                  # (size, mtime_ns), as the scan saw it

_WORKER: dict[str, Any] = {}  # in a worker process: its view of the ring, spec, draft size


def decode_one(path: Path | str, spec: CropSpec, draft_size: int | None,
               expect: Identity | None) -> Prepared:
    """One file -> (uint8 HxWx3, decode s, prepare s), as the decode threads do it."""
    t0 = time.perf_counter()
    image = load_image(path, draft_size=draft_size)
    if expect is not None:
        check_unchanged(path, expect)
    t1 = time.perf_counter()
    try:
        array = apply_pil(image, spec)
    except Exception as exc:  # a resize failing on a strange image is a decode failure
        raise DecodeError(f"preprocessing failed: {exc}") from exc
    return array, t1 - t0, time.perf_counter() - t1


def _attach(name: str, shape: tuple[int, ...], spec: CropSpec, draft_size: int | None) -> None:
    """Worker initialiser: map the ring (the parent owns and unlinks it)."""
    shm = SharedMemory(name=name)
    _WORKER.update(shm=shm, ring=np.ndarray(shape, np.uint8, shm.buf), spec=spec,
                   draft_size=draft_size)


def _decode_into(path: str, slot: int, expect: Identity | None) -> tuple[float, float]:
    """Worker task: decode ``path`` into ``slot`` of the ring; returns (decode s, prepare s)."""
    array, decode_s, prepare_s = decode_one(path, _WORKER["spec"], _WORKER["draft_size"], expect)
    ring = _WORKER["ring"]
    if array.shape != ring.shape[1:]:
        raise DecodeError(f"preprocessing failed: got {array.shape}, expected {ring.shape[1:]}")
    ring[slot] = array
    return decode_s, prepare_s


class _NoMain:
    """A process whose start does not tell it to import the caller's ``__main__``."""

    def start(self) -> None:
        with _main_hidden():
            super().start()  # type: ignore[misc]


class _SpawnProcess(_NoMain, mpc.SpawnProcess):
    pass


class _SpawnContext(mpc.SpawnContext):
    Process = _SpawnProcess


if hasattr(mpc, "ForkServerContext"):  # POSIX
    class _ForkServerProcess(_NoMain, mpc.ForkServerProcess):
        pass

    class _ForkServerContext(mpc.ForkServerContext):
        Process = _ForkServerProcess


def _context() -> Any:
    """``forkserver`` (``spawn`` where missing), with workers that do not import the caller's
    ``__main__``: they need only this module, and a script without an ``if __name__ ==
    "__main__"`` guard (or one read from stdin) would otherwise run again in each of them."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        return _ForkServerContext()
    return _SpawnContext()


@contextlib.contextmanager
def _main_hidden() -> Iterator[None]:
    """``__main__`` without ``__file__`` and ``__spec__`` for a moment: multiprocessing then
    tells a new process (and the fork server) not to import it."""
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    spec, file = getattr(main, "__spec__", None), main.__dict__.pop("__file__", None)
    main.__spec__ = None
    try:
        yield
    finally:
        main.__spec__ = spec
        if file is not None:
            main.__file__ = file


def _slots_that_fit(wanted: int, slot_bytes: int, workers: int) -> int:
    """Slots for the ring: ``wanted``, fewer where /dev/shm is small (a container's 64 MB:
    writing past what it holds kills a worker with SIGBUS), at least two per worker."""
    try:
        st = os.statvfs("/dev/shm")
        free = st.f_bavail * st.f_frsize
    except OSError:
        return wanted
    return max(2 * workers, min(wanted, free // (2 * slot_bytes)))


class ProcessDecoder:
    """``submit(path, expect)`` -> a future of :data:`Prepared`, decoded in a worker process.

    ``slots`` bounds the files in flight (the caller keeps at most :attr:`slots` pending:
    fewer than asked where shared memory is short); a slot is free again once the worker's
    pixels have been copied out of it.
    """

    def __init__(self, workers: int, spec: CropSpec, draft_size: int | None, slots: int) -> None:
        size = spec.out_size
        if size is None:
            raise ValueError("process decoding needs a transform with a fixed output size")
        self.spec, self.draft_size = spec, draft_size
        self.slots = slots = _slots_that_fit(slots, size[0] * size[1] * 3, workers)
        shape = (slots, size[0], size[1], 3)
        self._shm = SharedMemory(create=True, size=int(np.prod(shape)))
        self._ring: np.ndarray | None = np.ndarray(shape, np.uint8, self._shm.buf)
        self._free = list(range(slots - 1, -1, -1))
        self._broken = False
        self._pool = ProcessPoolExecutor(workers, mp_context=_context(), initializer=_attach,
                                         initargs=(self._shm.name, shape, spec, draft_size))

    def submit(self, path: Path, expect: Identity | None) -> "Future[Prepared]":
        done: Future[Prepared] = Future()
        if self._broken or not self._free:
            return self._local(done, path, expect)
        slot = self._free.pop()
        try:
            inner = self._pool.submit(_decode_into, str(path), slot, expect)
        except (BrokenProcessPool, RuntimeError):
            self._free.append(slot)
            self._broken = True
            return self._local(done, path, expect)
        inner.add_done_callback(lambda f: self._finish(f, done, slot, path, expect))
        return done

    def _finish(self, inner: Future, done: "Future[Prepared]", slot: int, path: Path,
                expect: Identity | None) -> None:
        """Runs when the worker answers: copy the slot out and free it, or pass on the error."""
        try:
            if not done.set_running_or_notify_cancel():
                return  # the caller gave up on it (a run stopped early)
            decode_s, prepare_s = inner.result()
            assert self._ring is not None
            done.set_result((self._ring[slot].copy(), decode_s, prepare_s))
        except BrokenProcessPool:
            self._broken = True
            self._local(done, path, expect)
        except BaseException as exc:  # noqa: BLE001 - DecodeError, or a cancellation
            done.set_exception(exc)
        finally:
            self._free.append(slot)

    def _local(self, done: "Future[Prepared]", path: Path,
               expect: Identity | None) -> "Future[Prepared]":
        try:
            done.set_result(decode_one(path, self.spec, self.draft_size, expect))
        except DecodeError as exc:
            done.set_exception(exc)
        return done

    def close(self) -> None:
        """Stop the workers and free the shared memory."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._ring = None
        self._shm.close()
        self._shm.unlink()
