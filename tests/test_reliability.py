"""Reliability: killed runs, Ctrl-C, concurrent readers and writers, damaged files,
full and read-only disks, hostile files and queries.

Real child processes are used where a test is about processes: they are forked
from one server (``reliability_child.py serve``) that imports torch, open_clip
and FAISS once, so a killed run costs a fraction of a second, not an import.
Longer runs of the same tests are marked ``soak`` and run with MMSEARCH_SOAK=1.
"""

from __future__ import annotations

from collections import Counter

import json
import os
import queue
import random
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from conftest import draw_shapes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

import tinyclip
from mmsearch import Engine
from mmsearch.ingest import run as ingest
from mmsearch.store.catalog import Catalog
from mmsearch.cli import app
from mmsearch.ingest.decode import content_hash, load_image
from mmsearch.errors import (CorruptIndexError, DecodeError, EmptyIndexError, IndexLockedError,
                             IndexNotFoundError,
                             MMSearchError, StorageError, UsageError)
from mmsearch.search import search_images, search_texts
from mmsearch.store import Store, lock_holder
from mmsearch.store.vectors import VectorIndex

SOAK = os.environ.get("MMSEARCH_SOAK") == "1"
soak = pytest.mark.soak
needs_soak = pytest.mark.skipif(not SOAK, reason="soak run: set MMSEARCH_SOAK=1")
CHILD = Path(__file__).with_name("reliability_child.py")
runner = CliRunner()


# -- the fork server -------------------------------------------------------------------
class Forker:
    """Talks to ``reliability_child.py serve``: one job at a time, each in a fresh process."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.proc = subprocess.Popen([sys.executable, str(CHILD), "serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self._expect("ready", timeout=180)
        self.jobs = 0
        self.running: int | None = None

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put("eof")

    def _expect(self, prefix: str, timeout: float) -> str:
        line = self.lines.get(timeout=timeout)
        assert line.startswith(prefix), f"expected {prefix!r} from the child server, got {line!r}"
        return line

    def start(self, **job: object) -> int:
        """Start a job; returns its pid. Its stdout/stderr go to files (see :meth:`output`)."""
        if self.running is not None:  # left running by a test that failed: end it first
            try:
                os.kill(self.running, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.wait(self.running)
        self.jobs += 1
        name = f"job{self.jobs}"
        job = {"stdout": str(self.workdir / f"{name}.out"),
               "stderr": str(self.workdir / f"{name}.err"), **job}
        self.current = job
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(job, default=str) + "\n")
        self.proc.stdin.flush()
        self.running = int(self._expect("pid ", timeout=60).split()[1])
        return self.running

    def wait(self, pid: int, timeout: float = 120) -> int:
        """The job's exit code (minus the signal number when killed)."""
        _, got, code = self._expect("exit ", timeout=timeout).split()
        assert int(got) == pid
        self.running = None
        return int(code)

    def done(self) -> bool:
        return not self.lines.empty()

    def output(self) -> tuple[str, str]:
        return (Path(str(self.current["stdout"])).read_text(errors="replace"),
                Path(str(self.current["stderr"])).read_text(errors="replace"))

    def run(self, timeout: float = 120, **job: object) -> tuple[int, str, str]:
        pid = self.start(**job)
        code = self.wait(pid, timeout)
        return (code, *self.output())

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def forker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Forker]:
    server = Forker(tmp_path_factory.mktemp("jobs"))
    yield server
    server.close()


@pytest.fixture(scope="module")
def model(tiny_model: tuple[Path, Path]) -> dict[str, str]:
    config, ckpt = tiny_model
    return {"model": str(config), "pretrained": str(ckpt)}


@pytest.fixture(scope="module")
def embedder_engine(tmp_path_factory: pytest.TempPathFactory, model: dict[str, str]):
    """An engine on a scratch index, used for its model: reference vectors and text queries."""
    with Engine.open("ref", home=tmp_path_factory.mktemp("refhome"), batch_size=4, **model) as e:
        yield e


# -- helpers ------------------------------------------------------------------------------
def catalog_count(root: Path) -> int:
    """Images committed so far, read with plain sqlite3 (0 while there is no catalog yet)."""
    try:
        with closing(sqlite3.connect(f"file:{root / 'catalog.sqlite'}?mode=ro", uri=True,
                                     timeout=10)) as conn:
            return conn.execute("SELECT count(*) FROM images").fetchone()[0]
    except sqlite3.Error:
        return 0


def reference_vectors(engine: Engine, files: list[Path]) -> dict[str, np.ndarray]:
    """content hash -> the vector the model gives that content (computed apart from any index)."""
    from mmsearch.ingest.embed import embed_paths

    out = {}
    for batch in embed_paths(engine.embedder, files, batch_size=64):
        assert not batch.failed
        out.update({content_hash(p): v for p, v in zip(batch.paths, batch.vectors)})
    return out


def assert_consistent(root: Path, refs: dict[str, np.ndarray], allowed_paths: set[str],
                      query: np.ndarray, *, final: bool = False) -> int:
    """Whatever moment a run was killed at, the index opens, answers and agrees with itself.

    Checked: check() finds nothing but staleness an open repairs; after the open the
    FAISS ids are the catalog's, without duplicates, each holding the catalog's vector,
    which is the model's vector for that content; a query answers with catalog paths.
    ``final``: no staleness either, the saved FAISS file itself matches, and every row
    is the file's current content. Returns the number of images committed.
    """
    try:
        store = Store.open(root, create=False)
    except EmptyIndexError:
        assert catalog_count(root) == 0
        return 0
    except IndexNotFoundError:  # killed before its first run created the catalog
        assert not (root / "catalog.sqlite").exists()
        return 0
    with closing(store):
        problems = store.check()
        stale = ("is behind the catalog", "temporary files", "not the file last saved",
                 "no longer exist on disk")
        if final:
            assert problems == []
        else:
            assert [p for p in problems if not any(s in p for s in stale)] == [], problems
        paths = dict(store.read.all_image_paths())
        assert len(set(paths.values())) == len(paths)
        assert set(paths.values()) <= allowed_paths
        if store.dim is None:
            assert not paths
            return 0
        ids, vecs = store.read.image_vectors(store.dim)
        index = store.vectors("images")
        held = index.ids()
        assert np.unique(held).size == held.size, "duplicate ids in FAISS"
        assert sorted(held.tolist()) == sorted(ids.tolist()), "FAISS ids != catalog ids"
        if ids.size:
            got = index._index.reconstruct_batch(ids)
            np.testing.assert_allclose(got, vecs, atol=1e-6, err_msg="FAISS holds another vector")
            with store.read._read() as conn:
                hashes = dict(conn.exec_driver_sql("SELECT id, content_hash FROM images").all())
            expected = np.stack([refs[hashes[int(i)]] for i in ids])
            np.testing.assert_allclose(vecs, expected, atol=1e-4,
                                       err_msg="a stored vector is not its file's")
            hits = search_images(store, query, 5)[0]
            assert hits and {str(h.path) for h in hits} <= set(paths.values())
        if final:
            on_disk = VectorIndex.load(root / "images.faiss").ids()
            assert sorted(on_disk.tolist()) == sorted(ids.tolist())
            assert not list(root.glob("*.tmp"))
            for i, path in paths.items():
                assert hashes[i] == content_hash(path)
        return len(paths)


def expected_changes(root: Path, files: list[Path]) -> dict[str, int]:
    """What a complete run must report, from the catalog as it stands and the files."""
    rows: dict[str, str] = {}
    if (root / "catalog.sqlite").is_file():
        with closing(sqlite3.connect(root / "catalog.sqlite")) as conn:
            try:
                rows = dict(conn.execute("SELECT path, content_hash FROM images").fetchall())
            except sqlite3.OperationalError:  # no tables yet
                pass
    present = {str(f): content_hash(f) for f in files}
    new = Counter(h for p, h in present.items() if p not in rows)
    gone = Counter(h for p, h in rows.items() if p not in present)
    moved = sum((new & gone).values())  # a gone row per new file of its content
    return {"added": sum(new.values()) - moved,
            "updated": sum(1 for p, h in present.items() if p in rows and rows[p] != h),
            "moved": moved, "removed": sum(gone.values()) - moved}


def kill_plan(seeds: list[int], hooks: list[str]) -> list[tuple[str, object]]:
    plan: list[tuple[str, object]] = [("die", h) for h in hooks]
    plan += [("random", s) for s in seeds]
    random.Random(sum(seeds)).shuffle(plan)
    return plan


# -- killed at any moment ---------------------------------------------------------------------
def mutate(folder: Path, files: list[Path], round_: int) -> None:
    """Changes of every kind: new content, deleted, new files, copies, moved, touched only."""
    rng = random.Random(round_)
    n = len(files)
    changed, deleted = rng.sample(files, max(2, n // 7)), rng.sample(files, max(2, n // 10))
    for i, path in enumerate(changed):
        if path not in deleted:
            tinyclip.draw_shape("green", "triangle", size=72, seed=1000 * round_ + i).save(path)
    for path in deleted:
        path.unlink()
    draw_shapes(folder / f"new{round_}", per_combo=1)
    survivors = [f for f in files if f not in deleted]
    for i, src in enumerate(rng.sample(survivors, 3)):
        shutil.copy(src, folder / f"copy{round_}_{i}.png")
    for path in rng.sample(survivors, 3):
        os.utime(path, ns=(5 + round_, 5 + round_))
    moved = folder / f"moved{round_}"
    moved.mkdir()
    for path in rng.sample([f for f in survivors if f not in changed], 3):
        path.rename(moved / path.name)


def _kill_then_resume(forker: Forker, engine: Engine, model: dict[str, str], tmp: Path,
                      per_combo: int, plans: list[list], stats: dict) -> None:
    """Index a folder under ``plans[0]`` kills; then, per further plan, change the folder and
    re-index it under that plan's kills. After each kill the index must be consistent; after
    each round a complete run must add, update and remove exactly what is left to do."""
    home, root = tmp / "home", tmp / "home" / "k"
    folder = tmp / "photos"
    files = sorted(draw_shapes(folder, per_combo=per_combo))
    refs = reference_vectors(engine, files)
    query = engine.embed_texts(["a red circle"])
    job = dict(mode="index", home=home, index="k", folders=[folder], batch_size=4,
               commit_every=4, save_every=0.25, sleep=0.04, **model)

    def kills(plan: list, allowed: set[str]) -> None:
        for kind, what in plan:
            t0 = time.monotonic()
            if kind == "die":
                code, _, err = forker.run(**job, die=what)
                assert code in (0, -signal.SIGKILL), err
            else:
                pid = forker.start(**job)
                time.sleep(random.Random(what).uniform(0.05, 1.8))
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:  # the run had already ended
                    pass
                code = forker.wait(pid)
                assert code in (0, -signal.SIGKILL), forker.output()[1]
            killed = code == -signal.SIGKILL
            stats["kills"] += killed
            stats["completed"] += not killed
            if killed and (root / "write.lock").is_file():
                assert lock_holder(root) is None  # the OS dropped the dead run's lock
            t1 = time.monotonic()
            n = assert_consistent(root, refs, allowed, query)
            stats["committed_at_kill"].append(n)
            stats.setdefault("seconds", []).append((round(t1 - t0, 2),
                                                    round(time.monotonic() - t1, 2)))

    def finish(files: list[Path]) -> None:
        expected = expected_changes(root, files)
        code, out, err = forker.run(**{**job, "sleep": 0})
        assert code == 0, err
        report = json.loads(out.strip().splitlines()[-1])
        assert {k: report[k] for k in expected} == expected, (report, expected)
        assert report["skipped"] == [] and not report["interrupted"]
        assert report["embedded"] <= expected["added"] + expected["updated"]
        assert assert_consistent(root, refs, {str(f) for f in files}, query, final=True) == len(files)
        stats["rounds"] = stats.get("rounds", 0) + 1

    seen = set(files)
    kills(plans[0], {str(f) for f in files})
    finish(files)
    for round_, plan in enumerate(plans[1:], 1):
        old = set(files)
        mutate(folder, files, round_)
        files = sorted(folder.rglob("*.png"))
        seen |= set(files)
        refs.update(reference_vectors(engine, files))
        kills(plan, {str(f) for f in old | set(files)})
        finish(files)
    stats["files"] = len(seen)


def test_sigkill_at_random_moments_then_resume(forker: Forker, embedder_engine: Engine,
                                               model: dict[str, str], tmp_path: Path) -> None:
    stats: dict = {"kills": 0, "completed": 0, "committed_at_kill": []}
    plans = [kill_plan([11, 12, 13], ["commit:3", "faiss-tmp:2"]),
             kill_plan([21, 22], ["commit:2", "fingerprint:1"])]
    _kill_then_resume(forker, embedder_engine, model, tmp_path, 6, plans, stats)
    print(f"\nkill test: {stats}")
    assert stats["kills"] >= 4  # the hooks always fire; random kills may land after the end


@soak
@needs_soak
def test_soak_sigkill_many_seeds(forker: Forker, embedder_engine: Engine,
                                 model: dict[str, str], tmp_path: Path) -> None:
    stats: dict = {"kills": 0, "completed": 0, "committed_at_kill": []}
    hooks = ["commit:1", "commit:5", "faiss-tmp:1", "faiss-tmp:3", "fingerprint:2"]
    plans = [kill_plan(list(range(100, 112)), hooks)]
    plans += [kill_plan(list(range(100 * r, 100 * r + 4)), hooks[r % 5:r % 5 + 1])
              for r in range(2, 10)]
    _kill_then_resume(forker, embedder_engine, model, tmp_path, 20, plans, stats)
    print(f"\nsoak kill test: {stats}")


# -- Ctrl-C ---------------------------------------------------------------------------------
def wait_for(predicate, timeout: float = 90, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_ctrl_c_commits_what_was_embedded_and_says_how_to_resume(
        forker: Forker, embedder_engine: Engine, model: dict[str, str], tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    files = sorted(draw_shapes(folder, per_combo=6))
    home, root = tmp_path / "home", tmp_path / "home" / "sig"
    argv = ["index", str(folder), "--home", str(home), "--index", "sig", "--batch-size", "4",
            "--model", model["model"], "--pretrained", model["pretrained"]]
    pid = forker.start(mode="cli", argv=argv, commit_every=4, sleep=0.15)
    wait_for(lambda: catalog_count(root) >= 4 or forker.done(), what="a first commit")
    os.kill(pid, signal.SIGINT)
    code = forker.wait(pid)
    out, err = forker.output()
    assert code == 130, (out, err)
    assert "stopping after the current batch" in err
    assert "everything embedded so far is saved; run the same command to resume" in err
    committed = catalog_count(root)
    assert 4 <= committed < len(files)
    refs = reference_vectors(embedder_engine, files)
    query = embedder_engine.embed_texts(["a blue square"])
    paths = {str(f) for f in files}
    assert assert_consistent(root, refs, paths, query, final=False) == committed
    with closing(Store.open(root, create=False)) as store:
        assert store.check() == []  # a clean stop saved the FAISS file too
    code, out, err = forker.run(mode="cli", argv=argv)
    assert code == 0, err
    assert f"added {len(files) - committed}, updated 0, unchanged {committed}" in out
    assert assert_consistent(root, refs, paths, query, final=True) == len(files)


def test_a_second_ctrl_c_aborts_and_still_leaves_a_consistent_index(
        forker: Forker, embedder_engine: Engine, model: dict[str, str], tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    files = sorted(draw_shapes(folder, per_combo=4))
    home, root = tmp_path / "home", tmp_path / "home" / "sig2"
    argv = ["index", str(folder), "--home", str(home), "--index", "sig2", "--batch-size", "4",
            "--model", model["model"], "--pretrained", model["pretrained"]]
    # each batch sleeps 1 s first, so the graceful stop the first Ctrl-C starts lasts long enough
    # for the second to arrive while it is still running, even on a loaded CI machine
    pid = forker.start(mode="cli", argv=argv, commit_every=4, sleep=1.0)
    wait_for(lambda: catalog_count(root) >= 4 or forker.done(), what="a first commit")
    os.kill(pid, signal.SIGINT)
    wait_for(lambda: "stopping after the current batch" in forker.output()[1] or forker.done(),
             what="the first Ctrl-C's message")
    os.kill(pid, signal.SIGINT)  # the second one aborts at once, between two bytecodes
    assert forker.wait(pid) == 130
    assert forker.output()[1].strip().splitlines()[-1] == "mmsearch: interrupted"
    refs = reference_vectors(embedder_engine, files)
    query = embedder_engine.embed_texts(["a blue square"])
    assert 4 <= assert_consistent(root, refs, {str(f) for f in files}, query) < len(files)
    assert lock_holder(root) is None


# -- concurrency ----------------------------------------------------------------------------------
def test_queries_work_during_a_run_and_a_second_writer_is_refused(
        forker: Forker, embedder_engine: Engine, model: dict[str, str], tmp_path: Path) -> None:
    first, second = tmp_path / "lib" / "a", tmp_path / "lib" / "b"
    draw_shapes(first, per_combo=2)
    draw_shapes(second, per_combo=4)
    home, root = tmp_path / "home", tmp_path / "home" / "c"
    with Engine.open("c", home=home, batch_size=8, **model) as e:
        assert e.index([first]).added == 24
    query = embedder_engine.embed_texts(["a yellow triangle"])
    pid = forker.start(mode="index", home=home, index="c", folders=[tmp_path / "lib"],
                       batch_size=4, commit_every=4, save_every=0.3, sleep=0.1, **model)
    wait_for(lambda: lock_holder(root) is not None or forker.done(), what="the writer's lock")
    seen, refused = [], 0
    while not forker.done():
        with closing(Store.open(root, create=False)) as store:  # as each CLI query does
            hits = search_images(store, query, 10)[0]
            paths = {p for _, p in store.read.all_image_paths()}
            seen.append(len(paths))
            assert len(hits) == 10 and {str(h.path) for h in hits} <= paths
            problems = store.check()  # at most: the writer has not saved its latest batches yet
            assert all("behind the catalog" in p or "not the file last saved" in p
                       for p in problems), problems
        if refused < 2 and lock_holder(root) is not None:
            with Engine.open("c", home=home, **model) as e:
                with pytest.raises(IndexLockedError, match=rf"another process \(pid {pid}\)"):
                    e.index([first])
            result = runner.invoke(app, ["index", str(first), "--home", str(home), "--index", "c"])
            if result.exit_code == 1:  # else the run ended in between
                lines = result.output.strip().splitlines()
                assert len(lines) == 1 and "being written by another process" in lines[0]
                refused += 1
        time.sleep(0.05)
    assert forker.wait(pid) == 0, forker.output()[1]
    print(f"\nconcurrent queries: {len(seen)}, catalog sizes seen {sorted(set(seen))}")
    assert len(seen) >= 3 and refused >= 1
    assert seen == sorted(seen) and seen[0] >= 24
    assert lock_holder(root) is None
    with closing(Store.open(root, create=False)) as store:
        assert store.check() == [] and store.read.image_count() == 72


def test_a_lock_left_by_a_killed_writer_does_not_block(
        forker: Forker, model: dict[str, str], tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    draw_shapes(folder, per_combo=2)
    home, root = tmp_path / "home", tmp_path / "home" / "l"
    code, _, err = forker.run(mode="index", home=home, index="l", folders=[folder],
                              batch_size=4, commit_every=4, die="commit:1", **model)
    assert code == -signal.SIGKILL, err
    dead = int((root / "write.lock").read_text())  # the pid is left, for information only
    with pytest.raises(ProcessLookupError):
        os.kill(dead, 0)
    assert lock_holder(root) is None
    with Engine.open("l", home=home, **model) as e:
        report = e.index([folder])  # takes the lock at once
        assert report.added == 24 - 4 and report.unchanged == 4
    with closing(Store.open(root, create=False)) as a, closing(Store.open(root, create=False)) as b:
        a.lock()
        with pytest.raises(IndexLockedError, match=f"pid {os.getpid()}"):
            b.lock()
        with pytest.raises(IndexLockedError):
            b.lock(timeout=0.3)
        threading.Timer(0.3, a.unlock).start()
        b.lock(timeout=10)  # waits for the first writer
        assert b.writing and lock_holder(root) == os.getpid()


def test_a_run_killed_after_its_first_commit_leaves_its_photos_servable(
        forker: Forker, model: dict[str, str], tmp_path: Path) -> None:
    """The run's roots are recorded before its first photo, so a killed run's photos are
    served (the server serves files under recorded roots only)."""
    from mmsearch.serve.security import servable

    folder = tmp_path / "photos"
    draw_shapes(folder, per_combo=2)
    home, root = tmp_path / "home", tmp_path / "home" / "r"
    code, _, err = forker.run(mode="index", home=home, index="r", folders=[folder],
                              batch_size=4, commit_every=4, die="commit:1", **model)
    assert code == -signal.SIGKILL, err
    with closing(Store.open(root, create=False)) as store:
        paths = [p for _, p in store.read.all_image_paths()]
        assert len(paths) == 4 and store.roots == [str(folder.resolve())]
        assert all(servable(p, store.roots) for p in paths)


# -- damaged files --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory, model: dict[str, str]):
    """An index of 24 photos and 2 texts, built once; tests damage copies of it."""
    base = tmp_path_factory.mktemp("pristine")
    files = sorted(draw_shapes(base / "photos", per_combo=2))
    with Engine.open("d", home=base / "home", batch_size=8, **model) as e:
        e.index([base / "photos"])
        e.add_texts(["a red circle", "a blue square"])
    return base / "home" / "d", files


@pytest.fixture
def built(home: Path, pristine: tuple[Path, list[Path]]) -> tuple[Path, list[Path]]:
    shutil.copytree(pristine[0], home / "d")
    return home / "d", pristine[1]


def _expected_top(root: Path, query: np.ndarray) -> list[int]:
    with closing(Catalog(root / "catalog.sqlite", create=False)) as cat:
        ids, vecs = cat.image_vectors(int(cat.get_meta("dim")))
    return [int(i) for i in ids[np.argsort(-(vecs @ query[0]), kind="stable")[:5]]]


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "bit flip", "other index",
                                    "huge size field", "missing"])
def test_a_damaged_faiss_file_is_detected_and_rebuilt(
        built: tuple[Path, list[Path]], embedder_engine: Engine, damage: str) -> None:
    root, _ = built
    path = root / "images.faiss"
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = bytearray(random.Random(1).randbytes(len(data)))
    elif damage == "empty":
        data = bytearray()
    elif damage == "bit flip":
        data[-100] ^= 0x40  # inside the vectors: FAISS itself reads it without complaint
    elif damage == "other index":
        other = VectorIndex.create(64)
        ids = VectorIndex.load(path).ids()
        other.add(ids, np.random.default_rng(0).normal(size=(ids.size, 64)).astype(np.float32))
        other.save(path)
        data = bytearray(path.read_bytes())
    elif damage == "huge size field":
        at = data.find(b"IxFI") + 4 + 4 + 8 + 8 + 8 + 1 + 4  # d, ntotal, 2 dummies, trained, metric
        data[at:at + 8] = (1 << 45).to_bytes(8, "little")  # the vector count that follows
    if damage == "missing":
        path.unlink()
    else:
        path.write_bytes(bytes(data))
    query = embedder_engine.embed_texts(["a green circle"])
    with closing(Store.open(root, create=False)) as store:
        problems = store.check()
        assert problems and all(isinstance(p, str) for p in problems)
        hits = search_images(store, query, 5)[0]
        assert [h.id for h in hits] == _expected_top(root, query)
        assert store.repairs  # said, never silent
    with Engine.open("d", home=root.parent) as e:
        found, done = e.check(repair=True)
        assert found and done
        assert e.check() == ([], [])
    result = runner.invoke(app, ["check", "--home", str(root.parent), "--index", "d"])
    assert result.exit_code == 0 and "ok" in result.output


@pytest.mark.parametrize("damage", ["garbage", "truncated", "header only", "empty file",
                                    "empty file beside vectors", "newer schema"])
def test_a_damaged_catalog_is_a_clear_error_at_open(built: tuple[Path, list[Path]],
                                                    damage: str) -> None:
    root, _ = built
    db = root / "catalog.sqlite"
    data = db.read_bytes()
    expect: type[MMSearchError] = CorruptIndexError
    if damage == "garbage":
        db.write_bytes(random.Random(2).randbytes(len(data)))
    elif damage == "truncated":
        db.write_bytes(data[: len(data) // 2])
    elif damage == "header only":
        db.write_bytes(data[:100])
    elif damage.startswith("empty file"):
        db.write_bytes(b"")
        if damage == "empty file":
            for p in root.glob("*.faiss"):
                p.unlink()
            expect = EmptyIndexError
    elif damage == "newer schema":
        with closing(sqlite3.connect(db)) as conn, conn:
            conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(expect):
        Store.open(root, create=False)
    result = runner.invoke(app, ["query", "a red circle", "--home", str(root.parent), "--index", "d"])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("mmsearch: "), result.output
    if damage == "empty file":
        assert "holds nothing yet" in lines[0]
    elif damage != "newer schema":
        assert "catalog" in lines[0] and ("SQLite" in lines[0] or "lost" in lines[0])


def test_random_damage_to_the_catalog_never_escapes_as_another_error(
        built: tuple[Path, list[Path]], embedder_engine: Engine) -> None:
    root, files = built
    db = root / "catalog.sqlite"
    pristine = db.read_bytes()
    query = embedder_engine.embed_texts(["a red square"])
    rng = random.Random(3)
    outcomes = {"works": 0, "refused": 0}
    for trial in range(25 if not SOAK else 400):
        data = bytearray(pristine)
        if trial % 3 == 0:
            data = data[: rng.randrange(len(data))]
        for _ in range(rng.randint(1, 20)):
            at = rng.randrange(len(data)) if data else 0
            data[at:at + 8] = rng.randbytes(8)
        db.write_bytes(bytes(data))
        for side in ("-wal", "-shm"):
            db.with_name(db.name + side).unlink(missing_ok=True)
        try:
            with closing(Store.open(root, create=False)) as store:
                search_images(store, query, 5)
                search_texts(store, query, 2)
                store.check()
            outcomes["works"] += 1
        except (CorruptIndexError, StorageError, EmptyIndexError) as exc:
            assert str(exc)
            outcomes["refused"] += 1
    print(f"\ncatalog damage: {outcomes}")
    assert outcomes["refused"]


def test_damaged_stored_vectors_are_reported_and_re_embedded(
        built: tuple[Path, list[Path]], embedder_engine: Engine) -> None:
    root, files = built
    with closing(sqlite3.connect(root / "catalog.sqlite")) as conn, conn:
        conn.execute("UPDATE embeddings SET vector = x'00' WHERE rowid IN "
                     "(SELECT rowid FROM embeddings LIMIT 2)")
    (root / "images.faiss").unlink()  # so the next open must read the stored vectors
    with pytest.raises(CorruptIndexError, match="damaged vectors: run `mmsearch check --repair`"):
        with closing(Store.open(root, create=False)) as store:
            store.vectors("images")
    with Engine.open("d", home=root.parent) as e:
        problems, done = e.check(repair=True)
        assert "2 stored vectors are damaged" in problems and any("re-embedded 2" in d for d in done)
        assert e.check() == ([], [])
        assert e.info().images == len(files)


@pytest.mark.parametrize("damage", ["model record", "dimension record", "text vector"])
def test_catalog_records_that_disagree_are_reported_and_repaired(
        built: tuple[Path, list[Path]], damage: str) -> None:
    root, files = built
    home = str(root.parent)
    with closing(sqlite3.connect(root / "catalog.sqlite")) as conn, conn:
        if damage == "model record":
            conn.execute("UPDATE meta SET value = '{\"arch\": ' WHERE key = 'model'")
        elif damage == "dimension record":
            conn.execute("UPDATE meta SET value = '32' WHERE key = 'dim'")
        else:
            conn.execute("UPDATE texts SET vector = x'0000' WHERE key = 'a red circle'")
    result = runner.invoke(app, ["query", "a red circle", "--home", home, "--index", "d"])
    lines = result.output.strip().splitlines()
    if damage == "text vector":  # images are not affected
        assert result.exit_code == 0 and len(lines) == 10, result.output
    else:
        assert result.exit_code == 1 and len(lines) == 1, result.output
        assert ("model record is unreadable" if damage == "model record"
                else "damaged vectors: run `mmsearch check --repair`") in lines[0]
    result = runner.invoke(app, ["check", "--home", home, "--index", "d"])
    assert result.exit_code == 1, result.output
    if damage == "model record":  # nothing says which model built it: reported, not guessed
        assert "model record is unreadable" in result.output
        return
    assert {"dimension record": "records dimension 32 but all its vectors have 64",
            "text vector": "1 stored text vectors are damaged"}[damage] in result.output
    with Engine.open("d", home=home) as e:
        problems, done = e.check(repair=True)
        assert problems and done
        assert e.check() == ([], [])
        assert ("re-embedded 1 texts whose vectors were damaged" in done) == (
            damage == "text vector")
        assert e.info().images == len(files) and e.info().dim == 64


# -- storage faults -------------------------------------------------------------------------------
@contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("needs root to mount a small file system")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def remount(where: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(where)], check=True)


def fill(where: Path) -> Path:
    filler = where / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return filler


def test_disk_full_during_a_run(model: dict[str, str], embedder_engine: Engine, tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    first, more = tmp_path / "photos" / "a", tmp_path / "photos" / "b"
    files = sorted(draw_shapes(first, per_combo=1)) + sorted(draw_shapes(more, per_combo=2))
    refs = reference_vectors(embedder_engine, files)
    query = embedder_engine.embed_texts(["a red circle"])
    monkeypatch.setattr(ingest, "COMMIT_EVERY", 4)
    with tmpfs(tmp_path / "mnt", "4m") as mnt:
        root = mnt / "home" / "f"
        with Engine.open("f", home=mnt / "home", batch_size=4, **model) as e:
            e.index([first])
        filler: list[Path] = []

        def fill_after_first_commit(stage: str, done: int, total: int) -> None:
            if stage == "embed" and done >= 8 and not filler:
                filler.append(fill(mnt))

        with Engine.open("f", home=mnt / "home", batch_size=4) as e:
            with pytest.raises(StorageError, match="full") as info:
                e.index([first.parent], progress=fill_after_first_commit)
        assert "\n" not in str(info.value)
        kept = assert_consistent(root, refs, {str(f) for f in files}, query)
        assert kept >= 12  # the first run, and the batches committed before the disk filled
        with pytest.raises(StorageError, match="disk is full"):  # clear, wherever it fails
            with Engine.open("f", home=mnt / "home") as e:
                e.index([first.parent])
        filler[0].unlink()
        with Engine.open("f", home=mnt / "home", batch_size=8) as e:
            report = e.index([first.parent])
        assert report.added == len(files) - kept
        assert assert_consistent(root, refs, {str(f) for f in files}, query, final=True) == len(files)


def test_read_only_index_directory(model: dict[str, str], embedder_engine: Engine,
                                   tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    files = sorted(draw_shapes(folder, per_combo=1))
    extra = tmp_path / "photos" / "late.png"
    query = embedder_engine.embed_texts(["a red circle"])
    with tmpfs(tmp_path / "mnt", "8m") as mnt:
        with Engine.open("r", home=mnt / "home", batch_size=8, **model) as e:
            e.index([folder])
        root = mnt / "home" / "r"
        before = {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()}
        tinyclip.draw_shape("red", "circle", seed=9).save(extra)
        remount(mnt, "ro")
        try:
            with Engine.open("r", home=mnt / "home", create=False) as e:
                with pytest.raises(StorageError, match="Read-only file system"):
                    e.index([folder])
                with pytest.raises(StorageError):
                    e.add_texts(["a red circle"])
            with closing(Store.open(root, create=False)) as store:  # queries keep working
                assert len(search_images(store, query, 3)[0]) == 3
                assert store.check() == []
                for write in (lambda: store._catalog.set_meta("x", "y"),
                              lambda: store._catalog.commit_images({}, [], delete_ids=[1]),
                              lambda: store._catalog.touch_images(
                                  [store.read.images_under("/")[str(files[0])]]),
                              lambda: store._catalog.drop_orphan_embeddings(),
                              lambda: store._catalog.upsert_texts([("k", "t", np.ones(64))]),
                              lambda: store._catalog.delete_texts(),
                              lambda: store.lock()):
                    with pytest.raises(StorageError):
                        write()
            result = runner.invoke(app, ["index", str(folder), "--home", str(mnt / "home"),
                                         "--index", "r"])
            lines = result.output.strip().splitlines()
            assert result.exit_code == 1 and len(lines) == 1, result.output
            assert "read-only file system" in lines[0].lower()
        finally:
            remount(mnt, "rw")
        assert {p.name: p.read_bytes() for p in root.iterdir()
                if p.is_file() and p.name in before} == before
        with Engine.open("r", home=mnt / "home") as e:
            assert e.index([folder]).added == 1


def test_every_write_path_raises_a_typed_storage_error(
        built: tuple[Path, list[Path]], monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import faiss

    root, files = built
    store = Store.open(root, create=True)
    with closing(store):
        store.lock()
        index = store.vectors("images")
        before = (root / "images.faiss").read_bytes()

        def enospc(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(faiss, "write_index", lambda *a: (_ for _ in ()).throw(
            RuntimeError("Error: fwrite failed: No space left on device")))
        with pytest.raises(StorageError, match="cannot write"):
            store.flush("images")
        monkeypatch.undo()
        monkeypatch.setattr("tempfile.mkstemp", enospc)
        with pytest.raises(StorageError, match="disk is full"):
            store.flush("images")
        with pytest.raises(StorageError):
            store.rebuild("images")
        monkeypatch.undo()
        assert (root / "images.faiss").read_bytes() == before
        assert not list(root.glob("*.tmp"))
        assert index.ntotal == len(files)
    monkeypatch.setattr(os, "mkdir", enospc)
    with pytest.raises(StorageError, match="cannot create"):
        Store.open(root.parent / "new" / "deeper", create=True)


# -- hostile files ----------------------------------------------------------------------------------
def _png_header(width: int, height: int) -> bytes:
    """A PNG signature and IHDR claiming ``width`` x ``height`` (a decompression bomb's header)."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    body = struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    idat = zlib.compress(b"\0" * 1024)
    body += struct.pack(">I", len(idat)) + b"IDAT" + idat + struct.pack(">I", zlib.crc32(b"IDAT" + idat))
    return b"\x89PNG\r\n\x1a\n" + body


def test_hostile_files_are_indexed_or_skipped_with_a_reason(
        home: Path, model: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "hostile"
    good = draw_shapes(folder, per_combo=1)
    shape = tinyclip.draw_shape("blue", "circle", seed=3)
    ok = {  # unusual but valid: each must be indexed
        "cmyk.jpg": shape.convert("CMYK"),
        "grey16.png": Image.fromarray(np.asarray(shape.convert("L")).astype(np.uint16) * 257),
        "la.png": shape.convert("LA"), "palette.gif": shape.convert("P"),
        "onebit.bmp": shape.convert("1"), "float.tif": shape.convert("F"),
        "ünïcødé ☃.png": shape, "new\nline.png": shape, "tiny.png": shape.resize((1, 1)),
        "wide.png": shape.resize((4000, 2)),
    }
    for name, img in ok.items():
        img.save(folder / name)
    rgba = shape.convert("RGBA")
    rgba.putalpha(0)
    rgba.save(folder / "transparent.png")
    bad = {
        "empty.jpg": b"", "text.png": b"just some words\n" * 50,
        "truncated.jpg": (folder / "cmyk.jpg").read_bytes()[:300],
        "bomb.png": _png_header(100_000, 100_000), "html.gif": b"<html><body>hi</body></html>",
    }
    for name, data in bad.items():
        (folder / name).write_bytes(data)
    os.mkfifo(folder / "pipe.jpg")
    (folder / "dir.png").mkdir()
    (folder / "loop").mkdir()
    (folder / "loop" / "again").symlink_to(folder / "loop")
    (folder / "broken.png").symlink_to(folder / "nowhere.png")
    vanish_early, vanish_late = folder / "vanish_early.png", folder / "vanish_late.png"
    shape.rotate(90).save(vanish_early)
    shape.rotate(45).save(vanish_late)
    secret = folder / "secret.png"
    shape.rotate(30).save(secret)
    real_open = os.open

    def refuse_secret(path, flags, *args, **kwargs):  # chmod 000 does not stop root
        if str(path) == str(secret):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse_secret)

    real_hash = ingest.content_hash

    def hash_and_vanish(path: Path) -> str:
        if path == vanish_early:
            path.unlink()  # gone between the walk and the hash
        digest = real_hash(path)
        if path == vanish_late:
            path.unlink()  # gone between the hash and the decode
        return digest

    monkeypatch.setattr(ingest, "content_hash", hash_and_vanish)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with Engine.open("h", batch_size=4, **model) as e:
        report = e.index([folder])
        skipped = {Path(s.path).name: s.reason for s in report.skipped}
        indexed = {p.name for _, p in map(lambda r: (r[0], Path(r[1])),
                                             e.store.read.all_image_paths())}
        assert indexed == {p.name for p in good} | set(ok) | {"transparent.png"}, skipped
        assert set(skipped) >= set(bad) | {"pipe.jpg", "broken.png", "again", "vanish_early.png",
                                           "vanish_late.png", "secret.png"}
        assert "permission denied" in skipped["secret.png"]
        assert all(reason.strip() for reason in skipped.values())
        assert "too large" in skipped["bomb.png"] and "vanished" in skipped["vanish_late.png"]
        assert e.check() == ([], [])
        assert e.search(image=folder / "new\nline.png", k=1)[0].path.name in ok
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert grown_mb < 300, f"memory grew by {grown_mb:.0f} MB"


# -- fuzzing ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def query_engine(tmp_path_factory: pytest.TempPathFactory, model: dict[str, str]):
    folder = tmp_path_factory.mktemp("fuzzphotos")
    draw_shapes(folder, per_combo=1)
    with Engine.open("q", home=tmp_path_factory.mktemp("fuzzhome"), batch_size=12, **model) as e:
        e.index([folder])
        e.add_texts(["a red circle", "a blue square", "ünïcødé ☃"])
        yield e


any_text = st.one_of(
    st.text(max_size=64),
    st.text(st.characters(exclude_categories=()), max_size=64),  # controls, private use...
    st.text(st.one_of(st.characters(), st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF,
                                                     exclude_categories=())), max_size=16),
    # ^ lone surrogates: what a non-UTF-8 command-line byte becomes in Python
    st.text(st.sampled_from(" \t\n\r\x0b\x0c\u00a0\u2028\u3000\u200b\ufeff"), max_size=20),
    st.builds(lambda s, n: (s * n)[:n], st.text(min_size=1, max_size=8),
              st.integers(9_990, 10_010)),
)
any_k = st.one_of(st.integers(-5, 30), st.integers(-(2 ** 70), 2 ** 70),
                  st.sampled_from([0, -1, 10 ** 9, True, False, 1.5, "3", None]))


@settings(max_examples=500 if SOAK else 60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(text=any_text, k=any_k)
def test_fuzz_queries_either_answer_or_refuse(query_engine: Engine, text: str, k: object) -> None:
    for search in (query_engine.search, query_engine.search_texts):
        try:
            hits = search(text, k=k)
        except UsageError as exc:
            assert str(exc)
            continue
        assert isinstance(k, int) and not isinstance(k, bool) and k >= 0
        assert len(hits) == min(k, 12 if search == query_engine.search else 3)
        assert [h.rank for h in hits] == list(range(1, len(hits) + 1))
        assert all(np.isfinite(h.score) for h in hits)


def _seed_images() -> dict[str, bytes]:
    import io

    shape = tinyclip.draw_shape("red", "square", seed=4).resize((24, 24))
    out = {}
    for fmt, mode in (("PNG", "RGB"), ("JPEG", "RGB"), ("GIF", "P"), ("BMP", "RGB"),
                      ("TIFF", "RGB"), ("WEBP", "RGB"), ("PNG", "LA")):
        buf = io.BytesIO()
        shape.convert(mode).save(buf, fmt)
        out[f"{fmt}-{mode}"] = buf.getvalue()
    return out


SEEDS = _seed_images()


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's notes on the damage
@settings(max_examples=2000 if SOAK else 150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.sampled_from(sorted(SEEDS)), cut=st.integers(0, 4000),
       edits=st.lists(st.tuples(st.integers(0, 4000), st.binary(min_size=1, max_size=4)),
                      max_size=6))
def test_fuzz_decoding_damaged_images(tmp_path: Path, seed: str, cut: int,
                                      edits: list[tuple[int, bytes]]) -> None:
    data = bytearray(SEEDS[seed])
    for at, patch in edits:
        at %= max(len(data), 1)
        data[at:at + len(patch)] = patch
    if cut:
        data = data[: cut % (len(data) + 1)]
    path = tmp_path / "fuzz.png"
    path.write_bytes(bytes(data))
    try:
        img = load_image(path, draft_size=32)
    except DecodeError as exc:
        assert str(exc)
    else:
        assert isinstance(img, Image.Image) and img.mode == "RGB" and min(img.size) >= 1
    assert len(content_hash(path)) == 32
