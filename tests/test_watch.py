"""A live index: real files in temporary folders, a real watcher (watchfiles), the tiny model.

The watcher runs with short quiet and settle times (parameters, not the production values)
and every wait is a poll with a deadline. Speed is measured in benchmarks/bench_watch.py.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest
from conftest import draw_shapes
from fastapi.testclient import TestClient
from typer.testing import CliRunner

import tinyclip
from mmsearch import Engine
from mmsearch.errors import UsageError
from mmsearch.ingest.watch import Watcher, parse_duration, root_present, temporary
from mmsearch.serve.app import create_app
from mmsearch.serve.security import Access
from mmsearch.serve.service import SearchService
from mmsearch.settings import resolve

pytest.importorskip("watchfiles")

FAST = {"quiet": 0.4, "settle": 0.1, "check_every": 0.2, "lock_retry": 0.2}
DEADLINE_S = 15.0


def wait_for(what: Callable[[], Any], deadline: float = DEADLINE_S, why: str = "") -> Any:
    """Poll ``what`` until it is true; fail after ``deadline`` seconds."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        value = what()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"not within {deadline}s: {why or what}")


@pytest.fixture
def library(tmp_path: Path, tiny_model: tuple[Path, Path]) -> tuple[Path, Path]:
    """(home, root): 12 shapes in two folders, indexed."""
    root = tmp_path / "photos"
    draw_shapes(root / "a", per_combo=1)
    (root / "b").mkdir()
    for name in ("red_circle_0.png", "blue_square_0.png"):
        shutil.move(str(root / "a" / name), str(root / "b" / name))
    config, ckpt = tiny_model
    with Engine.open("live", home=tmp_path / "home", model=str(config), pretrained=str(ckpt)) as e:
        assert e.index([root]).added == 12
    return tmp_path / "home", root


class Live:
    """A watcher on its own thread with its own engine (the writer), and a reader."""

    def __init__(self, home: Path, roots: list[Path], **options: Any) -> None:
        self.lines: list[str] = []
        self.stop = threading.Event()
        self.writer = Engine.open("live", home=home, create=False)
        self.reader = Engine.open("live", home=home, create=False)
        self.watcher = Watcher([str(r) for r in roots], self._index, say=self.lines.append,
                               stop=self.stop, **{**FAST, **options})
        self.thread = threading.Thread(target=self.watcher.run, daemon=True)

    def _index(self, folders: list[Path], progress: Any, stop: threading.Event) -> Any:
        return self.writer.index(folders, progress=progress, stop=stop)

    def paths(self) -> dict[str, int]:
        self.reader.store.refresh()
        return {p: i for i, p in self.reader.store.read.all_image_paths()}

    def said(self, words: str) -> bool:
        return any(words in line for line in self.lines)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)
        self.writer.close()
        self.reader.close()


@pytest.fixture
def live(library: tuple[Path, Path]) -> Iterator[Live]:
    home, root = library
    watching = Live(home, [root])
    watching.thread.start()
    wait_for(lambda: watching.watcher.state.state == "watching", why="the watcher started")
    yield watching
    watching.close()
    assert not watching.thread.is_alive()


def vector(engine: Engine, path: Path) -> np.ndarray:
    ids = [i for i, p in engine.store.read.all_image_paths() if p == str(path)]
    assert len(ids) == 1
    return engine.store.image_vectors(ids)[1][0]


def test_photos_copied_in_while_serving_are_searchable_and_deleted_ones_go(
        library: tuple[Path, Path], flickr_images: list[Path]) -> None:
    home, root = library
    service = SearchService(resolve(home=home, index="live"))
    lines: list[str] = []
    service.watch(lines.append, **FAST)
    client = TestClient(create_app(service, Access("127.0.0.1", None)),
                        base_url="http://127.0.0.1:8000")
    try:
        info = lambda: client.get("/api/info").json()  # noqa: E731
        wait_for(lambda: (info()["watch"] or {}).get("state") == "watching")
        new = root / "phone" / "2024"
        new.mkdir(parents=True)
        for src in flickr_images[:200]:
            shutil.copy(src, new / src.name)
        wait_for(lambda: info()["images"] == 212, why="200 new photos indexed")
        hits = client.get("/api/search", params={"q": "a dog", "k": 500}).json()["hits"]
        assert sum(str(new) in h["path"] for h in hits) == 200
        # the photos are searchable as each chunk commits, before their batch has ended
        state = wait_for(lambda: (s := info()["watch"])["batches"] >= 1 and s,
                         why="the batch ended")
        assert state["missing"] == []
        assert any("added" in line for line in lines)

        for src in flickr_images[:50]:
            (new / src.name).unlink()
        wait_for(lambda: info()["images"] == 162, why="50 deleted photos gone")
        hits = client.get("/api/search", params={"q": "a dog", "k": 500}).json()["hits"]
        assert sum(str(new) in h["path"] for h in hits) == 150
    finally:
        service.close()
    assert service.watch_state()["state"] == "stopped"


def test_a_move_and_a_renamed_folder_keep_their_ids_and_embed_nothing(live: Live,
                                                                        library) -> None:
    _, root = library
    before = live.paths()
    moved_from, moved_to = root / "a" / "green_circle_0.png", root / "b" / "moved.png"
    old_vector = vector(live.reader, moved_from)
    batches = live.watcher.state.batches
    os.rename(moved_from, moved_to)
    wait_for(lambda: str(moved_to) in live.paths() and str(moved_from) not in live.paths())
    wait_for(lambda: live.watcher.state.batches > batches, why="the batch's end")
    assert live.watcher.state.last["embedded"] == 0
    assert live.watcher.state.last["moved"] == 1
    assert live.paths()[str(moved_to)] == before[str(moved_from)]  # the same id
    np.testing.assert_array_equal(vector(live.reader, moved_to), old_vector)
    assert live.reader.search(image=moved_to, k=1)[0].id == before[str(moved_from)]

    batches = live.watcher.state.batches
    os.rename(root / "b", root / "renamed")
    renamed = {str(root / "renamed" / n) for n in ("red_circle_0.png", "blue_square_0.png",
                                                     "moved.png")}
    wait_for(lambda: renamed <= set(live.paths()), why="the renamed folder's photos")
    wait_for(lambda: live.watcher.state.batches > batches, why="the batch's end")
    paths = live.paths()
    assert len(paths) == len(before) == 12
    assert not any("/b/" in p for p in paths)
    assert live.watcher.state.last["embedded"] == 0
    assert sorted(paths.values()) == sorted(before.values())  # every id kept


def test_a_file_written_in_two_halves_is_indexed_once_complete(
        live: Live, library, flickr_images: list[Path]) -> None:
    _, root = library
    data = flickr_images[0].read_bytes()
    target = root / "a" / "slow.jpg"
    for name in (".hidden.jpg", "download.jpg.part", "x.tmp", "photo.jpg~"):
        (root / "a" / name).write_bytes(data)
    with open(target, "wb") as fh:
        fh.write(data[:len(data) // 2])
        fh.flush()
        time.sleep(1.5)  # longer than the quiet time: the half file is seen alone
        fh.write(data[len(data) // 2:])
    wait_for(lambda: str(target) in live.paths() and live.watcher.state.pending == 0)
    record = live.reader.store.image_records([live.paths()[str(target)]])
    assert list(record.values())[0]["size"] == len(data)
    assert sum(p.endswith("slow.jpg") for p in live.paths()) == 1
    assert len(live.paths()) == 13  # the temporary and hidden files were ignored
    assert not any(". Traceback" in line or "Traceback" in line for line in live.lines)


def test_a_root_renamed_away_forgets_nothing_and_comes_back(live: Live, library) -> None:
    _, root = library
    before = live.paths()
    away = root.with_name("photos-unmounted")
    os.rename(root, away)
    wait_for(lambda: live.watcher.state.missing == ["photos"], why="the root is missing")
    assert live.said("photos is missing")
    tinyclip.draw_shape("yellow", "circle", seed=60).save(away / "a" / "while_away.png")
    (away / "a" / "red_square_0.png").unlink()
    time.sleep(1.0)  # several looks at the roots and quiet times: still nothing forgotten
    assert live.paths() == before

    os.rename(away, root)
    wait_for(lambda: str(root / "a" / "while_away.png") in live.paths(), why="rescan on return")
    wait_for(lambda: str(root / "a" / "red_square_0.png") not in live.paths())
    assert live.said("photos is back") and live.watcher.state.missing == []
    assert len(live.paths()) == 12


def test_an_empty_mount_point_is_not_a_deleted_library(tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    assert not root_present(str(tmp_path / "mnt"))
    (tmp_path / "mnt" / "x.jpg").write_bytes(b"x")
    assert root_present(str(tmp_path / "mnt"))
    assert not root_present(str(tmp_path / "mnt"), device=os.stat(tmp_path).st_dev + 1)
    assert not root_present(str(tmp_path / "nowhere"))


def test_a_second_index_run_at_the_same_time(live: Live, library) -> None:
    home, root = library
    with Engine.open("live", home=home, create=False) as other:
        other.store.lock()  # another `mmsearch index` holds the index
        new = [root / "a" / f"new_{n}.png" for n in range(3)]
        for n, path in enumerate(new):
            tinyclip.draw_shape("green", "triangle", seed=70 + n).save(path)
        wait_for(lambda: live.watcher.state.state == "waiting for the lock")
        assert live.said("waiting for it") and live.paths().keys().isdisjoint(map(str, new))
        report = other.index([root])  # under the lock it holds, then released
        assert report.added == 3
    wait_for(lambda: live.watcher.state.state == "watching" and live.watcher.state.batches)
    assert live.watcher.state.last["added"] == 0  # the other run took them; nothing twice
    paths = live.paths()
    assert len(paths) == 15 and {str(p) for p in new} <= set(paths)


def test_the_rescan_fallback_forced(library: tuple[Path, Path]) -> None:
    home, root = library
    watching = Live(home, [root], events=False, rescan_every=0.5)
    watching.thread.start()
    try:
        wait_for(lambda: watching.said("rescanning every 0.5s instead"))
        assert watching.watcher.state.mode == "rescan"
        tinyclip.draw_shape("blue", "triangle", seed=90).save(root / "a" / "polled.png")
        wait_for(lambda: str(root / "a" / "polled.png") in watching.paths())
    finally:
        watching.close()


def test_names_and_durations() -> None:
    assert [temporary(n) for n in (".x.jpg", "a.jpg.part", "a.TMP", "a.jpg~", "a.jpg")] == \
        [True, True, True, True, False]
    assert [parse_duration(t) for t in ("90", "90s", "10m", "2h", "1d")] == \
        [90, 90, 600, 7200, 86400]
    for bad in ("", "m", "-5m", "ten"):
        with pytest.raises(UsageError):
            parse_duration(bad)


def test_watch_without_the_extra_says_how_to_install(home: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from mmsearch.cli import app

    monkeypatch.setitem(sys.modules, "watchfiles", None)  # as if not installed
    (tmp_path / "p").mkdir()
    for command in (["index", str(tmp_path / "p"), "--watch"], ["serve", "--watch"]):
        result = CliRunner().invoke(app, command)
        assert result.exit_code != 0
        assert "pip install 'mmsearch[watch]'" in result.output
        assert "Traceback" not in result.output
    result = CliRunner().invoke(app, ["index", str(tmp_path / "p"), "--rescan-every", "5m"])
    assert result.exit_code != 0 and "--rescan-every goes with --watch" in result.output


def test_the_page_shows_the_batch_and_new_counts_without_a_reload(
        library: tuple[Path, Path], flickr_images: list[Path]) -> None:
    """The page's status line while a batch is indexed, in headless Chromium (as in
    test_page.py: Debian's chromium, skipped where there is none outside CI)."""
    if os.environ.get("CI"):
        import playwright.sync_api as sync_api
    else:
        sync_api = pytest.importorskip("playwright.sync_api")
    from liveserver import serving
    from test_page import CHROMIUM_ARGS, chromium

    executable = chromium()
    if executable is None and not os.environ.get("CI"):
        pytest.skip("no Chromium found (apt-get install chromium, or set MMSEARCH_CHROMIUM)")
    home, root = library
    service = SearchService(resolve(home=home, index="live"))
    service.watch(lambda _: None, **{**FAST, "settle": 3.0})  # the batch shows for 3 s at least
    try:
        with serving(create_app(service, Access("127.0.0.1", None)), "warning") as port, \
                sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=executable, headless=True,
                                                 args=CHROMIUM_ARGS)
            page = browser.new_page(base_url=f"http://127.0.0.1:{port}")
            page.set_default_timeout(DEADLINE_S * 1000)
            bad: list[str] = []
            page.on("response", lambda r: r.status < 400 or bad.append(f"{r.status} {r.url}"))
            page.goto("/")
            page.wait_for_selector("#watch:has-text('watching for new photos')")
            assert "12 photos" in page.text_content("#info")
            (root / "new").mkdir()
            for src in flickr_images[:20]:
                shutil.copy(src, root / "new" / src.name)
            indexing = re.compile(r"indexing \d+ new photos?…")  # one batch, two on a slow copy
            page.locator("#watch", has_text=indexing).wait_for()
            page.wait_for_selector("#info:has-text('32 photos')")
            page.wait_for_selector("#watch:has-text('watching for new photos')")
            assert bad == []  # every look at /api/info answered, during the batch too
            browser.close()
    finally:
        service.close()


def test_index_watch_keeps_watching_until_ctrl_c(library: tuple[Path, Path]) -> None:
    """`mmsearch index ROOT --watch` as a user runs it (production quiet and settle times)."""
    import signal
    import subprocess

    home, root = library
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmsearch", "index", str(root), "--watch", "--home", str(home),
         "--index", "live"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")),
                              daemon=True)
    reader.start()
    try:
        wait_for(lambda: any("watching 1 folder" in line for line in lines), 60, "started")
        assert any("unchanged 12" in line for line in lines)
        tinyclip.draw_shape("red", "triangle", seed=99).save(root / "a" / "late.png")
        wait_for(lambda: any("watch: added 1," in line for line in lines), why="one batch line")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(5)
    assert not any("Traceback" in line for line in lines), lines
