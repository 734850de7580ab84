"""mmsearch.ingest.video on real videos made with tests/videos.py: sample times, shots,
rotation, variable frame rate, broken files, the video hash and collapse."""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("av")

import videos  # noqa: E402
from mmsearch.errors import DecodeError  # noqa: E402
from mmsearch.ingest import video  # noqa: E402
from mmsearch.ingest.decode import content_hash  # noqa: E402

FPS = 24
PERIOD = 1 / FPS
SCENES = [("red", "circle", 2.0), ("blue", "square", 1.5), ("green", "triangle", 1.25),
          ("yellow", "circle", 1.0)]
FORMATS = {"mp4": ("a.mp4", "libx264"), "mkv": ("a.mkv", "libx264"), "webm": ("a.webm", "libvpx-vp9")}
STRATEGIES = {"default": video.DEFAULT_STRATEGY,
              "decode-all": video.Strategy(seek=False, skip_nonref=False),
              "pil-resize": video.Strategy(scale_in_decoder=False)}


def _make(tmp_path: Path, name: str = "a.mp4", scenes=SCENES, **kw) -> tuple[Path, list]:
    path = tmp_path / name
    return path, videos.make_video(path, scenes, **kw)


def _scene_at(spans: list[tuple[float, float]], time: float) -> int:
    return next(i for i, (a, b) in enumerate(spans) if a - 1e-6 <= time < b - 1e-6)


def _looks_like(image, scenes, size=(160, 120)) -> int:
    """Which scene's picture ``image`` is closest to (mean absolute difference)."""
    arr = np.asarray(image.convert("RGB").resize(size), dtype=np.int16)
    diffs = [np.abs(arr - videos.scene_image(c, s, size, seed=k)).mean()
             for k, (c, s, _) in enumerate(scenes)]
    return int(np.argmin(diffs))


def _check_samples(result, spans, fps: float, slack: float = PERIOD + 1e-3) -> None:
    """One periodic frame per k/fps within ``slack``, each shot start found, pictures right."""
    periodic = [f.time for f in result.frames]
    duration = spans[-1][1]
    for k in range(math.ceil(duration * fps - 1e-9)):
        near = [t for t in periodic if abs(t - k / fps) <= slack + 1e-6]
        assert near, f"no frame near {k / fps:.3f}s in {[round(f.time, 3) for f in result.frames]}"
    shots = [f.time for f in result.frames if f.shot]
    for start, _ in spans:
        assert any(abs(t - start) <= slack for t in shots), (start, shots)
    assert len(shots) == len(spans)
    times = [f.time for f in result.frames]
    assert times == sorted(times) and len(set(times)) == len(times)


def _check_pictures(result, spans, scenes=SCENES) -> None:
    for frame in result.frames:
        assert frame.image.mode == "RGB"
        assert _looks_like(frame.image, scenes) == _scene_at(spans, frame.time), frame.time


# -- sampling ---------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_samples_once_a_second_and_each_shot_start(tmp_path: Path, fmt: str) -> None:
    name, codec = FORMATS[fmt]
    path, spans = _make(tmp_path, name, codec=codec)
    result = video.sample(path)
    info = result.info
    assert info.duration == pytest.approx(spans[-1][1], abs=PERIOD)
    assert (info.width, info.height, info.rotation, info.fps) == (160, 120, 0, FPS)
    assert info.codec == {"libx264": "h264", "libvpx-vp9": "vp9"}[codec]
    assert result.problems == [] and not result.stopped
    _check_samples(result, spans, 1.0)
    _check_pictures(result, spans)
    assert video.probe(path) == info


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("fps", [0.25, 2.5, 8.0])
def test_other_rates_and_strategies(tmp_path: Path, fps: float, strategy: str) -> None:
    path, spans = _make(tmp_path, gop=FPS)  # a keyframe a second: at 0.25/s the default seeks
    result = video.sample(path, fps=fps, strategy=STRATEGIES[strategy])
    _check_samples(result, spans, fps)
    _check_pictures(result, spans)


def test_every_frame_at_the_video_rate(tmp_path: Path) -> None:
    path, spans = _make(tmp_path, scenes=SCENES[:2])
    result = video.sample(path, fps=FPS)
    assert [round(f.time * FPS) for f in result.frames] == list(range(round(spans[-1][1] * FPS)))


def test_a_video_shorter_than_the_interval_gives_its_first_frame(tmp_path: Path) -> None:
    path, _ = _make(tmp_path, scenes=[("red", "square", 0.3)])
    result = video.sample(path, fps=1.0)
    assert [(f.time, f.shot) for f in result.frames] == [(0.0, True)]
    assert result.info.duration == pytest.approx(0.3, abs=PERIOD)


def test_images_fit_max_side(tmp_path: Path) -> None:
    path, _ = _make(tmp_path, scenes=SCENES[:1], size=(320, 180))
    assert {f.image.size for f in video.sample(path, max_side=64).frames} == {(64, 36)}
    assert {f.image.size for f in video.sample(path, max_side=1000).frames} == {(320, 180)}


@pytest.mark.parametrize("rotate", [90, 180, 270])
@pytest.mark.parametrize("name", ["r.mp4", "r.mkv"])
def test_rotation_is_applied_like_exif(tmp_path: Path, rotate: int, name: str) -> None:
    scenes = SCENES[:2]
    plain, _ = _make(tmp_path, "plain.mp4", scenes)
    turned, _ = _make(tmp_path, name, scenes, rotate=rotate)
    upright, result = video.sample(plain), video.sample(turned)
    swapped = rotate in (90, 270)
    assert result.info.rotation == rotate
    assert (result.info.width, result.info.height) == ((120, 160) if swapped else (160, 120))
    assert video.probe(turned).rotation == rotate
    assert [f.time for f in result.frames] == pytest.approx([f.time for f in upright.frames], abs=1e-3)
    for want, got in zip(upright.frames, result.frames):
        ref = np.asarray(want.image, dtype=np.int16)
        arr = np.asarray(got.image, dtype=np.int16)
        clockwise = np.rot90(ref, k=-rotate // 90)  # what a player shows
        assert arr.shape == clockwise.shape
        assert np.abs(arr - clockwise).mean() < 4
        if swapped:  # the other way round would be clearly wrong
            assert np.abs(arr - np.rot90(ref, k=rotate // 90)).mean() > 10


def test_variable_frame_rate_times_come_from_timestamps(tmp_path: Path) -> None:
    path, spans = _make(tmp_path, vfr=True)
    starts = [a for a, _ in spans]
    assert any(abs(a * FPS - round(a * FPS)) > 0.1 for a in starts)  # not on the nominal grid
    result = video.sample(path)
    assert result.info.fps != FPS
    shots = [f.time for f in result.frames if f.shot]
    assert shots == pytest.approx(starts, abs=1e-3)  # exactly the written pts
    _check_pictures(result, spans)
    for k in range(1, int(spans[-1][1])):  # each second has a frame within the local frame gap
        assert min(abs(f.time - k) for f in result.frames) <= 2.5 * PERIOD


def test_stop_event_ends_decoding(tmp_path: Path) -> None:
    path, _ = _make(tmp_path)
    stop = threading.Event()
    stop.set()
    result = video.sample(path, stop=stop)
    assert result.stopped and result.frames == []


def test_sampling_one_frame_at_a_time(tmp_path: Path) -> None:
    path, spans = _make(tmp_path)
    with video.Sampling(path) as sampling:
        assert sampling.info.duration == pytest.approx(spans[-1][1], abs=PERIOD)
        times = [f.time for f in sampling]
    assert times == [f.time for f in video.sample(path).frames]


def test_large_frames_are_scaled_in_the_decoder(tmp_path: Path) -> None:
    """A 4K video: small pictures, and the process's peak memory stays far below a GB."""
    path = tmp_path / "uhd.mp4"
    videos.make_video(path, [("blue", "circle", 0.25)], fps=8, size=(3840, 2160))
    # the peak is this process's VmHWM: ru_maxrss would carry the parent's (pytest's own,
    # GBs late in a run) across fork and exec
    code = ("import re, sys; from mmsearch.ingest import video; "
            "r = video.sample(sys.argv[1], max_side=256); "
            "hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1); "
            "print(r.info.width, r.info.height, {f.image.size for f in r.frames}, "
            "int(hwm) // 1024)")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).parents[1]).stdout.split(maxsplit=2)
    assert out[:2] == ["3840", "2160"]
    sizes, peak_mib = out[2].rsplit(maxsplit=1)
    assert sizes == "{(256, 144)}"
    assert int(peak_mib) < 700


def test_frames_above_the_pixel_limit_are_refused(tmp_path: Path, monkeypatch) -> None:
    path, _ = _make(tmp_path, scenes=SCENES[:1])
    monkeypatch.setattr(video, "MAX_PIXELS", 160 * 120 - 1)  # as if this were beyond 8K
    with pytest.raises(DecodeError, match="too large: 160x120"):
        video.probe(path)


def test_importing_the_module_does_not_import_pyav() -> None:
    code = "import sys, mmsearch.ingest.video; print('av' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[1])
    assert out.stdout.strip() == "False"


def test_is_video_by_extension_any_case() -> None:
    assert video.is_video("a.MP4") and video.is_video(Path("x/y.webm")) and video.is_video("c.3gp")
    assert not video.is_video("a.jpg") and not video.is_video("mp4") and not video.is_video("a.mp4.txt")
    assert video.available()


# -- broken files ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["a.mp4", "a.mkv", "a.webm"])
def test_truncated_file_keeps_its_early_frames(tmp_path: Path, name: str) -> None:
    codec = "libvpx-vp9" if name.endswith("webm") else "libx264"
    path, spans = _make(tmp_path, name, codec=codec)
    cut = videos.truncate(path, tmp_path / f"cut{path.suffix}", 0.5)
    result = video.sample(cut)
    assert result.frames and result.frames[0].time == 0.0
    assert result.frames[-1].time < spans[-1][1] - 1.0
    assert len(result.problems) == 1 and result.problems[0].startswith("cut short at ")
    _check_pictures(result, spans)


@pytest.mark.parametrize("name", ["a.mp4", "a.mkv", "a.webm"])
def test_corrupt_middle_is_skipped_and_reported(tmp_path: Path, name: str) -> None:
    codec = "libvpx-vp9" if name.endswith("webm") else "libx264"
    path, spans = _make(tmp_path, name, codec=codec)
    bad = videos.corrupt_middle(path, tmp_path / f"bad{path.suffix}")
    result = video.sample(bad)
    assert result.problems and all(" s lost" in p for p in result.problems)
    assert result.frames[0].time == 0.0
    assert result.frames[-1].time >= spans[-1][1] - 1.0 - PERIOD  # decoding went on after it


def test_unsupported_codec(tmp_path: Path) -> None:
    path, _ = _make(tmp_path)
    bad = videos.unknown_codec(path, tmp_path / "zzzz.mp4")
    with pytest.raises(DecodeError, match="unsupported video codec"):
        video.sample(bad)


@pytest.mark.parametrize("make, reason", [
    (lambda p: videos.empty(p / "e.mp4"), "empty file"),
    (lambda p: videos.not_a_video(p / "t.mp4"), "not a video"),
    (lambda p: videos.audio_only(p / "a.mp4"), "no video stream"),
    (lambda p: videos.audio_only(p / "a.mkv"), "no video stream"),
    (lambda p: p / "missing.mp4", "vanished"),
    (lambda p: (p / "dir.mp4").mkdir() or p / "dir.mp4", "not a file"),
])
def test_bad_files_raise_one_line(tmp_path: Path, make, reason: str) -> None:
    path = make(tmp_path)
    for call in (video.probe, video.sample):
        with pytest.raises(DecodeError, match=reason) as caught:
            call(path)
        assert "\n" not in str(caught.value)


def test_a_jpeg_named_mp4_is_not_a_video(tmp_path: Path) -> None:
    path = tmp_path / "photo.mp4"
    videos.scene_image("red", "circle", (64, 48), 0)
    from PIL import Image

    Image.fromarray(videos.scene_image("red", "circle", (64, 48), 0)).save(path, format="JPEG")
    with pytest.raises(DecodeError, match="not a video"):
        video.sample(path)


@pytest.fixture(scope="module")
def damage_sources(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("damage")
    return [folder / n for n, c in (("d.mp4", "libx264"), ("d.mkv", "libx264"), ("d.webm", "libvpx-vp9"))
            if videos.make_video(folder / n, SCENES[:2], codec=c, gop=12)]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.integers(0, 2), cut=st.floats(0.0, 1.0), offset=st.floats(0.0, 1.0),
       length=st.integers(1, 3000), seed=st.integers(0, 1000))
def test_damage_never_raises_anything_but_decode_error(damage_sources, tmp_path: Path, which: int,
                                                       cut: float, offset: float, length: int,
                                                       seed: int) -> None:
    data = bytearray(damage_sources[which].read_bytes())
    start = int(offset * len(data))
    data[start:start + length] = np.random.default_rng(seed).bytes(len(data[start:start + length]))
    path = tmp_path / f"x{seed}{damage_sources[which].suffix}"
    path.write_bytes(bytes(data[:max(0, int(cut * len(data)) if cut < 0.98 else len(data))]))
    try:
        result = video.sample(path)
    except DecodeError as exc:
        assert str(exc) and "\n" not in str(exc)
    else:
        assert result.frames
        assert all(isinstance(p, str) and "\n" not in p for p in result.problems)


# -- the video hash ----------------------------------------------------------------------

def _rchar() -> int:
    with open("/proc/self/io") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("rchar"))


def test_video_hash_sees_size_head_and_tail(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = rng.bytes(5 << 20)
    original = tmp_path / "v.mp4"
    original.write_bytes(data)
    digest = video.video_hash(original)
    assert len(digest) == 32 and video.video_hash(videos.copy(original, tmp_path / "c.mp4")) == digest

    def variant(name: str, changed: bytes) -> str:
        (tmp_path / name).write_bytes(changed)
        return video.video_hash(tmp_path / name)

    flip = lambda i: data[:i] + bytes([data[i] ^ 1]) + data[i + 1:]  # noqa: E731
    assert variant("head", flip(1000)) != digest
    assert variant("tail", flip(len(data) - 5)) != digest
    assert variant("longer", data + b"\0") != digest
    assert variant("shorter", data[:-1]) != digest
    assert variant("middle", flip(len(data) // 2)) == digest  # by design: two reads only


def test_video_hash_of_small_files_covers_every_byte(tmp_path: Path) -> None:
    for size in (0, 10, 1 << 20, (1 << 20) + 7, 2 << 20):
        data = np.random.default_rng(size).bytes(size)
        path = tmp_path / f"{size}.mp4"
        path.write_bytes(data)
        want = hashlib.blake2b(b"video\0" + size.to_bytes(8, "little") + data, digest_size=16)
        assert video.video_hash(path) == want.hexdigest()
        assert video.video_hash(path) != content_hash(path)


def test_video_hash_reads_two_mib_of_a_huge_file(tmp_path: Path) -> None:
    path = tmp_path / "huge.mkv"
    with open(path, "wb") as fh:  # sparse: 4 GiB on paper, nothing on disk
        fh.truncate(4 << 30)
        fh.seek((4 << 30) - 3)
        fh.write(b"end")
    before = _rchar()
    video.video_hash(path)
    assert _rchar() - before <= (2 << 20) + 4096


def test_video_hash_of_unreadable_paths(tmp_path: Path) -> None:
    with pytest.raises(DecodeError, match="vanished"):
        video.video_hash(tmp_path / "none.mp4")
    with pytest.raises(DecodeError, match="not a file"):
        video.video_hash(tmp_path)
    if os.name == "posix" and hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "pipe.mp4")
        with pytest.raises(DecodeError, match="not a file"):
            video.video_hash(tmp_path / "pipe.mp4")


# -- collapse --------------------------------------------------------------------------

def _collapse_reference(times, vectors, duration, threshold):
    firsts = []
    for i, row in enumerate(vectors):
        if not firsts or float(np.dot(row, vectors[firsts[-1]])) <= threshold:
            firsts.append(i)
    ends = [times[i] for i in firsts[1:]] + ([max(duration, times[firsts[-1]])] if firsts else [])
    return [(times[i], end, times[i], i) for i, end in zip(firsts, ends)]


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 120), dim=st.integers(1, 8), runs=st.integers(1, 12),
       threshold=st.floats(-0.5, 0.999), seed=st.integers(0, 2**32 - 1))
def test_collapse_matches_a_plain_reference(n: int, dim: int, runs: int, threshold: float,
                                            seed: int) -> None:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(runs, dim))
    rows = centres[np.sort(rng.integers(0, runs, n))] + rng.normal(scale=0.1, size=(n, dim))
    vectors = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)
    times = np.cumsum(rng.uniform(0.1, 2.0, n)).tolist()
    duration = (times[-1] if times else 0.0) + 0.5
    got = video.collapse(times, vectors, duration, threshold)
    want = _collapse_reference(times, vectors, duration, threshold)
    assert [(s.start, s.end, s.time, s.index) for s in got] == want
    assert all(isinstance(s, video.Span) for s in got)


def test_collapse_merges_a_still_scene() -> None:
    still = np.tile(np.array([[1.0, 0.0]], dtype=np.float32), (5, 1))
    other = np.array([[0.0, 1.0]], dtype=np.float32)
    spans = video.collapse([0, 1, 2, 3, 4, 5], np.vstack([still, other]), 6.5)
    assert spans == [video.Span(0.0, 5.0, 0.0, 0), video.Span(5.0, 6.5, 5.0, 5)]
