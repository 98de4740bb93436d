"""Captioned image folders as kohya's sd-scripts and A1111 users keep them, as a torch Dataset.

Layout and caption rules are those of `preflight.scan_dataset` (same-stem `.txt` captions, nested
folders, `N_name` repeat folders whose name is the fallback caption). Each image is resized to cover
its target size (the fixed resolution, or its aspect bucket) and cropped, centred or at random.
Randomness (crop, flip) is a pure function of (seed, epoch, index), so runs are reproducible with
any number of DataLoader workers.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from latentforge.data.buckets import make_buckets, nearest_bucket
from latentforge.data.images import ImageLoadError, image_to_tensor, load_image_rgb
from latentforge.data.preflight import DatasetError, PreflightReport, scan_dataset


def resize_and_crop(
    image: Image.Image, size: tuple[int, int], *, center: bool, rng: np.random.Generator
) -> tuple[Image.Image, tuple[int, int]]:
    """Scale `image` to cover `size` (width, height), then crop; returns the crop and its (top, left)."""
    target_w, target_h = size
    width, height = image.size
    scale = max(target_w / width, target_h / height)
    new_w, new_h = max(target_w, round(width * scale)), max(target_h, round(height * scale))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.Resampling.LANCZOS)
    if center:
        left, top = (new_w - target_w) // 2, (new_h - target_h) // 2
    else:
        left, top = int(rng.integers(0, new_w - target_w + 1)), int(rng.integers(0, new_h - target_h + 1))
    return image.crop((left, top, left + target_w, top + target_h)), (top, left)


class ImageFolderDataset(Dataset):
    """Images with captions from a folder tree; items are dicts of pixels, caption and path.

    Each item: `pixels` float [3, H, W] in [-1, 1], `caption` str, `path` str, and for SDXL-style
    conditioning `original_size` (h, w) and `crop_top_left` (top, left) as int64 tensors of shape [2].
    With `buckets=True`, use `bucket_ids` with `BucketBatchSampler` so a batch shares one size.
    Unreadable images and images without any caption are skipped and listed in `report`; an image
    whose pixels fail to decode later is replaced by the next readable one with a warning, or with
    `skip_unreadable=False` raises DatasetError naming it.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        resolution: int | tuple[int, int] = 512,
        buckets: bool = False,
        center_crop: bool = True,
        flip: bool = False,
        caption_ext: str = ".txt",
        seed: int = 0,
        bucket_step: int | None = None,
        min_bucket_side: int | None = None,
        max_bucket_side: int | None = None,
        allow_missing_captions: bool = False,
        verify: bool = False,
        max_pixels: int | None = None,
        skip_unreadable: bool = True,
    ) -> None:
        """See the class docstring; `verify=True` decodes every image up front (slow, catches truncation)."""
        self.root = Path(root)
        self.center_crop, self.flip, self.seed, self.max_pixels = center_crop, flip, seed, max_pixels
        self.skip_unreadable = skip_unreadable
        self.epoch = 0
        self.report: PreflightReport = scan_dataset(
            self.root,
            caption_ext=caption_ext,
            verify=verify,
            allow_missing_captions=allow_missing_captions,
            max_pixels=max_pixels,
        )
        self.entries = self.report.entries
        if not self.entries:
            problems = (
                "; ".join(self.report.unusable[:5]) or "no image files (.png, .jpg, .jpeg, .webp, .bmp)"
            )
            raise DatasetError(self.root, f"no usable images ({problems})")
        if buckets:
            if not isinstance(resolution, int):
                raise ValueError("buckets=True needs a square resolution budget (an int)")
            self.sizes = make_buckets(
                resolution, step=bucket_step, min_side=min_bucket_side, max_side=max_bucket_side
            )
            entry_buckets = [nearest_bucket(e.width, e.height, self.sizes) for e in self.entries]
        else:
            width, height = (resolution, resolution) if isinstance(resolution, int) else resolution
            self.sizes = [(width, height)]
            entry_buckets = [0] * len(self.entries)
        # Expand kohya repeats: item index -> entry index; every repeat gets its own crop/flip draw.
        self._items = [j for j, entry in enumerate(self.entries) for _ in range(entry.repeats)]
        self.bucket_ids = [entry_buckets[j] for j in self._items]
        self._entry_buckets = entry_buckets

    def set_epoch(self, epoch: int) -> None:
        """Reseed the per-item randomness for a new epoch (call on the dataset in every worker)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self._items)

    def _load(self, entry_index: int) -> Image.Image | None:
        entry = self.entries[entry_index]
        try:
            return load_image_rgb(entry.path, max_pixels=self.max_pixels)
        except ImageLoadError as error:
            if not self.skip_unreadable:
                raise DatasetError(
                    error.path,
                    f"{error.reason}; remove or replace the file, or set skip_unreadable to train without it",
                ) from None
            warnings.warn(f"skipping unreadable image {error}", stacklevel=3)
            return None

    def __getitem__(self, index: int) -> dict[str, object]:
        entry_index = self._items[index]
        bucket = self._entry_buckets[entry_index]
        image = self._load(entry_index)
        if image is None:  # fall back to the next readable image of the same size, so batches still stack
            same = [j for j, b in enumerate(self._entry_buckets) if b == bucket]
            start = same.index(entry_index)
            for j in same[start + 1 :] + same[:start]:
                image = self._load(j)
                if image is not None:
                    entry_index = j
                    break
            else:
                raise DatasetError(self.root, f"no readable image left in bucket {self.sizes[bucket]}")
        entry = self.entries[entry_index]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        original_size = (image.height, image.width)
        image, (top, left) = resize_and_crop(image, self.sizes[bucket], center=self.center_crop, rng=rng)
        if self.flip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return {
            "pixels": image_to_tensor(image),
            "caption": entry.caption,
            "path": str(entry.path),
            "original_size": torch.tensor(original_size, dtype=torch.int64),
            "crop_top_left": torch.tensor((top, left), dtype=torch.int64),
        }
