"""Videos in `mmsearch serve`: moments in the API's hits, the type filter, a moment's frame as
its thumbnail (at its time, or at ?t=), the video itself with Range requests, and the page
playing a video hit from its moment in a real browser.

Videos are made with PyAV (tests/videos.py): scenes of the tiny model's coloured shapes, so
a frame's colour says which scene, and so which time, it was decoded at.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import draw_shapes
from liveserver import serving
from fastapi.testclient import TestClient
from PIL import Image

import tinyclip
import videos
from mmsearch import Engine
from mmsearch.serve.app import create_app
from mmsearch.serve.security import Access
from mmsearch.serve.service import SearchService
from mmsearch.settings import resolve

pytest.importorskip("av", reason="the video extra (PyAV) is installed by the test command")

CLIPS = {  # name -> scenes (colour, shape, seconds), codec
    "holiday.mp4": ([("red", "circle", 3.0), ("blue", "square", 4.0)], "libx264"),
    "street.webm": ([("green", "triangle", 2.0), ("yellow", "square", 4.0)], "libvpx-vp9"),
}
PHOTOS = 12  # one drawing of each colour and shape


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory, tiny_model: tuple[Path, Path]) -> dict:
    """An index 'vid' over 12 drawn photos and two videos; their scenes' [start, end)."""
    root = tmp_path_factory.mktemp("serve-video")
    folder = root / "media"
    draw_shapes(folder / "photos", per_combo=1)
    (folder / "clips").mkdir()
    times = {name: videos.make_video(folder / "clips" / name, scenes, codec=codec)
             for name, (scenes, codec) in CLIPS.items()}
    config, ckpt = tiny_model
    with Engine.open("vid", home=root / "home", model=str(config), pretrained=str(ckpt)) as e:
        report = e.index([folder])
        assert report.added == PHOTOS + len(CLIPS) and report.warnings == []
    return {"home": root / "home", "clips": folder / "clips", "times": times}


@pytest.fixture(scope="module")
def service(library: dict):
    svc = SearchService(resolve(home=library["home"], index="vid"))
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def client(service: SearchService) -> TestClient:
    return TestClient(create_app(service, Access("127.0.0.1", None)),
                      base_url="http://127.0.0.1:8000")


def search(client: TestClient, q: str, **params) -> list[dict]:
    r = client.get("/api/search", params={"q": q, "k": 50, **params})
    assert r.status_code == 200, r.text
    return r.json()["hits"]


def best_moment(client: TestClient, q: str, name: str) -> dict:
    hit = search(client, q, type="video")[0]
    assert Path(hit["path"]).name == name, hit
    return hit


def colour_of(picture: Image.Image) -> str:
    """The tinyclip colour nearest to the mean of a picture's strongly coloured pixels."""
    rgb = np.asarray(picture.convert("RGB")).reshape(-1, 3).astype(np.float64)
    vivid = rgb[rgb.max(axis=1) - rgb.min(axis=1) > 80]
    assert len(vivid) > rgb.shape[0] * 0.05, "no coloured shape in the picture"
    mean = vivid.mean(axis=0)
    return min(tinyclip.RGB, key=lambda c: float(np.linalg.norm(mean - tinyclip.RGB[c])))


def thumb_colour(client: TestClient, hit: dict, **params) -> str:
    r = client.get(hit["thumbnail"], params=params)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/webp"
    picture = Image.open(io.BytesIO(r.content))
    assert max(picture.size) <= 320
    return colour_of(picture)


# -- the API ---------------------------------------------------------------------------
def test_a_search_returns_the_moment_of_the_video(client: TestClient, library) -> None:
    hit = best_moment(client, "a blue square", "holiday.mp4")
    start, end = library["times"]["holiday.mp4"][1]  # the blue square's scene
    assert hit["kind"] == "video" and isinstance(hit["video_id"], int)
    assert start <= hit["time"] < end and hit["start"] <= hit["time"] <= hit["end"]
    assert start - 1.0 <= hit["start"] and hit["end"] <= end + 1.0
    assert hit["path"] == str(library["clips"] / "holiday.mp4")  # the video, not its frame
    assert hit["thumbnail"] == f"/thumb/{hit['id']}" and hit["original"] == f"/original/{hit['id']}"
    info = client.get("/api/info").json()
    assert info["videos"] == 2 and info["filters"]["type"]["help"]


def test_type_and_moments_filter_the_hits(client: TestClient) -> None:
    both = search(client, "a square")
    assert {h["kind"] for h in both} == {"image", "video"}
    only_videos = search(client, "a square", type="video")
    assert {h["kind"] for h in only_videos} == {"video"} and len(only_videos) == 2  # one each
    only_photos = search(client, "a square", type="image")
    assert {h["kind"] for h in only_photos} == {"image"} and len(only_photos) == PHOTOS
    several = search(client, "a square", type="video", moments="true")
    assert {h["kind"] for h in several} == {"video"} and len(several) > len(only_videos)
    totals = [client.get("/api/search", params={"q": "a square", "k": 5, **kind}).json()["total"]
              for kind in ({}, {"type": "video"}, {"type": "image"})]
    assert totals == [PHOTOS + 2, 2, PHOTOS]  # "best of N": each video once, not its frames
    bad = client.get("/api/search", params={"q": "a square", "type": "film"})
    assert bad.status_code == 400 and "image or video" in bad.json()["detail"]


def test_a_moments_thumbnail_is_its_frame(client: TestClient, service, library) -> None:
    blue = best_moment(client, "a blue square", "holiday.mp4")
    assert thumb_colour(client, blue) == "blue"
    assert thumb_colour(client, blue, t=1.0) == "red"  # ?t=: the frame at another time
    assert thumb_colour(client, blue, t=-4) == "red"  # held within the video
    assert thumb_colour(client, blue, t=1e9) == "blue"
    yellow = best_moment(client, "a yellow square", "street.webm")  # VP9 in WebM
    assert thumb_colour(client, yellow) == "yellow"
    assert thumb_colour(client, yellow, t=0.5) == "green"
    cached = sorted(p.name for p in service.thumbs.rglob("*.webp"))
    assert any(f"-t{round(blue['time'] * 1000)}-320" in name for name in cached)
    assert not any("-t1000-320" in name or "-t500-320" in name for name in cached)  # ?t=: not kept
    thumb_colour(client, blue)  # a second look is the cached file: nothing new
    for t in range(40):  # however many times a client asks for, the cache does not grow
        assert client.get(blue["thumbnail"], params={"t": t / 7}).status_code == 200
    assert sorted(p.name for p in service.thumbs.rglob("*.webp")) == cached
    assert not list(library["clips"].rglob("*.webp"))
    for bad in ("nan", "inf", "soon"):
        r = client.get(blue["thumbnail"], params={"t": bad})
        assert r.status_code == 400 and r.json()["detail"].startswith("t: ")


def test_the_original_of_a_moment_is_its_video_with_ranges(client: TestClient, library) -> None:
    hit = best_moment(client, "a blue square", "holiday.mp4")
    data = (library["clips"] / "holiday.mp4").read_bytes()
    full = client.get(hit["original"])
    assert full.status_code == 200 and full.content == data
    assert full.headers["content-type"] == "video/mp4" and full.headers["accept-ranges"] == "bytes"
    part = client.get(hit["original"], headers={"Range": "bytes=100-1123"})
    assert part.status_code == 206 and part.content == data[100:1124]
    assert part.headers["content-range"] == f"bytes 100-1123/{len(data)}"
    tail = client.get(hit["original"], headers={"Range": "bytes=-64"})
    assert tail.status_code == 206 and tail.content == data[-64:]
    beyond = client.get(hit["original"], headers={"Range": f"bytes={len(data) + 10}-"})
    assert beyond.status_code == 416 and beyond.headers["content-range"] == f"bytes */{len(data)}"


def test_a_video_that_no_longer_decodes_is_a_clear_404(tmp_path: Path, tiny_model) -> None:
    clip = tmp_path / "clips" / "gone-bad.mp4"
    clip.parent.mkdir()
    videos.make_video(clip, [("red", "circle", 2.0)])
    config, ckpt = tiny_model
    with Engine.open("bad", home=tmp_path / "home", model=str(config), pretrained=str(ckpt)) as e:
        e.index([clip.parent])
        frame = next(i for i, p in e.store.read.all_image_paths())
    videos.not_a_video(clip)  # rewritten since it was indexed
    svc = SearchService(resolve(home=tmp_path / "home", index="bad"), warm=False)
    try:
        client = TestClient(create_app(svc, Access("127.0.0.1", None)), base_url="http://localhost")
        r = client.get(f"/thumb/{frame}")
        assert r.status_code == 404 and r.json() == {"detail": "this video cannot be read any more"}
        assert client.get(f"/original/{frame}").status_code == 200  # the file is still there
        clip.unlink()
        assert client.get(f"/thumb/{frame}").status_code == 404
        assert client.get(f"/original/{frame}").status_code == 404
    finally:
        svc.close()


# -- the page ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def live(service: SearchService):
    """The base URL of the app under a real uvicorn server on 127.0.0.1."""
    with serving(create_app(service, Access("127.0.0.1", None))) as port:
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def console() -> list[str]:
    """Console errors/warnings and uncaught exceptions of the page (must stay empty)."""
    return []


@pytest.fixture(scope="module")
def page(live: str, console: list[str]):
    """A headless Chromium page on the live server (skipped as tests/test_page.py is)."""
    from test_page import CHROMIUM_ARGS, chromium, sync_api

    executable = chromium()
    if executable is None:
        pytest.skip("no Chromium found (apt-get install chromium, or set MMSEARCH_CHROMIUM)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True,
                                             args=CHROMIUM_ARGS)
        context = browser.new_context(base_url=live, viewport={"width": 1280, "height": 900})
        context.set_default_timeout(15_000)
        page = context.new_page()
        page.on("console", lambda m: console.append(f"{m.type}: {m.text}")
                if m.type in ("error", "warning") else None)
        page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
        yield page
        browser.close()


def shown(page) -> list[dict]:
    from test_page import settle

    settle(page)
    return page.eval_on_selector_all("#results .hit", """els => els.map(e => ({
        id: Number(e.dataset.id), video: e.classList.contains('video'),
        badge: e.querySelector('.badge')?.textContent || null}))""")


def test_the_page_plays_a_video_hit_from_its_moment(page, console, client: TestClient) -> None:
    page.goto("/?q=a+yellow+square")
    page.wait_for_selector("#type-field:not([hidden])")  # the index has videos
    mixed = shown(page)
    assert any(h["video"] for h in mixed) and not all(h["video"] for h in mixed)
    page.select_option("#type", "video")  # a change searches at once
    page.wait_for_url(lambda url: "type=video" in url)
    hits = shown(page)
    expected = search(client, "a yellow square", type="video")
    assert [h["id"] for h in hits] == [h["id"] for h in expected] and all(h["video"] for h in hits)
    best = expected[0]
    assert Path(best["path"]).name == "street.webm" and best["start"] > 0
    assert hits[0]["badge"] == f"▶ {clock(best['start'])}–{clock(best['end'])}"

    page.locator("#results .hit .thumb").first.click()
    page.locator("#viewer").wait_for(state="visible")
    assert page.locator("#v-img").is_hidden()
    assert page.get_attribute("#v-video", "src").startswith(f"/original/{best['id']}")
    page.wait_for_function("""start => {
        const v = document.querySelector('#v-video');
        return v.readyState >= 1 && v.currentTime > 0 && Math.abs(v.currentTime - start) < 0.5;
    }""", arg=best["start"])
    assert "Moment" in page.text_content("#v-meta")
    page.keyboard.press("Escape")
    page.locator("#viewer").wait_for(state="hidden")
    # the dialog's "close" event (which stops the video) comes a task after it hides
    page.wait_for_function("""() => {
        const v = document.querySelector('#v-video');
        return v.paused && !v.hasAttribute('src');
    }""", timeout=5000)
    assert console == []


def clock(seconds: float) -> str:
    whole = max(0, math.floor(seconds))
    return f"{whole // 60}:{whole % 60:02d}"
