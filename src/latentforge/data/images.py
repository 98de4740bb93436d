"""Image loading rules shared by datasets, generation and evaluation.

Every image enters latentforge through `load_image_rgb`, so one set of rules holds everywhere:
EXIF orientation applied; transparency composited onto white; greyscale, palette, CMYK and 16-bit
images converted to 8-bit RGB; Pillow's decompression-bomb guard kept on; any failure raised as
`ImageLoadError` naming the file and the reason. Animated files give their first frame.
ICC profiles are not applied (as in A1111 and kohya's sd-scripts).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from latentforge.errors import LatentforgeError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

# EXIF orientations 5-8 are transposes: the stored width and height swap on display.
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)
_EXIF_ORIENTATION = 0x0112


class ImageLoadError(LatentforgeError):
    """An image that cannot be read: missing, corrupt, truncated, too large or of an unknown format."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def is_image_file(path: Path) -> bool:
    """True for the extensions datasets pick up (case-insensitive)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _pixel_limit(max_pixels: int | None) -> int | None:
    return Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels


def _check_pixels(path: Path, size: tuple[int, int], max_pixels: int | None) -> None:
    limit = _pixel_limit(max_pixels)
    if limit is not None and size[0] * size[1] > limit:
        raise ImageLoadError(
            path,
            f"{size[0]}x{size[1]} = {size[0] * size[1]} pixels exceeds the limit of {limit} "
            "(decompression-bomb guard); pass max_pixels=... if the file is trusted",
        )


@contextmanager
def open_image(path: Path, *, failure: str = "corrupt or truncated") -> Iterator[Image.Image]:
    """`Image.open` with every way it (or work on the image inside the block) can fail turned into an
    `ImageLoadError` that names the file; `failure` words the generic decode error."""
    try:
        with Image.open(path) as image:
            yield image
    except ImageLoadError:
        raise
    except FileNotFoundError as error:
        raise ImageLoadError(path, "file not found") from error
    except UnidentifiedImageError as error:
        raise ImageLoadError(path, "not a recognised image format (corrupt or not an image)") from error
    except Image.DecompressionBombError as error:
        raise ImageLoadError(path, f"decompression-bomb guard: {error}") from error
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageLoadError(path, f"{failure}: {error}") from error


def read_image_size(path: str | Path, *, max_pixels: int | None = None) -> tuple[int, int]:
    """(width, height) as displayed (after EXIF rotation), reading only the header.

    EXIF stored after a PNG's pixel data is not seen here (rare); `load_image_rgb` still applies it.
    """
    path = Path(path)
    with open_image(path, failure="unreadable header") as image:
        width, height = image.size
        # EXIF from the header only: `getexif()` would decode a whole PNG to look past its pixels.
        exif = Image.Exif()
        if image.info.get("exif"):
            exif.load(image.info["exif"])
        orientation = exif.get(_EXIF_ORIENTATION, 1)
    _check_pixels(path, (width, height), max_pixels)
    return (height, width) if orientation in _SWAPPING_ORIENTATIONS else (width, height)


def _composite_on_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _high_bit_depth_to_l(image: Image.Image) -> Image.Image:
    """16/32-bit integer greyscale (PNG 'I;16', 'I') -> 8-bit 'L' by scaling 0..65535 to 0..255."""
    array = np.asarray(image).astype(np.float64)
    return Image.fromarray(np.clip(np.rint(array / 257.0), 0, 255).astype(np.uint8), mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB, compositing transparency onto white."""
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        return _high_bit_depth_to_l(image).convert("RGB")
    if mode == "F":
        return image.convert("L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        return _composite_on_white(image)
    return image if mode == "RGB" else image.convert("RGB")


def load_image_rgb(path: str | Path, *, max_pixels: int | None = None) -> Image.Image:
    """Load an image as 8-bit RGB following the module's rules; raises `ImageLoadError`.

    `max_pixels` defaults to Pillow's `Image.MAX_IMAGE_PIXELS`; it can tighten the guard, and files
    larger than twice Pillow's own limit are still refused by Pillow.
    """
    path = Path(path)
    with open_image(path) as image:
        _check_pixels(path, image.size, max_pixels)
        image.load()
        return to_rgb(ImageOps.exif_transpose(image))


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """8-bit RGB image -> float tensor [3, H, W] in [-1, 1]."""
    array = np.asarray(to_rgb(image), dtype=np.uint8)  # [H, W, 3]
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1)  # [H, W, 3] -> [3, H, W]
    return tensor.float().div_(127.5).sub_(1.0)
