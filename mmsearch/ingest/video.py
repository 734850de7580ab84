"""Videos -> sampled frames (PIL images with their times), safely; plus a cheap video hash.

`sample` decodes a video into RGB frames at a fixed rate (`DEFAULT_FPS` a second)
plus the first frame of each detected shot; `Sampling` does the same one frame at
a time (a long video's frames need not all be held at once: an hour at 1/s at
512 px is about 1.6 GB of pixels).  `probe` reads what the catalog keeps about a
video.  Everything here raises `DecodeError` with one short line for a bad file,
and nothing else; damage in the middle of a file is kept going past and listed
in `Sampled.problems`.  PyAV (FFmpeg) is imported lazily: `available` says
whether it is installed; without it, `probe`/`sample` raise `DecodeError(INSTALL)`.

Choices, in short:

* Containers: only MP4/MOV/3GP, Matroska/WebM and AVI are opened, recognised by
  their first bytes (whatever the extension says) and handed to that demuxer by
  name, so a file never reaches FFmpeg's other demuxers (playlists that fetch
  other files, image sequences...).  An MP4 cut short is only readable when its
  index (``moov``) is at the front ("faststart"); phones usually write it last.
* Times are the frames' presentation timestamps (pts x time base) counted from
  the stream's start, never frame numbers, so variable frame rates are right.
* Sampling: the frame nearest to each k/fps (k = 0, 1, ...) among the frames
  decoded; the first frame is always taken.  Frames are decoded in order, except
  that with `Strategy.seek` the decoder jumps (``container.seek``) to the next
  keyframe whenever it lies more than `SEEK_MIN_FRAMES` frames ahead and not past
  the next sample time: every keyframe is decoded, and the frames from the last
  keyframe before a sample time up to it, nothing else (keyframe times come from
  the container's index; without one, everything is decoded).  With
  `Strategy.skip_nonref` and at least `NONREF_MIN_RATIO` frames per sample,
  frames no other frame refers to are not decoded at all (``skip_frame =
  "NONREF"``), which moves a sample by at most about one frame.
  `benchmarks/bench_video.py` measures these; the default is the fastest.
* Shots: every decoded frame is shrunk to a `THUMB` x `THUMB` RGB thumbnail by
  the decoder's scaler; a frame whose mean absolute difference from the previous
  decoded one exceeds both `CUT_MIN` (0-255 scale) and `CUT_RATIO` times the
  recent average difference (`CUT_MIN` before there is one) starts a shot and is
  taken (``Frame.shot``).  Only frames decoded anyway are compared: when decoding
  jumps, a cut is found at the first keyframe after it (encoders put a keyframe
  at most cuts: x264's ``scenecut``), else at the next frame decoded.  Across a
  jump, pixels differ anyway (a second of camera motion), so there a cut is a
  change of colours: the L1 distance of the two thumbnails' 64-bin colour
  histograms above `CUT_COLOURS` (a cut between two shots of alike colours is
  missed there).  The first frame of the video starts the first shot.
* Pictures: scaled by FFmpeg's scaler straight to at most ``max_side`` pixels on
  the long side of the displayed picture (sample aspect ratio applied, never
  enlarged), then turned as the display matrix says (like EXIF orientation).
* Damage: a packet that fails to decode, a frame the decoder flags corrupt or a
  read error opens a loss that the next good frame after it closes
  (``"corrupt data near 0:42; 3.0 s lost"``); data the demuxer skipped (a jump in
  both file position and time between two packets) is a loss of its own.  A file that ends before its
  declared duration: ``"cut short at 0:02 of 0:06; 4.0 s lost"``.  No good frame
  at all: `DecodeError`.
* Memory: decoder threads are capped so that frames in flight stay within
  `DECODE_MEMORY` (an 8K frame is 50 MB), no full-size picture is ever made, and
  frames above `MAX_PIXELS` (beyond 8K) are refused.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import math
import os
import threading
from bisect import bisect_right
from itertools import chain
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mmsearch.errors import DecodeError, UsageError
from mmsearch.ingest.decode import os_reason, open_regular  # one wording for OS errors
from mmsearch.ingest.discover import VIDEO_EXTENSIONS, is_video  # what a video file is: one place
from mmsearch.models.device import cores

__all__ = ["DEFAULT_FPS", "DEFAULT_STRATEGY", "INSTALL", "VIDEO_EXTENSIONS", "Frame", "Sampled",
           "Sampling", "Span", "Strategy", "VideoInfo", "available", "collapse", "is_video", "probe",
           "sample", "video_hash"]

DEFAULT_FPS = 1.0
"""Frames sampled per second of video."""

INSTALL = "videos need PyAV: pip install 'mmsearch[video]'"

HASH_EDGE = 1 << 20
"""`video_hash` reads this many bytes at each end of a file."""

THUMB = 16
CUT_MIN = 8.0
CUT_RATIO = 4.0
CUT_MEMORY = 0.8  # weight of the past in the running average of differences
CUT_COLOURS = 0.62  # colour-histogram distance (L1, 0-2) that makes a cut across a jump

SEEK_MIN_FRAMES = 12
NONREF_MIN_RATIO = 4.0
DECODE_MEMORY = 512 << 20
MAX_PIXELS = 8192 * 4608  # above 8K (DCI and UHD) a video is refused: its frames alone need GBs
MAX_READ_ERRORS = 32  # consecutive demuxing errors before the rest of a file is given up
TAIL_SLACK = 1.0      # seconds a file may end before its declared duration without a problem

_MOV_ATOMS = frozenset({b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot", b"uuid"})
_EBML = b"\x1a\x45\xdf\xa3"
_ATTACHED_PIC = 0x0400  # AV_DISPOSITION_ATTACHED_PIC: a cover picture, not a video


@dataclass(frozen=True)
class Strategy:
    """How `Sampling` decodes (see the module docstring); the benchmark compares them."""

    seek: bool = True
    skip_nonref: bool = True
    scale_in_decoder: bool = True  # False: a full-size PIL image, then Pillow's resize


DEFAULT_STRATEGY = Strategy()


@dataclass(frozen=True)
class VideoInfo:
    """What the catalog keeps for a video."""

    duration: float          # seconds; 0.0 when the file does not say (sample() then measures it)
    fps: float | None        # average frame rate
    width: int               # displayed size: after rotation and sample aspect ratio
    height: int
    codec: str               # FFmpeg's codec name: "h264", "hevc", "vp9"...
    rotation: int            # 0/90/180/270: degrees clockwise the stored picture is turned for display
    taken: str | None        # the container's creation_time (UTC), "2021-05-03T10:15:00"


@dataclass(frozen=True)
class Frame:
    time: float              # seconds from the start (presentation time)
    image: Image.Image       # RGB, turned for display, at most max_side px on its long side
    shot: bool               # first frame of a detected shot (the video's first frame included)


@dataclass
class Sampled:
    info: VideoInfo
    frames: list[Frame]
    problems: list[str]      # one short line per thing that went wrong mid-file
    stopped: bool = False    # the stop event ended decoding early: frames are only the beginning


@dataclass(frozen=True)
class Span:
    start: float             # first frame's time
    end: float               # next span's start; the video's duration for the last span
    time: float              # the representing frame's time (the span's first frame: = start)
    index: int               # row of the input that represents the span


@functools.cache
def available() -> bool:
    """Whether PyAV can be imported."""
    if importlib.util.find_spec("av") is None:
        return False
    try:
        import av  # noqa: F401
    except Exception:  # a broken install is as good as none
        return False
    return True


def video_hash(path: Path | str) -> str:
    """BLAKE2b-128 hex of ``b"video\\0"``, the size (8 bytes, little-endian), the first
    `HASH_EDGE` bytes and the last `HASH_EDGE` bytes: two reads, however big the file.

    A file of 2 MiB or less has its head and then the rest after it hashed, i.e. all of
    it once, under the same scheme.  The prefix keeps a video's digest apart from any
    image's `content_hash`.  `DecodeError` when the file cannot be read."""
    with open_regular(path) as fh:
        try:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(HASH_EDGE)
            if size > 2 * HASH_EDGE:
                fh.seek(size - HASH_EDGE)
            tail = fh.read(HASH_EDGE)
        except OSError as exc:
            raise DecodeError(os_reason(exc)) from exc
    digest = hashlib.blake2b(b"video\0", digest_size=16)
    digest.update(size.to_bytes(8, "little"))
    digest.update(head)
    digest.update(tail)
    return digest.hexdigest()


def collapse(times: Sequence[float] | np.ndarray, vectors: np.ndarray, duration: float,
             threshold: float = 0.97) -> list[Span]:
    """Merge runs of near-identical frames: a span starts at a frame and takes in the
    following frames while their cosine to that first frame stays above ``threshold``.

    ``vectors``: L2-normalised rows in time order, one per time.  Each span covers
    [its first frame's time, the next span's first time); the last ends at ``duration``
    (or at its own start, if that is later)."""
    times = np.asarray(times, dtype=np.float64)
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or times.ndim != 1 or len(times) != len(vectors):
        raise UsageError(f"collapse needs one vector row per time, got {vectors.shape} for {times.shape}")
    firsts = _span_firsts(vectors, threshold)
    ends = [float(times[i]) for i in firsts[1:]] + [max(float(duration), float(times[firsts[-1]]))] \
        if firsts else []
    return [Span(float(times[i]), end, float(times[i]), i) for i, end in zip(firsts, ends)]


def _span_firsts(vectors: np.ndarray, threshold: float) -> list[int]:
    """Rows that start a span, scanning windows of growing length from each start."""
    firsts, n, start = [], len(vectors), 0
    while start < n:
        firsts.append(start)
        window, nxt = 16, n
        lo = start + 1
        while lo < n:
            hi = min(n, lo + window)
            below = np.flatnonzero(vectors[lo:hi] @ vectors[start] <= threshold)
            if below.size:
                nxt = lo + int(below[0])
                break
            lo, window = hi, window * 2
        start = nxt
    return firsts


def probe(path: Path | str) -> VideoInfo:
    """What the catalog keeps about ``path`` (decodes its first frame, for the rotation)."""
    with Sampling(path) as sampling:
        return sampling.info


def sample(path: Path | str, fps: float = DEFAULT_FPS, max_side: int = 512,
           stop: threading.Event | None = None, *, strategy: Strategy = DEFAULT_STRATEGY) -> Sampled:
    """Frames of ``path`` at ``fps`` a second plus each shot's first frame (module docstring).

    ``stop``: when set, decoding ends at the next frame and what was sampled so far
    comes back with ``stopped=True``."""
    with Sampling(path, fps, max_side, stop, strategy=strategy) as sampling:
        frames = list(sampling)
        return Sampled(sampling.info, frames, sampling.problems, sampling.stopped)


def frame_at(path: Path | str, seconds: float, max_side: int = 512) -> Frame:
    """The frame shown at ``seconds``: the last one starting at or before it (the first
    frame before the start, the last one past the end), decoded cheaply: a jump to the
    keyframe at or before ``seconds``, then decoding on to it.  `DecodeError` for a bad file."""
    if not (isinstance(seconds, (int, float)) and math.isfinite(seconds)):
        raise UsageError(f"a time in seconds, got {seconds!r}")
    av = _av()
    container = _open(av, path)
    try:
        with _translated():
            stream = _video_stream(container)
            _configure(stream, DEFAULT_FPS, Strategy(skip_nonref=False))
            reader = _Reader(container, stream, av.FFmpegError)
            if seconds > 0:
                reader.seek(seconds)
            time, frame = _shown_at(reader, seconds)
            picture = _Picture(_info(container, stream, frame), stream, max_side, DEFAULT_STRATEGY)
            return Frame(time, picture.image(frame), shot=False)
    finally:
        container.close()


def _shown_at(reader: _Reader, seconds: float) -> tuple[float, Any]:
    """The last good frame of ``reader`` starting at or before ``seconds`` (half a
    millisecond early counts: times in URLs are rounded to milliseconds)."""
    shown = None
    for time, frame in reader.frames():
        if shown is not None and time > seconds + 5e-4:
            break
        shown = (time, frame)
    if shown is None:
        kind = reader.damage.first_kind
        raise DecodeError("no frame decodes" + (f" ({kind})" if kind else ""))
    return shown


class Sampling:
    """`sample`, one `Frame` at a time::

        with Sampling(path) as video:      # opens, decodes the first frame: .info is known
            for frame in video: ...        # .problems and .stopped are final after the loop

    Iterate once.  A duration the file did not declare is measured by the loop."""

    def __init__(self, path: Path | str, fps: float = DEFAULT_FPS, max_side: int = 512,
                 stop: threading.Event | None = None, *, strategy: Strategy = DEFAULT_STRATEGY):
        if not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
            raise UsageError(f"fps must be a positive number, got {fps!r}")
        if max_side < 1:
            raise UsageError(f"max_side must be positive, got {max_side}")
        self.path, self.fps, self.max_side, self.stop = path, float(fps), int(max_side), stop
        self.strategy = strategy
        self.problems: list[str] = []
        self.stopped = False
        self.info: VideoInfo
        self._container: Any = None

    def __enter__(self) -> Sampling:
        av = _av()
        self._container = _open(av, self.path)
        try:
            with _translated():
                stream = _video_stream(self._container)
                _configure(stream, self.fps, self.strategy)
                self._reader = _Reader(self._container, stream, av.FFmpegError)
                self._first = self._reader.first()
                self.info = _info(self._container, stream, self._first[1])
        except BaseException:
            self._container.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._container.close()

    def __iter__(self) -> Iterator[Frame]:
        with _translated():
            yield from self._frames()
            self._finish()

    def _frames(self) -> Iterator[Frame]:
        reader = self._reader
        picker = _Picker(self.fps, _Picture(self.info, reader.stream, self.max_side, self.strategy))
        plan = _SeekPlan(reader, self.info.fps) if self.strategy.seek else None
        for time, frame in chain([self._first], reader.frames()):
            if self.stop is not None and self.stop.is_set():
                self.stopped = True
                return
            yield from picker.offer(time, frame)
            jump = plan.next_jump(time, picker.target) if plan is not None else None
            if jump is not None:
                reader.seek(jump)
                picker.jumped()

    def _finish(self) -> None:
        """The problems and, when the file did not say, the duration, once the loop is over."""
        if self.stopped:
            self.problems = list(self._reader.damage.problems)
            return
        end = self._reader.end
        if self.info.duration <= 0 and end is not None:
            self.info = replace(self.info, duration=round(end, 6))
        self.problems = self._reader.damage.finish(self.info.duration, end)


# -- opening ------------------------------------------------------------------

def _av():
    try:
        import av
    except ImportError as exc:
        raise DecodeError(INSTALL) from exc
    return av


class _translated:
    """Turn anything but a `DecodeError` raised inside into one (decoders raise all sorts)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is None or isinstance(exc, (DecodeError, GeneratorExit)) or not isinstance(exc, Exception):
            return False
        raise DecodeError(f"corrupt video: {_describe(exc)}") from exc


def _demuxer(path: Path | str) -> str:
    """The FFmpeg demuxer for ``path``'s first bytes, or `DecodeError`."""
    with open_regular(path) as fh:
        try:
            head = fh.read(12)
        except OSError as exc:
            raise DecodeError(os_reason(exc)) from exc
    if not head:
        raise DecodeError("empty file")
    if head[4:8] in _MOV_ATOMS:
        return "mov"
    if head[:4] == _EBML:
        return "matroska"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "avi"
    raise DecodeError("not a video (unrecognised container)")


def _open(av, path: Path | str):
    fmt = _demuxer(path)
    try:
        return av.open(os.fspath(path), format=fmt, metadata_errors="replace")
    except Exception as exc:
        if isinstance(exc, OSError) and not isinstance(exc, av.FFmpegError):
            raise DecodeError(os_reason(exc)) from exc
        raise DecodeError(f"not a video ({_ffmpeg_reason(exc)})") from exc


def _video_stream(container):
    """The first video stream that is not a cover picture, with a decoder."""
    for stream in container.streams.video:
        if int(stream.disposition) & _ATTACHED_PIC:
            continue
        if stream.codec_context is None:
            raise DecodeError("unsupported video codec (no decoder in this FFmpeg)")
        return stream
    raise DecodeError("no video stream")


def _configure(stream, fps: float, strategy: Strategy) -> None:
    """Decoder threads (capped by `DECODE_MEMORY`) and, where harmless, skipping non-reference
    frames; `DecodeError` for a frame size above `MAX_PIXELS` (as the header says)."""
    ctx = stream.codec_context
    if ctx.width * ctx.height > MAX_PIXELS:
        raise DecodeError(f"too large: {ctx.width}x{ctx.height} exceeds {MAX_PIXELS} pixels")
    depth = 2 if "10" in (ctx.pix_fmt or "") or "12" in (ctx.pix_fmt or "") else 1
    frame_bytes = max(1, ctx.width * ctx.height) * 3 // 2 * depth
    ctx.thread_count = max(1, min(cores(), DECODE_MEMORY // (4 * frame_bytes)))
    ctx.thread_type = "AUTO"
    rate = _rate(stream)
    if strategy.skip_nonref and rate is not None and rate / fps >= NONREF_MIN_RATIO:
        ctx.skip_frame = "NONREF"


def _rate(stream) -> float | None:
    rate = stream.average_rate or stream.guessed_rate
    return float(rate) if rate and rate > 0 else None


# -- what a video is ------------------------------------------------------------

def _info(container, stream, first_frame) -> VideoInfo:
    rotation = _rotation(stream, first_frame)
    width, height = _display_size(stream, first_frame)
    if rotation in (90, 270):
        width, height = height, width
    codec = stream.codec_context.codec
    return VideoInfo(duration=_duration(container, stream), fps=_rate(stream), width=width,
                     height=height, codec=codec.canonical_name or codec.name, rotation=rotation,
                     taken=_taken(container, stream))


def _rotation(stream, frame) -> int:
    """Clockwise display rotation: the frame's display matrix, else an old ``rotate`` tag."""
    try:
        counter_clockwise = float(frame.rotation or 0)
    except Exception:
        counter_clockwise = 0.0
    if counter_clockwise == 0:
        try:
            return (round(float(stream.metadata.get("rotate", 0)) / 90) * 90) % 360
        except ValueError:
            return 0
    return (-round(counter_clockwise / 90) * 90) % 360


def _display_size(stream, frame) -> tuple[int, int]:
    width, height = frame.width, frame.height
    sar = stream.sample_aspect_ratio
    if sar and sar > 0 and sar != 1:
        width = max(1, round(width * float(sar)))
    return width, height


def _duration(container, stream) -> float:
    if stream.duration and stream.duration > 0:
        return float(stream.duration * stream.time_base)
    if container.duration and container.duration > 0:
        return container.duration / 1_000_000
    return 0.0


def _taken(container, stream) -> str | None:
    """creation_time as naive UTC ISO text; None when absent, unreadable or before 1971."""
    text = container.metadata.get("creation_time") or stream.metadata.get("creation_time")
    if not text:
        return None
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is not None:
        when = when.astimezone(timezone.utc).replace(tzinfo=None)
    return when.isoformat(timespec="seconds") if when.year >= 1971 else None


# -- reading frames -------------------------------------------------------------

class _Reader:
    """Good frames of one stream in presentation order; what was lost is noted in `damage`."""

    def __init__(self, container, stream, ffmpeg_error: type[Exception]):
        self.container, self.stream, self._error = container, stream, ffmpeg_error
        self.time_base = stream.time_base
        self.origin = stream.start_time if stream.start_time is not None else 0
        self.damage = _Damage(_rate(stream))
        self.end: float | None = None  # where the last good frame ends, seconds
        self._moves = 0
        self._frames = self._good_frames()

    def seconds(self, ts: int) -> float:
        return float((ts - self.origin) * self.time_base)

    def first(self) -> tuple[float, Any]:
        for item in self._frames:
            return item
        kind = self.damage.first_kind
        raise DecodeError("no frame decodes" + (f" ({kind})" if kind else ""))

    def frames(self) -> Iterator[tuple[float, Any]]:
        return self._frames

    def seek(self, seconds: float) -> None:
        """Jump to the last keyframe at or before ``seconds``; frames in flight are dropped."""
        try:
            self.container.seek(self.origin + int(seconds / self.time_base), stream=self.stream)
        except self._error:
            return  # decoding simply goes on from where it is
        self._moves += 1
        self.damage.jumped()

    def _good_frames(self) -> Iterator[tuple[float, Any]]:
        last = -1e-3  # frames before the start are not shown; a frame seen before is not repeated
        for packet in self._packets():
            moves = self._moves
            for frame in self._decode(packet):
                time = self.seconds(frame.pts)
                if time <= last:
                    continue
                last = time
                self.end = time + self._frame_seconds(frame)
                self.damage.good(time)
                yield time, frame
                if self._moves != moves:
                    break  # the consumer seeked: this packet's other frames are from before

    def _frame_seconds(self, frame) -> float:
        if frame.duration:
            return float(frame.duration * self.time_base)
        return 1.0 / self.damage.rate if self.damage.rate else 0.0

    def _packets(self) -> Iterator[Any]:
        """The stream's packets; read errors and data the demuxer skipped are noted."""
        failures = 0
        while failures <= MAX_READ_ERRORS:
            try:
                for packet in self.container.demux():
                    failures = 0
                    ours = packet.stream_index == self.stream.index
                    dts = packet.dts if packet.dts is not None else packet.pts
                    self.damage.read(packet.pos, packet.size,
                                     self.seconds(dts) if ours and dts is not None else None)
                    if ours:
                        yield packet
                return
            except self._error:
                failures += 1
                self.damage.failed("unreadable data", None)

    def _decode(self, packet) -> list[Any]:
        try:
            frames = self.stream.decode(packet)
        except self._error:
            pts = packet.pts if packet.pts is not None else packet.dts
            self.damage.failed("corrupt data", None if pts is None else self.seconds(pts))
            return []
        good = []
        for frame in frames:
            if frame.pts is None:
                continue
            if frame.is_corrupt:
                self.damage.failed("corrupt data", self.seconds(frame.pts))
            else:
                good.append(frame)
        return good


BYTE_SLACK = 256  # bytes of container overhead allowed between two packets


class _Damage:
    """Losses, as one line each: a failure opens one at its time; the next good frame
    after that time closes it.  Data skipped by the demuxer is a loss of its own."""

    def __init__(self, rate: float | None):
        self.rate = rate
        self.problems: list[str] = []
        self.first_kind: str | None = None
        self._open: tuple[str, float] | None = None
        self._dts: float | None = None      # time of the stream's last packet
        self._byte_end: int | None = None   # file position after the last packet (any stream)
        self._skipped = False

    def read(self, pos: int | None, size: int, dts: float | None) -> None:
        """A packet was read at ``pos``; ``dts`` is its time when it is the video stream's."""
        if pos is not None and pos >= 0 and size > 0:
            if self._byte_end is not None and pos - self._byte_end > BYTE_SLACK:
                self._skipped = True
            self._byte_end = pos + size
        if dts is None:
            return
        gap = 2.0 / self.rate if self.rate else 0.5
        if self._skipped and self._dts is not None and dts - self._dts > gap:
            self._note("missing data", self._dts, dts - self._dts)
        self._skipped, self._dts = False, dts

    def failed(self, kind: str, since: float | None) -> None:
        """Something was lost at ``since`` (seconds; None: at the last packet read)."""
        since = since if since is not None else (self._dts or 0.0)
        if self.first_kind is None:
            self.first_kind = kind
        if self._open is None or since < self._open[1]:
            self._open = (kind, since)

    def good(self, time: float) -> None:
        if self._open is not None and time > self._open[1] + 1e-6:
            kind, since = self._open
            self._open = None
            self._note(kind, since, time - since)

    def jumped(self) -> None:
        self._dts, self._byte_end, self._skipped = None, None, False

    def finish(self, duration: float, end: float | None) -> list[str]:
        """All the lines, with a missing end of file (or a loss still open there)."""
        problems = list(self.problems)
        if end is not None and duration - end > TAIL_SLACK:
            problems.append(f"cut short at {_clock(end)} of {_clock(duration)}; "
                            f"{duration - end:.1f} s lost")
        elif self._open is not None:
            kind, since = self._open
            problems.append(f"{kind} near {_clock(since)}; {max(duration, end or 0.0) - since:.1f} s lost")
        return problems

    def _note(self, kind: str, since: float, lost: float) -> None:
        if self.first_kind is None:
            self.first_kind = kind
        self.problems.append(f"{kind} near {_clock(since)}; {lost:.1f} s lost")


# -- choosing frames ------------------------------------------------------------

class _Picker:
    """Which decoded frames become `Frame`s: the nearest to each k/fps, and shot starts."""

    def __init__(self, fps: float, picture: _Picture):
        self.fps, self.picture = fps, picture
        self.k = 0
        self._held: tuple[float, Any] | None = None  # the last frame not taken, before the target
        self._thumb: np.ndarray | None = None
        self._average: float | None = None  # running mean difference of consecutive frames
        self._jumped = False

    @property
    def target(self) -> float:
        return self.k / self.fps

    def offer(self, time: float, frame) -> Iterator[Frame]:
        cut, taken = self._cut(frame), False
        while time >= self.target - 1e-9:
            held = self._held
            if held is not None and self.target - held[0] <= time - self.target:
                self._held = None
                yield self._take(*held, shot=False, sample=True)
                continue
            yield self._take(time, frame, shot=cut, sample=True)
            taken = True
            break
        if cut and not taken:
            yield self._take(time, frame, shot=True, sample=False)
            taken = True
        self._held = None if taken else (time, frame)

    def jumped(self) -> None:
        """The reader seeked: the held frame is behind, the next difference spans the jump."""
        self._held, self._jumped = None, True

    def _take(self, time: float, frame, shot: bool, sample: bool) -> Frame:
        """``frame`` as a `Frame`; a ``sample`` serves the current target (and any it passed)."""
        if sample:
            self.k = max(self.k + 1, math.floor(time * self.fps + 1e-9) + 1)
        return Frame(time, self.picture.image(frame), shot)

    def _cut(self, frame) -> bool:
        """Whether ``frame`` starts a shot (the first frame does)."""
        thumb, previous = self.picture.thumb(frame), self._thumb
        self._thumb, jumped, self._jumped = thumb, self._jumped, False
        if previous is None:
            return True
        if jumped:  # a second of motion changes the pixels, not the colours
            return float(np.abs(_histogram(thumb) - _histogram(previous)).sum()) > CUT_COLOURS
        diff, average = float(np.abs(thumb - previous).mean()), self._average
        cut = diff > max(CUT_MIN, CUT_RATIO * (CUT_MIN if average is None else average))
        if not cut:
            self._average = diff if average is None else CUT_MEMORY * average + (1 - CUT_MEMORY) * diff
        return cut


def _histogram(thumb: np.ndarray) -> np.ndarray:
    """A thumbnail's colours: 4 levels a channel, 64 bins, summing to 1."""
    levels = thumb.reshape(-1, 3) // 64
    return np.bincount(levels @ np.array([16, 4, 1]), minlength=64) / len(levels)


class _Picture:
    """Decoded frames -> display-ready PIL images and small thumbnails, by FFmpeg's scaler."""

    _TURN = {90: Image.Transpose.ROTATE_270, 180: Image.Transpose.ROTATE_180,  # clockwise
             270: Image.Transpose.ROTATE_90}                                    # -> PIL's counter-

    def __init__(self, info: VideoInfo, stream, max_side: int, strategy: Strategy):
        from av.video.reformatter import VideoReformatter

        self._scaler, self._thumbs = VideoReformatter(), VideoReformatter()
        sar = stream.sample_aspect_ratio
        self._sar = float(sar) if sar and sar > 0 else 1.0
        self._turn = self._TURN.get(info.rotation)
        self.max_side, self.in_decoder = max_side, strategy.scale_in_decoder

    def image(self, frame) -> Image.Image:
        width, height = _fit(frame.width * self._sar, frame.height, self.max_side)
        if self.in_decoder:
            image = self._scaler.reformat(frame, width, height, format="rgb24", interpolation="AREA",
                                          src_color_range=frame.color_range or None).to_image()
        else:
            image = frame.to_image()
            if image.size != (width, height):
                image = image.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=None)
        return image.transpose(self._turn) if self._turn is not None else image

    def thumb(self, frame) -> np.ndarray:
        small = self._thumbs.reformat(frame, THUMB, THUMB, format="rgb24", interpolation="AREA")
        return small.to_ndarray().astype(np.int16)


def _fit(width: float, height: float, max_side: int) -> tuple[int, int]:
    """(width, height) scaled down to at most ``max_side`` on the long side, never up."""
    scale = min(1.0, max_side / max(width, height, 1))
    return max(1, round(width * scale)), max(1, round(height * scale))


class _SeekPlan:
    """Keyframe times from the container's index, and where to jump next.

    Index times are decode times (MP4 with B-frames: a little before the keyframe is
    shown), while seeking goes by presentation time; so a jump aims half-way between a
    keyframe and the next one, and lands on the keyframe.  Jumps only ever go forward."""

    def __init__(self, reader: _Reader, rate: float | None):
        try:
            entries = reader.stream.index_entries
            keys = sorted(reader.seconds(e.timestamp) for e in entries if e.is_keyframe)
        except Exception:  # no usable index: decode everything
            keys = []
        self.keys = keys
        self.min_gap = SEEK_MIN_FRAMES / rate if rate else 0.5
        self._last = -math.inf

    def next_jump(self, position: float, target: float) -> float | None:
        """Where to seek to land on the next keyframe after ``position``, when it is more than
        `SEEK_MIN_FRAMES` ahead and not past ``target``; None: decode on.  So every keyframe
        is decoded, and the frames from the last one before a target up to it."""
        i = bisect_right(self.keys, max(position, self._last))
        if i >= len(self.keys) or self.keys[i] > target + 1e-6 or self.keys[i] - position <= self.min_gap:
            return None
        after = self.keys[i + 1] if i + 1 < len(self.keys) else self.keys[i] + self.min_gap
        self._last = self.keys[i]
        return min(target, (self.keys[i] + after) / 2)


# -- words ------------------------------------------------------------------------

def _clock(seconds: float) -> str:
    """0:42, 12:03, 1:02:03."""
    whole = max(0, int(seconds))
    hours, rest = divmod(whole, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def _ffmpeg_reason(exc: BaseException) -> str:
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return " ".join(str(text).split())[:120]


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {_ffmpeg_reason(exc)}"
