#!/usr/bin/env bash
# Prepare .gpu/ (ignored by git) for running benchmarks/gpu_check.sh on a GPU machine that has
# no network. Run it where there is network, then copy the project with its .gpu/ folder over:
#   .gpu/wheels/  Python 3.12 x86-64 Linux wheels of what mmsearch imports at index and query
#                 time beyond a CUDA PyTorch environment (torch, torchvision, numpy, pillow,
#                 regex, timm, huggingface_hub, typer, rich, pytest are expected there; add to
#                 WHEELS below what yours lacks); gpu_check.sh installs them with --no-index
#   .gpu/photos/  a few hundred Flickr originals (gpu_check.sh makes thousands of distinct
#                 JPEGs and the 12 MP set from them)
#   bash benchmarks/gpu_wheels.sh [PHOTOS]      # PHOTOS: how many originals (default 200)
# Environment: SRC, the folder of originals (default ../shared/data/flickr8k-1k/images);
# PYTHON, the pip that downloads (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PHOTOS=${1:-200}
SRC=${SRC:-../shared/data/flickr8k-1k/images}
PY=${PYTHON:-python3}
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
           manylinux1_x86_64)
# name==version: the versions mmsearch is tested with
WHEELS=(open_clip_torch==3.3.0 faiss-cpu==1.15.1 sqlalchemy==2.1.9 ftfy==6.3.1 wcwidth==0.9.4)

mkdir -p .gpu/wheels .gpu/photos
args=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d .gpu/wheels)
for p in "${PLATFORMS[@]}"; do args+=(--platform "$p"); done
"$PY" -m pip download -q "${args[@]}" "${WHEELS[@]}"

# one version of each package only (two stop the whole install there)
ls .gpu/wheels | sed -E 's/-[0-9].*//' | sort | uniq -d | while read -r dup; do
  echo "two versions of $dup in .gpu/wheels: remove one" >&2; exit 1
done

find .gpu/photos -name '*.jpg' -delete
find "$SRC" -maxdepth 1 -name '*.jpg' | sort | head -n "$PHOTOS" | while read -r f; do
  cp "$f" .gpu/photos/
done
echo "wheels: $(ls .gpu/wheels | wc -l) files, $(du -sh .gpu/wheels | cut -f1);" \
     "photos: $(ls .gpu/photos | wc -l), $(du -sh .gpu/photos | cut -f1); total $(du -sh .gpu | cut -f1)"
