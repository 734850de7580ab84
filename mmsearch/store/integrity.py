"""``mmsearch check``: what disagrees between catalog, FAISS files and disk; and the repair.

Both functions run for :class:`~mmsearch.store.Store` (``store.check()``,
``store.repair()``), on the parts it owns: the catalog, the vector files, the storage
(:class:`~mmsearch.store.storage.VectorSource`) and the index folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mmsearch.errors import CorruptIndexError
from mmsearch.locations import is_url, video_of
from mmsearch.store import selection
from mmsearch.store.catalog import Catalog
from mmsearch.store.lock import lock_holder
from mmsearch.store.storage import VectorSource
from mmsearch.store.vectorfiles import KINDS, Kind, VectorFiles

if TYPE_CHECKING:  # pragma: no cover
    from mmsearch.store.vectors import VectorIndex

CHECK_SAMPLE = 50_000      # vectors compared with the catalog by `check`


def check(catalog: Catalog, files: VectorFiles, source: VectorSource, root: Path) -> list[str]:
    """Problems found between catalog, FAISS files and disk; nothing is changed."""
    problems = catalog.integrity_problems()
    if problems:
        return problems
    try:
        model, dim = catalog.recorded_model(), catalog.recorded_dim()
    except CorruptIndexError as exc:
        return [str(exc)]
    if model is None or dim is None:
        return ["catalog has images but no model"] if catalog.image_count() or catalog.text_count() else []
    stored_dim = files.stored_dim()
    if stored_dim is not None and stored_dim != dim:
        return [f"the catalog records dimension {dim} but all its vectors have {stored_dim}"]
    problems += _damage(catalog, source, dim)
    if not problems:
        for kind in KINDS:
            problems += _check_vectors(files, kind, dim)
    dangling = catalog.dangling_images()
    if dangling:
        problems.append(f"{len(dangling)} images have no stored vector")
    gone = sum(1 for _, p in catalog.all_image_paths() if video_of(p) is None and _gone(p))
    gone += sum(1 for r in catalog.videos_under("/").values() if _gone(r.path))
    if gone:
        problems.append(f"{gone} indexed files no longer exist on disk")
    unread = len(selection.missing_metadata(catalog))
    if unread:
        problems.append(f"{unread} images have no metadata yet (an index made before "
                        "schema v3; the next `index` of their folders reads it)")
    if files.temp_files() and lock_holder(root) is None:
        problems.append(f"{len(files.temp_files())} temporary files left by an interrupted save")
    return problems


def _damage(catalog: Catalog, source: VectorSource, dim: int) -> list[str]:
    out = []
    bad = catalog.damaged_embeddings(dim)
    if bad:
        out.append(source.damage_message(len(bad)))
    damaged_texts = catalog.damaged_texts(dim)
    if damaged_texts:
        out.append(f"{len(damaged_texts)} stored text vectors are damaged")
    return out


def _check_vectors(files: VectorFiles, kind: Kind, dim: int) -> list[str]:
    path = files.path(kind)
    want = files.catalog_ids(kind)
    if not path.is_file():
        return [f"{path.name} is missing"] if want.size else []
    index, have, problem = files.read_file(kind)
    if index is None:
        return [problem or f"{path.name} is unreadable"]
    missing = np.setdiff1d(want, have).size
    extra = np.setdiff1d(have, want).size
    if missing or extra:
        return [f"{path.name} is behind the catalog: {missing} vectors missing, {extra} "
                "unknown (an interrupted run; the next `index` or `check --repair` "
                "brings it up to date)"]
    wrong = _compare_vectors(files, kind, index, want)
    return [f"{path.name}: {wrong} vectors differ from the catalog's"] if wrong else []


def _compare_vectors(files: VectorFiles, kind: Kind, index: "VectorIndex", ids: np.ndarray) -> int:
    """How many of (a sample of) ``ids`` hold another vector in FAISS than in the catalog."""
    if ids.size > CHECK_SAMPLE:
        ids = np.random.default_rng(0).choice(ids, CHECK_SAMPLE, replace=False)
    ids, stored = files.catalog_vectors(kind, ids)
    if not ids.size:
        return 0
    held = index.reconstruct(ids)
    if held is None:  # IVF without a direct map cannot say
        return 0
    desc = index.description
    tolerance = 1e-5 if "Flat" in desc and "IVF" not in desc else 0.5
    return int((np.abs(held - stored).max(axis=1) > tolerance).sum())


def repair(catalog: Catalog, files: VectorFiles) -> tuple[list[str], list[tuple[str, str]]]:
    """Fix what :func:`check` finds; returns (image paths, (key, text) pairs) to embed again.

    The store holds the write lock. Damaged vectors are forgotten (the caller
    re-embeds their files and texts), rows without a vector likewise, FAISS files
    are rebuilt from the catalog, rows of files gone from disk are removed,
    temporary files left by a killed save are deleted.
    """
    dim = catalog.recorded_dim() or 0
    stored_dim = files.stored_dim()
    if stored_dim is not None and stored_dim != dim:  # the vectors agree: the record is wrong
        catalog.set_meta("dim", str(stored_dim))
        dim = stored_dim
    redo = catalog.forget_embeddings(catalog.damaged_embeddings(dim))
    damaged_texts = catalog.damaged_texts(dim)
    catalog.delete_text_ids(damaged_texts)
    dangling = catalog.dangling_images()
    gone = [i for i, p in catalog.all_image_paths() if _gone(p)]
    catalog.commit_images({}, [], delete_ids=sorted(set(gone) | set(dangling)))
    redo += list(dangling.values())
    catalog.drop_orphan_embeddings()
    for kind in KINDS:
        files.rebuild(kind, note=False, index_type=catalog.get_meta(f"{kind}_index"))
    files.remove_temp_files()
    return [p for p in redo if os.path.lexists(p)], list(damaged_texts.values())


def _gone(path: str) -> bool:
    """Whether a catalog path is a local file no longer on disk (a URL is never checked)."""
    return not is_url(path) and not os.path.lexists(path)
