"""Make small real videos (and broken copies of them) for tests, with PyAV.

A video is a list of scenes ``(color, shape, seconds)``; each scene shows one
shape drawn by :func:`tinyclip.draw_shape` (one drawing per scene, so a scene
cut is a real change of picture), shifted by a pixel or two from frame to frame
so that consecutive frames are not identical::

    spans = make_video(tmp_path / "a.mp4", [("red", "circle", 2), ("blue", "square", 1.5)])
    # spans == [(0.0, 2.0), (2.0, 3.5)]: each scene's exact [start, end) in seconds

The drawing (``draw_shape`` at the frame's shorter side) is centred on a grey
frame, so a model's centre crop sees exactly the tiny CLIP's kind of picture.

Containers follow the file's extension: ``.mp4``/``.mov`` (written with
``+faststart``: the index is at the front, so a truncated copy keeps its early
frames), ``.mkv``, ``.webm`` (VP9 only).  Codecs: ``libx264`` (H.264),
``libvpx-vp9`` (VP9), ``mpeg4``, ``libx265`` (HEVC).

``rotate=90`` stores the frames as drawn and a display matrix telling players
to turn them 90 degrees clockwise (what a phone held upright writes);
``vfr=True`` gives the scenes irregular frame durations (see :func:`_vfr_durations`).

Broken copies: :func:`truncate`, :func:`corrupt_middle`, :func:`audio_only`,
:func:`not_a_video`, :func:`empty`, :func:`unknown_codec`.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

from tinyclip import draw_shape

Scene = tuple[str, str, float]

VFR_TIME_BASE = Fraction(1, 1000)
"""Time base of a ``vfr=True`` video: its frame times are whole milliseconds."""

_FAST = {
    "libx264": {"preset": "veryfast"},
    "libx265": {"preset": "ultrafast", "x265-params": "log-level=none"},
    "libvpx-vp9": {"deadline": "realtime", "cpu-used": "8", "row-mt": "1"},
}


def scene_image(color: str, shape: str, size: tuple[int, int], seed: int) -> np.ndarray:
    """One scene's picture (H, W, 3 uint8): the drawing at the shorter side, centred on grey."""
    width, height = size
    side = min(width, height)
    canvas = Image.new("RGB", (width, height), (128, 128, 128))
    canvas.paste(draw_shape(color, shape, side, seed), ((width - side) // 2, (height - side) // 2))
    return np.asarray(canvas)


def _jitter(base: np.ndarray, i: int) -> np.ndarray:
    """Frame ``i`` of a scene: its picture shifted by 0-2 pixels (a slow wobble)."""
    dx, dy = (0, 1, 2, 1)[i % 4], (0, 0, 1, 1)[(i // 4) % 4]
    return np.roll(base, (dy, dx), axis=(0, 1))


def _vfr_durations(scene: int, fps: int, rng: random.Random) -> Iterator[int]:
    """Millisecond frame durations of a ``vfr=True`` scene: even scenes run at about twice
    the nominal rate, odd ones at about two thirds of it, each frame +-20 % at random, so
    times counted from frame numbers would be far off."""
    base = 1000 / fps * (0.5 if scene % 2 == 0 else 1.5)
    while True:
        yield max(1, round(base * rng.uniform(0.8, 1.2)))


def _frame_ticks(scenes: list[Scene], fps: int, vfr: bool) -> list[list[int]]:
    """Per scene, the pts of its frames; the last list ends with the end-of-video tick.

    Constant rate: pts count frames (time base 1/fps).  VFR: pts are milliseconds."""
    ticks: list[list[int]] = []
    now, rng = 0, random.Random(1)
    for k, (_, _, seconds) in enumerate(scenes):
        if not vfr:
            count = max(1, round(seconds * fps))
            ticks.append(list(range(now, now + count)))
            now += count
            continue
        end, pts = now + round(seconds * 1000), []
        for step in _vfr_durations(k, fps, rng):
            if now >= end and pts:
                break
            pts.append(now)
            now += step
        ticks.append(pts)
    ticks[-1].append(now)
    return ticks


def make_video(path: Path | str, scenes: list[Scene], *, codec: str = "libx264", fps: int = 24,
               size: tuple[int, int] = (160, 120), rotate: int = 0, vfr: bool = False,
               gop: int | None = None) -> list[tuple[float, float]]:
    """Write ``scenes`` to ``path``; return each scene's [start, end) in seconds.

    ``size`` is (width, height) as stored (even numbers); ``rotate`` (0/90/180/270,
    clockwise) goes into the display matrix; ``gop``: frames between keyframes
    (None: the encoder's default).  Times are exact: start is the scene's first
    frame's pts, end the next scene's (or the video's end)."""
    import av

    path = Path(path)
    ticks = _frame_ticks(scenes, fps, vfr)
    time_base = VFR_TIME_BASE if vfr else Fraction(1, fps)
    options = {"movflags": "+faststart"} if path.suffix.lower() in (".mp4", ".mov", ".m4v") else {}
    with av.open(str(path), "w", options=options) as out:
        stream = _video_stream(out, codec, fps, size, time_base, gop)
        if rotate:
            stream.set_display_rotation(-rotate)  # PyAV's angle is counter-clockwise
        for k, (color, shape, _) in enumerate(scenes):
            base = scene_image(color, shape, size, seed=k)
            for i, pts in enumerate(ticks[k][:len(ticks[k]) - (k == len(scenes) - 1)]):
                frame = av.VideoFrame.from_ndarray(_jitter(base, i), format="rgb24")
                frame.pts, frame.time_base = pts, time_base
                out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    starts = [t[0] for t in ticks] + [ticks[-1][-1]]
    return [(float(a * time_base), float(b * time_base)) for a, b in zip(starts, starts[1:])]


def _video_stream(out, codec: str, fps: int, size: tuple[int, int], time_base: Fraction,
                  gop: int | None):
    stream = out.add_stream(codec, rate=fps, options=dict(_FAST.get(codec, {})))
    stream.width, stream.height = size
    stream.pix_fmt = "yuv420p"
    stream.codec_context.time_base = time_base
    if gop is not None:
        stream.codec_context.gop_size = gop
    return stream


# -- broken copies ------------------------------------------------------------

def truncate(path: Path | str, out: Path | str, fraction: float) -> Path:
    """Copy the first ``fraction`` of ``path``'s bytes to ``out`` (a download cut short)."""
    data = Path(path).read_bytes()
    Path(out).write_bytes(data[:int(len(data) * fraction)])
    return Path(out)


def corrupt_middle(path: Path | str, out: Path | str, length: int = 4096, seed: int = 0) -> Path:
    """Copy ``path`` to ``out`` with ``length`` random bytes written over its middle
    (bad sectors, a bit-flipping transfer): the container's index is left intact."""
    data = bytearray(Path(path).read_bytes())
    start = len(data) // 2 - length // 2
    data[start:start + length] = random.Random(seed).randbytes(length)
    Path(out).write_bytes(bytes(data))
    return Path(out)


def audio_only(path: Path | str, seconds: float = 1.0) -> Path:
    """A file of ``path``'s container holding one AAC (MP2 in .avi) sine tone, no video."""
    import av

    path, rate = Path(path), 48_000
    codec = "mp2" if path.suffix.lower() == ".avi" else "aac"
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=rate)
        stream.layout = "mono"
        tone = np.sin(np.arange(int(seconds * rate)) * (2 * np.pi * 440 / rate)) * 0.3
        frame = av.AudioFrame.from_ndarray(tone.astype(np.float32)[None, :], format="fltp",
                                           layout="mono")
        frame.sample_rate, frame.pts = rate, 0
        out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


def not_a_video(path: Path | str) -> Path:
    """A text file wearing a video's name."""
    Path(path).write_text("This is not a video, whatever its name says.\n" * 20)
    return Path(path)


def empty(path: Path | str) -> Path:
    """A zero-length file."""
    Path(path).write_bytes(b"")
    return Path(path)


def unknown_codec(path: Path | str, out: Path | str) -> Path:
    """Copy an MP4 of H.264 with its sample entry renamed from ``avc1`` to ``zzzz``: a
    well-formed file whose video codec no FFmpeg build knows."""
    data = Path(path).read_bytes()
    if data.count(b"avc1") < 1:
        raise ValueError(f"{path} holds no avc1 sample entry")
    Path(out).write_bytes(data.replace(b"avc1", b"zzzz"))
    return Path(out)


def copy(path: Path | str, out: Path | str) -> Path:
    shutil.copyfile(path, out)
    return Path(out)
