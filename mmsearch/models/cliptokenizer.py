"""CLIP's byte-pair tokenizer without torch: open_clip's ``SimpleTokenizer``, token for token.

open_clip's ``tokenizer.py`` imports torch at module level (about 1-2 s of a cold
query), so text queries use this copy of its algorithm (OpenAI CLIP's, MIT licence)
instead: the same vocabulary file, read from the installed open_clip package folder
without importing open_clip; the same cleaning (``ftfy``, HTML unescaping, whitespace,
lower case), the same pre-tokenising pattern and merges, the same truncation. It
returns numpy ``int64`` ids. The tests hold it equal to open_clip's tokenizer over
ASCII, unicode, CJK, emoji, HTML entities, control characters and long texts.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
_MERGES = 49152 - 256 - 2  # merges open_clip reads from the file
_SPECIAL = ("<start_of_text>", "<end_of_text>")
_PLAIN = frozenset(map(chr, range(32, 127))) - {"&"} | {"\t", "\n"}  # ftfy leaves these alone


def vocab_path() -> Path | None:
    """open_clip's vocabulary file, found without importing open_clip (None if absent)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / VOCAB_FILE
    return path if path.is_file() else None


@lru_cache(maxsize=1)
def _byte_encoder() -> dict[int, str]:
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, map(chr, cs)))


def clean(text: str) -> str:
    """open_clip's ``lower`` cleaning: ftfy, HTML unescaped twice, whitespace folded, lower case.

    ``ftfy`` (~90 ms to import) is skipped for printable ASCII without ``&``, which it
    returns unchanged."""
    if not set(text) <= _PLAIN:
        import ftfy

        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split()).strip().lower()


class ClipTokenizer:
    """Texts -> (N, context_length) int64 token ids, as open_clip's ``SimpleTokenizer()``."""

    def __init__(self, path: Path, context_length: int = 77) -> None:
        import regex

        # merges as the file writes them, "a b": symbols never hold a space (bytes are mapped)
        merges = gzip.open(path).read().decode("utf-8").split("\n")[1:_MERGES + 1]
        units = list(_byte_encoder().values())
        vocab = [*units, *(u + "</w>" for u in units), *(m.replace(" ", "") for m in merges), *_SPECIAL]
        self.encoder = dict(zip(vocab, range(len(vocab))))
        self.ranks = dict(zip(merges, range(len(merges))))
        self.cache: dict[str, str] = {t: t for t in _SPECIAL}
        self.pattern = regex.compile("|".join(_SPECIAL) + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                                     regex.IGNORECASE)
        self.sot, self.eot = self.encoder[_SPECIAL[0]], self.encoder[_SPECIAL[1]]
        self.context_length = context_length

    def bpe(self, token: str) -> str:
        """The merged symbols of one pre-token, space-separated (cached)."""
        if token in self.cache:
            return self.cache[token]
        word = (*token[:-1], token[-1] + "</w>")
        ranks, never = self.ranks, len(self.ranks)
        while len(word) > 1:
            best = min({f"{a} {b}" for a, b in zip(word, word[1:])}, key=lambda p: ranks.get(p, never))
            if best not in ranks:
                break
            word = _merge(word, best.split(" "))
        out = " ".join(word)
        self.cache[token] = out
        return out

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without the start and end tokens."""
        enc, byte = self.encoder, _byte_encoder()
        ids: list[int] = []
        for token in self.pattern.findall(clean(text)):
            token = "".join(byte[b] for b in token.encode("utf-8"))
            ids.extend(enc[t] for t in self.bpe(token).split(" "))
        return ids

    def __call__(self, texts: Sequence[str]) -> "np.ndarray":
        import numpy as np

        n = self.context_length
        out = np.zeros((len(texts), n), dtype=np.int64)
        for i, text in enumerate(texts):
            ids = [self.sot, *self.encode(text), self.eot]
            if len(ids) > n:
                ids = ids[:n]
                ids[-1] = self.eot
            out[i, :len(ids)] = ids
        return out


def _merge(word: tuple[str, ...], pair: list[str]) -> tuple[str, ...]:
    """``word`` with every occurrence of ``pair`` (left to right) joined into one symbol."""
    first, second = pair
    out: list[str] = []
    i = 0
    while i < len(word):
        if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
            out.append(first + second)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


@lru_cache(maxsize=4)
def tokenizer(context_length: int = 77) -> ClipTokenizer | None:
    """The tokenizer over open_clip's vocabulary file, or None where open_clip is not installed."""
    path = vocab_path()
    return ClipTokenizer(path, context_length) if path is not None else None


__all__ = ["ClipTokenizer", "clean", "tokenizer", "vocab_path"]
