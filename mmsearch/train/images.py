"""The training photos as the model sees them: decoded inputs, and the vectors the base
model gives them (read from an index when it already holds them, else embedded).

Decoding and preprocessing are the indexer's own (:mod:`mmsearch.ingest.embed`), so a
model trains on exactly the inputs it will later index. A photo that cannot be read is
dropped with its captions and reported, as ``mmsearch index`` reports it.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from mmsearch.errors import DatasetError, MMSearchError
from mmsearch.eval.datasets import RetrievalDataset
from mmsearch.ingest.embed import default_workers, embed_paths, prepare
from mmsearch.progress import Progress, no_progress

if TYPE_CHECKING:  # pragma: no cover
    from mmsearch.models.openclip import Embedder
    from mmsearch.store import Store


@dataclass
class Unreadable:
    """Photos dropped from training: (path, reason)."""

    files: list[tuple[Path, str]]

    def describe(self) -> str | None:
        if not self.files:
            return None
        path, reason = self.files[0]
        return f"{len(self.files)} unreadable photos left out (first: {path}: {reason})"


def decoded_inputs(embedder: "Embedder", paths: Sequence[Path], *, workers: int = 0,
                   progress: Progress = no_progress) -> tuple[list[Any | None], Unreadable]:
    """Each path's model input (None where it cannot be decoded), decoded in threads."""
    draft = embedder.image_size
    out: list[Any | None] = []
    bad: list[tuple[Path, str]] = []

    def one(path: Path) -> Any:
        try:
            return prepare(path, embedder, draft)[0]
        except MMSearchError as exc:
            return exc

    with ThreadPoolExecutor(workers or default_workers()) as pool:
        for path, item in zip(paths, pool.map(one, paths)):
            if isinstance(item, MMSearchError):
                bad.append((path, str(item)))
                item = None
            out.append(item)
            progress("decode", len(out), len(paths))
    return out, Unreadable(bad)


def base_vectors(embedder: "Embedder", paths: Sequence[Path], *, store: "Store | None" = None,
                 batch_size: int = 32, progress: Progress = no_progress
                 ) -> tuple[np.ndarray, np.ndarray, Unreadable]:
    """(vectors of the readable photos, their positions in ``paths``, unreadable ones).

    Photos an index built with the same image tower already holds are read from it by
    content hash (no model call); the others are embedded.
    """
    known = _known_vectors(store, paths)
    missing = [p for p in paths if p not in known]
    found: dict[Path, np.ndarray] = dict(known)
    bad: list[tuple[Path, str]] = []
    for batch in embed_paths(embedder, missing, batch_size=batch_size):
        found.update(zip(batch.paths, batch.vectors))
        bad += [(p, reason) for p, reason in batch.failed]
        progress("embed", len(found) - len(known) + len(bad), len(missing))
    kept = np.asarray([i for i, p in enumerate(paths) if p in found], dtype=np.int64)
    dim = embedder.embed_dim
    vectors = np.stack([found[paths[i]] for i in kept]) if kept.size else np.zeros((0, dim))
    return vectors.astype(np.float32), kept, Unreadable(bad)


def _known_vectors(store: "Store | None", paths: Sequence[Path]) -> dict[Path, np.ndarray]:
    if store is None:
        return {}
    from mmsearch.ingest.decode import content_hash

    hashes = {}
    for path in paths:
        try:
            hashes[path] = content_hash(path)
        except (OSError, MMSearchError):
            continue  # reported when embedding it fails
    stored = store.known_vectors(hashes.values())
    return {p: stored[h] for p, h in hashes.items() if h in stored}


def keep_images(pairs: RetrievalDataset, kept: np.ndarray) -> RetrievalDataset:
    """The pairs of the images at ``kept`` only (others were unreadable)."""
    from mmsearch.train.pairs import subset

    if kept.size < 2:
        raise DatasetError(f"only {kept.size} readable photos in the {pairs.split} split")
    return subset(pairs, kept, pairs.split)
