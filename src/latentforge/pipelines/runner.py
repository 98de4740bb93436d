"""The one runner: a `GenerationRequest` in, images out, batch by batch.

    resolve (validate, defaults, seeds, sampler lookup)
    -> latent source: none (txt2img), the init images (img2img), or the masked init (inpaint/outpaint)
    -> per batch: [its <lora:> files applied] -> sample_latents -> [hires: upscale -> sample_latents
       again] -> decode -> [paste back]; the LoRAs are undone bit for bit at the end, also on error

CLI, Python API, evaluation and the server only build requests; a list is `run`, i.e. `list(iter_images)`.
Under torchrun each process runs its `Shard` of the batches (`pipelines.sharding`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

from PIL import Image

from latentforge.checkpoints.lora import LoraHandle, apply_loras
from latentforge.errors import ParameterError
from latentforge.model import StableDiffusion
from latentforge.pipelines.generate import (
    GeneratedImage,
    LatentSource,
    Progress,
    StepCallback,
    decode_results,
    img2img_steps,
    sample_latents,
)
from latentforge.pipelines.hires import hires_pass
from latentforge.pipelines.images import encode_images, pil_to_tensor
from latentforge.pipelines.inpaint import Overlay, inpaint_source
from latentforge.pipelines.request import Batch, GenerationRequest, ResolvedRequest, resolve
from latentforge.pipelines.sharding import Shard


def init_source(model: StableDiffusion, request: GenerationRequest) -> LatentSource:
    """img2img: the init images resized to the generation size and encoded (one for all, or one per image)."""
    assert request.init is not None
    size = (request.width, request.height)
    images = [
        im if im.size == size else im.resize(size, Image.Resampling.LANCZOS) for im in request.init.images
    ]
    return LatentSource(encode_images(model, pil_to_tensor(images), tiled=request.use_tiled_vae(*size)))


def _source(model: StableDiffusion, resolved: ResolvedRequest) -> tuple[LatentSource | None, Overlay | None]:
    r = resolved.request
    if r.init is None:
        return None, None
    count = len(r.init.images)
    if count == 0:
        raise ParameterError(f"this is an {r.mode} request: give the init image it starts from")
    if r.inpaint is not None:
        if count != 1:
            raise ParameterError(f"inpainting takes one init image, not {count}")
        if r.inpaint.mask is None and r.inpaint.outpaint is None:
            raise ParameterError("this is an inpaint request: give the mask (white = repaint)")
        return inpaint_source(model, r)
    if count not in (1, r.batch_size):
        raise ParameterError(f"give 1 or batch size ({r.batch_size}) init images, not {count}")
    return init_source(model, r), None


def iter_images(
    model: StableDiffusion,
    request: GenerationRequest,
    *,
    callback: StepCallback | None = None,
    progress: bool = True,
    refiner: StableDiffusion | None = None,
    shard: Shard | None = None,
) -> Iterator[GeneratedImage]:
    """Generate what the request asks for, yielding each image as soon as its batch is decoded.

    `callback(StepInfo)` sees every sampling step; returning True stops after the current batch (an
    interrupted hires run keeps its first-pass images, as A1111 does), returning `SKIP` ends the
    current batch early and goes on with the next. `refiner`: the SDXL refiner model the request's
    `refiner` part switches to. `shard`: make only this process's part of the batches (torchrun).
    """
    resolved = resolve(request, model, refiner=refiner)
    r = resolved.request
    source, overlay = _source(model, resolved)
    strength = r.init.denoising_strength if r.init is not None else 1.0
    first_steps = r.steps if source is None else img2img_steps(r.steps, strength)[1]
    second_steps = resolved.second.steps if resolved.second is not None else 0
    part = (shard or Shard()).batches(len(resolved.batches))
    batches = resolved.batches[part.start : part.stop]
    bar = Progress(len(batches) * (first_steps + second_steps), callback, progress)
    loras: LoraHandle | None = None
    applied: tuple = ()
    try:
        for batch in batches:
            if batch.loras != applied:  # a batch whose first prompt names other LoRAs: swap them
                if loras is not None:
                    loras.undo()
                    loras = None
                loras, applied = _apply_batch_loras(model, batch), batch.loras
            latents = sample_latents(
                model,
                r,
                resolved.first,
                batch,
                source=source,
                strength=strength,
                callback=bar,
                # with the hires fix the refiner refines the second pass only (A1111's default
                # `hires_fix_refiner_pass = "second pass"`)
                refiner=refiner if resolved.second is None else None,
            )
            described = r
            if resolved.second is not None:
                if bar.stopped or bar.skipping:
                    described = replace(r, hires=None)
                else:
                    latents = hires_pass(model, resolved, batch, latents, callback=bar, refiner=refiner)
            for result in decode_results(model, resolved, batch, latents, request=described):
                yield result if overlay is None else replace(result, image=overlay.apply(result.image))
            if bar.stopped:
                break
            bar.skipping = False  # a skip ends one batch only
    finally:
        if loras is not None:
            loras.undo()
        bar.close()


def _apply_batch_loras(model: StableDiffusion, batch: Batch) -> LoraHandle | None:
    """Apply a batch's `<lora:>` files; a tag with both weights 0 changes nothing and is not read."""
    active = [(lora.path, lora.unet_weight, lora.te_weight) for lora in batch.loras]
    active = [entry for entry in active if entry[1] != 0 or entry[2] != 0]
    return apply_loras(model, active) if active else None


def run(
    model: StableDiffusion,
    request: GenerationRequest,
    *,
    callback: StepCallback | None = None,
    progress: bool = True,
    refiner: StableDiffusion | None = None,
) -> list[GeneratedImage]:
    """All images of a request (`list(iter_images(...))`)."""
    return list(iter_images(model, request, callback=callback, progress=progress, refiner=refiner))
