"""Transparent huge pages for the text tower's weights in a warm process (Linux).

Every text streams the tower's layer matrices from memory (151 MB for ViT-B-32). Held
in 4 KiB pages, that stream spends much of its time on address translation: a pass of
the numpy tower took 8.5 ms against 6.6 ms over 2 MiB pages, ONNX Runtime's graph
~10% longer for a caption and ~17% for a 3-word query. Two ways to get huge pages,
both only where the kernel gives them (THP ``always`` or ``madvise``):

* memory this process maps itself is advised ``MADV_HUGEPAGE`` before it is filled
  (:func:`.towerfile.read_resident`);
* memory a library allocated (ONNX Runtime's packed copy of the weights) is collapsed
  into huge pages after the fact with ``MADV_COLLAPSE`` (Linux 6.1 and later): the
  anonymous mappings that appeared or grew while it was built (:func:`anonymous`
  before, :func:`collapse` of what is new after). Only the pages already there are
  collapsed; nothing changes how later memory is given.
"""

from __future__ import annotations

import mmap
import sys
from pathlib import Path

_MADV_COLLAPSE = 25  # linux/mman.h, 6.1 and later
_HUGE = 1 << 21


def available() -> bool:
    """Whether huge pages can be had here (Linux, THP ``always`` or ``madvise``)."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False
    return "[always]" in mode or "[madvise]" in mode


def anonymous() -> set[tuple[int, int]]:
    """(start, end) of this process's writable anonymous mappings and its heap; empty where
    there is no ``/proc/self/maps``."""
    out = set()
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        fields = line.split()
        if fields[1].startswith("rw") and (len(fields) == 5 or fields[5] == "[heap]"):
            start, end = (int(v, 16) for v in fields[0].split("-"))
            out.add((start, end))
    return out


def collapse(regions: set[tuple[int, int]]) -> int:
    """``MADV_COLLAPSE`` over the 2 MiB-aligned part of each region; the bytes collapsed
    (0 where the kernel cannot: before Linux 6.1, THP off, memory too fragmented)."""
    if sys.platform != "linux" or not available():
        return 0
    import ctypes

    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    done = 0
    for start, end in sorted(regions):
        low, high = -(-start // _HUGE) * _HUGE, end // _HUGE * _HUGE
        if high > low and madvise(low, high - low, _MADV_COLLAPSE) == 0:
            done += high - low
    return done


__all__ = ["anonymous", "available", "collapse"]
