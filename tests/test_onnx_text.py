"""Hugging Face text towers through ONNX Runtime: the multilingual preset's kind (open_clip
with a BERT or XLM-RoBERTa text tower) and Chinese-CLIP, exported once per model, equal to
the torch path, and cold text queries that import neither torch nor transformers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import draw_shapes

import tinyml

pytest.importorskip("onnxruntime")
pytest.importorskip("transformers")

from mmsearch.models import identify  # noqa: E402
from mmsearch.models.backends import (lean_text_encoder, load_embedder,  # noqa: E402
                                       load_text_encoder)
from mmsearch.models.onnxtext import FOLDER, OnnxTextEncoder  # noqa: E402

TEXTS = ["一个红色的圆", "a red circle", "  A  Blue   Square ", "&lt;一个&gt; 黄色", "", "<pad> x",
         "一个绿色的三角形" * 12, "Ein Hund 🐶 und eine Katze"]
XLMR_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # XLM-R's ids 0..4


def write_tiny_xlmr(folder: Path, **text_cfg: object) -> Path:
    """An open_clip ``local-dir:`` model shaped like the multilingual preset (an XLM-RoBERTa
    text tower: mean pooling, MLP projection; a SentencePiece-Unigram tokenizer trained on
    the captions here), random weights; ``text_cfg``: more of open_clip's text settings."""
    import open_clip
    import torch
    from safetensors.torch import save_file
    from tokenizers import SentencePieceUnigramTokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import XLMRobertaConfig, XLMRobertaTokenizerFast

    hf = folder / "hf"
    hf.mkdir(parents=True)
    unigram = SentencePieceUnigramTokenizer()
    corpus = tinyml.captions_en() + tinyml.captions_zh() + ["ein Hund und eine Katze", "x"]
    unigram.train_from_iterator(corpus * 5, vocab_size=200, special_tokens=XLMR_SPECIALS,
                                unk_token="<unk>", show_progress=False)
    backend = unigram._tokenizer
    backend.post_processor = TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0),
                                                                                      ("</s>", 2)])
    tok = XLMRobertaTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                  sep_token="</s>", cls_token="<s>", unk_token="<unk>",
                                  pad_token="<pad>", mask_token="<mask>")
    for where in (folder, hf):
        tok.save_pretrained(str(where))
    XLMRobertaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=tinyml.CONTEXT_LENGTH + 2, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                     layer_norm_eps=1e-5).save_pretrained(str(hf))
    cfg = {"embed_dim": tinyml.EMBED_DIM, "vision_cfg": tinyml.model_cfg(hf)["vision_cfg"],
           "text_cfg": {"hf_model_name": str(hf), "hf_tokenizer_name": str(hf),
                        "hf_pooler_type": "mean_pooler", "context_length": tinyml.CONTEXT_LENGTH,
                        **text_cfg}}
    (folder / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": cfg, "preprocess_cfg": tinyml.PREPROCESS_CFG}), encoding="utf-8")
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{folder}", pretrained_text=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(folder / "open_clip_model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def xlmr(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_xlmr(tmp_path_factory.mktemp("xlmr") / "tiny-xlmr")


@pytest.fixture(scope="module")
def bert_ml(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained tiny multilingual model of tests/tinyml.py (a BERT text tower)."""
    cached = tinyml.build_tiny_multilingual(Path(request.config.cache.mkdir("tinyml")))
    folder = tmp_path_factory.mktemp("ml") / "tiny-ml"
    shutil.copytree(cached, folder)
    return tinyml.build_tiny_multilingual(folder)


@pytest.fixture(scope="module")
def zh_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from test_onnx import write_tiny_chinese_clip

    return write_tiny_chinese_clip(tmp_path_factory.mktemp("zh") / "tiny-chinese-clip")


def _identity(kind: str, xlmr: Path, bert_ml: Path, zh_dir: Path):
    if kind == "chinese":
        return identify("chinese", str(zh_dir))
    return identify(f"local-dir:{xlmr if kind == 'xlmr' else bert_ml}", None)


def _notes(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "mmsearch.models"]


@pytest.mark.parametrize("kind", ["xlmr", "bert", "chinese"])
def test_the_exported_text_tower_equals_torch(
        kind: str, xlmr: Path, bert_ml: Path, zh_dir: Path, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    ident = _identity(kind, xlmr, bert_ml, zh_dir)
    lean = lean_text_encoder(ident, "cpu", home=tmp_path)
    assert isinstance(lean, OnnxTextEncoder)
    (exported,) = (tmp_path / FOLDER).iterdir()
    assert sorted(p.name for p in exported.iterdir()) == ["mmsearch.json", "model.data",
                                                          "model.onnx", "tokenizer.json"]
    notes = _notes(caplog)
    assert len(notes) == 1 and "exported the text tower" in notes[0] and "\n" not in notes[0]
    ours = lean.encode_texts(TEXTS)
    theirs = load_embedder(ident, "cpu").encode_texts(TEXTS)
    assert ours.dtype == np.float32 and ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    caplog.clear()
    again = load_text_encoder(ident, "cpu", home=tmp_path)  # the export is read back, once made
    assert isinstance(again, OnnxTextEncoder) and _notes(caplog) == []
    assert list((tmp_path / FOLDER).iterdir()) == [exported]
    np.testing.assert_allclose(again.encode_texts(TEXTS[:1]), ours[:1], atol=1e-6)


def test_a_tower_that_cannot_be_exported_stays_with_torch(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """open_clip's ``canonicalize`` cleaning is not repeated here: torch embeds the texts,
    one line says why, and the next process does not try again."""
    folder = write_tiny_xlmr(tmp_path / "canon", tokenizer_kwargs={"clean": "canonicalize"})
    ident = identify(f"local-dir:{folder}", None)
    home = tmp_path / "home"
    assert lean_text_encoder(ident, "cpu", home=home) is None
    (note,) = _notes(caplog)
    assert "could not be exported" in note and "using torch" in note and "\n" not in note
    caplog.clear()
    enc = load_text_encoder(ident, "cpu", home=home)
    assert not isinstance(enc, OnnxTextEncoder)
    assert _notes(caplog) == [note]  # the recorded reason, not a second export
    torch_path = load_embedder(ident, "cpu").encode_texts(TEXTS)
    np.testing.assert_array_equal(enc.encode_texts(TEXTS), torch_path)
    (failed,) = (home / FOLDER).iterdir()  # the reason, and no export
    assert failed.name.endswith(".failed") and note in failed.read_text(encoding="utf-8")


def test_an_unwritable_home_stays_with_torch_and_tries_again_later(
        tmp_path: Path, xlmr: Path, caplog: pytest.LogCaptureFixture) -> None:
    ident = identify(f"local-dir:{xlmr}", None)
    (tmp_path / FOLDER).parent.mkdir(parents=True)
    (tmp_path / FOLDER).write_text("not a folder")
    enc = load_text_encoder(ident, "cpu", home=tmp_path)
    assert not isinstance(enc, OnnxTextEncoder)
    (note,) = _notes(caplog)
    assert "could not be written" in note and "using torch" in note
    torch_path = load_embedder(ident, "cpu").encode_texts(TEXTS)
    np.testing.assert_allclose(enc.encode_texts(TEXTS), torch_path, atol=1e-6)
    (tmp_path / FOLDER).unlink()
    assert isinstance(lean_text_encoder(ident, "cpu", home=tmp_path), OnnxTextEncoder)


@pytest.mark.parametrize("kind", ["bert", "chinese"])
def test_a_cold_query_imports_neither_torch_nor_transformers(
        kind: str, xlmr: Path, bert_ml: Path, zh_dir: Path, tmp_path: Path, home: Path) -> None:
    """An index run exports the text tower at its end; a later query process embeds the
    Chinese and the English query through ONNX Runtime, with the torch path's scores."""
    from mmsearch import Engine

    ident = _identity(kind, xlmr, bert_ml, zh_dir)
    model = ("chinese", str(zh_dir)) if kind == "chinese" else (f"local-dir:{bert_ml}", None)
    draw_shapes(tmp_path / "photos", per_combo=1)
    with Engine.open("t", model=model[0], pretrained=model[1], device="cpu") as engine:
        engine.index([tmp_path / "photos"])
        ids, vectors = engine.store.image_vectors()
    torch_text = load_embedder(ident, "cpu").encode_texts(["一个红色的圆", "a red circle"])
    code = ("import json, sys\nfrom mmsearch.engine import Engine\n"
            f"e = Engine.open('t', home={str(home)!r}, create=False)\n"
            "hits = [[(h.id, h.score) for h in e.search(q, k=12)] for q in ('一个红色的圆', 'a red circle')]\n"
            "mods = [m for m in ('torch', 'transformers', 'open_clip') if m in sys.modules]\n"
            "print(json.dumps({'hits': hits, 'mods': mods}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["mods"] == [] and out.stderr == ""
    scores = dict(zip(ids.tolist(), vectors @ torch_text.T))
    for column, hits in enumerate(result["hits"]):
        assert len(hits) == 12
        for hit_id, score in hits:
            assert score == pytest.approx(float(scores[hit_id][column]), abs=1e-4)
