"""What every command shares: options (declared once), error handling, JSON output.

Every :class:`~mmsearch.errors.MMSearchError` becomes one line on stderr and its
exit code (2 usage, 1 otherwise, 130 interrupted).
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, Optional

import typer
from typer.core import TyperGroup

from mmsearch.errors import MMSearchError, first_line
from mmsearch.settings import resolve

if TYPE_CHECKING:  # pragma: no cover
    from mmsearch.engine import Engine

IndexOpt = Annotated[Optional[str], typer.Option(
    "--index", "-i", help="Index name (env MMSEARCH_INDEX; default: default).")]
HomeOpt = Annotated[Optional[Path], typer.Option(
    help="Data directory holding the indexes (env MMSEARCH_HOME; default ~/.local/share/mmsearch).")]
ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", "-m", help="open_clip architecture name or model-config JSON (default ViT-B-32, "
    "or the index's model).")]
PretrainedOpt = Annotated[Optional[str], typer.Option(
    "--pretrained", "-p", help="open_clip pretrained tag (downloaded once) or a local checkpoint "
    "file, or 'none' for random weights: timings only (default laion2b_s34b_b79k, or the index's).")]
DeviceOpt = Annotated[str, typer.Option(
    help="auto, cpu, cuda, cuda:1 ...: runs the model and, where FAISS has GPU support, search; "
    "openvino, coreml: ONNX Runtime's provider runs the image tower (--runtime onnx), the rest "
    "the CPU.")]
BatchSizeOpt = Annotated[int, typer.Option(help="Images per model batch.")]
WorkersOpt = Annotated[int, typer.Option(help="Decode threads (0 = auto).")]
DraftOpt = Annotated[bool, typer.Option(help="Fast reduced-size JPEG decoding before the "
                                        "resize (--no-draft: decode in full).")]
DecoderOpt = Annotated[str, typer.Option(
    help="auto, threads, processes or nvjpeg: where images are decoded (auto: threads on a "
    "CPU; nvJPEG on a CUDA GPU for baseline JPEGs, else worker processes).")]
RuntimeOpt = Annotated[str, typer.Option(
    help="Who runs the image tower: torch, onnx (ONNX Runtime, equal vectors) or onnx-int8 "
    "(int8 weights: faster, cosine ~0.99; the index records it); auto: the index's, else torch. "
    "pip install 'mmsearch[onnx]'.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


def err(message: str) -> None:
    typer.echo(f"mmsearch: {message}", err=True)


class OneLineErrors(TyperGroup):
    """The app's command group: a usage error (a bad option value, an unknown option, a
    missing argument) is one line on stderr and exit code 2, as the library's errors are."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.TyperException as exc:  # click's usage errors, as typer carries them
            where = getattr(exc, "ctx", None)
            if type(exc).__name__ == "NoArgsIsHelpError" and where is not None:
                typer.echo(where.get_help())  # `mmsearch` or `mmsearch texts` alone
            else:
                hint = f" (see '{where.command_path} --help')" if where is not None else ""
                err(" ".join(exc.format_message().split()) + hint)
            rv = getattr(exc, "exit_code", 2)
        except typer.Abort:
            err("aborted")
            rv = 1
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


def handle_errors(fn: Callable) -> Callable:
    """Turn library errors into one line on stderr and a non-zero exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MMSearchError as exc:
            err(first_line(exc))
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err("interrupted")
            raise typer.Exit(130) from None

    return wrapper


def open_engine(*, create: bool = False, **flags: Any) -> "Engine":
    from mmsearch.engine import Engine

    return Engine(resolve(**flags), create=create)


def print_json(data: Any) -> None:
    """Print hits, reports or any result as JSON, through :func:`mmsearch.search.hits.to_json`."""
    from mmsearch.search.hits import to_json

    typer.echo(json.dumps(to_json(data), indent=2, ensure_ascii=False))
