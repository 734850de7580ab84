"""Tests for mmsearch.decode: hostile files, odd modes, drafts and hashing."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from mmsearch.ingest import decode
from mmsearch.ingest.decode import DEFAULT_MAX_PIXELS, content_hash, load_image, to_rgb
from mmsearch.errors import DecodeError, UsageError

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FLICKR = SHARED / "data" / "flickr8k-1k" / "images"


# ----------------------------------------------------------------- helpers


def save(img: Image.Image, path: Path, fmt: str, **params: object) -> Path:
    """Save ``img`` to ``path`` in ``fmt`` and return the path."""
    img.save(path, fmt, **params)
    return path


def encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    """The bytes of ``img`` saved in ``fmt``."""
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk with its length and CRC."""
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png_header_only(width: int, height: int, colour_type: int = 2) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` but carries no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b""))
        + png_chunk(b"IEND", b"")
    )


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    """A reproducible RGB noise image."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def gradient_jpeg(path: Path, width: int, height: int, orientation: int = 1) -> Path:
    """A smooth JPEG of the given size, optionally with an EXIF orientation."""
    img = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    return save(img, path, "JPEG", quality=80, exif=exif.tobytes())


def reason(path: Path, **kwargs: object) -> str:
    """The DecodeError message `load_image` gives for ``path``."""
    with pytest.raises(DecodeError) as info:
        load_image(path, **kwargs)  # type: ignore[arg-type]
    return str(info.value)


def close(a: tuple[int, ...], b: tuple[int, ...], tol: int = 12) -> bool:
    """Whether two pixels match within ``tol`` per channel (lossy codecs)."""
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


# ------------------------------------------------------------ plain success


def test_png_roundtrip_is_rgb_and_detached(tmp_path: Path) -> None:
    src = noise(17, 9)
    path = save(src, tmp_path / "n.png", "PNG")
    img = load_image(path)
    path.unlink()  # the returned image must not need the file any more
    assert img.mode == "RGB" and img.size == (17, 9)
    assert np.array_equal(np.asarray(img), np.asarray(src))


def test_misnamed_png_called_jpg_still_decodes(tmp_path: Path) -> None:
    path = save(noise(8, 8), tmp_path / "really_png.jpg", "PNG")
    assert load_image(path).size == (8, 8)


def test_unicode_and_newline_in_file_name(tmp_path: Path) -> None:
    path = save(noise(5, 4), tmp_path / "été\n写真 📷.JPG", "JPEG")
    assert load_image(path).size == (5, 4)
    assert len(content_hash(path)) == 32


# --------------------------------------------------------- hostile files


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    assert reason(path) == "empty file"


def test_text_file_named_jpg(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("this is not an image\n" * 20)
    assert reason(path) == "not an image (cannot identify)"


def test_postscript_is_refused_not_rendered(tmp_path: Path) -> None:
    path = tmp_path / "evil.jpg"
    path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    assert reason(path) == "not an image (cannot identify)"


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_truncated_jpeg(tmp_path: Path, fraction: float) -> None:
    data = encode(noise(64, 48), "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: int(len(data) * fraction)])
    assert reason(path).startswith("truncated image data")


def test_truncated_png(tmp_path: Path) -> None:
    data = encode(noise(64, 48), "PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    assert reason(path).startswith("truncated image data")


def test_missing_file_is_vanished(tmp_path: Path) -> None:
    assert reason(tmp_path / "gone.jpg").startswith("vanished")


def test_directory_and_fifo_refused_without_blocking(tmp_path: Path) -> None:
    (tmp_path / "dir.jpg").mkdir()
    assert reason(tmp_path / "dir.jpg") == "not a file: is a directory"
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "pipe.jpg")  # a blocking open would hang here
        assert reason(tmp_path / "pipe.jpg") == "not a file: not a regular file"


def test_unreadable_file_chmod(tmp_path: Path) -> None:
    path = save(noise(4, 4), tmp_path / "secret.jpg", "JPEG")
    path.chmod(0)
    if os.access(path, os.R_OK):
        pytest.skip("running as root (or with CAP_DAC_OVERRIDE): chmod 000 is not enforced")
    assert reason(path) == "unreadable: permission denied"


def test_permission_error_mapping(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """EACCES simulated, so the mapping is checked even when running as root."""
    path = save(noise(4, 4), tmp_path / "secret.jpg", "JPEG")

    def denied(*args: object, **kwargs: object) -> int:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(os, "open", denied)
    assert reason(path) == "unreadable: permission denied"
    with pytest.raises(DecodeError, match="permission denied"):
        content_hash(path)


# ---------------------------------------------------- decompression bombs


def test_huge_png_header_refused_before_decoding(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(40000, 40000))
    assert path.stat().st_size < 100
    # Refused from the header: decoding would have said "truncated" instead.
    assert reason(path).startswith("too large")


def test_size_check_uses_max_pixels(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    path.write_bytes(png_header_only(2000, 2000))
    assert reason(path, max_pixels=1_000_000) == "too large: 2000x2000 exceeds 1000000 pixels"


def test_between_pillow_warning_and_error_thresholds(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    path.write_bytes(png_header_only(12000, 9000, colour_type=0))  # 108 MP
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        assert reason(path) == f"too large: 12000x9000 exceeds {DEFAULT_MAX_PIXELS} pixels"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's warning, raised, is translated too
        assert reason(path).startswith("too large")


def test_50_megapixel_header_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "fifty.png"
    path.write_bytes(png_header_only(7000, 7000, colour_type=0))  # 49 MP grey
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and Pillow does not warn about it
        assert reason(path).startswith("truncated image data")


def test_pillow_globals_untouched(tmp_path: Path) -> None:
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    path = tmp_path / "x.png"
    path.write_bytes(png_header_only(40000, 40000))
    with pytest.raises(DecodeError):
        load_image(path, max_pixels=10**12)
    load_image(save(noise(4, 4), tmp_path / "ok.png", "PNG"))
    assert before == (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)


def test_bad_arguments_are_usage_errors(tmp_path: Path) -> None:
    path = save(noise(4, 4), tmp_path / "ok.png", "PNG")
    with pytest.raises(UsageError):
        load_image(path, draft_size=0)
    with pytest.raises(UsageError):
        load_image(path, max_pixels=0)


# ---------------------------------------------------------------- modes


def test_cmyk_jpeg(tmp_path: Path) -> None:
    path = save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), tmp_path / "c.jpg", "JPEG")
    img = load_image(path)
    assert img.mode == "RGB"
    assert close(img.getpixel((8, 8)), (255, 0, 0), tol=20)  # type: ignore[arg-type]


def test_16bit_grey_png_scaled_not_clipped(tmp_path: Path) -> None:
    ramp = np.linspace(0, 65535, 256).round().astype(np.uint16)
    src = Image.fromarray(np.tile(ramp, (4, 1)))
    assert src.mode == "I;16"
    img = load_image(save(src, tmp_path / "g16.png", "PNG"))
    row = np.asarray(img)[0, :, 0].astype(int)
    assert row.min() == 0 and row.max() == 255
    assert np.all(np.diff(row) >= 0)  # monotonic: contrast kept
    assert len(np.unique(row)) > 200  # not collapsed to a few values
    assert abs(row[128] - 128) <= 1


def test_wide_modes_via_to_rgb() -> None:
    as_i = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.int32))
    assert as_i.mode == "I"
    assert list(np.asarray(to_rgb(as_i))[0, :, 0]) == [0, 128, 255]
    signed = Image.fromarray(np.array([[-1000, 0, 1000]], dtype=np.int32))
    assert list(np.asarray(to_rgb(signed))[0, :, 0]) == [0, 128, 255]
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0, np.nan]], dtype=np.float32))
    assert list(np.asarray(to_rgb(unit))[0, :, 0]) == [0, 128, 255, 0]
    big_endian = Image.frombytes("I;16B", (2, 1), struct.pack(">HH", 0, 65535))
    assert list(np.asarray(to_rgb(big_endian))[0, :, 0]) == [0, 255]


def test_palette_png_with_transparency_on_white(tmp_path: Path) -> None:
    src = Image.new("P", (4, 1))
    src.putpalette([0, 0, 0, 255, 0, 0] + [0] * (254 * 3))
    src.putdata([0, 1, 0, 1])
    path = save(src, tmp_path / "p.png", "PNG", transparency=0)
    img = load_image(path)
    assert [img.getpixel((x, 0)) for x in range(4)] == [(255, 255, 255), (255, 0, 0)] * 2


def test_palette_without_transparency(tmp_path: Path) -> None:
    src = Image.new("P", (2, 1))
    src.putpalette([0, 0, 255, 0, 255, 0] + [0] * (254 * 3))
    src.putdata([0, 1])
    img = load_image(save(src, tmp_path / "p.png", "PNG"))
    assert [img.getpixel((x, 0)) for x in range(2)] == [(0, 0, 255), (0, 255, 0)]


def test_rgba_composited_on_white(tmp_path: Path) -> None:
    src = Image.new("RGBA", (3, 1))
    src.putdata([(255, 0, 0, 0), (255, 0, 0, 255), (255, 0, 0, 128)])
    img = load_image(save(src, tmp_path / "a.png", "PNG"))
    assert img.getpixel((0, 0)) == (255, 255, 255)  # fully transparent: white, not red
    assert img.getpixel((1, 0)) == (255, 0, 0)
    assert close(img.getpixel((2, 0)), (255, 127, 127), tol=2)  # type: ignore[arg-type]


def test_la_composited_on_white(tmp_path: Path) -> None:
    src = Image.new("LA", (2, 1))
    src.putdata([(0, 0), (0, 255)])
    img = load_image(save(src, tmp_path / "la.png", "PNG"))
    assert [img.getpixel((x, 0)) for x in range(2)] == [(255, 255, 255), (0, 0, 0)]


def test_grey_png_with_trns_colour(tmp_path: Path) -> None:
    src = Image.new("L", (2, 1))
    src.putdata([7, 200])
    img = load_image(save(src, tmp_path / "l.png", "PNG", transparency=7))
    assert [img.getpixel((x, 0)) for x in range(2)] == [(255, 255, 255), (200, 200, 200)]


def test_one_bit(tmp_path: Path) -> None:
    src = Image.new("1", (2, 1))
    src.putdata([0, 1])
    img = load_image(save(src, tmp_path / "b.png", "PNG"))
    assert [img.getpixel((x, 0)) for x in range(2)] == [(0, 0, 0), (255, 255, 255)]


def test_bmp_and_tiff(tmp_path: Path) -> None:
    src = noise(6, 5)
    for fmt, name in [("BMP", "x.bmp"), ("TIFF", "x.tif")]:
        img = load_image(save(src, tmp_path / name, fmt))
        assert np.array_equal(np.asarray(img), np.asarray(src)), fmt


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animated_first_frame(tmp_path: Path, fmt: str) -> None:
    red = Image.new("RGB", (10, 10), (255, 0, 0))
    blue = Image.new("RGB", (10, 10), (0, 0, 255))
    params: dict[str, object] = {"save_all": True, "append_images": [blue], "duration": 100}
    if fmt == "WEBP":
        params["lossless"] = True
    path = save(red, tmp_path / f"anim.{fmt.lower()}", fmt, **params)
    with Image.open(path) as check:
        assert getattr(check, "n_frames", 1) == 2
    img = load_image(path)
    assert img.mode == "RGB" and close(img.getpixel((5, 5)), (255, 0, 0))  # type: ignore[arg-type]


def test_heif_when_available(tmp_path: Path) -> None:
    if not decode.register_heif():
        pytest.skip("pillow_heif is not installed")
    src = Image.new("RGB", (64, 48), (200, 10, 10))
    try:
        path = save(src, tmp_path / "IMG_0001.HEIC", "HEIF")
    except Exception as exc:  # a build without an HEVC encoder
        pytest.skip(f"pillow_heif cannot encode here: {exc}")
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (64, 48)
    assert close(img.getpixel((32, 24)), (200, 10, 10), tol=25)  # type: ignore[arg-type]


# --------------------------------------------------- orientation and draft


def test_exif_orientation_6_swaps_size_and_rotates(tmp_path: Path) -> None:
    src = Image.new("RGB", (40, 20), (255, 0, 0))
    src.paste((0, 0, 255), (20, 0, 40, 20))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # display = rotate 90 degrees clockwise
    path = save(src, tmp_path / "rot.jpg", "JPEG", exif=exif.tobytes(), quality=95)
    img = load_image(path)
    assert img.size == (20, 40)
    assert close(img.getpixel((10, 3)), (255, 0, 0), tol=30)  # type: ignore[arg-type]
    assert close(img.getpixel((10, 36)), (0, 0, 255), tol=30)  # type: ignore[arg-type]


def test_draft_4000x3000_to_224(tmp_path: Path) -> None:
    path = gradient_jpeg(tmp_path / "big.jpg", 4000, 3000)
    assert load_image(path).size == (4000, 3000)
    img = load_image(path, draft_size=224)
    assert img.mode == "RGB"
    assert 224 <= min(img.size) <= 3000 // 4, img.size
    assert img.size == (500, 375)  # 1/8 scale: the largest that keeps >= 224


def test_draft_keeps_exif_orientation(tmp_path: Path) -> None:
    path = gradient_jpeg(tmp_path / "rot.jpg", 4000, 3000, orientation=6)
    img = load_image(path, draft_size=224)
    assert img.size == (375, 500)


@pytest.mark.parametrize(
    ("size", "draft", "expected"),
    [
        ((1792, 1800), 224, (224, 225)),  # 1/8 exactly reaches 224 on the short side
        ((1791, 3000), 224, (448, 750)),  # 1/8 would give 223.9: falls back to 1/4
        ((3000, 1791), 224, (750, 448)),  # same, landscape
        ((300, 200), 224, (300, 200)),  # already small: no reduction
        ((4000, 3000), 1000, (2000, 1500)),
    ],
)
def test_draft_never_below_requested_short_side(
    tmp_path: Path, size: tuple[int, int], draft: int, expected: tuple[int, int]
) -> None:
    path = gradient_jpeg(tmp_path / "d.jpg", *size)
    img = load_image(path, draft_size=draft)
    assert img.size == expected
    assert min(img.size) >= min(draft, min(size))


def test_draft_ignored_for_non_jpeg(tmp_path: Path) -> None:
    path = save(noise(1000, 800), tmp_path / "big.png", "PNG")
    assert load_image(path, draft_size=224).size == (1000, 800)


def test_draft_on_cmyk_and_grey_jpeg(tmp_path: Path) -> None:
    for mode in ("CMYK", "L"):
        path = save(Image.new(mode, (2000, 1600)), tmp_path / f"{mode}.jpg", "JPEG")
        img = load_image(path, draft_size=224)
        # 1/8 would make the short side 200 < 224, so 1/4 is used.
        assert img.mode == "RGB" and img.size == (500, 400), mode


# ------------------------------------------------------------ real photos


@pytest.mark.skipif(not FLICKR.is_dir(), reason=f"real photos not found at {FLICKR}")
def test_real_flickr_photos() -> None:
    paths = sorted(FLICKR.glob("*.jpg"))[:2]
    assert paths, "no JPEGs in the flickr folder"
    for path in paths:
        full = load_image(path)
        small = load_image(path, draft_size=224)
        assert full.mode == small.mode == "RGB"
        assert min(small.size) >= min(224, min(full.size))
        assert content_hash(path) == hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()
    assert content_hash(paths[0]) != content_hash(paths[1])


# ------------------------------------------------------------------ hash


def test_content_hash_streams_across_chunks(tmp_path: Path) -> None:
    data = os.urandom(decode.HASH_CHUNK * 2 + 12345)
    path = tmp_path / "blob.jpg"
    path.write_bytes(data)
    expected = hashlib.blake2b(data, digest_size=16).hexdigest()
    assert content_hash(path) == expected
    copy = tmp_path / "moved" / "other name.jpg"
    copy.parent.mkdir()
    copy.write_bytes(data)
    assert content_hash(copy) == expected
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert content_hash(tmp_path / "empty.jpg") == hashlib.blake2b(digest_size=16).hexdigest()


def test_content_hash_errors(tmp_path: Path) -> None:
    with pytest.raises(DecodeError, match="vanished"):
        content_hash(tmp_path / "missing.jpg")
    with pytest.raises(DecodeError, match="directory"):
        content_hash(tmp_path)


# ------------------------------------------------------------------- fuzz


def _seeds() -> list[bytes]:
    """Small valid files in every attempted format, for mutation fuzzing."""
    exif = Image.Exif()
    exif[0x0112] = 6
    rgb, rgba = noise(12, 9, seed=1), noise(7, 5, seed=2).convert("RGBA")
    return [
        encode(rgb, "JPEG", exif=exif.tobytes()),
        encode(rgb, "JPEG", progressive=True),
        encode(rgba, "PNG"),
        encode(rgb.convert("P"), "GIF"),
        encode(rgb, "WEBP"),
        encode(rgb, "BMP"),
        encode(rgb, "TIFF", compression="tiff_lzw"),
        png_header_only(3, 3),
    ]


SEEDS = _seeds()
FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _decodes_or_decode_error(path: Path, data: bytes) -> None:
    """The fuzz property: an RGB image or a DecodeError, nothing else."""
    path.write_bytes(data)
    try:
        img = load_image(path, draft_size=8)
    except DecodeError as exc:
        assert str(exc)
    else:
        assert img.mode == "RGB" and img.width > 0 and img.height > 0


@FUZZ
@given(data=st.binary(max_size=4096))
def test_fuzz_random_bytes(tmp_path: Path, data: bytes) -> None:
    _decodes_or_decode_error(tmp_path / "fuzz.jpg", data)


@FUZZ
@given(
    seed=st.sampled_from(range(len(SEEDS))),
    edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=12),
    cut=st.none() | st.integers(0, 10**6),
)
def test_fuzz_mutated_valid_files(
    tmp_path: Path, seed: int, edits: list[tuple[int, int]], cut: int | None
) -> None:
    data = bytearray(SEEDS[seed])
    for where, value in edits:
        data[where % len(data)] = value
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    _decodes_or_decode_error(tmp_path / "fuzz.jpg", bytes(data))
