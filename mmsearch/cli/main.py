"""The `mmsearch` commands: index, query, texts add, info, remove, check (and eval, from
:mod:`.eval`). Each resolves its settings once, calls the library, and prints."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from mmsearch.cli.common import (OneLineErrors, BatchSizeOpt, DecoderOpt, DeviceOpt, RuntimeOpt, DraftOpt, HomeOpt, IndexOpt, JsonOpt,
                                 ModelOpt, PretrainedOpt, WorkersOpt, err, handle_errors,
                                 open_engine, print_json)
from mmsearch.cli.eval import eval_command
from mmsearch.cli.interrupt import stop_on_sigint
from mmsearch.cli.models import models_command
from mmsearch.cli.query import query_command
from mmsearch.cli.serve import serve_command
from mmsearch.cli.train import distill_command, finetune_command
from mmsearch.cli.watching import RescanOpt, WatchOpt, keep_watching, watch_options
from mmsearch.settings import BATCH_SIZE, DEDUP_THRESHOLD, DEVICE, DRAFT, VIDEO_FPS, WORKERS

app = typer.Typer(help="Search photo folders and image-text collections by meaning.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  cls=OneLineErrors)
texts_app = typer.Typer(help="Index texts to search from an image (image -> text).",
                        no_args_is_help=True)
app.add_typer(texts_app, name="texts")


@app.command()
@handle_errors
def index(
    paths: Annotated[list[Path], typer.Argument(help="Folders or files to index (with --runner ray also "
                                                       "fsspec URLs: s3://bucket/photos/).")],
    index: IndexOpt = None, home: HomeOpt = None, model: ModelOpt = None,
    pretrained: PretrainedOpt = None, device: DeviceOpt = DEVICE,
    batch_size: BatchSizeOpt = BATCH_SIZE, workers: WorkersOpt = WORKERS, draft: DraftOpt = DRAFT,
    decoder: DecoderOpt = "auto", runtime: RuntimeOpt = "auto",
    index_type: Annotated[Optional[str], typer.Option(help="auto, flat, hnsw, ivf, ivfsq, ivfpq or a "
                                                      "FAISS factory string.")] = None,
    runner: Annotated[str, typer.Option(help="local (this process) or ray (a Ray cluster; "
                                        "pip install 'mmsearch[ray]').")] = "local",
    address: Annotated[Optional[str], typer.Option(help="Ray cluster address for --runner ray "
                                                   "(auto: the one this machine joined; "
                                                   "default: a local Ray for the run).")] = None,
    storage: Annotated[str, typer.Option(help="Where a new index keeps its image vectors: catalog "
                                         "(SQLite), shards (npy files; the catalog keeps rows) "
                                         "or auto (shards with --runner ray, else catalog); an "
                                         "existing index keeps its own.")] = "auto",
    video_fps: Annotated[float, typer.Option(help="Frames sampled per second of video (plus "
                                             "the first frame of each shot).")] = VIDEO_FPS,
    watch: WatchOpt = False, rescan_every: RescanOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Embed every image and video under PATHS (recursively); re-runs only embed what changed."""
    from mmsearch.progress import ProgressBar

    stop = threading.Event()
    watching = watch_options(watch, rescan_every)
    with open_engine(create=True, index=index, home=home, model=model, pretrained=pretrained,
                     device=device, batch_size=batch_size, workers=workers, draft=draft,
                     index_type=index_type, decoder=decoder, runtime=runtime,
                     video_fps=video_fps) as engine, \
            stop_on_sigint(stop):
        with ProgressBar(enabled=not as_json) as bar:
            report = engine.index(paths, progress=bar.update, stop=stop, runner=runner,
                                  address=address, storage=storage)
        if as_json:
            print_json(report)
        else:
            _print_report(report)
        if watching is not None and not report.interrupted:
            keep_watching(engine, _given_roots(paths), stop, watching, runner=runner,
                          address=address)
    if report.interrupted:
        err("interrupted: everything embedded so far is saved; run the same command to resume")
        raise typer.Exit(130)


def _given_roots(paths: list[Path]) -> list[str]:
    from mmsearch.locations import given_root

    return [given_root(p) for p in paths]


def _print_report(report: Any) -> None:
    moved = f"moved {report.moved}, " if report.moved else ""
    typer.echo(f"added {report.added}, updated {report.updated}, unchanged {report.unchanged}, "
               f"{moved}removed {report.removed}, skipped {len(report.skipped)} "
               f"({report.embedded} embedded in {report.seconds:.1f}s, "
               f"{report.images_per_second:.1f} images/s)")
    if report.frames:
        typer.echo(f"  videos: {report.frames} moments stored")
    if report.videos_without_decoder:
        typer.echo(f"  {report.videos_without_decoder} videos not indexed: they need PyAV, "
                   "pip install 'mmsearch[video]'")
    for w in report.warnings:
        typer.echo(f"  partly indexed {w.path!r}: {w.reason}")
    if report.metadata_read:
        typer.echo(f"  read the metadata (dates, cameras, places) of {report.metadata_read} "
                   "images indexed before")
    for s in report.skipped:
        typer.echo(f"  skipped {s.path!r}: {s.reason}")


@texts_app.command("add")
@handle_errors
def texts_add(
    file: Annotated[Path, typer.Argument(help="A .txt file (one text per line) or .jsonl "
                                         "({\"id\": ..., \"text\": ...} per line); - for stdin.")],
    index: IndexOpt = None, home: HomeOpt = None, model: ModelOpt = None,
    pretrained: PretrainedOpt = None, device: DeviceOpt = DEVICE, as_json: JsonOpt = False,
) -> None:
    """Embed texts so that images can find them (query --image X --texts)."""
    from mmsearch.ingest.texts import read_texts

    items = read_texts(file)
    with open_engine(create=True, index=index, home=home, model=model, pretrained=pretrained,
                     device=device) as engine:
        report = engine.add_texts(items)
    if as_json:
        print_json(report)
    else:
        typer.echo(f"texts: added {report.added}, replaced {report.replaced}, "
                   f"unchanged {report.unchanged}")


@app.command()
@handle_errors
def info(index: IndexOpt = None, home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """What an index holds, which model built it, and where its files are."""
    from mmsearch.store import storage_summary

    with open_engine(index=index, home=home) as engine:
        data = engine.info()
    if as_json:
        print_json(data)
        return
    typer.echo(f"index      {data.name}\nlocation   {data.location}")
    typer.echo(f"model      {data.model.describe() if data.model else '-'} (dim {data.dim})")
    typer.echo(f"images     {data.images} ({data.distinct_images} distinct)\ntexts      {data.texts}")
    if data.videos:
        typer.echo(f"videos     {data.videos} ({data.frames} moments)")
    typer.echo(f"vectors    {data.image_index} (schema v{data.schema_version})")
    storage = storage_summary(data.storage)
    if storage:
        typer.echo(f"storage    {storage}")
    for name, size in data.files.items():
        typer.echo(f"  {name:<16} {size / 1e6:10.1f} MB")
    _print_metadata(data.metadata)
    for note in data.repairs:
        typer.echo(f"repaired   {note}")


def _print_metadata(meta: Any) -> None:
    if meta.first_taken:
        typer.echo(f"taken      {meta.first_taken[:10]} .. {meta.last_taken[:10]} "
                   f"({meta.dates_from_exif} dated by EXIF, {meta.dates_from_mtime} by file time)")
    if meta.not_read:
        typer.echo(f"metadata   not read yet for {meta.not_read} images (run `mmsearch index` "
                   "on their folders, or `mmsearch check --repair`)")
    cameras = [f"{name or '(none)'} {n}" for name, n in list(meta.cameras.items())[:8]]
    if cameras:
        more = len(meta.cameras) - 8
        typer.echo("cameras    " + ", ".join(cameras) + (f", +{more} more" if more > 0 else ""))


@app.command()
@handle_errors
def duplicates(
    threshold: Annotated[float, typer.Option(help="Cosine at or above which two photos (or "
                                             "video frames) are near-duplicates.")] = DEDUP_THRESHOLD,
    index: IndexOpt = None, home: HomeOpt = None, as_json: JsonOpt = False,
) -> None:
    """Groups of near-duplicate photos and videos (identical files said as such), largest
    groups first; a video is one member, shown with its best-matching moment."""
    from mmsearch.cli.query import clock

    with open_engine(index=index, home=home) as engine:
        groups = engine.duplicates(threshold=threshold)
    if as_json:
        print_json(groups)
        return
    nouns = {frozenset({"image"}): "photos", frozenset({"video"}): "videos"}
    for n, group in enumerate(groups, 1):
        noun = nouns.get(frozenset(m.kind for m in group.members), "photos and videos")
        kind = "identical files" if group.exact else f"similar {noun} (cosine >= {threshold})"
        typer.echo(f"group {n}: {len(group.members)} {kind}")
        for m in group.members:
            typer.echo(f"  {m.path}" + ("" if m.time is None else f" @ {clock(m.time)}"))
    members = [m.kind for g in groups for m in g.members]
    videos = f", {members.count('video')} videos" if "video" in members else ""
    typer.echo(f"{len(groups)} groups, {members.count('image')} photos{videos}" if groups
               else "no duplicates found")


@app.command()
@handle_errors
def export(
    directory: Annotated[Path, typer.Argument(help="An empty (or new) folder to write to.")],
    fmt: Annotated[str, typer.Option("--format", help="npy: clip-retrieval's layout (float16 .npy "
                                     "+ parquet metadata); parquet: embeddings in the parquet "
                                     "files.")] = "npy",
    shard_size: Annotated[int, typer.Option(help="Rows per file.")] = 1_000_000,
    index: IndexOpt = None, home: HomeOpt = None, as_json: JsonOpt = False,
) -> None:
    """Write the embeddings and metadata for other tools (autofaiss, clip-retrieval, LanceDB)."""
    from mmsearch.export import export_index

    with open_engine(index=index, home=home) as engine:
        report = export_index(engine.store, directory, fmt=fmt, shard_size=shard_size)
    if as_json:
        print_json(report)
        return
    typer.echo(f"exported {report.images} images and {report.texts} texts to {report.directory} "
               f"({len(report.files)} files)")


@app.command()
@handle_errors
def remove(path: Annotated[Path, typer.Argument(help="A folder or file to forget.")],
           index: IndexOpt = None, home: HomeOpt = None) -> None:
    """Forget every indexed image at or under PATH (the files are not touched)."""
    with open_engine(index=index, home=home) as engine:
        n = engine.remove(path)
    typer.echo(f"removed {n} images")


@app.command()
@handle_errors
def check(repair: Annotated[bool, typer.Option(help="Fix what can be fixed: rebuild the vector "
                                               "files, re-embed damaged vectors, forget deleted files.")] = False,
          index: IndexOpt = None, home: HomeOpt = None) -> None:
    """Verify the catalog and the vector files against each other and the disk."""
    with open_engine(index=index, home=home) as engine:
        problems, done = engine.check(repair=repair)
    for line in problems:
        typer.echo(f"problem   {line}")
    for line in done:
        typer.echo(f"repaired  {line}")
    if not problems:
        typer.echo("ok: catalog and vector files agree")
    elif not repair:
        typer.echo("run `mmsearch check --repair` to fix")
        raise typer.Exit(1)


app.command("query")(query_command)
app.command("serve")(serve_command)
app.command("eval")(eval_command)
app.command("finetune")(finetune_command)
app.command("distill")(distill_command)
app.command("models")(models_command)


def _notes_as_lines() -> None:
    """The library's notes (logger ``mmsearch``, one line each) on stderr as they are written.
    open_clip logs through the root logger, which makes Python install its default handler:
    the notes would then read 'WARNING:mmsearch.models:...'."""
    import logging

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    notes = logging.getLogger("mmsearch")
    notes.addHandler(handler)
    notes.propagate = False


def main() -> None:
    """The console script. Once a command has finished and its output is flushed, a process
    that loaded torch ends at once: tearing torch and FAISS down costs ~0.7 s after the
    results are on screen, and there is nothing left to save (every write is committed,
    files are closed, the kernel releases the write lock)."""
    _notes_as_lines()
    try:
        app(prog_name="mmsearch")
        code: int | str | None = 0
    except SystemExit as exc:
        code = exc.code
    if "torch" not in sys.modules:
        sys.exit(code)
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):  # a closed pipe (e.g. `| head`): nothing more to say
        pass
    os._exit(code or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
