"""CLIP's text tower as one ONNX Runtime graph: text queries over every core.

The numpy tower (:mod:`.texttower`) multiplies on one core: numpy's products of a few
rows run single-threaded, and a caption of ~13 tokens is bound by that core's
arithmetic (~0.8 ms a row for ViT-B-32's text weights). ONNX Runtime's products split
such rows over the cores. So a process that answers more than one text query -- the
server, a library user -- switches to this graph from its second text
(:meth:`.texttower.TextTower._settle`); a one-query ``mmsearch query`` never imports
onnxruntime, which would cost its cold start more than the graph saves.

The graph is built here (:mod:`.onnxproto`, without the onnx package, whose import alone
takes ~0.7 s) straight from the tower file's weights: no torch, no export, nothing
written to disk. Per layer it is ONNX Runtime's fused CPU operators (``com.microsoft``):
``Attention`` (the q|k|v projection, causal, with the start token's keys and values as
its ``past``), ``SkipLayerNormalization`` (residual, bias and norm in one), ``BiasGelu``
or ``QuickGelu``, the two other products as plain ``MatMul``. It takes the texts'
embedded tokens after the start token and the row of each one's end token, and gives
the projected, unnormalised vectors of those rows; the last layer goes on with those
rows alone. The weight matrices are handed to the session as external initializers over
this module's own arrays (ONNX Runtime keeps a packed copy of each for its products),
so building takes ~0.3 s and makes no serialised copy of the weights; then the packed
copy is collapsed into huge pages where Linux gives them (:mod:`.hugepages`, ~0.6 s: a
caption ~10% faster, a 3-word query ~17%). The tests hold it equal to open_clip's
``encode_text`` to 1e-5.

Used where onnxruntime is installed (``pip install 'mmsearch[onnx]'``) and
the process may run on at least two cores; anything that fails while building leaves
the numpy tower answering.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mmsearch.models import hugepages
from mmsearch.models import onnxproto as pb
from mmsearch.models.device import cores

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

# ``spec`` below is a texttower.TextSpec (context_length, width, heads, layers, quick_gelu),
# not imported: texttower imports this module

MS = "com.microsoft"
EXTERNAL = "mmsearch-text"  # the location external initializers name (never a file)
_OPSET = 17  # LayerNormalization
_THREADS_MAX = 8  # a few rows' products gain nothing from more
_INLINE_MAX = 1024  # tensors up to this many values go inside the model, larger ones external


def usable() -> bool:
    """Whether this process can run the graph with a gain: onnxruntime installed, two or
    more cores to run on."""
    return cores() >= 2 and importlib.util.find_spec("onnxruntime") is not None


@dataclass
class TextGraph:
    """A session over the tower's graph and the start token's keys and values per layer."""

    session: Any
    past: list["np.ndarray"]  # (2, 1, heads, 1, head width) per layer
    arrays: dict[str, "np.ndarray"]  # the session reads its initializers from these

    def run(self, x: "np.ndarray", ends: "np.ndarray") -> "np.ndarray":
        """(b, embed dim) unnormalised vectors of texts embedded as ``x`` (b, n, width:
        token and position embeddings from position 1, after the start token), each
        ending at its row ``ends[i]`` of ``x``."""
        import numpy as np

        b, n = x.shape[:2]
        feed = {"x": x, "rows": (np.arange(b) * n + ends).astype(np.int64)}
        for i, past in enumerate(self.past):
            feed[f"past{i}"] = past if b == 1 else np.repeat(past, b, axis=1)
        return self.session.run(["out"], feed)[0]


def build(spec: Any, weights: dict[str, "np.ndarray"], start: "np.ndarray") -> TextGraph:
    """The graph of a plain CLIP text tower over ``weights`` (:mod:`.texttower`'s packed
    tensors), ``start`` the start token's embedded row (1, width). Raises what ONNX
    Runtime raises when it cannot build or run it."""
    import numpy as np
    import onnxruntime as ort

    before = hugepages.anonymous() if hugepages.available() else None
    model, arrays = _model(spec, weights)
    options = ort.SessionOptions()
    options.intra_op_num_threads = min(cores(), _THREADS_MAX)
    options.log_severity_level = 3  # ONNX Runtime's warnings are not the user's business
    names = [k for k, v in arrays.items() if v.size > _INLINE_MAX]
    options.add_external_initializers(
        names, [ort.OrtValue.ortvalue_from_numpy(arrays[k]) for k in names])
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    heads, width = spec.heads, spec.width
    feed = {"x": start[None].astype(np.float32), "rows": np.zeros(1, np.int64)}
    feed |= {f"past{i}": np.zeros((2, 1, heads, 0, width // heads), np.float32)
             for i in range(spec.layers)}
    presents = session.run([f"present{i}" for i in range(spec.layers)], feed)
    if before is not None:  # ONNX Runtime's packed weights into huge pages (~0.6 s, once)
        hugepages.collapse(hugepages.anonymous() - before)
    return TextGraph(session, presents, arrays)


def _unblocked(blocks: "np.ndarray") -> "np.ndarray":
    """The ``[in, out]`` matrix of :func:`.texttower._blocked` blocks."""
    import numpy as np

    kn, cn, kb, c = blocks.shape
    return np.ascontiguousarray(blocks.transpose(0, 2, 1, 3).reshape(kn * kb, cn * c))


def _model(spec: Any, weights: dict[str, "np.ndarray"]) -> tuple[bytes, dict]:
    """The serialised model, its large tensors external (named, data left out), and the
    arrays holding every initializer."""
    import numpy as np

    arrays = {k: _unblocked(v) if v.ndim == 4 else v for k, v in weights.items()
              if k not in ("token_embedding.weight", "positional_embedding")}
    arrays["flat"] = np.array([-1, spec.width], dtype=np.int64)
    heads, width = spec.heads, spec.width
    inputs = [pb.value_info("x", pb.FLOAT, ["b", "n", width]),
              pb.value_info("rows", pb.INT64, ["b"])]
    inputs += [pb.value_info(f"past{i}", pb.FLOAT, [2, "b", heads, "p", width // heads])
               for i in range(spec.layers)]
    outputs = [pb.value_info("out", pb.FLOAT, ["b", None])]
    outputs += [pb.value_info(f"present{i}", pb.FLOAT, None) for i in range(spec.layers)]
    # the data of the large ones comes from ``arrays`` through the session options
    initializers = [pb.tensor(k, v, EXTERNAL if v.size > _INLINE_MAX else None)
                    for k, v in arrays.items()]
    model = pb.model(_nodes(spec), initializers, inputs, outputs, {"": _OPSET, MS: 1},
                     "clip-text")
    return model, arrays


def _nodes(spec: Any) -> list[bytes]:
    """The layers' operators: x -> ... -> out, the last layer on the end tokens' rows."""
    nodes = []

    def op(kind: str, inputs: list[str], outputs: list[str], **attrs: Any) -> str:
        fused = kind in ("Attention", "SkipLayerNormalization", "BiasGelu", "QuickGelu")
        nodes.append(pb.node(kind, inputs, outputs, MS if fused else "", **attrs))
        return outputs[0]

    x = "x"
    block = "transformer.resblocks.{}."
    p = block.format(0)
    y = op("LayerNormalization", [x, p + "ln_1.weight", p + "ln_1.bias"], ["y0"], axis=-1,
           epsilon=1e-5)
    for i in range(spec.layers):
        p, s = block.format(i), f"l{i}."
        a = op("Attention", [y, p + "attn.in_proj_weight", p + "attn.in_proj_bias", "",
                             f"past{i}"], [s + "attn", f"present{i}"],
               num_heads=spec.heads, unidirectional=1)
        if i == spec.layers - 1:  # nothing after the last layer reads the other rows
            a = op("Gather", [op("Reshape", [a, "flat"], [s + "attn2"]), "rows"], [s + "attn1"])
            x = op("Gather", [op("Reshape", [x, "flat"], [s + "x2"]), "rows"], [s + "x1"])
        o = op("MatMul", [a, p + "attn.out_proj.weight"], [s + "out"])
        y = op("SkipLayerNormalization", [o, x, p + "ln_2.weight", p + "ln_2.bias",
                                          p + "attn.out_proj.bias"],
               [s + "y", "", "", s + "mid"], epsilon=1e-5)
        x = s + "mid"
        f = op("MatMul", [y, p + "mlp.c_fc.weight"], [s + "fc"])
        if spec.quick_gelu:
            f = op("Add", [f, p + "mlp.c_fc.bias"], [s + "fcb"])
            g = op("QuickGelu", [f], [s + "gelu"], alpha=1.702)
        else:
            g = op("BiasGelu", [f, p + "mlp.c_fc.bias"], [s + "gelu"])
        m = op("MatMul", [g, p + "mlp.c_proj.weight"], [s + "mlp"])
        after = block.format(i + 1) + "ln_1." if i + 1 < spec.layers else "ln_final."
        y = op("SkipLayerNormalization", [m, x, after + "weight", after + "bias",
                                          p + "mlp.c_proj.bias"],
               [s + "next", "", "", s + "sum"], epsilon=1e-5)
        x = s + "sum"
    op("MatMul", [y, "text_projection"], ["out"])
    return nodes


__all__ = ["TextGraph", "build", "usable"]
