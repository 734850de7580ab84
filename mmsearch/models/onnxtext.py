"""Hugging Face text towers through ONNX Runtime: text queries without torch or transformers.

The ``multilingual`` preset (open_clip's HF text tower, XLM-RoBERTa) and Chinese-CLIP (a
BERT) embed a text through transformers: a cold ``mmsearch query`` would import torch and
transformers and load the model, seconds for one short text. Instead the text tower --
the transformer, its pooling and projection, the L2 normalisation -- is exported once
per model with ``torch.onnx.export`` (``input_ids`` and ``attention_mask``, both with
dynamic batch and sequence axes, -> ``embedding``) into ``<home>/.models/onnx/text/<key>/``,
beside its tokenizer as a ``tokenizer.json`` for the ``tokenizers`` library (Rust, no
torch; a model folder with only a slow tokenizer gets transformers' fast conversion
saved here) and how the torch path uses it (``mmsearch.json``: the cleaning, the longest
token sequence, where the attention mask comes from). A query then imports onnxruntime,
tokenizers and numpy. Padding after the longest text of a batch is left out: the
attention mask hides it, so the vectors are the same.

An export is checked against the torch path on a few texts before it is kept, and the
folder is written under a temporary name and renamed into place. A tower that cannot be
exported is left to torch: the reason is kept beside (``<key>.failed``, with the library
versions that failed, so that an upgrade tries again) and logged as one line.
"""

from __future__ import annotations

import contextlib
import hashlib
import html
import io
import json
import logging
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from mmsearch.errors import MMSearchError
from mmsearch.models.hftext import HFText, NotExportable
from mmsearch.models.onnxtower import FOLDER as ONNX_FOLDER
from mmsearch.models.onnxtower import OPSET
from mmsearch.models.openclip import TextEncoder

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

    from mmsearch.models.identity import ModelIdentity

FOLDER = ONNX_FOLDER / "text"
FORMAT = "mmsearch-onnx-text-1"
MODEL, WEIGHTS, TOKENIZER, META = "model.onnx", "model.data", "tokenizer.json", "mmsearch.json"
CLEANINGS = ("none", "whitespace", "lower")  # open_clip's HFTokenizer cleanings we repeat
VERSIONS = ("torch", "transformers", "onnxruntime", "open_clip_torch")  # in a failure's record
CHECK_TEXTS = ("a red circle", "一个红色的圆", "  Ein  Hund &amp; eine Katze ", "x",
               "a photo of " * 40)  # the export is held to the torch path on these
_PLAIN = frozenset(map(chr, range(32, 127))) - {"&"}  # what ftfy and html.unescape leave alone
log = logging.getLogger("mmsearch.models")


def folder(home: Path, identity: "ModelIdentity") -> Path:
    """Where the exported text tower of ``identity`` is kept under ``home``."""
    key = "\0".join((FORMAT, str(OPSET), identity.backend, identity.arch, identity.fingerprint,
                     identity.text_fingerprint or ""))
    return home / FOLDER / hashlib.blake2b(key.encode(), digest_size=12).hexdigest()


def load(identity: "ModelIdentity", home: Path,
         hf_text: Callable[[], HFText]) -> TextEncoder | None:
    """The exported text tower of ``identity`` under ``home``, exported first from
    ``hf_text()`` (which loads the model with torch) when missing; None where it cannot
    be (the reason logged as one line): the torch path embeds the texts then."""
    if not _have_libraries():
        return None
    path = folder(home, identity)
    note = None if path.is_dir() else _failed(path)
    if note is None and not path.is_dir():
        note = _export_once(path, hf_text)
    if note is None:
        try:
            return OnnxTextEncoder(identity, path)
        except Exception as exc:  # noqa: BLE001 - damaged: torch now, exported again next time
            shutil.rmtree(path, ignore_errors=True)
            note = _note("could not be loaded", exc)
    log.warning(note)
    return None


def _have_libraries() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "tokenizers"))


def _note(what: str, exc: BaseException) -> str:
    reason = " ".join(str(exc).split())[:160] or type(exc).__name__
    return f"the text tower {what} for ONNX Runtime ({type(exc).__name__}: {reason}); using torch"


def _export_once(path: Path, hf_text: Callable[[], HFText]) -> str | None:
    """Export into ``path`` (None), or return why it cannot be, in one line: recorded
    unless it may pass next time (a full disk, a read-only home). A model that does not
    load raises, as it would on the torch path."""
    started = time.perf_counter()
    try:
        export(hf_text(), path)
    except OSError as exc:
        return _note("could not be written", exc)
    except Exception as exc:  # noqa: BLE001 - any exporter or runtime failure: torch does it
        if isinstance(exc, MMSearchError):
            raise
        note = _note("could not be exported", exc)
        _record_failure(path, note)
        return note
    log.warning(f"exported the text tower for ONNX Runtime in {time.perf_counter() - started:.1f}s "
                "(once per model; text queries then import no torch)")
    return None


def _versions() -> dict[str, str]:
    from importlib import metadata

    found = {}
    for name in VERSIONS:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    return found


def _failed(path: Path) -> str | None:
    """The note of an earlier failed export with today's libraries, else None."""
    try:
        record = json.loads(path.with_name(path.name + ".failed").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record.get("note") if record.get("versions") == _versions() else None


def _record_failure(path: Path, note: str) -> None:
    with contextlib.suppress(OSError):  # a read-only home: the next process tries again
        path.parent.mkdir(parents=True, exist_ok=True)
        marker = path.with_name(path.name + ".failed")
        tmp = marker.with_name(f".{marker.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"note": note, "versions": _versions()}), encoding="utf-8")
        os.replace(tmp, marker)


def export(text: HFText, path: Path) -> None:
    """``text`` as ``model.onnx`` (its weights in ``model.data``), ``tokenizer.json`` and
    ``mmsearch.json`` in the folder ``path``, written under a temporary name and renamed
    into place once checked against the torch path."""
    if text.clean not in CLEANINGS:
        raise NotExportable(f"unknown text cleaning {text.clean!r}")
    fast = getattr(text.tokenizer, "backend_tokenizer", None)
    if fast is None or text.tokenizer.pad_token_id is None:
        raise NotExportable("its tokenizer has no fast form with a padding token")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write_tokenizer(fast, text, tmp / TOKENIZER)
        meta = {"format": FORMAT, "max_length": text.max_length, "clean": text.clean,
                "mask_pad_id": text.mask_pad_id}
        (tmp / META).write_text(json.dumps(meta), encoding="utf-8")
        _trace(text, OnnxTokenizer(tmp), tmp / MODEL)
        _weights_beside(tmp / MODEL)
        _check(text, tmp)
        with contextlib.suppress(FileExistsError, OSError):  # another process was first
            os.rename(tmp, path)
        if not path.is_dir():
            raise OSError(f"cannot write {path}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_tokenizer(fast: Any, text: HFText, path: Path) -> None:
    """The fast tokenizer with the torch path's truncation, padding to the longest text."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(fast.to_str())  # a copy: the torch path's tokenizer is left as it is
    tok.enable_truncation(text.max_length, strategy="longest_first",
                          direction=getattr(text.tokenizer, "truncation_side", "right"))
    tok.enable_padding(direction="right", pad_id=int(text.tokenizer.pad_token_id),
                       pad_token=str(text.tokenizer.pad_token))
    tok.save(str(path))


def _trace(text: HFText, tokenizer: "OnnxTokenizer", path: Path) -> None:
    """``text.forward`` plus the normalisation as an ONNX graph (traced with padding in
    the batch, so that no branch on an all-ones mask is baked in)."""
    import torch

    class TextTower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tower = text.module

        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.normalize(text.forward(ids, mask).float(), dim=-1)

    ids, mask = (torch.from_numpy(a) for a in tokenizer(["a photo of a cat", "a"]))
    axes = {0: "batch", 1: "sequence"}
    with torch.inference_mode(False), torch.enable_grad(), warnings.catch_warnings(), \
            contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")  # the tracer's warnings: the library is quiet
        torch.onnx.export(TextTower().eval(), (ids, mask), str(path),
                          input_names=["input_ids", "attention_mask"], output_names=["embedding"],
                          dynamic_axes={"input_ids": axes, "attention_mask": axes,
                                        "embedding": {0: "batch"}},
                          opset_version=OPSET, dynamo=False)


def _weights_beside(path: Path) -> None:
    """The weights moved out of the graph's protobuf into ``model.data`` beside it: ONNX
    Runtime opens the session about twice as fast (a second less for a BERT base). Without
    the ``onnx`` package the file stays whole (slower to open, the same vectors)."""
    try:
        import onnx
    except ImportError:
        return
    model = onnx.load(str(path))
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=WEIGHTS, size_threshold=1024)


def _check(text: HFText, tmp: Path) -> None:
    """Refuse an export whose vectors differ from the torch path's (by more than 1e-4)."""
    import numpy as np

    ours = OnnxTextTower(tmp).encode(list(CHECK_TEXTS))
    theirs = text.encode_texts(list(CHECK_TEXTS))
    worst = float(np.abs(ours - theirs).max())
    if not worst <= 1e-4:
        raise ValueError(f"its vectors differ from torch's by up to {worst:.2g}")


def _clean(text: str, how: str) -> str:
    """open_clip's HFTokenizer cleaning: ftfy, HTML unescaped twice, whitespace folded
    (``lower``: and lower case). ftfy is imported only for text it could change."""
    if how == "none":
        return text
    if not set(text) <= _PLAIN:
        import ftfy

        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    text = " ".join(text.split())
    return text.lower() if how == "lower" else text


class OnnxTokenizer:
    """Texts -> (input_ids, attention_mask), int64, padded to the longest: the torch
    path's tokens without transformers (the ``tokenizers`` library)."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        meta = json.loads((path / META).read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT or meta.get("clean") not in CLEANINGS:
            raise ValueError(f"{path / META} is not an export of this version")
        self._clean, self._pad = meta["clean"], meta["mask_pad_id"]
        self._tokenizer = Tokenizer.from_file(str(path / TOKENIZER))

    def __call__(self, texts: list[str]) -> tuple["np.ndarray", "np.ndarray"]:
        import numpy as np

        encoded = self._tokenizer.encode_batch([_clean(t, self._clean) for t in texts])
        ids = np.array([e.ids for e in encoded], dtype=np.int64)
        if self._pad is not None:
            return ids, (ids != self._pad).astype(np.int64)
        return ids, np.array([e.attention_mask for e in encoded], dtype=np.int64)


class OnnxTextTower:
    """An exported text tower: texts in, L2-normalised vectors out (ONNX Runtime on the CPU)."""

    def __init__(self, path: Path) -> None:
        import onnxruntime as ort

        self.tokenizer = OnnxTokenizer(path)
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: the library stays quiet
        self._session = ort.InferenceSession(str(path / MODEL), options,
                                             providers=["CPUExecutionProvider"])

    def encode(self, texts: list[str]) -> "np.ndarray":
        ids, mask = self.tokenizer(texts)
        return self._session.run(["embedding"], {"input_ids": ids, "attention_mask": mask})[0]


class OnnxTextEncoder(TextEncoder):
    """Text queries through an exported text tower (no torch, no transformers)."""

    def __init__(self, identity: "ModelIdentity", path: Path) -> None:
        super().__init__(identity, "cpu")
        self.tower = OnnxTextTower(path)

    def _encode_uncached(self, texts: list[str]) -> "np.ndarray":
        return self.tower.encode(texts)


__all__ = ["OnnxTextEncoder", "OnnxTextTower", "OnnxTokenizer", "export", "folder", "load"]
