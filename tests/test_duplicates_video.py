"""`duplicates` over photos and videos: a video is one member of a group, never a group of its
own frames; a still from it, a re-encode and a copy group with it.

Videos are made with PyAV (tests/videos.py) from the tiny model's shapes. A clip shows two
scenes twice (each repeat drawn anew), so its own frames are near-duplicates of each other
at :data:`THRESHOLD`: that is what used to come out as groups of "similar photos".
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import tinyclip
import videos
from mmsearch import Engine
from mmsearch.cli import app
from mmsearch.locations import moment

pytest.importorskip("av", reason="the video extra (PyAV) is installed by the test command")

CLIP = [("red", "circle", 2.0), ("blue", "square", 2.0), ("red", "circle", 2.0),
        ("blue", "square", 2.0), ("green", "triangle", 2.0)]
FPS = 2
SIZE = (160, 120)
# With the tiny model a scene and its repeat score ~0.94-0.96, an MPEG-4 re-encode's
# frames >= 0.93 with the H.264 ones, a still of a scene ~0.999 with its frame, and the
# photos below < 0.7 with any frame.
THRESHOLD = 0.9
PHOTOS = [("yellow", "circle"), ("yellow", "square"), ("green", "square")]


@pytest.fixture
def engine(home: Path, tiny_model: tuple[Path, Path]):
    config, ckpt = tiny_model
    with Engine.open("v", model=str(config), pretrained=str(ckpt)) as e:
        yield e


def duplicates(*args: str) -> str:
    out = CliRunner().invoke(app, ["duplicates", "--index", "v", "--threshold", str(THRESHOLD),
                                   *args])
    assert out.exit_code == 0, out.output
    return out.output


def named(group) -> list[tuple[str, str]]:
    return sorted((m.kind, Path(m.path).name) for m in group.members)


def test_no_group_of_a_videos_own_frames_and_a_still_groups_with_the_video(
        engine: Engine, tmp_path: Path) -> None:
    root = tmp_path / "lib"
    root.mkdir()
    spans = videos.make_video(root / "holiday.mp4", CLIP, fps=FPS, size=SIZE)
    for color, shape in PHOTOS:
        tinyclip.draw_shape(color, shape).save(root / f"{color}_{shape}.png")
    engine.index([root])
    ids, vectors = engine.store.image_vectors()
    frames = np.asarray([r["video_id"] is not None
                         for r in engine.store.image_records(ids).values()])
    sims = vectors[frames] @ vectors[frames].T
    assert (sims[np.triu_indices(len(sims), 1)] >= THRESHOLD).any()  # its own frames are alike
    assert engine.duplicates(threshold=THRESHOLD) == []
    assert "no duplicates found" in duplicates()

    still = scene_still(root / "still.png", 4)  # the green triangle, as a photo
    engine.index([root])
    [group] = engine.duplicates(threshold=THRESHOLD)
    assert named(group) == [("image", "still.png"), ("video", "holiday.mp4")]
    assert (group.exact, group.contents) == (False, 2)
    video = next(m for m in group.members if m.kind == "video")
    assert video.path == root / "holiday.mp4" and spans[4][0] <= video.time < spans[4][1]
    assert engine.store.image_records([video.id])[video.id]["path"] == moment(str(video.path),
                                                                              video.time)
    out = duplicates()
    assert f"group 1: 2 similar photos and videos (cosine >= {THRESHOLD})" in out
    assert f"  {still}\n" in out and f"  {root / 'holiday.mp4'} @ 0:08\n" in out
    assert out.splitlines()[-1] == "1 groups, 1 photos, 1 videos"
    [data] = json.loads(duplicates("--json"))
    members = {m["kind"]: m for m in data["members"]}  # in id order: the video, indexed first
    assert data["paths"] == [str(root / "holiday.mp4"), str(still)] and not data["exact"]
    assert members["video"] == {"id": video.id, "path": str(root / "holiday.mp4"),
                                "kind": "video", "time": video.time}
    assert members["image"]["path"] == str(still) and members["image"]["time"] is None


def scene_still(path: Path, scene: int) -> Path:
    color, shape, _ = CLIP[scene]
    Image.fromarray(videos.scene_image(color, shape, SIZE, seed=scene)).save(path)
    return path


def test_a_re_encode_and_a_copy_group_with_the_video_as_videos(engine: Engine,
                                                               tmp_path: Path) -> None:
    root = tmp_path / "lib"
    root.mkdir()
    spans = videos.make_video(root / "holiday.mp4", CLIP, fps=FPS, size=SIZE)
    videos.make_video(root / "holiday.mkv", CLIP, fps=FPS, size=SIZE, codec="mpeg4")
    engine.index([root])
    [group] = engine.duplicates(threshold=THRESHOLD)
    assert named(group) == [("video", "holiday.mkv"), ("video", "holiday.mp4")]
    assert (group.exact, group.contents) == (False, 2)
    starts = [start for start, _ in spans]
    assert all(m.time in starts for m in group.members)  # a scene's one frame each

    videos.copy(root / "holiday.mp4", root / "copy.mp4")
    engine.index([root])
    [group] = engine.duplicates(threshold=THRESHOLD)
    assert named(group) == [("video", "copy.mp4"), ("video", "holiday.mkv"),
                            ("video", "holiday.mp4")]
    assert (group.exact, group.contents) == (False, 2)
    copies = {Path(m.path).name: m.time for m in group.members}
    assert copies["copy.mp4"] == copies["holiday.mp4"]  # one content: the same moment

    engine.remove(root / "holiday.mkv")
    [group] = engine.duplicates(threshold=THRESHOLD)
    assert named(group) == [("video", "copy.mp4"), ("video", "holiday.mp4")]
    assert (group.exact, group.contents) == (True, 1)
    assert [m.time for m in group.members] == [None, None]  # every moment matches
    out = duplicates()
    assert out.splitlines() == ["group 1: 2 identical files", f"  {root / 'holiday.mp4'}",
                                f"  {root / 'copy.mp4'}", "1 groups, 0 photos, 2 videos"]
