"""Which languages a text tower reads, and a hint when a query is written in another script.

CLIP's own text towers (ViT-B-32, ViT-L-14 and the other plain open_clip models)
were trained on English captions: a query in Chinese, Japanese, Korean, Cyrillic,
Arabic... script still gets an answer, but a poor one. Detection goes by the
script of the letters (Unicode names), never by guessing a language.
"""

from __future__ import annotations

import json
import os
import unicodedata
from collections import Counter
from pathlib import Path

from mmsearch.models.identity import LOCAL_DIR, OPEN_CLIP, ModelIdentity

# open_clip architectures whose text tower was trained on many languages
MULTILINGUAL_ARCHS = ("xlm-roberta", "nllb-clip", "i18n", "mt5", "multilingual")
_SCRIPT_NAMES = {"CJK": "Chinese", "HIRAGANA": "Japanese", "KATAKANA": "Japanese",
                 "KATAKANA-HIRAGANA": "Japanese",
                 "HANGUL": "Korean", "CYRILLIC": "Cyrillic", "ARABIC": "Arabic",
                 "HEBREW": "Hebrew", "GREEK": "Greek", "DEVANAGARI": "Devanagari",
                 "THAI": "Thai", "BENGALI": "Bengali", "TAMIL": "Tamil", "GEORGIAN": "Georgian",
                 "ARMENIAN": "Armenian", "ETHIOPIC": "Ethiopic"}


def reads_english_only(identity: ModelIdentity) -> bool:
    """Whether the identity's text tower is one trained on English captions only.

    A ``local-dir:`` model is judged by its config: a Hugging Face text tower whose
    tokenizer is a local folder (a custom one) is taken to read its own languages.
    """
    if identity.backend != OPEN_CLIP or identity.text_pretrained:
        return False
    names = [identity.arch]
    if identity.arch.startswith(LOCAL_DIR):
        text_cfg = _local_text_cfg(identity.pretrained)
        names = [str(text_cfg.get(k, "")) for k in ("hf_model_name", "hf_tokenizer_name")]
        if any(os.sep in n for n in names):
            return False
    return not any(marker in n.lower() for n in names for marker in MULTILINGUAL_ARCHS)


def _local_text_cfg(folder: str) -> dict:
    try:
        config = json.loads((Path(folder) / "open_clip_config.json").read_text(encoding="utf-8"))
        return dict(config.get("model_cfg", {}).get("text_cfg", {}))
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


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
