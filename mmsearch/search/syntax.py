"""The query language of ``mmsearch query`` (and the HTTP API's ``q``), rclip-compatible.

Terms are joined by ``+`` and ``-`` standing alone between spaces::

    mmsearch query "2:golden retriever" + ./pool.jpg - fruit
    mmsearch query beach - people
    mmsearch query id:42 - "blurry photo"

Each term is a text, an image (an existing file; a term that names an image file
that does not exist is an error), or ``id:N`` (an indexed image, by the id hits
carry). A number and a colon in front weigh the term (``2:golden retriever``,
``0.5:sunset``); a colon followed by a digit is text (``2:30 pm``). A command-line
argument that is an existing file is always one image term, even with `` - `` in
its name. See :mod:`mmsearch.search.query` for how the terms combine and for the
bounds of weights and ids; a whole query has at most ``MAX_QUERY_CHARS`` characters.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable, Sequence

from mmsearch.errors import UsageError
from mmsearch.search.query import Query, image_id, shown
from mmsearch.search.search import MAX_QUERY_CHARS

_OPERATOR = re.compile(r"(?:^|\s)([+-])(?=\s|$)")
_WEIGHT = re.compile(r"^([^\s:]+):(?!\d)(\S.*)$", re.S)
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$", re.ASCII)
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".heic",
                   ".heif")


def parse(tokens: "Sequence[str] | str", *,
          is_file: Callable[[str], bool] = lambda p: os.path.isfile(os.path.expanduser(p))) -> Query:
    """The :class:`Query` that command-line arguments (or one string) spell."""
    tokens = [tokens] if isinstance(tokens, str) else list(tokens)
    size = sum(len(t) for t in tokens)
    if size > MAX_QUERY_CHARS:
        raise UsageError(f"query too long: {size} characters (at most {MAX_QUERY_CHARS})")
    pieces = _pieces(tokens, is_file)
    if not pieces:
        raise UsageError("empty query: give some words, an image or id:N to search for")
    query, sign, expect_term = Query(), 1.0, True
    for kind, value in pieces:
        if kind == "op":
            if expect_term:
                raise UsageError(f"'{value}' needs a term on both sides (e.g. beach - people)")
            sign, expect_term = (-1.0 if value == "-" else 1.0), True
            continue
        if not expect_term:
            raise UsageError(f"join the terms with + or - (before {shown(value)!r})")
        query, sign, expect_term = query + _term(kind, value, is_file) * sign, 1.0, False
    if expect_term:
        raise UsageError("the query ends with an operator: give a term after + or -")
    return query


def _pieces(tokens: list[str], is_file: Callable[[str], bool]) -> list[tuple[str, str]]:
    """("op", "+"/"-"), ("file", path) and ("text", words) pieces, in order."""
    out: list[tuple[str, str]] = []
    for token in tokens:
        if token.strip() in ("+", "-"):
            out.append(("op", token.strip()))
        elif is_file(token):
            out.append(("file", token))
        else:
            for piece in _split(token):  # words split over several arguments are one text
                if piece[0] == "text" and out and out[-1][0] == "text":
                    out[-1] = ("text", f"{out[-1][1]} {piece[1]}")
                else:
                    out.append(piece)
    return out


def _split(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    start = 0
    for m in _OPERATOR.finditer(text):
        if text[start:m.start()].strip():
            out.append(("text", text[start:m.start()].strip()))
        out.append(("op", m.group(1)))
        start = m.end()
    if text[start:].strip():
        out.append(("text", text[start:].strip()))
    return out


def _term(kind: str, value: str, is_file: Callable[[str], bool]) -> Query:
    weight, body = 1.0, value
    m = _WEIGHT.match(value) if kind == "text" else None
    if m and m.group(1).lower() != "id":
        if not _NUMBER.match(m.group(1)):
            if any(c.isdigit() for c in m.group(1)):
                raise UsageError(f"the weight {shown(m.group(1))!r} in {shown(value)!r} is not "
                                 "a number")
        else:
            weight, body = float(m.group(1)), m.group(2).strip()
    if kind == "file" or is_file(body):
        return Query.image(Path(body).expanduser(), weight)
    if body.lower().startswith("id:"):
        return _id_term(body, weight)
    if " " not in body and body.lower().endswith(_IMAGE_SUFFIXES):
        raise UsageError(f"no such image file: {shown(body, 200)}")
    return Query.text(body, weight)


def _id_term(body: str, weight: float) -> Query:
    return Query.id(image_id(body[3:].strip()), weight)
