"""Indexing the videos of a run: the same diff as photos, a video's frames as its vectors.

An index run hands this module the video files its scan found (:func:`split`). They go
through the same incremental diff as photos (:mod:`mmsearch.ingest.diff`), against the
catalog's ``videos`` rows: a video whose size and mtime match its row is unchanged; one
whose content hash (:func:`mmsearch.ingest.video.video_hash`: size, head and tail) matches
its row was only touched; one with the content of a video whose file is gone was moved or
renamed, and its row and frames follow it (their ids and vectors stay); the rest are
decoded (:func:`mmsearch.ingest.video.sample`: about one frame a second plus the first
frame of each shot), embedded, and near-identical consecutive frames collapsed into one
span (:func:`mmsearch.ingest.video.collapse`). A video's frames and its row are one write
of the store (:meth:`Store.put_images` with ``video=``), so a run killed in the middle
leaves each video whole or absent. Videos whose files are gone are forgotten.

Without PyAV (the ``video`` extra) nothing here runs: the videos found are counted in the
report, which says how to enable them, and the videos already indexed are kept.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from mmsearch.errors import DecodeError
from mmsearch.ingest.diff import Found, IndexReport, Moves, Scan, Skipped, diff, stopped
from mmsearch.ingest.discover import is_video
from mmsearch.ingest.metadata import video_taken
from mmsearch.locations import moment
from mmsearch.settings import VIDEO_FPS
from mmsearch.store import ImageFile, StoredImage, VideoFile

if TYPE_CHECKING:  # pragma: no cover
    from mmsearch.models.openclip import Embedder
    from mmsearch.store import Store

MERGE_ABOVE = 0.97  # consecutive frames more alike than this (cosine) are stored once


@dataclass(frozen=True)
class VideoOptions:
    fps: float = VIDEO_FPS  # frames sampled per second of video (plus each shot's first)
    max_side: int = 512     # frames are decoded at most this large (the model needs less)


def split(scanned: Scan) -> tuple[Scan, Scan]:
    """(the photos, the videos) of a scan, by extension."""
    photos, videos = Scan(roots=scanned.roots, keep=scanned.keep), Scan(roots=scanned.roots,
                                                                        keep=scanned.keep)
    for f in scanned.found:
        (videos if is_video(f.path) else photos).found.append(f)
    return photos, videos


def index_videos(store: "Store", embedder: "Embedder | Callable[[], Embedder]", scanned: Scan,
                 report: IndexReport, options: VideoOptions, *, batch_size: int,
                 stop: threading.Event | None = None) -> "Embedder | Callable[[], Embedder]":
    """Bring the index's videos in line with ``scanned`` (the videos of a run's scan).
    Returns the embedder, loaded if a video needed it."""
    if not scanned.found and not store.read.video_count():
        return embedder
    from mmsearch.ingest.video import available  # (PyAV itself only when a video is decoded)

    if not available():
        report.videos_without_decoder += len(scanned.found)
        return embedder
    found = diff(scanned, store.read.videos_under(scanned.roots))
    report.unchanged += len(found.unchanged)
    moves = Moves(found.gone)
    run = _VideoRun(store, embedder, report, options, batch_size, stop)
    for f, old in found.candidates:
        if stopped(stop):
            report.interrupted = True
            break
        run.one(f, old, moves)
    _settle(store, moves, report, forget=not report.interrupted)
    return run.embedder


def _settle(store: "Store", moves: Moves, report: IndexReport, *, forget: bool) -> None:
    moved, gone = moves.taken(), moves.unclaimed()
    store.move_videos(moved)
    report.moved += len(moved)
    if forget:
        store.forget_videos(r.id for r in gone)
        report.removed += len(gone)


class _VideoRun:
    def __init__(self, store: "Store", embedder: "Embedder | Callable[[], Embedder]",
                 report: IndexReport, options: VideoOptions, batch_size: int,
                 stop: threading.Event | None) -> None:
        self.store, self.embedder, self.report = store, embedder, report
        self.options, self.batch_size, self.stop = options, batch_size, stop

    def one(self, f: Found, old: StoredImage | None, moves: Moves) -> None:
        """One new or changed video: touched, moved, or decoded and embedded."""
        from mmsearch.ingest.video import video_hash

        try:
            h = video_hash(f.path)
        except DecodeError as exc:
            self.report.skipped.append(Skipped(str(f.path), str(exc)))
            return
        if old is not None and old.content_hash == h:
            self.store.move_videos([StoredImage(old.id, old.path, f.size, f.mtime_ns, h)])
            self.report.unchanged += 1
        elif old is None and moves.claim(f, h, {}):
            return
        else:
            self._embed(f, h, old)

    def _embed(self, f: Found, h: str, old: StoredImage | None) -> None:
        try:
            sampled = self._sample(f.path)
        except DecodeError as exc:
            self.report.skipped.append(Skipped(str(f.path), str(exc)))
            return
        if sampled.stopped:
            self.report.interrupted = True
            return
        video, frames, kept = _rows(f, h, sampled)
        replaces = [int(i) for i in self.store.read.frame_ids([old.id])] if old else []
        self.store.put_images(frames, kept, replaces=replaces, video=video,
                              replaces_video=old.id if old else None)
        self.report.count_put([old.id if old else None], embedded=False)
        self.report.embedded += len(sampled.times)
        self.report.frames += len(frames)
        self.report.warnings += [Skipped(str(f.path), p) for p in sampled.problems]

    def _sample(self, path: Path | str) -> "Embedded":
        """Decode and embed the sampled frames a batch at a time (an hour of frames as
        pictures would take GBs; as vectors, a few MB)."""
        from mmsearch.ingest.video import Sampling

        times: list[float] = []
        vectors: list[np.ndarray] = []
        with Sampling(path, self.options.fps, self.options.max_side, self.stop) as video:
            batch: list[Any] = []
            for frame in video:
                times.append(frame.time)
                batch.append(frame.image)
                if len(batch) == self.batch_size:
                    vectors.append(self._vectors(batch))
                    batch = []
            if batch:
                vectors.append(self._vectors(batch))
        if not times:
            raise DecodeError("no frame could be decoded")
        return Embedded(video.info, times, np.concatenate(vectors), video.problems,
                        video.stopped)

    def _vectors(self, images: Sequence[Any]) -> np.ndarray:
        if callable(self.embedder):  # loaded only when a video needs it
            self.embedder = self.embedder()
        emb = self.embedder
        return emb.encode_images(emb.collate([emb.prepare(im) for im in images])).astype(
            np.float32, copy=False)


@dataclass
class Embedded:
    """A video's sampled frames, embedded: what the catalog needs of it."""

    info: Any                # mmsearch.ingest.video.VideoInfo
    times: list[float]
    vectors: np.ndarray
    problems: list[str]
    stopped: bool


def _rows(f: Found, h: str, sampled: Embedded) -> tuple[VideoFile, list[ImageFile], np.ndarray]:
    """The video's row, its frames' rows (one per span of alike frames) and their vectors."""
    from mmsearch.ingest.video import collapse

    info, vectors = sampled.info, sampled.vectors
    spans = collapse(sampled.times, vectors, info.duration, threshold=MERGE_ABOVE)
    path, ext = str(f.path), Path(f.path).suffix.lower().lstrip(".")
    taken, offset, source = video_taken(info.taken, f.mtime_ns)
    meta = {"taken": taken, "taken_offset": offset, "taken_source": source,
            "width": info.width, "height": info.height, "ext": ext}
    frames = [ImageFile(moment(path, s.time), f.size, f.mtime_ns, frame_hash(h, s.time),
                        {**meta, "start_s": s.start, "end_s": s.end, "time_s": s.time})
              for s in spans]
    video = VideoFile(path, f.size, f.mtime_ns, h, {
        "duration": info.duration, "fps": info.fps, "width": info.width, "height": info.height,
        "codec": info.codec, "rotation": info.rotation, "taken": taken,
        "frames": len(frames)})
    return video, frames, vectors[[s.index for s in spans]]


def frame_hash(video_hash: str, time: float) -> str:
    """A frame's content hash: its video's, with the frame's time."""
    return f"{video_hash}#t={time:.3f}"
