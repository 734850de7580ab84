"""Hostile input, property-based: every parameter and path segment of `mmsearch serve` over real
HTTP, uploads (chunked, oversized, malformed), and the options of `mmsearch query`.

The properties: the server never answers 5xx; every 4xx is one line of JSON ``{"detail": ...}``
with no traceback and none of the server's paths; a 200 ranks with finite scores in order;
the server is healthy afterwards; nothing of an upload is written to disk. The CLI exits 0,
or 2 (1 for a file that is no image) with one line on stderr and no traceback.
"""

from __future__ import annotations

import http.client
import json
import socket
import tempfile
import threading
import time
import warnings
from pathlib import Path
from urllib.parse import quote, urlencode

import pytest
from conftest import draw_shapes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import mmsearch
from mmsearch import Engine
from mmsearch.cli import app as cli_app
from mmsearch.serve.app import MAX_UPLOAD, create_app
from mmsearch.serve.security import Access
from mmsearch.serve.service import SearchService
from mmsearch.settings import resolve

FUZZ = settings(max_examples=120, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# -- strategies ----------------------------------------------------------------------------------
UNICODE_DIGITS = "²³¹¼０１２３٠١٢٣۱۲०१২৩๑໒༢၃፩៣᠑᥇᧑߁𝟎𝟙𝟸"
EDGE_TEXT = ["", " ", "0", "-0", "00", "+1", "1.5", "1e3", "0x10", "1_000", "nan", "NaN", "inf",
             "-inf", "Infinity", "1e999", "-1e999", "1e-999", "9" * 19, "9223372036854775807",
             "9223372036854775808", "18446744073709551616", "-9223372036854775809", "9" * 5000,
             "²", "１", "٣", "𝟙", "½", "Ⅻ", "\x00", "a\x00b", "\n", "\r\n", "\t", "\u202e", "\ufeff",
             "\ufffd", "%", "%%", "%00", "%2e%2e", "..", "../..", "/", "//", "\\", "~", "~root",
             "'", '"', "`", "*", "?", "_", "[", "]", "\\%", "🙂" * 3, "é" * 10, "x" * 100_000,
             "a" * 50_001, "%" * 60_000, "id:", "id:-1", "id:1.5", "id: 1", "id:²", "id:１"]
EDGE_DATES = ["9999", "9999-12", "9999-12-31", "9999-12-31T23:59", "9999-12-31T23:59:59",
              "9999-12-31 23:59", "0000", "0001", "0001-01-01", "1969-12-31T23:59:59", "2023-02-29",
              "2024-02-29", "2023-13", "2023-00", "2023-07-00", "2023-07-32", "2023-07-14T24:00",
              "2023-07-14T23:60", "2023-07-14T23:59:60", "2023-7-4", "２０２３", "2023-0７",
              "20233", "10000", "-2023", "2023-07-14T18:30Z", "2023-07-14T18:30+02:00"]
NUMBERS = ["0", "1", "-1", "50", "500", "501", "10000", "10001", "2147483648", "9" * 30, "1e3",
           "1.0", "nan", "inf", "-inf", "1e309", "-0.0", "0.5", "1.0000001", "-1.0000001",
           "1e-320", "²", "１", "", " 1"]


def _long(draw_char: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.builds(lambda c, n: c * n, draw_char, st.integers(100, 70_000))


TEXT = st.one_of(st.sampled_from(EDGE_TEXT), st.text(max_size=40),
                 st.text(alphabet=UNICODE_DIGITS + "0123456789", min_size=1, max_size=25),
                 _long(st.characters(exclude_categories=("Cs",))))
NUMBER = st.one_of(st.sampled_from(NUMBERS), st.integers(-2**70, 2**70).map(str),
                   st.floats(allow_nan=True, allow_infinity=True).map(repr))
DATE = st.one_of(st.sampled_from(EDGE_DATES), TEXT,
                 st.builds("{:04d}-{:02d}-{:02d}".format, st.integers(0, 9999),
                           st.integers(0, 13), st.integers(0, 32)))
WEIGHT = st.one_of(st.sampled_from(["1e999", "-1e999", "1e308", "1e-308", "0", "100", "100.0001",
                                    "0.001", "0.0009", "-100", "5e-324", "２", "²"]), NUMBER)
ID = st.one_of(st.sampled_from(["²", "１", "٣", "𝟙", "9223372036854775807", "9223372036854775808",
                                "9" * 30, "9" * 5000, "-1", "1.5", "", " 1", "0", "1"]), NUMBER, TEXT)
QUERY = st.one_of(
    st.builds("{}:a red circle + {}:a blue square".format, WEIGHT, WEIGHT),
    st.builds("{}:a red circle".format, WEIGHT), st.builds("id:{}".format, ID),
    st.builds("a red circle - {}:id:{}".format, WEIGHT, ID), TEXT,
    st.lists(st.sampled_from(["a", "+", "-", "id:1", "2:b", "-", "x.jpg"]), max_size=80).map(" ".join))
FILTERS = st.fixed_dictionaries({}, optional={
    "in": TEXT, "after": DATE, "before": DATE, "camera": TEXT, "ext": TEXT,
    "near": st.one_of(TEXT, st.builds("{},{}".format, NUMBER, NUMBER)), "km": NUMBER,
    "min_score": NUMBER, "sort": st.one_of(st.sampled_from(["score", "date", "date-asc"]), TEXT),
    "dedup": st.one_of(st.sampled_from(["1", "0", "true", "on", "no"]), TEXT),
    "k": NUMBER, "offset": NUMBER})
SEGMENT = st.one_of(st.sampled_from(["1", "2", "01", "0001", "%31", "%C2%B2", "%EF%BC%91", "%C0%B1",
                                     "%ED%A0%80", "%FF", "%2531", "1%00", "1;x", "1?x=1"]), ID,
                    st.binary(max_size=12).map(lambda b: "".join(f"%{x:02X}" for x in b)))


# -- the server -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory, tiny_model: tuple[Path, Path],
            flickr_images: list[Path]) -> tuple[Path, Path]:
    """(home, photos): 12 shapes and 2 real photos, indexed."""
    root = tmp_path_factory.mktemp("fuzz")
    folder = root / "photos"
    draw_shapes(folder, per_combo=1)
    for src in flickr_images[:2]:
        (folder / src.name).write_bytes(src.read_bytes())
    config, ckpt = tiny_model
    with Engine.open("fuzz", home=root / "home", model=str(config), pretrained=str(ckpt)) as e:
        e.index([folder])
    return root / "home", folder


class Answer:
    """A response as the properties need it."""

    def __init__(self, request: str, status: int, headers: dict[str, str], body: bytes) -> None:
        self.request, self.status, self.headers, self.body = request, status, headers, body

    def json(self):
        return json.loads(self.body)


class Client:
    """Requests sent verbatim over one keep-alive connection (``http.client``: no URL length
    limit of its own, and paths go out exactly as written)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def request(self, method: str, target: str, body=None, headers: dict | None = None) -> Answer:
        try:
            self.conn.request(method, target, body=body, headers=headers or {},
                              encode_chunked=body is not None and not isinstance(body, bytes))
            r = self.conn.getresponse()
            answer = Answer(f"{method} {target[:300]}", r.status,
                            {k.lower(): v for k, v in r.getheaders()}, r.read())
        except BaseException:
            self.conn.close()
            raise
        if answer.headers.get("connection") == "close":
            self.conn.close()
        return answer

    def get(self, path: str, params: dict | None = None) -> Answer:
        return self.request("GET", path + ("?" + urlencode(params) if params else ""))


@pytest.fixture(scope="module")
def server(library: tuple[Path, Path]):
    """A real uvicorn server over the index on 127.0.0.1; yields a :class:`Client` of it. Its
    h11 parser takes request lines of up to 16 MB, as uvicorn's httptools parser does."""
    import uvicorn

    service = SearchService(resolve(home=library[0], index="fuzz"))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(service, Access("127.0.0.1", None)),
                                        host="127.0.0.1", port=port, log_level="critical",
                                        h11_max_incomplete_event_size=16 << 20))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.05)
    yield Client(port)
    srv.should_exit = True
    thread.join(10)
    service.close()


def _server_paths(library: tuple[Path, Path]) -> list[str]:
    home, photos = library
    return [str(home), str(photos), str(Path(mmsearch.__file__).parent), tempfile.gettempdir()]


def _check(response: Answer, library: tuple[Path, Path]) -> None:
    """The properties every answer keeps (see the module)."""
    what = f"{response.request} -> {response.status}"
    assert response.status < 500, (what, response.body[:500])
    if response.status >= 400:
        assert response.headers["content-type"] == "application/json", (what, response.body[:300])
        body = response.json()
        assert list(body) == ["detail"] and isinstance(body["detail"], str), (what, body)
        detail = body["detail"]
        assert "\n" not in detail and "Traceback" not in detail and len(detail) < 400, (what, body)
        for path in _server_paths(library):
            assert path not in detail, (what, body)
    elif response.headers.get("content-type") == "application/json":
        _check_hits(response.json(), what)


def _check_hits(data: dict, what: str) -> None:
    """A page of hits: ranks in order, finite cosines, best first unless sorted by date."""
    hits = data.get("hits", [])
    ranks = [h["rank"] for h in hits]
    assert ranks == list(range(ranks[0], ranks[0] + len(ranks))) if ranks else True, what
    scores = [h["score"] for h in hits]
    assert all(isinstance(s, float) and -1.001 <= s <= 1.001 for s in scores), (what, scores)
    if "sort=date" not in what:
        assert scores == sorted(scores, reverse=True), (what, scores)


def _healthy(client: Client) -> None:
    assert client.get("/healthz").json() == {"ok": True}
    r = client.get("/api/search", params={"q": "a red circle", "k": 3})
    assert r.status == 200 and len(r.json()["hits"]) == 3


# -- the API ---------------------------------------------------------------------------------------
@FUZZ
@given(q=QUERY, params=FILTERS)
def test_search_parameters(server: Client, library, q: str, params: dict) -> None:
    _check(server.get("/api/search", params={"q": q, **params}), library)


@FUZZ
@given(route=st.sampled_from(["/thumb/", "/original/", "/api/similar/"]), segment=SEGMENT,
       params=FILTERS)
def test_path_segments(server: Client, library, route: str, segment: str, params: dict) -> None:
    raw = segment if "%" in segment else quote(segment, safe="")
    _check(server.get(route + raw, params=params if route == "/api/similar/" else None), library)


@FUZZ
@given(image_id=st.one_of(SEGMENT, TEXT), k=NUMBER)
def test_texts_parameters(server: Client, library, image_id: str, k: str) -> None:
    _check(server.get("/api/texts", params={"image_id": image_id, "k": k}), library)


def _multipart(data: bytes, *, field: str = "file", filename: str = "a.jpg",
               boundary: str = "XyZ") -> tuple[bytes, str]:
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; '
            f'filename="{filename}"\r\nContent-Type: image/jpeg\r\n\r\n').encode("utf-8", "replace")
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


@settings(FUZZ, max_examples=80)
@given(data=st.one_of(st.binary(max_size=2000), st.sampled_from([b"", b"\xff\xd8\xff", b"GIF89a",
                                                                 b"\x89PNG\r\n\x1a\n"])),
       field=st.sampled_from(["file", "photo", "", "file\x00"]), filename=TEXT.map(lambda t: t[:200]),
       content_type=st.sampled_from([None, "", "multipart/form-data", "image/jpeg",
                                     "multipart/form-data; boundary=", "text/plain; boundary=XyZ",
                                     "multipart/form-data; boundary=other"]),
       chunked=st.booleans(), params=FILTERS)
def test_uploads(server: Client, library, data: bytes, field: str, filename: str,
                 content_type: str | None, chunked: bool, params: dict) -> None:
    body, framed = _multipart(data, field=field, filename=filename)
    headers = {"content-type": framed if content_type is None else content_type}
    content = iter([body[:7], body[7:]]) if chunked else body  # an iterator: sent chunked
    _check(server.request("POST", "/api/search/image?" + urlencode(params), content, headers),
           library)


@settings(FUZZ, max_examples=30)
@given(data=st.binary(min_size=1, max_size=300))
def test_malformed_multipart(server: Client, library, data: bytes) -> None:
    r = server.request("POST", "/api/search/image", b"--XyZ\r\n" + data,
                       {"content-type": "multipart/form-data; boundary=XyZ"})
    _check(r, library)
    assert r.status == 400


@pytest.fixture
def temporary_files(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every temporary file or folder made in this process meanwhile: each asks
    ``tempfile.gettempdir`` where (the server runs in this process)."""
    made: list[str] = []
    real = tempfile.gettempdir

    def watched() -> str:
        made.append(real())
        return made[-1]

    monkeypatch.setattr(tempfile, "gettempdir", watched)
    return made


def test_a_chunked_upload_is_refused_as_soon_as_the_limit_arrives(server: Client, library,
                                                                  temporary_files) -> None:
    """No Content-Length: the server counts what arrives and answers 413 once past 25 MB,
    having written nothing to disk."""
    host, port = "127.0.0.1", server.port
    sent, status = 0, None
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall(f"POST /api/search/image HTTP/1.1\r\nHost: {host}:{port}\r\n"
                     "Content-Type: multipart/form-data; boundary=XyZ\r\n"
                     "Transfer-Encoding: chunked\r\n\r\n".encode())
        chunk = b"\xff" * (1 << 20)
        try:
            while sent < 200 << 20 and status is None:
                sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                sent += len(chunk)
                status = _answered(sock)
        except OSError:  # the server closed the connection after answering
            pass
        status = status or _answered(sock, wait=10)
    assert status == 413
    assert sent <= MAX_UPLOAD + (8 << 20), sent  # refused near 25 MB, not after 200 MB
    assert not temporary_files
    _healthy(server)


def _answered(sock: socket.socket, wait: float = 0.0) -> int | None:
    """The status of an answer already sent on ``sock``, if any."""
    sock.settimeout(wait or 0.001)
    try:
        head = sock.recv(64)
    except (BlockingIOError, socket.timeout):
        return None
    finally:
        sock.settimeout(30)
    return int(head.split()[1]) if head.startswith(b"HTTP/1.1 ") else None


def test_a_photo_upload_is_never_written_to_disk(server: Client, library, temporary_files) -> None:
    """A 6 MB photo (FastAPI's UploadFile spooled anything over 1 MB to a temporary file)."""
    import io

    import numpy as np
    from PIL import Image

    noise = np.random.default_rng(0).integers(0, 256, (1400, 1400, 3), dtype=np.uint8)
    png = io.BytesIO()
    Image.fromarray(noise).save(png, "PNG", compress_level=0)
    assert png.tell() > 5 << 20
    body, kind = _multipart(png.getvalue(), filename="noise.png")
    r = server.request("POST", "/api/search/image?k=2", body, {"content-type": kind})
    assert r.status == 200 and len(r.json()["hits"]) == 2
    assert not temporary_files


def test_the_server_is_healthy_after_the_fuzzing(server: Client) -> None:
    _healthy(server)


# -- the CLI ---------------------------------------------------------------------------------------
CLI_FILTERS = st.fixed_dictionaries({}, optional={
    "--in": TEXT, "--after": DATE, "--before": DATE, "--camera": TEXT, "--ext": TEXT,
    "--near": st.one_of(TEXT, st.builds("{},{}".format, NUMBER, NUMBER)),
    "--km": st.floats().map(repr), "--min-score": st.floats().map(repr),
    "--dedup-threshold": st.floats().map(repr), "--k": st.integers(-10, 2**40).map(str),
    "--sort": st.one_of(st.sampled_from(["score", "date"]), TEXT)})


@settings(FUZZ, max_examples=100)
@given(query=QUERY, options=CLI_FILTERS)
def test_cli_query_options(library, query: str, options: dict) -> None:
    args = ["query", "--home", str(library[0]), "--index", "fuzz", "--device", "cpu"]
    args += [f"{flag}={value}" for flag, value in options.items() if "\x00" not in value]
    args += ["--", *query.split(" ")] if query.strip() else []
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # numpy's overflow and invalid-value warnings
        result = CliRunner().invoke(cli_app, args)
    what = (args[7:], result.exit_code, result.stderr[-500:])
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        (what, repr(result.exception))
    assert "Traceback" not in result.output and "Warning" not in result.stderr, what
    if result.exit_code:
        assert result.exit_code in (1, 2), what
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("mmsearch: "), what


@pytest.mark.parametrize("term", ["id:²", "id:１", "id:9223372036854775808", "1e999:dog + cat",
                                  "1e308:dog + 1e308:cat", "-1e-9:dog"])
def test_cli_ids_and_weights_once_mishandled(library, term: str) -> None:
    args = ["query", "--home", str(library[0]), "--index", "fuzz", "--", *term.split(" ")]
    result = CliRunner().invoke(cli_app, args)
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1, result.stderr


@pytest.mark.parametrize("option", [["--before", "9999-12-31"], ["--after", "9999"],
                                    ["--before", "9999-12"], ["--before", "9999-12-31T23:59"]])
def test_cli_dates_at_the_end_of_the_calendar(library, option: list[str]) -> None:
    result = CliRunner().invoke(cli_app, ["query", "--home", str(library[0]), "--index", "fuzz",
                                          *option, "a red circle", "--json"])
    assert result.exit_code == 0, result.stderr
    assert all(-1 <= h["score"] <= 1 for h in json.loads(result.stdout))
