"""The `mmsearch` command: a thin Typer shell over :class:`mmsearch.Engine`.

``main``    the commands index, query, texts add, info, remove, check; the console script
``eval``    mmsearch eval
``common``  options declared once, errors -> one line and an exit code, JSON output
"""

from __future__ import annotations

from mmsearch.cli.main import app, main

__all__ = ["app", "main"]
