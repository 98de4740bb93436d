"""txt2img and img2img: prompt -> conditioning -> sigmas -> sampler -> VAE decode, top to bottom."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from latentforge.model import StableDiffusion
from latentforge.pipelines.conditioning import PromptConditioner
from latentforge.pipelines.images import decode_latents, encode_images, pil_to_tensor, tensor_to_pil
from latentforge.pipelines.infotext import format_infotext
from latentforge.pipelines.params import GenerationParams
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


def model_alphas_cumprod(model: StableDiffusion) -> torch.Tensor:
    f = model.family
    return schedules.alphas_cumprod(schedules.betas(f.beta_schedule, 1000, f.beta_start, f.beta_end))


def make_denoiser(model: StableDiffusion) -> DiscreteDenoiser:
    """The U-Net as `denoise(x, sigma, cond) -> x0`: float32 outside, the model's dtype inside."""
    unet = model.unet

    def network(x_in: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        if "concat" in cond:  # inpainting models: masked-image latents and mask as extra channels
            x_in = torch.cat([x_in, cond["concat"].to(x_in)], dim=1)
        dtype = model.dtype
        return unet(x_in.to(dtype), t.to(dtype), cond["crossattn"].to(dtype)).float()

    return DiscreteDenoiser(network, model_alphas_cumprod(model), model.family.prediction)


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
    family = model.family
    params = params.resolved(family)
    params.validate(family)
    params = replace(params, seed=resolve_seed(params.seed))
    if params.subseed_strength > 0:
        params = replace(params, subseed=resolve_seed(params.subseed))
    spec = get_sampler(params.sampler)
    denoiser = make_denoiser(model)
    if sigmas is None:
        sigmas = sampling_sigmas(params.sampler, params.schedule, params.steps, denoiser.sigmas)
    sigmas = sigmas.float()
    init_latents = None
    if init_images is not None:
        # A1111's step accounting: int(steps * strength) steps run, from the matching sigma down.
        t_enc = int(min(params.denoising_strength, 0.999) * params.steps)
        sigmas = sigmas[len(sigmas) - 2 - t_enc :]
        pixels = pil_to_tensor(
            [im.resize((params.width, params.height), Image.LANCZOS) for im in init_images]
        )
        init_latents = encode_images(model, pixels)
    f = family.vae.downsampling_factor
    shape = (family.vae.embed_dim, params.height // f, params.width // f)
    conditioner = PromptConditioner(model, params.clip_skip, params.steps)
    bar = tqdm(
        total=params.batch_count * (len(sigmas) - 1), disable=not progress, desc="sampling", unit="step"
    )
    try:
        for batch in range(params.batch_count):
            first = batch * params.batch_size
            seeds = [params.seed + i for i in range(first, first + params.batch_size)]
            subseeds = [params.subseed + i for i in range(first, first + params.batch_size)]
            variation = subseeds if params.subseed_strength else None
            noise = request_noise(seeds, shape, subseeds=variation, subseed_strength=params.subseed_strength)
            noise = noise.to(model.device)
            if init_latents is None:
                x = spec.initial_latent(noise, sigmas[0])
            else:  # x = x0 + sigma * eps at the first sigma of the shortened schedule
                start = init_latents if len(init_latents) == 1 else init_latents[first : first + len(seeds)]
                x = start.to(noise) + noise * sigmas[0]
            guided = conditioner.denoiser(
                denoiser,
                [params.prompt] * len(seeds),
                [params.negative_prompt] * len(seeds),
                sigmas,
                params.cfg_scale,
                params.cfg_rescale,
            )
            options: dict[str, Any] = {} if params.eta is None else {"eta": params.eta}
            stopped = False

            def on_step(info: Any) -> bool | None:
                nonlocal stopped
                bar.update(1)
                if callback is not None and callback(info):
                    stopped = True
                return stopped

            with torch.inference_mode():
                noise_source = _noise_source(spec.noise, seeds, shape, sigmas, model)
                latents = spec.function(guided, x, sigmas, callback=on_step, noise=noise_source, **options)
            pixels, retried = decode_latents(model, latents)
            for i, image in enumerate(tensor_to_pil(pixels)):
                image_params = replace(params, seed=seeds[i], subseed=subseeds[i])
                info = infotext(model, image_params, vae_retry=retried, img2img=init_images is not None)
                yield GeneratedImage(image, seeds[i], info, latents[i].cpu())
            if stopped:
                break
    finally:
        bar.close()


def _noise_source(
    kind: str, seeds: list[int], shape: tuple[int, ...], sigmas: torch.Tensor, model: StableDiffusion
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


def infotext(model: StableDiffusion, params: GenerationParams, *, vae_retry: bool, img2img: bool) -> str:
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
        **params.extra,
        "Version": "latentforge",
    }
    return format_infotext(params.prompt, params.negative_prompt, values)
