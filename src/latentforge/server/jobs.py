"""The model catalogue and the one generation worker: a bounded FIFO queue, one thread, one model loaded.

The HTTP event loop only enqueues a job and awaits its future; the worker thread does all model work,
so a long generation never blocks other routes (progress, interrupt). A model switch only names the
next checkpoint: the worker loads it before its next job, so it waits for the running one.
"""

from __future__ import annotations

import queue
import threading
import time
import warnings
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from latentforge.errors import ParameterError
from latentforge.model import StableDiffusion, load
from latentforge.pipelines.generate import GeneratedImage, img2img_steps
from latentforge.pipelines.preview import latent_rgb_projection
from latentforge.pipelines.request import GenerationRequest, resolve
from latentforge.pipelines.runner import iter_images

CHECKPOINT_SUFFIXES = (".safetensors",)  # never pickle (.ckpt) from a folder a server exposes


class QueueFullError(Exception):
    """The queue holds `queue_size` jobs already (HTTP 503)."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path

    @property
    def model_name(self) -> str:
        return self.path.stem

    @property
    def title(self) -> str:
        return self.path.name


class Catalog:
    """The checkpoints a server offers (the models folder, or the embedded model), chosen by name only."""

    def __init__(self, models_dir: Path | None, default: Path | None) -> None:
        self.models_dir = models_dir
        self.default = default
        self.lock = threading.Lock()
        self.selected = self.checkpoints()[0].title if self.checkpoints() else ""
        self.loaded: tuple[str, StableDiffusion] | None = None

    def checkpoints(self) -> list[Checkpoint]:
        if self.models_dir is None:
            return [Checkpoint(self.default)] if self.default is not None else []
        found = sorted(p for p in self.models_dir.iterdir() if p.suffix.lower() in CHECKPOINT_SUFFIXES)
        return [Checkpoint(p) for p in found]

    def find(self, name: str) -> Checkpoint:
        """A checkpoint by title, model name or A1111 short hash (never a path from a request)."""
        for checkpoint in self.checkpoints():
            titles = (
                checkpoint.title,
                checkpoint.model_name,
                f"{checkpoint.title} [{self.hash_of(checkpoint)}]",
            )
            if name in titles or (self.hash_of(checkpoint) and name == self.hash_of(checkpoint)):
                return checkpoint
        valid = (
            ", ".join(c.title for c in self.checkpoints()) or "none (the models folder has no .safetensors)"
        )
        raise ParameterError(f"sd_model_checkpoint {name!r} is not in the catalogue; valid: {valid}")

    def hash_of(self, checkpoint: Checkpoint) -> str | None:
        loaded = self.loaded
        return loaded[1].short_hash if loaded and loaded[0] == checkpoint.title else None

    def select(self, name: str) -> None:
        with self.lock:
            self.selected = self.find(name).title

    def model(self) -> StableDiffusion:
        """The selected model, loaded once and kept until another is selected (the old one is released)."""
        with self.lock:
            name = self.selected
        if self.loaded is None or self.loaded[0] != name:
            self.loaded = None  # drop the old weights before loading the new ones
            self.loaded = (name, load(self.find(name).path))
        return self.loaded[1]


@dataclass
class JobResult:
    images: list[GeneratedImage]
    warnings: list[str]
    interrupted: bool


@dataclass
class Job:
    request: GenerationRequest
    future: Future[JobResult] = field(default_factory=Future)
    created: float = field(default_factory=time.time)
    started: float = 0.0
    step: int = 0
    total_steps: int = 0
    images_done: int = 0
    interrupted: bool = False
    model: StableDiffusion | None = None
    latest: Any = None  # the last step's x0 estimate [B, C, h, w], for the live preview

    def on_step(self, info: Any) -> bool:
        self.step += 1
        self.latest = info.denoised
        return self.interrupted


def _total_steps(model: StableDiffusion, request: GenerationRequest) -> int:
    """All sampling steps of a request, counted as the runner does (for progress and ETA)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resolved = resolve(request, model)
    r = resolved.request
    first = r.steps if r.init is None else img2img_steps(r.steps, r.init.denoising_strength)[1]
    second = resolved.second.steps if resolved.second is not None else 0
    return len(resolved.batches) * (first + second)


class Worker:
    """One thread runs jobs one at a time from a bounded FIFO queue."""

    def __init__(self, catalog: Catalog, queue_size: int) -> None:
        self.catalog = catalog
        self.queue: queue.Queue[Job | None] = queue.Queue(maxsize=queue_size)
        self.current: Job | None = None
        self.projection: tuple[StableDiffusion, Tensor] | None = None
        self.thread = threading.Thread(target=self._run, name="latentforge-generation", daemon=True)
        self.thread.start()

    def submit(self, request: GenerationRequest) -> Job:
        job = Job(request)
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise QueueFullError(
                f"the queue is full ({self.queue.maxsize} jobs waiting); retry later"
            ) from None
        return job

    def interrupt(self) -> None:
        job = self.current
        if job is not None:
            job.interrupted = True

    def preview_projection(self) -> Tensor:
        """The latent -> RGB map of the model the running job uses (fitted once per model for other VAEs)."""
        job = self.current
        model = job.model if job is not None and job.model is not None else self.catalog.model()
        if self.projection is None or self.projection[0] is not model:
            self.projection = (model, latent_rgb_projection(model))
        return self.projection[1]

    def close(self, timeout: float = 30.0) -> None:
        self.interrupt()
        self.queue.put(None)
        self.thread.join(timeout)

    def _run(self) -> None:
        while (job := self.queue.get()) is not None:
            if not job.future.set_running_or_notify_cancel():
                continue
            self.current, job.started = job, time.time()
            try:
                job.future.set_result(self._generate(job))
            except Exception as error:  # handed to the waiting request, which maps it to an HTTP error
                job.future.set_exception(error)
            finally:
                self.current = None

    def _generate(self, job: Job) -> JobResult:
        model = job.model = self.catalog.model()
        images = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            job.total_steps = _total_steps(model, job.request)
            for image in iter_images(model, job.request, callback=job.on_step, progress=False):
                images.append(image)
                job.images_done += 1
        return JobResult(images, [str(w.message) for w in caught], job.interrupted)
