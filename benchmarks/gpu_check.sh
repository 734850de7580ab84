#!/usr/bin/env bash
# The GPU check of issue 14, as one script for a GPU machine with no network (under 5 min):
#   bash benchmarks/gpu_wheels.sh          # first, where there is network: fills .gpu/
#   bash benchmarks/gpu_check.sh           # there (device tool: carry [".gpu"], timeout ~420 s)
#   bash benchmarks/gpu_check.sh --cpu     # here: every step, small and on the CPU (a dry run)
# Steps: install what the image lacks from .gpu/wheels (--no-index) and mmsearch itself;
# make thousands of distinct Flickr-sized JPEGs (random crops of .gpu/photos) and a few
# hundred 12 MP ones; run tests/test_gpu_path.py (its CUDA tests run there); ingest with
# ViT-B-32 and ViT-L-14 (random weights) through bench_ingest.py --device cuda; exact search
# at 1M x 512 and cold queries through bench_gpu_search.py; print one table, written to
# benchmarks/results/gpu_h200.txt (and copied to $OUT, which the device tool brings back).
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=gpu
[[ "${1:-}" == "--cpu" ]] && MODE=cpu
PY=${PYTHON:-python3}
WORK=${WORK:-/tmp/mmsearch-gpu-check}
export PYTHONUNBUFFERED=1
if [[ $MODE == gpu ]]; then
  CROPS=4000 BIG=240 VECTORS=1000000 DEVICE=cuda BATCH=256 WORKERS=16 NAIVE=32 CHECK=256
  LARGE=ViT-L-14 RESULT=benchmarks/results/gpu_h200.txt
else
  CROPS=40 BIG=4 VECTORS=20000 DEVICE=cpu BATCH=16 WORKERS=2 NAIVE=8 CHECK=8
  LARGE=ViT-B-32 RESULT=$WORK/gpu_check_cpu.txt
fi
rm -rf "$WORK" && mkdir -p "$WORK"
step() { echo "== $(date +%T) $*"; }

step "install (.gpu/wheels, then mmsearch)"
if [[ $MODE == gpu ]]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile .gpu/wheels/*.whl
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . \
    || export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  nvidia-smi -L || true
else
  echo "(--cpu: nothing installed; the wheels would be: $(ls .gpu/wheels 2>/dev/null | tr '\n' ' '))"
fi
"$PY" -c "import torch, torchvision, open_clip, faiss, sqlalchemy, mmsearch; print('torch', torch.__version__,
'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available(), 'open_clip', open_clip.__version__,
'faiss', faiss.__version__)"
# the tests and bench_ingest look for the Flickr photos at ../shared (absent there): link them
if [[ ! -d ../shared/data/flickr8k-1k/images ]]; then
  mkdir -p ../shared/data/flickr8k-1k && ln -sfn "$PWD/.gpu/photos" ../shared/data/flickr8k-1k/images
fi

step "make $CROPS Flickr-sized and $BIG 12 MP JPEGs from .gpu/photos"
"$PY" - "$WORK" "$CROPS" "$BIG" <<'EOF'
import random, sys
from multiprocessing import Pool
from pathlib import Path
from PIL import Image

work, crops, big = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
sources = sorted(Path(".gpu/photos").glob("*.jpg"))

sizes = [Image.open(p).size for p in sources]  # Flickr's few sizes, as often as they come

def make(job):
    """A random crop of an original, resized to a Flickr size (or 12 MP): distinct files."""
    i, folder, size = job
    rng = random.Random(i)
    img = Image.open(sources[i % len(sources)]).convert("RGB")
    (w, h), (tw, th) = img.size, size or rng.choice(sizes)
    cw = int(w * rng.uniform(0.6, 1.0))
    ch = min(h, int(cw * th / tw))
    cw = int(ch * tw / th)
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    img = img.crop((x, y, x + cw, y + ch)).resize((tw, th), Image.BICUBIC)
    img.save(work / folder / f"{i:05d}.jpg", quality=rng.choice((85, 90, 95)))

for folder in ("flickr", "12mp"):
    (work / folder).mkdir()
jobs = [(i, "flickr", None) for i in range(crops)] + [(i, "12mp", (4000, 3000)) for i in range(big)]
with Pool() as pool:
    pool.map(make, jobs, chunksize=16)
print(f"{crops} + {big} files in {work}")
EOF

step "tests/test_gpu_path.py"
timeout 150 "$PY" -m pytest -q tests/test_gpu_path.py 2>&1 | tail -4 \
  | tee "$WORK/tests.txt" || true

# ViT-B-32: both sets, every decoder, vectors against the CPU path; the large model: Flickr-sized,
# the decoder auto picks, fewer vectors compared (the CPU copy of a large model is slow)
ingest() {  # NAME MODEL CHECK ARGS...
  local name=$1 model=$2 check=$3; shift 3
  step "ingest $model"
  timeout 200 "$PY" benchmarks/bench_ingest.py --model "$model" --device "$DEVICE" \
    --batch-size "$BATCH" --workers "$WORKERS" --naive-n "$NAIVE" --check-vectors "$check" \
    --photos "$WORK/flickr" "$@" --out "$WORK/ingest_$name.json" | tee "$WORK/ingest_$name.txt" \
    || echo "ingest $model failed or timed out"
}
ingest 1_ViT-B-32 ViT-B-32 "$CHECK" --big-dir "$WORK/12mp" --big "$BIG" --decoders threads,processes,nvjpeg
ingest "2_$LARGE" "$LARGE" 32 --big 0 --decoders auto

step "search: exact $VECTORS x 512, cold queries"
timeout 150 "$PY" benchmarks/bench_gpu_search.py --vectors "$VECTORS" --photos .gpu/photos \
  --work "$WORK/search" --out "$WORK/search.json" | tee "$WORK/search.txt" \
  || echo "search benchmark failed or timed out"

step "table"
"$PY" - "$WORK" "$MODE" <<'EOF' | tee "$RESULT" || echo "the table failed: see the steps above"
import json, sys
from pathlib import Path

sys.path.insert(0, "benchmarks")
from _machine import header

work, mode = Path(sys.argv[1]), sys.argv[2]
print(header())
print(f"# benchmarks/gpu_check.sh ({'a dry run on the CPU, small sizes' if mode == 'cpu' else 'GPU'})")
rows = [("what", "result", "target / baseline")]
for path in sorted(work.glob("ingest_*.json")):
    model = path.stem.removeprefix("ingest_").split("_", 1)[1]
    for r in json.loads(path.read_text()):
        if "vectors_vs_cpu" in r:
            v = r["vectors_vs_cpu"]
            rows.append((f"{model} vectors vs CPU path ({v['images']} images)",
                         f"min cosine {v['min_cosine']:.4f}", ">= 0.999"))
            continue
        if "set" not in r:
            continue
        name = f"{model} {r['set']}, {r['images']} files"
        rows.append((f"{name}: model only (float32 from CPU / uint8 on device)",
                     f"{r['model_only_ips']:.0f} / {r['model_on_device_ips']:.0f} img/s", ""))
        rows.append((f"{name}: mmsearch index (auto)", f"{r['mmsearch_ips']:.0f} img/s",
                     f"{r['vs_model_only']:.0%} / {r['vs_model_on_device']:.0%} of model only; "
                     f"naive {r['naive_ips']:.0f}"))
        for asked, d in r["embed_paths"].items():
            rows.append((f"{name}: embed_paths {asked} -> {d['decoder']}", f"{d['ips']:.0f} img/s",
                         f"decoding alone {d.get('decode_only_ips', 0):.0f} img/s"))
search = work / "search.json"
if search.exists():
    s = json.loads(search.read_text())
    e = s["exact"]
    rows.append((f"exact search {e['vectors']:,} x {e['dim']}, ms/query: torch on {e['torch_device']} "
                 "/ FAISS CPU", f"{e['torch_ms']:.3f} / {e['faiss_cpu_ms']:.1f}",
                 f"<= 2 ms; same top-10 {e['same_top10']:.0%}"))
    for key, value in s.get("cold", {}).items():
        rows.append((f"cold `mmsearch query`: {key}",
                     f"{value:.2f} s" if isinstance(value, float) else str(value), "<= 3 s" if "auto" in key else ""))
tests = work / "tests.txt"
if tests.exists():
    rows.append(("tests/test_gpu_path.py", tests.read_text().strip().splitlines()[-1], ""))
width = [max(len(r[i]) for r in rows) for i in range(3)]
for r in rows:
    print(" | ".join(c.ljust(w) for c, w in zip(r, width)))
EOF
if [[ -n "${OUT:-}" && -d "${OUT:-}" ]]; then
  cp "$RESULT" "$WORK"/*.json "$OUT"/ 2>/dev/null || true
fi
step "done: $RESULT"
