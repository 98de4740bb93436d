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
    """`run_dir/log.csv`, one row per logged step; new metric names add columns (the file is rewritten).

    On resume, rows after the resumed step are dropped: they belong to the run that was interrupted.
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
        self.columns: list[str] = ["step"]
        self.rows: list[dict[str, Any]] = []
        if not enabled:  # a process other than rank 0: logging is a no-op
            return
        if self.path.exists() and resume_step > 0:
            with open(self.path, newline="") as f:
                reader = csv.DictReader(f)
                self.columns = list(reader.fieldnames or ["step"])
                self.rows = [row for row in reader if int(row["step"]) <= resume_step]
        self._rewrite()
        self.tensorboard = _tensorboard_writer(tensorboard_dir) if tensorboard_dir else None

    def _rewrite(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns)
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(tmp, self.path)

    def log(self, step: int, values: Mapping[str, float]) -> None:
        """Append one row (and TensorBoard scalars, if enabled)."""
        if not self.enabled:
            return
        row = {"step": step, **{k: _format(v) for k, v in values.items()}}
        self.rows.append(row)
        new = [k for k in row if k not in self.columns]
        if new:
            self.columns += new
            self._rewrite()
        else:
            with open(self.path, "a", newline="") as f:
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
    """The rows of a `log.csv` (values as strings)."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


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
