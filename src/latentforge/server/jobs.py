"""The model catalogue and the one generation worker: a bounded FIFO queue, one thread, one model loaded.

The HTTP event loop only enqueues a job and awaits its future; the worker thread does all model work,
so a long generation never blocks other routes (progress, interrupt, skip). A model switch is a job of
its own in the same queue: it waits for the jobs before it, drops the old weights, then loads the new.
"""

from __future__ import annotations

import gc
import queue
import threading
import time
import warnings
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from latentforge.checkpoints.controlnet import (
    EMBEDDED_CONTROLNETS,
    ControlNet,
    a1111_controlnet_hash,
    controlnet_path,
    load_controlnet,
)
from latentforge.checkpoints.taesd import SUFFIXES as TAESD_SUFFIXES
from latentforge.checkpoints.taesd import read_taesd
from latentforge.errors import ParameterError
from latentforge.model import StableDiffusion, load, swap_vae, use_vae
from latentforge.models.vae import AutoencoderKL
from latentforge.pipelines.generate import SKIP, GeneratedImage, img2img_steps
from latentforge.pipelines.preview import latent_rgb_projection, preview_image
from latentforge.pipelines.request import GenerationRequest, resolve
from latentforge.pipelines.runner import iter_images
from latentforge.pipelines.xyz import Axis, cells, xyz_plot

CHECKPOINT_SUFFIXES = (".safetensors",)  # never pickle (.ckpt) from a folder a server exposes
# A1111's folders inside the models folder (models/Lora, embeddings/); listed by file stem.
LORA_FOLDER, LORA_SUFFIXES = "Lora", (".safetensors",)
EMBEDDING_FOLDER, EMBEDDING_SUFFIXES = "embeddings", (".pt", ".bin", ".safetensors")
# sd-webui-controlnet's folder (models/ControlNet). lllyasviel's files are .pth: read by the restricted
# unpickler (checkpoints/reading.py), which builds tensors only and never runs code from the file.
CONTROLNET_FOLDER, CONTROLNET_SUFFIXES = "ControlNet", (".safetensors", ".pth")
# A1111's models/VAE (modules/sd_vae.py lists *.ckpt, *.pt, *.safetensors there; the pickled ones are read
# by the restricted unpickler too). A VAE is named by its file name, as A1111's `sd_vae` option.
VAE_FOLDER, VAE_SUFFIXES = "VAE", (".safetensors", ".pt", ".ckpt")
# A1111 keeps the tiny decoders of its TAESD live previews in models/VAE-taesd (modules/sd_vae_taesd.py)
TAESD_FOLDER = "VAE-taesd"
# A1111's two fixed `sd_vae` values: "None" decodes with the checkpoint's own VAE; "Automatic" with a VAE
# file named like the checkpoint when there is one (sd_vae.find_vae_near_checkpoint), else its own.
VAE_AUTOMATIC, VAE_NONE = "Automatic", "None"


class QueueFullError(Exception):
    """The queue holds `queue_size` jobs already (HTTP 429)."""


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

    def __init__(self, models_dir: Path | None, default: Path | None, *, low_memory: bool = False) -> None:
        self.models_dir = models_dir
        self.default = default
        self.low_memory = low_memory  # `load(low_memory=...)` of every model it loads
        self.lock = threading.Lock()
        self.selected = self.checkpoints()[0].title if self.checkpoints() else ""
        self.selected_vae = VAE_AUTOMATIC
        self.loaded: tuple[str, StableDiffusion] | None = None
        self.vae_in_use: Path | None = None  # the loaded model's swapped-in VAE file, None: its own
        self.own_vae: AutoencoderKL | None = None  # the checkpoint's VAE, kept aside while a file's is in

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

    def _files(self, folder: str, suffixes: tuple[str, ...]) -> list[Path]:
        root = self.models_dir / folder if self.models_dir is not None else None
        if root is None or not root.is_dir():
            return []
        return sorted(p for p in root.rglob("*") if p.suffix.lower() in suffixes and p.is_file())

    def loras(self) -> list[Path]:
        """LoRA/LyCORIS files in `Lora/` (recursive, as A1111), named in a prompt tag by their stem."""
        return self._files(LORA_FOLDER, LORA_SUFFIXES)

    def embeddings(self) -> list[Path]:
        """Textual-inversion files in `embeddings/`, used in a prompt by their stem."""
        return self._files(EMBEDDING_FOLDER, EMBEDDING_SUFFIXES)

    def controlnets(self) -> list[Path]:
        """ControlNet files in `ControlNet/` (recursive), offered as "name [hash]" (the extension's); when the
        catalogue is the embedded model, also the ControlNets shipped for it (`EMBEDDED_CONTROLNETS`)."""
        from latentforge.checkpoints.loading import default_model_path

        found = self._files(CONTROLNET_FOLDER, CONTROLNET_SUFFIXES)
        embedded = self.default is not None and self.default.resolve() == default_model_path()
        if self.models_dir is None and embedded:
            found += [controlnet_path(name) for name in EMBEDDED_CONTROLNETS]
        return found

    def controlnet_title(self, path: Path) -> str:
        return f"{path.stem} [{a1111_controlnet_hash(path)}]"

    def find_controlnet(self, name: str, where: str = "model") -> Path:
        """A ControlNet by "name [hash]", name or hash; a path-like name is refused, not looked up."""
        if "/" in name or "\\" in name or name.startswith("."):
            raise ParameterError(
                f"{where} {name!r}: give a ControlNet's name from /controlnet/model_list, not a path"
            )
        for path in self.controlnets():
            title = self.controlnet_title(path)
            if name in (title, path.stem, path.name, title[len(path.stem) + 2 : -1]):
                return path
        valid = ", ".join(self.controlnet_title(p) for p in self.controlnets()) or (
            f"none (the models folder has no {CONTROLNET_FOLDER}/ with .safetensors or .pth files)"
        )
        raise ParameterError(f"{where}: ControlNet {name!r} is not in the catalogue; valid: {valid}")

    def vaes(self) -> list[Path]:
        """VAE files in `VAE/` (recursive), offered by file name."""
        return self._files(VAE_FOLDER, VAE_SUFFIXES)

    def find_vae(self, name: str, where: str = "sd_vae") -> str:
        """A `sd_vae` value: "Automatic", "None" or a `VAE/` file's name (or stem); never a path."""
        if name in (VAE_AUTOMATIC, VAE_NONE):
            return name
        if "/" in name or "\\" in name or name.startswith("."):
            raise ParameterError(f"{where} {name!r}: give a VAE's name from /sdapi/v1/sd-vae, not a path")
        for path in self.vaes():
            if name in (path.name, path.stem):
                return path.name
        valid = ", ".join([VAE_AUTOMATIC, VAE_NONE, *(p.name for p in self.vaes())])
        raise ParameterError(f"{where}: VAE {name!r} is not in the catalogue; valid: {valid}")

    def vae_file(self, choice: str, checkpoint: str) -> Path | None:
        """The file `choice` decodes `checkpoint` with; None: the checkpoint's own VAE."""
        if choice == VAE_NONE:
            return None
        files = self.vaes()
        if choice == VAE_AUTOMATIC:  # A1111: the first VAE whose file name starts with the checkpoint's
            stem = checkpoint.rsplit(".", 1)[0]
            return next((p for p in files if p.name.startswith(stem)), None)
        for path in files:
            if path.name == choice:
                return path
        raise ParameterError(f"sd_vae {choice!r}: the file is gone from {VAE_FOLDER}/")

    def use_vae(self, path: Path | None) -> bool:
        """Let the loaded model decode with `path` (None: its own VAE again); True when it changed."""
        assert self.loaded is not None
        model = self.loaded[1]
        if path == self.vae_in_use:
            return False
        if self.own_vae is None:
            self.own_vae = model.vae
        if path is None:
            use_vae(model, self.own_vae, None, None)
        else:
            swap_vae(model, path)  # same architecture, the file's weights; its name and hash for the infotext
        self.vae_in_use = path
        return True

    def hash_of(self, checkpoint: Checkpoint) -> str | None:
        loaded = self.loaded
        return loaded[1].short_hash if loaded and loaded[0] == checkpoint.title else None

    def select(self, name: str) -> None:
        """Make `name` the model of the next jobs (called by the worker, between jobs)."""
        with self.lock:
            self.selected = self.find(name).title

    def model(self, name: str = "") -> StableDiffusion:
        """The named (default: selected) model, loaded once and kept until another is asked for; the old
        one is released first."""
        if not name:
            with self.lock:
                name = self.selected
        if self.loaded is None or self.loaded[0] != name:
            self.release()  # drop the old weights before loading the new ones: never two in memory
            model = load(self.find(name).path, low_memory=self.low_memory)
            self._use_folders(model)
            self._use_taesd(model)
            self.loaded = (name, model)
        return self.loaded[1]

    def _use_folders(self, model: StableDiffusion) -> None:
        """Let `<lora:name>` tags and embedding words of requests find the models folder's files."""
        if self.models_dir is None:
            return
        loras = [d for d in (self.models_dir / LORA_FOLDER,) if d.is_dir()]
        embeddings = [d for d in (self.models_dir / EMBEDDING_FOLDER,) if d.is_dir()]
        model.use_folders(lora_dirs=loras, embedding_dirs=embeddings)

    def _use_taesd(self, model: StableDiffusion) -> None:
        """The family's tiny decoder from models/VAE-taesd (`taesd_decoder.pth`, SDXL `taesdxl_decoder.pth`,
        or .safetensors), for TAESD live previews and `fast_decode`; the embedded model brings its own."""
        if self.models_dir is None:
            return
        variant = "taesdxl" if model.family.is_sdxl else "taesd"
        names = (f"{variant}_decoder{suffix}" for suffix in TAESD_SUFFIXES)
        found = [path for path in (self.models_dir / TAESD_FOLDER / n for n in names) if path.is_file()]
        if found:  # this family's file only (read_taesd's folder search would fall back to SD's for SDXL)
            model.taesd = read_taesd(found[0], variant=variant, dtype=model.dtype).to(model.device)

    def release(self) -> None:
        """Forget the loaded model and return its memory (A1111: `unload_model_weights`, `torch_gc`)."""
        self.loaded = None
        self.own_vae, self.vae_in_use = None, None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


@dataclass
class JobResult:
    images: list[GeneratedImage]
    warnings: list[str]
    interrupted: bool
    grids: list[Image.Image] = field(default_factory=list)  # an X/Y/Z plot's labelled grids
    skipped: int = 0  # batches ended early by skip


@dataclass
class Job:
    """One queued unit of work: a generation, an X/Y/Z plot (`axes`) or a model switch (`checkpoint`)."""

    request: GenerationRequest | None
    axes: tuple[Axis, ...] = ()
    checkpoint: str = ""  # a switch job: the catalogue title to select
    select_vae: str = ""  # a switch job: the `sd_vae` value to select
    use_model: str = ""  # a generation with its own model (override_settings); "" = the selected one
    use_vae: str = ""  # a generation with its own `sd_vae` (override_settings); "" = the selected one
    controlnets: tuple[Path, ...] = ()  # the file of each of `request.controlnet`'s units, in order
    task_id: str = ""  # the client's id (A1111's force_task_id), for `POST /internal/progress`
    future: Future[JobResult] = field(default_factory=Future)
    created: float = field(default_factory=time.time)
    started: float = 0.0
    step: int = 0
    total_steps: int = 0
    images_done: int = 0
    interrupted: bool = False
    skip_requested: bool = False
    skipped: int = 0  # batches ended early by skip
    model: StableDiffusion | None = None
    latest: Any = None  # the last step's x0 estimate [B, C, h, w], for the live preview

    def on_step(self, info: Any) -> bool | str:
        self.step += 1
        self.latest = info.denoised
        if self.interrupted:
            return True
        if self.skip_requested:  # one skip ends the batch being sampled now, no later one
            self.skip_requested, self.skipped = False, self.skipped + 1
            return SKIP
        return False


def _total_steps(model: StableDiffusion, request: GenerationRequest) -> int:
    """All sampling steps of a request, counted as the runner does (for progress and ETA)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resolved = resolve(request, model)
    r = resolved.request
    first = r.steps if r.init is None else img2img_steps(r.steps, r.init.denoising_strength)[1]
    second = resolved.second.steps if resolved.second is not None else 0
    return len(resolved.batches) * (first + second)


TASKS_KEPT = 256  # task ids remembered for `POST /internal/progress` (finished jobs included)


class Worker:
    """One thread runs jobs one at a time from a bounded FIFO queue."""

    def __init__(self, catalog: Catalog, queue_size: int) -> None:
        self.catalog = catalog
        self.queue: queue.Queue[Job | None] = queue.Queue(maxsize=queue_size)
        self.current: Job | None = None
        self.projection: tuple[StableDiffusion, Tensor] | None = None
        self.preview_type = "TAESD"  # A1111's `show_progress_type` (pipelines.preview.PREVIEW_TYPES)
        self.networks: dict[Path, ControlNet] = {}  # loaded ControlNets, for the loaded model's dtype/device
        self.tasks: dict[str, Job] = {}  # jobs by client task id, the newest TASKS_KEPT (insertion order)
        self.thread = threading.Thread(target=self._run, name="latentforge-generation", daemon=True)
        self.thread.start()

    def submit(self, request: GenerationRequest | None, **kind: Any) -> Job:
        """Queue a generation, or with `axes=` an X/Y/Z plot, or with `checkpoint=` a model switch."""
        job = Job(request, **kind)
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise QueueFullError(
                f"the queue is full ({self.queue.maxsize} jobs waiting); retry later"
            ) from None
        if job.task_id:
            self.tasks.pop(job.task_id, None)
            self.tasks[job.task_id] = job
            while len(self.tasks) > TASKS_KEPT:  # finished ones are forgotten oldest first
                del self.tasks[next(iter(self.tasks))]
        return job

    def ahead_of(self, job: Job) -> int | None:
        """How many queued jobs run before `job`, or None when it is not waiting."""
        with self.queue.mutex:
            waiting = list(self.queue.queue)
        return waiting.index(job) if job in waiting else None

    def interrupt(self) -> None:
        job = self.current
        if job is not None:
            job.interrupted = True

    def skip(self) -> None:
        """End the running job's current batch early (its images kept) and go on with the next one."""
        job = self.current
        if job is not None:
            job.skip_requested = True

    def preview_projection(self, model: StableDiffusion) -> Tensor:
        """The latent -> RGB map of the running job's model (fitted once per model for other VAEs)."""
        if self.projection is None or self.projection[0] is not model:
            self.projection = (model, latent_rgb_projection(model))
        return self.projection[1]

    def preview(self, model: StableDiffusion, latents: Tensor) -> Image.Image:
        """The running job's live preview, of the kind the `show_progress_type` option names."""
        return preview_image(model, latents, self.preview_type, self.preview_projection(model))

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
                result = self._generate(job)
            except Exception as error:  # handed to the waiting request, which maps it to an HTTP error
                self._finish(job)
                job.future.set_exception(error)
            else:
                self._finish(job)
                job.future.set_result(result)

    def _finish(self, job: Job) -> None:
        """Done before the waiting request wakes: /progress after a response never shows this job."""
        self.current = None
        job.model = job.latest = None  # a finished job holds no model or tensors (switch: memory)

    def _model(self, name: str = "", vae: str = "") -> StableDiffusion:
        """The model a job needs, decoding with the VAE it asks for; on a model change the old one's memory
        (also the preview's hold) is released."""
        wanted = name or self.catalog.selected
        if self.catalog.loaded is not None and self.catalog.loaded[0] != wanted:
            self.projection = None
            self.networks.clear()  # another model (maybe another family): its ControlNets go too
            self.catalog.release()
        model = self.catalog.model(wanted)
        if self.catalog.use_vae(self.catalog.vae_file(vae or self.catalog.selected_vae, wanted)):
            self.projection = None  # a fitted preview projection belongs to the VAE it was fitted on
        return model

    def _with_networks(
        self, model: StableDiffusion, request: GenerationRequest, paths: tuple[Path, ...]
    ) -> GenerationRequest:
        """The request with each unit's ControlNet loaded (once per file, kept until the model changes)."""
        units = []
        for unit, path in zip(request.controlnet, paths, strict=True):
            if path not in self.networks:
                self.networks[path] = load_controlnet(path, dtype=model.dtype, device=model.device)
            units.append(replace(unit, network=self.networks[path]))
        return replace(request, controlnet=tuple(units))

    def _switch(self, job: Job) -> JobResult:
        if job.checkpoint:
            self.catalog.select(job.checkpoint)
        if job.select_vae:
            self.catalog.selected_vae = job.select_vae
        self._model()
        return JobResult([], [], False)

    def _generate(self, job: Job) -> JobResult:
        if job.checkpoint or job.select_vae:
            return self._switch(job)
        assert job.request is not None
        model = job.model = self._model(job.use_model, job.use_vae)
        if job.controlnets:
            job.request = self._with_networks(model, job.request, job.controlnets)
        if job.axes:
            axes = list(job.axes)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                # every cell's steps (one image each), for progress and ETA as for any job
                cell_requests = (replace(r, batch_count=1) for _, r in cells(job.request, axes))
                job.total_steps = sum(_total_steps(model, r) for r in cell_requests)
                grids, images = xyz_plot(model, job.request, axes, callback=job.on_step, progress=False)
            messages = [str(w.message) for w in caught]
            return JobResult(images, messages, job.interrupted, grids, skipped=job.skipped)
        images = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            job.total_steps = _total_steps(model, job.request)
            for image in iter_images(model, job.request, callback=job.on_step, progress=False):
                images.append(image)
                job.images_done += 1
        return JobResult(images, [str(w.message) for w in caught], job.interrupted, skipped=job.skipped)
