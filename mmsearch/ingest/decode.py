"""Turning an image file into an RGB PIL image ready for open_clip's preprocess.

`load_image` either returns a detached RGB image or raises `DecodeError` with
a short human reason; it never raises anything else for a bad file.

Choices, in short:

* Only raster formats we expect in photo libraries are attempted (JPEG/MPO,
  PNG, WebP, GIF, BMP, TIFF, plus HEIF/AVIF when available), whatever the
  file's extension says.  EPS, PDF, PSD and the like are refused, so a hostile
  file never reaches Ghostscript or a rarely used decoder.
* Pillow's globals (``MAX_IMAGE_PIXELS``, ``LOAD_TRUNCATED_IMAGES``, warning
  filters) are never touched.  Sizes are checked from the header, before any
  pixel is decoded, against ``max_pixels``.  Pillow's own bomb check also runs
  inside ``Image.open`` (it refuses above 2x its limit, about 179 MP, and
  warns above about 89 MP); its error becomes a `DecodeError`, and its warning
  does too if the caller turned warnings into errors.  The default
  ``max_pixels`` equals Pillow's warning threshold, so by default no image we
  accept makes Pillow warn.
* EXIF orientation is applied; a malformed EXIF block is ignored (the pixels
  are still good) rather than failing the file.
* Transparency (RGBA, LA, PA, P or L/RGB with a ``transparency`` key) is
  composited onto white: a logo on a transparent background then looks as it
  does in a viewer, instead of whatever colour hides under alpha = 0.
* 16-bit and 32-bit grey (``I;16*``, ``I``, ``F``) are scaled to 8 bits, not
  clipped; CMYK, palette, 1-bit, YCbCr... go through ``Image.convert('RGB')``.
  Embedded ICC profiles are not applied.
* Animated GIF/WebP/APNG and multi-page TIFF: the first frame only.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import io
import os
import stat
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageFile, ImageOps, JpegImagePlugin, UnidentifiedImageError

from mmsearch.errors import DecodeError, UsageError

DEFAULT_MAX_PIXELS = 89_478_485
"""About 89 megapixels (Pillow's own warning threshold): 12, 24, 50 and 61 MP
photos pass, a 30000x30000 (900 MP) image does not."""

HASH_CHUNK = 1 << 20
"""Bytes read at a time by `content_hash`."""

BASE_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
"""Pillow format ids `load_image` attempts (HEIF/AVIF added when available).

MPO (multi-picture JPEG from cameras) opens through the JPEG factory."""

BACKGROUND = (255, 255, 255)
"""Colour transparent pixels are composited onto."""

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


@functools.cache
def register_heif() -> bool:
    """Register pillow_heif's opener once, if installed; say whether it is."""
    if importlib.util.find_spec("pillow_heif") is None:
        return False
    try:
        import pillow_heif

        pillow_heif.register_heif_opener()
    except Exception:  # a broken install must not break plain JPEG decoding
        return False
    return True


def allowed_formats() -> tuple[str, ...]:
    """The Pillow format ids `load_image` passes to ``Image.open``."""
    register_heif()
    Image.init()  # loads every plugin once; a no-op afterwards
    wanted = BASE_FORMATS + ("HEIF", "AVIF")
    return tuple(f for f in wanted if f in Image.OPEN)


def content_hash(path: Path | str) -> str:
    """BLAKE2b-128 hex digest of the file's bytes, read 1 MiB at a time.

    Raises `DecodeError` when the file cannot be read.
    """
    digest = hashlib.blake2b(digest_size=16)
    buf = bytearray(HASH_CHUNK)
    view = memoryview(buf)
    with open_regular(path) as fh:
        try:
            while n := fh.readinto(buf):
                digest.update(view[:n])
        except OSError as exc:
            raise DecodeError(os_reason(exc)) from exc
    return digest.hexdigest()


def bytes_hash(data: bytes) -> str:
    """:func:`content_hash` of a file's bytes already in memory (the same digest)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def load_image(
    path: Path | str,
    *,
    draft_size: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Decode ``path`` into a new RGB image, or raise `DecodeError` saying why.

    ``draft_size``: for JPEGs, let libjpeg decode at a reduced scale (1/2, 1/4
    or 1/8) while keeping the *shorter* side >= ``draft_size``, which is what a
    shortest-side resize to ``draft_size`` followed by a centre crop needs.
    ``max_pixels``: refuse images whose header claims more pixels than this.
    """
    if draft_size is not None and draft_size < 1:
        raise UsageError(f"draft_size must be positive, got {draft_size}")
    if max_pixels < 1:
        raise UsageError(f"max_pixels must be positive, got {max_pixels}")
    formats = allowed_formats()
    with open_regular(path) as fh:
        return _decode(fh, formats, draft_size, max_pixels)


CHANGED = "changed while being indexed; run index again"


def check_unchanged(path: Path | str, expect: tuple[int, int]) -> None:
    """Raise `DecodeError` (`CHANGED`) unless ``path`` still has the (size, mtime_ns) ``expect``."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise DecodeError(CHANGED) from exc
    if (st.st_size, st.st_mtime_ns) != expect:
        raise DecodeError(CHANGED)


def read_bytes(path: Path | str) -> bytearray:
    """The whole file (writable, so a tensor can wrap it without a copy), or `DecodeError`
    with the reasons :func:`load_image` gives."""
    with open_regular(path) as fh:
        try:
            data = bytearray(os.fstat(fh.fileno()).st_size)
            del data[fh.readinto(data):]  # (in place: a file that shrank meanwhile)
            data += fh.read()             # (a file that grew: the rest too)
        except OSError as exc:
            raise DecodeError(os_reason(exc)) from exc
    if not data:
        raise DecodeError("empty file")
    return data


def decode_bytes(data: bytes, *, draft_size: int | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """:func:`load_image` for an image held in memory (an upload): the same checks
    (formats, decompression bombs, corrupt data) and conversion, nothing written to disk."""
    if not data:
        raise DecodeError("empty file")
    return _decode_opened(io.BytesIO(data), allowed_formats(), draft_size, max_pixels)


def open_regular(path: Path | str) -> io.BufferedReader:
    """Open a regular file for reading, refusing FIFOs and devices without blocking.

    ``O_NONBLOCK`` makes opening a FIFO return at once (it has no effect on
    regular files), so a named pipe called ``x.jpg`` cannot hang the indexer.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise DecodeError(os_reason(exc)) from exc
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        os.close(fd)
        raise DecodeError(os_reason(exc)) from exc
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "is a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise DecodeError(f"not a file: {kind}")
    return os.fdopen(fd, "rb")


def os_reason(exc: OSError) -> str:
    """A short reason for an OSError raised while opening or reading a file."""
    if isinstance(exc, FileNotFoundError):
        return "vanished: no such file"
    if isinstance(exc, PermissionError):
        return "unreadable: permission denied"
    if isinstance(exc, IsADirectoryError):
        return "not a file: is a directory"
    return f"unreadable: {exc.strerror or exc}"


def _decode(
    fh: BinaryIO, formats: tuple[str, ...], draft_size: int | None, max_pixels: int
) -> Image.Image:
    """Open, check, load and convert; every failure becomes a `DecodeError`."""
    try:
        empty = os.fstat(fh.fileno()).st_size == 0
    except OSError as exc:
        raise DecodeError(os_reason(exc)) from exc
    if empty:
        raise DecodeError("empty file")
    return _decode_opened(fh, formats, draft_size, max_pixels)


def _decode_opened(fh: BinaryIO, formats: tuple[str, ...], draft_size: int | None,
                   max_pixels: int) -> Image.Image:
    img = open_header(fh, formats)
    try:
        _check_size(img, max_pixels)
        if draft_size is not None and isinstance(img, JpegImagePlugin.JpegImageFile):
            img.draft("RGB", (draft_size, draft_size))
        _load(img)
        return to_rgb(_apply_orientation(img))
    except DecodeError:
        raise
    except Exception as exc:  # decoders raise all sorts: ValueError, struct.error...
        raise DecodeError(f"corrupt image data: {_describe(exc)}") from exc
    finally:
        img.close()


def open_header(fh: BinaryIO, formats: tuple[str, ...]) -> ImageFile.ImageFile:
    """``Image.open`` (header only) with its failures translated."""
    try:
        return Image.open(fh, formats=list(formats))
    except UnidentifiedImageError as exc:
        raise DecodeError("not an image (cannot identify)") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecodeError(f"too large: {exc}") from exc
    except Exception as exc:
        raise DecodeError(_failure_reason(exc, "corrupt image header")) from exc


def _check_size(img: Image.Image, max_pixels: int) -> None:
    """Refuse an image whose header claims too many (or no) pixels."""
    width, height = img.size
    if width < 1 or height < 1:
        raise DecodeError(f"corrupt image header: size {width}x{height}")
    if width * height > max_pixels:
        raise DecodeError(f"too large: {width}x{height} exceeds {max_pixels} pixels")


def _load(img: Image.Image) -> None:
    """Decode the first frame's pixels; any failure becomes a `DecodeError`."""
    try:
        img.load()
    except Exception as exc:
        raise DecodeError(_failure_reason(exc, "corrupt image data")) from exc


def _failure_reason(exc: Exception, kind: str) -> str:
    """``truncated image data (...)`` when Pillow says so, else ``kind: detail``."""
    text = " ".join(str(exc).split())
    lowered = text.lower()
    if isinstance(exc, EOFError) or "truncated" in lowered or "broken data stream" in lowered:
        return f"truncated image data ({text or type(exc).__name__})"
    return f"{kind}: {_describe(exc)}"


def _describe(exc: BaseException) -> str:
    """``Type: message`` shortened to one line of reasonable length."""
    text = " ".join(str(exc).split()) or "no detail"
    if len(text) > 120:
        text = text[:117] + "..."
    return f"{type(exc).__name__}: {text}"


def _apply_orientation(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag; a broken EXIF block is ignored."""
    try:
        rotated = ImageOps.exif_transpose(img)
    except Exception:
        return img
    return rotated if rotated is not None else img


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to a new 8-bit RGB image (see module docstring)."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        img = _wide_grey_to_l(img)
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        return _flatten(img)
    if img.mode == "RGB":
        return img.copy()
    return img.convert("RGB")


def _flatten(img: Image.Image) -> Image.Image:
    """Composite an image with transparency onto `BACKGROUND`."""
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _wide_grey_to_l(img: Image.Image) -> Image.Image:
    """Scale 16-bit, 32-bit integer or float grey to 8-bit ``L``."""
    arr = np.asarray(img)
    if img.mode.startswith("I;16"):
        scaled = arr.astype(np.float64) / 257.0
    else:
        scaled = _rescale_unknown_range(arr.astype(np.float64), img.mode == "F")
    out = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return Image.fromarray(out)


def _rescale_unknown_range(arr: np.ndarray, is_float: bool) -> np.ndarray:
    """Map ``I``/``F`` data to 0..255 from the range its values suggest."""
    finite = arr[np.isfinite(arr)]
    if finite.size == 0:
        return np.zeros(arr.shape)
    low, high = float(finite.min()), float(finite.max())
    arr = np.nan_to_num(arr, nan=low, posinf=high, neginf=low)
    if is_float and low >= 0.0 and high <= 1.0:
        return arr * 255.0
    if low >= 0 and high <= 255:
        return arr
    if low >= 0 and high <= 65535:
        return arr / 257.0
    return (arr - low) * (255.0 / (high - low))
