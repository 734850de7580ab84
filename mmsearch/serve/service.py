"""The engine behind the HTTP API: one warm model on one worker thread, results as JSON data."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from mmsearch.engine import Engine
from mmsearch.errors import EmptyIndexError, UsageError
from mmsearch.search.filters import Filters
from mmsearch.search.hits import to_json
from mmsearch.search.query import Query
from mmsearch.settings import Settings

MAX_K, MAX_OFFSET = 500, 10_000


class SearchService:
    """Searches for the server. The engine is not thread-safe, so every call on it runs on
    one worker thread, in turn (the model and FAISS use both cores for each one anyway);
    one thread also keeps torch's and FAISS's OpenMP thread pools warm, where a new
    calling thread per request would start pools of its own."""

    def __init__(self, settings: Settings, *, warm: bool = True) -> None:
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="mmsearch-engine")
        self._watcher: Any = None  # serve --watch: a Watcher, its thread, its writing engine
        self._watching: threading.Thread | None = None
        self._writer: Engine | None = None
        self.engine = self._run(Engine, settings)
        if warm and self.engine.store.model is not None:
            self._run(self._warm)

    def _warm(self) -> None:
        """Load the model and ready the text encoder now, not on the first queries."""
        self.engine.embedder  # noqa: B018 - loading is the point
        self.engine.text_embedder.warm()

    def _run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return self._worker.submit(fn, *args, **kwargs).result()

    def close(self) -> None:
        self.stop_watching()
        self._run(self.engine.close)
        self._worker.shutdown()

    # -- the watcher (serve --watch) ----------------------------------------------------
    def watch(self, say: Callable[[str], None], **options: Any) -> None:
        """Keep the index current in the background (:mod:`mmsearch.ingest.watch`) over its
        recorded folders: a second engine, opened on the watcher's thread when a batch
        first comes, writes; queries keep answering on the worker meanwhile and see each
        batch as it is committed."""
        from mmsearch.ingest.watch import Watcher

        roots = self.roots or []
        if not roots:
            say("watch: the index records no folders yet: index one with `mmsearch index`")
        self._watcher = Watcher(roots, self._index_batch, say=say, catch_up=True, **options)
        self._watching = threading.Thread(target=self._watch, name="mmsearch-watch", daemon=True)
        self._watching.start()

    def _index_batch(self, folders: list[Path], progress: Any, stop: threading.Event) -> Any:
        if self._writer is None:
            self._writer = Engine(self.engine.settings)
        return self._writer.index(folders, progress=progress, stop=stop)

    def _watch(self) -> None:
        try:
            self._watcher.run()  # type: ignore[union-attr]
        finally:
            if self._writer is not None:
                self._writer.close()

    def stop_watching(self) -> None:
        if self._watching is not None and self._watcher is not None:
            self._watcher.stop.set()
            self._watching.join()
            self._watching = None

    def watch_state(self) -> dict[str, Any] | None:
        """What the watcher is doing (None: not watching)."""
        return self._watcher.state.as_dict() if self._watcher is not None else None

    def search(self, query: Query, k: int, offset: int, filters: Filters) -> dict[str, Any]:
        """One page of hits: ranks ``offset+1 .. offset+k`` of the query."""
        check_page(k, offset)
        return self._run(self._search, query, k, offset, filters)

    def _search(self, query: Query, k: int, offset: int, filters: Filters) -> dict[str, Any]:
        try:
            hits = self.engine.search(query, k=offset + k, filters=filters)
        except EmptyIndexError as exc:
            return {"total": 0, "hits": [], "note": str(exc)}
        total = self._total(filters)
        return {"total": total, "hits": [hit_json(h) for h in hits[offset:offset + k]],
                "note": getattr(hits, "hint", None)}

    def _total(self, filters: Filters) -> int:
        """How many results the hits are the best of: photos, and videos once each (not
        their frames), among those the filters keep."""
        import numpy as np

        from mmsearch.search.search import selected_ids

        read = self.engine.store.read
        if not filters.selects:
            return read.image_count() - read.frame_count() + read.video_count()
        ids = selected_ids(self.engine.store, replace(filters))
        frames, videos = read.frames()
        kept = np.isin(frames, ids, assume_unique=True)
        return int(ids.size - kept.sum() + np.unique(videos[kept]).size)

    def texts(self, image_id: int, k: int) -> dict[str, Any]:
        check_page(k, 0)
        return self._run(self._texts, image_id, k)

    def _texts(self, image_id: int, k: int) -> dict[str, Any]:
        try:
            hits = self.engine.search_texts(Query.id(image_id), k=k)
        except EmptyIndexError as exc:
            return {"hits": [], "note": str(exc)}
        return {"hits": to_json(hits), "note": None}

    def record(self, image_id: int) -> dict[str, Any] | None:
        """The catalog row of an image (path, content hash, metadata), or None: a read of
        the catalog alone (SQLite, safe from any thread), so files are served meanwhile."""
        return self.engine.store.image_records([image_id]).get(image_id)

    def video(self, video_id: int) -> dict[str, Any] | None:
        """The ``videos`` row of a video (path, content hash, duration...), or None: a read
        of the catalog alone, like :meth:`record`."""
        return self.engine.store.read.videos_by_id([video_id]).get(video_id)

    @property
    def roots(self) -> list[str] | None:
        return self.engine.store.roots

    def info(self) -> dict[str, Any]:
        info = self._run(self._info)
        meta = info.metadata
        return {"name": info.name, "images": info.images, "videos": info.videos,
                "texts": info.texts,
                "model": info.model.describe() if info.model else None,
                "index_type": info.image_index, "first_taken": meta.first_taken,
                "last_taken": meta.last_taken, "cameras": meta.cameras,
                "watch": self.watch_state()}

    def _info(self) -> Any:
        self.engine.store.refresh()
        return self.engine.info()

    @property
    def thumbs(self) -> Path:
        return self.engine.store.root / "thumbs"


def hit_json(hit: Any) -> dict[str, Any]:
    """An image hit as the API returns it: its fields plus where its pictures are."""
    data = to_json(hit)
    data["thumbnail"] = f"/thumb/{hit.id}"
    data["original"] = f"/original/{hit.id}"
    return data


def check_page(k: int, offset: int) -> None:
    if not 1 <= k <= MAX_K:
        raise UsageError(f"k must be between 1 and {MAX_K}")
    if not 0 <= offset <= MAX_OFFSET:
        raise UsageError(f"offset must be between 0 and {MAX_OFFSET}")
