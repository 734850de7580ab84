"""The few ONNX protobuf messages :mod:`.textgraph` needs, written without the onnx package.

Importing onnx takes ~0.7 s (its helpers pull in much more than the messages), longer
than building the whole text graph; ONNX Runtime only needs the serialised bytes. So a
model is written here in protobuf's wire format: varints, length-delimited fields and
fixed32 floats, with the field numbers of ``onnx.proto``. Only what the graph uses is
covered: nodes with int, float and int-list attributes, float and int64 tensors (raw
data or external), tensor value infos with fixed or named dimensions. The tests parse the
result with onnx itself and check it.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

FLOAT, INT64 = 1, 7  # TensorProto.DataType
IR_VERSION = 8
_TYPES = {"float32": FLOAT, "int64": INT64}


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64s as their two's complement, 10 bytes
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _int(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value)


def _bytes(field: int, value: bytes | str) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return _varint(field << 3 | 2) + _varint(len(data)) + data


def _float(field: int, value: float) -> bytes:
    return _varint(field << 3 | 5) + struct.pack("<f", value)


def attribute(name: str, value: int | float | Sequence[int]) -> bytes:
    """An AttributeProto: INT (2), FLOAT (1) or INTS (7)."""
    if isinstance(value, bool) or isinstance(value, int):
        return _bytes(1, name) + _int(3, int(value)) + _int(20, 2)
    if isinstance(value, float):
        return _bytes(1, name) + _float(2, value) + _int(20, 1)
    return _bytes(1, name) + b"".join(_int(8, int(v)) for v in value) + _int(20, 7)


def node(op_type: str, inputs: Sequence[str], outputs: Sequence[str], domain: str = "",
         **attrs: int | float | Sequence[int]) -> bytes:
    """A NodeProto (empty names: inputs or outputs left out), its attributes by name as
    onnx.helper orders them."""
    out = b"".join(_bytes(1, i) for i in inputs) + b"".join(_bytes(2, o) for o in outputs)
    out += _bytes(4, op_type) + b"".join(_bytes(5, attribute(k, attrs[k])) for k in sorted(attrs))
    return out + (_bytes(7, domain) if domain else b"")


def tensor(name: str, array: "np.ndarray", external: str | None = None) -> bytes:
    """A TensorProto holding ``array`` (float32 or int64), or naming it as external data
    at ``external`` (the bytes then come from elsewhere: ONNX Runtime's session options)."""
    out = b"".join(_int(1, d) for d in array.shape) + _int(2, _TYPES[str(array.dtype)])
    out += _bytes(8, name)
    if external is None:
        return out + _bytes(9, array.astype(array.dtype.newbyteorder("<")).tobytes())
    for key, value in (("location", external), ("offset", "0"), ("length", str(array.nbytes))):
        out += _bytes(13, _bytes(1, key) + _bytes(2, value))
    return out + _int(14, 1)


def value_info(name: str, elem_type: int, dims: Sequence[int | str | None] | None) -> bytes:
    """A ValueInfoProto of a tensor; ``dims`` None: shape unknown; a str: a named axis,
    None: an unknown one."""
    tensor_type = _int(1, elem_type)
    if dims is not None:
        shape = b"".join(_bytes(1, b"" if d is None else _bytes(2, d) if isinstance(d, str)
                                else _int(1, d)) for d in dims)
        tensor_type += _bytes(2, shape)
    return _bytes(1, name) + _bytes(2, _bytes(1, tensor_type))


def model(nodes: Sequence[bytes], initializers: Sequence[bytes], inputs: Sequence[bytes],
          outputs: Sequence[bytes], opsets: dict[str, int], name: str) -> bytes:
    """A serialised ModelProto of one graph."""
    graph = b"".join(_bytes(1, n) for n in nodes) + _bytes(2, name)
    graph += b"".join(_bytes(5, t) for t in initializers)
    graph += b"".join(_bytes(11, v) for v in inputs) + b"".join(_bytes(12, v) for v in outputs)
    out = _int(1, IR_VERSION) + _bytes(2, "mmsearch")
    out += b"".join(_bytes(8, (_bytes(1, d) if d else b"") + _int(2, v)) for d, v in opsets.items())
    return out + _bytes(7, graph)


__all__ = ["FLOAT", "INT64", "attribute", "model", "node", "tensor", "value_info"]
