"""Rebuilding a FAISS index from the catalog: peak memory and time, chunked vs all at once.

    python benchmarks/bench_rebuild.py [--n 1000000] [--types flat,ivfsq]

A rebuild happens when a vector file is missing or damaged, when `check --repair`
runs, and when the collection grows into another index type. It reads every
vector back from SQLite. The engine's way (``Store.rebuild``) reads 65,536 at a
time and trains approximate types on a random sample; the baseline, measured in
the same run, is the earlier way: read every vector in one go
(``Catalog.image_vectors``), train on a sample of them, add them all. Each case
runs in a fresh process (peak RSS = ``ru_maxrss``) over the index that
``bench_query.py`` builds (``indexes/bench_query_1M``: 1M synthetic clustered
512-d vectors); the store is opened read-only, so nothing on disk changes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import _machine  # noqa: E402

CHILD = r"""
import json, resource, sys, time
import numpy as np
from pathlib import Path
from mmsearch.store import Store
from mmsearch.store.vectors import VectorIndex, train_size
root, how, kind = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
store = Store.open(root, create=False)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
if how == "chunked":
    index = store.rebuild("images", index_type=kind)
else:  # the earlier way: every vector in memory at once
    ids, vecs = store.read.image_vectors(store.dim)
    train = None
    if VectorIndex.needs_training(kind, len(ids), store.dim):
        size = train_size(len(ids), kind, store.dim)
        train = vecs[np.random.default_rng(0).choice(len(ids), size, replace=False)]
    index = VectorIndex.create(store.dim, kind, expected=len(ids), train=train)
    index.add(ids, vecs)
    del vecs
secs = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": round(secs, 1), "peak_rss_gib": round(peak / 2**20, 2),
                  "rss_before_gib": round(base / 2**20, 2), "ntotal": index.ntotal,
                  "index": index.description}))
"""


def run(root: Path, how: str, kind: str) -> dict:
    p = subprocess.run([sys.executable, "-c", CHILD, str(root), how, kind],
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(p.stderr)
    return json.loads(p.stdout.strip().splitlines()[-1])


def report(res: dict) -> str:
    L = [f"# bench_rebuild: Store.rebuild over {res['n']:,} catalog vectors of 512-d "
         "(indexes/bench_query_1M, synthetic clustered)", _machine.machine_text(res["machine"]), "",
         f"{'type':<8} {'way':<22} {'seconds':>8} {'peak RSS GiB':>13} {'index':>24}"]
    for r in res["rows"]:
        L.append(f"{r['type']:<8} {r['way']:<22} {r['seconds']:>8} {r['peak_rss_gib']:>13} "
                 f"{r['index']:>24}")
    L += ["", "way: chunked = the engine's Store.rebuild (65,536 vectors per read, training on a "
          "random sample); all at once = the baseline (every vector read in one go). Peak RSS "
          "includes the Python process, numpy, FAISS and the store (~0.2 GiB)."]
    return "\n".join(L)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=ROOT / "indexes" / "bench_query_1M")
    ap.add_argument("--types", default="flat,ivfsq")
    args = ap.parse_args()
    if not (args.root / "catalog.sqlite").is_file():
        raise SystemExit(f"{args.root} not found: run benchmarks/bench_query.py first")
    from mmsearch.store import Store

    with_store = Store.open(args.root, create=False)
    n = with_store.read.image_count()
    with_store.close()
    res: dict = {"benchmark": "bench_rebuild", "n": n, "machine": _machine.machine_info(),
                 "command": " ".join(["python"] + sys.argv), "rows": []}
    for kind in [t for t in args.types.split(",") if t]:
        for how, name in (("all", "all at once (baseline)"), ("chunked", "chunked (engine)")):
            print(f"  [{time.strftime('%H:%M:%S')}] {kind}: {name}", file=sys.stderr, flush=True)
            res["rows"].append({"type": kind, "way": name, **run(args.root, how, kind)})
    res["machine"]["load_avg_end"] = _machine.load_avg()
    _machine.write_results("rebuild", report(res), res)
    print(report(res))


if __name__ == "__main__":
    main()
