"""The generic training loop: `train(task, config)` runs any `TrainingTask` and resumes it exactly.

Exactness rests on three choices. The data order is a pure function of (seed, epoch): step s of an
epoch takes items [s*B, (s+1)*B) of a seeded permutation, whatever the number of processes. Global
micro-batch g = rank * grad_accum + a of a step holds items [g*m, (g+1)*m) of that batch (m = micro
size) and all randomness for it (the task's generator and the global torch/numpy/python RNGs, which
the loop reseeds) is a pure function of (seed, step, g). So a resumed run needs only the weights, the
optimizer, the EMA and the step, and 1 process x 2 accumulation steps computes what 2 processes do.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import random
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, default_collate

from latentforge import distributed
from latentforge.data.buckets import bucket_batch_order
from latentforge.errors import ConfigError, LatentforgeError, NonFiniteError
from latentforge.training import checkpointing
from latentforge.training.config import (
    RunConfig,
    config_hash,
    config_source,
    exactness_dict,
    load_config,
    resolve_mixed_precision,
    save_config,
)
from latentforge.training.ema import EMA
from latentforge.training.logging import CSVLog, progress_bar, save_samples
from latentforge.training.task import TrainingTask

TaskFactory = Callable[[RunConfig], TrainingTask]


class TrainingDiverged(NonFiniteError, RuntimeError):
    """Raised after `max_nan_steps` consecutive steps with a non-finite loss or gradient norm."""


def lr_at(step: int, config: RunConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine to min_lr or constant."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / (config.warmup_steps + 1)
    if config.lr_schedule == "constant":
        return config.lr
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps))
    return config.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (config.lr - config.min_lr)


def derived_seed(*parts: object) -> int:
    """A 63-bit seed that is a stable function of `parts` (the same on every machine and Python)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def seed_micro_batch(seed: int, step: int, micro: int) -> torch.Generator:
    """Reseed the global RNGs for one micro-batch and return the CPU generator handed to `task.loss`."""
    value = derived_seed(seed, "global", step, micro)
    torch.manual_seed(value)  # dropout and anything else that draws from the global generators
    np.random.seed(value % 2**32)
    random.seed(value)
    return torch.Generator().manual_seed(derived_seed(seed, "task", step, micro))


def micro_batches(
    dataset: Dataset,
    config: RunConfig,
    rank: int,
    world_size: int,
    start_step: int,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    pin_memory: bool = False,
) -> Iterator[list[Any]]:
    """For each step from `start_step` on, this rank's `grad_accum` micro-batches (remainders dropped).

    A dataset with `bucket_ids` (aspect-ratio buckets) is ordered so that every global batch is one bucket.
    """
    size, batch = len(dataset), config.batch_size  # type: ignore[arg-type]
    bucket_ids = getattr(dataset, "bucket_ids", None)

    def epoch_order(epoch: int) -> torch.Tensor:
        shuffle = torch.Generator().manual_seed(derived_seed(config.seed, "epoch", epoch))
        if bucket_ids is None:
            return torch.randperm(size, generator=shuffle)
        return bucket_batch_order(bucket_ids, batch, shuffle)

    steps_per_epoch = len(epoch_order(0)) // batch
    if steps_per_epoch == 0:
        if bucket_ids is not None:
            raise ConfigError(
                f"batch_size = {batch} is more than any aspect-ratio bucket of the train dataset holds "
                f"({size} items in all): lower it, add data, or set task_options.buckets = false"
            )
        raise ConfigError(
            f"batch_size = {batch} is more than the train dataset's {size} items: lower it or add data"
        )
    share, micro = batch // world_size, batch // (world_size * config.grad_accum)
    epoch, first = divmod(start_step, steps_per_epoch)
    while True:
        order = epoch_order(epoch)
        # The global batch of step s is order[s*B:(s+1)*B]; this rank takes its contiguous share of it.
        starts = [s * batch + rank * share for s in range(first, steps_per_epoch)]
        indices = torch.cat([order[i : i + share] for i in starts]).tolist()
        loader = DataLoader(
            _CarryErrors(dataset) if config.num_workers else dataset,
            batch_size=micro,
            sampler=indices,
            num_workers=config.num_workers,
            collate_fn=_collate_carrying(collate_fn) if config.num_workers else collate_fn,
            pin_memory=pin_memory,
        )
        items = iter(loader)
        for _ in starts:
            step_batches = [next(items) for _ in range(config.grad_accum)]
            for item in step_batches:
                if isinstance(item, _ItemError):
                    raise DataLoadError(item.message)
            yield step_batches
        epoch, first = epoch + 1, 0


class DataLoadError(LatentforgeError):
    """A user-caused error (an unreadable dataset file ...) raised inside a DataLoader worker."""


@dataclasses.dataclass
class _ItemError:
    message: str


class _CarryErrors(Dataset):
    """Return a worker's LatentforgeError as an item, so the main process raises it as one line: torch
    re-raises worker exceptions as a RuntimeError that quotes the worker's whole traceback."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        try:
            return self.dataset[index]
        except LatentforgeError as error:
            return _ItemError(str(error))


def _collate_carrying(collate_fn: Callable[[list[Any]], Any] | None) -> Callable[[list[Any]], Any]:
    def collate(items: list[Any]) -> Any:
        errors = [item for item in items if isinstance(item, _ItemError)]
        return errors[0] if errors else (collate_fn or default_collate)(items)

    return collate


def to_device(batch: Any, device: torch.device) -> Any:
    """Move the tensors of a (nested) batch to `device`; everything else is left as it is."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {key: to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, list | tuple) and not isinstance(batch, str):
        return type(batch)(to_device(value, device) for value in batch)
    return batch


def make_optimizer(
    model: nn.Module, config: RunConfig, groups: Sequence[Mapping[str, Any]] | None = None
) -> torch.optim.AdamW:
    """AdamW; weight decay only on weights with >= 2 dimensions (not on biases and norm scales).

    `groups` (from a task's `param_groups`): parameter lists with an `lr_scale` each (U-Net and text
    encoder at different learning rates); the default is one group of all parameters.
    """
    groups = groups if groups is not None else [{"params": list(model.parameters())}]
    optimizer_groups = []
    for group in groups:
        params = [p for p in group["params"] if p.requires_grad]
        scale = float(group.get("lr_scale", 1.0))
        optimizer_groups += [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        for added in optimizer_groups[-2:]:
            added["lr_scale"] = scale
    # PyTorch's fused AdamW (one kernel over all tensors; CPU and CUDA): 21 vs 68 ms a step for the
    # default model's 14.2M-parameter U-Net on one CPU core, where the per-tensor loop is the default
    fused = all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
    return torch.optim.AdamW(optimizer_groups, lr=config.lr, betas=config.betas, fused=fused or None)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Set `gradient_checkpointing = True` on every submodule that has that flag (diffusers' convention)."""
    flagged = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
    if not flagged:
        warnings.warn(
            f"gradient_checkpointing = true, but no submodule of {type(model).__name__} has a "
            "`gradient_checkpointing` flag; the task must apply it itself",
            stacklevel=2,
        )
    for module in flagged:
        module.gradient_checkpointing = True  # type: ignore[assignment]


def train(task: TrainingTask, config: RunConfig) -> Path:
    """Train `task` as `config` says, resuming from the newest checkpoint in run_dir; returns the artefact.

    Under torchrun every process calls this; rank 0 writes the run directory. Raises TrainingDiverged
    after `max_nan_steps` consecutive non-finite steps (the checkpoints written so far stay intact).
    """
    info = distributed.setup(config.device)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        return _train(task, config, info)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        distributed.teardown(info)


@dataclasses.dataclass
class _Progress:
    """Where a run stands: everything a checkpoint adds to the weights, optimizer and EMA."""

    step: int = 0
    nan_streak: int = 0
    elapsed: float = 0.0  # seconds of training before this process started


@dataclasses.dataclass
class _StepResult:
    lr: float
    stats: dict[str, float]  # "loss" and the task's metrics, averaged over micro-batches and processes
    grad_norm: float
    finite: bool


def _train(task: TrainingTask, config: RunConfig, info: distributed.DistInfo) -> Path:
    run_dir, device, main = Path(config.run_dir), info.device, info.is_main
    _check_batch_layout(config, info.world_size)
    _prepare_run_dir(run_dir, main, config.restart)
    _seed_everything(config)

    # Model, optimizer, EMA (kept on rank 0 only: after each step the weights agree on every rank).
    model = task.trainable().to(device).train()
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    param_groups = getattr(task, "param_groups", None)
    optimizer = make_optimizer(model, config, param_groups(model, config.lr) if param_groups else None)
    ema = EMA(model, config.ema_decay, config.ema_start) if config.ema_decay > 0 and main else None
    dataset = task.dataset("train")
    dataset_size = len(dataset)  # type: ignore[arg-type]

    progress, config = _resume(run_dir, config, info, model, optimizer, ema, dataset_size)
    config = dataclasses.replace(
        config, mixed_precision=resolve_mixed_precision(config.mixed_precision, device)
    )
    if main:  # after the resume check, which may refuse it; a restart is done once, so not written
        save_config(dataclasses.replace(config, restart=False), run_dir / "config.toml")

    ddp_model = model
    if info.world_size > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        # A task whose step may leave parameters without gradients (LoRA module dropout) says so.
        unused = bool(getattr(task, "may_skip_parameters", False))
        ddp_model = DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=unused)
    if config.compile:  # the step's forward and backward only; evaluation and samples stay eager
        ddp_model = torch.compile(ddp_model)  # type: ignore[assignment]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.mixed_precision == "bf16")
    batches = micro_batches(
        dataset,
        config,
        info.rank,
        info.world_size,
        progress.step,
        getattr(task, "collate", None),
        device.type == "cuda",
    )
    log = _RunLog(run_dir, config, progress.step, main)
    started = time.perf_counter() - progress.elapsed

    while progress.step < config.max_steps:
        result = _train_step(
            task, config, info, ddp_model, model, optimizer, ema, autocast, next(batches), progress.step
        )
        progress.nan_streak = 0 if result.finite else progress.nan_streak + 1
        progress.step += 1
        progress.elapsed = time.perf_counter() - started
        step, done = progress.step, progress.step == config.max_steps
        row = log.step_row(step, result, progress.elapsed)
        if progress.nan_streak >= config.max_nan_steps:
            log.diverged(step, row, progress.elapsed)
            raise TrainingDiverged(_divergence_message(progress, result, config))

        # Evaluate, draw samples and log (rank 0), then checkpoint: what a checkpoint's step produced is
        # on disk before the checkpoint, so a run killed at any point resumes without a gap in log.csv.
        eval_model = ema.module if ema is not None else model
        if main and _due(step, config.eval_every, done):
            metrics = _without_grad(eval_model, autocast, task.evaluate)
            row |= {f"eval/{key}": value for key, value in metrics.items()}
        if main and _due(step, config.sample_every, done):
            image = _without_grad(eval_model, autocast, task.samples)
            if image is not None:
                save_samples(image, run_dir, step)
        log.write(step, row, progress.elapsed)
        if main and _due(step, config.checkpoint_every, done):
            state = _checkpoint_state(model, optimizer, ema, progress, config, info, dataset_size)
            checkpointing.save_checkpoint(run_dir, step, state, config.keep_checkpoints)

    # Export the EMA weights if there are any, else the trained weights.
    log.close()
    artefact = run_dir / "final.safetensors"
    if main:
        task.export(ema.module if ema is not None else model, artefact)
    distributed.barrier()
    return artefact


# ---------------------------------------------------------------------------- set-up and resume


def _check_batch_layout(config: RunConfig, world_size: int) -> None:
    if config.batch_size % (world_size * config.grad_accum):
        raise ConfigError(
            f"batch_size = {config.batch_size} must be divisible by processes x grad_accum "
            f"= {world_size} x {config.grad_accum}"
        )


def _prepare_run_dir(run_dir: Path, main: bool, restart: bool) -> None:
    """Create the run directory, without any half-written checkpoint of a killed process; for an explicit
    restart, move the previous run's files aside (nothing is deleted)."""
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        checkpointing.remove_temp_files(run_dir)
        archive = checkpointing.archive_run(run_dir) if restart else None
        if archive is not None:
            print(f"restart: the previous run's checkpoints and log are now in {archive}")
    distributed.barrier()


def _seed_everything(config: RunConfig) -> None:
    """Seeds and determinism (every process builds the same initial weights; DDP also broadcasts rank 0's)."""
    torch.manual_seed(config.seed)
    np.random.seed(config.seed % 2**32)
    random.seed(config.seed)
    if config.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def _resume(
    run_dir: Path,
    config: RunConfig,
    info: distributed.DistInfo,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: EMA | None,
    dataset_size: int,
) -> tuple[_Progress, RunConfig]:
    """Load the newest checkpoint that loads into model, optimizer, EMA and RNGs; rank 0 picks it.

    Newer checkpoints that do not load are renamed `*.unloadable` (kept, but out of resume and pruning);
    when checkpoints exist and none loads, CheckpointsUnloadable stops the run before it starts over.
    """
    latest = checkpointing.find_latest(run_dir) if info.is_main else None
    if latest is not None:
        for path, problem in latest.unloadable:
            print(f"not resuming from {path} ({problem}): renamed to {checkpointing.set_aside(path).name}")
    resume_path = distributed.broadcast_object(str(latest.path) if latest else None)
    if resume_path is None:
        return _Progress(), config
    state = latest.state if latest else checkpointing.load_checkpoint(resume_path)
    if config.mixed_precision == "auto":  # continue with the precision the run started with
        config = dataclasses.replace(config, mixed_precision=state["exactness"]["mixed_precision"])
    checkpointing.check_resumable(state, config, info.world_size, dataset_size, Path(resume_path))
    model.load_state_dict(state["model"])
    chosen = [group.get("fused") for group in optimizer.param_groups]
    optimizer.load_state_dict(state["optimizer"])
    for group, fused in zip(optimizer.param_groups, chosen, strict=True):
        group["fused"] = fused  # the saved groups carry the flag of the run that wrote them
        for p in group["params"] if fused else ():  # fused kernels keep `step` beside the weights
            if "step" in optimizer.state.get(p, {}):
                optimizer.state[p]["step"] = optimizer.state[p]["step"].to(p.device, torch.float32)
    if ema is not None:
        ema.load_state_dict(state["ema"])
    checkpointing.set_rng_state(state["rng"])
    progress = _Progress(state["step"], state["nan_streak"], state["elapsed"])
    del state, latest
    if info.is_main:
        print(f"resuming from {resume_path} at step {progress.step}")
    return progress, config


# ---------------------------------------------------------------------------- one step


def _train_step(
    task: TrainingTask,
    config: RunConfig,
    info: distributed.DistInfo,
    ddp_model: nn.Module,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: EMA | None,
    autocast: torch.autocast,
    micro: list[Any],
    step: int,
) -> _StepResult:
    """Forward and backward over this rank's micro-batches, then update unless the loss or gradient is
    not finite (the step is then skipped; the caller counts it)."""
    lr = lr_at(step, config)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)

    # DDP syncs gradients on the last micro-batch only.
    accum, device = config.grad_accum, info.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    metric_sums: dict[str, float] = {}
    for a, batch in enumerate(micro):
        generator = seed_micro_batch(config.seed, step, info.rank * accum + a)
        sync = info.world_size == 1 or a == accum - 1
        with contextlib.nullcontext() if sync else ddp_model.no_sync():  # type: ignore[operator]
            with autocast:
                loss, metrics = task.loss(ddp_model, to_device(batch, device), generator)
            (loss.float() / accum).backward()
        loss_sum += loss.detach().double()
        for key, value in metrics.items():
            metric_sums[key] = metric_sums.get(key, 0.0) + float(value) / accum
    stats = distributed.mean_metrics({**metric_sums, "loss": loss_sum.item() / accum}, device)

    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip or math.inf).item()
    finite = math.isfinite(stats["loss"]) and math.isfinite(grad_norm)
    if finite:
        optimizer.step()
        if ema is not None:
            ema.update(model, step)
    optimizer.zero_grad(set_to_none=True)
    return _StepResult(lr, stats, grad_norm, finite)


class _RunLog:
    """log.csv rows (rank 0) and the progress bar: a row is the mean over the steps since the last row;
    a skipped step gets its own row."""

    def __init__(self, run_dir: Path, config: RunConfig, step: int, main: bool) -> None:
        tensorboard_dir = run_dir / "tensorboard" if config.tensorboard else None
        self.csv = CSVLog(run_dir / "log.csv", step, tensorboard_dir, enabled=main)
        self.bar = progress_bar(config.max_steps, step, main)
        self.config, self.main = config, main
        self.window: dict[str, float] = {}
        self.window_steps = 0

    def step_row(self, step: int, result: _StepResult, seconds: float) -> dict[str, float]:
        """Fold one step into the window; the row to log now ({} when none is due)."""
        stats, lr, grad_norm = result.stats, result.lr, result.grad_norm
        self.bar.set_postfix(loss=f"{stats['loss']:.4g}", lr=f"{lr:.3g}", refresh=False)
        self.bar.update(1)
        if not result.finite:
            if self.main:
                self.bar.write(
                    f"step {step}: loss {stats['loss']}, grad norm {grad_norm}: not finite, skipped"
                )
            return {"loss": stats["loss"], "lr": lr, "grad_norm": grad_norm, "skipped": 1.0, **stats}
        for key, value in {"loss": stats["loss"], "grad_norm": grad_norm, **stats}.items():
            self.window[key] = self.window.get(key, 0.0) + value
        self.window_steps += 1
        if step % self.config.log_every and step != self.config.max_steps:
            return {}
        row = {k: v / self.window_steps for k, v in self.window.items()} | {"lr": lr, "skipped": 0.0}
        if self.main and self.bar.disable:
            print(f"step {step}/{self.config.max_steps}: loss {row['loss']:.4g}, lr {lr:.3g}, {seconds:.0f}s")
        self.window, self.window_steps = {}, 0
        return row

    def write(self, step: int, row: dict[str, float], seconds: float) -> None:
        if row:
            self.csv.log(step, row | {"time": seconds})

    def diverged(self, step: int, row: dict[str, float], seconds: float) -> None:
        self.csv.log(step, row | {"time": seconds})
        self.bar.close()

    def close(self) -> None:
        self.bar.close()
        self.csv.close()


def _divergence_message(progress: _Progress, result: _StepResult, config: RunConfig) -> str:
    """One line: where the run diverged, the likely cause, and where the last good weights are."""
    first = progress.step - progress.nan_streak + 1
    steps = f"step {first}" if first == progress.step else f"steps {first}-{progress.step}"
    loss_finite = math.isfinite(result.stats["loss"])
    if progress.step == progress.nan_streak:
        cause = (
            "the loss was never finite, so the data (NaN/Inf pixels or latents), the initial weights or the "
            "loss itself, not the learning rate"
        )
    elif loss_finite:
        cause = "exploding gradients: set grad_clip (e.g. 1.0) and lower lr"
    else:
        cause = f"a learning rate too high for this model: lower lr (now {config.lr:g}) or raise warmup_steps"
        if config.mixed_precision == "bf16":
            cause += ', or train with mixed_precision = "no"'
    what = "gradient norm" if loss_finite else "loss"
    return (
        f"training diverged: the {what} was not finite at {steps} "
        f"({progress.nan_streak} in a row, max_nan_steps = {config.max_nan_steps}); likely cause: {cause}. "
        f"The checkpoints in {checkpointing.checkpoint_dir(config.run_dir)} stay intact; an exact resume "
        "would diverge again, so change the config and start over with --restart (restart=true) or a new "
        "run_dir"
    )


# ---------------------------------------------------------------------------- checkpoints


def _due(step: int, every: int, done: bool) -> bool:
    """Whether an every-N-steps action runs after `step` (0 = only at the end)."""
    return done or bool(every and step % every == 0)


def _checkpoint_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: EMA | None,
    progress: _Progress,
    config: RunConfig,
    info: distributed.DistInfo,
    dataset_size: int,
) -> dict[str, Any]:
    """Everything an exact resume needs, as tensors and plain types (loadable with weights_only)."""
    epoch, index = _data_position(progress.step, config, dataset_size)
    return {
        "model": model.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "optimizer": optimizer.state_dict(),
        "step": progress.step,
        "data_position": {"epoch": epoch, "index": index},
        "rng": checkpointing.rng_state(),
        "nan_streak": progress.nan_streak,
        "elapsed": progress.elapsed,
        "config_hash": config_hash(config),
        "exactness": exactness_dict(config),
        "micro_batches_per_step": info.world_size * config.grad_accum,
        "dataset_size": dataset_size,
    }


def _data_position(step: int, config: RunConfig, dataset_size: int) -> tuple[int, int]:
    """(epoch, index into the epoch's permutation) where the next step starts."""
    epoch, step_in_epoch = divmod(step, dataset_size // config.batch_size)
    return epoch, step_in_epoch * config.batch_size


def _without_grad(model: nn.Module, autocast: torch.autocast, fn: Callable[[nn.Module], Any]) -> Any:
    """Run `fn(model)` in eval mode without gradients, then put the model back in train mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast:
            return fn(model)
    finally:
        model.train(was_training)


def run_training(
    task_name: str,
    config_path: str | os.PathLike | None,
    overrides: Sequence[str] = (),
    tasks: Mapping[str, TaskFactory] | None = None,
) -> Path:
    """`latentforge train TASK CONFIG [key=value ...]`: build the task from its factory and train it.

    `tasks` defaults to `latentforge.training.tasks.TASKS` (task name -> factory taking the RunConfig).
    """
    config = load_config(config_path, list(overrides))
    overridden = {o.partition("=")[0].strip() for o in overrides}
    if config.task and config.task != task_name:
        source = config_source(config_path, overridden, "task")
        raise ConfigError(f"task = {config.task!r}, but {task_name!r} was asked for", source)
    config.task = task_name
    if tasks is None:
        from latentforge.training.tasks import TASKS  # lazy: the tasks import the big models

        tasks = TASKS
    if task_name not in tasks:
        raise ConfigError(f"unknown task {task_name!r}; known tasks: {', '.join(sorted(tasks))}")
    try:
        return train(tasks[task_name](config), config)
    except ConfigError as error:  # task_options problems: name the file or the override they came from
        if error.path is not None:
            raise
        raise ConfigError(str(error), config_source(config_path, overridden, str(error))) from None
