"""The library's front door: :class:`Engine` ties store, model, ingest and search together.

    with Engine.open("photos", pretrained="/models/vit-b-32.pt") as engine:
        report = engine.index(["~/Pictures"])
        hits = engine.search("a dog on a beach", k=5)
        similar = engine.search(image="~/Pictures/dog.jpg")
        engine.add_texts(["a dog on a beach", "a red car"])
        captions = engine.search_texts(image="~/Pictures/dog.jpg")
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

from mmsearch import ingest
from mmsearch.decode import load_image, to_rgb
from mmsearch.discover import canonical_root
from mmsearch.errors import UsageError
from mmsearch.ingest import IndexReport, Progress
from mmsearch.models import (Embedder, ModelIdentity, TextEncoder, check_loaded, identify,
                             load_embedder, load_text_encoder)
from mmsearch.search import (ImageHit, TextHit, check_k, check_text_query, search_images,
                             search_texts)
from mmsearch.settings import Settings, resolve
from mmsearch.store import Store

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

__all__ = ["Engine", "ImageHit", "TextHit", "IndexReport", "IndexInfo", "TextReport"]
ImageQuery = "str | Path | Image.Image"
WEIGHTS_FILE = "weights_file"  # catalog meta: the cached file of a tag's weights


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


class Engine:
    """An open index plus (lazily) its model. Not thread-safe; one per thread."""

    def __init__(self, settings: Settings, *, create: bool = False) -> None:
        self.settings = settings
        self.store = Store.open(settings.index_dir, create=create)
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
    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = load_embedder(self.identity, self.settings.device)
        return self._embedder

    @property
    def text_embedder(self) -> TextEncoder:
        """The model for text queries: the full one if loaded, else the text tower alone."""
        if self._embedder is not None:
            return self._embedder
        if self._text_embedder is None:
            self._text_embedder = load_text_encoder(
                self.identity, self.settings.device,
                weights_path=self.store.catalog.get_meta(WEIGHTS_FILE))
        return self._text_embedder

    def _ensure_model_recorded(self) -> None:
        if self.store.model is None:
            self.store.set_model(self.identity, self.embedder.embed_dim)
        self._record_weights_file()

    def _record_weights_file(self) -> None:
        """Remember where a tag's weights were cached, for text queries that skip open_clip."""
        if self._embedder is None or not self.identity.fingerprint.startswith("tag:"):
            return
        known = self.store.catalog.get_meta(WEIGHTS_FILE)
        if known and Path(known).is_file():
            return  # (asking open_clip where the file is may touch the network)
        path = self._embedder.weights_path
        if path and path != known:
            self.store.catalog.set_meta(WEIGHTS_FILE, path)

    # -- writing ---------------------------------------------------------------
    def index(self, paths: Sequence[str | Path], *, progress: Progress | None = None,
              stop: threading.Event | None = None) -> IndexReport:
        """Add, update and forget images under ``paths`` (folders or files).

        Setting ``stop`` ends the run after the batch in progress, with everything
        done so far committed (``report.interrupted`` is then True).
        """
        if not paths:
            raise UsageError("nothing to index: give one or more folders or files")
        s = self.settings
        with _Writing(self.store):
            self._ensure_model_recorded()
            report = ingest.run(self.store, lambda: self.embedder,
                                [Path(p).expanduser() for p in paths],
                                batch_size=s.batch_size, workers=s.workers, draft=s.draft,
                                progress=progress or ingest.no_progress, stop=stop)
            self._record_weights_file()
            self.store.retype(s.index_type)
            return report

    def check(self, *, repair: bool = False) -> tuple[list[str], list[str]]:
        """(problems found, what was done about them). ``repair`` needs the write lock."""
        problems = self.store.check()
        if not repair or not problems:
            return problems, []
        with _Writing(self.store):
            redo = self.store.repair()
            done = [f"rebuilt the vector files from {self.store.catalog.image_count()} stored images"]
            if redo:
                self._ensure_model_recorded()
                report = ingest.run(self.store, self.embedder, [Path(p) for p in redo],
                                    batch_size=self.settings.batch_size, draft=self.settings.draft)
                done.append(f"re-embedded {report.embedded} images whose vectors were damaged")
        texts = list(self.store.texts_to_embed)
        if texts:
            self.add_texts(texts)
            done.append(f"re-embedded {len(texts)} texts whose vectors were damaged")
        return problems, done

    def remove(self, path: str | Path) -> int:
        """Forget every indexed image at or under ``path``; returns how many."""
        root = str(canonical_root(Path(path).expanduser()))
        with _Writing(self.store):
            rows = self.store.catalog.images_under(root)
            ids = np.asarray([r.id for r in rows.values()], dtype=np.int64)
            self.store.catalog.commit_images({}, [], delete_ids=ids)
            if ids.size and not self.store.vectors("images").remove(ids):
                self.store.rebuild("images", note=False)
            self.store.catalog.drop_orphan_embeddings()
            self.store.save("images")
        return len(ids)

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
            stored = self.store.catalog.text_keys()
            # similar lengths batch together, so little of each batch is padding
            fresh = sorted(((k, t) for k, t in pairs if (k, t) not in stored), key=lambda p: len(p[1]))
            rows = []
            for i in range(0, len(fresh), 256):
                chunk = fresh[i:i + 256]
                vecs = self.embedder.encode_texts([t for _, t in chunk])
                rows += [(k, t, v) for (k, t), v in zip(chunk, vecs)]
            added, replaced, _ = self.store.catalog.upsert_texts(rows)
            self.store.rebuild("texts", note=False)
        return TextReport(added, replaced, len(pairs) - len(fresh))

    # -- reading ---------------------------------------------------------------
    def search(self, text: str | None = None, *, image: "ImageQuery | None" = None, k: int = 10,
               within: str | Path | None = None) -> list[ImageHit]:
        """Images ranked by similarity to ``text`` or to ``image`` (a path or PIL image)."""
        query = self._query_vector(text, image)
        if check_k(k) == 0:
            return []
        folder = Path(within) if within is not None else None
        return search_images(self.store, query, k, folder)[0]

    def search_texts(self, text: str | None = None, *, image: "ImageQuery | None" = None,
                     k: int = 10) -> list[TextHit]:
        """Indexed texts ranked by similarity to ``image`` (or to ``text``)."""
        query = self._query_vector(text, image)
        if check_k(k) == 0:
            return []
        return search_texts(self.store, query, k)[0]

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self.text_embedder.encode_texts([check_text_query(t) for t in texts])

    def embed_image(self, image: "ImageQuery") -> np.ndarray:
        from PIL import Image

        emb = self.embedder
        if not isinstance(image, Image.Image):
            image = load_image(Path(image).expanduser(),
                               draft_size=emb.image_size if self.settings.draft else None)
        return emb.encode_images(emb.collate([emb.prepare(to_rgb(image))]))

    def _query_vector(self, text: str | None, image: "ImageQuery | None") -> np.ndarray:
        if (text is None) == (image is None):
            raise UsageError("give either a text or an image to search with")
        if text is not None:
            return self.embed_texts([text])
        return self.embed_image(image)

    def info(self) -> IndexInfo:
        store = self.store
        return IndexInfo(
            name=self.settings.index, location=store.root, model=store.model, dim=store.dim,
            images=store.catalog.image_count(), distinct_images=store.catalog.embedding_count(),
            texts=store.catalog.text_count(),
            image_index=store.catalog.get_meta("images_index") or "Flat",
            files={name: size for name, _, size in store.files()},
            schema_version=store.catalog.schema_version, repairs=list(store.repairs))


class _Writing:
    """Hold the store's write lock for a block."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def __enter__(self) -> Store:
        self.store.lock()
        return self.store

    def __exit__(self, *exc: object) -> None:
        self.store.unlock()
