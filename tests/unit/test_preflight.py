"""Image loading rules (`data/images.py`) and the dataset preflight scan."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from latentforge.data.images import ImageLoadError, image_to_tensor, load_image_rgb, read_image_size
from latentforge.data.preflight import scan_dataset


def _noise(path: Path, size: tuple[int, int] = (32, 32), fmt: str = "PNG") -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, format=fmt)
    return path


def _truncated(path: Path) -> Path:
    _noise(path, (64, 64))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_exif_rotation_is_applied(tmp_path: Path) -> None:
    image = Image.new("RGB", (32, 16), (255, 0, 0))
    image.paste((0, 0, 255), (16, 0, 32, 16))  # stored: left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise: left goes to the top
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif.tobytes(), quality=95)
    loaded = load_image_rgb(path)
    assert loaded.size == (16, 32) == read_image_size(path)
    top, bottom = loaded.getpixel((8, 4)), loaded.getpixel((8, 28))
    assert top[0] > 200 and top[2] < 60
    assert bottom[2] > 200 and bottom[0] < 60


def test_transparency_becomes_white(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (2, 1), (255, 0, 0, 0))
    rgba.putpixel((1, 0), (0, 0, 0, 128))
    rgba.save(tmp_path / "rgba.png")
    loaded = load_image_rgb(tmp_path / "rgba.png")
    assert loaded.mode == "RGB" and loaded.getpixel((0, 0)) == (255, 255, 255)
    assert all(120 <= c <= 135 for c in loaded.getpixel((1, 0)))  # half-transparent black over white

    Image.new("LA", (1, 1), (0, 0)).save(tmp_path / "la.png")
    assert load_image_rgb(tmp_path / "la.png").getpixel((0, 0)) == (255, 255, 255)

    palette = Image.new("P", (2, 1), 0)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.save(tmp_path / "p.png", transparency=0)
    loaded = load_image_rgb(tmp_path / "p.png")
    assert loaded.getpixel((0, 0)) == (255, 255, 255) and loaded.getpixel((1, 0)) == (0, 255, 0)


def test_cmyk_and_16_bit_become_8_bit_rgb(tmp_path: Path) -> None:
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)
    red = load_image_rgb(tmp_path / "cmyk.jpg")
    assert red.mode == "RGB"
    r, g, b = red.getpixel((4, 4))
    assert r > 200 and g < 60 and b < 60

    grey16 = np.array([[0, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(grey16).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    loaded = load_image_rgb(tmp_path / "grey16.png")
    assert loaded.mode == "RGB"
    assert [loaded.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]


def test_broken_files_raise_image_load_error(tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError, match="truncated"):
        load_image_rgb(_truncated(tmp_path / "cut.png"))
    (tmp_path / "text.jpg").write_text("this is not a jpeg")
    with pytest.raises(ImageLoadError, match="not a recognised image"):
        load_image_rgb(tmp_path / "text.jpg")
    with pytest.raises(ImageLoadError, match="not found"):
        load_image_rgb(tmp_path / "missing.png")


def test_decompression_bomb_guard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _noise(tmp_path / "big.png", (100, 100))
    with pytest.raises(ImageLoadError, match="decompression-bomb"):
        load_image_rgb(path, max_pixels=5000)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # the default follows Pillow's own limit
    with pytest.raises(ImageLoadError, match="decompression-bomb"):
        load_image_rgb(path)
    with pytest.raises(ImageLoadError, match="decompression-bomb"):
        read_image_size(path)
    with pytest.raises(ImageLoadError, match="decompression-bomb"):  # cannot loosen Pillow's own guard
        load_image_rgb(path, max_pixels=10_000)
    monkeypatch.undo()
    assert load_image_rgb(path).size == (100, 100)


def test_image_to_tensor_range() -> None:
    image = Image.new("RGB", (3, 2), (255, 255, 255))
    image.putpixel((0, 0), (0, 0, 0))
    tensor = image_to_tensor(image)
    assert tensor.shape == (3, 2, 3)
    assert tensor.min().item() == -1.0 and tensor.max().item() == 1.0


def test_scan_dataset_sorts_files_into_problems(tmp_path: Path) -> None:
    _noise(tmp_path / "good.png")
    (tmp_path / "good.txt").write_text("a red\n  square\n")
    _noise(tmp_path / "nocaption.jpg", fmt="JPEG")
    _truncated(tmp_path / "cut.png")
    (tmp_path / "cut.txt").write_text("broken")
    (tmp_path / "orphan.txt").write_text("no image")
    _noise(tmp_path / "empty.webp", fmt="WEBP")
    (tmp_path / "empty.txt").write_text("   ")
    (tmp_path / "5_sks dog" / "sub").mkdir(parents=True)
    _noise(tmp_path / "5_sks dog" / "sub" / "dog.png")
    (tmp_path / "0_skip").mkdir()
    _noise(tmp_path / "0_skip" / "x.png")
    (tmp_path / ".hidden").mkdir()
    _noise(tmp_path / ".hidden" / "h.png")

    report = scan_dataset(tmp_path)
    by_name = {e.path.name: e for e in report.entries}
    assert sorted(by_name) == ["dog.png", "empty.webp", "good.png"]
    assert by_name["good.png"].caption == "a red square"
    assert by_name["dog.png"].caption == "sks dog" and by_name["dog.png"].repeats == 5
    assert by_name["dog.png"].caption_source == "folder"
    assert by_name["empty.webp"].caption == ""
    assert report.num_samples == 7
    assert [p.name for p, _ in report.unreadable] == ["cut.png"]
    assert [p.name for p in report.missing_captions] == ["nocaption.jpg"]
    assert [p.name for p in report.orphan_captions] == ["orphan.txt"]
    assert [p.name for p in report.excluded_by_zero_repeats] == ["x.png"]
    assert not report.ok
    text = report.summary()
    assert "1 unreadable" in text and "cut.png" in text and "1 images without a caption" in text

    header_only = scan_dataset(tmp_path, verify=False, allow_missing_captions=True)
    assert {e.path.name for e in header_only.entries} == {
        "dog.png",
        "empty.webp",
        "good.png",
        "nocaption.jpg",
        "cut.png",
    }
