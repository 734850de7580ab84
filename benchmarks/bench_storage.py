"""An index stored as shards against one stored in the catalog: size, writes, rebuilds, re-ranking.

    python benchmarks/bench_storage.py                 # 1M synthetic 512-d vectors
    python benchmarks/bench_storage.py --n 200000      # quicker

The same N synthetic unit vectors (clustered, 512-d, seeded) and N image rows go into
two indexes through the store's own verbs, in batches of one shard (10,000 rows):

``catalog``  (the baseline: every local index) ``put_images`` with float32 vectors,
             stored as blobs in SQLite;
``shards``   (what ``--runner ray`` makes) each batch's vectors written as an npy shard
             (float16), then ``put_images`` with their (shard, row) locations.

Then, for each, in a fresh process: a rebuild of an exact index from the stored vectors
(what `check --repair` and a type change do), reading 100 stored vectors by id (a
re-ranking pool, 1,000 times) and searching an IVF-SQ8 index whose hits are re-ranked
with the stored vectors (200 queries). Seconds, file sizes, peak RSS (``ru_maxrss``), and
whether both give the same top 10. The catalog's bytes per row are scaled to 10^9 rows.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from _machine import load_avg, machine_info, machine_text, write_results  # noqa: E402

DIM = 512
MODES = ("catalog", "shards")

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
import numpy as np
from mmsearch.models.identity import ModelIdentity
from mmsearch.store import ImageFile, Store
from mmsearch.store.shardvectors import FOLDER, as_stored, npy_path, write_npy

root, mode, step, n, shard, dim = Path(sys.argv[1]), sys.argv[2], sys.argv[3], *map(int, sys.argv[4:7])

def vectors(k):
    rng = np.random.default_rng(k)
    centres = np.random.default_rng(0).standard_normal((256, dim)).astype(np.float32)
    v = centres[rng.integers(0, 256, shard)] + 0.6 * rng.standard_normal((shard, dim), dtype=np.float32)
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)

out = {}
if step == "write":
    store = Store.open(root, create=True)
    store.lock()
    store.set_model(ModelIdentity("bench", "synthetic", "bench:synthetic"), dim, mode)
    t = time.perf_counter()
    for k in range(n // shard):
        files = [ImageFile(f"/photos/{k:05d}/{j:05d}.jpg", 1000 + j, 10**18 + j, f"{k:08x}{j:024x}")
                 for j in range(shard)]
        v = vectors(k)
        if mode == "shards":
            write_npy(npy_path(root / FOLDER, k), v)
            store.put_images(files, store.vector_source.rows(k, range(shard), as_stored(v)))
        else:
            store.put_images(files, v)
    store.flush()
    out["write_s"] = time.perf_counter() - t
    store.close()
    out["catalog_bytes"] = (root / "catalog.sqlite").stat().st_size
    out["npy_bytes"] = sum(p.stat().st_size for p in (root / FOLDER).glob("img_emb/*.npy"))
    out["faiss_bytes"] = (root / "images.faiss").stat().st_size
elif step == "rebuild":
    store = Store.open(root, create=False)
    t = time.perf_counter()
    index = store.build_index("images", "Flat")
    out["rebuild_s"] = time.perf_counter() - t
    out["ntotal"] = index.ntotal
elif step == "fetch":
    store = Store.open(root, create=False)
    ids = store.read.all_image_ids()
    rng = np.random.default_rng(1)
    store.image_vectors(rng.choice(ids, 100))  # open the files once
    times = []
    for _ in range(1000):
        pick = rng.choice(ids, 100, replace=False)
        t = time.perf_counter()
        store.image_vectors(pick)
        times.append(time.perf_counter() - t)
    out["fetch_ms_median"] = 1000 * float(np.median(times))
    out["fetch_ms_p99"] = 1000 * float(np.percentile(times, 99))
elif step == "search":
    from mmsearch.search import search_images
    store = Store.open(root, create=False)
    store.lock()
    t = time.perf_counter()
    store.rebuild("images", index_type="IVF1024,SQ8")
    out["ivf_build_s"] = time.perf_counter() - t
    q = vectors(10**6)[:200] * 0.9 + vectors(10**6 + 1)[:200] * 0.1
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    search_images(store, q[:1], 10)
    t = time.perf_counter()
    hits = [search_images(store, q[i:i + 1], 10)[0] for i in range(len(q))]
    out["search_ms"] = 1000 * (time.perf_counter() - t) / len(q)
    out["top10"] = [[h.id for h in row] for row in hits]
    store.unlock()
out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(out))
"""


def child(root: Path, mode: str, step: str, args: argparse.Namespace) -> dict:
    run = subprocess.run([sys.executable, "-c", CHILD, str(root), mode, step, str(args.n),
                          str(args.shard_size), str(DIM)], capture_output=True, text=True, cwd=ROOT)
    if run.returncode != 0:
        raise SystemExit(f"{mode} {step} failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def measure(args: argparse.Namespace) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="bench-storage-", dir=args.dir))
    res: dict = {}
    try:
        for mode in MODES:
            row: dict = {}
            for step in ("write", "rebuild", "fetch", "search"):
                got = child(tmp / mode, mode, step, args)
                got[f"{step}_peak_rss_mib"] = got.pop("peak_rss_mib")
                row.update(got)
            res[mode] = row
            print(json.dumps({mode: {k: v for k, v in row.items() if k != "top10"}}), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    a, b = res["catalog"].pop("top10"), res["shards"].pop("top10")
    res["same_top10"] = sum(x == y for x, y in zip(a, b)) / len(a)
    res["top10_overlap"] = sum(len(set(x) & set(y)) for x, y in zip(a, b)) / (10 * len(a))
    return res


def report(info: dict, args: argparse.Namespace, res: dict) -> str:
    c, s = res["catalog"], res["shards"]
    per_row = {m: res[m]["catalog_bytes"] / args.n for m in MODES}
    lines = ["# bench_storage: an index stored as shards vs one stored in the catalog",
             machine_text(info), "",
             f"{args.n} synthetic 512-d vectors and rows, written in batches of {args.shard_size} "
             "through Store.put_images", "",
             f"{'':34}{'catalog (baseline)':>20}{'shards':>14}{'shards/catalog':>16}"]

    def row(label: str, key: str, fmt: str = "{:.1f}", scale: float = 1.0) -> None:
        x, y = c[key] * scale, s[key] * scale
        lines.append(f"{label:34}{fmt.format(x):>20}{fmt.format(y):>14}{y / x if x else 0:>15.2f}x")

    row("write, s", "write_s")
    row("catalog.sqlite, MB", "catalog_bytes", scale=1e-6)
    lines.append(f"{'npy shards (float16), MB':34}{'-':>20}{s['npy_bytes'] / 1e6:>14.1f}")
    row("images.faiss (Flat), MB", "faiss_bytes", scale=1e-6)
    row("rebuild Flat from stored, s", "rebuild_s")
    row("  its peak RSS, MiB", "rebuild_peak_rss_mib", "{:.0f}")
    row("100 vectors by id, ms (median)", "fetch_ms_median", "{:.2f}")
    row("100 vectors by id, ms (p99)", "fetch_ms_p99", "{:.2f}")
    row("IVF1024,SQ8 rebuild, s", "ivf_build_s")
    row("search + re-rank, ms/query", "search_ms", "{:.2f}")
    lines += ["",
              f"same top 10 for {res['same_top10']:.0%} of 200 queries (overlap "
              f"{res['top10_overlap']:.1%}); the shards hold float16, the catalog float32",
              f"catalog bytes per image row: {per_row['catalog']:.0f} (catalog), "
              f"{per_row['shards']:.0f} (shards): at 10^9 rows "
              f"{per_row['catalog']:.0f} GB vs {per_row['shards']:.0f} GB of SQLite, plus "
              f"{s['npy_bytes'] / args.n:.0f} GB of npy shards"]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--shard-size", type=int, default=10_000)
    p.add_argument("--dir", default=str(ROOT / "indexes"), help="where the two indexes are made")
    args = p.parse_args()
    if args.n % args.shard_size:
        raise SystemExit("--n must be a multiple of --shard-size")
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    info = machine_info()
    res = measure(args)
    info["load_avg_end"] = load_avg()
    text = report(info, args, res)
    print(text)
    write_results("storage", text, {"machine": info, "n": args.n, "shard_size": args.shard_size,
                                    **res})


if __name__ == "__main__":
    main()
