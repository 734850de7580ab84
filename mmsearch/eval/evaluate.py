"""Cross-modal retrieval evaluation of the engine itself (``mmsearch eval``).

The images of a :class:`~mmsearch.eval.datasets.RetrievalDataset` go through the
engine's own ingest pipeline (decode, preprocess, embed, catalog, FAISS) into a
named index under ``settings.home``, the captions through its text path
(:meth:`Engine.add_texts`); Recall@K is then computed from what the engine's
FAISS indexes return:

* text -> image: each caption queries the image index; a hit when its own image
  is in the top K;
* image -> text: each image queries the text index; a hit when any of its own
  captions is in the top K.

The index is named from the dataset, split, model and decode mode
(:func:`eval_index_name`), so a second run of the same model on the same data
embeds nothing and only searches again; ``index_type`` can then be varied for
free. The cached image index is always exact (``Flat``); an approximate
``index_type`` is built in memory from the stored vectors and judged against it
(:attr:`EvalResult.approx_overlap`). As in the engine, ``index_type`` applies to
the image index; the text index is always exact.

A :class:`~mmsearch.eval.datasets.VideoRetrievalDataset` (MSR-VTT...) goes the same way
into its own index: its videos through the engine's video ingest (the same decoding and
frame sampling as ``mmsearch index``), its captions through ``add_texts``; each video's
vector is then the mean of its stored frames and captions and videos are ranked exactly
(:mod:`mmsearch.eval.video`: text -> video and video -> text Recall@K, median and mean rank).

JPEGs are decoded in full by default (:data:`mmsearch.eval.DRAFT`), so the pixels are
the ones open_clip's own preprocess sees; ``draft=True`` lets libjpeg decode big photos
at a reduced DCT scale first, as ``mmsearch index`` does (faster, scores move slightly).

Query vectors are the stored ones (what ingest and ``add_texts`` computed), so
nothing is embedded twice. Ties: FAISS orders exactly equal scores in its own
way (not by id), which matters only for byte-identical images or captions.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from mmsearch.errors import DatasetError, UsageError
from mmsearch.eval import DRAFT, metrics
from mmsearch.models.identity import NO_WEIGHTS, ModelIdentity, identify
from mmsearch.progress import Progress, no_progress

if TYPE_CHECKING:  # pragma: no cover
    from mmsearch.engine import Engine
    from mmsearch.eval.datasets import RetrievalDataset
    from mmsearch.settings import Settings
    from mmsearch.store import Store
    from mmsearch.store.vectors import VectorIndex

__all__ = ["EvalResult", "evaluate", "eval_index_name"]

TEXT_CHUNK = 4096      # captions per add_texts call (one progress step each)
OVERLAP_K = 10         # approximate vs exact: recall@10 of the top-10
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class EvalResult:
    """Recalls (percent) and costs of one evaluation run."""

    dataset: str
    split: str
    t2i: dict[int, float]             # text -> image Recall@K
    i2t: dict[int, float]             # image -> text Recall@K
    rsum: float                       # sum of all the recalls above (papers' "rsum")
    mean_recall: float                # rsum / number of recalls
    n_images: int
    n_captions: int
    model: dict[str, Any]             # ModelIdentity fields + "description"
    index_type: str                   # FAISS factory string of the image index searched
    index_name: str
    index_dir: str
    device: str
    draft: bool                       # JPEGs decoded at a reduced DCT scale (False: in full)
    embedded: int                     # images embedded by this run (0: all cached)
    embed_seconds: float              # the ingest run (scan, hash, decode, embed, store)
    images_per_second: float          # embedded / embed_seconds (0.0 when cached)
    text_seconds: float               # add_texts over every caption
    texts_embedded: int
    search_seconds: float
    eval_seconds: float               # wall time of the whole evaluate() call
    approx_overlap: float | None = None  # recall@10 of approximate vs exact top-10 (0-1)
    media: str = "image"              # "video": images are videos, t2i is text -> video...
    n_frames: int | None = None       # videos: the stored frames mean-pooled
    video_fps: float | None = None    # videos: frames sampled per second (plus each shot's first)
    t2i_ranks: dict[str, float] | None = None  # videos: {"MdR": median, "MnR": mean rank}
    i2t_ranks: dict[str, float] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def cached(self) -> bool:
        return self.embedded == 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: recall keys become ``"R@1"``...; adds ``cached``."""
        data = asdict(self)
        data["t2i"] = {f"R@{k}": v for k, v in self.t2i.items()}
        data["i2t"] = {f"R@{k}": v for k, v in self.i2t.items()}
        data["cached"] = self.cached
        return data


def eval_index_name(dataset: str, split: str, identity: ModelIdentity, draft: bool,
                    video_fps: float | None = None) -> str:
    """``eval-<dataset>-<split>-<arch>-<hash>``: one reusable index per data and model (and,
    for videos, frame rate)."""
    key = json.dumps([identity.arch, identity.fingerprint, draft,
                      *([] if video_fps is None else [video_fps])])
    digest = hashlib.blake2b(key.encode(), digest_size=4).hexdigest()
    parts = [_UNSAFE.sub("-", p).strip("-.") or "x"
             for p in (dataset[:16], split[:10], identity.arch[:20])]
    return "-".join(["eval", *parts, digest])


def evaluate(dataset: "RetrievalDataset", *, settings: "Settings", index_type: str = "flat",
             draft: bool = DRAFT, ks: Sequence[int] = metrics.DEFAULT_KS,
             progress: Progress | None = None) -> EvalResult:
    """Embed ``dataset`` through the engine (reusing a cached index) and measure recall.

    ``settings`` comes from :func:`mmsearch.settings.resolve`; its ``index``,
    ``index_type`` and ``draft`` are ignored (the index is named by
    :func:`eval_index_name` and always stored exact). ``index_type`` ("flat",
    "hnsw", "ivf", "ivfpq", "auto" or a FAISS factory string) is the image index
    that is searched. ``draft``: decode JPEGs at a reduced DCT scale (never below
    the model's input) instead of in full; see :data:`mmsearch.eval.DRAFT`.
    A :class:`~mmsearch.eval.datasets.VideoRetrievalDataset` is evaluated by mean-pooled
    frames (:mod:`mmsearch.eval.video`), sampled at ``settings.video_fps``; ``index_type``
    and ``draft`` do not apply to it.

    Raises:
        DatasetError: some images could not be indexed (the message says why),
            or two entries are the same file.
        UsageError: invalid ``ks``, or an ``index_type`` FAISS cannot build (below
            10,000 images the engine falls back to Flat instead; a note says so).
        plus whatever opening the engine or the model raises.
    """
    from mmsearch.engine import Engine
    from mmsearch.eval.datasets import VideoRetrievalDataset

    start = time.perf_counter()
    cut_offs = _check_ks(ks)
    progress = progress or no_progress
    if isinstance(dataset, VideoRetrievalDataset):
        return _evaluate_videos(dataset, settings, index_type, cut_offs, progress)
    identity = identify(settings.model, settings.pretrained)
    name = eval_index_name(dataset.name, dataset.split, identity, draft)
    eval_settings = settings.with_(index=name, index_type="flat", draft=draft)
    with Engine(eval_settings, create=True) as engine:
        image_ids, report = _index_images(engine, dataset, progress)
        searched, exact, index_note = _image_indexes(engine, index_type)
        text_start = time.perf_counter()
        text_ids, texts_embedded = _index_captions(engine, dataset, progress)
        text_seconds = time.perf_counter() - text_start
        search_start = time.perf_counter()
        ranked, overlap = _rank(engine, searched, exact, image_ids, text_ids,
                                max(cut_offs), progress)
        search_seconds = time.perf_counter() - search_start
        model = {**asdict(engine.identity), "description": engine.identity.describe()}
        device = engine.device
    t2i = metrics.text_to_image_recall(ranked[0], dataset.caption_image, cut_offs)
    i2t = metrics.image_to_text_recall(ranked[1], dataset.caption_image, cut_offs)
    return EvalResult(
        dataset=dataset.name, split=dataset.split, t2i=t2i, i2t=i2t,
        rsum=metrics.rsum(t2i, i2t, cut_offs), mean_recall=metrics.mean_recall(t2i, i2t, cut_offs),
        n_images=dataset.n_images, n_captions=dataset.n_captions, model=model,
        index_type="Flat" if exact is None else searched.description, index_name=name,
        index_dir=str(eval_settings.index_dir.absolute()),
        device=device, draft=draft, embedded=report.embedded,
        embed_seconds=report.seconds, images_per_second=report.images_per_second,
        text_seconds=text_seconds, texts_embedded=texts_embedded,
        search_seconds=search_seconds, eval_seconds=time.perf_counter() - start,
        approx_overlap=overlap,
        notes=[*_notes(identity, draft, report.embedded, dataset.n_images),
               *filter(None, [index_note])])


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    out = tuple(ks)
    if not out or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1
                      for k in out):
        raise UsageError(f"ks must be positive whole numbers, got {ks!r}")
    return tuple(int(k) for k in out)


# -- images ---------------------------------------------------------------------
def _index_images(engine: "Engine", dataset: "RetrievalDataset",
                  progress: Progress) -> tuple[np.ndarray, Any]:
    """Ingest the split's image files; their catalog ids in dataset order, and the report."""
    paths = _catalog_paths(dataset)
    report = engine.index(paths, progress=progress)
    by_path = {path: image_id for image_id, path in engine.store.read.all_image_paths()}
    return _ids_in_order(paths, by_path, report, dataset, "images"), report


def _ids_in_order(paths: list[str], by_path: dict[str, int], report: Any,
                  dataset: "RetrievalDataset", what: str) -> np.ndarray:
    """The catalog ids of ``paths`` in order; an error naming the first one not indexed."""
    missing = [i for i, p in enumerate(paths) if p not in by_path]
    if missing:
        reasons = {s.path: s.reason for s in report.skipped}
        first = paths[missing[0]]
        why = reasons.get(first, "not picked up by the indexer (file name extension?)")
        raise DatasetError(f"{len(missing)} of {len(paths)} {what} could not be indexed; "
                           f"first: {dataset.image_paths[missing[0]]}: {why}")
    return np.asarray([by_path[p] for p in paths], dtype=np.int64)


def _catalog_paths(dataset: "RetrievalDataset") -> list[str]:
    """Each image's path as the catalog stores a file given explicitly (its canonical root).

    Entries that name the same file two ways (``a/../b.jpg`` and ``b.jpg``) would
    share one catalog row and could not both be found, so they are refused.
    """
    from mmsearch.locations import canonical_root

    paths = [str(canonical_root(p)) for p in dataset.image_paths]
    first: dict[str, int] = {}
    for i, path in enumerate(paths):
        j = first.setdefault(path, i)
        if j != i:
            raise DatasetError(f"images {dataset.image_paths[j]} and {dataset.image_paths[i]} "
                               f"are the same file ({path}); each image must be its own file")
    return paths


def _image_indexes(engine: "Engine",
                   index_type: str) -> tuple["VectorIndex", "VectorIndex | None", str | None]:
    """(index to search, exact index to compare it with or None, a note on the choice)."""
    exact = engine.store.vectors("images")
    if engine.store.image_index_plan(index_type)[0].is_exact:
        return exact, None, None
    # Built in memory from the stored vectors as the engine builds it; the store's
    # exact index (and images.faiss) are left as they are.
    approx = engine.store.build_index("images", index_type)
    if approx.is_exact:  # the engine falls back to Flat when it cannot train the type
        return exact, None, (f"index type {index_type!r} could not be built for "
                             f"{exact.ntotal} images; the engine used exact search (Flat)")
    return approx, exact, None


# -- captions -------------------------------------------------------------------
def _index_captions(engine: "Engine", dataset: "RetrievalDataset",
                    progress: Progress) -> tuple[np.ndarray, int]:
    """Add every caption as a text keyed by its position; their text ids, and how many were new."""
    captions = dataset.captions
    embedded = 0
    for start in range(0, len(captions), TEXT_CHUNK):
        stop = min(start + TEXT_CHUNK, len(captions))
        report = engine.add_texts([(str(i), captions[i]) for i in range(start, stop)])
        embedded += report.added + report.replaced
        progress("texts", stop, len(captions))
    read = engine.store.read
    stored = read.texts_by_id(int(i) for i in read.all_text_ids())  # ints: not np.int64
    by_key = {key: (text_id, text) for text_id, (key, text) in stored.items()}
    ids = np.empty(len(captions), dtype=np.int64)
    for i, caption in enumerate(captions):
        text_id, text = by_key[str(i)]
        if text != caption:  # pragma: no cover - add_texts just stored it
            raise DatasetError(f"caption {i} is stored as {text!r}, not {caption!r}")
        ids[i] = text_id
    return ids, embedded


# -- videos ---------------------------------------------------------------------
def _evaluate_videos(dataset: "RetrievalDataset", settings: "Settings", index_type: str,
                     cut_offs: tuple[int, ...], progress: Progress) -> EvalResult:
    """:func:`evaluate` of a video dataset: index the videos, mean-pool their frames, rank."""
    from mmsearch.engine import Engine
    from mmsearch.eval.video import rank_summary

    start = time.perf_counter()
    identity = identify(settings.model, settings.pretrained)
    name = eval_index_name(dataset.name, dataset.split, identity, False, settings.video_fps)
    eval_settings = settings.with_(index=name, index_type="flat")
    with Engine(eval_settings, create=True) as engine:
        video_ids, report = _index_videos(engine, dataset, progress)
        text_start = time.perf_counter()
        text_ids, texts_embedded = _index_captions(engine, dataset, progress)
        text_seconds = time.perf_counter() - text_start
        search_start = time.perf_counter()
        ranks, n_frames = _video_ranks(engine, dataset, video_ids, text_ids)
        search_seconds = time.perf_counter() - search_start
        model = {**asdict(engine.identity), "description": engine.identity.describe()}
        device = engine.device
    (t2v, t2v_ranks), (v2t, v2t_ranks) = (rank_summary(r, cut_offs) for r in ranks)
    return EvalResult(
        dataset=dataset.name, split=dataset.split, t2i=t2v, i2t=v2t,
        rsum=metrics.rsum(t2v, v2t, cut_offs), mean_recall=metrics.mean_recall(t2v, v2t, cut_offs),
        n_images=dataset.n_images, n_captions=dataset.n_captions, model=model,
        index_type="exact, mean-pooled frames", index_name=name,
        index_dir=str(eval_settings.index_dir.absolute()), device=device, draft=False,
        embedded=report.embedded, embed_seconds=report.seconds,
        images_per_second=report.images_per_second, text_seconds=text_seconds,
        texts_embedded=texts_embedded, search_seconds=search_seconds,
        eval_seconds=time.perf_counter() - start, media="video", n_frames=n_frames,
        video_fps=settings.video_fps,
        t2i_ranks=t2v_ranks, i2t_ranks=v2t_ranks,
        notes=_video_notes(identity, index_type, report, dataset.n_images))


def _index_videos(engine: "Engine", dataset: "RetrievalDataset",
                  progress: Progress) -> tuple[np.ndarray, Any]:
    """Ingest the split's video files; their catalog video ids in dataset order, and the report."""
    paths = _catalog_paths(dataset)
    report = engine.index(paths, progress=progress)
    if report.videos_without_decoder:
        from mmsearch.ingest.video import INSTALL

        raise DatasetError(f"{report.videos_without_decoder} of {len(paths)} videos could not "
                           f"be indexed: {INSTALL}")
    stored = engine.store.read.videos_under(paths)
    by_path = {path: row.id for path, row in stored.items()}
    return _ids_in_order(paths, by_path, report, dataset, "videos"), report


def _video_ranks(engine: "Engine", dataset: "RetrievalDataset", video_ids: np.ndarray,
                 text_ids: np.ndarray) -> tuple[tuple[np.ndarray, np.ndarray], int]:
    """((text -> video ranks), (video -> text ranks)), and how many frames were pooled."""
    from mmsearch.eval.video import first_hit_ranks, pooled_vectors

    store = engine.store
    dim = store.dim or 0
    pooled, n_frames = pooled_vectors(
        store, video_ids, lambda ids: _stored(store.read.image_vectors, dim, ids))
    texts = _stored(store.read.text_vectors, dim, text_ids)
    videos = np.arange(dataset.n_images)
    return ((first_hit_ranks(texts, pooled, dataset.caption_image, videos),
             first_hit_ranks(pooled, texts, videos, dataset.caption_image)), n_frames)


def _video_notes(identity: ModelIdentity, index_type: str, report: Any,
                 n_videos: int) -> list[str]:
    notes = ["each video is the time-weighted mean of its stored frames (a span of alike "
             "frames counts for its length), L2-normalised; ranked exactly"]
    if index_type.lower() not in ("flat", "auto"):
        notes.append(f"--index-type {index_type} does not apply to videos: their mean-pooled "
                     "vectors are ranked exactly")
    if identity.pretrained == NO_WEIGHTS:
        notes.append(f"random weights (--pretrained none): recall is at chance level "
                     f"(text->video R@K about 100*K/{n_videos} %); only the timings mean something")
    if report.embedded == 0:
        notes.append("every video was already in the cached index: this run embedded no frames")
    if report.warnings:
        first = report.warnings[0]
        notes.append(f"{len(report.warnings)} problems decoding videos (what decoded is "
                     f"pooled); first: {first.path}: {first.reason}")
    return notes


# -- searching ------------------------------------------------------------------
SEARCH_CHUNK = 4096  # queries per FAISS call (one progress step each)


def _rank(engine: "Engine", searched: "VectorIndex", exact: "VectorIndex | None",
          image_ids: np.ndarray, text_ids: np.ndarray, k: int,
          progress: Progress) -> tuple[tuple[np.ndarray, np.ndarray], float | None]:
    """((caption -> image positions), (image -> caption positions)), and the approx overlap."""
    store = engine.store
    dim = store.dim or searched.dim
    text_queries = _stored(store.read.text_vectors, dim, text_ids)
    image_queries = _stored(store.read.image_vectors, dim, image_ids)
    image_subset = None if store.read.image_count() == len(image_ids) else image_ids
    text_subset = None if store.read.text_count() == len(text_ids) else text_ids
    total = len(text_ids) * (1 if exact is None else 2) + len(image_ids)
    tracker = _Tracker(progress, total)
    k_images = max(k, OVERLAP_K) if exact is not None else k
    found = _search(searched, text_queries, k_images, image_subset, tracker, store)
    overlap = None
    if exact is not None:
        truth = _search(exact, text_queries, OVERLAP_K, image_subset, tracker)
        overlap = metrics.overlap_recall(found[:, :OVERLAP_K], truth, OVERLAP_K)
    texts = _search(store.vectors("texts"), image_queries, k, text_subset, tracker)
    return (_positions(found[:, :k], image_ids), _positions(texts, text_ids)), overlap


class _Tracker:
    def __init__(self, progress: Progress, total: int) -> None:
        self.progress, self.total, self.done = progress, total, 0

    def advance(self, n: int) -> None:
        self.done += n
        self.progress("search", self.done, self.total)


def _search(index: "VectorIndex", queries: np.ndarray, k: int, subset: np.ndarray | None,
            tracker: _Tracker, store: "Store | None" = None) -> np.ndarray:
    """Top-``k`` catalog ids per query (``-1`` padded), through the engine's FAISS wrapper
    (and, for an index of compressed codes, its exact re-ranking from ``store``'s catalog)."""
    from mmsearch.search.search import top_images

    out = np.full((len(queries), k), -1, dtype=np.int64)
    for start in range(0, len(queries), SEARCH_CHUNK):
        chunk = queries[start:start + SEARCH_CHUNK]
        if store is not None:
            ids = top_images(store, index, chunk, k, subset).ids
        else:
            ids = index.search(chunk, k, subset=subset).ids
        out[start:start + len(chunk), :ids.shape[1]] = ids
        tracker.advance(len(chunk))
    return out


def _stored(fetch: Callable[..., tuple[np.ndarray, np.ndarray]], dim: int,
            ids: np.ndarray) -> np.ndarray:
    """The catalog's vectors for ``ids``, in the order of ``ids`` (the catalog sorts by id)."""
    got, vectors = fetch(dim, ids)
    rows = np.searchsorted(got, ids)
    if len(got) == 0 or not np.array_equal(got[np.minimum(rows, len(got) - 1)], ids):
        raise DatasetError("the index lost vectors while evaluating; run the evaluation again")
    return vectors[rows]


def _positions(found: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Map catalog ids in ``found`` to positions in ``ids`` (``-1`` for anything else)."""
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    at = np.minimum(np.searchsorted(sorted_ids, found), len(ids) - 1)
    valid = (found >= 0) & (sorted_ids[at] == found)
    return np.where(valid, order[at], -1)


def _notes(identity: ModelIdentity, draft: bool, embedded: int, n_images: int) -> list[str]:
    notes = []
    if draft:
        notes.append("JPEGs decoded with the reduced-DCT draft: on photos at least twice the "
                     "model's input size the scores differ from open_clip's preprocess; "
                     "published figures decode in full (the default)")
    if identity.pretrained == NO_WEIGHTS:
        notes.append(f"random weights (--pretrained none): recall is at chance level "
                     f"(text->image R@K about 100*K/{n_images} %); only the timings mean something")
    if embedded == 0:
        notes.append("every image was already in the cached index: this run embedded none, "
                     "so it measured no images/s")
    elif embedded < n_images:
        notes.append(f"{n_images - embedded} of {n_images} images were reused (cached or "
                     f"duplicate content): images/s covers the {embedded} embedded")
    return notes
