"""`mmsearch eval`: retrieval recall of the engine on an image-text or video-text benchmark."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from mmsearch.cli.common import (BatchSizeOpt, DeviceOpt, ModelOpt, PretrainedOpt, WorkersOpt,
                                 handle_errors)
from mmsearch.eval import DRAFT
from mmsearch.settings import BATCH_SIZE, DEVICE, WORKERS

if TYPE_CHECKING:  # pragma: no cover
    from mmsearch.eval.datasets import RetrievalDataset
    from mmsearch.eval.evaluate import EvalResult


@handle_errors
def eval_command(
    karpathy_json: Annotated[Optional[Path], typer.Option(
        "--karpathy-json", help="Captions and splits in Karpathy's format "
        "(dataset_coco.json, dataset_flickr30k.json...).")] = None,
    data: Annotated[Optional[Path], typer.Option(
        "--data", help="A Karpathy JSON, a Chinese-CLIP folder ({split}_texts.jsonl with "
        "images in --images or {split}_imgs.tsv) or an XTD10 folder (test_image_names.txt + "
        "test_1kcaptions_LANG.txt), or videos: an MSR-VTT folder (MSRVTT_JSFUSION_test.csv), a "
        ".csv or a .json array of video_id,caption rows.")] = None,
    images: Annotated[Optional[Path], typer.Option(
        "--images", "--videos", help="Folder the image names are relative to (for videos: "
        "the folder of <video_id>.<ext> files).")] = None,
    language: Annotated[str, typer.Option(help="XTD10 captions language: zh, ja, ko, de...")] = "zh",
    dataset: Annotated[Optional[str], typer.Option(
        "--dataset", "-d", help="coco, flickr30k, flickr8k, msrvtt (sizes checked against the "
        "standard split) or any name (default: the JSON's 'dataset' value).")] = None,
    split: Annotated[str, typer.Option(help="Split to evaluate: test, val, train...")] = "test",
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    index_type: Annotated[str, typer.Option(
        help="Image index searched: flat, hnsw, ivf, ivfsq, ivfpq or a FAISS factory string; an "
        "approximate one is also compared with exact search.")] = "flat",
    home: Annotated[Optional[Path], typer.Option(
        help="Data directory for the (reused) evaluation index (env MMSEARCH_HOME).")] = None,
    device: DeviceOpt = DEVICE,
    batch_size: BatchSizeOpt = BATCH_SIZE, workers: WorkersOpt = WORKERS,
    draft: Annotated[bool, typer.Option(
        "--draft/--no-draft", help="Decode big JPEGs at a reduced DCT scale (never below the "
        "model's input) before the resize: faster, but not the pixels open_clip's preprocess "
        "sees, so scores move. Default: full decoding, as published figures.")] = DRAFT,
    json_out: Annotated[Optional[Path], typer.Option(
        "--json", help="Also write the results to this JSON file.")] = None,
) -> None:
    """Text->image and image->text Recall@1/5/10 of the engine on a benchmark split.

    Images go through the same ingest pipeline as `mmsearch index` (but JPEGs are
    decoded in full unless --draft), into an index named after the dataset, model
    and decoding under --home; a second run reuses it, so --index-type can be
    compared without embedding again. Videos are indexed as `mmsearch index` does
    and each is the mean of its frames (text->video, video->text, and median rank).
    """
    from mmsearch.errors import UsageError
    from mmsearch.eval.datasets import load_dataset, pos_tag_warning
    from mmsearch.eval.evaluate import evaluate
    from mmsearch.progress import ProgressBar
    from mmsearch.settings import resolve

    settings = resolve(home=home, model=model, pretrained=pretrained, device=device,
                       batch_size=batch_size, workers=workers)
    if (karpathy_json is None) == (data is None):
        raise UsageError("give the dataset: --data PATH (or --karpathy-json FILE)")
    data_set = load_dataset(data or karpathy_json, images, split=split, name=dataset,
                            language=language)
    for warning in [*_expected_size_warnings(data_set, dataset), pos_tag_warning(data_set)]:
        if warning:
            typer.echo(f"mmsearch: warning: {warning}", err=True)
    with ProgressBar() as bar:
        result = evaluate(data_set, settings=settings, index_type=index_type, draft=draft,
                          progress=bar.update)
    typer.echo(format_table(result))
    if json_out is not None:
        _write_json(json_out, result.to_dict())
        typer.echo(f"wrote {json_out}")


def _expected_size_warnings(data: "RetrievalDataset", name: str | None) -> list[str]:
    """Differences from the published split size, when ``name`` is a known benchmark."""
    from mmsearch.eval.datasets import check_expected, resolve_known
    from mmsearch.errors import UsageError

    if name is None:
        return []
    try:
        resolve_known(name)
    except UsageError:
        return []  # any other dataset in the same format: nothing to compare with
    return check_expected(data, name)


def format_table(r: "EvalResult") -> str:
    """The human-readable report of one evaluation."""
    media = r.media
    frames = f" ({r.n_frames} frames)" if r.n_frames is not None else ""
    decoding = (f"{r.video_fps:g} frame/s plus each shot's first, as mmsearch index samples"
                if media == "video" else
                "reduced-DCT draft (--draft)" if r.draft else "full JPEG decoding")
    lines = [
        f"dataset     {r.dataset} / {r.split}: {r.n_images} {media}s{frames}, "
        f"{r.n_captions} captions",
        f"model       {r.model['description']} on {r.device}",
        f"decoding    {decoding}",
        f"index       {r.index_type}  ({r.index_name})",
        "",
        *_recall_rows(r),
        f"rsum {r.rsum:.2f}   mean recall {r.mean_recall:.2f}",
    ]
    if r.approx_overlap is not None:
        lines.append(f"approximate vs exact top-10 (recall@10): {r.approx_overlap:.4f}")
    lines.append("")
    unit = "frames" if media == "video" else "images"
    if r.embedded:
        lines.append(f"embedding   {r.embedded} {unit} in {r.embed_seconds:.1f} s "
                     f"({r.images_per_second:.1f} {unit}/s)")
    else:
        lines.append(f"embedding   none: all {r.n_images} {media}s cached "
                     f"(checked in {r.embed_seconds:.1f} s)")
    lines.append(f"captions    {r.texts_embedded} embedded in {r.text_seconds:.1f} s; "
                 f"search {r.search_seconds:.2f} s; wall time {r.eval_seconds:.1f} s")
    lines += [f"note        {n}" for n in r.notes]
    return "\n".join(lines)


def _recall_rows(r: "EvalResult") -> list[str]:
    """The table of recalls, one row per direction; median and mean rank where measured."""
    ks = list(r.t2i)
    ranks = r.t2i_ranks is not None and r.i2t_ranks is not None
    head = "".join(f"{'R@' + str(k):>8}" for k in ks) + ("     MdR     MnR" if ranks else "")
    rows = [f"{'':<14}{head}"]
    for label, recalls, measured in ((f"text->{r.media}", r.t2i, r.t2i_ranks),
                                     (f"{r.media}->text", r.i2t, r.i2t_ranks)):
        tail = f"{measured['MdR']:8.1f}{measured['MnR']:8.1f}" if ranks else ""
        rows.append(f"{label:<14}" + "".join(f"{recalls[k]:8.2f}" for k in ks) + tail)
    return rows


def _write_json(path: Path, data: dict[str, Any]) -> None:
    from mmsearch.errors import StorageError

    try:
        path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    except OSError as exc:
        raise StorageError(f"cannot write {path}: {exc.strerror or exc}") from exc
