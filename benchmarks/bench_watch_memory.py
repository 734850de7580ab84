"""`--watch` over a long run: memory, objects, threads and file descriptors stay flat
(no growth per event or per batch).

    python benchmarks/bench_watch_memory.py            # 500 cycles (about 6 min on 2 cores)
    python benchmarks/bench_watch_memory.py --quick    # 80 cycles (about 1 min)
    python benchmarks/bench_watch_memory.py --cycles 1500 --name watch_memory.1500
    python benchmarks/bench_watch_memory.py --cycles 200 --trace   # where Python memory grows

Index: ``--photos`` Flickr8k-1k photos copied into two watched roots ``<tmp>/a`` and
``<tmp>/b`` and indexed with ViT-B-32 with random weights (``--pretrained none``: no
weights offline; the work is the same) on the CPU. Then a real
:class:`~mmsearch.ingest.watch.Watcher` on a thread, with that engine as its writer (as
``index --watch`` runs it), with short times so that many batches run: 0.2 s of quiet,
0.05 s of settle, a look at the roots every 0.2 s (production: 2 s, 0.5 s, 1 s).

Each cycle is one batch of churn: a burst of ignored files first (``--burst`` each of
``x<i>.part``, ``.hidden<i>.jpg`` and ``y<i>.tmp`` created, written and deleted, in both
roots: events that never make a batch), then a new photo copied in, the oldest one
deleted, one moved to the other root (it keeps its row by content hash) and one touched;
the cycle waits for the watcher's batch. Every ``--away`` cycles root ``b`` is renamed
away (the watcher's "missing root" path: it says so and watches ``a`` alone) and back
(rescanned whole: one more batch). Every ``--every`` cycles (by default right after a
rename, so that every sample is taken at the same point of the churn), after
``gc.collect()``: RSS (``/proc/self/statm``; from ``/proc/self/status`` its heap part
RssAnon and its mapped-file part RssFile; what malloc has handed out, glibc's
``mallinfo2``, and of that SQLite's, ``sqlite3_memory_used``), the memory mappings,
``len(gc.get_objects())``, the watcher's pending folders, photos and count, the
process's threads (``/proc/self/task``), its open file descriptors (``/proc/self/fd``)
and the index's size on disk. Reported: the first and last samples, the least-squares
slope over the second half of the run (KB and objects per cycle, and per 1,000 batches),
the changes the watcher received and its batches; the load average at start and end.
Results: results/watch_memory.{txt,json} (``--name`` another stem; ``--trace``:
results/watch_memory.trace.txt, the tracemalloc diff between the middle and the last
sample, largest first, the Python allocation sites that grew).
"""

from __future__ import annotations

import _sqlite3
import argparse
import ctypes
import gc
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Iterable

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from _machine import load_avg, machine_info, machine_text, write_results  # noqa: E402

FLICKR = ROOT.parent / "shared" / "data" / "flickr8k-1k"
ARCH, WEIGHTS = "ViT-B-32", "none"
FAST = {"quiet": 0.2, "settle": 0.05, "check_every": 0.2, "lock_retry": 0.2}
DEADLINE_S = 120.0
PAGE = os.sysconf("SC_PAGE_SIZE")
T0 = time.monotonic()


def counting_watcher(*args: Any, **kwargs: Any) -> Any:
    """A real Watcher that also counts the changes watchfiles hands it."""
    from mmsearch.ingest.watch import Watcher

    class Counting(Watcher):
        changes = 0

        def _add(self, changes: Iterable[tuple[object, str]]) -> None:
            changes = list(changes)
            self.changes += len(changes)
            super()._add(changes)

    return Counting(*args, **kwargs)


class Churn:
    """The file operations of the run, on two roots, with their count."""

    def __init__(self, tmp: Path, sources: list[Path], base: int) -> None:
        self.roots = [tmp / "a", tmp / "b"]
        self.sources, self.next_source = sources, base
        self.files: deque[Path] = deque()  # oldest first
        self.ops = 0
        for i, src in enumerate(sources[:base]):
            self._copy(src, self.roots[i % 2] / src.name)

    def _copy(self, src: Path, dst: Path) -> None:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)
        self.files.append(dst)
        self.ops += 1

    def burst(self, n: int) -> None:
        """Ignored files: created, written, deleted (none of them may make a batch)."""
        for root in self.roots:
            for i in range(n):
                for name in (f"x{i}.part", f".hidden{i}.jpg", f"y{i}.tmp"):
                    path = root / name
                    path.write_bytes(b"partial")
                    path.unlink()
                    self.ops += 2

    def cycle(self, i: int) -> None:
        """One batch's changes: one photo in, the oldest out, one moved, one touched."""
        src = self.sources[self.next_source % len(self.sources)]
        self.next_source += 1
        self._copy(src, self.roots[i % 2] / f"c{i:05d}_{src.name}")
        self.files.popleft().unlink()
        moving = self.files.popleft()
        other = self.roots[1] if moving.parent == self.roots[0] else self.roots[0]
        moved = other / moving.name
        os.rename(moving, moved)
        self.files.append(moved)
        touched = self.files[len(self.files) // 2]
        os.utime(touched, ns=(time.time_ns(), time.time_ns()))
        self.ops += 3


class Said:
    """The watcher's lines, bounded (a list would grow by one line per batch): the first
    and last few, and how many said a root was missing."""

    def __init__(self, tmp: Path, keep: int = 5) -> None:
        self.tmp = str(tmp)  # shown as <tmp>: the results name no folder of this machine
        self.first: list[str] = []
        self.last: deque[str] = deque(maxlen=keep)
        self.keep, self.count, self.missing = keep, 0, 0

    def __call__(self, line: str) -> None:
        self.count += 1
        self.missing += "is missing" in line
        line = line.replace(self.tmp, "<tmp>")
        (self.first if len(self.first) < self.keep else self.last).append(line)


class Tracer:
    """tracemalloc from the first sample on; snapshots at the middle sample and the end
    (both after the churn's files were all replaced once, so the diff is steady state)."""

    def __init__(self, on: bool, cycles: int) -> None:
        self.on, self.middle, self.first = on, cycles // 2, None

    def at_sample(self, cycle: int) -> None:
        import tracemalloc

        if self.on and not tracemalloc.is_tracing():
            tracemalloc.start(10)
        if self.on and self.first is None and cycle >= self.middle:
            self.first = tracemalloc.take_snapshot()

    def diff(self, top: int = 15) -> list[str] | None:
        import tracemalloc

        if self.first is None:
            return None
        keep = [tracemalloc.Filter(False, tracemalloc.__file__)]
        last = tracemalloc.take_snapshot().filter_traces(keep)
        stats = last.compare_to(self.first.filter_traces(keep), "traceback")
        return [f"{st.size_diff / 1024:+9.1f} KB {st.count_diff:+7d} blocks  "
                + " <- ".join(f"{Path(f.filename).name}:{f.lineno}"
                              for f in reversed(st.traceback[-6:])) for st in stats[:top]]


def wait_for(what: Any, why: str) -> None:
    end = time.monotonic() + DEADLINE_S
    while not what():
        if time.monotonic() > end:
            raise SystemExit(f"not within {DEADLINE_S:.0f}s: {why}")
        time.sleep(0.02)


def wait_batch(watcher: Any, before: int) -> None:
    state = watcher.state
    wait_for(lambda: state.batches > before and state.state == "watching"
             and state.pending == 0, "the cycle's batch")


def away_and_back(watcher: Any, root: Path) -> None:
    """Root ``root`` renamed away (missing), then back (rescanned whole)."""
    away = root.with_name(root.name + "-away")
    os.rename(root, away)
    wait_for(lambda: watcher.state.missing == [root.name], "the root reported missing")
    before = watcher.state.batches
    os.rename(away, root)
    wait_batch(watcher, before)


def proc_status() -> dict[str, int]:
    """RssAnon and RssFile (kB: the heaps, and mapped files such as the FAISS index)."""
    with open("/proc/self/status") as fh:
        fields = dict(line.split(":", 1) for line in fh if line.startswith("Rss"))
    return {k.lower(): int(v.split()[0]) for k, v in fields.items()}


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def native() -> dict[str, int]:
    """kB that malloc has handed out and not had back (all arenas, mapped chunks included;
    glibc's mallinfo2), and of those SQLite's (sqlite3_memory_used)."""
    libc, sqlite = ctypes.CDLL(None), ctypes.CDLL(_sqlite3.__file__)
    libc.mallinfo2.restype, sqlite.sqlite3_memory_used.restype = MallInfo2, ctypes.c_int64
    info = libc.mallinfo2()
    return {"malloc_kb": (info.uordblks + info.hblkhd) // 1024,
            "sqlite_kb": sqlite.sqlite3_memory_used() // 1024}


def sample(cycle: int, watcher: Any, home: Path) -> dict[str, Any]:
    gc.collect()
    with open("/proc/self/statm") as fh:
        rss_kb = int(fh.read().split()[1]) * PAGE // 1024
    with open("/proc/self/maps") as fh:
        maps = sum(1 for _ in fh)
    st, p = proc_status(), watcher._pending
    return {"cycle": cycle, "batches": watcher.state.batches, "rss_kb": rss_kb,
            "anon_kb": st["rssanon"], "file_kb": st["rssfile"], "maps": maps, **native(),
            "objects": len(gc.get_objects()), "pending_count": p.count,
            "pending_folders": len(p.folders), "pending_photos": len(p.photos),
            "threads": len(os.listdir("/proc/self/task")),
            "py_threads": threading.active_count(), "fds": len(os.listdir("/proc/self/fd")),
            "index_kb": sum(f.stat().st_size for f in home.rglob("*") if f.is_file()) // 1024,
            "watcher_changes": watcher.changes, "seconds": round(time.monotonic() - T0, 1)}



def slope(samples: list[dict], key: str) -> float:
    """Least-squares growth of ``key`` per cycle over the second half of the samples."""
    half = samples[len(samples) // 2:]
    x = np.array([s["cycle"] for s in half], dtype=float)
    y = np.array([s[key] for s in half], dtype=float)
    return float(np.polyfit(x, y, 1)[0]) if len(half) >= 2 and np.ptp(x) > 0 else 0.0


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from mmsearch import Engine

    sources = sorted((FLICKR / "images").glob("*.jpg"))
    churn = Churn(tmp, sources, args.photos)
    engine = Engine.open("watch", home=tmp / "home", model=ARCH, pretrained=WEIGHTS,
                         device="cpu")
    engine.index(churn.roots)
    said, tracer = Said(tmp), Tracer(args.trace, args.cycles)
    stop = threading.Event()
    watcher = counting_watcher([str(r) for r in churn.roots],
                               lambda f, p, s: engine.index(f, progress=p, stop=s),
                               say=said, stop=stop, **FAST)
    thread = threading.Thread(target=watcher.run, name="watch", daemon=True)
    thread.start()
    wait_for(lambda: watcher.state.state == "watching", "the watcher started")
    samples, aways = [], 0
    try:
        for i in range(1, args.cycles + 1):
            churn.burst(args.burst)
            before = watcher.state.batches
            churn.cycle(i)
            wait_batch(watcher, before)
            if i % args.away == 0:
                away_and_back(watcher, churn.roots[1])
                aways += 1
            if i % args.every == 0:
                samples.append(sample(i, watcher, tmp / "home"))
                tracer.at_sample(i)
        trace = tracer.diff()
    finally:
        stop.set()
        thread.join(30)
        engine.close()
    return {"samples": samples, "lines_first": said.first, "lines_last": list(said.last),
            "lines": said.count, "said_missing": said.missing, "churn_ops": churn.ops,
            "aways": aways, "batches": watcher.state.batches, "changes": watcher.changes,
            "trace": trace}


def trend(s: list[dict], key: str, per_batch: float) -> dict[str, Any]:
    """A sampled value: first, last, range, second-half slope, and how it moved there (in
    steps: between how many consecutive samples it rose, and by how much at most)."""
    k, half = slope(s, key), [x[key] for x in s[len(s) // 2:]]
    rises = [b - a for a, b in zip(half, half[1:]) if b > a]
    return {"first": s[0][key], "last": s[-1][key], "min": min(x[key] for x in s),
            "max": max(x[key] for x in s), "slope_per_cycle": round(k, 3),
            "per_1000_batches": round(k * per_batch * 1000, 1),
            "second_half_rises": len(rises), "second_half_intervals": len(half) - 1,
            "largest_rise": max(rises, default=0),
            "grew": max(half) > max(x[key] for x in s[:len(s) // 2])}


def summary(res: dict[str, Any]) -> dict[str, Any]:
    """Every sampled value's trend, and the verdict."""
    s = res["samples"]
    per_batch = (s[-1]["cycle"] - s[0]["cycle"]) / max(s[-1]["batches"] - s[0]["batches"], 1)
    out: dict[str, Any] = {"cycles_per_batch": round(per_batch, 3)}
    for key in ("rss_kb", "anon_kb", "file_kb", "malloc_kb", "sqlite_kb", "maps", "objects",
                "threads", "fds", "pending_folders", "pending_photos", "index_kb"):
        out[key] = trend(s, key, per_batch)
    out["verdict"] = verdict(out)
    return out


def verdict(out: dict[str, Any]) -> str:
    """Flat: under 1 KB of RSS and one Python object per batch, and no more threads, file
    descriptors or pending photos in the second half than in the first."""
    rss, objs, heap = out["rss_kb"], out["objects"]["per_1000_batches"], out["anon_kb"]
    steady = not any(out[k]["grew"] for k in ("threads", "fds", "pending_photos"))
    out["flat"] = steady and abs(rss["per_1000_batches"]) < 1024 and abs(objs) < 1000
    return (f"{'flat' if out['flat'] else 'grows'}: RSS {rss['per_1000_batches'] / 1024:+.2f} "
            f"MB and {objs:+.0f} Python objects per 1,000 batches (least squares, second half; "
            f"the heap rose between {heap['second_half_rises']} of "
            f"{heap['second_half_intervals']} consecutive samples there, by at most "
            f"{heap['largest_rise'] / 1024:.2f} MiB); threads {out['threads']['min']}.."
            f"{out['threads']['max']}, fds {out['fds']['min']}..{out['fds']['max']}, pending "
            f"photos at most {out['pending_photos']['max']}")


COLUMNS = [("cycle", "cycle", 1), ("batches", "batches", 1), ("seconds", "seconds", 1),
           ("rss_MiB", "rss_kb", 1024), ("heap_MiB", "anon_kb", 1024),
           ("used_MiB", "malloc_kb", 1024), ("sqlite_kB", "sqlite_kb", 1),
           ("files_MiB", "file_kb", 1024), ("maps", "maps", 1), ("objects", "objects", 1),
           ("threads", "threads", 1), ("fds", "fds", 1), ("pending", "pending_count", 1),
           ("folders", "pending_folders", 1), ("photos", "pending_photos", 1),
           ("index_kB", "index_kb", 1), ("changes", "watcher_changes", 1)]


def table(samples: list[dict]) -> list[str]:
    def cell(name: str, value: float, div: int) -> str:
        return f"{value / div:>{len(name)}.1f}" if div > 1 else f"{value:>{len(name)}}"

    return [" ".join(name for name, _, _ in COLUMNS),
            *[" ".join(cell(n, x[k], d) for n, k, d in COLUMNS) for x in samples]]


def kb_line(label: str, t: dict) -> str:
    return (f"{label:<9} first {t['first'] / 1024:.1f} MiB, last {t['last'] / 1024:.1f} MiB; "
            f"second half {t['slope_per_cycle']:+.2f} KB/cycle "
            f"({t['per_1000_batches'] / 1024:+.2f} MB per 1,000 batches)")


def report(args: argparse.Namespace, info: dict, res: dict, summ: dict) -> str:
    s, o = res["samples"], summ["objects"]
    return "\n".join([
        machine_text(info),
        f"# model {ARCH}/{WEIGHTS}, device cpu; {args.photos} photos in two watched roots; "
        f"watcher quiet {FAST['quiet']} s, settle {FAST['settle']} s, roots checked every "
        f"{FAST['check_every']} s (production: 2 s, 0.5 s, 1 s)",
        f"# each cycle: {6 * args.burst} ignored files (x.part, .hidden.jpg, y.tmp) created and "
        f"deleted, then 1 photo copied in, 1 deleted, 1 moved across roots, 1 touched: one "
        f"batch; root b renamed away and back every {args.away} cycles", "",
        f"{args.cycles} cycles in {s[-1]['seconds']} s: {res['batches']} batches, "
        f"{res['churn_ops']} file operations, {res['changes']} changes received by the "
        f"watcher, root away and back {res['aways']} times ({res['said_missing']} said missing)",
        "", *table(s), "",
        *[kb_line(label, summ[key]) for label, key in (
            ("RSS", "rss_kb"), ("heap", "anon_kb"), ("malloc'd", "malloc_kb"),
            ("sqlite", "sqlite_kb"))],
        f"{'objects':<9} first {o['first']}, last {o['last']}; second half "
        f"{o['slope_per_cycle']:+.2f}/cycle ({o['per_1000_batches']:+.0f} per 1,000 batches)",
        f"verdict: {summ['verdict']}", "",
        f"watcher lines ({res['lines']}; the first 5 and the last 5):",
        *[f"  {line}" for line in res["lines_first"]], "  ...",
        *[f"  {line}" for line in res["lines_last"]]])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=500)
    ap.add_argument("--quick", action="store_true", help="80 cycles, samples and renames every 10")
    ap.add_argument("--photos", type=int, default=100, help="photos indexed at the start")
    ap.add_argument("--burst", type=int, default=50, help="ignored files of each kind per root")
    ap.add_argument("--every", type=int, default=20, help="cycles between two samples")
    ap.add_argument("--away", type=int, default=20, help="cycles between two root renames")
    ap.add_argument("--trace", action="store_true", help="tracemalloc diff (slower)")
    ap.add_argument("--name", default="watch_memory", help="results/<name>.{txt,json}")
    args = ap.parse_args()
    if args.quick:
        args.cycles, args.every, args.away = 80, 10, 10
    info = machine_info()
    tmp = Path(tempfile.mkdtemp(prefix="bench_watch_memory_"))
    try:
        res = run(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    info["load_avg_end"] = load_avg()
    summ = summary(res)
    if args.trace:
        text = machine_text(info) + "\n# tracemalloc diff, end - middle sample, largest " \
            f"first (cycles {args.cycles // 2}..{args.cycles})\n" + "\n".join(res["trace"])
        print(text)
        (HERE / "results" / f"{args.name}.trace.txt").write_text(text + "\n")
        return
    text = report(args, info, res, summ)
    print(text)
    write_results(args.name, text, {
        "machine": info, "model": f"{ARCH}/{WEIGHTS}", "device": "cpu", "watcher": FAST,
        "args": vars(args), "summary": summ,
        **{k: v for k, v in res.items() if k != "trace"}})


if __name__ == "__main__":
    main()
