"""What a run leaves to read: a CSV log (optionally TensorBoard events), sample grids, a progress bar."""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm


class CSVLog:
    """`run_dir/log.csv`, one row per logged step, only ever appended to (a crash loses no history).

    New metric names start a new section: a fresh header line (`step,...`) with the grown column list.
    A resumed run appends a header and a marker row (its resume step, all other fields empty): the
    rows after that step belong to the attempt that was interrupted, and `read_log` drops them.
    Disabled (every call a no-op) on processes other than rank 0.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        resume_step: int = 0,
        tensorboard_dir: Path | None = None,
        enabled: bool = True,
    ) -> None:
        self.path, self.enabled, self.tensorboard = Path(path), enabled, None
        self.columns: list[str] = []  # of the current section; [] until this process writes a header
        self.resume_step = resume_step
        if not enabled:  # a process other than rank 0: logging is a no-op
            return
        self.tensorboard = _tensorboard_writer(tensorboard_dir) if tensorboard_dir else None

    def log(self, step: int, values: Mapping[str, float]) -> None:
        """Append one row (and TensorBoard scalars, if enabled)."""
        if not self.enabled:
            return
        row = {"step": step, **{k: _format(v) for k, v in values.items()}}
        with open(self.path, "a", newline="") as f:
            new = [k for k in row if k not in self.columns]
            if new:
                marker = not self.columns and f.tell() > 0  # this process's first row in an existing log
                self.columns = (self.columns or ["step"]) + [k for k in new if k != "step"]
                csv.writer(f).writerow(self.columns)
                if marker:
                    csv.writer(f).writerow([self.resume_step] + [""] * (len(self.columns) - 1))
            csv.DictWriter(f, fieldnames=self.columns).writerow(row)
        if self.tensorboard is not None:
            for key, value in values.items():
                self.tensorboard.add_scalar(key, value, step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def _format(value: float) -> str:
    return repr(float(value)) if math.isfinite(value) else str(float(value))


def _tensorboard_writer(log_dir: Path) -> Any:
    """A SummaryWriter if the optional `tensorboard` package is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("tensorboard = true but the tensorboard package is not installed; writing log.csv only")
        return None
    return SummaryWriter(str(log_dir))


def read_log(path: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of a `log.csv` as the run that finished sees them (values as strings, "" where absent).

    Sections (see `CSVLog`) are merged; a resume marker drops the interrupted attempt's rows after its
    step, and a row replaces any earlier one of the same or a later step.
    """
    rows: list[dict[str, str]] = []
    columns: list[str] = []
    header: list[str] = []
    with open(path, newline="") as f:
        for record in csv.reader(f):
            if not record:
                continue
            if record[0] == "step":
                header = record
                columns += [name for name in record if name not in columns]
                continue
            row = dict(zip(header, record, strict=False))
            step = int(row["step"])
            while rows and int(rows[-1]["step"]) >= step + (0 if any(record[1:]) else 1):
                rows.pop()
            if any(record[1:]):  # not a resume marker
                rows.append(row)
    return [{name: row.get(name, "") for name in columns} for row in rows]


def image_grid(images: Sequence[Image.Image], columns: int | None = None) -> Image.Image:
    """Tile same-size images row by row (columns default to about sqrt(n)), for `task.samples`."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height))
    for i, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((i % columns) * width, (i // columns) * height))
    return grid


def save_samples(image: Image.Image, run_dir: str | os.PathLike, step: int) -> Path:
    """Write `run_dir/samples/step_N.png`."""
    path = Path(run_dir) / "samples" / f"step_{step}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def progress_bar(total: int, initial: int, enabled: bool) -> tqdm:
    """tqdm over optimizer steps (it/s and ETA from tqdm); hidden off rank 0 and when not a terminal."""
    disable = None if enabled else True  # None: tqdm decides (off when stderr is not a terminal)
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, disable=disable)
