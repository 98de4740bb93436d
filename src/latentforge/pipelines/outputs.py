"""Writing results to a folder without ever replacing a file: next free number, exclusive creation.

Each image goes to a temporary name in the same folder first and is then hard-linked to its final name
(`os.link` fails if the name exists, so two processes writing one folder never overwrite each other's
images; a user who deleted an image does not get it replaced), so a crash never leaves a partial file.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import tempfile
from collections.abc import Callable
from pathlib import Path

from latentforge.data.images import IMAGE_EXTENSIONS
from latentforge.errors import OutputError


def prepare_folder(folder: str | Path) -> Path:
    """Create the output folder and prove it writable before any model work; OutputError otherwise."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder}: the output path is a file, not a folder; pass another --out")
    if not folder.exists() and folder.suffix.lower() in IMAGE_EXTENSIONS:
        raise OutputError(
            f"{folder}: --out names a folder, and this looks like an image file name; "
            "images are written into the folder with numbered names"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as e:
        raise OutputError(f"{folder}: cannot write there ({e.strerror or e}); pass another --out") from None
    return folder


def next_number(folder: Path, prefix: str = "") -> int:
    """One past the highest number after `prefix` that a file name in the folder starts with (images:
    "00012-seed.png", grids: "grid-00003.png"); not the count of files."""
    numbered = re.compile(re.escape(prefix) + r"(\d{5,})")
    numbers = [int(m.group(1)) for p in folder.iterdir() if (m := numbered.match(p.name))]
    return max(numbers, default=-1) + 1


def write_new(
    folder: Path, name: Callable[[int], str], write: Callable[[Path], object], number: int | None = None
) -> Path:
    """Write a file through `write(temporary_path)` and give it `name(number)`, or the next free number.

    Without `number`, the first number past those in the folder (`next_number`); processes sharing a
    folder pass numbers fixed in advance (`pipelines.sharding`), as a scan of the folder would race.
    """
    tmp = folder / f".partial-{secrets.token_hex(6)}{Path(name(0)).suffix}"
    try:
        try:
            write(tmp)
        except OSError as e:
            raise OutputError(f"{folder}: writing failed ({e.strerror or e}); nothing was kept") from None
        if number is None:
            number = next_number(folder, re.split(r"\d", name(0), maxsplit=1)[0])
        for _ in range(10_000):
            target = folder / name(number)
            try:
                os.link(tmp, target)
                return target
            except FileExistsError:
                number += 1
        raise OutputError(f"{folder}: no free file name found")
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
