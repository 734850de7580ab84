"""Which languages a text tower reads, and a hint when a query is written in another script.

CLIP's own text towers (ViT-B-32, ViT-L-14 and the other plain open_clip models)
were trained on English captions: a query in Chinese, Japanese, Korean, Cyrillic,
Arabic... script still gets an answer, but a poor one. Detection goes by the
script of the letters (Unicode names), never by guessing a language.
"""

from __future__ import annotations

import unicodedata
from collections import Counter

from mmsearch.models.identity import OPEN_CLIP, ModelIdentity

# open_clip architectures whose text tower was trained on many languages
MULTILINGUAL_ARCHS = ("xlm-roberta", "nllb-clip", "i18n", "mt5", "multilingual")
_SCRIPT_NAMES = {"CJK": "Chinese", "HIRAGANA": "Japanese", "KATAKANA": "Japanese",
                 "KATAKANA-HIRAGANA": "Japanese",
                 "HANGUL": "Korean", "CYRILLIC": "Cyrillic", "ARABIC": "Arabic",
                 "HEBREW": "Hebrew", "GREEK": "Greek", "DEVANAGARI": "Devanagari",
                 "THAI": "Thai", "BENGALI": "Bengali", "TAMIL": "Tamil", "GEORGIAN": "Georgian",
                 "ARMENIAN": "Armenian", "ETHIOPIC": "Ethiopic"}


def reads_english_only(identity: ModelIdentity) -> bool:
    """Whether the identity's text tower is one trained on English captions only."""
    if identity.backend != OPEN_CLIP or identity.text_pretrained:
        return False
    arch = identity.arch.lower()
    return not any(marker in arch for marker in MULTILINGUAL_ARCHS)


def scripts(text: str) -> list[str]:
    """The non-Latin scripts of the letters in ``text``, most letters first."""
    counts: Counter[str] = Counter()
    for char in text:
        if not char.isalpha():
            continue
        word = unicodedata.name(char, "").split(" ")[0]
        if word and word != "LATIN":
            counts[_SCRIPT_NAMES.get(word, word.title())] += 1
    return [name for name, _ in counts.most_common()]


def language_hint(identity: ModelIdentity, texts: list[str]) -> str | None:
    """One line for a query written in a script the model does not read, else None."""
    if not reads_english_only(identity):
        return None
    found = [s for text in texts for s in scripts(text)]
    if not found:
        return None
    return (f"{identity.arch} reads English only, and this query is in {found[0]} script: "
            "for other languages build an index with `--model multilingual` or, for Chinese, "
            "`--model chinese` (see the README: Multilingual and Chinese search)")
