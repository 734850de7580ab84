"""The CLI and the API at the sizes users have: 5,000 photos given as 5,000 paths, 20,000
texts, 2,000 hits paged, a filter keeping 3,000, eval over 1,000 photos and 5,000 captions.

A few hundred items hide what a thousand expose (a SQL expression that grows by one
term per path once failed here at 1,000). The tiny model keeps the suite fast; the
photos are the 1,000 real Flickr photos, hard-linked (identical files) and re-encoded
smaller (new content) into folders whose names carry spaces, ``%``, ``_``, a backslash
and non-ASCII letters.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import FLICKR
from PIL import Image
from typer.testing import CliRunner

from mmsearch import Engine
from mmsearch.cli import app

runner = CliRunner()

# folder -> how its 1,000 photos are made: "link" (the Flickr file itself), or a width.
# Folders are prefixes of each other ("a", "a b", "a%b") and nest ("a/holiday photos/1 %_"):
# "under a" must keep 3,000 and no photo of "a b" or "a%b".
LAYOUT = {
    "a/holiday photos": "link",
    "a/holiday photos/1 %_": 240,
    "a/c_d": 200,
    "a b": "link",
    "a%b/naïve ünï back\\slash": 160,
}


def run(*args: object, code: int = 0) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, (result.output[-3000:], result.exception)
    return result.output


def _reencode(job: tuple[str, str, int]) -> None:
    src, dst, width = job
    with Image.open(src) as img:
        img.draft("RGB", (width, width))
        img = img.convert("RGB")
        img.resize((width, max(1, round(img.height * width / img.width)))).save(dst, quality=85)


@dataclass(frozen=True)
class Library:
    root: Path
    paths: list[Path]          # the 5,000 photos, in the order given to `index`
    names: list[str]           # the 1,000 Flickr file names
    config: Path
    ckpt: Path


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory, flickr_images: list[Path],
            tiny_model: tuple[Path, Path]) -> Library:
    """5,000 photos indexed with one `mmsearch index PATH1 ... PATH5000` (as a shell's
    glob gives them), into a private MMSEARCH_HOME."""
    assert len(flickr_images) == 1000
    root = tmp_path_factory.mktemp("real size")
    jobs, paths = [], []
    for folder, how in LAYOUT.items():
        (root / folder).mkdir(parents=True)
        for src in flickr_images:
            dst = root / folder / src.name
            paths.append(dst)
            if how == "link":
                os.link(src, dst)
            else:
                jobs.append((str(src), str(dst), how))
    with ProcessPoolExecutor(2) as pool:
        list(pool.map(_reencode, jobs, chunksize=50))
    os.environ["MMSEARCH_HOME"] = str(root / "home-dir")
    config, ckpt = tiny_model
    out = run("index", *paths, "--model", config, "--pretrained", ckpt)
    assert "added 5000," in out and "skipped 0" in out, out[-2000:]
    return Library(root, paths, [p.name for p in flickr_images], config, ckpt)


@pytest.fixture(autouse=True)
def _home(library: Library, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMSEARCH_HOME", str(library.root / "home-dir"))
    monkeypatch.delenv("MMSEARCH_INDEX", raising=False)


def _hits(*args: object) -> list[dict]:
    return json.loads(run("query", *args, "--json"))


def test_five_thousand_paths_index_in_one_run_and_check_clean(library: Library) -> None:
    info = json.loads(run("info", "--json"))
    assert info["images"] == 5000
    with Engine.open("default", home=library.root / "home-dir") as engine:
        assert set(engine.store.roots or ()) == {str(p) for p in library.paths}
    assert run("check").strip() == "ok: catalog and vector files agree"
    again = run("index", *library.paths)  # the second run over the same paths: nothing to do
    assert "added 0," in again and "unchanged 5000" in again and "removed 0" in again


@pytest.mark.parametrize("folder", [*LAYOUT, "a", "a%b"])
def test_in_keeps_exactly_what_lies_under_a_folder(library: Library, folder: str) -> None:
    base = library.root / folder
    want = {str(p) for p in library.paths if base in p.parents}
    hits = _hits("a dog", "--in", base, "-k", 5000)
    assert {h["path"] for h in hits} == want and len(hits) == len(want)


def test_a_filter_keeping_three_thousand(library: Library) -> None:
    hits = _hits("people on a beach", "--in", library.root / "a", "-k", 5000)
    assert len(hits) == 3000 == len({h["id"] for h in hits})
    assert all(h["path"].startswith(str(library.root / "a") + "/") for h in hits)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)


def test_the_api_pages_through_two_thousand_hits_without_a_repeat(library: Library) -> None:
    from fastapi.testclient import TestClient

    from mmsearch.serve.app import create_app
    from mmsearch.serve.security import Access
    from mmsearch.serve.service import SearchService
    from mmsearch.settings import resolve

    service = SearchService(resolve(home=library.root / "home-dir"))
    try:
        client = TestClient(create_app(service, Access("127.0.0.1", None)),
                            base_url="http://127.0.0.1:8000")
        ids, scores = [], []
        for offset in range(0, 2000, 250):
            page = client.get("/api/search", params={"q": "a dog", "k": 250, "offset": offset})
            assert page.status_code == 200, page.text
            ids += [h["id"] for h in page.json()["hits"]]
            scores += [h["score"] for h in page.json()["hits"]]
        assert len(ids) == 2000 == len(set(ids))
        assert scores == sorted(scores, reverse=True)
    finally:
        service.close()


def test_duplicates_and_export_over_five_thousand(library: Library, tmp_path: Path) -> None:
    groups = json.loads(run("duplicates", "--threshold", "0.9999", "--json"))
    # each Flickr photo is hard-linked into two folders: those two always share a group,
    # with its smaller re-encodings where the tiny model finds them as close
    linked = {frozenset(str(library.root / f / n) for f in ("a/holiday photos", "a b"))
              for n in library.names}
    assert sum(any(pair <= set(g["paths"]) for pair in linked) for g in groups) == 1000
    for g in groups:
        assert len({Path(p).name for p in g["paths"]}) == 1, g["paths"]
        assert g["exact"] == (g["contents"] == 1)
    report = json.loads(run("export", tmp_path / "out", "--json"))
    assert report["images"] == 5000
    import pyarrow.parquet as pq

    vectors = [np.load(f) for f in sorted((tmp_path / "out" / "img_emb").glob("*.npy"))]
    paths = [p for f in sorted((tmp_path / "out" / "metadata").glob("*.parquet"))
             for p in pq.read_table(f).column("image_path").to_pylist()]
    assert sum(v.shape[0] for v in vectors) == 5000
    assert sorted(paths) == sorted(str(p) for p in library.paths)
    assert run("check").strip() == "ok: catalog and vector files agree"


def test_twenty_thousand_texts(library: Library, tmp_path: Path) -> None:
    lines = tmp_path / "captions.txt"
    lines.write_text("".join(f"caption {n}: a dog running on the grass number {n}\n"
                             for n in range(20_000)))
    out = run("texts", "add", lines)
    assert "texts: added 20000," in out, out
    hits = _hits("a dog", "--texts", "-k", 5)
    assert len(hits) == 5 and all(h["text"].startswith("caption ") for h in hits)
    info = json.loads(run("info", "--json"))
    assert info["texts"] == 20_000
    assert run("check").strip() == "ok: catalog and vector files agree"


def test_eval_over_a_thousand_photos_and_five_thousand_captions(library: Library,
                                                                tmp_path: Path) -> None:
    data = FLICKR / "dataset_flickr8k_1k.json"
    run("eval", "--dataset", "flickr8k", "--karpathy-json", data, "--images", FLICKR / "images",
        "--model", library.config, "--pretrained", library.ckpt, "--json", tmp_path / "r.json")
    result = json.loads((tmp_path / "r.json").read_text())
    assert (result["n_images"], result["n_captions"]) == (1000, 5000)
    for recalls in (result["t2i"], result["i2t"]):
        r = [recalls[f"R@{k}"] for k in (1, 5, 10)]
        assert 0 <= r[0] <= r[1] <= r[2] <= 100 and r[2] > 0


def test_eval_of_five_thousand_photos_equals_numpy_on_the_same_vectors(
        library: Library, tmp_path: Path) -> None:
    """A 5,000-image / 25,000-caption Karpathy split (COCO's 5k test split is this size):
    the library's distinct photos plus 1,000 more re-encodings, each with its source
    photo's captions; Recall@K through the engine equals numpy's over the vectors it
    stored, except where near-ties (scores within 1e-5) leave a recall undecided."""
    from evalref import assert_recalls_match, stored_embeddings

    from mmsearch.eval.datasets import load_karpathy
    from mmsearch.eval.evaluate import evaluate
    from mmsearch.settings import resolve

    extra = tmp_path / "photos" / "more"
    extra.mkdir(parents=True)
    with ProcessPoolExecutor(2) as pool:
        list(pool.map(_reencode, [(str(FLICKR / "images" / n), str(extra / n), 180)
                                  for n in library.names], chunksize=50))
    captions = {e["filename"]: e["sentences"] for e in
                json.loads((FLICKR / "dataset_flickr8k_1k.json").read_text())["images"]}
    photos = [p for p in library.paths if p.parent != library.root / "a b"]  # not the links
    photos += [extra / n for n in library.names]
    entries = [{"filepath": os.path.relpath(p.parent, library.root), "filename": p.name,
                "split": "test", "sentences": captions[p.name]} for p in photos]
    data = tmp_path / "dataset_5k.json"
    data.write_text(json.dumps({"dataset": "coco", "images": entries}))
    dataset = load_karpathy(data, library.root)
    assert (dataset.n_images, dataset.n_captions) == (5000, 25_000)
    settings = resolve(home=tmp_path / "home", model=str(library.config),
                       pretrained=str(library.ckpt), device="cpu", batch_size=64)
    result = evaluate(dataset, settings=settings)
    texts, images = stored_embeddings(settings, result.index_name, dataset)
    undecided = assert_recalls_match(texts @ images.T, dataset.caption_image,
                                     result.t2i, result.i2t, tol=1e-5)
    assert undecided <= 3


def test_the_ray_runner_over_two_thousand_paths(library: Library) -> None:
    paths = library.paths[:2000]
    out = run("index", *paths, "--runner", "ray", "--index", "by-ray", "--model", library.config,
              "--pretrained", library.ckpt)
    assert "added 2000," in out and "skipped 0" in out, out[-2000:]
    assert json.loads(run("info", "--index", "by-ray", "--json"))["images"] == 2000
    assert run("check", "--index", "by-ray").strip() == "ok: catalog and vector files agree"
    hits = _hits("a dog", "--index", "by-ray", "--in", library.root / "a" / "holiday photos",
                 "-k", 2000)
    assert len(hits) == 2000  # the folder and the one nested in it
