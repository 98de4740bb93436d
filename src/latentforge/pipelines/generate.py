"""txt2img and img2img: prompt -> conditioning -> sigmas -> sampler -> VAE decode, top to bottom.

`sample_latents` is the one sampling core every pipeline (txt2img, img2img, inpainting, hires fix)
runs per batch; a pipeline differs only in the `LatentSource` it hands over and what it does with
the decoded images.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from latentforge.model import StableDiffusion
from latentforge.pipelines.conditioning import Denoiser, PromptConditioner
from latentforge.pipelines.images import decode_latents, encode_images, pil_to_tensor, tensor_to_pil
from latentforge.pipelines.infotext import format_infotext
from latentforge.pipelines.params import GenerationParams, ParameterError
from latentforge.pipelines.seeds import request_noise, resolve_seed
from latentforge.sampling import schedules
from latentforge.sampling.denoisers import DiscreteDenoiser
from latentforge.sampling.noise import BrownianNoiseSampler, NoiseSampler
from latentforge.sampling.registry import get_sampler, resolve_schedule, sampling_sigmas

StepCallback = Callable[[Any], bool | None]


@dataclass
class GeneratedImage:
    image: Image.Image
    seed: int
    infotext: str
    latents: torch.Tensor  # [C, h, w] float32, before decoding


@dataclass(frozen=True)
class LatentSource:
    """Where img2img-style sampling starts, and what of it is kept (inpainting).

    All tensors are scaled latents at the generation size with batch 1 (shared) or the batch size.
    """

    latents: Tensor  # [1|B, C, h, w] init latents, noised to the first sigma
    keep: Tensor | None = None  # [1|B, 1, h, w] 1 where the init latents are kept (A1111's `mask`)
    noise_mask: Tensor | None = None  # [1|B, 1, h, w] 1 where init starts from the image's seed noise
    concat: Tensor | None = None  # [1|B, 5, h, w] inpainting-model channels [mask, masked-image latents]


def model_alphas_cumprod(model: StableDiffusion) -> torch.Tensor:
    f = model.family
    return schedules.alphas_cumprod(schedules.betas(f.beta_schedule, 1000, f.beta_start, f.beta_end))


def make_denoiser(model: StableDiffusion) -> DiscreteDenoiser:
    """The U-Net as `denoise(x, sigma, cond) -> x0`: float32 outside, the model's dtype inside."""
    unet = model.unet

    def network(x_in: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        if "concat" in cond:  # inpainting models: [latents, mask, masked-image latents] as in LDM/diffusers
            x_in = torch.cat([x_in, cond["concat"].to(x_in)], dim=1)
        dtype = model.dtype
        return unet(x_in.to(dtype), t.to(dtype), cond["crossattn"].to(dtype)).float()

    return DiscreteDenoiser(network, model_alphas_cumprod(model), model.family.prediction)


def blend_known(denoise: Denoiser, init: Tensor, keep: Tensor) -> Denoiser:
    """A1111's inpainting for ordinary models: every x0 estimate takes the init latents where `keep` is 1."""

    def blended(x: Tensor, sigma: Any, cond: Any = None) -> Tensor:
        return denoise(x, sigma, cond) * (1 - keep) + init * keep

    return blended


def img2img_steps(steps: int, strength: float, *, exact_steps: bool = False) -> tuple[int, int]:
    """(steps of the full schedule, steps run from its tail) of an img2img pass (A1111's setup_img2img_steps).

    Ordinary img2img runs int(steps * strength) + 1 of `steps`; the exact variant (A1111's hires pass)
    runs exactly `steps` of a schedule stretched to int(steps / strength).
    """
    strength = min(strength, 0.999)
    if exact_steps and strength > 0:
        return int(steps / strength), steps
    return steps, int(strength * steps) + 1


def prepare_params(model: StableDiffusion, params: GenerationParams) -> GenerationParams:
    """Family defaults filled in, validated, random seeds drawn (the drawn ones are reported)."""
    params = params.resolved(model.family)
    params.validate(model.family)
    params = replace(params, seed=resolve_seed(params.seed))
    if params.subseed_strength > 0:
        params = replace(params, subseed=resolve_seed(params.subseed))
    return params


def batch_seeds(params: GenerationParams) -> Iterator[tuple[list[int], list[int]]]:
    """(seeds, subseeds) of each batch. As A1111: seed + i, but one seed for all with a variation seed."""
    for batch in range(params.batch_count):
        index = range(batch * params.batch_size, (batch + 1) * params.batch_size)
        step = 0 if params.subseed_strength else 1
        yield [params.seed + i * step for i in index], [params.subseed + i for i in index]


def _expand(t: Tensor | None, batch: int, device: torch.device) -> Tensor | None:
    if t is None:
        return None
    t = t.to(device=device, dtype=torch.float32)
    return t.expand(batch, *t.shape[1:]) if t.shape[0] == 1 else t


def unmasked_concat(model: StableDiffusion, batch: int, height: int, width: int) -> Tensor:
    """Inpainting-model channels for "repaint everything": mask of ones and a grey image (A1111, txt2img)."""
    latents = encode_images(model, torch.zeros(1, 3, height, width))
    mask = torch.ones(1, 1, *latents.shape[-2:])
    return torch.cat([mask, latents], dim=1).expand(batch, -1, -1, -1)


def sample_latents(
    model: StableDiffusion,
    params: GenerationParams,
    seeds: Sequence[int],
    subseeds: Sequence[int],
    *,
    source: LatentSource | None = None,
    sigmas: Tensor | None = None,
    callback: StepCallback | None = None,
    exact_steps: bool = False,
    prompts: Sequence[str] | None = None,
) -> Tensor:
    """One batch: seeded noise -> (noised init) -> guided, blended denoiser -> sampler -> [B, C, h, w].

    `params` must be prepared (`prepare_params`). `sigmas` overrides the full schedule (descending,
    trailing 0; A1111's sampler_noise_scheduler_override); img2img cuts its tail from it. `prompts`
    gives each image its own prompt (default: `params.prompt` for all).
    """
    family = model.family
    spec = get_sampler(params.sampler)
    denoiser = make_denoiser(model)
    schedule_steps, run = (
        (params.steps, params.steps)
        if source is None
        else img2img_steps(params.steps, params.denoising_strength, exact_steps=exact_steps)
    )
    if sigmas is None:
        sigmas = sampling_sigmas(params.sampler, params.schedule, schedule_steps, denoiser.sigmas)
    sigmas = sigmas.float() if source is None else sigmas.float()[-run - 1 :]
    f = family.vae.downsampling_factor
    shape = (family.vae.embed_dim, params.height // f, params.width // f)
    batch, device = len(seeds), model.device
    prompts = [params.prompt] * batch if prompts is None else list(prompts)
    if len(prompts) != batch:
        raise ParameterError(f"{len(prompts)} prompts for a batch of {batch} seeds")
    variation = subseeds if params.subseed_strength else None
    noise = request_noise(seeds, shape, subseeds=variation, subseed_strength=params.subseed_strength)
    noise = noise.to(device)

    init = keep = None
    concat = None if source is None else _expand(source.concat, batch, device)
    if concat is None and family.unet.in_channels == 9:
        concat = unmasked_concat(model, batch, params.height, params.width).to(device)
    if source is None:
        x = spec.initial_latent(noise, sigmas[0])
    else:  # x = x0 + sigma * eps at the first sigma of the shortened schedule
        init = _expand(source.latents, batch, device)
        assert init is not None
        if init.shape[1:] != noise.shape[1:]:
            raise ParameterError(f"init latents {tuple(init.shape[1:])} do not match the size {shape}")
        noise_mask = _expand(source.noise_mask, batch, device)
        if noise_mask is not None:  # A1111's "latent noise": the repainted region starts from seed noise
            init = init * (1 - noise_mask) + noise * noise_mask
        keep = _expand(source.keep, batch, device)
        x = init + noise * sigmas[0]

    conditioner = PromptConditioner(model, params.clip_skip, params.steps)
    guided = conditioner.denoiser(
        denoiser,
        prompts,
        [params.negative_prompt] * batch,
        sigmas,
        params.cfg_scale,
        params.cfg_rescale,
        extra=None if concat is None else {"concat": concat},
    )
    if init is not None and keep is not None:  # keep is only set together with init
        guided = blend_known(guided, init, keep)
    options: dict[str, Any] = {} if params.eta is None else {"eta": params.eta}
    with torch.inference_mode():
        noise_source = _noise_source(spec.noise, seeds, shape, sigmas, model)
        latents = spec.function(guided, x, sigmas, callback=callback, noise=noise_source, **options)
    if init is not None and keep is not None:
        latents = latents * (1 - keep) + init * keep
    return latents


class Progress:
    """A tqdm bar over all sampling steps that forwards each step to the user's callback.

    `stopped` turns true when the callback returns True: the sampler returns early and the
    pipeline stops after finishing the current batch.
    """

    def __init__(self, total: int, callback: StepCallback | None, enabled: bool) -> None:
        self.bar = tqdm(total=total, disable=not enabled, desc="sampling", unit="step")
        self.callback, self.stopped = callback, False

    def __call__(self, info: Any) -> bool:
        self.bar.update(1)
        if self.callback is not None and self.callback(info):
            self.stopped = True
        return self.stopped

    def close(self) -> None:
        self.bar.close()


def decode_results(
    model: StableDiffusion,
    params: GenerationParams,
    latents: Tensor,
    seeds: Sequence[int],
    subseeds: Sequence[int],
    *,
    img2img: bool,
    prompts: Sequence[str] | None = None,
) -> list[GeneratedImage]:
    """Decode a batch and attach each image's infotext (its own seed and, given `prompts`, its own prompt;
    the size written is `params`')."""
    f = model.family.vae.downsampling_factor
    tiled = params.use_tiled_vae(latents.shape[-1] * f, latents.shape[-2] * f)
    pixels, retried = decode_latents(model, latents, tiled=tiled)
    results = []
    for i, image in enumerate(tensor_to_pil(pixels)):
        image_params = replace(params, seed=seeds[i], subseed=subseeds[i])
        if prompts is not None:
            image_params = replace(image_params, prompt=prompts[i])
        info = infotext(model, image_params, vae_retry=retried, img2img=img2img, tiled_vae=tiled)
        results.append(GeneratedImage(image, seeds[i], info, latents[i].cpu()))
    return results


def generate(
    model: StableDiffusion,
    params: GenerationParams,
    *,
    init_images: list[Image.Image] | None = None,
    callback: StepCallback | None = None,
    progress: bool = True,
    sigmas: torch.Tensor | None = None,
) -> list[GeneratedImage]:
    """txt2img, or img2img when `init_images` are given (one per batch image, or one for all).

    `sigmas` overrides the sampler's schedule (descending; A1111's sampler_noise_scheduler_override).
    """
    return list(
        iter_generate(
            model, params, init_images=init_images, callback=callback, progress=progress, sigmas=sigmas
        )
    )


def iter_generate(
    model: StableDiffusion,
    params: GenerationParams,
    *,
    init_images: list[Image.Image] | None = None,
    callback: StepCallback | None = None,
    progress: bool = True,
    sigmas: torch.Tensor | None = None,
) -> Iterator[GeneratedImage]:
    """`generate`, yielding each image as soon as its batch is decoded (so an interrupted run keeps them)."""
    params = prepare_params(model, params)
    source = None
    if init_images is not None:
        if len(init_images) not in (1, params.batch_size):
            count = len(init_images)
            raise ParameterError(f"give 1 or batch size ({params.batch_size}) init images, not {count}")
        size = (params.width, params.height)
        resized = [im if im.size == size else im.resize(size, Image.Resampling.LANCZOS) for im in init_images]
        pixels = pil_to_tensor(resized)
        latents = encode_images(model, pixels, tiled=params.use_tiled_vae(*size))
        source = LatentSource(latents)
    steps = params.steps if source is None else img2img_steps(params.steps, params.denoising_strength)[1]
    bar = Progress(params.batch_count * steps, callback, progress)
    try:
        for seeds, subseeds in batch_seeds(params):
            latents = sample_latents(
                model, params, seeds, subseeds, source=source, sigmas=sigmas, callback=bar
            )
            yield from decode_results(model, params, latents, seeds, subseeds, img2img=source is not None)
            if bar.stopped:
                break
    finally:
        bar.close()


def iter_generate_each(
    model: StableDiffusion,
    pairs: Sequence[tuple[str, int]],
    params: GenerationParams,
    *,
    progress: bool = True,
) -> Iterator[GeneratedImage]:
    """txt2img of each (prompt, seed) pair, `params.batch_size` pairs per batch whatever their prompts.

    Every image is the one `generate` makes of its prompt and seed alone (batch size 1, `params.subseed`):
    noise comes from each image's own seed. Mixing prompts of different 75-token chunk counts in one batch
    pads the shorter conditioning as A1111 does, which changes those images slightly.
    """
    params = prepare_params(model, params)
    size = max(params.batch_size, 1)
    batches = [pairs[i : i + size] for i in range(0, len(pairs), size)]
    bar = Progress(len(batches) * params.steps, None, progress)
    try:
        for batch in batches:
            prompts, seeds = [p for p, _ in batch], [s for _, s in batch]
            subseeds = [params.subseed] * len(batch)
            latents = sample_latents(model, params, seeds, subseeds, callback=bar, prompts=prompts)
            yield from decode_results(model, params, latents, seeds, subseeds, img2img=False, prompts=prompts)
    finally:
        bar.close()


def _noise_source(
    kind: str, seeds: Sequence[int], shape: tuple[int, ...], sigmas: torch.Tensor, model: StableDiffusion
) -> NoiseSampler | BrownianNoiseSampler | None:
    """Seeded step noise: image i continues the generator of seed i (ancestral) or its Brownian tree (SDE)."""
    if kind == "gaussian":
        return NoiseSampler(seeds, shape, device=model.device)
    if kind == "brownian":
        positive = sigmas[sigmas > 0]
        return BrownianNoiseSampler(
            seeds,
            shape,
            sigma_min=float(positive.min()),
            sigma_max=float(positive.max()),
            device=model.device,
        )
    return None


def infotext(
    model: StableDiffusion,
    params: GenerationParams,
    *,
    vae_retry: bool,
    img2img: bool,
    tiled_vae: bool = False,
) -> str:
    schedule = resolve_schedule(params.sampler, params.schedule)
    values: dict[str, Any] = {
        "Steps": params.steps,
        "Sampler": params.sampler,
        "Schedule type": schedule,
        "CFG scale": f"{params.cfg_scale:g}",
        "Seed": params.seed,
        "Size": f"{params.width}x{params.height}",
        "Model hash": model.short_hash,
        "Model": model.name,
        "Denoising strength": params.denoising_strength if img2img else None,
        "Clip skip": params.clip_skip if params.clip_skip != 1 else None,
        "Variation seed": params.subseed if params.subseed_strength else None,
        "Variation seed strength": params.subseed_strength or None,
        "CFG rescale": params.cfg_rescale or None,
        "Eta": params.eta,
        "VAE decoded in fp32": True if vae_retry else None,
        "Tiled VAE": True if tiled_vae else None,
        **params.extra,
        "Version": "latentforge",
    }
    return format_infotext(params.prompt, params.negative_prompt, values)
