"""The library's front door: :class:`Engine` ties store, model, ingest and search together.

    with Engine.open("photos", pretrained="/models/vit-b-32.pt") as engine:
        report = engine.index(["~/Pictures"])
        hits = engine.search("a dog on a beach", k=5)
        similar = engine.search(image="~/Pictures/dog.jpg")
        mixed = engine.search(Query.text("dog", 2) + Query.image("beach.jpg") - Query.text("people"))
        engine.add_texts(["a dog on a beach", "a red car"])
        captions = engine.search_texts(image="~/Pictures/dog.jpg")
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

from mmsearch.errors import ModelMismatchError, UsageError
from mmsearch.ingest.backfill import backfill_metadata
from mmsearch.ingest.embed import default_workers
from mmsearch.ingest.run import IndexReport, index_files
from mmsearch.ingest.videos import VideoOptions
from mmsearch.locations import as_url, canonical, given_root, is_url
from mmsearch.models.device import faiss_gpu, resolve_device, text_device
from mmsearch.models.identity import ModelIdentity, check_loaded, check_precision, identify
from mmsearch.progress import Progress, no_progress
from mmsearch.search.duplicates import DEFAULT_THRESHOLD, DuplicateGroup, find_duplicates
from mmsearch.models.languages import language_hint
from mmsearch.search.hits import Hits, ImageHit, TextHit
from mmsearch.search.query import Filters, Query, combine
from mmsearch.search.search import (check_k, check_text_query, empty_index, search_images,
                                    search_texts)
from mmsearch.settings import Settings, resolve
from mmsearch.store import MetadataSummary, RunIntent, Store, storage_for_run

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from mmsearch.models.openclip import Embedder, TextEncoder

__all__ = ["Engine", "ImageHit", "TextHit", "IndexReport", "IndexInfo", "TextReport", "Query",
           "Filters"]
ImageQuery = "str | Path | Image.Image"
TEXT_BATCH = 256  # texts per model call in add_texts


@dataclass(frozen=True)
class TextReport:
    added: int
    replaced: int
    unchanged: int


@dataclass(frozen=True)
class IndexInfo:
    name: str
    location: Path
    model: ModelIdentity | None
    dim: int | None
    images: int
    distinct_images: int
    texts: int
    image_index: str
    files: dict[str, int]
    schema_version: int
    repairs: list[str]
    metadata: MetadataSummary
    storage: str = "catalog"
    videos: int = 0       # video files; their frames are vectors beside the photos
    frames: int = 0


class Engine:
    """An open index plus (lazily) its model. Not thread-safe; one per thread."""

    def __init__(self, settings: Settings, *, create: bool = False) -> None:
        self.settings = settings
        self.store = Store.open(settings.index_dir, create=create, gpu=faiss_gpu(settings.device))
        asked = None
        if settings.model is not None or settings.pretrained is not None:
            asked = identify(settings.model, settings.pretrained)
        stored = self.store.model
        self.identity = check_loaded(stored, asked) if stored else (asked or identify(None, None))
        self._embedder: Embedder | None = None
        self._text_embedder: TextEncoder | None = None

    @classmethod
    def open(cls, index: str = "default", *, home: str | Path | None = None,
             model: str | None = None, pretrained: str | None = None, create: bool = True,
             **options: object) -> "Engine":
        """Open (or create) the index ``index`` under ``home`` (default: MMSEARCH_HOME)."""
        return cls(resolve(home=home, index=index, model=model, pretrained=pretrained,
                           **options), create=create)  # type: ignore[arg-type]

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.store.close()

    # -- model -----------------------------------------------------------------
    @functools.cached_property
    def device(self) -> str:
        """The torch device, resolved once from the settings (``auto`` -> cuda or cpu)."""
        return resolve_device(self.settings.device)

    @property
    def embedder(self) -> "Embedder":
        if self._embedder is None:
            from mmsearch.models.backends import load_embedder

            embedder = load_embedder(self.identity, self.device, runtime=self.settings.runtime,
                                     home=self.settings.home)
            made = getattr(embedder, "image_precision", "fp32")  # int8 vectors: the index's own
            if self.store.model is not None:
                check_precision(self.store.model, made, self.settings.runtime)
            self.identity = dataclasses.replace(self.identity, image_precision=made)
            self._embedder = embedder
        return self._embedder

    @property
    def text_embedder(self) -> "TextEncoder":
        """The model for text queries: the numpy text tower where it applies (no
        torch import, and equal to open_clip's), else the full model if loaded, else the
        text tower alone."""
        if self._text_embedder is None:
            from mmsearch.models.backends import lean_text_encoder, load_text_encoder

            weights = self.store.weights_file
            device = text_device(self.settings.device)  # auto: the CPU (CUDA not started)
            if self._embedder is None:
                self._text_embedder = load_text_encoder(self.identity, device, weights_path=weights,
                                                        home=self.settings.home)
            else:
                lean = lean_text_encoder(self.identity, device, weights_path=weights,
                                         home=self.settings.home)
                self._text_embedder = self._embedder if lean is None else lean
        return self._text_embedder

    def _ensure_model_recorded(self, storage: str = "catalog") -> None:
        stored = self.store.model
        if stored is None:
            dim = self.embedder.embed_dim  # loading it settles the identity's image precision
            self.store.set_model(self.identity, dim, storage)
        elif stored.text_fingerprint != self.identity.text_fingerprint:
            self._adopt_text_tower()
        self._record_weights_file()

    def _adopt_text_tower(self) -> None:
        """Make this engine's text tower (same image tower, e.g. fine-tuned) the index's own:
        the stored texts are embedded again with it; the images' vectors stay valid."""
        ids = self.store.read.all_text_ids()
        texts = self.store.read.texts_by_id(ids)
        vectors: dict[int, np.ndarray] = {}
        for i in range(0, len(ids), TEXT_BATCH):
            chunk = [int(t) for t in ids[i:i + TEXT_BATCH]]
            embedded = self.embedder.encode_texts([texts[t][1] for t in chunk])
            vectors.update(zip(chunk, embedded))
        self.store.switch_text_tower(self.identity, vectors)

    def _check_stored_texts(self) -> None:
        """Refuse to rank stored texts embedded by another text tower than this engine's."""
        stored = self.store.model
        if stored is not None and stored.text_fingerprint != self.identity.text_fingerprint:
            raise ModelMismatchError(
                "the stored texts were embedded with another text tower than this model's; run "
                "`mmsearch index PATHS --model ...` (or `texts add`) with this model once to "
                "embed them again (the images are not re-embedded)")

    def _record_weights_file(self) -> None:
        """Remember where a tag's weights were cached, for text queries that skip open_clip."""
        path = self._new_weights_file()
        if path:
            self.store.set_weights_file(path)

    def _new_weights_file(self) -> str | None:
        """Where a loaded tag's weights were cached, when the index does not know it yet."""
        if self._embedder is None or not self.identity.fingerprint.startswith("tag:"):
            return None
        known = self.store.weights_file
        if known and Path(known).is_file():
            return None  # (asking open_clip where the file is may touch the network)
        path = self._embedder.weights_path
        return path if path and path != known else None

    # -- writing ---------------------------------------------------------------
    def index(self, paths: Sequence[str | Path], *, progress: Progress | None = None,
              stop: threading.Event | None = None, runner: str = "local",
              address: str | None = None, storage: str = "auto") -> IndexReport:
        """Add, update and forget images under ``paths`` (folders or files).

        Setting ``stop`` ends the run after the batch in progress, with everything
        done so far committed (``report.interrupted`` is then True). ``runner="ray"``
        embeds on a Ray cluster (``address``; None: a local Ray for the run), see
        :mod:`mmsearch.distributed`; it also reads fsspec URLs (``s3://bucket/photos/``).
        ``storage`` (``catalog``, ``shards``; ``auto``: the index's own, and for a new
        index ``shards`` with the Ray runner, else ``catalog``) says where a new index
        keeps its image vectors (:mod:`mmsearch.store.shardvectors`).
        """
        if not paths:
            raise UsageError("nothing to index: give one or more folders or files")
        if runner not in ("local", "ray"):
            raise UsageError(f"unknown runner {runner!r}: choose local or ray")
        url = next((str(p) for p in paths if is_url(p)), None)
        if url is not None and runner == "local":
            raise UsageError(f"{as_url(url)}: URLs are read by the Ray runner only: "
                             "add --runner ray")
        roots = [given_root(p) for p in paths]  # every path checked before anything is written
        storage = self._storage_for(runner, storage)
        s = self.settings
        with _Writing(self.store):
            if self.store.model is not None:
                self._ensure_model_recorded()  # another text tower of this model: adopt it
            else:
                self.embedder  # noqa: B018 - its runtime settles the new index's image precision
            intent = RunIntent(self.identity, lambda: self.embedder.embed_dim, storage, roots,
                               s.index_type, self._new_weights_file)
            with self.store.index_run(intent):
                report = self._run(runner, paths, address, progress or no_progress, stop)
        if self._embedder is not None:  # the numpy text tower's weights file is written now,
            self.text_embedder  # noqa: B018 - so the first query imports no torch either
        return report

    def _run(self, runner: str, paths: Sequence[str | Path], address: str | None,
             progress: Progress, stop: threading.Event | None) -> IndexReport:
        s = self.settings
        if runner == "ray":
            from mmsearch.distributed import index_on_ray, options_from

            return index_on_ray(self.store, lambda: self.embedder, self.identity,
                                [p if is_url(p) else Path(p).expanduser() for p in paths],
                                options_from(s, address), progress=progress, stop=stop)
        return index_files(self.store, lambda: self.embedder, [Path(p).expanduser() for p in paths],
                           batch_size=s.batch_size, workers=s.workers, draft=s.draft,
                           progress=progress, stop=stop, decoder=s.decoder,
                           video=VideoOptions(fps=s.video_fps))

    def _storage_for(self, runner: str, asked: str) -> str:
        """The storage of this run (:func:`mmsearch.store.storage_for_run`): the index's own,
        or for a new index ``asked`` (``auto``: shards with the Ray runner)."""
        recorded = self.store.storage if self.store.model is not None else None
        return storage_for_run(recorded, runner, asked, self.settings.index)

    def check(self, *, repair: bool = False) -> tuple[list[str], list[str]]:
        """(problems found, what was done about them). ``repair`` needs the write lock."""
        problems = self.store.check()
        if not repair or not problems:
            return problems, []
        with _Writing(self.store):
            redo, texts = self.store.repair()
            done = [f"rebuilt the vector files from {self.store.read.image_count()} stored images"]
            read = backfill_metadata(self.store, None, self.settings.workers or default_workers())
            if read:
                done.append(f"read the metadata of {read} images")
            if redo:  # re-embedded here, or left to the Ray runner: the storage's to say
                done.append(self.store.vector_source.reembed(redo, self._reembed))
        if texts:
            self.add_texts(texts)
            done.append(f"re-embedded {len(texts)} texts whose vectors were damaged")
        return problems, done

    def _reembed(self, paths: list[str]) -> int:
        """Embed these images again with the local runner (their damaged vectors were
        forgotten by a repair); how many were embedded."""
        self._ensure_model_recorded()
        report = index_files(self.store, self.embedder, [Path(p) for p in paths],
                             batch_size=self.settings.batch_size, draft=self.settings.draft)
        return report.embedded

    def remove(self, path: str | Path) -> int:
        """Forget every indexed image at or under ``path``; returns how many."""
        root = canonical(path)
        with _Writing(self.store):
            return self.store.forget_under(root)

    def add_texts(self, items: Iterable[str | tuple[str, str]]) -> TextReport:
        """Index texts: plain strings (keyed by their text) or (key, text) pairs.

        A key stored before with another text is replaced; identical pairs are skipped.
        """
        pairs = [(t, t) if isinstance(t, str) else (str(t[0]), t[1]) for t in items]
        for key, text in pairs:
            check_text_query(text)
        pairs = list(dict(pairs).items())  # last one wins within the batch
        with _Writing(self.store):
            self._ensure_model_recorded()
            stored = self.store.read.text_keys()
            # similar lengths batch together, so little of each batch is padding
            fresh = sorted(((k, t) for k, t in pairs if (k, t) not in stored), key=lambda p: len(p[1]))
            rows = []
            for i in range(0, len(fresh), TEXT_BATCH):
                chunk = fresh[i:i + TEXT_BATCH]
                vecs = self.embedder.encode_texts([t for _, t in chunk])
                rows += [(k, t, v) for (k, t), v in zip(chunk, vecs)]
            added, replaced = self.store.put_texts(rows)
        return TextReport(added, replaced, len(pairs) - len(fresh))

    # -- reading ---------------------------------------------------------------
    def search(self, text: "str | Query | None" = None, *, image: "ImageQuery | None" = None,
               k: int = 10, within: str | Path | None = None,
               filters: Filters | None = None) -> "Hits":
        """Images ranked by similarity to ``text``, to ``image`` (a path or PIL image), or
        to a :class:`Query`, among those ``filters`` keep (``within``: a folder), shaped as
        ``filters`` says (min score, dedup, sort by date)."""
        query = _checked(as_query(text, image))
        check_k(k)
        self.store.refresh()
        if self.store.read.image_count() == 0:
            raise empty_index(self.store, "images")  # before loading any model
        vector = self.query_vector(query)
        if k == 0:
            return Hits.of([], self.hint(query))
        filters = filters or Filters()
        if within is not None:
            filters = dataclasses.replace(filters, within=within)
        return Hits.of(search_images(self.store, vector, k, filters)[0], self.hint(query))

    def search_texts(self, text: "str | Query | None" = None, *,
                     image: "ImageQuery | None" = None, k: int = 10) -> "Hits":
        """Indexed texts ranked by similarity to ``image`` (or to ``text``, or a :class:`Query`)."""
        query = _checked(as_query(text, image))
        check_k(k)
        self.store.refresh()
        if self.store.read.text_count() == 0:
            raise empty_index(self.store, "texts")
        self._check_stored_texts()
        vector = self.query_vector(query)
        return Hits.of([] if k == 0 else search_texts(self.store, vector, k)[0], self.hint(query))

    def hint(self, query: Query) -> str | None:
        """One line worth telling about ``query`` (a script this model does not read), or None."""
        return language_hint(self.identity, [str(t.value) for t in query.terms if t.kind == "text"])

    def query_vector(self, query: Query) -> np.ndarray:
        """The (1, D) vector a :class:`Query` searches with (see :mod:`mmsearch.search.query`)."""
        if not query.terms:
            raise UsageError("give a text, an image or an image id to search with")
        vectors = [self._term_vector(t.kind, t.value) for t in query.terms]
        if len(vectors) == 1 and query.terms[0].weight > 0:
            return vectors[0]  # one term: its own embedding, exactly
        return combine(np.vstack(vectors), [t.weight for t in query.terms])

    def _term_vector(self, kind: str, value: object) -> np.ndarray:
        if kind == "text":
            return self.embed_texts([value])  # type: ignore[list-item]
        if kind == "image":
            return self.embed_image(value)  # type: ignore[arg-type]
        ids, vectors = self.store.image_vectors([int(value)])  # type: ignore[call-overload]
        if not ids.size:
            raise UsageError(f"no indexed image has id {value}")
        return vectors

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self.text_embedder.encode_texts([check_text_query(t) for t in texts])

    def embed_image(self, image: "ImageQuery") -> np.ndarray:
        from PIL import Image

        from mmsearch.ingest.decode import load_image, to_rgb

        emb = self.embedder
        if not isinstance(image, Image.Image):
            image = load_image(Path(image).expanduser(),
                               draft_size=emb.image_size if self.settings.draft else None)
        return emb.encode_images(emb.collate([emb.prepare(to_rgb(image))]))

    def duplicates(self, *, threshold: float = DEFAULT_THRESHOLD,
                   neighbours: int = 16) -> list[DuplicateGroup]:
        """Groups of near-duplicate photos (cosine >= ``threshold``), largest first; a group
        whose files have the same content is ``exact``. No model is loaded."""
        self.store.refresh()
        if self.store.read.image_count() == 0:
            raise empty_index(self.store, "images")
        return find_duplicates(self.store, threshold=threshold, neighbours=neighbours)

    def info(self) -> IndexInfo:
        store, read = self.store, self.store.read
        frames = read.frame_count()
        return IndexInfo(
            name=self.settings.index, location=store.root, model=store.model, dim=store.dim,
            images=read.image_count() - frames, distinct_images=read.distinct_photo_count(),
            texts=read.text_count(), image_index=store.image_index,
            files={name: size for name, _, size in store.files()},
            schema_version=store.schema_version, repairs=list(store.repairs),
            metadata=store.metadata_summary(), storage=store.storage,
            videos=read.video_count(), frames=frames)


def as_query(text: "str | Query | None", image: "ImageQuery | None") -> Query:
    """The :class:`Query` for the convenience arguments: a text, a Query, or an image."""
    if isinstance(text, Query):
        if image is not None:
            raise UsageError("give either a Query or an image, not both")
        return text
    if (text is None) == (image is None):
        raise UsageError("give either a text or an image to search with")
    return Query.text(text) if text is not None else Query.image(image)  # type: ignore[arg-type]


def _checked(query: Query) -> Query:
    """Refuse a query without terms or with an empty text before anything is loaded."""
    if not query.terms:
        raise UsageError("give a text, an image or an image id to search with")
    for term in query.terms:
        if term.kind == "text":
            check_text_query(term.value)  # type: ignore[arg-type]
    return query


class _Writing:
    """Hold the store's write lock for a block."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def __enter__(self) -> Store:
        self.store.lock()
        return self.store

    def __exit__(self, *exc: object) -> None:
        self.store.unlock()
