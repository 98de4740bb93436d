"""The sampling core every generation mode runs per batch: seeded noise -> (noised init) -> guided,
blended denoiser -> sampler -> latents, and latents -> images with their infotext.

txt2img, img2img, inpainting and the hires fix differ only in the `LatentSource` handed to
`sample_latents` and in what happens to the decoded images; `runner.iter_images` strings them together.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from latentforge.errors import NonFiniteError, ParameterError
from latentforge.model import StableDiffusion
from latentforge.models.attention import TokenMerging
from latentforge.models.deepcache import DeepCache
from latentforge.models.token_merging import apply_token_merging
from latentforge.pipelines.controlnet import controlled, request_units
from latentforge.pipelines.images import decode_latents, decode_latents_fast, encode_images, tensor_to_pil
from latentforge.pipelines.prompt_guidance import PromptConditioner
from latentforge.pipelines.request import Batch, GenerationRequest, Pass, ResolvedRequest
from latentforge.pipelines.request_infotext import to_infotext
from latentforge.pipelines.sdxl_conditioning import SDXLConditioner, refiner_switch, size_numbers
from latentforge.pipelines.seeds import request_noise
from latentforge.sampling import schedules
from latentforge.sampling.common import Denoiser
from latentforge.sampling.denoisers import DiscreteDenoiser
from latentforge.sampling.guidance import CFGTruncation
from latentforge.sampling.noise import BrownianNoiseSampler, NoiseSampler, generators
from latentforge.sampling.registry import sampling_sigmas

StepCallback = Callable[[Any], bool | str | None]
# A step callback's answer that ends the current batch's sampling early (its images are still decoded, as
# A1111's "Skip") and goes on with the next batch; True stops after the current batch.
SKIP = "skip"


@dataclass
class GeneratedImage:
    image: Image.Image
    seed: int
    infotext: str
    latents: torch.Tensor  # [C, h, w] float32, before decoding
    request: GenerationRequest  # the resolved single-image request its infotext describes
    index: int = 0  # its position among the request's images (names its file, whichever process made it)


@dataclass(frozen=True)
class LatentSource:
    """Where img2img-style sampling starts, and what of it is kept (inpainting).

    All tensors are scaled latents at the generation size with batch 1 (shared) or the batch size.
    """

    latents: Tensor  # [1|B, C, h, w] init latents, noised to the first sigma
    keep: Tensor | None = None  # [1|B, 1, h, w] 1 where the init latents are kept (A1111's `mask`)
    noise_mask: Tensor | None = None  # [1|B, 1, h, w] 1 where init starts from the image's seed noise
    concat: Tensor | None = None  # [1|B, 5, h, w] inpainting-model channels [mask, masked-image latents]
    # "Only masked" inpainting: (init image size, region) the pass repaints, where ControlNet crops its images
    region: tuple[tuple[int, int], tuple[int, int, int, int]] | None = None


def model_alphas_cumprod(model: StableDiffusion) -> torch.Tensor:
    f = model.family
    return schedules.alphas_cumprod(schedules.betas(f.beta_schedule, 1000, f.beta_start, f.beta_end))


def make_denoiser(model: StableDiffusion, deep_cache: DeepCache | None = None) -> DiscreteDenoiser:
    """The U-Net as `denoise(x, sigma, cond) -> x0`: float32 outside, the model's dtype inside; with
    `deep_cache` (one per sampling pass), DeepCache's cached evaluations in between full ones."""
    unet = model.unet

    def network(x_in: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        dtype = model.dtype
        context = cond["crossattn"].to(dtype)
        control = cond.get("control")  # ControlNet residuals of the latent channels (pipelines/controlnet.py)
        residuals = None if control is None else control(x_in.to(dtype), t.to(dtype), context)
        if "concat" in cond:  # inpainting models: [latents, mask, masked-image latents] as in LDM/diffusers
            x_in = torch.cat([x_in, cond["concat"].to(x_in)], dim=1)
        vector = cond.get("vector")  # SDXL's pooled text + size numbers
        if model.backend is not None:  # compiled U-Net (backends/): fp32 in and out, no run-time patches
            return model.backend.unet(x_in, t, cond["crossattn"], vector)
        y = None if vector is None else vector.to(dtype)
        return unet(x_in.to(dtype), t.to(dtype), context, y, control=residuals, deep_cache=deep_cache).float()

    return DiscreteDenoiser(network, model_alphas_cumprod(model), model.family.prediction)


def blend_known(denoise: Denoiser, init: Tensor, keep: Tensor) -> Denoiser:
    """A1111's inpainting for ordinary models: every x0 estimate takes the init latents where `keep` is 1."""

    def blended(x: Tensor, sigma: Any) -> Tensor:
        return denoise(x, sigma) * (1 - keep) + init * keep

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
    request: GenerationRequest,
    sampling: Pass,
    batch: Batch,
    *,
    size: tuple[int, int] | None = None,
    source: LatentSource | None = None,
    strength: float = 1.0,
    callback: StepCallback | None = None,
    exact_steps: bool = False,
    refiner: StableDiffusion | None = None,
) -> Tensor:
    """One batch: seeded noise -> (noised init) -> guided, blended denoiser -> sampler -> [B, C, h, w].

    `request` is resolved; `size` (default the request's) is the pass's image size. With a `source`, the
    pass is img2img at `strength`: it cuts the tail of the schedule (A1111's step accounting, `exact_steps`
    for the hires pass). `request.sigmas` overrides the full schedule. With a `refiner` (SDXL) the sampler
    continues on it from `request.refiner.switch_at`.
    """
    family = model.family
    spec = sampling.sampler
    if model.backend is not None:
        _refuse_with_backend(request, batch)
    deep_cache = None  # DeepCache's state is this pass's own: img2img and the hires pass start afresh
    if request.deepcache_interval > 1:
        deep_cache = DeepCache(request.deepcache_interval, request.deepcache_branch)
    denoiser = make_denoiser(model, deep_cache)
    schedule_steps, run = (
        (sampling.steps, sampling.steps)
        if source is None
        else img2img_steps(sampling.steps, strength, exact_steps=exact_steps)
    )
    if request.sigmas:
        sigmas = torch.tensor(request.sigmas, dtype=torch.float32)
    else:
        sigmas = sampling_sigmas(sampling.sampler_name, sampling.schedule, schedule_steps, denoiser.sigmas)
    sigmas = sigmas.float() if source is None else sigmas.float()[-run - 1 :]
    width, height = size or (request.width, request.height)
    f = family.vae.downsampling_factor
    shape = (family.vae.embed_dim, height // f, width // f)
    seeds, device = batch.seeds, model.device
    variation = batch.subseeds if request.subseed_strength else None
    noise = request_noise(seeds, shape, subseeds=variation, subseed_strength=request.subseed_strength)
    noise = noise.to(device)

    init = keep = None
    concat = None if source is None else _expand(source.concat, len(seeds), device)
    if concat is None and family.unet.in_channels == 9:
        concat = unmasked_concat(model, len(seeds), height, width).to(device)
    if source is None:
        x = spec.initial_latent(noise, sigmas[0])
    else:  # x = x0 + sigma * eps at the first sigma of the shortened schedule
        init = _expand(source.latents, len(seeds), device)
        assert init is not None
        if init.shape[1:] != noise.shape[1:]:
            raise ParameterError(f"init latents {tuple(init.shape[1:])} do not match the size {shape}")
        noise_mask = _expand(source.noise_mask, len(seeds), device)
        if noise_mask is not None:  # A1111's "latent noise": the repainted region starts from seed noise
            init = init * (1 - noise_mask) + noise * noise_mask
        keep = _expand(source.keep, len(seeds), device)
        x = init + noise * sigmas[0]

    base: Any = denoiser
    if request.controlnet:  # hint images at this pass's size; the hires pass (exact_steps) rebuilds them
        region = None if source is None else source.region
        units = request_units(request, width, height, device, model.dtype, seed=seeds[0], hires=exact_steps,
                              crop=region)  # fmt: skip
        base = controlled(denoiser, units, sigmas, len(seeds))
    guided = _guided(model, request, sampling, batch, sigmas, concat, (width, height), base)
    if refiner is not None and request.refiner is not None:  # A1111's refiner: one sampler, two models
        refined = _guided(refiner, request, sampling, batch, sigmas, concat, (width, height))
        guided = refiner_switch(guided, refined, denoiser.sigmas, request.refiner.switch_at)
    if init is not None and keep is not None:  # keep is only set together with init
        guided = blend_known(guided, init, keep)
    inputs = {"model_sigmas": denoiser.sigmas}
    options = {**sampling.options, **{name: inputs[name] for name in spec.needs}}
    with torch.inference_mode(), _token_merging(model, request, seeds[0], hires=exact_steps):
        noise_source = _noise_source(spec.noise, seeds, shape, sigmas, model, request.eta_noise_seed_delta)
        latents = spec.function(guided, x, sigmas, callback=callback, noise=noise_source, **options)
    if init is not None and keep is not None:
        latents = latents * (1 - keep) + init * keep
    return latents


def _refuse_with_backend(request: GenerationRequest, batch: Batch) -> None:
    """Options that change the U-Net at run time, which a compiled backend's fixed graph cannot follow."""
    refused = {
        "ControlNet": bool(request.controlnet),
        "DeepCache": request.deepcache_interval > 1,
        "ToMe (token merging)": request.token_merging_ratio > 0,
        "<lora:> tags on the U-Net (bake the LoRA into the model first)": any(
            lora.unet_weight != 0 for lora in batch.loras
        ),
    }
    names = [name for name, on in refused.items() if on]
    if names:
        raise ParameterError(f"{', '.join(names)}: not available with --backend openvino (use torch)")


def _guided(
    model: StableDiffusion,
    request: GenerationRequest,
    sampling: Pass,
    batch: Batch,
    sigmas: Tensor,
    concat: Tensor | None,
    size: tuple[int, int],
    denoiser: Any = None,
) -> Denoiser:
    """The prompts' guided denoiser on `model` (SDXL: with its `vector` for this pass's size)."""
    family = model.family
    clip_skip = request.clip_skip or family.default_clip_skip
    conditioner: PromptConditioner | SDXLConditioner
    if family.is_sdxl:
        numbers = size_numbers(request.size_cond, *size)
        conditioner = SDXLConditioner(model, clip_skip, sampling.steps, numbers)
    else:
        conditioner = PromptConditioner(model, clip_skip, sampling.steps)
    takes_concat = concat is not None and family.unet.in_channels == 9
    return conditioner.denoiser(
        denoiser or make_denoiser(model),
        list(batch.prompts),
        [request.negative_prompt] * len(batch.seeds),
        sigmas,
        request.cfg_scale,
        request.cfg_rescale,
        extra={"concat": concat} if takes_concat and concat is not None else None,
        truncation=CFGTruncation(request.s_min_uncond, request.s_min_uncond_all, request.cfg_cutoff),
    )


class Progress:
    """A tqdm bar over all sampling steps that forwards each step to the user's callback.

    `stopped` turns true when the callback returns True: the sampler returns early and the
    pipeline stops after finishing the current batch. `skipping` (the callback returned `SKIP`) ends
    only the current batch's sampling; the runner clears it before the next batch.
    """

    def __init__(self, total: int, callback: StepCallback | None, enabled: bool) -> None:
        self.bar = tqdm(total=total, disable=not enabled, desc="sampling", unit="step")
        self.callback, self.stopped, self.skipping = callback, False, False

    def __call__(self, info: Any) -> bool:
        self.bar.update(1)
        answer = self.callback(info) if self.callback is not None else None
        if answer == SKIP:
            self.skipping = True
        elif answer:
            self.stopped = True
        return self.stopped or self.skipping

    def close(self) -> None:
        self.bar.close()


def decode_results(
    model: StableDiffusion,
    resolved: ResolvedRequest,
    batch: Batch,
    latents: Tensor,
    *,
    request: GenerationRequest | None = None,
) -> list[GeneratedImage]:
    """Decode a batch; each image carries its own single-image request and infotext.

    `request` (default the resolved one) is what the images' infotexts describe, e.g. without the hires
    part when an interrupted run stopped in the first pass.
    """
    base = request or resolved.request
    f = model.family.vae.downsampling_factor
    width, height = latents.shape[-1] * f, latents.shape[-2] * f
    if not torch.isfinite(latents).all():
        raise NonFiniteError(f"sampling gave NaN/Inf latents (seeds {list(batch.seeds)}): {_cause(model)}")
    tiled = base.use_tiled_vae(width, height) and not base.fast_decode
    if base.fast_decode:
        pixels, retried = decode_latents_fast(model, latents), False
    else:
        pixels, retried = decode_latents(model, latents, tiled=tiled)
    if not torch.isfinite(pixels).all():
        raise NonFiniteError(f"the VAE decoded NaN/Inf pixels (seeds {list(batch.seeds)}): {_cause(model)}")
    results = []
    for i, image in enumerate(tensor_to_pil(pixels)):
        one = replace(resolved.image_request(batch, i), hires=base.hires)
        if tiled and one.tiled_vae is None:
            one = replace(one, tiled_vae=True)
        info = to_infotext(one, {"VAE decoded in fp32": True if retried else None})
        results.append(GeneratedImage(image, batch.seeds[i], info, latents[i].cpu(), one, batch.start + i))
    return results


def _cause(model: StableDiffusion) -> str:
    """Why a result is not finite, for the error: broken weights, else the numbers of the request."""
    for name in ("unet", "text_encoder", "vae"):
        module = getattr(model, name)
        if any(not torch.isfinite(p).all() for p in module.parameters()):
            return f"the model's {name} weights hold NaN/Inf (a damaged or badly merged file); nothing saved"
    return (
        "the weights are finite, so the request overflowed: check prompt weights such as (word:1e30), the "
        f"CFG scale and sampler options; in {model.dtype} try --dtype fp32. Nothing was saved"
    )


def _token_merging(
    model: StableDiffusion, request: GenerationRequest, seed: int, *, hires: bool = False
) -> AbstractContextManager:
    """ToMe on the U-Net for one sampling pass (undone after it), or nothing at ratio 0. The hires pass
    uses the hires ratio when it is not 0 (A1111's `get_token_merging_ratio(for_hr=True)`)."""
    ratio = request.token_merging_ratio
    if hires and request.hires is not None and request.hires.token_merging_ratio:
        ratio = request.hires.token_merging_ratio
    if ratio == 0:
        return nullcontext()
    settings = TokenMerging(
        ratio,
        request.token_merging_max_downsample,
        use_rand=request.token_merging_random,
    )
    generator = torch.Generator().manual_seed(seed) if settings.use_rand else None
    return apply_token_merging(model.unet, settings, generator)


def _noise_source(
    kind: str,
    seeds: Sequence[int],
    shape: tuple[int, ...],
    sigmas: torch.Tensor,
    model: StableDiffusion,
    seed_delta: int = 0,
) -> NoiseSampler | BrownianNoiseSampler | None:
    """Seeded step noise: image i continues the generator of seed i (ancestral) or its Brownian tree (SDE).

    A1111's ENSD (`seed_delta` > 0) re-seeds the step noise with seed + delta instead.
    """
    if kind == "gaussian":
        if seed_delta:
            return NoiseSampler(generators([s + seed_delta for s in seeds]), shape, device=model.device)
        return NoiseSampler(seeds, shape, device=model.device)
    if kind == "brownian":
        positive = sigmas[sigmas > 0]
        return BrownianNoiseSampler(
            [s + seed_delta for s in seeds],
            shape,
            sigma_min=float(positive.min()),
            sigma_max=float(positive.max()),
            device=model.device,
        )
    return None
