"""The HTTP API of `mmsearch serve`: search, similar, upload, texts, thumbnails, originals,
its errors, and its security (Host check, token, files by id only, traversal)."""

from __future__ import annotations

import http.client
import io
import shutil
from pathlib import Path

import pytest
from conftest import draw_shapes
from liveserver import serving
from fastapi.testclient import TestClient
from PIL import Image

import tinyclip
from mmsearch import Engine
from mmsearch.serve.app import create_app
from mmsearch.serve.security import COOKIE, Access
from mmsearch.serve.service import SearchService
from mmsearch.settings import resolve


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory, tiny_model: tuple[Path, Path],
            flickr_images: list[Path]) -> tuple[Path, Path]:
    """(home, photo folder): 24 shapes, 3 real photos, a symlink to a photo outside, texts."""
    root = tmp_path_factory.mktemp("serve")
    folder = root / "photos"
    draw_shapes(folder / "shapes")
    (folder / "real").mkdir()
    for src in flickr_images[:3]:
        shutil.copy(src, folder / "real" / src.name)
    outside = root / "outside.png"
    tinyclip.draw_shape("red", "circle", seed=80).save(outside)
    (folder / "link-out.png").symlink_to(outside)
    config, ckpt = tiny_model
    with Engine.open("web", home=root / "home", model=str(config), pretrained=str(ckpt)) as e:
        e.index([folder])
        e.add_texts([tinyclip.caption(c, s) for c, s in tinyclip.combos()])
    return root / "home", folder


@pytest.fixture(scope="module")
def service(library: tuple[Path, Path]):
    svc = SearchService(resolve(home=library[0], index="web"))
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def client(service: SearchService) -> TestClient:
    return TestClient(create_app(service, Access("127.0.0.1", None)), base_url="http://127.0.0.1:8000")


def test_the_server_readies_the_text_tower_before_its_first_query(library) -> None:
    """At start, not on its second query: the numpy text tower goes over to ONNX Runtime's
    graph (the server answers many texts), and its first answer comes from there."""
    svc = SearchService(resolve(home=library[0], index="web"))
    try:
        tower = svc.engine.text_embedder._tower
        assert tower.runtime == "onnxruntime"
        hits = svc._run(svc.engine.search, "a red circle", k=2)
        assert Path(hits[0].path).name.startswith(("red_circle_", "link-out"))
    finally:
        svc.close()


def _ids(response) -> list[int]:
    assert response.status_code == 200, response.text
    return [h["id"] for h in response.json()["hits"]]


def test_search_pages_and_the_query_language(client: TestClient, library) -> None:
    r = client.get("/api/search", params={"q": "a red circle", "k": 4})
    data = r.json()
    assert data["query"] == "a red circle" and data["total"] == 28
    hits = data["hits"]
    assert [h["rank"] for h in hits] == [1, 2, 3, 4]
    assert Path(hits[0]["path"]).name.startswith(("red_circle_", "link-out"))  # all red circles
    assert hits[0]["thumbnail"] == f"/thumb/{hits[0]['id']}" and hits[0]["ext"] == "png"
    page2 = _ids(client.get("/api/search", params={"q": "a red circle", "k": 4, "offset": 4}))
    both = _ids(client.get("/api/search", params={"q": "a red circle", "k": 8}))
    assert both == [h["id"] for h in hits] + page2
    minus = client.get("/api/search", params={"q": "a red circle - a red square", "k": 2}).json()
    assert all("red_square" not in h["path"] for h in minus["hits"])
    real = client.get("/api/search", params={"q": "a photo", "in": str(library[1] / "real")}).json()
    assert real["total"] == 3 and len(real["hits"]) == 3


@pytest.mark.parametrize("params, status, words", [
    ({"q": ""}, 400, "empty query"),
    ({"q": "a - "}, 400, "ends with an operator"),
    ({"q": "x", "k": 0}, 400, "k must be"),
    ({"q": "x", "after": "July"}, 400, "cannot read the date"),
    ({"q": "/etc/passwd.jpg"}, 400, "no such image file"),
    ({"q": "x", "near": "1,2"}, 400, "go together"),
    ({"q": "x", "k": "abc"}, 400, "k: "),
    ({"q": "id:²"}, 400, "id: takes"),
    ({"q": "id:9223372036854775808"}, 400, "no indexed image has id 9223372036854775808"),
    ({"q": "x", "camera": "x" * 60_000}, 400, "camera: too long"),  # SQLite: LIKE <= 50,000
    ({"q": "x", "in": "a" * 5000}, 400, "in: too long"),
    ({"q": "1e999:dog + cat"}, 400, "weight"),
    ({"q": "1e308:dog + 1e308:cat"}, 400, "weight"),
    ({"q": "x" * 20_000}, 400, "query too long"),
])
def test_bad_requests_are_one_line(client: TestClient, params, status, words) -> None:
    r = client.get("/api/search", params=params)
    assert r.status_code == status and words in r.json()["detail"] and "\n" not in r.json()["detail"]


@pytest.mark.parametrize("period", [{"before": "9999-12-31"}, {"after": "9999"},
                                    {"before": "9999-12"}, {"after": "2000", "before": "9999"}])
def test_dates_at_the_end_of_the_calendar_answer(client: TestClient, period: dict) -> None:
    r = client.get("/api/search", params={"q": "a red circle", **period})
    assert r.status_code == 200, r.text


def test_similar_texts_and_upload(client: TestClient, library) -> None:
    first = client.get("/api/search", params={"q": "a blue triangle", "k": 1}).json()["hits"][0]
    assert _ids(client.get(f"/api/similar/{first['id']}", params={"k": 3}))[0] == first["id"]
    texts = client.get("/api/texts", params={"image_id": first["id"], "k": 2}).json()["hits"]
    assert texts[0]["text"] == "a blue triangle"
    photo = Path(first["path"]).read_bytes()
    up = client.post("/api/search/image", params={"k": 2}, files={"file": ("x.png", photo, "image/png")})
    assert _ids(up)[0] == first["id"]
    for bad in ("/api/similar/99999", "/api/similar/abc", "/api/texts?image_id=-1"):
        assert client.get(bad).status_code == 404


def test_uploads_are_checked(service: SearchService, library) -> None:
    small = TestClient(create_app(service, Access("127.0.0.1", None), max_upload=100_000),
                       base_url="http://localhost")
    r = small.post("/api/search/image", files={"file": ("a.txt", b"hello, not a picture", "text/plain")})
    assert r.status_code == 415 and "not an image" in r.json()["detail"]
    big = small.post("/api/search/image", files={"file": ("b.jpg", b"\xff" * 300_000, "image/jpeg")})
    assert big.status_code == 413
    bomb = io.BytesIO()
    Image.new("L", (12_000, 8_000)).save(bomb, "PNG")  # 96 MP: more than decoding allows
    r = small.post("/api/search/image", files={"file": ("bomb.png", bomb.getvalue(), "image/png")})
    assert r.status_code == 415
    before = {p for p in library[1].rglob("*")}
    assert {p for p in library[1].rglob("*")} == before  # nothing written to the photos


def test_thumbnails_and_originals(client: TestClient, library, service: SearchService) -> None:
    real = client.get("/api/search", params={"q": "a photo", "in": str(library[1] / "real"),
                                             "k": 1}).json()["hits"][0]
    r = client.get(real["thumbnail"])
    assert r.status_code == 200 and r.headers["content-type"] == "image/webp"
    thumb = Image.open(io.BytesIO(r.content))
    assert max(thumb.size) == 320
    assert list(service.thumbs.rglob("*.webp")) and not list(library[1].rglob("*.webp"))
    original = client.get(real["original"])
    assert original.content == Path(real["path"]).read_bytes()
    info = client.get("/api/info").json()
    assert info["images"] == 28 and info["model"].startswith("tinyclip-test")
    assert client.get("/healthz").json() == {"ok": True} and client.get("/").status_code == 200
    assert "mmsearch" in client.get("/docs").text


def test_a_symlink_out_of_the_indexed_folder_is_not_served(client: TestClient, service) -> None:
    rows = dict(service.engine.store.read.all_image_paths())
    link = next(i for i, p in rows.items() if p.endswith("link-out.png"))
    assert client.get(f"/original/{link}").status_code == 404
    assert client.get(f"/thumb/{link}").status_code == 404


def test_host_header_and_token(service: SearchService) -> None:
    open_app = TestClient(create_app(service, Access("127.0.0.1", None)), base_url="http://evil.example")
    assert open_app.get("/api/info").status_code == 400  # DNS rebinding: a foreign Host
    app = create_app(service, Access("0.0.0.0", "s3cret-token"))
    c = TestClient(app, base_url="http://192.0.2.10:8000", follow_redirects=False)
    assert c.get("/api/info").status_code == 401 and c.get("/healthz").status_code == 200
    assert c.get("/api/info", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert c.get("/api/info", headers={"Authorization": "Bearer s3cret-token"}).status_code == 200
    r = c.get("/?q=dog&token=s3cret-token")
    assert r.status_code == 303 and r.headers["location"] == "/?q=dog"
    cookie = r.headers["set-cookie"]
    assert f"{COOKIE}=s3cret-token" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
    c.cookies.set(COOKIE, "s3cret-token")
    assert c.get("/api/info").status_code == 200
    assert "access-control-allow-origin" not in c.get("/api/info", headers={"Origin": "http://x"}).headers


@pytest.fixture(scope="module")
def live(service: SearchService):
    """The app under a real uvicorn server on 127.0.0.1 (for raw HTTP requests)."""
    with serving(create_app(service, Access("127.0.0.1", None))) as port:
        yield port


@pytest.mark.parametrize("path", [
    "/original/../../../../etc/passwd", "/original/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/original/..%2f..%2f..%2fetc%2fpasswd", "/original/%2Fetc%2Fpasswd", "/thumb/..%2fcatalog.sqlite",
    "/original/1/../../catalog.sqlite", "/static/../app.py", "/static/%2e%2e/app.py",
    "/static/..%2fapp.py", "/original/99999", "/thumb/1.5", "/original/-1",
    "/thumb/%C2%B2", "/original/%C2%B2", "/api/similar/%C2%B2", "/api/texts?image_id=%C2%B2",
    "/thumb/%EF%BC%91", "/original/%D9%A1", "/thumb/9223372036854775808", "/thumb/" + "9" * 400,
])
def test_traversal_attempts_get_404_and_no_file(live: int, path: str) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", live, timeout=10)
    conn.putrequest("GET", path, skip_host=True, skip_accept_encoding=True)  # sent verbatim
    conn.putheader("Host", f"127.0.0.1:{live}")
    conn.endheaders()
    response = conn.getresponse()
    body = response.read()
    assert response.status == 404, (path, response.status, body[:200])
    assert b"root:" not in body and b"SQLite format" not in body and b"create_app" not in body


def test_a_damaged_catalog_answers_500_without_the_servers_paths(tmp_path: Path, tiny_model,
                                                                caplog) -> None:
    import sqlite3
    from contextlib import closing

    config, ckpt = tiny_model
    home = tmp_path / "home"
    draw_shapes(tmp_path / "photos", per_combo=1)
    with Engine.open("hurt", home=home, model=str(config), pretrained=str(ckpt)) as e:
        e.index([tmp_path / "photos"])
        some = next(iter(dict(e.store.read.all_image_paths())))
    with closing(sqlite3.connect(home / "hurt" / "catalog.sqlite")) as db, db:
        db.execute("UPDATE images SET path = X'FF' WHERE id = ?", (some,))  # bytes, not text
    svc = SearchService(resolve(home=home, index="hurt"), warm=False)
    try:
        client = TestClient(create_app(svc, Access("127.0.0.1", None)), base_url="http://localhost")
        r = client.get(f"/thumb/{some}")
        assert r.status_code == 500 and r.json() == {"detail": "the index is damaged: run "
                                                     "`mmsearch check` on the server (its log says why)"}
        assert str(tmp_path) in caplog.text  # the log has the details
    finally:
        svc.close()


def test_info_declares_the_filters_for_the_page(client: TestClient) -> None:
    filters = client.get("/api/info").json()["filters"]
    assert filters["camera"]["max_chars"] == 200 and filters["in"]["help"]
    assert set(filters) == {"in", "after", "before", "camera", "ext", "near", "km", "min_score",
                            "sort", "dedup", "type", "moments"}


def test_new_photos_appear_without_a_restart(client: TestClient, library, tiny_model, tmp_path) -> None:
    home, folder = library
    extra = folder / "later"
    extra.mkdir()
    tinyclip.draw_shape("yellow", "square", seed=90).save(extra / "fresh.png")
    config, ckpt = tiny_model
    with Engine.open("web", home=home) as writer:  # as a concurrent `mmsearch index` would
        assert writer.index([extra]).added == 1
    hits = client.get("/api/search", params={"q": "a yellow square", "k": 50}).json()
    assert "fresh.png" in {Path(h["path"]).name for h in hits["hits"]} and hits["total"] == 29


def test_photos_of_an_index_made_before_roots_were_recorded_stay_servable(
        tmp_path: Path, tiny_model) -> None:
    import sqlite3
    from contextlib import closing

    config, ckpt = tiny_model
    old, new = tmp_path / "old", tmp_path / "new"
    draw_shapes(old, per_combo=1)
    draw_shapes(new, per_combo=1)
    home = tmp_path / "home"
    with Engine.open("legacy", home=home, model=str(config), pretrained=str(ckpt)) as e:
        e.index([old])
    with closing(sqlite3.connect(home / "legacy" / "catalog.sqlite")) as db, db:
        db.execute("DELETE FROM meta WHERE key = 'roots'")  # as an older mmsearch left it
    with Engine.open("legacy", home=home) as e:
        e.index([new])
        assert str(old.resolve()) in e.store.roots and str(new.resolve()) in e.store.roots
    svc = SearchService(resolve(home=home, index="legacy"), warm=False)
    try:
        client = TestClient(create_app(svc, Access("127.0.0.1", None)), base_url="http://localhost")
        first = dict(svc.engine.store.read.all_image_paths())
        old_id = next(i for i, p in first.items() if p.startswith(str(old.resolve())))
        assert client.get(f"/original/{old_id}").status_code == 200
    finally:
        svc.close()
