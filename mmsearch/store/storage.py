"""Where an index keeps its image vectors: its *storage*, one object chosen when the catalog opens.

An index's storage is recorded with its model when it is made (meta ``storage``) and never
changes (:mod:`.shardvectors` says why there are two):

``catalog``  :class:`CatalogBlobs`: each distinct content's float32 vector is a blob in the
             catalog's ``embeddings`` table (every local index, and every index before v4).
``shards``   :class:`NpyShards`: the catalog keeps the rows and, per distinct content, where
             its vector lies, row ``r`` of the npy shard ``k`` (``shard``, ``shard_row``).

Everything that differs between them is answered by the :class:`VectorSource` the catalog
holds (:func:`vector_source`): how rows become vectors, which vectors are damaged and how
that is said, how a put records a vector (plain vectors, or :class:`InShards`), the files
the index adds, how a distributed run stores a shard and a cluster build reads the vectors,
and what repair does with images whose damaged vectors it forgot. :func:`storage_for_run`
chooses the storage of a run (and of a new index), and refuses a runner that cannot add
to it.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Iterator, Protocol, Sequence, Union

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.engine import Connection

from mmsearch.errors import StorageError, UsageError
from mmsearch.store.schema import EmbeddingRow, ImageFile, ImageRow, damaged_blob, from_blobs
from mmsearch.store.shardvectors import FOLDER, ShardVectors, as_stored

NEW_INDEX = {"local": "catalog", "ray": "shards"}  # the storage of a new index, by runner


@dataclass(frozen=True)
class InShards:
    """Image vectors already in npy shards, as :meth:`Store.put_images` takes them in an index
    stored as shards: ``places[i]`` is (shard, row) of the i-th file's vector, ``vectors``
    what the shards give back (:func:`~mmsearch.store.shardvectors.as_stored`), for the
    loaded FAISS index."""

    vectors: np.ndarray
    places: Sequence[tuple[int, int]]


VectorsOrLocations = Union[np.ndarray, InShards]


@dataclass(frozen=True)
class VectorChunk:
    """A part of a cluster build: ids and their vectors, sent along."""

    ids: np.ndarray
    vectors: np.ndarray

    def read(self) -> tuple[np.ndarray, np.ndarray]:
        return self.ids, self.vectors


@dataclass(frozen=True)
class ShardRows:
    """A part of a cluster build: rows ``rows`` of shard ``shard`` of the index at ``root``
    (the vectors of images ``ids``), read where the part is built, as the store reads them."""

    root: str
    shard: int
    ids: np.ndarray
    rows: np.ndarray
    dim: int

    def read(self) -> tuple[np.ndarray, np.ndarray]:
        where = np.full(self.rows.size, self.shard)
        return self.ids, ShardVectors(Path(self.root)).gather(where, self.rows, self.dim)


class Rows(Protocol):
    """The catalog's queries a cluster build's parts come from."""

    def image_count(self) -> int: ...

    def vector_chunks(self, kind: str, dim: int, size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]: ...

    def shard_locations(self) -> Iterator[tuple[int, np.ndarray, np.ndarray]]: ...

    def shard_count(self) -> int: ...


Place = Union[tuple[int, int], None]


class VectorSource(ABC):
    """How the index at ``root`` keeps its image vectors (see the module)."""

    name = ""
    located: tuple[Any, ...] = ()         # columns selected with an image's vector: where it lies
    vector_tables: tuple[str, ...] = ()   # the catalog's tables whose blobs are vectors
    summary: str | None = None            # the line `mmsearch info` shows (None: nothing to say)

    def __init__(self, root: Path) -> None:
        self.root = root

    # -- reading -------------------------------------------------------------------------
    @abstractmethod
    def place(self, located: Sequence[Any]) -> Place:
        """Where an image's vector lies, from the :attr:`located` columns of its row (None:
        in its blob)."""

    @abstractmethod
    def assemble(self, blobs: list[Any], places: list[Place], dim: int) -> np.ndarray:
        """The vectors of rows whose blobs and places these are, in order."""

    @abstractmethod
    def damaged(self, conn: Connection, dim: int) -> list[str]:
        """Content hashes whose image vector is damaged or cannot be read."""

    @abstractmethod
    def damage_message(self, n: int) -> str:
        """What `mmsearch check` says of ``n`` damaged image vectors."""

    def locations(self, conn: Connection) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(shard, image ids, rows) of the images whose vectors lie in npy shards, a shard at
        a time."""
        return iter(())

    def shard_count(self, conn: Connection) -> int:
        """How many npy shards hold vectors the catalog points to."""
        return 0

    @abstractmethod
    def parts(self, rows: Rows, dim: int, size: int) -> tuple[int, Iterator[VectorChunk | ShardRows]]:
        """(how many, the parts) a cluster build adds, each read with ``part.read()``."""

    def files(self) -> Iterator[tuple[str, Path, int]]:
        """(name, path, bytes) of the files this storage adds to the index folder."""
        return iter(())

    # -- writing -------------------------------------------------------------------------
    @abstractmethod
    def record(self, files: Sequence[ImageFile], given: VectorsOrLocations, new_content: bool
               ) -> tuple[dict[str, np.ndarray], dict[str, tuple[int, int]] | None, np.ndarray]:
        """How a put of ``files`` records ``given``: (new vectors by content hash, locations
        by content hash or None, the vectors for the loaded index). Given in the other
        storage's form, they are refused (:class:`StorageError`)."""

    def _refused(self, kept: str) -> StorageError:
        return StorageError(f"index {self.root.name!r} keeps its vectors in its {self.name}: "
                            f"they are stored {kept}")

    @abstractmethod
    def rows(self, shard: int, positions: Iterable[int], vectors: np.ndarray) -> VectorsOrLocations:
        """What a put takes for rows ``positions`` of the distributed run's shard ``shard``,
        whose vectors (as this storage gives them back) are ``vectors``."""

    @abstractmethod
    def store_shard(self, ids: np.ndarray, vectors: np.ndarray, *,
                    write: Callable[[np.ndarray, np.ndarray], None],
                    commit: Callable[[np.ndarray], None],
                    stored: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]) -> None:
        """A distributed run's shard, embedded as ``vectors`` (of images ``ids``), stored:
        its files written (``write(ids, vectors)``) and its rows committed (``commit(vectors
        as stored)``), in the order that leaves a killed run resumable; ``stored(ids)``
        reads back (ids, vectors) as the catalog holds them."""

    def commit_written(self, shards: Iterable[int], commit: Callable[[int], None]) -> None:
        """A resumed run's shards whose files exist: ``commit(k)`` each whose rows may not be
        committed yet."""

    def driver_writes(self, deferred: Callable[[], ContextManager[None]]) -> ContextManager[None]:
        """What a distributed run's driver stores inside: ``deferred()`` (writes leave the
        loaded image index alone, :meth:`Store.image_index_deferred`) or nothing."""
        return contextlib.nullcontext()

    # -- repair --------------------------------------------------------------------------
    @abstractmethod
    def reembed(self, paths: list[str], embed: Callable[[list[str]], int]) -> str:
        """What repair does with images whose damaged vectors it forgot, and says of it:
        ``embed(paths)`` embeds them again with the local runner (how many)."""

    @classmethod
    def refuse_runner(cls, runner: str, index: str | None) -> None:
        """Raise :class:`UsageError` when ``runner`` cannot add to an index stored so (``index``:
        its name; None: a new index)."""


class CatalogBlobs(VectorSource):
    """Each distinct content's float32 vector as a blob in the catalog's ``embeddings``."""

    name = "catalog"
    vector_tables = ("embeddings", "texts")

    def place(self, located: Sequence[Any]) -> Place:
        return None

    def assemble(self, blobs: list[Any], places: list[Place], dim: int) -> np.ndarray:
        return from_blobs(blobs, dim)

    def damaged(self, conn: Connection, dim: int) -> list[str]:
        rows = conn.execute(select(EmbeddingRow.content_hash, EmbeddingRow.vector))
        return [h for h, blob in rows if damaged_blob(blob, dim)]

    def damage_message(self, n: int) -> str:
        return f"{n} stored vectors are damaged"

    def parts(self, rows: Rows, dim: int, size: int) -> tuple[int, Iterator[VectorChunk | ShardRows]]:
        chunks = rows.vector_chunks("images", dim, size)  # read from the catalog as they go
        return -(-rows.image_count() // size), (VectorChunk(i, v) for i, v in chunks)

    def record(self, files: Sequence[ImageFile], given: VectorsOrLocations, new_content: bool
               ) -> tuple[dict[str, np.ndarray], dict[str, tuple[int, int]] | None, np.ndarray]:
        if isinstance(given, InShards):
            raise self._refused("as vectors, not shard locations")
        new = {f.content_hash: v for f, v in zip(files, given)} if new_content else {}
        return new, None, given

    def rows(self, shard: int, positions: Iterable[int], vectors: np.ndarray) -> VectorsOrLocations:
        return vectors

    def store_shard(self, ids: np.ndarray, vectors: np.ndarray, *,
                    write: Callable[[np.ndarray, np.ndarray], None],
                    commit: Callable[[np.ndarray], None],
                    stored: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]) -> None:
        # the rows and vectors first; the files, a copy of them for other tools, then say
        # the shard was stored: a run killed between them redoes the shard
        commit(vectors)
        write(*stored(ids))

    def reembed(self, paths: list[str], embed: Callable[[list[str]], int]) -> str:
        return f"re-embedded {embed(paths)} images whose vectors were damaged"


class NpyShards(VectorSource):
    """Image vectors in the npy shards under ``shards/img_emb`` (float16, unit length); the
    catalog's embedding rows say where (:class:`~mmsearch.store.shardvectors.ShardVectors`)."""

    name = "shards"
    located = (EmbeddingRow.shard, EmbeddingRow.shard_row)
    vector_tables = ("texts",)  # its image vectors are not in the catalog
    summary = "shards: image vectors in shards/img_emb/*.npy (float16), rows in the catalog"

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.shards = ShardVectors(root)  # (its cache of shard headers)

    def place(self, located: Sequence[Any]) -> Place:
        return (located[0], located[1]) if located and located[0] is not None else None

    def assemble(self, blobs: list[Any], places: list[Place], dim: int) -> np.ndarray:
        """Vectors from npy shards where ``places[i]`` says (k, row), from blobs elsewhere."""
        located = [i for i, p in enumerate(places) if p is not None]
        if not located:
            return from_blobs(blobs, dim)
        out = np.empty((len(blobs), dim), dtype=np.float32)
        at = np.asarray(located, dtype=np.int64)
        where = np.asarray([places[i] for i in located], dtype=np.int64)
        out[at] = self.shards.gather(where[:, 0], where[:, 1], dim)
        rest = [i for i, p in enumerate(places) if p is None]
        if rest:
            out[rest] = from_blobs([blobs[i] for i in rest], dim)
        return out

    def damaged(self, conn: Connection, dim: int) -> list[str]:
        """Also those whose shard cannot be read there: a missing, short or damaged npy file."""
        rows = conn.execute(select(EmbeddingRow.content_hash, EmbeddingRow.vector,
                                   EmbeddingRow.shard, EmbeddingRow.shard_row)).all()
        bad = [h for h, blob, k, _ in rows if k is None and damaged_blob(blob, dim)]
        located = [(h, k, r) for h, _, k, r in rows if k is not None]
        if located:
            mask = self.shards.damaged(np.asarray([k for _, k, _ in located], np.int64),
                                       np.asarray([r for _, _, r in located], np.int64), dim)
            bad += [h for (h, _, _), m in zip(located, mask) if m]
        return bad

    def damage_message(self, n: int) -> str:
        return (f"{n} image vectors cannot be read from their npy shards "
                "(shards/img_emb: a missing, short or damaged file)")

    def locations(self, conn: Connection) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        query = (select(ImageRow.id, EmbeddingRow.shard, EmbeddingRow.shard_row)
                 .join(EmbeddingRow, ImageRow.content_hash == EmbeddingRow.content_hash)
                 .where(EmbeddingRow.shard.is_not(None))
                 .order_by(EmbeddingRow.shard, ImageRow.id))
        current, ids, rows = None, [], []
        for image_id, k, row in conn.execute(query):
            if k != current and ids:
                yield current, np.asarray(ids, np.int64), np.asarray(rows, np.int64)
                ids, rows = [], []
            current = k
            ids.append(image_id)
            rows.append(row)
        if ids:
            yield current, np.asarray(ids, np.int64), np.asarray(rows, np.int64)

    def shard_count(self, conn: Connection) -> int:
        return int(conn.execute(select(func.count(func.distinct(EmbeddingRow.shard)))
                                .where(EmbeddingRow.shard.is_not(None))).scalar())

    def parts(self, rows: Rows, dim: int, size: int) -> tuple[int, Iterator[VectorChunk | ShardRows]]:
        """A part per shard: the tasks read the npy files themselves (the driver sends ids
        and row numbers only), streamed a shard at a time."""
        root = str(self.root)
        return rows.shard_count(), (ShardRows(root, k, i, r, dim) for k, i, r in rows.shard_locations())

    def files(self) -> Iterator[tuple[str, Path, int]]:
        folder = self.root / FOLDER / "img_emb"
        if folder.is_dir():
            yield "shards/img_emb", folder, sum(p.stat().st_size for p in folder.glob("*.npy"))

    def record(self, files: Sequence[ImageFile], given: VectorsOrLocations, new_content: bool
               ) -> tuple[dict[str, np.ndarray], dict[str, tuple[int, int]] | None, np.ndarray]:
        if not isinstance(given, InShards):
            raise self._refused("with their shard locations")
        where = {f.content_hash: (int(k), int(r)) for f, (k, r) in zip(files, given.places)}
        return {}, where, given.vectors

    def rows(self, shard: int, positions: Iterable[int], vectors: np.ndarray) -> VectorsOrLocations:
        return InShards(vectors, [(shard, j) for j in positions])

    def store_shard(self, ids: np.ndarray, vectors: np.ndarray, *,
                    write: Callable[[np.ndarray, np.ndarray], None],
                    commit: Callable[[np.ndarray], None],
                    stored: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]) -> None:
        # the npy first, whole, before a row points into it (it holds the vectors for good);
        # a run killed before the rows commits them from the files (commit_written)
        write(ids, vectors)
        commit(as_stored(vectors))

    def commit_written(self, shards: Iterable[int], commit: Callable[[int], None]) -> None:
        for k in shards:
            commit(k)

    def driver_writes(self, deferred: Callable[[], ContextManager[None]]) -> ContextManager[None]:
        return deferred()  # the driver never holds the vectors it stores

    def reembed(self, paths: list[str], embed: Callable[[list[str]], int]) -> str:
        return (f"forgot {len(paths)} images whose vectors were damaged; run "
                "`mmsearch index FOLDER --runner ray` on their folders to embed them")

    @classmethod
    def refuse_runner(cls, runner: str, index: str | None) -> None:
        if runner == "ray":
            return
        if index is None:
            raise UsageError("--storage shards needs --runner ray (the local runner keeps "
                             "vectors in the catalog)")
        raise UsageError(f"index {index!r} keeps its vectors in npy shards (it was made by "
                         "--runner ray): index it with --runner ray")


SOURCES: dict[str, type[VectorSource]] = {"catalog": CatalogBlobs, "shards": NpyShards}
STORAGES = tuple(SOURCES)


def source_class(name: str | None) -> type[VectorSource]:
    """The storage recorded as ``name``: an index that records none (or a name this code does
    not know) keeps its vectors in the catalog, as every index before schema v4."""
    return SOURCES.get(name or "", CatalogBlobs)


def vector_source(name: str | None, root: Path) -> VectorSource:
    """The :class:`VectorSource` of the index at ``root`` whose recorded storage is ``name``."""
    return source_class(name)(root)


def storage_summary(name: str) -> str | None:
    """The line `mmsearch info` shows for an index stored as ``name`` (None: nothing to say)."""
    return source_class(name).summary


def storage_for_run(recorded: str | None, runner: str, asked: str, index: str) -> str:
    """The storage of a run of ``runner`` on the index ``index``: its own (``recorded``; an
    explicit other one is refused), or for a new index (None) ``asked`` (``auto``:
    :data:`NEW_INDEX`). A runner that cannot add to that storage is refused."""
    if asked not in ("auto", *STORAGES):
        raise UsageError(f"unknown storage {asked!r}: choose auto, catalog or shards")
    if recorded is None:
        chosen = NEW_INDEX[runner] if asked == "auto" else asked
        SOURCES[chosen].refuse_runner(runner, None)
        return chosen
    if asked not in ("auto", recorded):
        raise UsageError(f"index {index!r} keeps its vectors in its {recorded}, and always will: "
                         f"leave out --storage, or make a new index (--index NEW)")
    source_class(recorded).refuse_runner(runner, index)
    return recorded
