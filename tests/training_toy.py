"""A tiny `TrainingTask` for the loop's tests: an MLP with dropout regressing a fixed random teacher.

Run as a script it trains from a TOML config (`python tests/training_toy.py CONFIG [key=value ...]`),
also under torchrun. Test hooks: `task_options.nan_steps` makes those steps' loss NaN; environment
variables (not config, so a resumed run sees the same config) TOY_KILL_AT_STEP=N SIGKILLs the process
inside step N, TOY_KILL_IN_SAVE_STEP=N while checkpoint N is half written (before its rename),
TOY_KILL_IN_PRUNE_STEP=N right after checkpoint N's save deleted its first old checkpoint.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import Dataset

from latentforge.training.config import RunConfig


@dataclass
class ToyOptions:
    items: int = 36
    holdout_items: int = 16
    width: int = 8
    hidden: int = 32
    dropout: float = 0.1
    input_noise: float = 0.05  # drawn from the loop's generator
    data_seed: int = 1234
    nan_steps: list[int] = field(default_factory=list)


class TeacherData(Dataset):
    """items x -> teacher(x), a fixed random tanh network: a pure function of the index."""

    def __init__(self, items: int, width: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(items, width, generator=generator)
        w1 = torch.randn(width, width, generator=torch.Generator().manual_seed(0)) / width**0.5
        self.y = torch.tanh(self.x @ w1) * 2

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[index], "y": self.y[index], "index": torch.tensor(index)}


class ToyTask:
    """An MLP on TeacherData; counts its own loss calls to know the step (fresh runs only)."""

    name = "toy"

    def __init__(self, options: ToyOptions, grad_accum: int = 1, kill_at_step: int = -1) -> None:
        self.options, self.grad_accum, self.calls, self.kill_at_step = options, grad_accum, 0, kill_at_step
        self.seen: list[list[int]] = []  # item indices of every micro-batch, in order

    def trainable(self) -> nn.Module:
        o = self.options
        return nn.Sequential(
            nn.Linear(o.width, o.hidden), nn.GELU(), nn.Dropout(o.dropout), nn.Linear(o.hidden, o.width)
        )

    def dataset(self, split: str) -> Dataset:
        o = self.options
        if split == "train":
            return TeacherData(o.items, o.width, o.data_seed)
        return TeacherData(o.holdout_items, o.width, o.data_seed + 1)

    def loss(
        self, model: nn.Module, batch: Mapping[str, Any], generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        step = self.calls // self.grad_accum
        self.calls += 1
        self.seen.append(batch["index"].tolist())
        if step == self.kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)
        x = batch["x"] + self.options.input_noise * torch.randn(batch["x"].shape, generator=generator)
        loss = (model(x) - batch["y"]).pow(2).mean()
        if step in self.options.nan_steps:
            loss = loss * float("nan")
        return loss, {"abs_err": (model(x) - batch["y"]).abs().mean().item()}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        data = self.dataset("holdout")
        return {"mse": (model(data.x) - data.y).pow(2).mean().item()}  # type: ignore[attr-defined]

    def samples(self, model: nn.Module) -> Image.Image | None:
        weight = next(model.parameters()).detach()
        pixels = ((weight - weight.min()) / (weight.max() - weight.min() + 1e-8) * 255).to(torch.uint8)
        return Image.fromarray(pixels.numpy()).convert("RGB")

    def export(self, model: nn.Module, path: Path) -> None:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def make_toy_task(config: RunConfig) -> ToyTask:
    """Factory in the form `TASKS` holds: RunConfig -> task."""
    kill_at_step = int(os.environ.get("TOY_KILL_AT_STEP", "-1"))
    return ToyTask(ToyOptions(**config.task_options), config.grad_accum, kill_at_step)


def _kill_inside_checkpoint_write(step: int) -> None:
    """Make the write of checkpoint `step` die after half of its temp file and before the rename."""
    from latentforge.training import checkpointing

    real_replace = os.replace

    def replace(src: Any, dst: Any) -> None:
        if Path(dst).name == f"step_{step}.pt":
            size = Path(src).stat().st_size
            with open(src, "r+b") as f:
                f.truncate(size // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst)

    checkpointing.os.replace = replace  # type: ignore[assignment]


def _kill_inside_pruning(step: int) -> None:
    """Make the pruning after checkpoint `step` die right after it deleted the first old checkpoint."""
    real_unlink = os.unlink

    def unlink(path: Any, *args: Any, **kwargs: Any) -> None:
        real_unlink(path, *args, **kwargs)
        path = Path(path)
        old_checkpoint = path.name.startswith("step_") and path.name.endswith(".pt")
        if old_checkpoint and (path.parent / f"step_{step}.pt").exists():
            os.kill(os.getpid(), signal.SIGKILL)

    os.unlink = unlink  # type: ignore[assignment]


def main(argv: list[str]) -> int:
    from latentforge.training.loop import run_training

    torch.set_num_threads(1)
    if "TOY_KILL_IN_SAVE_STEP" in os.environ:
        _kill_inside_checkpoint_write(int(os.environ["TOY_KILL_IN_SAVE_STEP"]))
    if "TOY_KILL_IN_PRUNE_STEP" in os.environ:
        _kill_inside_pruning(int(os.environ["TOY_KILL_IN_PRUNE_STEP"]))
    artefact = run_training("toy", argv[0], argv[1:], tasks={"toy": make_toy_task})
    print(f"exported {artefact}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
