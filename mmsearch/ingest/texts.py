"""Reading texts to index: one per line (.txt) or JSON lines with id/text (.jsonl)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mmsearch.errors import UsageError


def read_texts(path: Path) -> list[tuple[str, str]]:
    """(key, text) pairs. Plain lines are keyed by their text; JSONL by its "id" (or line number)."""
    raw = _read(path)
    jsonl = path.suffix.lower() in (".jsonl", ".ndjson")
    items: list[tuple[str, str]] = []
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        if jsonl:
            items.append(_json_item(path, lineno, line))
        else:
            text = " ".join(line.split())
            items.append((text, text))
    if not items:
        raise UsageError(f"{path}: no texts found")
    return items


def _read(path: Path) -> str:
    if str(path) == "-":
        return sys.stdin.read()
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"no such file: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None


def _json_item(path: Path, lineno: int, line: str) -> tuple[str, str]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str) or not obj["text"].strip():
        raise UsageError(f'{path}:{lineno}: expected {{"id": ..., "text": "..."}}')
    key = obj.get("id", f"{path.name}:{lineno}")
    return str(key), obj["text"]
