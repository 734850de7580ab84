"""`mmsearch query`: the query language and the filters, over :meth:`Engine.search`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from mmsearch.cli.common import (DeviceOpt, HomeOpt, IndexOpt, JsonOpt, ModelOpt, PretrainedOpt,
                                 err, handle_errors, open_engine, print_json)
from mmsearch.errors import UsageError
from mmsearch.search.filters import OPTIONS
from mmsearch.settings import DEDUP_THRESHOLD, DEVICE

Opt = typer.Option
_HELP = {name: o.help for name, o in OPTIONS.items()}


@handle_errors
def query_command(
    terms: Annotated[Optional[list[str]], typer.Argument(
        help="What to look for: words, an image file, id:N, joined by + and - "
        "(\"2:golden retriever\" + ./pool.jpg - fruit).", show_default=False)] = None,
    image: Annotated[Optional[Path], Opt(help="Search with this image (a term like any other).")] = None,
    texts: Annotated[bool, Opt("--texts", help="Search the indexed texts, not the images.")] = False,
    k: Annotated[int, Opt("-k", "--k", help="How many results.")] = 10,
    within: Annotated[Optional[Path], Opt("--in", help=_HELP["in"])] = None,
    after: Annotated[Optional[str], Opt(help=_HELP["after"])] = None,
    before: Annotated[Optional[str], Opt(help=_HELP["before"])] = None,
    camera: Annotated[Optional[str], Opt(help=_HELP["camera"])] = None,
    ext: Annotated[Optional[str], Opt(help=_HELP["ext"])] = None,
    near: Annotated[Optional[str], Opt(help=_HELP["near"])] = None,
    km: Annotated[Optional[float], Opt(help=_HELP["km"])] = None,
    min_score: Annotated[Optional[float], Opt(help=_HELP["min_score"])] = None,
    sort: Annotated[str, Opt(help=_HELP["sort"])] = "score",
    dedup: Annotated[bool, Opt("--dedup", help=_HELP["dedup"] + " (cosine >= "
                               "--dedup-threshold)")] = False,
    dedup_threshold: Annotated[float, Opt(help="Cosine at or above which --dedup hides a hit.")] = DEDUP_THRESHOLD,
    type_: Annotated[Optional[str], Opt("--type", help=_HELP["type"])] = None,
    moments: Annotated[bool, Opt("--moments", help=_HELP["moments"])] = False,
    index: IndexOpt = None, home: HomeOpt = None, model: ModelOpt = None,
    pretrained: PretrainedOpt = None, device: DeviceOpt = DEVICE, as_json: JsonOpt = False,
) -> None:
    """Rank indexed images (or, with --texts, indexed texts) by similarity to the query."""
    from mmsearch.search.filters import from_options
    from mmsearch.search.query import Query
    from mmsearch.search.syntax import parse

    query = parse(terms) if terms else Query()
    if image is not None:
        query = query + Query.image(image)
    if not query.terms:
        raise UsageError("give something to search for: words, an image file, id:N, or --image PATH")
    filters = from_options(within=within, after=after, before=before, camera=camera, ext=ext,
                           near=near, km=km, min_score=min_score, sort=sort, dedup=dedup,
                           dedup_threshold=dedup_threshold, type=type_, moments=moments)
    if texts and (filters.selects or sort != "score" or dedup or moments):
        raise UsageError("--in, --after, --before, --camera, --ext, --near, --type, --sort, "
                         "--dedup and --moments apply to images, not to --texts")
    with open_engine(index=index, home=home, model=model, pretrained=pretrained,
                     device=device) as engine:
        hits: list[Any] = (engine.search_texts(query, k=k) if texts
                           else engine.search(query, k=k, filters=filters))
        for note in engine.store.repairs:
            err(f"repaired: {note}")
    if getattr(hits, "hint", None):
        err(f"hint: {hits.hint}")
    _print_hits(hits, texts, as_json, filters)


def _print_hits(hits: list[Any], texts: bool, as_json: bool, filters: Any) -> None:
    if as_json:
        print_json(hits)
        return
    if not hits:
        shaped = filters.selects or filters.min_score is not None
        typer.echo("no results" + (" (nothing indexed matches the filters)" if shaped else ""))
    for h in hits:
        what = h.text if texts else h.path
        if not texts and h.kind == "video":
            what = f"{h.path} @ {clock(h.start)}–{clock(h.end)}"
        when = f"  {h.taken or '-':<19}" if filters.sort != "score" else ""
        typer.echo(f"{h.rank:>3}  {h.score:.4f}{when}  {what}")


def clock(seconds: float | None) -> str:
    """``83.4`` -> ``1:23``; ``3723`` -> ``1:02:03``."""
    total = int(seconds or 0)
    hours, rest = divmod(total, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"
