"""Decoding JPEGs as tensors: nvJPEG on a GPU, batched, with the resize and crop there too.

Which files go this way is decided per file from its header (:func:`tensor_decodable`):
whole baseline JPEGs in YCbCr with no EXIF rotation that the draft decode would not shrink.
Everything else -- other formats, CMYK, grey, progressive, EXIF-rotated, Adobe-coded,
MPO, and big photos that Pillow decodes faster at a reduced DCT scale -- takes the
Pillow path, as do files the tensor decoder refuses (Pillow then says why they are bad).

:func:`decode_resize` runs on any device: on the CPU, torchvision's decoder is
libjpeg-turbo, which lets the tests check this path against Pillow's without a GPU.
The resize is torch's antialiased interpolation (for bicubic, Pillow's kernel), rounded
as torchvision rounds, so pixels stay within a rounding step or two of Pillow's.
"""

from __future__ import annotations

import struct
import warnings
from typing import TYPE_CHECKING, Sequence

from mmsearch.ingest.decode import DEFAULT_MAX_PIXELS
from mmsearch.ingest.steps import CenterCrop, CropSpec, Resize

if TYPE_CHECKING:  # pragma: no cover
    import torch

ORIENTATION = 0x0112  # the EXIF orientation tag
DRAFT_FACTOR = 2      # a JPEG whose short side is >= this x the draft size: Pillow (draft decode)
EOI, EOI_TAIL = b"\xff\xd9", 4096  # a whole JPEG ends with EOI (trailers after it: Pillow)
TENSOR_MODES = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest"}


def tensor_decodable(data: bytes | bytearray, draft_size: int | None,
                     max_pixels: int = DEFAULT_MAX_PIXELS) -> bool:
    """Whether the tensor decoder should take this file (its markers only; never raises)."""
    if not data.startswith(b"\xff\xd8\xff") or EOI not in data[-EOI_TAIL:]:
        return False  # not a JPEG, or cut short: Pillow says "truncated" where nvJPEG may not
    try:
        size = _plain_jpeg_size(memoryview(data))
    except (IndexError, ValueError, struct.error):
        return False
    if size is None or not 0 < size[0] * size[1] <= max_pixels:
        return False
    return draft_size is None or min(size) < DRAFT_FACTOR * draft_size


def _plain_jpeg_size(data: memoryview) -> tuple[int, int] | None:
    """(width, height) of a baseline 8-bit YCbCr JPEG with no EXIF rotation, Adobe or MPO
    marker, read from its segments up to the frame header; None for anything else.
    (A hand-rolled walk: Pillow's header parse costs ~150 us of GIL per file, this ~10.)"""
    pos, exif_ok = 2, True
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = struct.unpack_from(">H", data, pos + 2)[0]
        body = data[pos + 4:pos + 2 + length]
        if marker == 0xE1 and bytes(body[:6]) == b"Exif\0\0":
            exif_ok = _orientation(body[6:]) in (None, 1)
        elif (marker == 0xEE and bytes(body[:5]) == b"Adobe") or \
                (marker == 0xE2 and bytes(body[:4]) == b"MPF\0"):
            return None
        elif marker in (0xC0, 0xC1):  # baseline / extended sequential Huffman
            precision, height, width, components = struct.unpack_from(">BHHB", body)
            ids = bytes(body[6:6 + 3 * components:3])
            plain = precision == 8 and components == 3 and ids != b"RGB" and exif_ok
            return (width, height) if plain else None
        elif 0xC2 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) or marker == 0xDA:
            return None  # progressive, lossless, arithmetic ...; or scan data before a frame
        pos += 2 + length
    return None


def _orientation(tiff: memoryview) -> int | None:
    """The orientation tag of an EXIF block's first IFD (None when absent)."""
    order = {b"II": "<", b"MM": ">"}.get(bytes(tiff[:2]))
    if order is None:
        return None
    offset = struct.unpack_from(order + "I", tiff, 4)[0]
    count = struct.unpack_from(order + "H", tiff, offset)[0]
    for i in range(count):
        tag, kind = struct.unpack_from(order + "HH", tiff, offset + 2 + 12 * i)
        if tag == ORIENTATION:
            return struct.unpack_from(order + "H", tiff, offset + 10 + 12 * i)[0]
    return None


def decode_resize(datas: Sequence["torch.Tensor"], spec: CropSpec,
                  device: str) -> list["torch.Tensor | None"]:
    """Decode JPEG bytes (1-D uint8 CPU tensors) on ``device`` and apply ``spec``; each
    image comes back as uint8 (3, H, W) on ``device``, or None where it did not decode.

    Images of one size are resized together; the rounding to uint8 runs once for all
    (photo libraries hold a few sizes, so most of a batch resizes in a few calls)."""
    import torch

    decoded = _decode_all(datas, device)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, img in enumerate(decoded):
        if img is not None:
            groups.setdefault((int(img.shape[1]), int(img.shape[2])), []).append(i)
    done: dict[int, torch.Tensor] = {}
    for members in groups.values():
        batch = torch.stack([decoded[i] for i in members]) if len(members) > 1 else \
            decoded[members[0]].unsqueeze(0)
        for i, image in zip(members, _steps_float(batch, spec)):
            done[i] = image
    if not done:
        return [None] * len(decoded)
    order = sorted(done)
    pixels = _to_uint8(torch.stack([done[i] for i in order]))
    out: list[torch.Tensor | None] = [None] * len(decoded)
    for j, i in enumerate(order):
        out[i] = pixels[j]
    return out


def _decode_all(datas: Sequence["torch.Tensor"], device: str) -> list["torch.Tensor | None"]:
    """One batched decode; when it fails, one by one, so a bad file costs only itself."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not datas:
        return []
    with warnings.catch_warnings():  # torchvision 0.29 warns that its decoders are deprecated
        warnings.simplefilter("ignore")
        try:
            return list(decode_jpeg(list(datas), mode=ImageReadMode.RGB, device=device))
        except Exception:  # noqa: BLE001 - nvJPEG/libjpeg errors come as RuntimeError and others
            pass
        out: list[torch.Tensor | None] = []
        for data in datas:
            try:
                out.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
            except Exception:  # noqa: BLE001
                out.append(None)
        return out


def apply_tensor(batch: "torch.Tensor", spec: CropSpec) -> "torch.Tensor":
    """``spec``'s steps on a uint8 (N, 3, H, W) batch of one size, on its device: uint8 out,
    rounded as torchvision's resize rounds (once, after the last resize)."""
    return _to_uint8(_steps_float(batch, spec))


def _steps_float(batch: "torch.Tensor", spec: CropSpec) -> "torch.Tensor":
    """``spec``'s steps in float32, unrounded (antialiased bilinear/bicubic: Pillow's kernels)."""
    import torch.nn.functional as nnf

    x = batch.float()
    for step in spec.steps:
        height, width = int(x.shape[-2]), int(x.shape[-1])
        if isinstance(step, Resize):
            size = step.output_size(height, width)
            if size != (height, width):
                mode = TENSOR_MODES[step.interpolation]
                x = nnf.interpolate(x, size=list(size), mode=mode, antialias=mode != "nearest",
                                    **({} if mode == "nearest" else {"align_corners": False}))
        else:
            x = _crop_tensor(x, step)
    return x


def _to_uint8(x: "torch.Tensor") -> "torch.Tensor":
    import torch

    return x.clamp_(0, 255).round_().to(torch.uint8)


def _crop_tensor(batch: "torch.Tensor", step: CenterCrop) -> "torch.Tensor":
    import torch.nn.functional as nnf

    height, width = int(batch.shape[-2]), int(batch.shape[-1])
    ch, cw = step.size
    top, left, pad_top, pad_left = step.box(height, width)
    if pad_top or pad_left or ch > height or cw > width:
        right, bottom = max(cw, width) - width - pad_left, max(ch, height) - height - pad_top
        batch = nnf.pad(batch, (pad_left, right, pad_top, bottom))
    return batch[..., top:top + ch, left:left + cw]
