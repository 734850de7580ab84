#!/usr/bin/env bash
# The GPU check: ingest, decoding and search on one NVIDIA GPU, against the CPU path, as one
# script that needs no network while it runs (sized for under 5 minutes on one H200, 16 cores):
#   pip install -e '.[test]'               # once, with a CUDA build of torch and torchvision
#   bash benchmarks/gpu_check.sh           # the check; prints one table and saves it
#   bash benchmarks/gpu_check.sh --cpu     # every step, small and on the CPU (a dry run)
# A GPU machine without network: run benchmarks/gpu_wheels.sh where there is network and copy
# the project with its .gpu/ folder over; the check installs .gpu/wheels with --no-index.
# Steps: make thousands of distinct Flickr-sized JPEGs (random crops of the photos) and a few
# hundred 12 MP ones; run tests/test_gpu_path.py (its CUDA tests run on a GPU); ingest with
# ViT-B-32 and ViT-L-14 (random weights) through bench_ingest.py --device cuda; exact search
# at 1M x 512 and cold queries through bench_gpu_search.py; print one table.
# Environment (defaults in brackets):
#   RESULTS  where the table is saved as gpu_check_<gpu>.txt [benchmarks/results]; a dry run
#            saves gpu_check_cpu.txt in WORK instead
#   WORK     scratch folder, emptied first: generated photos, per-step JSON [build/gpu-check]
#   PHOTOS   the originals [.gpu/photos when it has photos, else ../shared/data/flickr8k-1k/images]
#   PYTHON   [python3]
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=gpu
[[ "${1:-}" == "--cpu" ]] && MODE=cpu
PY=${PYTHON:-python3}
WORK=${WORK:-build/gpu-check}
RESULTS=${RESULTS:-benchmarks/results}
FLICKR=../shared/data/flickr8k-1k/images
if [[ -z "${PHOTOS:-}" ]]; then
  PHOTOS=$FLICKR
  compgen -G ".gpu/photos/*.jpg" >/dev/null && PHOTOS=.gpu/photos
fi
compgen -G "$PHOTOS/*.jpg" >/dev/null \
  || { echo "no photos in $PHOTOS: set PHOTOS, or run benchmarks/gpu_wheels.sh" >&2; exit 2; }
export PYTHONUNBUFFERED=1
if [[ $MODE == gpu ]]; then
  CROPS=4000 BIG=240 VECTORS=1000000 DEVICE=cuda BATCH=256 WORKERS=16 NAIVE=32 CHECK=256 ORIGINALS=200
  LARGE=ViT-L-14
  GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 || true)
  GPU=$(echo "${GPU:-gpu}" | tr 'A-Z' 'a-z' | sed -E 's/^nvidia //; s/[^a-z0-9]+/_/g; s/^_|_$//g')
  RESULT=$RESULTS/gpu_check_$GPU.txt
else
  CROPS=40 BIG=4 VECTORS=20000 DEVICE=cpu BATCH=16 WORKERS=2 NAIVE=8 CHECK=8 ORIGINALS=20
  LARGE=ViT-B-32 RESULT=$WORK/gpu_check_cpu.txt
fi
rm -rf "$WORK" && mkdir -p "$WORK" "$RESULTS"
step() { echo "== $(date +%T) $*"; }

step "install (.gpu/wheels when present, mmsearch when not importable)"
if [[ $MODE == gpu ]] && compgen -G ".gpu/wheels/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile .gpu/wheels/*.whl
fi
if ! "$PY" -c "import mmsearch" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . \
    || export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
[[ $MODE == gpu ]] && { nvidia-smi -L || true; }
"$PY" -c "import torch, torchvision, open_clip, faiss, sqlalchemy, mmsearch; print('torch', torch.__version__,
'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available(), 'open_clip', open_clip.__version__,
'faiss', faiss.__version__)"
# the tests look for the Flickr photos at ../shared/data/flickr8k-1k/images: link them there if absent
if [[ ! -d $FLICKR ]]; then
  mkdir -p "$(dirname "$FLICKR")" && ln -sfn "$(cd "$PHOTOS" && pwd)" "$FLICKR"
fi

step "make $CROPS Flickr-sized and $BIG 12 MP JPEGs from $PHOTOS"
"$PY" - "$WORK" "$CROPS" "$BIG" "$PHOTOS" <<'EOF'
import random, sys
from multiprocessing import Pool
from pathlib import Path
from PIL import Image

work, crops, big = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
sources = sorted(Path(sys.argv[4]).glob("*.jpg"))

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

step "search: exact $VECTORS x 512, cold queries on an index of $ORIGINALS originals"
mkdir -p "$WORK/originals"
find "$PHOTOS"/ -maxdepth 1 -name '*.jpg' | sort | head -n "$ORIGINALS" | xargs -r cp -t "$WORK/originals"
timeout 150 "$PY" benchmarks/bench_gpu_search.py --vectors "$VECTORS" --photos "$WORK/originals" \
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
step "done: $RESULT"
