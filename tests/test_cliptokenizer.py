"""The torch-free CLIP tokenizer gives open_clip's token ids, text for text."""

from __future__ import annotations

import random
import subprocess
import sys

import numpy as np
import pytest

from mmsearch.models.cliptokenizer import clean, tokenizer

SAMPLES = [
    "", " ", "a red circle", "  A  Blue SQUARE!! ", "two dogs play in the snow near a wooden fence.",
    "Ünïcödé &amp; <b>tags</b> 123", "&amp;amp;amp; &lt;x&gt; &#39;q&#39;", "word " * 100, "x" * 400,
    "一只猫坐在垫子上", "日本語のテキストとカタカナ、ひらがな。", "한국어 문장입니다", "Привет, мир!",
    "مرحبا بالعالم", "नमस्ते दुनिया", "🐶🐱 dogs & cats ❤️‍🔥 👨‍👩‍👧", "Ｆｕｌｌ ｗｉｄｔｈ ＡＢＣ",
    "it's they're we've I'm you'll he'd IT'S", "<start_of_text> hi <end_of_text> there",
    "“curly” ‘quotes’ — dash … ellipsis", "Ã©tÃ© mojibake cafÃ©", "naïve café résumé façade",
    "a\x0cb\x0bc\rd\x00e\x1b[31mred\x1b[0m", "tabs\tand\nnew\r\nlines", "ﬁne ﬂower ligatures",
    "1234567890 3.14159 1,000,000", "e\u0301 composed vs é", "zero\u200bwidth\u200djoiner",
    "\ud83d lone surrogate", "emoji flags 🇫🇷🇯🇵 and skin 👍🏽", "C++ & C# <-> f(x)=x^2 @user #tag",
]


def _random_texts(n: int) -> list[str]:
    rng = random.Random(0)
    alphabet = ("abcdefghijklmnopqrstuvwxyz ABCXYZ .,!?&;:'\"<>()-_/ 0123456789 "
                "éüßçñ 中文字猫狗 カタ 한 я 🙂🐶❤️ \t\n\r\x0c\x00 &amp;")
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 200))) for _ in range(n)]


@pytest.mark.parametrize("context_length", [77, 16])
def test_token_ids_equal_open_clips(context_length: int) -> None:
    from open_clip.tokenizer import SimpleTokenizer

    ours, ref = tokenizer(context_length), SimpleTokenizer(context_length=context_length)
    assert ours is not None
    texts = SAMPLES + _random_texts(400)
    got, want = ours(texts), ref(texts).numpy()
    assert got.dtype == np.int64 and got.shape == want.shape == (len(texts), context_length)
    differ = [t for t, a, b in zip(texts, got, want) if not np.array_equal(a, b)]
    assert differ == []


def test_cleaning_skips_ftfy_only_where_it_changes_nothing() -> None:
    from open_clip.tokenizer import _clean_lower

    for text in SAMPLES + _random_texts(400):
        assert clean(text) == _clean_lower(text), repr(text)


def test_tokenizing_imports_no_torch() -> None:
    code = ("import sys\nfrom mmsearch.models.cliptokenizer import tokenizer\n"
            "print(tokenizer(77)(['a red circle', '猫 🐶'])[0, :5].tolist(), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("]")[-1].strip() == "False"
