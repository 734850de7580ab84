"""A text tower's weights as a safetensors file under the mmsearch home, memory-mapped.

A checkpoint (``.pt`` needs torch to read) is converted once into
``<home>/.models/text/<key>.safetensors``: float32 tensors in the layout the numpy
tower multiplies with, and in its header the spec and the fingerprint of the
checkpoint it came from. The file is written to a temporary name and renamed into
place (readers never see half a file; two writers race harmlessly), and written again
when the checkpoint's fingerprint no longer matches. Reading parses the header and
maps the file: numpy arrays over the page cache, no torch, only the pages used read;
:func:`read_resident` reads chosen tensors into the process's own huge pages instead.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from mmsearch.models import hugepages

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

FOLDER = Path(".models") / "text"  # under the home; not an index name (those start alnum)
FORMAT = "mmsearch-text-tower-2"  # 2: the layers' matrices as texttower._blocked blocks


def tower_path(home: Path, weights: Path, spec: str) -> Path:
    """Where the tower of checkpoint ``weights`` with this ``spec`` (its JSON) is kept."""
    key = hashlib.blake2b(f"{weights.resolve()}\0{spec}".encode(), digest_size=12).hexdigest()
    return home / FOLDER / f"{key}.safetensors"


def write(path: Path, tensors: dict[str, "np.ndarray"], meta: dict[str, str]) -> None:
    """Write ``tensors`` (float32) and ``meta`` as a safetensors file, atomically."""
    import numpy as np
    from safetensors import SafetensorError
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()},
                  str(tmp), metadata={"format": FORMAT, **meta})
        os.replace(tmp, path)
    except SafetensorError as exc:  # its I/O errors (a full disk): an OSError like the rest
        raise OSError(f"cannot write {path}: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)


def header(path: Path) -> tuple[dict, dict[str, str]] | None:
    """(tensor entries, metadata) of a file of this format, None if absent or another one."""
    try:
        with path.open("rb") as f:
            return _header(f)
    except OSError:
        return None


def _header(f: "BinaryIO") -> tuple[dict, dict[str, str]] | None:
    """:func:`header` of an open file, left at the start of the tensors' data."""
    try:
        (size,) = struct.unpack("<Q", f.read(8))
        head = json.loads(f.read(size))
    except (ValueError, struct.error):
        return None
    meta = head.pop("__metadata__", None) or {}
    return (head, meta) if meta.get("format") == FORMAT else None


def read(path: Path) -> dict[str, "np.ndarray"]:
    """The file's tensors as read-only float32 arrays over one memory map."""
    import numpy as np

    found = header(path)
    if found is None:
        raise OSError(f"not a text-tower file: {path}")
    entries, _ = found
    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    start = 8 + size
    out = {}
    for name, e in entries.items():
        if e["dtype"] != "F32":
            raise OSError(f"unexpected dtype {e['dtype']} in {path}")
        begin, end = e["data_offsets"]
        out[name] = np.frombuffer(buf, np.float32, (end - begin) // 4, start + begin).reshape(e["shape"])
    return out


def read_resident(path: Path, names: list[str], source: str) -> dict[str, "np.ndarray"] | None:
    """Tensors ``names`` of the file read into process memory backed by huge pages, or None
    where the system has none to give (not Linux, transparent huge pages off) or the file
    is no longer the one made from ``source`` (its checkpoint's fingerprint).

    The page cache under :func:`read`'s map may hold the file in 4 KiB pages: streaming the
    layers' 151 MB through them (ViT-B-32) for every text took 8.5 ms on one core, from
    2 MiB pages 6.6 ms. Costs that much private memory, and ~50 ms to read."""
    import numpy as np

    if not hugepages.available():
        return None
    with path.open("rb") as f:
        found = _header(f)
        if found is None or found[1].get("source") != source:
            return None
        entries, start = found[0], f.tell()
        spans = sorted((entries[n]["data_offsets"], n) for n in names)
        total = sum(end - begin for (begin, end), _ in spans)
        memory = mmap.mmap(-1, max(total, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        memory.madvise(mmap.MADV_HUGEPAGE)
        view, out, at = memoryview(memory), {}, 0
        for (begin, end), name in spans:
            f.seek(start + begin)
            if f.readinto(view[at:at + end - begin]) != end - begin:
                raise OSError(f"{path} is shorter than its header says")
            array = np.frombuffer(memory, np.float32, (end - begin) // 4, at)
            out[name] = array.reshape(entries[name]["shape"])
            out[name].flags.writeable = False
            at += end - begin
    return out


__all__ = ["FOLDER", "header", "read", "read_resident", "tower_path", "write"]
