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
from torch.utils.data import DataLoader, Dataset

from latentforge.errors import LatentforgeError
from latentforge.training import checkpointing, distributed
from latentforge.training.config import (
    RunConfig,
    config_hash,
    exactness_dict,
    load_config,
    resolve_mixed_precision,
    save_config,
)
from latentforge.training.ema import EMA
from latentforge.training.logging import CSVLog, progress_bar, save_samples
from latentforge.training.task import TrainingTask

TaskFactory = Callable[[RunConfig], TrainingTask]


class TrainingDiverged(LatentforgeError, RuntimeError):
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
    """For each step from `start_step` on, this rank's `grad_accum` micro-batches (remainders dropped)."""
    size, batch = len(dataset), config.batch_size  # type: ignore[arg-type]
    steps_per_epoch = size // batch
    if steps_per_epoch == 0:
        raise ValueError(f"the train dataset has {size} items, fewer than one batch (batch_size = {batch})")
    share, micro = batch // world_size, batch // (world_size * config.grad_accum)
    epoch, first = divmod(start_step, steps_per_epoch)
    while True:
        shuffle = torch.Generator().manual_seed(derived_seed(config.seed, "epoch", epoch))
        order = torch.randperm(size, generator=shuffle)
        # The global batch of step s is order[s*B:(s+1)*B]; this rank takes its contiguous share of it.
        starts = [s * batch + rank * share for s in range(first, steps_per_epoch)]
        indices = torch.cat([order[i : i + share] for i in starts]).tolist()
        loader = DataLoader(
            dataset,
            batch_size=micro,
            sampler=indices,
            num_workers=config.num_workers,
            collate_fn=collate_fn,
            pin_memory=pin_memory,
        )
        items = iter(loader)
        for _ in starts:
            yield [next(items) for _ in range(config.grad_accum)]
        epoch, first = epoch + 1, 0


def to_device(batch: Any, device: torch.device) -> Any:
    """Move the tensors of a (nested) batch to `device`; everything else is left as it is."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {key: to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, list | tuple) and not isinstance(batch, str):
        return type(batch)(to_device(value, device) for value in batch)
    return batch


def make_optimizer(model: nn.Module, config: RunConfig) -> torch.optim.AdamW:
    """AdamW; weight decay only on weights with >= 2 dimensions (not on biases and norm scales)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas)


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


def _train(task: TrainingTask, config: RunConfig, info: distributed.DistInfo) -> Path:
    run_dir, device, main = Path(config.run_dir), info.device, info.is_main
    world_size, accum = info.world_size, config.grad_accum
    if config.batch_size % (world_size * accum):
        raise ValueError(
            f"batch_size = {config.batch_size} must be divisible by processes x grad_accum "
            f"= {world_size} x {accum}"
        )

    # Run directory, without any half-written checkpoint of a killed process.
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        checkpointing.remove_temp_files(run_dir)
    distributed.barrier()

    # Seeds and determinism (every process builds the same initial weights; DDP also broadcasts rank 0's).
    torch.manual_seed(config.seed)
    np.random.seed(config.seed % 2**32)
    random.seed(config.seed)
    if config.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False

    # Model, optimizer, EMA (kept on rank 0 only: after each step the weights agree on every rank).
    model = task.trainable().to(device).train()
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    optimizer = make_optimizer(model, config)
    ema = EMA(model, config.ema_decay, config.ema_start) if config.ema_decay > 0 and main else None
    dataset = task.dataset("train")
    dataset_size = len(dataset)  # type: ignore[arg-type]

    # Resume from the newest checkpoint that loads; rank 0 picks it, every process reads it.
    step, nan_streak, elapsed = 0, 0, 0.0
    latest = checkpointing.find_latest(run_dir) if main else None
    resume_path = distributed.broadcast_object(str(latest[0]) if latest else None)
    if resume_path is not None:
        state = latest[1] if latest else checkpointing.load_checkpoint(resume_path)
        if config.mixed_precision == "auto":  # continue with the precision the run started with
            config = dataclasses.replace(config, mixed_precision=state["exactness"]["mixed_precision"])
        checkpointing.check_resumable(state, config, world_size, dataset_size, Path(resume_path))
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        checkpointing.set_rng_state(state["rng"])
        step, nan_streak, elapsed = state["step"], state["nan_streak"], state["elapsed"]
        del state, latest
        if main:
            print(f"resuming from {resume_path} at step {step}")
    precision = resolve_mixed_precision(config.mixed_precision, device)
    config = dataclasses.replace(config, mixed_precision=precision)
    if main:
        save_config(config, run_dir / "config.toml")  # after the resume check, which may refuse it

    ddp_model = model
    if world_size > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        ddp_model = DistributedDataParallel(model, device_ids=device_ids)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.mixed_precision == "bf16")
    batches = micro_batches(
        dataset, config, info.rank, world_size, step, getattr(task, "collate", None), device.type == "cuda"
    )
    tensorboard_dir = run_dir / "tensorboard" if config.tensorboard else None
    log = CSVLog(run_dir / "log.csv", step, tensorboard_dir, enabled=main)
    bar = progress_bar(config.max_steps, step, main)
    window: dict[str, float] = {}
    window_steps, started = 0, time.perf_counter() - elapsed

    while step < config.max_steps:
        lr = lr_at(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # Forward and backward over this rank's micro-batches; DDP syncs gradients on the last one.
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        metric_sums: dict[str, float] = {}
        for a, batch in enumerate(next(batches)):
            generator = seed_micro_batch(config.seed, step, info.rank * accum + a)
            sync = world_size == 1 or a == accum - 1
            with contextlib.nullcontext() if sync else ddp_model.no_sync():  # type: ignore[operator]
                with autocast:
                    loss, metrics = task.loss(ddp_model, to_device(batch, device), generator)
                (loss.float() / accum).backward()
            loss_sum += loss.detach().double()
            for key, value in metrics.items():
                metric_sums[key] = metric_sums.get(key, 0.0) + float(value) / accum
        stats = distributed.mean_metrics({**metric_sums, "loss": loss_sum.item() / accum}, device)

        # Update, unless the loss or the gradient is not finite (then the step is skipped and counted).
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip or math.inf).item()
        finite = math.isfinite(stats["loss"]) and math.isfinite(grad_norm)
        if finite:
            optimizer.step()
            if ema is not None:
                ema.update(model, step)
            nan_streak = 0
        else:
            nan_streak += 1
        optimizer.zero_grad(set_to_none=True)
        step += 1
        done = step == config.max_steps

        # Log (rank 0): the mean over the steps since the last row; a skipped step gets its own row.
        seconds = time.perf_counter() - started
        bar.set_postfix(loss=f"{stats['loss']:.4g}", lr=f"{lr:.3g}", refresh=False)
        bar.update(1)
        row: dict[str, float] = {}
        if finite:
            for key, value in {"loss": stats["loss"], "grad_norm": grad_norm, **stats}.items():
                window[key] = window.get(key, 0.0) + value
            window_steps += 1
        else:
            row = {"loss": stats["loss"], "lr": lr, "grad_norm": grad_norm, "skipped": 1.0, **stats}
            if main:
                bar.write(f"step {step}: loss {stats['loss']}, grad norm {grad_norm}: not finite, skipped")
        if finite and (step % config.log_every == 0 or done):
            row = {k: v / window_steps for k, v in window.items()} | {"lr": lr, "skipped": 0.0}
            if main and bar.disable:
                print(f"step {step}/{config.max_steps}: loss {row['loss']:.4g}, lr {lr:.3g}, {seconds:.0f}s")
            window, window_steps = {}, 0
        if nan_streak >= config.max_nan_steps:
            log.log(step, row | {"time": seconds})
            bar.close()
            raise TrainingDiverged(
                f"{nan_streak} consecutive steps with a non-finite loss or gradient (step {step}); stopping. "
                f"The checkpoints in {checkpointing.checkpoint_dir(run_dir)} hold the last good weights: "
                "lower lr, raise warmup_steps or check the data, then resume or restart."
            )

        # Checkpoint (rank 0), then evaluate and draw samples from the weights that will be exported.
        if main and (done or (config.checkpoint_every and step % config.checkpoint_every == 0)):
            epoch, index = _data_position(step, config, dataset_size)
            state = {
                "model": model.state_dict(),
                "ema": ema.state_dict() if ema is not None else None,
                "optimizer": optimizer.state_dict(),
                "step": step,
                "data_position": {"epoch": epoch, "index": index},
                "rng": checkpointing.rng_state(),
                "nan_streak": nan_streak,
                "elapsed": seconds,
                "config_hash": config_hash(config),
                "exactness": exactness_dict(config),
                "micro_batches_per_step": world_size * accum,
                "dataset_size": dataset_size,
            }
            checkpointing.save_checkpoint(run_dir, step, state, config.keep_checkpoints)
        eval_model = ema.module if ema is not None else model
        if main and (done or (config.eval_every and step % config.eval_every == 0)):
            metrics = _without_grad(eval_model, autocast, task.evaluate)
            row |= {f"eval/{key}": value for key, value in metrics.items()}
        if main and (done or (config.sample_every and step % config.sample_every == 0)):
            image = _without_grad(eval_model, autocast, task.samples)
            if image is not None:
                save_samples(image, run_dir, step)
        if row:
            log.log(step, row | {"time": seconds})

    # Export the EMA weights if there are any, else the trained weights.
    bar.close()
    log.close()
    artefact = run_dir / "final.safetensors"
    if main:
        task.export(ema.module if ema is not None else model, artefact)
    distributed.barrier()
    return artefact


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
    if config.task and config.task != task_name:
        raise ValueError(f"the config is for task {config.task!r} but {task_name!r} was asked for")
    config.task = task_name
    if tasks is None:
        from latentforge.training.tasks import TASKS  # lazy: the tasks import the big models

        tasks = TASKS
    if task_name not in tasks:
        raise ValueError(f"unknown task {task_name!r}; known tasks: {', '.join(sorted(tasks))}")
    return train(tasks[task_name](config), config)
