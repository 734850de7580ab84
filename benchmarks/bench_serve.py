"""`mmsearch serve` over HTTP: warm query latency against the library, and a bounded load test.

    python benchmarks/bench_serve.py                     # both parts, full size
    python benchmarks/bench_serve.py --latency [--n 100000] [--queries 200]
    python benchmarks/bench_serve.py --load [--clients 16] [--seconds 30]
    python benchmarks/bench_serve.py --latency --n 5000 --queries 20   # a quick check
    python benchmarks/bench_serve.py --load --clients 4 --seconds 5    # a quick check

Every request goes to the server this script starts on 127.0.0.1 (a free port)
as ``python -m mmsearch serve --home H --index NAME --port P --device cpu``; it
is ready when ``GET /healthz`` answers (at most 180 s: it loads ViT-B-32) and is
stopped (SIGINT, then terminate) at the end. Model: ViT-B-32 with random weights
(``--pretrained none``: no weights offline; the speed is the same).

--latency (results/serve_latency.{txt,json}). Index: ``--n`` synthetic clustered
512-d vectors (the ``bench_index_scale`` mixture) written through the Store under
fake paths, with the model identity of ViT-B-32/none, the index type automatic
(HNSW at 100k); built once under ``<home>/bench_serve_<n>/`` and reused (rebuilt
when a build was interrupted). One keep-alive ``http.client`` connection sends
``GET /api/search?q=<caption>&k=10`` for ``--queries`` distinct Flickr8k captions
(dataset_flickr8k_1k.json), one at a time; the wall time of each request is
recorded (request sent .. body read). Baseline in the same run: the library
call the endpoint makes, ``SearchService(resolve(home, index, device="cpu"))
.search(parse(q), 10, 0, Filters())``, in this process, for the same captions.
Both are warm (model loaded, five other captions first) and take turns query by
query (HTTP then library, library then HTTP on the next caption), so they never
run at the same time and drifting load from other work hits both alike. The
HTTP overhead is the difference of the p50s (also the median of the per-caption
differences); the target is <= 5 ms. It holds everything the server adds:
uvicorn/FastAPI/middleware, JSON, and the search running in one of FastAPI's
worker threads instead of a main thread. ``GET /healthz`` times show the floor
of the HTTP stack alone.

--load (results/serve_load.{txt,json}). Index ``bench-load`` under the home: the
first 800 photos of Flickr8k-1k copied to ``<home>/bench_serve_photos/a/``
(the other 200 to ``.../b/``), indexed with ``mmsearch index a --model ViT-B-32
--pretrained none`` once; that index is kept as a snapshot and restored before
every run, so each run starts with 800 photos and no thumbnails (cold cache).
``--clients`` threads, each with its own keep-alive connection and a 30 s
timeout per request, send requests for ``--seconds`` (at most 200,000 in all):
50% ``/api/search?q=<caption>&k=20``, 20% ``/api/similar/<random id>?k=20``,
20% ``/thumb/<random id>`` (ids of the 800), 10% ``POST /api/search/image?k=20`` of
one of 20 photos of ``b/`` (multipart, as the page sends it). At 10% of the run a
concurrent ``mmsearch index b --index bench-load`` (another process, as a user
would run it) starts; it is let finish after the load. Reported: requests/s overall and
per kind, p50/p99 per kind (and while the indexer ran), thumbnails/s (first
request of a photo, which makes its thumbnail, vs repeats), every error (a
status other than 200 or an exception: should be none), how many thumbnails
were made (files under the index's thumbs/ before and after), and afterwards
that the concurrent index lost nothing (``/api/info`` images and the search
``total`` are 1000, paging ``k=500&offset=`` gives 1000 distinct ids) and that
the new photos are searchable (``/api/similar/<id>`` of each of the 200 returns
it first). Baseline in the same run, before the load: one client, nothing else
running, 20 searches, 20 similar, 10 thumbnails cold then the same 10 warm, 10 uploads.
The client threads run on the same 2 cores as the server and take part of them.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import quote

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from _machine import load_avg, machine_info, machine_text, write_results  # noqa: E402

FLICKR = ROOT.parent / "shared" / "data" / "flickr8k-1k"
ARCH, WEIGHTS, DIM, CHUNK = "ViT-B-32", "none", 512, 20_000
LOAD_INDEX, SPLIT, PHOTOS = "bench-load", 800, 1000
MIX = (("search", 0.5), ("similar", 0.2), ("thumb", 0.2), ("upload", 0.1))
UPLOAD_PATH, BOUNDARY, UPLOADS = "/api/search/image?k=20", "bench-serve-upload", 20
WARM, READY_S, TIMEOUT_S, MAX_REQUESTS = 5, 180, 30, 200_000


def progress(msg: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def stats(ms: list[float]) -> dict:
    if not ms:
        return {"n": 0, "p50_ms": None, "p99_ms": None, "mean_ms": None}
    a = np.asarray(ms)
    return {"n": len(ms), "p50_ms": round(float(np.percentile(a, 50)), 2),
            "p99_ms": round(float(np.percentile(a, 99)), 2), "mean_ms": round(float(a.mean()), 2)}


def fmt(v: float | None, width: int = 9) -> str:
    return f"{'-':>{width}}" if v is None else f"{v:>{width}.2f}"


# -- fixtures --------------------------------------------------------------------------
def captions(n: int) -> list[str]:
    """``n`` distinct Flickr8k captions in a fixed random order, each a valid query."""
    from mmsearch.errors import UsageError
    from mmsearch.search.syntax import parse

    data = json.loads((FLICKR / "dataset_flickr8k_1k.json").read_text())
    seen, out = set(), []
    for img in data["images"]:
        for s in img["sentences"]:
            text = " ".join(s["raw"].split())
            if text and text.lower() not in seen:
                seen.add(text.lower())
                out.append(text)
    rng = np.random.default_rng(0)
    picked = []
    for i in rng.permutation(len(out)):
        try:
            parse(out[i], is_file=lambda _: False)  # as the server parses q
        except UsageError:
            continue
        picked.append(out[i])
        if len(picked) == n:
            break
    return picked


def build_index(root: Path, n: int) -> None:
    """``n`` synthetic vectors under fake paths with ViT-B-32/none's identity (built once)."""
    from bench_index_scale import Mixture

    from mmsearch.models.identity import identify
    from mmsearch.store import ImageFile, Store

    if (root / "bench_built").is_file():
        return
    if root.exists():  # a build that was interrupted: start again
        shutil.rmtree(root)
    mix = Mixture(DIM, max(10, min(10_000, n // 100)), 0.75, 1)
    store = Store.open(root, create=True)
    store.lock()
    store.set_model(identify(ARCH, WEIGHTS), DIM)
    t0 = time.perf_counter()
    for start in range(0, n, CHUNK):
        vecs = mix.draw(start // CHUNK, min(CHUNK, n - start))
        files = [ImageFile(f"/bench/{i:07d}.jpg", 1000, 0, f"h{i:07d}", {"ext": "jpg"})
                 for i in range(start, start + len(vecs))]
        store.put_images(files, vecs)
        progress(f"catalog {start + len(vecs):,}/{n:,}")
    store.retype("auto")
    store.flush()
    progress(f"built in {time.perf_counter() - t0:.0f} s ({store.image_index})")
    store.unlock()
    store.close()
    (root / "bench_built").write_text("ok")


def mmsearch_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("mmsearch")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "mmsearch"]


def copy_photos(home: Path) -> tuple[Path, Path]:
    """The first 800 Flickr8k-1k photos in ``a/``, the other 200 in ``b/`` (copied once)."""
    base = home / "bench_serve_photos"
    a, b = base / "a", base / "b"
    if not (base / "copied").is_file():
        shutil.rmtree(a, ignore_errors=True)
        shutil.rmtree(b, ignore_errors=True)
        a.mkdir(parents=True)
        b.mkdir(parents=True)
        photos = sorted((FLICKR / "images").glob("*.jpg"))
        assert len(photos) == PHOTOS, f"expected {PHOTOS} photos in {FLICKR / 'images'}"
        for i, p in enumerate(photos):
            shutil.copyfile(p, (a if i < SPLIT else b) / p.name)
        (base / "copied").write_text("ok")
    return a, b


def load_index(home: Path, a: Path) -> dict:
    """Index ``bench-load`` holding the 800 photos of ``a`` and no thumbnails: restored from a
    snapshot, made (``mmsearch index a``) the first time."""
    root, snap = home / LOAD_INDEX, home / "bench_serve_photos" / "index-a.snapshot"
    made = None
    if not (snap / "bench_built").is_file():
        shutil.rmtree(snap, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
        progress(f"indexing {SPLIT} photos into {LOAD_INDEX} (once)")
        made = run_index(home, a, ["--model", ARCH, "--pretrained", WEIGHTS])
        if made["rc"] != 0:
            raise SystemExit(f"mmsearch index failed: {made['output'][-2000:]}")
        shutil.copytree(root, snap)
        (snap / "bench_built").write_text("ok")
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(snap, root, ignore=shutil.ignore_patterns("bench_built"))
    return {"made_now": made}


def run_index(home: Path, folder: Path, extra: list[str]) -> dict:
    """``mmsearch index folder`` in a new process, to its end."""
    proc = start_index(home, folder, extra)
    return finish_index(proc, time.perf_counter())


def start_index(home: Path, folder: Path, extra: list[str] = ()) -> subprocess.Popen:
    cmd = mmsearch_cmd() + ["index", str(folder), "--index", LOAD_INDEX, "--home", str(home),
                            "--device", "cpu", "--json", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def finish_index(proc: subprocess.Popen, t0: float, timeout: float = 1800) -> dict:
    out, _ = proc.communicate(timeout=timeout)
    result = {"rc": proc.returncode, "seconds": round(time.perf_counter() - t0, 1),
              "output": out}
    try:
        result["report"] = json.loads(out[out.index("{"):])
    except ValueError:
        result["report"] = None
    return result


# -- server and client -----------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """``mmsearch serve`` in a child process on 127.0.0.1, for a ``with`` block."""

    def __init__(self, home: Path, index: str) -> None:
        self.home, self.index, self.port = home, index, free_port()
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Server":
        cmd = [sys.executable, "-m", "mmsearch", "serve", "--home", str(self.home),
               "--index", self.index, "--port", str(self.port), "--device", "cpu"]
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            self._wait_ready(t0)
        except BaseException:
            self.__exit__()
            raise
        self.ready_s = round(time.perf_counter() - t0, 1)
        progress(f"server on 127.0.0.1:{self.port} ready in {self.ready_s} s")
        return self

    def _wait_ready(self, t0: float) -> None:
        while time.perf_counter() - t0 < READY_S:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited ({self.proc.returncode}):\n{self.output()}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/healthz")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                pass
            finally:
                conn.close()
            time.sleep(0.5)
        raise SystemExit(f"the server was not ready after {READY_S} s:\n{self.output()}")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()[-4000:]

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        self.log.close()


class Client:
    """One keep-alive connection to the server; ``get`` returns (status, body, wall ms).

    uvicorn closes a connection idle for 5 s: one idle for ``IDLE_S`` is replaced before
    the next request (outside its time), as browsers do, rather than found closed."""

    IDLE_S = 3.0

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT_S)
        self.used = 0.0

    def get(self, path: str) -> tuple[int, bytes, float]:
        return self.send("GET", path)

    def upload(self, body: bytes) -> tuple[int, bytes, float]:
        """``POST /api/search/image`` of a multipart body made by :func:`upload_body`."""
        return self.send("POST", UPLOAD_PATH, body,
                         {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})

    def send(self, method: str, path: str, body: bytes | None = None,
             headers: dict | None = None) -> tuple[int, bytes, float]:
        if self.conn.sock is None or time.perf_counter() - self.used > self.IDLE_S:
            self.conn.close()
            self.conn.connect()
        t0 = time.perf_counter()
        try:
            self.conn.request(method, path, body=body, headers=headers or {})
            response = self.conn.getresponse()
            body = response.read()
        except BaseException:
            self.conn.close()  # the next request opens a new connection
            raise
        self.used = time.perf_counter()
        return response.status, body, (self.used - t0) * 1000

    def json(self, path: str) -> dict:
        status, body, _ = self.get(path)
        if status != 200:
            raise RuntimeError(f"GET {path}: {status} {body[:300]!r}")
        return json.loads(body)

    def close(self) -> None:
        self.conn.close()


def search_path(caption: str, k: int) -> str:
    return f"/api/search?q={quote(caption)}&k={k}"


def upload_body(photo: Path) -> bytes:
    """A photo as the page sends it: the multipart/form-data field ``file``."""
    head = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; '
            f'filename="{photo.name}"\r\nContent-Type: image/jpeg\r\n\r\n').encode()
    return head + photo.read_bytes() + f"\r\n--{BOUNDARY}--\r\n".encode()


# -- part 1: latency -------------------------------------------------------------------
def run_latency(args) -> None:
    info = machine_info()
    name = f"bench_serve_{args.n}"
    build_index(args.home / name, args.n)
    caps = captions(args.queries + 2 * WARM)
    warm_http, warm_lib, caps = caps[:WARM], caps[WARM:2 * WARM], caps[2 * WARM:]
    with Server(args.home, name) as server:
        client = Client(server.port)
        index_type = client.json("/api/info")["index_type"]
        svc, search = library(args.home, name)
        for c in warm_lib:
            search(c)
        for c in warm_http:
            client.json(search_path(c, 10))
        progress(f"measuring {len(caps)} captions, HTTP and library in turn")
        http_ms, lib_ms = alternate(client, search, caps)
        floor = [client.get("/healthz")[2] for _ in range(50)]
        client.close()
        svc.close()
    info["load_avg_end"] = load_avg()
    report_latency(args, info, index_type, server.ready_s, http_ms, lib_ms, floor)


def library(home: Path, name: str):
    """The service the server runs, in this process, and its search as the endpoint calls it."""
    from mmsearch.search.filters import Filters
    from mmsearch.search.syntax import parse
    from mmsearch.serve.service import SearchService
    from mmsearch.settings import resolve

    svc = SearchService(resolve(home=home, index=name, device="cpu"))
    return svc, lambda q: svc.search(parse(q, is_file=lambda _: False), 10, 0, Filters())


def alternate(client: Client, search, caps: list[str]) -> tuple[list[float], list[float]]:
    """Per caption: one HTTP request and one library call, their order swapped every caption."""
    http_ms, lib_ms = [], []
    for i, c in enumerate(caps):
        for which in ((0, 1) if i % 2 == 0 else (1, 0)):
            if which == 0:
                status, body, ms = client.get(search_path(c, 10))
                if status != 200 or len(json.loads(body)["hits"]) != 10:
                    raise RuntimeError(f"GET /api/search for {c!r}: {status} {body[:300]!r}")
                http_ms.append(ms)
            else:
                t0 = time.perf_counter()
                hits = search(c)["hits"]
                lib_ms.append((time.perf_counter() - t0) * 1000)
                assert len(hits) == 10
    return http_ms, lib_ms


def report_latency(args, info, index_type, ready_s, http_ms, lib_ms, floor) -> None:
    h, lib, fl = stats(http_ms), stats(lib_ms), stats(floor)
    overhead = h["p50_ms"] - lib["p50_ms"]
    paired = float(np.median(np.asarray(http_ms) - np.asarray(lib_ms)))
    lines = [f"# bench_serve --latency: warm text query, {args.n:,} vectors of {DIM}-d "
             f"({index_type}), ViT-B-32 random weights, {len(http_ms)} distinct Flickr8k captions, "
             f"k=10, device cpu", machine_text(info),
             f"# baseline: library SearchService.search p50 {lib['p50_ms']:.2f} ms (same run, same "
             f"captions, taking turns with the HTTP requests)", "",
             f"{'':<40}{'p50 ms':>9}{'p99 ms':>9}{'mean ms':>9}",
             *[f"{label:<40}{fmt(r['p50_ms'])}{fmt(r['p99_ms'])}{fmt(r['mean_ms'])}" for label, r in (
                 ("HTTP GET /api/search (keep-alive)", h), ("library SearchService.search", lib),
                 ("HTTP GET /healthz (no search)", fl))],
             "", f"HTTP overhead: {overhead:.2f} ms at p50 (difference of the p50s); "
             f"{paired:.2f} ms median of the per-caption differences; target <= 5 ms p50: "
             f"{'met' if overhead <= 5 else 'NOT met'}",
             f"server ready (GET /healthz) {ready_s} s after start"]
    text = "\n".join(lines)
    print(text)
    write_results("serve_latency", text, {
        "machine": info, "n": args.n, "index_type": index_type, "queries": len(http_ms),
        "http": h, "library": lib, "healthz": fl, "overhead_p50_ms": round(overhead, 2),
        "overhead_paired_median_ms": round(paired, 2), "server_ready_s": ready_s,
        "http_ms": http_ms, "library_ms": lib_ms})


# -- part 2: load ----------------------------------------------------------------------
class Load:
    """Shared state of the client threads: the deadline, the request cap, the results."""

    def __init__(self, port: int, ids: list[int], caps: list[str], seconds: float,
                 thumbed: set[int], uploads: list[bytes]) -> None:
        self.port, self.ids, self.caps, self.uploads = port, ids, caps, uploads
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + seconds
        self.lock = threading.Lock()
        self.sent, self.thumbed = 0, set(thumbed)  # ids whose thumbnail is already made
        self.rows: list[tuple[str, float, float, bool]] = []  # kind, start s, ms, first thumb
        self.errors: list[dict] = []
        self.elapsed = float(seconds)

    def take(self) -> bool:
        with self.lock:
            if time.perf_counter() >= self.deadline or self.sent >= MAX_REQUESTS:
                return False
            self.sent += 1
            return True

    def first_thumb(self, image_id: int) -> bool:
        with self.lock:
            first = image_id not in self.thumbed
            self.thumbed.add(image_id)
            return first


def pick(rng: random.Random, load: Load) -> tuple[str, str, int | None]:
    kind = rng.choices([k for k, _ in MIX], [w for _, w in MIX])[0]
    if kind == "search":
        return kind, search_path(rng.choice(load.caps), 20), None
    if kind == "upload":  # the path names which of load.uploads
        return kind, str(rng.randrange(len(load.uploads))), None
    image_id = rng.choice(load.ids)
    path = f"/api/similar/{image_id}?k=20" if kind == "similar" else f"/thumb/{image_id}"
    return kind, path, image_id


def worker(load: Load, seed: int) -> None:
    rng, client, rows = random.Random(seed), Client(load.port), []
    while load.take():
        kind, path, image_id = pick(rng, load)
        first = kind == "thumb" and load.first_thumb(image_id)
        start = time.perf_counter() - load.t0
        try:
            status, body, ms = (client.upload(load.uploads[int(path)]) if kind == "upload"
                                else client.get(path))
        except Exception as exc:  # noqa: BLE001 - every failure is reported
            load.errors.append({"kind": kind, "path": path, "at_s": round(start, 2),
                                "error": repr(exc)})
            continue
        if status != 200 or not body:
            load.errors.append({"kind": kind, "path": path, "at_s": round(start, 2),
                                "status": status, "body": body[:300].decode("utf-8", "replace")})
            continue
        rows.append((kind, start, ms, first))
    client.close()
    with load.lock:
        load.rows += rows


def run_load(args) -> None:
    info = machine_info()
    a, b = copy_photos(args.home)
    prepared = load_index(args.home, a)
    caps = captions(400)
    with Server(args.home, LOAD_INDEX) as server:
        client = Client(server.port)
        for c in caps[:WARM]:
            client.json(search_path(c, 20))
        ids = sorted(paged_ids(client, caps[0], SPLIT))
        uploads = [upload_body(p) for p in sorted(b.glob("*.jpg"))[:UPLOADS]]
        base, thumbed = baseline(client, caps[WARM:], ids, uploads)
        thumbs_before = count_thumbs(args.home)
        load, index = loaded(args, server.port, ids, caps, b, thumbed, uploads)
        after = checks(client, caps[0], b)
        client.close()
    thumbs_after = count_thumbs(args.home)
    info["load_avg_end"] = load_avg()
    report_load(args, info, server.ready_s, prepared, base, load, index, after,
                (thumbs_before, thumbs_after))


def paged_ids(client: Client, caption: str, total: int) -> dict[int, str]:
    """id -> path of every image, by paging a search 500 at a time."""
    out: dict[int, str] = {}
    for offset in range(0, total, 500):
        page = client.json(search_path(caption, 500) + f"&offset={offset}")
        out.update((h["id"], h["path"]) for h in page["hits"])
    return out


def baseline(client: Client, caps: list[str], ids: list[int],
             uploads: list[bytes]) -> tuple[dict, list[int]]:
    """One client, nothing else running: search, similar, thumbnails cold then warm,
    uploads (photos not in the index); also the ids whose thumbnails it made."""
    rng = random.Random(1)
    some = rng.sample(ids, 30)
    runs = {"search": [search_path(c, 20) for c in caps[:20]],
            "similar": [f"/api/similar/{i}?k=20" for i in some[:20]],
            "thumb (cold)": [f"/thumb/{i}" for i in some[20:]],
            "thumb (warm)": [f"/thumb/{i}" for i in some[20:]],
            "upload": list(range(min(10, len(uploads))))}
    out = {}
    for kind, paths in runs.items():
        ms = []
        for p in paths:
            status, body, t = client.upload(uploads[p]) if kind == "upload" else client.get(p)
            if status != 200:
                raise RuntimeError(f"baseline GET {p}: {status} {body[:300]!r}")
            ms.append(t)
        out[kind] = stats(ms)
    return out, some[20:]


def loaded(args, port: int, ids: list[int], caps: list[str], b: Path,
           thumbed: list[int], uploads: list[bytes]) -> tuple[Load, dict]:
    """The load, with ``mmsearch index b`` started at 10% of it and let finish."""
    progress(f"load: {args.clients} clients for {args.seconds} s")
    load = Load(port, ids, caps, args.seconds, set(thumbed), uploads)
    threads = [threading.Thread(target=worker, args=(load, i), daemon=True)
               for i in range(args.clients)]
    for t in threads:
        t.start()
    time.sleep(args.seconds * 0.1)
    started = time.perf_counter()
    proc = start_index(args.home, b)
    ended = {}
    waiter = threading.Thread(target=lambda: (proc.wait(), ended.setdefault(
        "at", time.perf_counter())), daemon=True)
    waiter.start()
    for t in threads:
        t.join()
    load.elapsed = time.perf_counter() - load.t0
    progress(f"load done: {len(load.rows)} requests, {len(load.errors)} errors; "
             "waiting for the indexer")
    index = finish_index(proc, started)
    waiter.join()
    index["start_s"] = round(started - load.t0, 2)
    index["end_s"] = round(ended.get("at", time.perf_counter()) - load.t0, 2)
    return load, index


def checks(client: Client, caption: str, b: Path) -> dict:
    """After the concurrent index: all 1000 photos there, each new one found by itself."""
    info = client.json("/api/info")
    total = client.json(search_path(caption, 1))["total"]
    paths = paged_ids(client, caption, PHOTOS + 500)
    new = sorted(i for i, p in paths.items() if Path(p).parent.name == b.name)
    first = [client.json(f"/api/similar/{i}?k=5")["hits"][0]["id"] == i for i in new]
    return {"info_images": info["images"], "search_total": total, "paged_distinct": len(paths),
            "from_b": len(new), "b_found_first": sum(first), "index_type": info["index_type"]}


def count_thumbs(home: Path) -> int:
    return sum(1 for _ in (home / LOAD_INDEX / "thumbs").rglob("*.webp"))


def load_rows(load: Load, index: dict) -> list[dict]:
    """Per kind: count, requests/s, p50/p99 over the run and while the indexer ran."""
    during = (index["start_s"], index["end_s"])
    out = []
    for kind in [k for k, _ in MIX] + ["all"]:
        rows = [r for r in load.rows if kind in ("all", r[0])]
        busy = [r[2] for r in rows if during[0] <= r[1] < during[1]]
        out.append({"kind": kind, **stats([r[2] for r in rows]),
                    "per_s": round(len(rows) / load.elapsed, 1),
                    "while_indexing": stats(busy)})
    thumbs = [r for r in load.rows if r[0] == "thumb"]
    out.append({"kind": "thumb, first", **stats([r[2] for r in thumbs if r[3]]),
                "per_s": round(sum(r[3] for r in thumbs) / load.elapsed, 1)})
    out.append({"kind": "thumb, repeat", **stats([r[2] for r in thumbs if not r[3]]),
                "per_s": round(sum(not r[3] for r in thumbs) / load.elapsed, 1)})
    return out


def report_load(args, info, ready_s, prepared, base, load, index, after, thumbs) -> None:
    rows = load_rows(load, index)
    ok = (after["info_images"] == after["search_total"] == after["paged_distinct"] == PHOTOS
          and after["b_found_first"] == after["from_b"] == PHOTOS - SPLIT and not load.errors
          and index["rc"] == 0)
    rep = index.get("report") or {}
    lines = [f"# bench_serve --load: {args.clients} clients x {args.seconds} s against `mmsearch "
             f"serve` on 127.0.0.1 (index {LOAD_INDEX}: {SPLIT} Flickr8k photos, ViT-B-32 random "
             f"weights, device cpu); mix {', '.join(f'{w:.0%} {k}' for k, w in MIX)}; "
             f"`mmsearch index` of {PHOTOS - SPLIT} more photos started at "
             f"{index['start_s']} s", machine_text(info),
             "# baseline (same run, before the load, one client alone): " + ", ".join(
                 f"{k} p50 {v['p50_ms']:.1f} ms" for k, v in base.items()), "",
             f"{'kind':<16}{'requests':>9}{'per s':>8}{'p50 ms':>9}{'p99 ms':>9}"
             f"{'p50 idx':>9}{'p99 idx':>9}"]
    for r in rows:
        busy = r.get("while_indexing") or {}
        lines.append(f"{r['kind']:<16}{r['n']:>9}{r['per_s']:>8.1f}{fmt(r['p50_ms'])}"
                     f"{fmt(r['p99_ms'])}{fmt(busy.get('p50_ms'))}{fmt(busy.get('p99_ms'))}")
    lines += ["(idx: requests started while the concurrent `mmsearch index` ran; thumb, first: the "
              "first request of a photo in the run, which makes its thumbnail unless another "
              "client's request just did)", "",
              f"load: {load.elapsed:.1f} s, {len(load.rows) + len(load.errors)} requests, "
              f"{len(load.errors)} errors",
              *[f"  error: {e}" for e in load.errors[:50]],
              f"thumbnails in the cache: {thumbs[0]} before the load, {thumbs[1]} after "
              f"({thumbs[1] - thumbs[0]} made during it); {rows[2]['per_s']:.1f} thumbnails/s served",
              f"concurrent index: rc {index['rc']}, {index['start_s']} .. {index['end_s']} s of the "
              f"run ({index['seconds']} s), added {rep.get('added')}, embedded "
              f"{rep.get('embedded')} at {rep.get('images_per_second', 0):.1f} images/s",
              f"after: /api/info images {after['info_images']}, search total "
              f"{after['search_total']}, {after['paged_distinct']} distinct ids paging k=500; "
              f"{after['b_found_first']}/{after['from_b']} new photos first in their own "
              f"/api/similar -- {'OK' if ok else 'PROBLEM'}",
              f"server ready (GET /healthz) {ready_s} s after start"]
    if index["rc"] != 0:
        lines.append("index output: " + index["output"][-1500:])
    text = "\n".join(lines)
    print(text)
    write_results("serve_load", text, {
        "machine": info, "clients": args.clients, "seconds": args.seconds, "baseline": base,
        "rows": rows, "errors": load.errors, "elapsed_s": round(load.elapsed, 2),
        "thumbs_before": thumbs[0], "thumbs_after": thumbs[1], "after": after, "ok": ok,
        "index": {k: v for k, v in index.items() if k != "output"},
        "prepared": prepared, "server_ready_s": ready_s})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency", action="store_true", help="Only the latency part.")
    parser.add_argument("--load", action="store_true", help="Only the load part.")
    parser.add_argument("--n", type=int, default=100_000, help="Vectors in the latency index.")
    parser.add_argument("--queries", type=int, default=200, help="Captions timed (latency).")
    parser.add_argument("--clients", type=int, default=16, help="Client threads (load).")
    parser.add_argument("--seconds", type=float, default=30, help="Length of the load.")
    parser.add_argument("--home", type=Path, default=ROOT / "indexes",
                        help="Where the benchmark indexes and photo copies live (gitignored).")
    args = parser.parse_args()
    args.home = args.home.resolve()
    if not (args.latency or args.load):
        args.latency = args.load = True
    if args.latency:
        run_latency(args)
    if args.load:
        run_load(args)


if __name__ == "__main__":
    main()
