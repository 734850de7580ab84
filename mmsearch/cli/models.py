"""`mmsearch models`: the models one can pick, their size, what is ready here, published figures."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from mmsearch.cli.common import HomeOpt, JsonOpt, err, handle_errors, print_json

if TYPE_CHECKING:  # pragma: no cover
    from mmsearch.models.listing import IndexedModel, ModelEntry

# The table's figure columns: (header, figure name); all are percentages.
COLUMNS = (("IN-1k", "imagenet1k_top1"), ("F30K", "flickr30k_t2i_r1"),
           ("COCO", "coco_t2i_r1"), ("XTD-zh", "xtd10_zh_t2i_r1"))
OTHER_BENCHMARKS = {"flickr30k_cn_t2i_r1": "Flickr30K-CN", "coco_cn_t2i_r1": "COCO-CN"}
SHORT = {"ready": "ready", "first use": "1st use", "missing": "missing",
         "not installed": "no ort", "n/a": "n/a"}
LEGEND = (
    "IN-1k: ImageNet zero-shot top-1 %; F30K, COCO, XTD-zh: text->image R@1 % on Flickr30K",
    "  (1k test), MS-COCO (5k test), XTD10 Chinese; —: none published (--json: R@5, image->text)",
    "runtimes: 1st use: the weights download, the tower exports or the text-tower file is",
    "  written on first use; missing: not here, and not downloaded by mmsearch (a moved file;",
    "  a Chinese-CLIP id: hf download it); no ort: pip install 'mmsearch[onnx]'",
)


@handle_errors
def models_command(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Models to pick from (the default, presets, suggestions) and the ones cached or used by
    indexes here: size, cached weights, ready runtimes, published retrieval figures."""
    from mmsearch.models.listing import list_models
    from mmsearch.settings import resolve

    folder = resolve(home=home).home
    entries = list_models(folder, _indexed(folder))
    if as_json:
        print_json(entries)
    else:
        typer.echo(format_table(entries))


def _indexed(home: Path) -> list["IndexedModel"]:
    """The model of each index under ``home`` (an index that cannot be read is said, skipped)."""
    from mmsearch.errors import EmptyIndexError, IndexNotFoundError, MMSearchError, first_line
    from mmsearch.models.listing import IndexedModel
    from mmsearch.store import Store

    found = []
    folders = sorted(p for p in home.iterdir() if p.is_dir()) if home.is_dir() else []
    for folder in (f for f in folders if not f.name.startswith(".")):
        try:
            store = Store.open(folder, create=False)
        except (IndexNotFoundError, EmptyIndexError):
            continue
        except MMSearchError as exc:
            err(f"index {folder.name!r} not read: {first_line(exc)}")
            continue
        try:
            if store.model is not None:
                found.append(IndexedModel(folder.name, store.model, store.weights_file))
        finally:
            store.close()
    return found


def format_table(entries: list["ModelEntry"]) -> str:
    """One row per model, then the legend, notes on other benchmarks, and the sources."""
    head = ["MODEL", "FOR", "PARAMS", "PX", "DIM", "WEIGHTS", "TORCH", "ONNX", "INT8", "TEXT",
            *(h for h, _ in COLUMNS)]
    rows = [head] + [_row(e) for e in entries]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines += ["", *LEGEND]
    lines += [f"{e.name}: {note}" for e in entries if (note := _other_figures(e))]
    sources = dict.fromkeys(e.figures_source for e in entries if e.figures_source)
    lines += [f"figures: {s}" for s in sources]
    return "\n".join(lines)


def _row(e: "ModelEntry") -> list[str]:
    use = ", ".join(filter(None, [e.use, *(f"index {i}" for i in e.indexes)]))
    if not use and "cached" in e.listed_as:
        use = "cached"
    sizes = [_count(e.params), str(e.image_size or "—"), str(e.embed_dim or "—")]
    runtimes = [SHORT.get(state, state) for state in e.runtimes.values()]  # listing.RUNTIMES' order
    figures = [f"{e.figures[f]:.1f}" if f in e.figures else "—" for _, f in COLUMNS]
    return [e.name, use or "—", *sizes, e.weights, *runtimes, *figures]


def _count(params: int | None) -> str:
    if params is None:
        return "—"
    return f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.1f}M"


def _other_figures(e: "ModelEntry") -> str:
    """Text->image R@1 on benchmarks outside the table's columns (Chinese-CLIP's)."""
    found = [f"{label} {e.figures[f]:.1f}" for f, label in OTHER_BENCHMARKS.items()
             if f in e.figures]
    return f"text->image R@1 % {', '.join(found)} (zero-shot)" if found else ""
