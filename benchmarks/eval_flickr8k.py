"""Retrieval recall and throughput of `mmsearch eval` on the shared Flickr8k sample.

    python benchmarks/eval_flickr8k.py --model ViT-B-32 --pretrained none --limit 200
    python benchmarks/eval_flickr8k.py --model ViT-B-32 --pretrained /models/vit-b-32.pt --out
    python benchmarks/eval_flickr8k.py ... --index-type hnsw     # reuses the embedded index

Runs :func:`mmsearch.eval.evaluate.evaluate` (the engine's own ingest and search) on
../shared/data/flickr8k-1k: 1,000 photos, 5,000 captions. The index is kept in
indexes/ so a second run (another --index-type, say) embeds nothing; --fresh
embeds into a temporary index instead, to measure images/s again.

This sample is the first 1,000 Flickr8k images by file name, not the official
test split: its recalls are for relative comparisons, not for papers. With
--pretrained none (random weights) recall is at chance level (R@10 about 1% for
text->image over 1,000 images); only the timings mean something then.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _machine import describe  # noqa: E402

FLICKR = ROOT.parent / "shared" / "data" / "flickr8k-1k"
HOME = ROOT / "indexes"
RESULTS = ROOT / "benchmarks" / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ViT-B-32", help="open_clip architecture or config JSON")
    p.add_argument("--pretrained", default="none", help="tag, checkpoint file, or none")
    p.add_argument("--index-type", default="flat",
                   help="flat, hnsw, ivf, ivfpq or a FAISS factory string")
    p.add_argument("--limit", type=int, default=None, help="only the first N images (and captions)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=0, help="decode threads (0 = auto)")
    p.add_argument("--draft", action="store_true",
                   help="reduced-DCT JPEG decoding (default: in full, as `mmsearch eval`)")
    p.add_argument("--fresh", action="store_true", help="embed again, into a temporary index")
    p.add_argument("--data", type=Path, default=FLICKR, help="folder with the JSON and images/")
    p.add_argument("--out", nargs="?", const="", default=None, metavar="PATH",
                   help="write JSON (default path: benchmarks/results/eval_flickr8k_<model>.json)")
    return p.parse_args(argv)


def first_images(dataset, n: int | None):
    """The first ``n`` images of ``dataset`` with their captions (all of it for None)."""
    from mmsearch.eval.datasets import RetrievalDataset

    if n is None or n >= dataset.n_images:
        return dataset
    if n < 1:
        raise SystemExit("--limit must be at least 1")
    keep = dataset.caption_image < n
    return RetrievalDataset(dataset.name, dataset.split, dataset.image_paths[:n],
                            [c for c, k in zip(dataset.captions, keep) if k],
                            dataset.caption_image[keep])


def _stage_printer():
    """Progress on stderr: one line per stage at 0, 25, 50, 75 and 100%."""
    shown: set[tuple[str, int]] = set()

    def update(stage: str, done: int, total: int) -> None:
        step = 4 * done // total if total else 4
        if (stage, step) not in shown:
            shown.add((stage, step))
            print(f"  {stage:<7} {done}/{total}", file=sys.stderr, flush=True)

    return update


def run(args: argparse.Namespace, home: Path) -> dict:
    from mmsearch.cli.eval import format_table
    from mmsearch.eval.datasets import load_karpathy
    from mmsearch.eval.evaluate import evaluate
    from mmsearch.settings import resolve

    dataset = first_images(load_karpathy(args.data / "dataset_flickr8k_1k.json",
                                         args.data / "images"), args.limit)
    settings = resolve(home=home, model=args.model, pretrained=args.pretrained,
                       device=args.device, batch_size=args.batch_size, workers=args.workers)
    result = evaluate(dataset, settings=settings, index_type=args.index_type, draft=args.draft,
                      progress=_stage_printer())
    print(format_table(result))
    queries = result.n_captions + result.n_images
    images = (f"{result.images_per_second:.1f}/s (ingest end to end)" if result.embedded
              else "- (cached; --fresh to measure)")
    texts = (f"{result.texts_embedded / result.text_seconds:.1f}/s" if result.texts_embedded
             else "- (cached)")
    print(f"throughput  images {images}, captions {texts}, "
          f"search {queries / result.search_seconds:.0f} queries/s")
    return result.to_dict()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not (args.data / "dataset_flickr8k_1k.json").is_file():
        print(f"no Flickr8k sample at {args.data} (see ../shared/README.md)", file=sys.stderr)
        return 1
    machine = describe()
    for key, value in machine.items():
        print(f"# {key}: {value}")
    start = time.perf_counter()
    from mmsearch.errors import MMSearchError

    try:
        if args.fresh:
            with tempfile.TemporaryDirectory(prefix="mmsearch-eval-") as tmp:
                data = run(args, Path(tmp))
        else:
            data = run(args, HOME)
    except MMSearchError as exc:
        print(f"eval_flickr8k: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"total       {time.perf_counter() - start:.1f} s including model loading")
    if args.out is not None:
        stem = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(args.model).stem if args.model.endswith(
            ".json") else args.model)
        out = Path(args.out) if args.out else RESULTS / f"eval_flickr8k_{stem}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"benchmark": "eval_flickr8k", "args": {k: str(v) for k, v in vars(args).items()},
                   "machine": machine, "result": data}
        out.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
