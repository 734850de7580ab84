"""Tests for mmsearch.ingest.metadata: EXIF dates, camera, GPS and size from headers only."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import ExifTags, Image, ImageFile
from PIL.TiffImagePlugin import IFDRational

from mmsearch.errors import DecodeError
from mmsearch.ingest.decode import load_image
from mmsearch.ingest.metadata import ImageMetadata, metadata_columns, read_metadata

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FLICKR = SHARED / "data" / "flickr8k-1k" / "images"

Base = ExifTags.Base
GPS = ExifTags.GPS
HAS_HEIF = importlib.util.find_spec("pillow_heif") is not None

LISBON_LAT = (IFDRational(38), IFDRational(42), IFDRational(499, 10))  # 38°42'49.9"N
LISBON_LON = (IFDRational(9), IFDRational(8), IFDRational(216, 10))  # 9°8'21.6"W
MTIME_S = 1_700_000_000  # 2023-11-14T22:13:20Z
ZONE = "XYZ+3:30"  # a POSIX TZ string (no tzdata needed): UTC-03:30, no DST


# ----------------------------------------------------------------- helpers


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    """A real Flickr8k photo, copied into tmp_path (the shared copy stays untouched)."""
    images = sorted(FLICKR.glob("*.jpg"))
    if not images:
        pytest.skip(f"real photos not found at {FLICKR} (see ../shared/README.md)")
    dst = tmp_path / "original.jpg"
    shutil.copyfile(images[0], dst)
    return dst


@pytest.fixture
def local_zone(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Run the test with the process's local zone set to `ZONE`; restored afterwards."""
    monkeypatch.setenv("TZ", ZONE)
    time.tzset()
    yield "-03:30"
    monkeypatch.undo()
    time.tzset()


def lisbon_exif(orientation: int = 6) -> Image.Exif:
    """EXIF of a Fujifilm shot in Lisbon: make/model, orientation, date+offset, lens, GPS."""
    exif = Image.Exif()
    exif[Base.Make] = "FUJIFILM"
    exif[Base.Model] = "X-T4"
    exif[Base.Orientation] = orientation
    exif.get_ifd(ExifTags.IFD.Exif).update({
        Base.DateTimeOriginal: "2023:07:14 18:30:05",
        Base.OffsetTimeOriginal: "+01:00",
        Base.LensModel: "XF23mmF1.4 R",
    })
    exif.get_ifd(ExifTags.IFD.GPSInfo).update({
        GPS.GPSLatitudeRef: "N", GPS.GPSLatitude: LISBON_LAT,
        GPS.GPSLongitudeRef: "W", GPS.GPSLongitude: LISBON_LON,
    })
    return exif


def resave(src: Path, dst: Path, exif: Image.Exif | bytes | None = None, mtime_s: int = MTIME_S,
           **params: object) -> Path:
    """Re-encode ``src`` to ``dst`` (format from the suffix) with ``exif``; set its mtime."""
    with Image.open(src) as img:
        if exif is not None:
            params["exif"] = exif
        img.save(dst, **params)
    os.utime(dst, ns=(mtime_s * 10**9, mtime_s * 10**9 + 123_456_789))
    return dst


def local(mtime_s: int) -> tuple[str, str]:
    """(naive ISO, ±HH:MM) of ``mtime_s`` in the local zone, computed independently."""
    stamp = datetime.fromtimestamp(mtime_s).astimezone()
    zone = stamp.strftime("%z")
    return stamp.replace(tzinfo=None).isoformat(timespec="seconds"), f"{zone[:3]}:{zone[3:5]}"


def raw_exif(ifd0: list[tuple], exif_ifd: list[tuple] = (), gps_ifd: list[tuple] = ()) -> bytes:
    """A little-endian APP1 EXIF block written by hand, so tags can have any type.

    Entries are ``(tag, tiff_type, count, payload_bytes)``; the Exif and GPS
    pointers are added to IFD0 when those lists are not empty.
    """
    def size(entries: list) -> int:
        return 2 + 12 * len(entries) + 4

    ifd0 = list(ifd0) + [(0x8769, 4, 1, None)] * bool(exif_ifd) + [(0x8825, 4, 1, None)] * bool(gps_ifd)
    offsets = [8, 8 + size(ifd0), 8 + size(ifd0) + size(list(exif_ifd))]
    data_at = offsets[2] + size(list(gps_ifd))
    pointers = {0x8769: offsets[1], 0x8825: offsets[2]}
    blocks, data = [], b""
    for entries in (ifd0, list(exif_ifd), list(gps_ifd)):
        block = struct.pack("<H", len(entries))
        for tag, typ, count, payload in entries:
            payload = struct.pack("<I", pointers[tag]) if payload is None else payload
            if len(payload) <= 4:
                field = payload.ljust(4, b"\x00")
            else:
                field = struct.pack("<I", data_at + len(data))
                data += payload + b"\x00" * (len(payload) % 2)
            block += struct.pack("<HHI", tag, typ, count) + field
        blocks.append(block + b"\x00\x00\x00\x00")
    return b"Exif\x00\x00II*\x00" + struct.pack("<I", 8) + b"".join(blocks) + data


def ascii_(text: str) -> tuple[int, int, bytes]:
    """(type, count, payload) of a TIFF ASCII value."""
    raw = text.encode("latin-1") + b"\x00"
    return 2, len(raw), raw


def rationals(*pairs: tuple[int, int]) -> tuple[int, int, bytes]:
    """(type, count, payload) of TIFF RATIONAL values."""
    return 5, len(pairs), b"".join(struct.pack("<II", n, d) for n, d in pairs)


# ----------------------------------------------------------------- EXIF present


def test_exif_round_trips(photo: Path, tmp_path: Path) -> None:
    path = resave(photo, tmp_path / "lisbon.JPG", lisbon_exif(orientation=6))
    meta = read_metadata(path)
    assert meta.taken == "2023-07-14T18:30:05"
    assert meta.taken_offset == "+01:00"
    assert meta.taken_source == "exif"
    assert (meta.camera_make, meta.camera_model, meta.lens) == ("FUJIFILM", "X-T4", "XF23mmF1.4 R")
    assert meta.gps_lat == pytest.approx(38.7139, abs=1e-4)
    assert meta.gps_lon == pytest.approx(-9.1393, abs=1e-4)
    assert meta.orientation == 6
    with Image.open(photo) as img:
        stored = img.size
    assert (meta.width, meta.height) == (stored[1], stored[0])
    assert (meta.width, meta.height) == load_image(path).size  # what the decoder shows
    assert meta.ext == "jpg"


def test_orientation_1_to_4_keeps_the_size(photo: Path, tmp_path: Path) -> None:
    with Image.open(photo) as img:
        stored = img.size
    for orientation in (1, 2, 3, 4):
        meta = read_metadata(resave(photo, tmp_path / f"o{orientation}.jpg", lisbon_exif(orientation)))
        assert (meta.orientation, meta.width, meta.height) == (orientation, *stored)
    for orientation in (5, 7, 8):
        meta = read_metadata(resave(photo, tmp_path / f"o{orientation}.jpg", lisbon_exif(orientation)))
        assert (meta.orientation, meta.width, meta.height) == (orientation, stored[1], stored[0])


def test_date_fallbacks_and_their_own_offsets(photo: Path, tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[Base.DateTime] = "2020:01:02 03:04:05"
    exif[Base.OffsetTime] = "-0500"  # no colon: still an offset
    exif.get_ifd(ExifTags.IFD.Exif).update({Base.DateTimeDigitized: "2021:06:07 08:09:10",
                                            Base.OffsetTimeDigitized: "+05:45",
                                            Base.OffsetTimeOriginal: "+01:00"})
    meta = read_metadata(resave(photo, tmp_path / "digitized.jpg", exif))
    assert (meta.taken, meta.taken_offset, meta.taken_source) == ("2021-06-07T08:09:10", "+05:45", "exif")
    del exif.get_ifd(ExifTags.IFD.Exif)[Base.DateTimeDigitized]
    meta = read_metadata(resave(photo, tmp_path / "datetime.jpg", exif))
    assert (meta.taken, meta.taken_offset, meta.taken_source) == ("2020-01-02T03:04:05", "-05:00", "exif")


@pytest.mark.parametrize("refs, lat, lon, expected", [
    (("S", "E"), LISBON_LAT, LISBON_LON, (-38.71386, 9.13933)),
    (("n", "w"), (IFDRational(387139, 10000),), (IFDRational(91393, 10000),), (38.7139, -9.1393)),
    ((None, "W"), LISBON_LAT, LISBON_LON, None),  # hemisphere unknown
    (("X", "W"), LISBON_LAT, LISBON_LON, None),
    (("N", "W"), (IFDRational(91), IFDRational(0), IFDRational(0)), LISBON_LON, None),  # > 90°
    (("N", "W"), LISBON_LAT, (IFDRational(9), IFDRational(75), IFDRational(0)), None),  # 75'
    (("N", "E"), (IFDRational(0),) * 3, (IFDRational(0),) * 3, None),  # "no fix"
], ids=["south-east", "decimal-degrees", "no-ref", "bad-ref", "lat>90", "minutes>60", "0,0"])
def test_gps_variants(photo: Path, tmp_path: Path, refs: tuple, lat: tuple, lon: tuple,
                      expected: tuple[float, float] | None) -> None:
    exif = Image.Exif()
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    gps.update({GPS.GPSLatitude: lat, GPS.GPSLongitude: lon, GPS.GPSLongitudeRef: refs[1]})
    if refs[0] is not None:
        gps[GPS.GPSLatitudeRef] = refs[0]
    meta = read_metadata(resave(photo, tmp_path / "gps.jpg", exif))
    if expected is None:
        assert (meta.gps_lat, meta.gps_lon) == (None, None)
    else:
        assert (meta.gps_lat, meta.gps_lon) == pytest.approx(expected, abs=1e-4)


# ----------------------------------------------------------------- no EXIF: mtime


def test_no_exif_uses_the_mtime_in_the_local_zone(photo: Path, tmp_path: Path, local_zone: str) -> None:
    path = resave(photo, tmp_path / "plain.jpg")
    meta = read_metadata(path)
    assert (meta.taken, meta.taken_offset, meta.taken_source) == ("2023-11-14T18:43:20", local_zone, "mtime")
    assert (meta.taken, meta.taken_offset) == local(MTIME_S)
    with Image.open(photo) as img:
        assert (meta.width, meta.height) == img.size
    assert (meta.camera_make, meta.camera_model, meta.lens, meta.orientation) == (None,) * 4
    assert (meta.gps_lat, meta.gps_lon) == (None, None)


def test_the_callers_mtime_wins_over_stat(photo: Path, tmp_path: Path, local_zone: str) -> None:
    path = resave(photo, tmp_path / "plain.jpg")
    meta = read_metadata(path, mtime_ns=86_400 * 10**9 + 999_999_999)  # 1970-01-02T00:00:00.99Z
    assert (meta.taken, meta.taken_offset, meta.taken_source) == ("1970-01-01T20:30:00", "-03:30", "mtime")
    assert read_metadata(path, mtime_ns=10**30).taken is None  # absurd mtime: no date, no raise


def test_mtime_in_the_machines_own_zone(photo: Path, tmp_path: Path) -> None:
    path = resave(photo, tmp_path / "plain.jpg", mtime_s=1_690_000_000)
    meta = read_metadata(path)
    assert (meta.taken, meta.taken_offset) == local(1_690_000_000)


# ----------------------------------------------------------------- damaged EXIF


@pytest.mark.parametrize("bad_date", ["0000:00:00 00:00:00", "    :  :     ", "", "2023:13:45 25:61:00",
                                      "yesterday", "2023:02:29 10:00:00"])
def test_garbage_exif_values_become_none(photo: Path, tmp_path: Path, bad_date: str,
                                         local_zone: str) -> None:
    exif = Image.Exif()
    exif[Base.Make] = b"Can\x00on\x00\x00"
    exif[Base.Orientation] = 99
    exif.get_ifd(ExifTags.IFD.Exif).update({Base.DateTimeOriginal: bad_date,
                                            Base.OffsetTimeOriginal: "+99:00"})
    exif.get_ifd(ExifTags.IFD.GPSInfo).update({
        GPS.GPSLatitudeRef: "N", GPS.GPSLatitude: (IFDRational(38, 0), IFDRational(42), IFDRational(0, 0)),
        GPS.GPSLongitudeRef: "W", GPS.GPSLongitude: LISBON_LON,
    })
    meta = read_metadata(resave(photo, tmp_path / "garbage.jpg", exif))
    assert (meta.taken, meta.taken_offset, meta.taken_source) == ("2023-11-14T18:43:20", local_zone, "mtime")
    assert meta.camera_make == "Canon"
    assert meta.orientation is None
    assert (meta.gps_lat, meta.gps_lon) == (None, None)
    with Image.open(photo) as img:
        assert (meta.width, meta.height) == img.size


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the odd types
def test_wrong_tiff_types_become_none(photo: Path, tmp_path: Path) -> None:
    exif = raw_exif(
        ifd0=[
            (Base.Make, 7, 21, b"  NIKON CORPORATION\x00\x00"),  # UNDEFINED: Pillow gives bytes
            (Base.Model, 3, 2, struct.pack("<HH", 7, 8)),  # SHORTs, not text
            (Base.Orientation, *ascii_("6")),  # text, not a SHORT
            (Base.DateTime, *ascii_("2019:12:31 23:59:59")),
        ],
        exif_ifd=[
            (Base.DateTimeOriginal, 4, 1, struct.pack("<I", 20230714)),  # a LONG
            (Base.DateTimeDigitized, *ascii_("    :  :     ")),
            (Base.OffsetTime, *ascii_("+25:00")),
            (Base.LensModel, *rationals((1, 0))),
            (Base.LensMake, 7, 5, b"Sigma"),
        ],
        gps_ifd=[
            (GPS.GPSLatitudeRef, 3, 1, struct.pack("<H", 78)),  # 'N' as a number
            (GPS.GPSLatitude, *rationals((38, 1), (42, 1))),
            (GPS.GPSLongitudeRef, *ascii_("W")),
            (GPS.GPSLongitude, *ascii_("9 8 21.6")),
        ],
    )
    meta = read_metadata(resave(photo, tmp_path / "types.jpg", exif))
    assert meta.camera_make == "NIKON CORPORATION"
    assert (meta.camera_model, meta.orientation, meta.gps_lat, meta.gps_lon) == (None,) * 4
    assert (meta.taken, meta.taken_offset, meta.taken_source) == ("2019-12-31T23:59:59", None, "exif")
    assert meta.lens == "Sigma"


def test_negative_gps_parts_are_refused(photo: Path, tmp_path: Path) -> None:
    exif = raw_exif([], gps_ifd=[
        (GPS.GPSLatitudeRef, *ascii_("N")), (GPS.GPSLatitude, 10, 1, struct.pack("<ii", 38, 1)),
        (GPS.GPSLongitudeRef, *ascii_("E")), (GPS.GPSLongitude, 10, 1, struct.pack("<ii", -9, 1)),
    ])  # SRATIONAL, signed: the hemisphere letter is what gives the sign
    meta = read_metadata(resave(photo, tmp_path / "signed.jpg", exif))
    assert (meta.gps_lat, meta.gps_lon) == (None, None)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about what it skips
@pytest.mark.parametrize("block", [
    b"Exif\x00\x00" + b"garbage" * 5,
    b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x02\x00",  # IFD cut short
    raw_exif([(Base.Make, *ascii_("Canon"))])[:-3],  # data truncated
    raw_exif([(Base.Make, *ascii_("Canon")), (0x8769, 4, 1, struct.pack("<I", 0xFFFFFF))]),  # wild pointer
], ids=["not-tiff", "short-ifd", "truncated", "wild-pointer"])
def test_a_corrupt_exif_block_never_raises(photo: Path, tmp_path: Path, block: bytes) -> None:
    meta = read_metadata(resave(photo, tmp_path / "corrupt.jpg", block))
    assert meta.taken_source == "mtime"
    with Image.open(photo) as img:
        assert (meta.width, meta.height) == img.size


TIFF_TYPES = st.sampled_from([1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12, 13, 16, 99])
TAGS = st.sampled_from([Base.Make, Base.Model, Base.Orientation, Base.DateTime, Base.DateTimeOriginal,
                        Base.OffsetTimeOriginal, Base.LensModel, Base.LensMake])
GPS_TAGS = st.sampled_from([GPS.GPSLatitudeRef, GPS.GPSLatitude, GPS.GPSLongitudeRef, GPS.GPSLongitude])


def entries(tags: st.SearchStrategy[int]) -> st.SearchStrategy[list[tuple]]:
    return st.lists(st.tuples(tags, TIFF_TYPES, st.integers(0, 40), st.binary(max_size=48)), max_size=6)


@pytest.mark.filterwarnings("ignore::UserWarning")
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ifd0=entries(TAGS), exif_ifd=entries(TAGS), gps_ifd=entries(GPS_TAGS))
def test_fuzzed_exif_never_raises(tmp_path: Path, ifd0: list, exif_ifd: list, gps_ifd: list) -> None:
    path = tmp_path / "fuzz.jpg"
    Image.new("RGB", (6, 4), (90, 120, 200)).save(path, exif=raw_exif(ifd0, exif_ifd, gps_ifd))
    meta = read_metadata(path, mtime_ns=MTIME_S * 10**9)
    assert meta.taken_source in ("exif", "mtime") and meta.taken is not None
    assert {meta.width, meta.height} == {6, 4}
    assert meta.orientation is None or 1 <= meta.orientation <= 8
    assert (meta.gps_lat is None) == (meta.gps_lon is None)


# ----------------------------------------------------------------- other files


def test_png_without_exif_uses_the_mtime(photo: Path, tmp_path: Path, local_zone: str) -> None:
    meta = read_metadata(resave(photo, tmp_path / "photo.png"))
    assert (meta.taken, meta.taken_offset, meta.taken_source) == ("2023-11-14T18:43:20", local_zone, "mtime")
    assert meta.ext == "png"
    with Image.open(photo) as img:
        assert (meta.width, meta.height) == img.size


def test_png_with_exif(photo: Path, tmp_path: Path) -> None:
    meta = read_metadata(resave(photo, tmp_path / "photo.png", lisbon_exif()))
    assert (meta.taken, meta.camera_make, meta.orientation) == ("2023-07-14T18:30:05", "FUJIFILM", 6)


def test_the_extension_is_the_names_not_the_formats(photo: Path, tmp_path: Path) -> None:
    shutil.copyfile(photo, tmp_path / "NO_EXTENSION")
    shutil.copyfile(photo, tmp_path / "really.PNG")
    assert read_metadata(tmp_path / "NO_EXTENSION").ext == ""
    assert read_metadata(str(tmp_path / "really.PNG")).ext == "png"


def test_what_is_not_an_image_raises_decode_error(tmp_path: Path) -> None:
    text = tmp_path / "notes.jpg"
    text.write_text("not a photo\n")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "folder.jpg").mkdir()
    for path in (text, tmp_path / "empty.jpg", tmp_path / "folder.jpg", tmp_path / "missing.jpg"):
        with pytest.raises(DecodeError) as info:
            read_metadata(path)
        assert str(info.value) and "\n" not in str(info.value)


# ----------------------------------------------------------------- headers only


def test_no_pixel_is_decoded(photo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    jpeg = resave(photo, tmp_path / "lisbon.jpg", lisbon_exif())
    png = resave(photo, tmp_path / "plain.png")  # no EXIF: PngImageFile.getexif would load()

    def refuse(self: Image.Image) -> None:
        raise AssertionError("pixels decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)
    monkeypatch.setattr(Image.Image, "load", refuse)
    meta = read_metadata(jpeg)
    assert (meta.taken, meta.camera_make, meta.width) == ("2023-07-14T18:30:05", "FUJIFILM", 500)
    assert read_metadata(png).taken_source == "mtime"


@pytest.mark.skipif(not HAS_HEIF, reason="pillow_heif is not installed (the project's 'heif' extra)")
def test_heic(photo: Path, tmp_path: Path) -> None:
    import pillow_heif

    pillow_heif.register_heif_opener()
    path = resave(photo, tmp_path / "IMG_0001.HEIC", lisbon_exif(orientation=6), format="HEIF", quality=30)
    meta = read_metadata(path)
    assert (meta.taken, meta.taken_offset, meta.taken_source) == ("2023-07-14T18:30:05", "+01:00", "exif")
    assert (meta.camera_make, meta.camera_model, meta.lens) == ("FUJIFILM", "X-T4", "XF23mmF1.4 R")
    assert meta.gps_lat == pytest.approx(38.7139, abs=1e-4)
    assert (meta.ext, meta.orientation) == ("heic", 6)
    # libheif's transforms, not the EXIF tag, orient a HEIF: the size is already as shown
    assert (meta.width, meta.height) == load_image(path).size


# ----------------------------------------------------------------- the module itself


def test_columns_are_the_fields_in_order() -> None:
    assert metadata_columns() == (
        "taken", "taken_offset", "taken_source", "camera_make", "camera_model", "lens",
        "gps_lat", "gps_lon", "width", "height", "orientation", "ext")
    assert metadata_columns() == tuple(f.name for f in dataclasses.fields(ImageMetadata))
    meta = ImageMetadata(*([None] * 2), "mtime", *([None] * 8), "jpg")
    with pytest.raises(dataclasses.FrozenInstanceError):
        meta.ext = "png"  # type: ignore[misc]


def test_importing_it_loads_nothing_heavy() -> None:
    code = ("import sys, mmsearch.ingest.metadata; "
            "print(sorted(m for m in ('torch', 'open_clip', 'faiss') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "[]"

