"""Videos in the index, end to end: `mmsearch index` finds the moments, `query` returns the
video and the moment, re-runs follow renames, changes and deletions, bad files are reported.

Videos are made here with PyAV (tests/videos.py): scenes of the tiny model's shapes, so a
query for a scene's shape must land inside that scene, checked against the exact times
the video was written with.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import draw_shapes
from typer.testing import CliRunner

import videos
from mmsearch import Engine
from mmsearch.cli import app
from mmsearch.search.filters import Filters

pytest.importorskip("av", reason="the video extra (PyAV) is installed by the test command")

CLIPS = {  # name -> scenes (colour, shape, seconds), codec
    "holiday.mp4": ([("red", "circle", 3.0), ("blue", "square", 4.0), ("green", "triangle", 3.0)],
                    "libx264"),
    "garden.MKV": ([("yellow", "circle", 3.0), ("red", "triangle", 3.0)], "libx264"),
    "street.webm": ([("green", "square", 3.0), ("yellow", "triangle", 3.0)], "libvpx-vp9"),
}


@pytest.fixture
def library(tmp_path: Path) -> tuple[Path, dict[str, list[tuple[float, float]]]]:
    """A folder of 12 photos and 3 videos; returns it and each video's scene times."""
    root = tmp_path / "lib"
    draw_shapes(root / "photos", per_combo=1)
    (root / "clips").mkdir()
    times = {name: videos.make_video(root / "clips" / name, scenes, codec=codec)
             for name, (scenes, codec) in CLIPS.items()}
    return root, times


@pytest.fixture
def engine(home: Path, tiny_model: tuple[Path, Path]):
    config, ckpt = tiny_model
    with Engine.open("v", model=str(config), pretrained=str(ckpt)) as e:
        yield e


def scene_of(hit, times: dict, name: str) -> tuple[str, str]:
    """The (colour, shape) of the scene a video hit's time falls in."""
    for (color, shape, _), (start, end) in zip(CLIPS[name][0], times[name]):
        if start <= hit.time < end:
            return color, shape
    raise AssertionError(f"{hit.time} is in no scene of {name}")


def test_a_query_finds_the_moment_inside_the_right_scene(engine: Engine, library) -> None:
    root, times = library
    report = engine.index([root])
    assert (report.added, report.skipped, report.warnings) == (15, [], [])
    assert report.frames >= 7 and report.embedded >= report.frames  # collapsed alike frames
    assert engine.store.read.video_count() == 3
    for name, (scenes, _) in CLIPS.items():
        for k, (color, shape, _) in enumerate(scenes):
            hits = engine.search(f"a {color} {shape}", k=20,
                                 filters=Filters(type="video", within=root / "clips" / name))
            assert hits and hits[0].kind == "video" and hits[0].path == root / "clips" / name
            start, end = times[name][k]
            assert start <= hits[0].time < end, (name, color, shape, hits[0])
            assert hits[0].start <= hits[0].time <= hits[0].end
            assert start - 1.0 <= hits[0].start and hits[0].end <= end + 1.0  # about the scene


def test_one_hit_per_video_unless_moments_and_the_type_filter(engine: Engine, library) -> None:
    root, _ = library
    engine.index([root])
    hits = engine.search("a red circle", k=50)
    video_hits = [h for h in hits if h.kind == "video"]
    assert len({h.path for h in video_hits}) == len(video_hits) == 3
    assert {h.kind for h in engine.search("a red circle", k=50,
                                          filters=Filters(type="image"))} == {"image"}
    only = engine.search("a red circle", k=50, filters=Filters(type="video"))
    assert {h.kind for h in only} == {"video"} and len(only) == 3
    several = engine.search("a red circle", k=50, filters=Filters(type="video", moments=True))
    assert len(several) > 3
    for a in several:  # no moment lies inside another of its video
        assert not any(b is not a and b.path == a.path and b.start <= a.time <= b.end
                       for b in several if b.rank < a.rank)


def test_more_like_this_moment(engine: Engine, library) -> None:
    root, times = library
    engine.index([root])
    best = engine.search("a blue square", k=5, filters=Filters(type="video"))[0]
    from mmsearch.search.query import Query

    like = engine.search(Query.id(best.id), k=5, filters=Filters(type="video", moments=True))
    assert like[0].id == best.id and like[0].kind == "video" and like[0].score > 0.999


def test_cli_prints_the_moment_and_json_carries_it(home: Path, tiny_model, library) -> None:
    root, times = library
    config, ckpt = tiny_model
    runner = CliRunner()
    out = runner.invoke(app, ["index", str(root), "--model", str(config), "--pretrained", str(ckpt)])
    assert out.exit_code == 0, out.output
    assert "videos: " in out.output
    out = runner.invoke(app, ["query", "a", "green", "triangle", "--type", "video", "-k", "3"])
    assert out.exit_code == 0, out.output
    line = next(ln for ln in out.output.splitlines() if "holiday.mp4" in ln)
    assert "holiday.mp4 @ 0:0" in line and "–0:" in line
    data = json.loads(runner.invoke(app, ["query", "a green triangle", "--type", "video",
                                          "--json"]).output)
    hit = next(h for h in data if h["path"].endswith("holiday.mp4"))
    assert hit["kind"] == "video" and times["holiday.mp4"][2][0] <= hit["time"] < 10.0
    assert {"start", "end", "time", "score"} <= set(hit)


def test_reindex_follows_renames_changes_and_deletions(engine: Engine, library) -> None:
    root, _ = library
    engine.index([root])
    clips = root / "clips"
    frames = {p: i for i, p in engine.store.read.all_image_paths() if "holiday.mp4#t=" in p}
    assert frames
    again = engine.index([root])
    assert (again.added, again.updated, again.removed, again.embedded) == (0, 0, 0, 0)

    (clips / "trips").mkdir()
    os.rename(clips / "holiday.mp4", clips / "trips" / "holiday 2023.mp4")   # moved
    videos.make_video(clips / "garden.MKV", [("blue", "circle", 2.0)])        # changed
    (clips / "street.webm").unlink()                                          # deleted
    report = engine.index([root])
    assert (report.moved, report.updated, report.removed, report.added) == (1, 1, 1, 0)
    assert 0 < report.embedded <= 3  # only the changed garden clip (2 s) was decoded
    now = dict(engine.store.read.all_image_paths())
    moved = {i: p for i, p in now.items() if "holiday 2023.mp4#t=" in p}
    assert sorted(moved) == sorted(frames.values())  # the same ids, under the new name
    assert not any("street.webm" in p for p in now.values())
    assert engine.store.read.video_count() == 2
    hit = engine.search("a blue circle", k=3, filters=Filters(type="video"))[0]
    assert hit.path == clips / "garden.MKV"
    assert engine.check() == ([], [])


def test_bad_videos_are_reported_and_the_rest_indexed(engine: Engine, library) -> None:
    root, _ = library
    clips = root / "clips"
    good = clips / "holiday.mp4"
    bad = root / "bad"
    bad.mkdir()
    videos.truncate(good, bad / "cut.mp4", 0.5)
    videos.corrupt_middle(good, bad / "corrupt.mp4")
    videos.audio_only(bad / "sound.mp4")
    videos.not_a_video(bad / "notes.mov")
    videos.empty(bad / "empty.m4v")
    report = engine.index([root])
    reasons = {Path(s.path).name: s.reason for s in report.skipped}
    partly = {Path(w.path).name: w.reason for w in report.warnings}
    assert {"sound.mp4", "notes.mov", "empty.m4v"} <= set(reasons)
    assert all(r and "\n" not in r for r in (*reasons.values(), *partly.values()))
    stored = {Path(p).name for p in engine.store.read.videos_under(str(root))}
    assert {"holiday.mp4", "garden.MKV", "street.webm"} <= stored
    assert "cut.mp4" in stored and "cut.mp4" in partly  # the frames before the cut
    assert ("corrupt.mp4" in stored) != ("corrupt.mp4" in reasons)
    assert report.added == 15 + len(stored - {"holiday.mp4", "garden.MKV", "street.webm"})
    assert engine.check() == ([], [])


def test_without_pyav_videos_are_counted_and_nothing_is_lost(home: Path, tiny_model,
                                                               library, tmp_path: Path) -> None:
    root, _ = library
    config, ckpt = tiny_model
    cli = [sys.executable, "-m", "mmsearch", "index", str(root), "--model", str(config),
           "--pretrained", str(ckpt)]
    block = tmp_path / "no_av"
    block.mkdir()
    (block / "sitecustomize.py").write_text("import sys\nsys.modules['av'] = None\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(block), *sys.path])}
    out = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "3 videos not indexed: they need PyAV, pip install 'mmsearch[video]'" in out.stdout
    assert "added 12," in out.stdout
    out = subprocess.run(cli, capture_output=True, text=True, timeout=300)  # with PyAV now
    assert out.returncode == 0 and "added 3," in out.stdout, out.stdout + out.stderr
    out = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "removed 0" in out.stdout  # its videos stay indexed
    with Engine.open("default", home=home, create=False) as e:
        assert e.store.read.video_count() == 3


def test_the_tiny_model_sees_frames_as_it_sees_photos(engine: Engine, library) -> None:
    """The frames' vectors are the model's own for those pictures (not a stand-in)."""
    root, times = library
    engine.index([root / "clips"])
    ids, starts, _, frame_times = engine.store.read.frames_of(
        next(r.id for r in engine.store.read.videos_under(str(root)).values()
             if r.path.endswith("holiday.mp4")))
    from mmsearch.ingest.video import sample

    sampled = sample(root / "clips" / "holiday.mp4")
    by_time = {round(f.time, 3): f.image for f in sampled.frames}
    _, stored = engine.store.image_vectors(ids)
    for t, v in zip(frame_times, stored):
        fresh = engine.embed_image(by_time[round(float(t), 3)])
        np.testing.assert_allclose(fresh.ravel(), v, atol=1e-5)


def test_a_long_videos_moment_span_against_a_plain_reference(tmp_path: Path) -> None:
    """``moments.span`` reads a window of frames around a hit (growing it when the moment
    runs into its edge): over an hour of frames it must equal the span grown over all of
    them at once."""
    from mmsearch.locations import moment
    from mmsearch.models.identity import ModelIdentity
    from mmsearch.search.hits import ImageHit
    from mmsearch.search.moments import MARGIN, span
    from mmsearch.store import ImageFile, Store, VideoFile

    rng = np.random.default_rng(0)
    n, dim = 3600, 16
    base, other = rng.normal(size=dim), rng.normal(size=dim)
    weight = np.clip(np.sin(np.arange(n) / 400.0) + rng.normal(0, 0.05, n), 0, 1)  # long plateaus
    vectors = weight[:, None] * base + (1 - weight[:, None]) * other + rng.normal(0, .05, (n, dim))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    store = Store.open(tmp_path / "idx", create=True)
    store.lock()
    store.set_model(ModelIdentity("test", "synthetic", "test:synthetic"), dim)
    frames = [ImageFile(moment("/v/long.mp4", t), 1, 1, f"h#t={t}",
                        {"start_s": float(t), "end_s": float(t + 1), "time_s": float(t),
                         "taken_source": "mtime"}) for t in range(n)]
    ids = store.put_images(frames, vectors, video=VideoFile("/v/long.mp4", 1, 1, "h", {
        "duration": float(n), "width": 1, "height": 1, "codec": "h264", "rotation": 0,
        "frames": n}))
    query = (base / np.linalg.norm(base)).astype(np.float32)
    scores = vectors @ query
    for i in [0, 5, 399, 1000, 1700, 2500, n - 1, *rng.integers(0, n, 20)]:
        hit = ImageHit(1, float(scores[i]), int(ids[i]), "/v/long.mp4", kind="video",
                       time=float(i), start=float(i), end=float(i + 1), video_id=1)
        lo = hi = i
        while lo > 0 and scores[lo - 1] >= scores[i] - MARGIN:
            lo -= 1
        while hi < n - 1 and scores[hi + 1] >= scores[i] - MARGIN:
            hi += 1
        assert span(store, query, hit)[:2] == (float(lo), float(hi + 1)), i
    store.close()


def test_a_video_is_a_folder_of_its_moments(engine: Engine, library) -> None:
    """--in a video, remove a video, export and duplicates see its moments."""
    root, _ = library
    engine.index([root])
    holiday = root / "clips" / "holiday.mp4"
    hits = engine.search("a red circle", k=50, filters=Filters(within=holiday, moments=True))
    assert hits and {h.path for h in hits} == {holiday}
    assert {h.kind for h in engine.search("a circle", k=50,
                                          filters=Filters(ext=("mkv",)))} == {"video"}
    groups = engine.duplicates(threshold=0.9)  # a photo and the video that shows the same
    assert any({m.kind for m in g.members} == {"image", "video"} for g in groups)
    n = engine.store.read.frame_count()
    gone = engine.remove(holiday)
    assert gone > 0 and engine.store.read.frame_count() == n - gone
    assert engine.store.read.video_count() == 2
    assert holiday not in {h.path for h in engine.search("a red circle", k=50,
                                                         filters=Filters(type="video"))}
    assert engine.check() == ([], [])


def test_export_carries_the_moments_with_their_times(engine: Engine, library,
                                                     tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from mmsearch.export import export_index

    root, times = library
    engine.index([root / "clips"])
    export_index(engine.store, tmp_path / "out")
    table = pq.read_table(tmp_path / "out" / "metadata" / "metadata_0.parquet").to_pylist()
    frames = [r for r in table if r["image_path"].startswith(str(root / "clips" / "holiday.mp4"))]
    assert frames and all(r["video_id"] is not None for r in frames)
    for r in frames:
        assert r["image_path"].endswith(f"#t={r['time_s']:.3f}")
        assert r["start_s"] <= r["time_s"] < r["end_s"] <= times["holiday.mp4"][-1][1] + 1e-6
