"""Text queries without torch or open_clip: CLIP's text tower in numpy.

Importing torch costs 1-2 s and open_clip (with torchvision, timm) about 2 s more,
most of a cold ``mmsearch query`` that embeds one short text. For the standard
open_clip text tower (token embedding, a causal pre-LayerNorm transformer, pooling at
the end-of-text token, a projection matrix) this module runs the same computation in
numpy float32, over the positions up to the end token only (the attention is causal:
the padding after it changes nothing). The weights come memory-mapped from the
model's text-tower file (:mod:`.towerfile`, written once from the checkpoint, which
is the only step that may need torch). A process that encodes a second text is one that
answers many: from then on the texts go through ONNX Runtime's graph of the same tower
over every core (:mod:`.textgraph`) where onnxruntime is installed and two cores are
there, else the layers' matrices are read into huge pages; either way the start token's
keys and values are computed once (:meth:`TextTower._settle`). The tokenizer is
:mod:`.cliptokenizer`.
Anything else -- other configs, checkpoint layouts, devices -- makes :func:`load`
return None and :mod:`mmsearch.models` uses open_clip as usual. The tests hold this
tower equal to open_clip's ``encode_text`` to 1e-5.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from mmsearch.errors import first_line
from mmsearch.models import towerfile

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from mmsearch.models.cliptokenizer import ClipTokenizer
    from mmsearch.models.textgraph import TextGraph

logger = logging.getLogger(__name__)

# text_cfg keys this tower implements (with open_clip's defaults); any other key
# (HF towers, layer scale, other pooling or attention variants) means "use open_clip"
_PLAIN_TEXT_KEYS = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}
_PLAIN_TOP_KEYS = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale",
                   "init_logit_bias"}
_BLOCK_KEYS = ("ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias",
               "attn.out_proj.weight", "attn.out_proj.bias", "ln_2.weight", "ln_2.bias",
               "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")


@dataclass(frozen=True)
class TextSpec:
    """The shape of a plain CLIP text tower, read from its open_clip config."""

    context_length: int
    width: int
    heads: int
    layers: int
    quick_gelu: bool

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def _open_clip_dir() -> Path | None:
    spec = importlib.util.find_spec("open_clip")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def text_spec(arch: str, config_path: str | None) -> TextSpec | None:
    """The tower's shape when ``arch`` (or the config file) is a plain CLIP text tower."""
    package = _open_clip_dir()
    path = Path(config_path) if config_path else (package / "model_configs" / f"{arch}.json"
                                                  if package else None)
    if path is None or not path.is_file() or "siglip" in arch.lower():
        return None  # SigLIP names pick another tokenizer in open_clip
    try:
        cfg = json.loads(path.read_text())
        cfg = cfg.get("model_cfg", cfg)  # a local-dir folder's open_clip_config.json
        text = cfg["text_cfg"]
        if set(cfg) - _PLAIN_TOP_KEYS or set(text) - _PLAIN_TEXT_KEYS:
            return None
        return TextSpec(int(text.get("context_length", 77)), int(text.get("width", 512)),
                        int(text.get("heads", 8)), int(text.get("layers", 12)),
                        bool(cfg.get("quick_gelu", False)))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _checkpoint_text(path: Path) -> dict[str, "np.ndarray"] | None:
    """The checkpoint's non-image tensors as float32 numpy arrays; None for layouts left to
    open_clip. A safetensors file is read without torch; anything else needs it."""
    state = _safetensors_text(path) if path.suffix == ".safetensors" else None
    if state is None:
        state = _torch_text(path)
    if state is None:
        return None
    return {k: v for k, v in state.items() if not k.startswith("visual.")}


def _safetensors_text(path: Path) -> dict[str, "np.ndarray"] | None:
    import numpy as np
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            keys = [k for k in f.keys() if not k.startswith("visual.")]
            if any(f.get_slice(k).get_dtype() not in ("F32", "F16", "I64") for k in keys):
                return None  # bfloat16 and other dtypes numpy lacks: read with torch
            return {k: f.get_tensor(k).astype(np.float32, copy=False) for k in keys}
    except Exception:  # noqa: BLE001 - not readable here: torch's reader decides
        return None


def _torch_text(path: Path) -> dict[str, "np.ndarray"] | None:
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception:  # noqa: BLE001 - TorchScript archives, old formats, pickles: open_clip's job
        return None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        return None
    return {k.removeprefix("module."): v.float().numpy() for k, v in state.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point()
            and not k.removeprefix("module.").startswith("visual.")}


def _shapes_fit(w: dict[str, "np.ndarray"], spec: TextSpec) -> bool:
    width = spec.width
    need = {"token_embedding.weight": 2, "positional_embedding": 2, "ln_final.weight": 1,
            "ln_final.bias": 1, "text_projection": 2}
    if any(k not in w or w[k].ndim != d for k, d in need.items()):
        return False
    layers = {k.split(".")[2] for k in w if k.startswith("transformer.resblocks.")}
    return (tuple(w["positional_embedding"].shape) == (spec.context_length, width)
            and w["token_embedding.weight"].shape[1] == width
            and w["text_projection"].shape[0] == width
            and layers == {str(i) for i in range(spec.layers)} and width % spec.heads == 0
            and all(f"transformer.resblocks.{i}.{name}" in w for i in range(spec.layers)
                    for name in _BLOCK_KEYS))


def _packed(w: dict[str, "np.ndarray"], spec: TextSpec) -> dict[str, "np.ndarray"]:
    """The tensors the tower uses, its matrices as :func:`_blocked` blocks."""
    keep = ["token_embedding.weight", "positional_embedding", "ln_final.weight",
            "ln_final.bias"]
    keep += [f"transformer.resblocks.{i}.{n}" for i in range(spec.layers) for n in _BLOCK_KEYS]
    out = {k: (_blocked(w[k].T, spec.width) if w[k].ndim == 2 and k.startswith("transformer.")
               else w[k]) for k in keep}
    out["text_projection"] = _blocked(w["text_projection"], spec.width)  # already [in, out]
    return out


# A matrix is kept as blocks of about this many floats (128 KiB): small enough that the
# product of a few tokens with one block stays in the core's cache and takes BLAS's unpacked
# small-matrix kernels; one whole-matrix product first copies ("packs") the whole matrix,
# which costs a short query ~3x its time (OpenBLAS, 2-16 tokens). A single row is never
# multiplied alone: that is BLAS's matrix-vector product, which OpenBLAS splits over its
# threads even for one block, and waits for both cores (badly when other work holds one).
_BLOCK_FLOATS = 1 << 15

# Row counts multiplied as one row more: OpenBLAS's float32 kernels (Haswell and later)
# take the rows of ``x`` in pairs and fours, and an odd few go through slower edge code: a
# pass of 3 rows over ViT-B-32's text weights took 7.1 ms on one core, one of 4 rows 5.6.
_PADDED_ROWS = (1, 3)


def _blocked(m: "np.ndarray", width: int) -> "np.ndarray":
    """An ``[in, out]`` matrix as contiguous ``[in/kb, out/c, kb, c]`` blocks (kb divides the
    width, c x kb about _BLOCK_FLOATS); :func:`_matmul` multiplies with it."""
    import math

    import numpy as np

    rows, cols = m.shape
    kb = math.gcd(rows, width)
    c = math.gcd(cols, max(1, _BLOCK_FLOATS // kb))
    return np.ascontiguousarray(m.reshape(rows // kb, kb, cols // c, c).transpose(0, 2, 1, 3),
                                dtype=np.float32)


def _matmul(x: "np.ndarray", blocks: "np.ndarray",
            bias: "np.ndarray | None" = None) -> "np.ndarray":
    """``x @ W + bias`` for ``W`` stored as :func:`_blocked` blocks: one numpy call, one BLAS
    product per block, written straight into the ``(rows, out)`` result."""
    import numpy as np

    kn, cn, kb, c = blocks.shape
    r = len(x)
    if r in _PADDED_ROWS:  # one row more: see _BLOCK_FLOATS and _PADDED_ROWS
        return _matmul(np.concatenate([x, x[:1]]), blocks, bias)[:r]
    out = np.empty((r, cn * c), np.float32)
    view = out.reshape(r, cn, c).transpose(1, 0, 2)  # (cn, r, c): block j's columns
    xb = x.reshape(r, kn, kb).transpose(1, 0, 2)[:, None]  # (kn, 1, r, kb)
    if kn == 1:
        np.matmul(xb[0], blocks[0], out=view)
    else:  # the input split in kn parts: their partial products summed
        np.add.reduce(np.matmul(xb, blocks), axis=0, out=view)
    if bias is not None:
        out += bias
    return out


class TextTower:
    """CLIP's text encoder as numpy float32 operations over a dict of blocked weights."""

    def __init__(self, spec: TextSpec, weights: dict[str, "np.ndarray"],
                 tokenizer: "ClipTokenizer",
                 resident: "Callable[[list[str]], dict[str, np.ndarray] | None] | None" = None,
                 *, graph: bool = True) -> None:
        self.spec = spec
        self._w = weights
        self._tokenizer = tokenizer
        self._start: list[tuple["np.ndarray", "np.ndarray"]] | None = None
        self._resident = resident  # the matrices in huge pages: towerfile.read_resident
        self._may_graph = graph    # may switch to ONNX Runtime's graph (textgraph)
        self._graph: "TextGraph | None" = None
        self._encoded = 0
        self._settling = threading.Lock()  # one thread builds the graph, the others wait

    @property
    def runtime(self) -> str:
        """Who multiplies now: ``numpy`` (one core) or ``onnxruntime`` (:mod:`.textgraph`)."""
        return "numpy" if self._graph is None else "onnxruntime"

    def warm(self) -> None:
        """Take now the step a second text would take (:meth:`_settle`): for a server,
        before its first query rather than on its second."""
        with self._settling:
            if self._encoded < 2:
                self._encoded = 1
                self._settle_now()

    def _settle(self) -> None:
        """From the second text on (a process that answers more than one query): the
        texts go through ONNX Runtime's graph over every core (:mod:`.textgraph`, ~1 s once)
        where it can run, else the layers' matrices are read into huge pages
        once, where :func:`_matmul` streams them ~25% faster than through a map of the page
        cache's small pages. A one-query process (a cold ``mmsearch query``) does neither."""
        if self._encoded < 2:
            with self._settling:
                self._settle_now()
        else:
            self._encoded += 1

    def _settle_now(self) -> None:
        self._encoded += 1
        if self._encoded != 2:
            return
        self._graph = self._build_graph() if self._may_graph else None
        if self._graph is not None or self._resident is None:
            return
        moved = self._resident([k for k, v in self._w.items() if v.ndim == 4])
        if moved:
            self._w = {**self._w, **moved}

    def _build_graph(self) -> "TextGraph | None":
        from mmsearch.models import textgraph

        if not textgraph.usable():
            return None
        start = (self._w["token_embedding.weight"][[self._tokenizer.sot]]
                 + self._w["positional_embedding"][:1])
        try:
            return textgraph.build(self.spec, self._w, start)
        except Exception as exc:  # noqa: BLE001 - an old or odd onnxruntime: numpy goes on
            logger.warning("text queries go on in numpy: ONNX Runtime's graph could not be "
                           "built (%s)", first_line(exc))
            return None

    def encode(self, texts: list[str]) -> "np.ndarray":
        """(N, D) float32, L2-normalised: open_clip's ``encode_text`` over the trimmed context."""
        import numpy as np

        self._settle()
        w, spec = self._w, self.spec
        tokens = self._tokenizer(list(texts))
        last = tokens.argmax(axis=-1)  # the end-of-text token has the highest id
        n = int(last.max()) + 1        # causal: the padding after it changes nothing
        known = self._encoded > 1 and (tokens[:, 0] == self._tokenizer.sot).all()
        if known and self._graph is not None:
            x = w["token_embedding.weight"][tokens[:, 1:n]] + w["positional_embedding"][1:n]
            try:
                return _normalised(self._graph.run(x, last - 1))
            except Exception as exc:  # noqa: BLE001 - never a failed query for a faster path
                logger.warning("text queries go on in numpy: ONNX Runtime's graph failed (%s)",
                               first_line(exc))
                self._graph = None
        start = self._start_keys() if known else None  # (not worth a pass for one text)
        first = 0 if start is None else 1  # the start token's keys and values are known
        b = len(tokens)
        x = w["token_embedding.weight"][tokens[:, first:n]] + w["positional_embedding"][first:n]
        x = x.reshape(b * (n - first), spec.width)  # rows = tokens; attention reshapes per head
        mask = np.triu(np.full((n, n), -np.inf, dtype=np.float32), 1)[first:]
        for i in range(spec.layers):  # the last layer goes on with the end tokens' rows alone
            x = self._block(x, b, mask, last - first if i == spec.layers - 1 else None,
                            f"transformer.resblocks.{i}.", None if start is None else start[i])
        x = _layer_norm(x, w["ln_final.weight"], w["ln_final.bias"])
        return _normalised(_matmul(x, w["text_projection"]))

    def _start_keys(self) -> list[tuple["np.ndarray", "np.ndarray"]]:
        """Each layer's key and value of the start token at position 0, computed once.

        Every text begins with that token, and the attention is causal: its row never sees
        what follows, so its keys and values are the same for every text. A 3-word query
        (5 tokens) then multiplies 4 rows through the weights instead of 5. Used from the
        second text on, like :meth:`_settle`: computing them is a pass over the weights."""
        import numpy as np

        if self._start is None:
            w, keep = self._w, []
            x = w["token_embedding.weight"][[self._tokenizer.sot]] + w["positional_embedding"][:1]
            mask = np.zeros((1, 1), dtype=np.float32)
            for i in range(self.spec.layers):
                x = self._block(x, 1, mask, None, f"transformer.resblocks.{i}.", keep=keep)
            self._start = keep
        return self._start

    def _block(self, x: "np.ndarray", b: int, mask: "np.ndarray", last: "np.ndarray | None",
               p: str, start: tuple["np.ndarray", "np.ndarray"] | None = None,
               keep: list | None = None) -> "np.ndarray":
        """One residual block over ``x`` (b*rows rows; ``mask`` (rows, n) causal, n - rows
        leading positions given by ``start``'s keys and values); with ``last``, the output
        keeps only the rows of those positions (one per text): nothing after the final layer
        reads the rest. ``keep`` collects this layer's keys and values (for ``start``)."""
        import numpy as np

        w = self._w
        y = _layer_norm(x, w[p + "ln_1.weight"], w[p + "ln_1.bias"])
        qkv = _matmul(y, w[p + "attn.in_proj_weight"], w[p + "attn.in_proj_bias"])
        a = _attention(qkv, b, self.spec.heads, mask, last, start, keep)
        if last is not None:
            x = x.reshape(b, len(mask), -1)[np.arange(b), last]
        x += _matmul(a, w[p + "attn.out_proj.weight"], w[p + "attn.out_proj.bias"])
        y = _layer_norm(x, w[p + "ln_2.weight"], w[p + "ln_2.bias"])
        y = _matmul(y, w[p + "mlp.c_fc.weight"], w[p + "mlp.c_fc.bias"])
        y = _quick_gelu(y) if self.spec.quick_gelu else _gelu(y)
        x += _matmul(y, w[p + "mlp.c_proj.weight"], w[p + "mlp.c_proj.bias"])
        return x


def _attention(qkv: "np.ndarray", b: int, heads: int, mask: "np.ndarray",
               last: "np.ndarray | None", start: tuple["np.ndarray", "np.ndarray"] | None,
               keep: list | None) -> "np.ndarray":
    """Multi-head attention of ``qkv`` (b*rows rows of q|k|v) under ``mask`` (rows, n), the
    first n - rows keys and values being ``start``'s ((1, heads, n - rows, head width) each):
    (b*rows, width) rows, or with ``last`` (b,) only the row ``last[i]`` of each text."""
    import numpy as np

    width = qkv.shape[1] // 3
    q, k, v = qkv.reshape(b, len(mask), 3, heads, width // heads).transpose(2, 0, 3, 1, 4)
    if keep is not None:
        keep.append((k[:1].copy(), v[:1].copy()))
    if start is not None:  # (b, heads, n, head width): the known positions first
        k = np.concatenate([start[0] if b == 1 else start[0].repeat(b, axis=0), k], axis=2)
        v = np.concatenate([start[1] if b == 1 else start[1].repeat(b, axis=0), v], axis=2)
    if last is not None:  # (b, heads, 1, head width) queries, each with its mask row
        q, mask = q[np.arange(b), :, last][:, :, None], mask[last][:, None, None]
    s = q @ k.transpose(0, 1, 3, 2)
    s *= np.float32((width // heads) ** -0.5)
    s += mask
    s -= np.maximum.reduce(s, axis=-1, keepdims=True)  # the ufuncs: ndarray.max/sum/mean add
    np.exp(s, out=s)                                    # Python-level overhead per call
    s /= np.add.reduce(s, axis=-1, keepdims=True)
    return (s @ v).transpose(0, 2, 1, 3).reshape(-1, width)  # (b, rows, heads, head width)


def _normalised(x: "np.ndarray") -> "np.ndarray":
    import numpy as np

    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norm, 1e-12)).astype(np.float32, copy=False)


def _layer_norm(x: "np.ndarray", weight: "np.ndarray", bias: "np.ndarray") -> "np.ndarray":
    import numpy as np

    inv_n = np.float32(1 / x.shape[-1])
    centred = x - np.add.reduce(x, axis=-1, keepdims=True) * inv_n
    scale = np.add.reduce(centred * centred, axis=-1, keepdims=True)
    scale *= inv_n
    scale += 1e-5
    centred *= scale ** -0.5
    centred *= weight
    centred += bias
    return centred


def _quick_gelu(y: "np.ndarray") -> "np.ndarray":
    """QuickGELU y * sigmoid(1.702 y) in place, the sigmoid as tanh (no overflow for large -y)."""
    import numpy as np

    s = np.tanh(y * np.float32(0.851))
    s *= 0.5
    s += 0.5
    y *= s
    return y


def _gelu(x: "np.ndarray") -> "np.ndarray":
    """Exact (erf) GELU in place, torch's default: max(x, 0) - |x| (1 - erf(|x| / sqrt 2)) / 2,
    that erf by Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7), in float32."""
    import numpy as np

    a = np.abs(x)
    t = a * np.float32(0.3275911 * 0.5 ** 0.5)
    t += 1
    np.reciprocal(t, out=t)
    h = t * np.float32(0.5 * 1.061405429)  # the polynomial's coefficients halved
    for c in (-1.453152027, 1.421413741, -0.284496736, 0.254829592):
        h += np.float32(0.5 * c)
        h *= t
    np.square(a, out=t)
    t *= np.float32(-0.5)
    np.exp(t, out=t)  # exp(-x^2 / 2)
    h *= t
    h *= a            # |x| (1 - erf(|x| / sqrt 2)) / 2
    np.maximum(x, 0, out=x)
    x -= h
    return x


def load(arch: str, config_path: str | None, weights_path: str | Path,
         home: Path, *, graph: bool = True) -> TextTower | None:
    """The numpy tower for these weights, or None where open_clip must do it.

    Its weights come from the model's text-tower file under ``home``, written from the
    checkpoint first when it is missing or was made from other contents. ``graph``: it
    may go over to ONNX Runtime's graph from the second text (:meth:`TextTower._settle`)."""
    from mmsearch.models.cliptokenizer import tokenizer
    from mmsearch.models.identity import file_fingerprint

    spec = text_spec(arch, config_path)
    tok = tokenizer(spec.context_length) if spec is not None else None
    if spec is None or tok is None:
        return None
    source = file_fingerprint(Path(weights_path))
    weights = tower_weights(spec, Path(weights_path), home, source)
    if weights is None:
        return None
    path = towerfile.tower_path(home, Path(weights_path), spec.to_json())
    return TextTower(spec, weights, tok, lambda names: _resident(path, names, source),
                     graph=graph)


def _resident(path: Path, names: list[str], source: str) -> dict[str, "np.ndarray"] | None:
    """:func:`towerfile.read_resident`, or None where the file cannot be read again (the
    tower goes on over its map)."""
    try:
        return towerfile.read_resident(path, names, source)
    except (OSError, ValueError, KeyError):
        return None


def tower_weights(spec: TextSpec, source: Path, home: Path,
                  fingerprint: str | None = None) -> dict[str, "np.ndarray"] | None:
    """The packed weights, memory-mapped from the tower file (made once per checkpoint
    contents, ``fingerprint`` the checkpoint's when known); None when the checkpoint is not
    a plain tower of ``spec``."""
    from mmsearch.models.identity import file_fingerprint

    path = towerfile.tower_path(home, source, spec.to_json())
    fingerprint = fingerprint or file_fingerprint(source)
    found = towerfile.header(path)
    if found is not None and found[1].get("source") == fingerprint:
        try:
            return towerfile.read(path)
        except (OSError, ValueError, KeyError, TypeError):  # a damaged file: written again
            pass
    state = _checkpoint_text(source)
    if state is None or not _shapes_fit(state, spec):
        return None
    packed = _packed(state, spec)
    try:
        towerfile.write(path, packed, {"source": fingerprint, "spec": spec.to_json()})
        return towerfile.read(path)
    except OSError:  # a read-only home: this process keeps its own copy
        import numpy as np

        return {k: np.ascontiguousarray(v) for k, v in packed.items()}


__all__ = ["TextSpec", "TextTower", "load", "text_spec", "tower_weights"]
