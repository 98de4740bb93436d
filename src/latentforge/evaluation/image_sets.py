"""Image sets for evaluation: folders, dataset splits and in-memory images, read as 8-bit RGB.

Extractors with a resize mode (Inception, random; `resize.py`) take each whole image as read, as
pytorch-fid, torch-fidelity and clean-fid do. For CLIP the square rule applies: centre-crop to a square of
side min(W, H) (offsets (W - side) // 2, (H - side) // 2, as `models.clip.preprocess_images`), then Pillow
bicubic to the tower's image size. Images are read by `data.images.load_image_rgb`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from latentforge.data.images import ImageLoadError, is_image_file, load_image_rgb, to_rgb
from latentforge.data.preflight import read_caption
from latentforge.errors import LatentforgeError
from latentforge.pipelines.infotext import parse_infotext, read_infotext

ImageSource = str | os.PathLike | Sequence[Image.Image]


class EvalInputError(LatentforgeError, ValueError):
    """An unusable evaluation input (folder, prompts, seeds, sweep, extractor); says what to pass."""


def resize_rule_id(size: int, resize_mode: str | None = None) -> str:
    """Identifies the resize rule in cache keys and reports: the square rule, or a whole-image mode."""
    return f"centre-square-PIL-bicubic-{size}" if resize_mode is None else f"whole-image-{resize_mode}-{size}"


def square_resize(image: Image.Image, size: int) -> Image.Image:
    """The square rule: centre-crop to a square, then bicubic (antialiased) resize to `size` x `size`."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    if (width, height) != (side, side):
        image = image.crop((left, top, left + side, top + side))
    return image if side == size else image.resize((size, size), Image.Resampling.BICUBIC)


def pil_to_uint8(image: Image.Image) -> torch.Tensor:
    """8-bit RGB image -> uint8 tensor [3, H, W]."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)  # [H, W, 3] -> [3, H, W]


@dataclass
class ImageSet:
    """The candidate images of a set, their captions, and (after loading) the unreadable ones.

    Folder sets list `paths` (recursive, sorted, hidden entries skipped); in-memory sets hold `images`.
    `skipped` collects (path or index, reason) for every image that could not be read.
    """

    label: str
    paths: list[Path] = field(default_factory=list)
    images: list[Image.Image] | None = None
    root: Path | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images) if self.images is not None else len(self.paths)

    def name(self, index: int) -> str:
        return str(self.paths[index]) if self.images is None else f"{self.label}[{index}]"

    def fingerprint(self) -> str | None:
        """SHA-256 of the sorted file list with byte sizes and mtimes; None for in-memory images."""
        if self.images is not None:
            return None
        digest = hashlib.sha256()
        for path in self.paths:
            try:
                stat = path.stat()
                entry = [str(path.resolve()), stat.st_size, stat.st_mtime_ns]
            except OSError as error:  # vanished or unreadable: part of the key, so a later fix re-keys
                entry = [str(path), "error", str(error)]
            digest.update((json.dumps(entry) + "\n").encode())
        return digest.hexdigest()

    def load(self, index: int) -> Image.Image:
        """Image `index` as 8-bit RGB; raises `ImageLoadError` for an unreadable file."""
        return to_rgb(self.images[index]) if self.images is not None else load_image_rgb(self.paths[index])

    def iter_images(
        self, size: int | None = None, indices: Sequence[int] | None = None
    ) -> Iterator[tuple[int, Image.Image]]:
        """(index, image) of every readable image, under the square rule when `size` is given; the rest go
        to `skipped`."""
        for index in range(len(self)) if indices is None else indices:
            try:
                image = self.load(index)
            except ImageLoadError as error:
                self.skipped.append((self.name(index), error.reason))
                continue
            yield index, image if size is None else square_resize(image, size)

    def captions(self, indices: Sequence[int]) -> list[str | None]:
        """Caption of each image: its same-stem .txt, else the prompt of its PNG infotext, else None."""
        if self.images is not None:
            return [_infotext_prompt(self.images[i].info.get("parameters")) for i in indices]
        out: list[str | None] = []
        for index in indices:
            path = self.paths[index]
            text_file = path.with_suffix(".txt")
            if text_file.is_file():
                out.append(read_caption(text_file))
                continue
            try:
                out.append(_infotext_prompt(read_infotext(path)))
            except OSError:
                out.append(None)
        return out


def _infotext_prompt(text: object) -> str | None:
    return parse_infotext(text)[0] if isinstance(text, str) and text else None


def image_set(source: ImageSource, label: str) -> ImageSet:
    """An `ImageSet` from a folder (recursive; a dataset split such as `DATASET/holdout` is a folder) or
    a list of PIL images. A dataset root holding both `train/` and `holdout/` is refused: name the split.
    """
    if isinstance(source, (str, os.PathLike)):
        root = Path(source)
        if not root.is_dir():
            raise EvalInputError(f"{label} image folder not found: {root}")
        if (root / "train").is_dir() and (root / "holdout").is_dir():
            raise EvalInputError(
                f"{root} is a dataset root with train/ and holdout/ splits; pass one split, e.g. "
                f"{root / 'holdout'}"
            )
        return ImageSet(label, paths=_image_files(root), root=root)
    images = list(source)
    if not all(isinstance(image, Image.Image) for image in images):
        raise TypeError(f"{label} must be a folder path or a list of PIL images")
    return ImageSet(label, images=images)


def _image_files(root: Path) -> list[Path]:
    """Image files below root (extensions of `data.images.is_image_file`), hidden entries skipped, sorted."""
    files: list[Path] = []
    for directory, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files += [Path(directory, n) for n in sorted(filenames) if not n.startswith(".")]
    return [path for path in files if is_image_file(path)]
