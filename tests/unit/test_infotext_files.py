"""Infotext in image files: PNG text chunk, EXIF UserComment in JPEG/WebP, read back as A1111 reads it.

piexif is the library A1111 writes and reads EXIF with (modules/images.py), so it serves as the oracle.
"""

import json
import struct

import numpy as np
import pytest
from PIL import Image

from latentforge.data.images import ImageLoadError
from latentforge.errors import LatentforgeError, OutputError, ParameterError
from latentforge.pipelines.infotext import (
    decode_user_comment,
    exif_user_comment,
    format_infotext,
    parse_infotext,
    read_infotext,
    save_image,
    save_png,
)

try:  # test-only package (pyproject's test extra); the by-hand EXIF tests below run without it
    import piexif
    import piexif.helper
except ImportError:
    piexif = None
needs_piexif = pytest.mark.skipif(piexif is None, reason="piexif (A1111's EXIF library) is not installed")

TEXT = format_infotext(
    "一只猫坐在窗台上, 🐱 (masterpiece:1.2)\nsecond line: \"quoted\"",
    "低质量, blurry\nugly 😿",
    {"Steps": 20, "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": 7, "Seed": 1,
     "Size": "64x48", "Lora hashes": "猫: 1a2b3c, dog: 4d5e6f", "Version": "v1.10.1"},
)  # fmt: skip


def _image(mode: str = "RGB") -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, (48, 64, len(mode)), dtype=np.uint8)
    return Image.fromarray(pixels if len(mode) > 1 else pixels[..., 0], mode)


@pytest.mark.parametrize("suffix", ["png", "jpg", "jpeg", "webp", "PNG", "JPG"])
def test_round_trip_by_suffix(tmp_path, suffix):
    path = save_image(_image(), tmp_path / f"a.{suffix}", TEXT)
    assert read_infotext(path) == TEXT
    assert read_infotext(str(path)) == TEXT
    with Image.open(path) as image:
        assert image.format == {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}[suffix.lower()]
        assert image.size == (64, 48)
        assert read_infotext(image) == TEXT
    prompt, negative, params = parse_infotext(read_infotext(path))
    assert prompt.startswith("一只猫") and negative.endswith("😿") and params["Lora hashes"].startswith("猫")


@pytest.mark.parametrize("fmt", ["png", "jpg", "webp"])
def test_format_overrides_suffix(tmp_path, fmt):
    path = save_image(_image(), tmp_path / "image.bin", TEXT, format=fmt)
    with Image.open(path) as image:
        assert image.format == {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}[fmt]
    assert read_infotext(path) == TEXT


def test_png_pixels_exact_and_save_png_name(tmp_path):
    image = _image()
    save_png(image, tmp_path / "a.png", TEXT)
    with Image.open(tmp_path / "a.png") as back:
        assert np.array_equal(np.asarray(back), np.asarray(image))
        assert back.info["parameters"] == TEXT  # the chunk A1111 reads


@needs_piexif
@pytest.mark.parametrize("suffix", ["jpg", "webp"])
def test_a1111_reads_ours(tmp_path, suffix):
    """What A1111's read_info_from_image does with our file: piexif.load, then UserComment.load."""
    path = save_image(_image(), tmp_path / f"a.{suffix}", TEXT)
    with Image.open(path) as image:
        exif = piexif.load(image.info["exif"])
    assert piexif.helper.UserComment.load(exif["Exif"][piexif.ExifIFD.UserComment]) == TEXT


@needs_piexif
def test_exif_block_matches_piexif_dump():
    """Same tag, type, count and payload as piexif.dump (A1111's writer) produces."""
    ours = piexif.load(exif_user_comment(TEXT))
    theirs = piexif.load(
        piexif.dump({"Exif": {piexif.ExifIFD.UserComment: piexif.helper.UserComment.dump(TEXT, "unicode")}})
    )
    assert ours["Exif"] == theirs["Exif"]
    assert exif_user_comment(TEXT).endswith(b"UNICODE\0" + TEXT.encode("utf-16-be"))


@needs_piexif
@pytest.mark.parametrize("suffix", ["jpg", "webp"])
def test_reads_file_written_as_a1111_writes(tmp_path, suffix):
    """A1111: image.save(...) then piexif.insert(piexif.dump({Exif: {UserComment: dump(unicode)}}), file)."""
    path = tmp_path / f"a1111.{suffix}"
    _image().save(path, quality=80)
    exif = piexif.dump(
        {"Exif": {piexif.ExifIFD.UserComment: piexif.helper.UserComment.dump(TEXT, "unicode")}}
    )
    piexif.insert(exif, str(path))
    assert read_infotext(path) == TEXT


def test_exif_comment_in_png_and_precedence(tmp_path):
    """A PNG eXIf chunk is read too; a non-empty EXIF comment wins over the text chunk, as in A1111."""
    _image().save(tmp_path / "e.png", exif=exif_user_comment("from exif"))
    assert read_infotext(tmp_path / "e.png") == "from exif"
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "from chunk")
    _image().save(tmp_path / "both.png", pnginfo=info, exif=exif_user_comment("from exif"))
    assert read_infotext(tmp_path / "both.png") == "from exif"


def test_png_chunks_after_the_pixels(tmp_path):
    """Chunks placed after IDAT (allowed by the PNG spec) are found too."""
    import io
    import zlib

    buffer = io.BytesIO()
    _image().save(buffer, format="PNG")
    data = buffer.getvalue()
    body = b"parameters\0" + b"late chunk, Steps: 1"
    chunk = struct.pack(">I", len(body)) + b"tEXt" + body + struct.pack(">I", zlib.crc32(b"tEXt" + body))
    end = data.rindex(b"IEND") - 4
    (tmp_path / "late.png").write_bytes(data[:end] + chunk + data[end:])
    assert read_infotext(tmp_path / "late.png") == "late chunk, Steps: 1"


def _tiff(comment: bytes, type_: int = 7, little: bool = False) -> bytes:
    """An EXIF block holding one UserComment, built from TIFF 6.0 by hand (independent of our writer)."""
    e = "<" if little else ">"
    head = (b"II*\0" if little else b"MM\0*") + struct.pack(e + "I", 8)
    ifd0 = struct.pack(e + "HHHIII", 1, 0x8769, 4, 1, 26, 0)
    sub = struct.pack(e + "HHHIII", 1, 0x9286, type_, len(comment), 44, 0)
    return b"Exif\0\0" + head + ifd0 + sub + comment


@pytest.mark.parametrize(
    ("comment", "little", "type_", "expected"),
    [
        (b"UNICODE\0" + "猫 cat, 🐱".encode("utf-16-be"), False, 7, "猫 cat, 🐱"),  # A1111 / piexif
        (b"UNICODE\0" + "cat, dog: 1".encode("utf-16-le"), True, 7, "cat, dog: 1"),  # Exif spec, II file
        (b"UNICODE\0" + "cat, dog: 1".encode("utf-16-be"), True, 7, "cat, dog: 1"),  # piexif text, II file
        (b"ASCII\0\0\0Steps: 20, Seed: 1", False, 7, "Steps: 20, Seed: 1"),
        (b"ASCII\0\0\0" + "caf\u00e9 \u732b".encode(), False, 7, "caf\u00e9 \u732b"),  # UTF-8 under ASCII
        (b"\0" * 8 + b"undefined code", False, 7, "undefined code"),
        (b"raw text, no code at all\0\0", False, 7, "raw text, no code at all"),  # A1111's utf8 fallback
        (b"ASCII\0\0\0typed BYTE", False, 1, "typed BYTE"),  # Pillow's Image.Exif writes BYTE
    ],
)
def test_user_comment_variants(tmp_path, comment, little, type_, expected):
    path = tmp_path / "v.jpg"
    _image().save(path, exif=_tiff(comment, type_, little))
    assert read_infotext(path) == expected


def test_decode_user_comment_bom_and_jis():
    assert decode_user_comment(b"UNICODE\0" + "ab".encode("utf-16")) == "ab"
    assert decode_user_comment(b"JIS\0\0\0\0\0" + "猫".encode("shift_jis")) == "猫"


def test_absent_metadata_is_none(tmp_path):
    for suffix in ("png", "jpg", "webp"):
        _image().save(tmp_path / f"plain.{suffix}")
        assert read_infotext(tmp_path / f"plain.{suffix}") is None
    _image().save(tmp_path / "empty.jpg", exif=exif_user_comment(""))
    assert read_infotext(tmp_path / "empty.jpg") is None
    _image().save(tmp_path / "junk.jpg", exif=b"Exif\0\0MM\0*\0\0\0\x08\xff\xff")  # malformed EXIF
    assert read_infotext(tmp_path / "junk.jpg") is None


def test_missing_or_non_image_file_names_it(tmp_path):
    with pytest.raises(ImageLoadError, match="nope.png: file not found"):
        read_infotext(tmp_path / "nope.png")
    (tmp_path / "notes.jpg").write_text("not an image")
    with pytest.raises(ImageLoadError, match="notes.jpg") as caught:
        read_infotext(tmp_path / "notes.jpg")
    assert isinstance(caught.value, LatentforgeError)
    with pytest.raises(ImageLoadError, match=str(tmp_path)):
        read_infotext(tmp_path)  # a folder


def test_never_overwrites(tmp_path):
    path = save_image(_image(), tmp_path / "a.png", "first")
    with pytest.raises(OutputError, match="a.png already exists"):
        save_image(_image(), path, "second")
    assert read_infotext(path) == "first"


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def broken_save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OutputError, match="a.png: cannot write the image: No space left"):
        save_image(_image(), tmp_path / "a.png", "x")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_folder_and_unknown_format(tmp_path):
    with pytest.raises(OutputError, match="missing"):
        save_image(_image(), tmp_path / "missing" / "a.png", "x")
    with pytest.raises(ParameterError, match="'gif'.*png, jpg, webp"):
        save_image(_image(), tmp_path / "a.png", "x", format="gif")
    with pytest.raises(ParameterError, match=r"a\.tif.*png, jpg, webp"):
        save_image(_image(), tmp_path / "a.tif", "x")
    assert list(tmp_path.iterdir()) == []


def test_modes_and_jpeg_limit(tmp_path):
    save_image(_image("RGBA"), tmp_path / "a.jpg", "rgba")  # alpha dropped for JPEG, as A1111 does
    save_image(_image("RGBA"), tmp_path / "a.webp", "rgba")
    with Image.open(tmp_path / "a.jpg") as jpg, Image.open(tmp_path / "a.webp") as webp:
        assert jpg.mode == "RGB" and webp.mode == "RGBA"
    save_image(_image("L"), tmp_path / "l.jpg", "grey")
    assert read_infotext(tmp_path / "l.jpg") == "grey"
    long_text = "x" * 40000  # 80 kB as UTF-16: more than one JPEG APP1 segment holds
    with pytest.raises(OutputError, match="does not fit JPEG"):
        save_image(_image(), tmp_path / "long.jpg", long_text)
    assert not (tmp_path / "long.jpg").exists()
    save_image(_image(), tmp_path / "long.webp", long_text)
    assert read_infotext(tmp_path / "long.webp") == long_text


def test_no_infotext(tmp_path):
    for suffix in ("png", "jpg", "webp"):
        assert read_infotext(save_image(_image(), tmp_path / f"n.{suffix}", None)) is None


def test_novelai_png_as_a1111_converts_it(tmp_path):
    """NovelAI keeps its parameters as Description + Comment JSON; A1111 turns them into an infotext."""
    from PIL import PngImagePlugin

    comment = {"steps": 28, "sampler": "k_euler_ancestral", "seed": 2463381925, "strength": 0.7, "noise": 0.2,
               "scale": 11.0, "uc": "lowres, bad anatomy", "width": 64, "height": 48}  # fmt: skip
    info = PngImagePlugin.PngInfo()
    for key, value in {"Title": "AI generated image", "Description": "1girl, fox ears, autumn leaves",
                       "Software": "NovelAI", "Source": "Stable Diffusion 1D44365E",
                       "Comment": json.dumps(comment)}.items():  # fmt: skip
        info.add_text(key, value)
    _image().save(tmp_path / "nai.png", pnginfo=info)
    assert read_infotext(tmp_path / "nai.png") == (
        "1girl, fox ears, autumn leaves\nNegative prompt: lowres, bad anatomy\n"
        "Steps: 28, Sampler: Euler a, CFG scale: 11.0, Seed: 2463381925, Size: 64x48, Clip skip: 2, "
        "ENSD: 31337"
    )
    newer = comment | {"sampler": "k_dpmpp_2s_ancestral", "noise_schedule": "karras"}
    info = PngImagePlugin.PngInfo()
    for key, value in {"Software": "NovelAI", "Description": "x", "Comment": json.dumps(newer)}.items():
        info.add_text(key, value)
    _image().save(tmp_path / "nai2.png", pnginfo=info)
    params = parse_infotext(read_infotext(tmp_path / "nai2.png"))[2]
    assert (params["Sampler"], params["Schedule type"]) == ("DPM++ 2S a", "Karras")
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", "NovelAI")
    info.add_text("Comment", "not json")
    _image().save(tmp_path / "nai3.png", pnginfo=info)
    assert read_infotext(tmp_path / "nai3.png") is None


def test_out_folder_that_looks_like_an_image_name_is_refused(tmp_path):
    from latentforge.pipelines.outputs import prepare_folder

    with pytest.raises(OutputError, match=r"apple\.png: --out names a folder"):
        prepare_folder(tmp_path / "apple.png")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "shots.png").mkdir()  # a folder someone did name so is still a folder
    assert prepare_folder(tmp_path / "shots.png") == tmp_path / "shots.png"
    assert prepare_folder(tmp_path / "new") == tmp_path / "new"
