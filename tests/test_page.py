"""The search page in a real browser: headless Chromium against a real `mmsearch serve`.

One server (a subprocess, over ~80 real Flickr photos plus drawn shapes, indexed with
the tiny trained model) and one browser serve the whole module. Needs the `playwright`
Python package and a Chromium binary (Debian's `chromium`; no browser download):
set MMSEARCH_CHROMIUM to use another one. Skipped when either is missing, except in CI
(``CI`` set), where .ci/run installs both and a missing one fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from conftest import draw_shapes
from liveserver import free_port

if os.environ.get("CI"):  # CI installs both (.ci/run): there, missing is a failure, not a skip
    import playwright.sync_api as sync_api
else:
    sync_api = pytest.importorskip("playwright.sync_api")

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
PHOTOS = 80
#: The Flickr copies given EXIF: index in the copied list -> (date, make, model).
TAGGED = {i: (f"2023:07:{10 + i} 18:30:05", "FUJIFILM", "X-T4") for i in range(5)}
TEXTS = ["a red circle", "a blue square", "a green triangle", "a yellow circle",
         "a dog running on the grass", "people on a beach"]


def chromium() -> str | None:
    for candidate in (os.environ.get("MMSEARCH_CHROMIUM"), "/usr/lib/chromium/chromium",
                      shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


# -- fixtures ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory, tiny_model: tuple[Path, Path],
            flickr_images: list[Path]) -> dict:
    """An index 'web' over Flickr copies (a few with EXIF dates/camera) and drawn shapes."""
    from PIL import Image

    from mmsearch import Engine

    base = tmp_path_factory.mktemp("web")
    photos, home = base / "photos", base / "home"
    tagged = []
    for i, source in enumerate(flickr_images[:PHOTOS]):
        target = photos / "flickr" / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if i in TAGGED:
            date, make, model = TAGGED[i]
            exif = Image.Exif()
            exif[0x010F], exif[0x0110] = make, model
            exif.get_ifd(0x8769)[0x9003] = date
            with Image.open(source) as img:
                img.save(target, exif=exif, quality=92)
            tagged.append(target)
        else:
            shutil.copy(source, target)  # a fresh mtime: never a July 2023 date
    shapes = draw_shapes(photos / "shapes")
    config, checkpoint = tiny_model
    with Engine.open("web", home=home, model=str(config), pretrained=str(checkpoint)) as engine:
        report = engine.index([photos])
        assert report.embedded == PHOTOS + len(shapes)
        engine.add_texts(TEXTS)
    return {"home": home, "photos": photos, "tagged": tagged, "count": PHOTOS + len(shapes)}


@pytest.fixture(scope="module")
def server(library: dict, tmp_path_factory: pytest.TempPathFactory):
    """The base URL of a running `python -m mmsearch serve` over the library."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    env = {**os.environ, "MMSEARCH_HOME": str(library["home"])}
    env.pop("MMSEARCH_INDEX", None)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mmsearch", "serve", "--home", str(library["home"]),
             "--index", "web", "--port", str(port), "--host", "127.0.0.1"],
            stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited ({proc.returncode}):\n{log_path.read_text()}")
            try:
                with urllib.request.urlopen(url + "/healthz", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not answer /healthz in 60 s:\n{log_path.read_text()}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def browser():
    executable = chromium()
    if executable is None:
        if os.environ.get("CI"):
            pytest.fail("no Chromium found: .ci/run installs Debian's chromium")
        pytest.skip("no Chromium found (apt-get install chromium, or set MMSEARCH_CHROMIUM)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True,
                                             args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def console(browser) -> list[str]:
    """Console errors/warnings and uncaught exceptions of the test's page (must stay empty)."""
    return []


@pytest.fixture
def page(browser, server: str, console: list[str]):
    context = browser.new_context(base_url=server, viewport={"width": 1280, "height": 900})
    context.set_default_timeout(15_000)
    page = context.new_page()
    page.on("console", lambda m: console.append(f"{m.type}: {m.text}")
            if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
    yield page
    context.close()
    assert console == [], "console errors in normal use"


# -- helpers ---------------------------------------------------------------------------
def api(server: str, path: str, **params) -> dict:
    query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
    with urllib.request.urlopen(f"{server}{path}?{query}", timeout=30) as response:
        return json.loads(response.read())


def api_ids(server: str, path: str, **params) -> list[int]:
    return [h["id"] for h in api(server, path, **params)["hits"]]


def settle(page) -> None:
    """Wait until the page has no search in flight (and starts none within a moment)."""
    while True:
        page.wait_for_selector('#results[aria-busy="false"]', state="attached")
        count = page.locator("#results .hit").count()
        page.wait_for_timeout(250)
        if (page.locator('#results[aria-busy="false"]').count()
                and page.locator("#results .hit").count() == count):
            return


def shown_ids(page) -> list[int]:
    return [int(i) for i in page.eval_on_selector_all("#results .hit",
                                                      "els => els.map(e => e.dataset.id)")]


def params(page) -> dict[str, str]:
    return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(page.url).query))


@pytest.fixture(scope="module")
def catalog(server: str, library: dict) -> dict[str, int]:
    """Every indexed path -> its id (from the API)."""
    hits = api(server, "/api/search", q="a photo", k=500)["hits"]
    assert len(hits) == library["count"]
    return {h["path"]: h["id"] for h in hits}


LOAD_ALL_IMAGES = """async () => {
  // scroll each image of the grid into view, wait for it, and name those that did not load
  // (the images appended meanwhile, by the infinite scroll, are for the next call)
  const images = Array.from(document.querySelectorAll('#results .hit img'));
  for (const img of images) {
    img.scrollIntoView({block: 'center'});
    if (!img.complete) {
      await new Promise(ok => { img.addEventListener('load', ok, {once: true});
                                img.addEventListener('error', ok, {once: true}); });
    }
  }
  return images.filter(img => !(img.complete && img.naturalWidth > 0)).map(img => img.src);
}"""


# -- tests -------------------------------------------------------------------------------
def test_search_shows_the_api_order_and_every_thumbnail_loads(page, server, library):
    page.goto("/")
    page.wait_for_selector("#info:has-text('photos')")
    assert str(library["count"]) in page.text_content("#info")
    assert "tinyclip" in page.text_content("#info")
    page.click("body")  # not typing anywhere: "/" jumps to the search box
    page.keyboard.press("/")
    assert page.evaluate("document.activeElement.id") == "q"
    page.keyboard.type("a red circle")
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r"\?q=a\+red\+circle"))
    settle(page)

    expected = api_ids(server, "/api/search", q="a red circle", k=50, offset=0)
    assert len(expected) == 50
    assert shown_ids(page) == expected
    first = page.locator("#results .hit").first
    hit = api(server, "/api/search", q="a red circle", k=1)["hits"][0]
    assert Path(hit["path"]).name.startswith("red_circle_")  # the tiny model knows shapes
    img = first.locator("img")
    assert img.get_attribute("alt") == Path(hit["path"]).name
    assert img.get_attribute("src") == f"/thumb/{hit['id']}"
    assert re.fullmatch(r"\d\.\d{4}( · \d{4}-\d\d-\d\d)?", img.get_attribute("title"))
    assert img.get_attribute("title").startswith(f"{hit['score']:.4f}")
    assert "a red circle" in page.text_content("#status")
    assert page.locator("#empty").is_hidden()
    assert page.locator("#intro").is_hidden()

    # every image in the grid loads (scrolling appends the next pages: check those too)
    count = 0
    while count != len(shown_ids(page)):
        count = len(shown_ids(page))
        assert page.evaluate(LOAD_ALL_IMAGES) == []
        settle(page)
    ids = shown_ids(page)
    assert len(ids) == len(set(ids)) == library["count"]  # both pages, all photos once


def test_query_survives_reload_and_history(page, server):
    page.goto("/?q=a+blue+square")
    settle(page)
    blue = shown_ids(page)
    assert blue == api_ids(server, "/api/search", q="a blue square", k=50)
    page.reload()
    settle(page)
    assert page.input_value("#q") == "a blue square"
    assert shown_ids(page) == blue

    page.fill("#q", "a yellow triangle")
    page.press("#q", "Enter")
    page.wait_for_url(re.compile(r"q=a\+yellow\+triangle"))
    settle(page)
    yellow = shown_ids(page)
    assert yellow == api_ids(server, "/api/search", q="a yellow triangle", k=50)
    assert yellow != blue

    page.go_back()
    page.wait_for_url(re.compile(r"q=a\+blue\+square"))
    settle(page)
    assert page.input_value("#q") == "a blue square"
    assert shown_ids(page) == blue
    page.go_forward()
    page.wait_for_url(re.compile(r"q=a\+yellow\+triangle"))
    settle(page)
    assert page.input_value("#q") == "a yellow triangle"
    assert shown_ids(page) == yellow


def test_dropping_a_photo_searches_by_it(page, catalog, library):
    page.goto("/")
    settle(page)
    target = library["tagged"][2]
    photo_id = catalog[str(target)]
    # a real drop event carrying a File built from the photo's bytes
    page.evaluate("""async ([url, name]) => {
        const blob = await (await fetch(url)).blob();
        const dt = new DataTransfer();
        dt.items.add(new File([blob], name, {type: blob.type || 'image/jpeg'}));
        const target = document.querySelector('#results');
        for (const type of ['dragenter', 'dragover', 'drop'])
            target.dispatchEvent(new DragEvent(type, {dataTransfer: dt, bubbles: true, cancelable: true}));
    }""", [f"/original/{photo_id}", target.name])
    page.wait_for_url(re.compile(r"\?image=uploaded"))
    settle(page)
    assert shown_ids(page)[0] == photo_id
    assert page.locator("#drop").is_hidden()

    # the file picker does the same
    other = sorted(library["photos"].glob("shapes/green_triangle_*"))[0]
    page.set_input_files("#file", str(other))
    page.wait_for_function("id => document.querySelector('#results .hit')?.dataset.id == id",
                           arg=str(catalog[str(other)]))
    settle(page)
    ids = shown_ids(page)
    assert ids[0] == catalog[str(other)] and len(ids) == len(set(ids))
    assert "image=uploaded" in page.url


def test_similar_puts_the_clicked_photo_first(page, server):
    page.goto("/?q=a+green+triangle")
    settle(page)
    third = page.locator("#results .hit").nth(2)
    photo_id = int(third.get_attribute("data-id"))
    third.hover()
    third.locator(".similar").click()
    page.wait_for_url(re.compile(rf"\?similar={photo_id}$"))
    settle(page)
    ids = shown_ids(page)
    assert ids[0] == photo_id
    assert ids == api_ids(server, f"/api/similar/{photo_id}", k=50)
    assert page.input_value("#q") == ""


def test_infinite_scroll_appends_pages_without_duplicates(page, server, library):
    k = 8
    page.goto(f"/?q=a+yellow+circle&k={k}")
    settle(page)
    before = shown_ids(page)
    assert len(before) >= k and len(before) % k == 0  # whole pages (the first fill the view)
    grown = len(before)
    while True:  # scroll to the end, page by page
        page.locator("#more").scroll_into_view_if_needed()
        settle(page)
        count = len(shown_ids(page))
        if count == grown:
            break
        assert count > grown
        grown = count
    ids = shown_ids(page)
    assert len(ids) == len(set(ids)) == library["count"]
    expected = []
    for offset in range(0, library["count"], k):
        expected += api_ids(server, "/api/search", q="a yellow circle", k=k, offset=offset)
    assert ids == expected
    assert ids[:len(before)] == before
    assert params(page)["k"] == str(k)


def test_filters_restrict_the_results_and_live_in_the_url(page, server, catalog, library):
    tagged = {catalog[str(p)] for p in library["tagged"]}
    page.goto("/?q=people")
    settle(page)
    page.fill("#camera", "fuji")
    page.press("#camera", "Enter")
    page.wait_for_url(re.compile(r"camera=fuji"))
    settle(page)
    assert set(shown_ids(page)) == tagged
    assert shown_ids(page) == api_ids(server, "/api/search", q="people", camera="fuji", k=50)

    page.fill("#camera", "")
    page.fill("#after", "2023-07-12")
    page.fill("#before", "2023-07-13")
    page.press("#before", "Enter")
    page.wait_for_url(lambda url: "after=2023-07-12" in url and "before=2023-07-13" in url
                      and "camera" not in url)
    settle(page)
    days = {catalog[str(library["tagged"][i])] for i in (2, 3)}  # July 12 and 13
    assert set(shown_ids(page)) == days

    page.fill("#after", "2023")
    page.fill("#before", "2023")
    page.select_option("#sort", "date-asc")  # a change searches at once
    page.wait_for_url(re.compile(r"sort=date-asc"))
    settle(page)
    oldest_first = api_ids(server, "/api/search", q="people", after="2023", before="2023",
                           sort="date-asc", k=50)
    assert shown_ids(page) == oldest_first == [catalog[str(p)] for p in library["tagged"]]

    page.check("#dedup")
    page.wait_for_url(re.compile(r"dedup=1"))
    settle(page)
    deduped = api_ids(server, "/api/search", q="people", after="2023", before="2023",
                      sort="date-asc", dedup=1, k=50)
    assert shown_ids(page) == deduped and set(deduped) <= set(oldest_first)
    # the filters come back with the URL
    page.reload()
    settle(page)
    assert page.input_value("#after") == "2023" and page.input_value("#sort") == "date-asc"
    assert page.is_checked("#dedup") and page.input_value("#q") == "people"
    assert shown_ids(page) == deduped


def test_viewer_shows_the_photo_its_metadata_and_texts(page, catalog, library):
    page.goto("/?q=a+red+square&camera=x-t4")
    settle(page)
    first = page.locator("#results .hit").first
    photo_id = int(first.get_attribute("data-id"))
    path = next(p for p, i in catalog.items() if i == photo_id)
    first.locator("img").click()
    viewer = page.locator("#viewer")
    viewer.wait_for(state="visible")
    page.wait_for_function("document.querySelector('#v-img').complete && "
                           "document.querySelector('#v-img').naturalWidth > 0")
    assert page.get_attribute("#v-img", "src") == f"/original/{photo_id}"
    meta = page.text_content("#v-meta")
    assert "X-T4" in meta and "2023-07-1" in meta and "EXIF" in meta
    assert path in meta and Path(path).name == page.text_content("#v-name")
    page.wait_for_selector("#v-texts li")
    assert page.locator("#v-texts li").count() == 5
    page.keyboard.press("Escape")
    viewer.wait_for(state="hidden")

    # "Find similar" in the viewer
    first.locator("img").click()
    viewer.wait_for(state="visible")
    page.click("#v-similar")
    viewer.wait_for(state="hidden")
    page.wait_for_url(re.compile(rf"similar={photo_id}"))
    settle(page)
    assert shown_ids(page)[0] == photo_id
    assert "camera=x-t4" in page.url  # the filters stay


def test_no_results_and_errors_are_said(page, console):
    page.goto("/?q=a+dog&camera=no-such-camera")
    settle(page)
    assert page.locator("#empty").is_visible()
    assert page.locator("#results .hit").count() == 0

    page.goto("/?q=a+dog&after=sometime")
    settle(page)
    assert page.locator("#status.error").is_visible()
    assert "sometime" in page.text_content("#status")
    # Chromium logs the 400 response itself; that is the point here, not a page bug
    assert all("400" in line for line in console), console
    console.clear()
