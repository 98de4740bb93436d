"""Scan an image-folder dataset before training: what will be used, what will be skipped and why.

`ImageFolderDataset` builds its list of samples with `scan_dataset`, so the report shows exactly
what the dataset will see. Layout rules (kohya's sd-scripts / A1111): images with a same-stem caption
file, nested folders, and `N_name` folders that repeat their images N times (N = 0 excludes them);
when the caption file is missing, the `name` of the innermost `N_name` folder is the caption.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from latentforge.data.images import ImageLoadError, is_image_file, load_image_rgb, read_image_size
from latentforge.errors import FileFormatError

_REPEAT_FOLDER = re.compile(r"^(\d+)_(.*)$")


class DatasetError(FileFormatError):
    """A dataset folder that cannot be trained on as it is: missing, empty, or with unusable files."""


@dataclass(frozen=True)
class ImageEntry:
    """One usable image: its displayed size, caption, where the caption came from, and repeats."""

    path: Path
    caption: str
    width: int
    height: int
    repeats: int = 1
    caption_source: str = "file"  # "file" | "folder" | "none"


@dataclass
class PreflightReport:
    """The outcome of `scan_dataset`: usable entries and every skipped or suspicious file."""

    root: Path
    entries: list[ImageEntry] = field(default_factory=list)
    unreadable: list[tuple[Path, str]] = field(default_factory=list)
    missing_captions: list[Path] = field(default_factory=list)
    empty_captions: list[Path] = field(default_factory=list)
    folder_captions: list[Path] = field(default_factory=list)
    orphan_captions: list[Path] = field(default_factory=list)
    excluded_by_zero_repeats: list[Path] = field(default_factory=list)

    @property
    def num_samples(self) -> int:
        """Samples per epoch: usable images times their folder repeats."""
        return sum(entry.repeats for entry in self.entries)

    @property
    def ok(self) -> bool:
        return not self.unreadable and not self.missing_captions

    @property
    def unusable(self) -> list[str]:
        """Every file that will not be trained on although it looks like a sample, with why."""
        return [f"{p}: {reason}" for p, reason in self.unreadable] + [
            f"{p}: no caption file and no N_name folder caption" for p in self.missing_captions
        ]

    def summary(self, show: int = 10) -> str:
        """A human-readable report listing up to `show` files per problem."""
        lines = [
            f"dataset {self.root}: {len(self.entries)} usable images, {self.num_samples} samples per epoch",
        ]
        problems = [
            ("unreadable or corrupt images (skipped)", [f"{p}: {r}" for p, r in self.unreadable]),
            ("images without a caption (skipped)", [str(p) for p in self.missing_captions]),
            ("empty caption files (used with an empty caption)", [str(p) for p in self.empty_captions]),
            ("images captioned by their N_name folder", [str(p) for p in self.folder_captions]),
            ("caption files without an image", [str(p) for p in self.orphan_captions]),
            ("images in 0_ folders (excluded)", [str(p) for p in self.excluded_by_zero_repeats]),
        ]
        for title, items in problems:
            if items:
                lines.append(f"{len(items)} {title}:")
                lines += [f"  {item}" for item in items[:show]]
                if len(items) > show:
                    lines.append(f"  ... and {len(items) - show} more")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def read_caption(path: Path, *, strict: bool = False) -> str:
    """A caption file's text: UTF-8 (BOM allowed), all whitespace runs (newlines too) -> one space.

    `strict` raises UnicodeDecodeError on bytes that are not UTF-8 instead of replacing them with U+FFFD
    (training: kohya's trainers also refuse such captions)."""
    return " ".join(path.read_text(encoding="utf-8-sig", errors="strict" if strict else "replace").split())


def folder_repeats(relative_dir: Path) -> tuple[int, str | None]:
    """(repeats, fallback caption) from the innermost `N_name` folder of a path relative to the root."""
    for part in reversed(relative_dir.parts):
        match = _REPEAT_FOLDER.match(part)
        if match:
            name = " ".join(match.group(2).split())
            return int(match.group(1)), name or None
    return 1, None


def _walk_files(root: Path) -> list[Path]:
    """Every non-hidden file under root, in a sorted (deterministic) order."""
    files: list[Path] = []
    for directory, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files += [Path(directory, name) for name in sorted(filenames) if not name.startswith(".")]
    return files


def scan_dataset(
    root: str | Path,
    *,
    caption_ext: str = ".txt",
    verify: bool = True,
    allow_missing_captions: bool = False,
    max_pixels: int | None = None,
) -> PreflightReport:
    """Scan `root` recursively and sort every file into usable entries or problems.

    Args:
        root: dataset folder (kohya's `train_data_dir`: `N_name` folders are looked for below it).
        caption_ext: caption file extension, `.txt` (A1111/kohya) or e.g. `.caption`.
        verify: decode every image fully (finds truncated files); False reads headers only.
        allow_missing_captions: keep images with no caption at all, with an empty caption.
        max_pixels: decompression-bomb limit, see `load_image_rgb`.
    Returns:
        A `PreflightReport`; print it for a summary. Never raises for a bad image.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(root, "dataset folder not found (or not a folder)")
    report = PreflightReport(root=root)
    files = _walk_files(root)
    image_stems = {path.with_suffix("") for path in files if is_image_file(path)}
    report.orphan_captions = [
        path for path in files if path.suffix == caption_ext and path.with_suffix("") not in image_stems
    ]
    for path in files:
        if not is_image_file(path):
            continue
        repeats, folder_caption = folder_repeats(path.parent.relative_to(root))
        if repeats == 0:
            report.excluded_by_zero_repeats.append(path)
            continue
        caption_path = path.with_suffix(caption_ext)
        if caption_path.is_file():
            try:
                caption, source = read_caption(caption_path, strict=True), "file"
            except UnicodeDecodeError as error:  # listed with the unusable images, named (issue 19)
                report.unreadable.append(
                    (path, f"its caption {caption_path.name} is not UTF-8 ({error.reason})")
                )
                continue
            if not caption:
                report.empty_captions.append(path)
        elif folder_caption is not None:
            caption, source = folder_caption, "folder"
            report.folder_captions.append(path)
        elif allow_missing_captions:
            caption, source = "", "none"
        else:
            report.missing_captions.append(path)
            continue
        try:
            if verify:
                width, height = load_image_rgb(path, max_pixels=max_pixels).size
            else:
                width, height = read_image_size(path, max_pixels=max_pixels)
        except ImageLoadError as error:
            report.unreadable.append((path, error.reason))
            continue
        report.entries.append(ImageEntry(path, caption, width, height, repeats, source))
    return report
