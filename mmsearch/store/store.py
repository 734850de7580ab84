"""One index on disk, and the only code that writes it.

``<home>/<name>/catalog.sqlite``  source of truth: rows, vectors, model identity
``<home>/<name>/images.faiss``    derived: image vectors, ids = images.id
``<home>/<name>/texts.faiss``     derived: text vectors, ids = texts.id
``<home>/<name>/write.lock``      held (flock) by the one process writing
``<home>/<name>/shards/``         a distributed run's files; in an index stored as
                                  ``shards``, the image vectors (:mod:`.storage`)

Every write goes through a verb of :class:`Store` (``put_images``,
``forget_images``, ``put_texts``, ``forget_texts``, ...), which commits the
catalog first (rows and their vectors in one transaction) and then brings the
loaded FAISS index along; FAISS files are saved atomically, never ahead of the
catalog (:mod:`.vectorfiles`). An id is never reused and never changes vector:
a changed file gets a new id. So a run killed at any moment leaves an index
that opens, and a stale FAISS file is repaired from the catalog by ids
(reported in :attr:`Store.repairs`). Readers get :attr:`Store.read`, the
catalog's queries without its writes, and never write; only the process
holding the write lock saves.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from mmsearch.errors import CorruptIndexError, EmptyIndexError, IndexNotFoundError, StorageError
from mmsearch.locations import Roots
from mmsearch.models.identity import ModelIdentity
from mmsearch.store import integrity, selection
from mmsearch.store.catalog import Catalog, CatalogReader, EmptyCatalogError, ImageFile, StoredImage
from mmsearch.store.schema import VideoFile
from mmsearch.store.lock import WriteLock, lock_holder
from mmsearch.store.selection import ImageSelection, MetadataSummary
from mmsearch.store.storage import STORAGES, VectorSource, VectorsOrLocations
from mmsearch.store.vectorfiles import KINDS, Kind, VectorFiles
from mmsearch.store.vectors import IndexPlan, VectorIndex

CATALOG = "catalog.sqlite"
WEIGHTS_FILE = "weights_file"  # catalog meta: the cached file of a tag's weights
ROOTS = "roots"                # catalog meta: JSON list of the canonical roots indexed
SELECTION_CACHE = 8            # filter selections kept by select_images


@dataclass(frozen=True)
class RunIntent:
    """What an index run is about to write, recorded by :meth:`Store.index_run` before
    its first photo."""

    identity: ModelIdentity
    dim: Callable[[], int]                 # asked only for a new index (it may load the model)
    storage: str                           # of a new index
    roots: Sequence[str]                   # canonical folders, files and URLs of the run
    index_type: str | None                 # the FAISS type asked for (None: as recorded)
    weights_file: Callable[[], str | None] = lambda: None  # asked when the run ends


class Store:
    """An open index folder. Use :meth:`open`; close with :meth:`close`.

    ``gpu`` (from ``--device``, see :func:`mmsearch.models.device.faiss_gpu`) says
    where FAISS may search: None keeps it on the CPU.
    """

    def __init__(self, root: Path, catalog: Catalog, gpu: int | None = -1) -> None:
        self.root = root
        self._catalog = catalog
        self.read: CatalogReader = catalog.reader()
        self.repairs: list[str] = []
        self._lock = WriteLock(root)
        self._files = VectorFiles(root, catalog, self._lock, lambda: self.dim, self.repairs, gpu)
        self._seen = self._signature()
        self._selections: dict[tuple, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._videos: tuple[tuple, bool] | None = None  # (signature, any video indexed)
        self._deferred: bool | None = None  # None: image writes update the loaded index

    @classmethod
    def open(cls, root: Path, *, create: bool, gpu: int | None = -1) -> "Store":
        """Open an index folder; ``create`` makes it (a writer), otherwise it must exist.

        Raises :class:`IndexNotFoundError` (no such index), :class:`EmptyIndexError`
        (created but nothing committed yet), :class:`CorruptIndexError` (damaged
        catalog) or :class:`StorageError` (cannot read or create it).
        """
        path = root / CATALOG
        if not path.is_file():
            if not create:
                raise IndexNotFoundError(
                    f"no index {root.name!r} in {root.parent} (run `mmsearch index FOLDER` first)")
            _make_folder(root)
        try:
            return cls(root, Catalog(path, create=create, require_schema=not create), gpu)
        except EmptyCatalogError:
            raise _never_committed(root) from None

    def close(self) -> None:
        self.unlock()
        self._catalog.close()

    # -- identity ----------------------------------------------------------------------
    @property
    def model(self) -> ModelIdentity | None:
        """The model the index was built with; None until one is recorded with its dimension."""
        return self.read.recorded_model()

    @property
    def dim(self) -> int | None:
        return self.read.recorded_dim()

    @property
    def schema_version(self) -> int:
        return self._catalog.schema_version

    @property
    def storage(self) -> str:
        """Where the image vectors are kept: ``catalog`` (blobs in the catalog) or ``shards``
        (npy files under ``shards/img_emb``); recorded with the model, never changed."""
        return self.read.storage

    @property
    def vector_source(self) -> VectorSource:
        """How the image vectors are kept: the object that answers for the storage."""
        return self.read.vector_source

    @property
    def requested_type(self) -> str:
        """The image index type asked for (``auto`` unless a run said otherwise)."""
        return self._files.requested_type

    @property
    def image_index(self) -> str:
        """The FAISS factory string of the image index as last built."""
        return self._catalog.get_meta("images_index") or "Flat"

    @property
    def roots(self) -> list[str] | None:
        """The canonical folders and files ever given to ``index`` (None: an index made
        before they were recorded)."""
        raw = self._catalog.get_meta(ROOTS)
        try:
            roots = json.loads(raw) if raw else None
        except ValueError:
            return None
        return [str(r) for r in roots] if isinstance(roots, list) else None

    @property
    def weights_file(self) -> str | None:
        """Where a pretrained tag's weights were cached when the index was built."""
        return self._catalog.get_meta(WEIGHTS_FILE)

    # -- the write lock ----------------------------------------------------------------
    def lock(self, timeout: float = 0.0) -> None:
        """Take the write lock (see :class:`~mmsearch.store.lock.WriteLock`); temporary
        files left by a killed save are removed once it is held."""
        if self._lock.acquire(timeout):
            self._files.remove_temp_files()

    def unlock(self) -> None:
        self._lock.release()

    @property
    def writing(self) -> bool:
        return self._lock.held

    # -- reading -----------------------------------------------------------------------
    def vectors(self, kind: Kind) -> VectorIndex:
        """The FAISS index of ``kind``, loaded once and checked against the catalog."""
        return self._files.get(kind)

    def build_index(self, kind: Kind, index_type: str) -> VectorIndex:
        """A new index of type ``index_type`` over the stored vectors, in memory only:
        nothing is saved and the index the store serves is left as it is."""
        return self._files.build(kind, index_type)

    def known_vectors(self, hashes: Iterable[str]) -> dict[str, np.ndarray]:
        """The stored vectors of these content hashes (those known)."""
        return self.read.known_vectors(hashes, self.dim or 0)

    def image_vectors(self, ids: Iterable[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        return self.read.image_vectors(self.dim or 0, ids)

    def text_vectors(self, ids: Iterable[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        return self.read.text_vectors(self.dim or 0, ids)

    def select_images(self, sel: ImageSelection) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, latitudes, longitudes) of the images ``sel`` keeps, in id order.

        The last few selections are kept while nothing is committed (a page scrolling
        through results asks for the same one again and again)."""
        key = (sel, self._signature())
        if key not in self._selections:
            if len(self._selections) >= SELECTION_CACHE:
                self._selections.pop(next(iter(self._selections)))
            self._selections[key] = selection.select_ids(self.read, sel)
        return self._selections[key]

    def has_videos(self) -> bool:
        """Whether any video is indexed: asked by every search, so kept, like the
        selections, while nothing is committed (a few ``stat`` calls, not a query)."""
        key = self._signature()
        if self._videos is None or self._videos[0] != key:
            self._videos = (key, self.read.video_count() > 0)
        return self._videos[1]

    def image_records(self, ids: Iterable[int]) -> dict[int, dict]:
        """id -> path, size, mtime_ns and metadata of these images."""
        return selection.records(self.read, ids)

    def missing_metadata(self, roots: Iterable[str] | None = None,
                         limit: int | None = None) -> list[tuple[int, str, int]]:
        """(id, path, mtime_ns) of images whose metadata was never read (an index made
        before schema v3), under ``roots`` when given."""
        return selection.missing_metadata(self.read, roots, limit)

    def metadata_summary(self) -> MetadataSummary:
        return selection.summary(self.read)

    def files(self) -> Iterator[tuple[str, Path, int]]:
        """(name, path, bytes) of the index's files, and those its storage adds (an index
        stored as shards: its npy shards, ``shards/img_emb``, their total)."""
        for name in (CATALOG, "images.faiss", "texts.faiss"):
            path = self.root / name
            if path.is_file():
                yield name, path, path.stat().st_size
        yield from self.vector_source.files()

    def refresh(self) -> bool:
        """Pick up what another process committed since this store last looked.

        Cheap (a few ``stat`` calls): when the catalog or a vector file changed,
        the loaded indexes are dropped and read again (and synced) on next use, and the
        storage is looked up again (a new index records it with its model). Vector shards
        are not watched: one is written whole before the catalog points into it. Returns
        whether anything changed. A store that is writing sees its own work.
        """
        now = self._signature()
        if now == self._seen or self.writing:
            self._seen = now
            return False
        self._seen = now
        self._catalog.reread_storage()
        self._files.forget_loaded()
        return True

    def _signature(self) -> tuple:
        names = (CATALOG, CATALOG + "-wal", "images.faiss", "texts.faiss")
        out = []
        for name in names:
            try:
                st = os.stat(self.root / name)
                out.append((st.st_ino, st.st_size, st.st_mtime_ns))
            except OSError:
                out.append(None)
        return tuple(out)

    # -- writing: every verb needs the write lock --------------------------------------
    def _writer(self) -> Catalog:
        if not self.writing:
            raise StorageError(f"{self.root.name}: writing needs the write lock (Store.lock())")
        return self._catalog

    def set_model(self, identity: ModelIdentity, dim: int, storage: str = "catalog") -> None:
        """Record the model, its dimension and the storage of a new index (all or none)."""
        if storage not in STORAGES:
            raise StorageError(f"unknown storage {storage!r}: choose {' or '.join(STORAGES)}")
        self._writer().set_metas({"model": identity.to_json(), "dim": str(dim),
                                  "storage": storage})
        self._files.forget_loaded()  # any index opened before had no dimension to go by

    def switch_text_tower(self, identity: ModelIdentity, texts: dict[int, np.ndarray]) -> None:
        """Record ``identity`` (the same image tower, another text tower) and the stored texts'
        vectors from it, in one transaction; the images' vectors stay as they are."""
        self._loaded_before_write("texts")
        self._writer().revector_texts(texts, {"model": identity.to_json()})
        self._files.rebuild("texts", note=False)

    def add_roots(self, roots: Iterable[str]) -> None:
        """Remember folders (or files) given to ``index``: the server serves files under them only."""
        known = self.roots or []
        held = Roots(known)  # a folder or file under a recorded root adds nothing (a watcher's
        new = {r for r in roots if r not in held}  # batches name subfolders, time after time)
        if new:
            self._writer().set_meta(ROOTS, json.dumps(sorted(set(known) | new)))

    @contextlib.contextmanager
    def index_run(self, intent: "RunIntent") -> Iterator[None]:
        """One index run's writes, in their order; the caller holds the write lock.

        Before the run writes its first photo: the model, dimension and storage of a new
        index, and the run's roots (an older index that never recorded roots first gets
        its photos' folders), so a run killed at any point leaves every photo it
        committed servable. After the run (stopped early or not): the cached weights
        file, and the image index retyped, rebuilt when its type should change. An error
        inside skips the closing steps; the next run or open catches up from the catalog.
        """
        self._writer()
        if self.model is None:
            self.set_model(intent.identity, intent.dim(), intent.storage)
        if self.roots is None and self.read.image_count():
            self.add_roots({os.path.dirname(p) for _, p in self.read.all_image_paths()})
        self.add_roots(intent.roots)
        yield
        weights = intent.weights_file()
        if weights and weights != self.weights_file:
            self.set_weights_file(weights)
        self.retype(intent.index_type)

    def set_weights_file(self, path: str) -> None:
        self._writer().set_meta(WEIGHTS_FILE, path)

    def put_images(self, files: Sequence[ImageFile], vectors: VectorsOrLocations, *,
                   replaces: Sequence[int | None] = (), new_content: bool = True,
                   ids: Sequence[int] | None = None, video: VideoFile | None = None,
                   replaces_video: int | None = None) -> np.ndarray:
        """Add rows for ``files`` with their ``vectors``; returns their new ids.

        ``vectors`` as the index's storage records them (:meth:`VectorSource.record`):
        float32 rows in an index stored in the catalog; in one stored as shards,
        :class:`~mmsearch.store.storage.InShards` (where each vector lies in an npy shard
        written before, and the vectors it gives back: ``vector_source.rows(...)``).
        ``replaces[i]``: the id of the row ``files[i]`` replaces (a changed file), or
        None. ``new_content=False``: the vectors are already stored under these
        content hashes (a moved or copied file), only rows are added. ``ids``: ids
        given out before by :meth:`reserve_image_ids` (default: fresh ones). One catalog
        transaction, then the loaded FAISS index. ``video``: ``files`` are the frames of
        this video, whose row is added with them (replacing the video ``replaces_video``,
        whose frames ``replaces`` names).
        """
        new, where, added = self.vector_source.record(files, vectors, new_content)
        old = np.asarray([i for i in replaces if i is not None], dtype=np.int64)
        commit = functools.partial(self._writer().commit_images, new, list(files),
                                   delete_ids=old, ids=ids, locations=where, video=video,
                                   replaces_video=replaces_video)
        if self._skip_index():
            return commit()
        self._loaded_before_write("images")
        ids = commit()
        if self._drop_vectors("images", old) and len(files):
            self._files.get("images").add(ids, np.asarray(added, dtype=np.float32))
        return ids

    @contextlib.contextmanager
    def image_index_deferred(self) -> Iterator[None]:
        """Image writes inside touch the catalog only, never the loaded image index: a
        distributed run's driver then never holds the vectors it stores. Afterwards the
        index is brought up to date from the stored vectors and saved, unless
        :meth:`install_index` (or :meth:`rebuild`) gave it a new one after the last write.
        An exception leaves that to the next load (which syncs the file with the catalog)."""
        self._writer()
        self.flush("images")
        self._files.forget_loaded()  # (read again, and synced, when next needed)
        self._deferred = False
        try:
            yield
        except BaseException:
            self._deferred = None  # the file is behind; the next load brings it up to date
            raise
        changed, self._deferred = self._deferred, None
        if changed:
            self._files.catch_up("images")

    def _skip_index(self) -> bool:
        """Whether an image write leaves the loaded index alone (see :meth:`image_index_deferred`)."""
        if self._deferred is None:
            return False
        self._deferred = True
        return True

    def reserve_image_ids(self, n: int) -> int:
        """Give out ``n`` consecutive image ids now (rows come later, through ``put_images(ids=)``:
        a distributed run names its shards' rows before they are embedded); the first."""
        return self._writer().reserve_image_ids(n)

    def install_index(self, index: VectorIndex, asked: str) -> None:
        """Serve and save ``index``, built elsewhere over the catalog's vectors (a sharded
        build) as the factory ``asked``; ids it lacks or should not have are synced first."""
        self._writer()
        self._files.install("images", index, {"images_index": index.description,
                                              "images_index_asked": asked})
        if self._deferred:
            self._deferred = False  # it holds every write so far

    def touch_images(self, rows: Sequence[StoredImage]) -> None:
        """Record where files whose content did not change are now, and their size and
        mtime: a touched file (same path) or a moved one (a new path; the id, the vector
        and its place in the index stay)."""
        self._writer().touch_images(list(rows))

    def set_metadata(self, rows: Iterable[tuple[int, dict]]) -> None:
        """Record the metadata read from existing images' files (no vector changes)."""
        self._writer().set_metadata(rows)

    def forget_images(self, ids: np.ndarray) -> None:
        """Delete these image rows (their vectors stay until :meth:`prune`) and their FAISS entries."""
        if self._skip_index():
            self._writer().commit_images({}, [], delete_ids=ids)
            return
        self._loaded_before_write("images")
        self._writer().commit_images({}, [], delete_ids=ids)
        self._drop_vectors("images", np.asarray(ids, dtype=np.int64))

    def move_videos(self, rows: Sequence[StoredImage]) -> None:
        """Record where videos whose content did not change are now (``rows``: video ids,
        new paths, sizes and mtimes); their frames keep their ids and vectors."""
        self._writer().move_videos(list(rows))

    def forget_videos(self, ids: Iterable[int]) -> None:
        """Forget these videos: their frames (rows and FAISS entries), then their rows."""
        ids = [int(i) for i in ids]
        if ids:
            self.forget_images(self.read.frame_ids(ids))
            self._writer().delete_videos(ids)

    def forget_under(self, root: str) -> int:
        """Forget every image and video at or under the canonical path ``root``; returns
        how many image rows (photos and video frames) went."""
        ids = self.read.image_ids_under(root)
        self.forget_images(ids)
        self._writer().delete_videos(r.id for r in self.read.videos_under(root).values())
        self.prune()
        self.flush()
        return int(ids.size)

    def prune(self) -> int:
        """Delete stored vectors no image row uses any more."""
        return self._writer().drop_orphan_embeddings()

    def put_texts(self, rows: Sequence[tuple[str, str, np.ndarray]]) -> tuple[int, int]:
        """Store (key, text, vector) rows, replacing a key's older text; returns (added, replaced).

        Rows identical to a stored one are skipped. The text index is updated and saved.
        """
        self._loaded_before_write("texts")
        new_ids, replaced = self._writer().upsert_texts(list(rows))
        if self._drop_vectors("texts", replaced) and new_ids.size:
            self._files.get("texts").add(*self.text_vectors(new_ids))  # as stored, in id order
        self.flush("texts")
        return int(new_ids.size - replaced.size), int(replaced.size)

    def forget_texts(self, keys: Iterable[str] | None = None) -> int:
        """Delete the texts with these keys (every text with None); returns how many."""
        self._loaded_before_write("texts")
        ids = self._writer().delete_texts(None if keys is None else list(keys))
        self._drop_vectors("texts", ids)
        self.flush("texts")
        return int(ids.size)

    def _loaded_before_write(self, kind: Kind) -> None:
        """Load (and sync) the index of ``kind`` before the catalog changes, so that the
        verb's own rows are added once: by the verb, not also by a load that reads them."""
        self._writer()
        self._files.get(kind)

    def _drop_vectors(self, kind: Kind, ids: np.ndarray) -> bool:
        """Remove ``ids`` from the loaded index; False when it was rebuilt from the catalog
        instead (an index type that cannot remove them), which then holds every row."""
        if ids.size and not self._files.get(kind).remove(ids):
            self._files.rebuild(kind, note=False)
            return False
        return True

    def rebuild(self, kind: Kind, *, index_type: str | None = None) -> VectorIndex:
        """Build the index of ``kind`` from the catalog again (as ``index_type``) and save it."""
        self._writer()
        if kind == "images" and self._deferred:
            self._deferred = False  # it holds every write so far
        return self._files.rebuild(kind, note=False, index_type=index_type)

    def retype(self, requested: str | None = None) -> None:
        """Record ``requested`` (if given) and rebuild the image index if its type should change."""
        catalog = self._writer()
        if requested is not None:
            catalog.set_meta("index_type", requested)
        if self.dim is None:
            return
        if not self.image_index_plan()[1]:
            self._files.rebuild("images", note=False)

    def image_index_plan(self, index_type: str | None = None) -> tuple[IndexPlan, bool]:
        """(the plan of the image index for the stored images, as ``index_type`` or else the
        type asked for the index; whether the index as last built is that plan's)."""
        plan = self._files.plan("images", index_type)
        return plan, self._files.is_built("images", plan)

    def training_sample(self, plan: IndexPlan) -> np.ndarray | None:
        """Image vectors to train ``plan`` on: the random sample a rebuild draws (None: it
        needs no training)."""
        return self._files.training_sample("images", plan)

    def flush(self, kind: Kind = "images") -> None:
        """Save the loaded FAISS index of ``kind`` (done at the end of every write run)."""
        self._writer()
        self._files.flush(kind)

    # -- integrity ---------------------------------------------------------------------
    def check(self) -> list[str]:
        """Problems found between catalog, FAISS files and disk; nothing is changed."""
        return integrity.check(self._catalog, self._files, self.vector_source, self.root)

    def repair(self) -> tuple[list[str], list[tuple[str, str]]]:
        """Fix what :meth:`check` finds; returns (image paths, (key, text) pairs) whose
        damaged vectors were dropped, for the caller to embed again (see
        :meth:`VectorSource.reembed`)."""
        return integrity.repair(self._writer(), self._files)


def _make_folder(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot create {root}: {exc.strerror or exc}") from exc


def _never_committed(root: Path) -> Exception:
    """The error for a catalog file that holds no schema: nothing was ever committed."""
    if any((root / f"{kind}.faiss").is_file() for kind in KINDS):
        # vector files are only written once the catalog holds a schema
        return CorruptIndexError(
            f"catalog {root / CATALOG} is empty but vector files exist: the catalog was lost; "
            f"delete {root} and run `mmsearch index` again")
    if lock_holder(root) is not None:
        return EmptyIndexError(f"index {root.name!r} is being created by another "
                               "process and holds nothing yet; try again shortly")
    return EmptyIndexError(f"index {root.name!r} holds nothing yet (its first run was "
                           "interrupted): run `mmsearch index FOLDER`")
