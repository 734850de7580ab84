"""`mmsearch eval` on videos (MSR-VTT's layout): mean-pooled frames against a numpy reference.

The videos are made here with PyAV (tests/videos.py): scenes of the tiny trained CLIP's
shapes, no (colour, shape) used twice, some videos of one scene and some of two (a caption
per scene: several captions per video). They go through the engine's own video indexing;
the reference reads back the frames it stored and mean-pools, normalises and ranks them
the plain way (tests/evalref.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

import tinyclip
import videos
from evalref import stored_video_frames, video_ranks
from mmsearch.cli.eval import eval_command
from mmsearch.errors import DatasetError
from mmsearch.eval.datasets import VideoRetrievalDataset, check_expected, load_dataset
from mmsearch.eval.evaluate import EvalResult, evaluate
from mmsearch.eval.video import first_hit_ranks, mean_pool
from mmsearch.ingest.video import collapse
from mmsearch.settings import Settings, resolve

pytest.importorskip("av", reason="the video extra (PyAV) is installed by the test command")

COMBOS = tinyclip.combos()
#: video id -> scenes (colour, shape, seconds): 8 of one scene, 2 of two (unequal lengths)
CLIPS = {
    **{f"video{i}": [(*COMBOS[i], 2.0 + 0.5 * (i % 3))] for i in range(8)},
    "video8": [(*COMBOS[8], 1.0), (*COMBOS[9], 3.0)],
    "video9": [(*COMBOS[10], 2.5), (*COMBOS[11], 1.5)],
}


def _rows() -> list[dict[str, str]]:
    return [{"video_id": vid, "caption": tinyclip.caption(color, shape)}
            for vid, scenes in CLIPS.items() for color, shape, _ in scenes]


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dataset folder: ``videos/<id>.mp4`` and ``captions.json``."""
    root = tmp_path_factory.mktemp("clips")
    (root / "videos").mkdir()
    for vid, scenes in CLIPS.items():
        videos.make_video(root / "videos" / f"{vid}.mp4", scenes, size=(96, 96), fps=12)
    (root / "captions.json").write_text(json.dumps(_rows()))
    return root


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory, tiny_model: tuple[Path, Path],
              clips: Path) -> tuple[VideoRetrievalDataset, Settings, EvalResult]:
    config, checkpoint = tiny_model
    settings = resolve(home=tmp_path_factory.mktemp("home"), model=str(config),
                       pretrained=str(checkpoint), device="cpu", batch_size=8, workers=1)
    dataset = load_dataset(clips / "captions.json", None, name="msrvtt")
    assert isinstance(dataset, VideoRetrievalDataset)
    return dataset, settings, evaluate(dataset, settings=settings)


def test_recalls_and_ranks_equal_a_numpy_reference(first_run) -> None:
    dataset, settings, result = first_run
    assert (result.media, result.n_images, result.n_captions) == ("video", 10, 12)
    texts, frames = stored_video_frames(settings, result.index_name, dataset)
    assert result.n_frames == sum(len(v) for v, _ in frames)
    assert result.n_frames < result.embedded  # alike frames were collapsed into spans...
    assert any(w.max() > 1.0 for _, w in frames)  # ...so weighting by span length matters
    for (_, w), scenes in zip(frames, CLIPS.values()):  # the spans cover the whole video
        assert w.sum() == pytest.approx(sum(s for *_, s in scenes), abs=0.1)
    t2v, v2t = video_ranks(texts, frames, dataset.caption_image)
    for got, ranks, measured in ((result.t2i, t2v, result.t2i_ranks),
                                 (result.i2t, v2t, result.i2t_ranks)):
        assert got == pytest.approx({k: 100.0 * np.mean(ranks <= k) for k in (1, 5, 10)})
        assert measured == {"MdR": float(np.median(ranks)), "MnR": float(np.mean(ranks))}
    assert result.rsum == pytest.approx(sum(result.t2i.values()) + sum(result.i2t.values()))


def test_the_tiny_model_finds_the_easy_videos(first_run) -> None:
    dataset, settings, result = first_run
    texts, frames = stored_video_frames(settings, result.index_name, dataset)
    t2v, v2t = video_ranks(texts, frames, dataset.caption_image)
    single = np.bincount(dataset.caption_image)[dataset.caption_image] == 1
    assert (t2v[single] == 1).all()  # a one-scene video is its caption's first hit
    assert (v2t == 1).all()          # every video finds one of its captions first
    assert result.t2i[1] >= 80.0 and result.t2i[5] == 100.0 and result.i2t[1] == 100.0


def test_a_second_run_reuses_the_index_and_the_cli_reports_videos(first_run, clips,
                                                                   tiny_model, tmp_path) -> None:
    _, settings, first = first_run
    config, checkpoint = tiny_model
    out = tmp_path / "out.json"
    result = CliRunner().invoke(_app(), [
        "eval", "--data", str(clips / "captions.json"), "--videos", str(clips / "videos"),
        "--dataset", "msrvtt", "--model", str(config), "--pretrained", str(checkpoint),
        "--home", str(settings.home), "--device", "cpu", "--workers", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "text->video" in result.stdout and "video->text" in result.stdout
    assert "MdR" in result.stdout and "all 10 videos cached" in result.stdout
    assert "has 1000 videos, loaded 10" in result.stderr  # MSR-VTT 1k-A's size is checked
    data = json.loads(out.read_text())
    assert (data["media"], data["index_name"], data["embedded"]) == ("video", first.index_name, 0)
    assert data["t2i"] == {f"R@{k}": v for k, v in first.t2i.items()}
    assert data["i2t_ranks"] == first.i2t_ranks


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("eval")(eval_command)
    app.command("other")(lambda: None)  # two commands: "eval" stays a subcommand
    return app


# --------------------------------------------------------------------------- #
# Mean pooling and ranking, by hand
# --------------------------------------------------------------------------- #


def test_span_weighted_mean_equals_the_mean_of_the_frames_before_collapsing() -> None:
    rng = np.random.default_rng(0)
    a, b = (v / np.linalg.norm(v) for v in rng.normal(size=(2, 8)))
    sampled = np.stack([a] * 5 + [b] * 2)  # 1 frame/s: a still shot of 5 s, then 2 s of b
    spans = collapse(np.arange(7.0), sampled, duration=7.0)
    assert [(s.start, s.end) for s in spans] == [(0.0, 5.0), (5.0, 7.0)]
    kept = sampled[[s.index for s in spans]]
    pooled = mean_pool(kept, np.array([s.start for s in spans]), np.array([s.end for s in spans]))
    plain = sampled.mean(axis=0)
    np.testing.assert_allclose(pooled, plain / np.linalg.norm(plain), atol=1e-6)
    even = kept.mean(axis=0)  # what an unweighted mean of the stored frames would give
    assert not np.allclose(pooled, even / np.linalg.norm(even), atol=1e-3)
    # no span with a length (one frame, duration unknown): the plain mean
    np.testing.assert_allclose(mean_pool(kept, np.zeros(2), np.zeros(2)),
                               even / np.linalg.norm(even), atol=1e-6)


def test_first_hit_ranks_ties_and_several_relevant_items() -> None:
    items = np.eye(3, dtype=np.float32)
    queries = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 1]], dtype=np.float32)
    # query 1 scores items 1 and 2 equally: item 1 comes first (lower index)
    assert first_hit_ranks(queries, items, np.array([0, 2, 2]), np.arange(3)).tolist() == [1, 2, 1]
    # several relevant items: the best one counts
    assert first_hit_ranks(queries, items, np.array([5, 5, 5]),
                           np.array([0, 5, 5])).tolist() == [2, 1, 1]


# --------------------------------------------------------------------------- #
# Reading MSR-VTT's layout
# --------------------------------------------------------------------------- #


JSFUSION = ("key,vid_key,video_id,sentence\n"
            "ret0,msr9770,video9770,a person is connecting something to system\n"
            'ret1,msr7606,video7606,"a little girl does gymnastics, then smiles"\n')


def _msrvtt_folder(root: Path, ids=("video9770", "video7606")) -> Path:
    (root / "msrvtt_data").mkdir(parents=True)
    (root / "msrvtt_data" / "MSRVTT_JSFUSION_test.csv").write_text(JSFUSION)
    (root / "videos" / "all").mkdir(parents=True)
    for vid in ids:
        (root / "videos" / "all" / f"{vid}.mp4").touch()
    return root


def test_the_jsfusion_folder_reads_as_msrvtt_1ka(tmp_path: Path) -> None:
    ds = load_dataset(_msrvtt_folder(tmp_path / "MSRVTT"), None)
    assert isinstance(ds, VideoRetrievalDataset) and (ds.name, ds.split) == ("msrvtt", "test")
    assert ds.image_paths == [tmp_path / "MSRVTT" / "videos" / "all" / f"{v}.mp4"
                              for v in ("video9770", "video7606")]
    assert ds.captions[1] == "a little girl does gymnastics, then smiles"
    assert ds.caption_image.tolist() == [0, 1]
    assert check_expected(ds, "msrvtt-1ka") == [
        "msrvtt (MSR-VTT 1k-A (JSFusion) test split) has 1000 videos, loaded 2",
        "msrvtt (MSR-VTT 1k-A (JSFusion) test split) has 1000 captions, loaded 2"]


def test_several_captions_per_video_and_other_extensions(tmp_path: Path) -> None:
    (tmp_path / "b.webm").touch()
    (tmp_path / "a.MKV").touch()
    (tmp_path / "a.txt").touch()  # not a video: no clash with a.MKV
    (tmp_path / "caps.csv").write_text("video_id,caption\nb,one\na,two\nb,three\n")
    ds = load_dataset(tmp_path / "caps.csv", None, name="mine")
    assert [p.name for p in ds.image_paths] == ["b.webm", "a.MKV"]
    assert ds.caption_image.tolist() == [0, 1, 0] and ds.image_captions(0) == [0, 2]


@pytest.mark.parametrize("content, message", [
    ('[{"video_id": "a", "caption": "x"}, {"video_id": "a"}]',
     "[1] has no 'caption' or 'sentence' key"),
    ('[{"video_id": "a", "caption": "x"}, 3]', "[1] must be an object, got int"),
    ('[{"video_id": "", "caption": "x"}]', "video_id must be a non-empty string"),
    ('[{"video_id": "gone", "caption": "x"}]', "1 of 1 videos missing under"),
])
def test_bad_caption_lists_are_one_line_errors(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "caps.json").write_text(content)
    with pytest.raises(DatasetError, match=message.replace("[", r"\[")):
        load_dataset(tmp_path / "caps.json", None)


def test_missing_things_are_named(tmp_path: Path) -> None:
    root = _msrvtt_folder(tmp_path / "MSRVTT", ids=("video9770",))
    with pytest.raises(DatasetError, match=r"1 of 2 videos missing under .*all: video7606 "):
        load_dataset(root, None)
    with pytest.raises(DatasetError, match="videos folder not found: .*elsewhere"):
        load_dataset(root, tmp_path / "elsewhere")
    with pytest.raises(DatasetError, match="dataset path not found: .*nope.csv"):
        load_dataset(tmp_path / "nope.csv", None)
    (root / "msrvtt_data" / "MSRVTT_JSFUSION_test.csv").write_text("key,video_id\nr,video9770\n")
    with pytest.raises(DatasetError, match="the header has no 'caption' or 'sentence' column"):
        load_dataset(root, None)
