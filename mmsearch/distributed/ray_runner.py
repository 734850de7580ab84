"""The cluster's work, as one Ray Data pipeline: manifest rows -> decode -> embed.

* **decode** (CPU tasks, ``map_batches``): hash the file, read its metadata, decode and
  preprocess it with the local runner's code (:func:`mmsearch.ingest.embed.prepare`
  with the model's own ``prepare``; a URL's bytes are read once with fsspec, then
  hashed, read and decoded in memory by the same code). A file that cannot be read or
  decoded becomes a row with status ``failed`` and its reason (the reason the local
  runner gives); a file whose content hash is its old row's becomes ``same`` (only its
  mtime changed). No row ever fails its block.
* **embed** (an actor pool, ``ActorPoolStrategy``): each actor loads the model once
  (one GPU per actor when the cluster has GPUs, else CPUs) and runs the local runner's
  ``collate`` + ``encode_images`` on the ``ok`` rows, so vectors are the local ones.

Results stream back to the driver (:func:`run_pipeline`), which groups them by shard.
A worker or actor that dies is retried by Ray; rows are keyed by id, so a retried
batch cannot duplicate one. :func:`ray_session` connects to a cluster (``address``)
or starts a local Ray for the run and stops it afterwards.

``MMSEARCH_RAY_FAULT``: a file path; when set and the file exists, the first embed
call to see it removes it and kills its worker (``os._exit``). Tests use it to
check that a killed worker loses nothing.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from mmsearch.errors import ClusterError, DecodeError, UsageError, first_line
from mmsearch.ingest.backfill import bytes_metadata, file_metadata
from mmsearch.ingest.decode import CHANGED, bytes_hash, content_hash
from mmsearch.ingest.embed import prepare, prepare_bytes
from mmsearch.ingest.remote import read_url
from mmsearch.locations import is_url

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa

    from mmsearch.models.identity import ModelIdentity
    from mmsearch.models.openclip import Embedder

FAULT_ENV = "MMSEARCH_RAY_FAULT"
DECODE_BATCH = 64       # rows per decode task call
DECODE_MEMORY = 256 << 20  # bytes reserved per decode task (a 12 MP photo decodes to 36 MB)
Row = dict[str, Any]    # one result: id, path, size, mtime_ns, status, reason, content_hash, meta, vector


def _ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise UsageError("--runner ray needs Ray: pip install 'mmsearch[ray]'") from None
    return ray


@contextmanager
def ray_session(address: str | None) -> Iterator[Any]:
    """Ray connected to ``address`` (``auto``: the cluster this machine is part of), or a
    local Ray started for the block and stopped after it; one already started is used as is."""
    ray = _ray()
    if ray.is_initialized():
        yield ray
        return
    try:
        ray.init(address=address, include_dashboard=False, logging_level=logging.ERROR,
                 log_to_driver=False, configure_logging=True)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address!r}" if address else "a local Ray"
        raise ClusterError(f"cannot start or reach {where}: {first_line(exc)}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def preparer(embedder: "Embedder") -> "Embedder":
    """A copy of ``embedder`` without its networks: what decode tasks need (``prepare`` and
    ``image_size``), small enough to send with every task."""
    import torch

    shell = copy.copy(embedder)
    for name, value in list(vars(shell).items()):
        if isinstance(value, torch.nn.Module):
            setattr(shell, name, None)
    return shell


def decode_batch(batch: dict[str, np.ndarray], shell: "Embedder", draft: bool) -> dict[str, Any]:
    """Manifest rows -> rows with status, reason, hash, metadata and the model's input."""
    out: dict[str, list] = {k: [] for k in ("id", "path", "size", "mtime_ns", "old_id", "status",
                                            "reason", "content_hash", "meta", "pixels", "layout")}
    draft_size = shell.image_size if draft else None
    for i in range(len(batch["id"])):
        row = {k: batch[k][i] for k in ("id", "path", "size", "mtime_ns", "old_id", "old_hash")}
        status, reason, digest, meta, pixels = _decode_one(row, shell, draft_size)
        data, layout = _to_bytes(pixels)
        for key, value in (("id", int(row["id"])), ("path", str(row["path"])),
                           ("size", int(row["size"])), ("mtime_ns", int(row["mtime_ns"])),
                           ("old_id", _maybe_int(row["old_id"])), ("status", status),
                           ("reason", reason), ("content_hash", digest),
                           ("meta", json.dumps(meta, default=str)), ("pixels", data),
                           ("layout", layout)):
            out[key].append(value)
    cols = {k: np.asarray(v) for k, v in out.items() if k != "pixels"}
    cols["old_id"] = np.asarray(out["old_id"], dtype=np.int64)
    cols["pixels"] = np.empty(len(out["pixels"]), dtype=object)
    cols["pixels"][:] = out["pixels"]  # bytes: one Arrow type whatever the images' shapes
    return cols


def _decode_one(row: dict[str, Any], shell: "Embedder",
                draft_size: int | None) -> tuple[str, str, str, dict, Any]:
    """(status, reason, content hash, metadata, model input) of one manifest row."""
    path = str(row["path"])
    try:
        if is_url(path):
            return _decode_url(path, row, shell, draft_size)
        digest = content_hash(path)
        meta = file_metadata(path, int(row["mtime_ns"]))
        if row["old_hash"] is not None and digest == str(row["old_hash"]):
            return "same", "", digest, meta, None
        pixels, _, _ = prepare(Path(path), shell, draft_size,
                               (int(row["size"]), int(row["mtime_ns"])))
        return "ok", "", digest, meta, pixels
    except DecodeError as exc:
        return "failed", str(exc), "", {}, None
    except Exception as exc:  # noqa: BLE001 - a row's failure must never fail its block
        return "failed", f"unexpected error: {type(exc).__name__}: {exc}", "", {}, None


def _decode_url(url: str, row: dict[str, Any], shell: "Embedder",
                draft_size: int | None) -> tuple[str, str, str, dict, Any]:
    """:func:`_decode_one` of a URL's row: its bytes read once, then hashed, their headers
    read and decoded by the same code as a local file's."""
    data = read_url(url)
    if len(data) != int(row["size"]):
        raise DecodeError(CHANGED)
    digest = bytes_hash(data)
    meta = bytes_metadata(data, url, int(row["mtime_ns"]))
    if row["old_hash"] is not None and digest == str(row["old_hash"]):
        return "same", "", digest, meta, None
    return "ok", "", digest, meta, prepare_bytes(data, shell, draft_size)


def _maybe_int(value: Any) -> int:
    try:
        return -1 if value is None or value != value else int(value)
    except (TypeError, ValueError):
        return -1


def _to_bytes(pixels: Any) -> tuple[bytes, str]:
    """A model input as (bytes, "kind dtype d0,d1,..."), kind ``array`` or ``tensor``."""
    if pixels is None:
        return b"", ""
    kind = "array" if isinstance(pixels, np.ndarray) else "tensor"
    arr = np.ascontiguousarray(pixels.numpy() if kind == "tensor" else pixels)
    return arr.tobytes(), f"{kind} {arr.dtype.str} {','.join(map(str, arr.shape))}"


def _from_bytes(data: bytes, layout: str) -> Any:
    """The model input :func:`_to_bytes` wrote."""
    kind, dtype, shape = layout.split(" ")
    arr = np.frombuffer(data, dtype=np.dtype(dtype)).reshape([int(d) for d in shape.split(",")])
    if kind == "array":
        return arr
    import torch

    return torch.from_numpy(arr.copy())


class EmbedActor:
    """One model per actor; embeds the ``ok`` rows of each batch. Use :func:`embed_actor`."""

    identity: "ModelIdentity"
    device: str

    def __init__(self) -> None:
        from mmsearch.models.backends import load_embedder

        self.embedder = load_embedder(self.identity, self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        _fault_point()
        ok = [i for i, s in enumerate(batch["status"]) if s == "ok"]
        vectors = np.zeros((len(batch["id"]), self.embedder.embed_dim), np.float32)
        if ok:
            items = [_from_bytes(batch["pixels"][i], str(batch["layout"][i])) for i in ok]
            vectors[ok] = self.embedder.encode_images(self.embedder.collate(items))
        out = {k: v for k, v in batch.items() if k not in ("pixels", "layout")}
        out["vector"] = vectors
        return out


def embed_actor(identity: "ModelIdentity", device: str) -> type[EmbedActor]:
    """:class:`EmbedActor` for this model and device, as a class without constructor
    arguments (Ray keeps constructor arguments in its object store, and warns about it)."""
    return type("EmbedActor", (EmbedActor,), {"identity": identity, "device": device})


def _fault_point() -> None:
    marker = os.environ.get(FAULT_ENV)
    if marker:
        try:
            os.remove(marker)
        except FileNotFoundError:
            return
        os._exit(17)


def _resources(ray: Any, device: str) -> tuple[int, dict[str, float]]:
    """(actors, resources per actor): a GPU each when the cluster has GPUs (and the device
    allows), else half the CPUs shared among them, leaving the rest to decode tasks."""
    total = ray.cluster_resources()
    gpus = int(total.get("GPU", 0))
    if gpus and device != "cpu":
        return gpus, {"num_gpus": 1, "num_cpus": 1}
    cpus = max(1, int(total.get("CPU", 1)))
    actors = max(1, cpus // 8)
    return actors, {"num_cpus": max(1, cpus // (2 * actors))}


def run_pipeline(ray: Any, manifests: list["pa.Table"], shell: "Embedder",
                 identity: "ModelIdentity", *, device: str, draft: bool,
                 batch_size: int) -> Iterator[list[Row]]:
    """Run the manifest tables through decode and embed; yields result rows batch by batch."""
    from ray.data import ActorPoolStrategy, DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    actors, per_actor = _resources(ray, device)
    ds = ray.data.from_arrow(manifests)
    ds = ds.map_batches(decode_batch, batch_size=DECODE_BATCH, batch_format="numpy",
                        fn_kwargs={"shell": shell, "draft": draft}, num_cpus=1,
                        memory=DECODE_MEMORY)  # (unlike the actors': never fused with them)
    actor = embed_actor(identity, "cuda" if "num_gpus" in per_actor else "cpu")
    ds = ds.map_batches(actor, batch_size=batch_size, batch_format="numpy",
                        compute=ActorPoolStrategy(size=actors), **per_actor)
    with _quiet("ray.data"):
        try:
            for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
                yield _rows(batch)
        except ray.exceptions.RayError as exc:
            raise ClusterError(f"the cluster's work failed: {first_line(exc)}") from None


@contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Ray Data's INFO and WARNING lines kept off the user's terminal for the block."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _rows(batch: dict[str, np.ndarray]) -> list[Row]:
    keys = ("id", "path", "size", "mtime_ns", "old_id", "status", "reason", "content_hash", "meta")
    rows = []
    for i in range(len(batch["id"])):
        row = {k: batch[k][i].item() if hasattr(batch[k][i], "item") else batch[k][i] for k in keys}
        row["vector"] = batch["vector"][i]
        rows.append(row)
    return rows
