"""SDXL conditioning as A1111 builds it (`modules/sd_models_xl.py`, sgm's GeneralConditioner).

`crossattn`: the prompt through each text encoder with A1111's weighting and 75-token chunking, each at
its penultimate layer without the final LayerNorm, concatenated along channels (768 + 1280 = 2048; the
refiner: bigG alone, 1280). `vector`: the pooled, projected bigG output of the prompt's first chunk, then
the family's numbers (original size, crop top-left, target size as (h, w) pairs; or the refiner's
aesthetic score), each as 256 Fourier features. An all-empty negative prompt is all zeros (A1111's
`force_zero_negative_prompt`, diffusers' `force_zeros_for_empty_prompt`); size numbers stay.
Clip skip applies to CLIP-L only, as A1111 with its "Clip skip SDXL" option; bigG is always penultimate.
Textual inversion: an embedding's `clip_l` vectors go into CLIP-L and its `clip_g` ones into bigG at the
same token positions (A1111's `sd_hijack_clip` per embedder, `textual_inversion_key`); the refiner takes
`clip_g` alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from latentforge.model import StableDiffusion
from latentforge.models.families import ModelFamily
from latentforge.models.text_encoder import CLIPTextModel
from latentforge.models.unet import vector_conditioning
from latentforge.pipelines.prompt_guidance import pad_tokens, step_of
from latentforge.pipelines.request import SizeConditioning
from latentforge.prompts.conditioning import (
    Chunk,
    EmbeddingVocabulary,
    embeds_with_vectors,
    encode_prompts,
    tokenize_weighted,
)
from latentforge.prompts.extra_networks import strip_extra_networks
from latentforge.prompts.parser import prompt_schedules
from latentforge.sampling.common import ConditionedDenoiser, Denoiser
from latentforge.sampling.guidance import CFGDenoiser, CFGTruncation

SDXL_PENULTIMATE = 2  # sgm: layer "penultimate" (bigG), layer_idx 11 of 12 (CLIP-L)
SDXL_ENTRY = tuple[int, torch.Tensor, torch.Tensor]  # (end_step, crossattn [T, C], pooled [P])


@dataclass(frozen=True)
class SizeNumbers:
    """The numbers of one side (cond or uncond) of SDXL's `vector`, as sgm orders them."""

    original_size: tuple[int, int]  # (height, width)
    crop_top_left: tuple[int, int]  # (top, left)
    target_size: tuple[int, int]  # (height, width)
    aesthetic_score: float

    def tensor(self, family: ModelFamily) -> torch.Tensor:
        """[N]: the family's `vector_inputs` in order (6 for the base, 5 for the refiner)."""
        values: list[float] = []
        for name in family.vector_inputs:
            value = getattr(self, name)
            values += [float(v) for v in value] if isinstance(value, tuple) else [float(value)]
        return torch.tensor(values)


class _Tower(nn.Module):
    """One SDXL text encoder as A1111 runs it (penultimate, no final LayerNorm); keeps each row's pooled
    output so the prompt's first chunk can give the `vector` its pooled part. Made per encoding call."""

    def __init__(self, encoder: CLIPTextModel, clip_skip: int) -> None:
        super().__init__()
        self.encoder, self.clip_skip = encoder, clip_skip
        self.text_model = encoder.text_model  # where textual inversion looks up the token embeddings
        self.pooled: dict[tuple[int, ...], torch.Tensor] = {}

    def forward(
        self, input_ids: torch.Tensor, clip_skip: int = 1, token_embeds: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, pooled = self.encoder(
            input_ids, clip_skip=self.clip_skip, token_embeds=token_embeds, final_norm=False
        )
        if token_embeds is None:  # rows with embeddings share placeholder ids: `_pooled` encodes those
            for row, vector in zip(input_ids.tolist(), pooled, strict=True):
                self.pooled[tuple(row)] = vector
        return hidden, pooled


def _encoders(model: StableDiffusion, clip_skip: int) -> list[tuple[_Tower, Any, dict[str, torch.Tensor]]]:
    """(tower, tokenizer, embedding vectors by name) of each encoder; the last one (bigG) gives the pooled
    output. Embeddings without the encoder's part (`load_embedding` refuses those) are left out."""

    def vectors(part: str) -> dict[str, torch.Tensor]:
        return {name: e.sdxl[part] for name, e in model.embeddings.items() if part in e.sdxl}

    if model.text_encoder_2 is None:  # the refiner: bigG alone
        return [(_Tower(model.text_encoder, SDXL_PENULTIMATE), model.tokenizer, vectors("clip_g"))]
    return [
        (_Tower(model.text_encoder, clip_skip), model.tokenizer, vectors("clip_l")),
        (_Tower(model.text_encoder_2, SDXL_PENULTIMATE), model.tokenizer_2, vectors("clip_g")),
    ]


def _vocabulary(tokenizer: Any, embeddings: Mapping[str, torch.Tensor]) -> EmbeddingVocabulary | None:
    return EmbeddingVocabulary(tokenizer, {k: len(v) for k, v in embeddings.items()}) if embeddings else None


def _pooled(tower: _Tower, chunk: Chunk, embeddings: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The pooled bigG output of a prompt's first chunk (encoded again when it holds embeddings)."""
    if not chunk.fixes:
        return tower.pooled[chunk.tokens]
    device = next(tower.encoder.parameters()).device
    input_ids = torch.tensor([chunk.tokens], device=device)
    token_embeds = embeds_with_vectors(tower.encoder, input_ids, [chunk.fixes], embeddings)
    return tower(input_ids, token_embeds=token_embeds)[1][0]


@torch.inference_mode()
def sdxl_schedules(
    model: StableDiffusion, prompts: Sequence[str], steps: int, clip_skip: int
) -> list[list[SDXL_ENTRY]]:
    """Per prompt, its prompt-editing schedule of (end_step, crossattn [T, C], pooled [P]); extra-network
    tags (`<lora:...>`, applied by the runner) are removed from the text first, as for SD1."""
    by_prompt = {p: prompt_schedules(strip_extra_networks(p), steps) for p in dict.fromkeys(prompts)}
    texts = list(dict.fromkeys(text for schedule in by_prompt.values() for _, text in schedule))
    encoders = _encoders(model, clip_skip)
    chunks = max(
        len(tokenize_weighted(tok, text, embeddings=_vocabulary(tok, emb)))
        for _, tok, emb in encoders
        for text in texts
    )
    hidden = [
        encode_prompts(tower, tok, texts, chunks=chunks, embeddings=emb) for tower, tok, emb in encoders
    ]
    crossattn = torch.cat(hidden, dim=-1)  # [len(texts), 77 * chunks, sum of widths]
    tower_g, tok_g, emb_g = encoders[-1]
    vocabulary_g = _vocabulary(tok_g, emb_g)
    pooled = [_pooled(tower_g, tokenize_weighted(tok_g, t, embeddings=vocabulary_g)[0], emb_g) for t in texts]
    entry = {text: (crossattn[i], pooled[i]) for i, text in enumerate(texts)}
    return [[(end, *entry[text]) for end, text in by_prompt[p]] for p in prompts]


def sdxl_at_step(schedules: Sequence[list[SDXL_ENTRY]], step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's (crossattn [B, T, C], pooled [B, P]) at a step; shorter conds repeat their last token."""
    picked = [next((e for e in s if step <= e[0]), s[-1]) for s in schedules]
    length = max(e[1].shape[0] for e in picked)
    crossattn = torch.stack([torch.cat([e[1], e[1][-1:].expand(length - e[1].shape[0], -1)]) for e in picked])
    return crossattn, torch.stack([e[2] for e in picked])


class SDXLConditioner:
    """`PromptConditioner` for SDXL: guided denoisers whose cond holds `crossattn` and `vector`."""

    def __init__(
        self, model: StableDiffusion, clip_skip: int, steps: int, numbers: tuple[SizeNumbers, SizeNumbers]
    ) -> None:
        self.model, self.clip_skip, self.steps, self.numbers = model, clip_skip, steps, numbers

    def denoiser(
        self,
        base: ConditionedDenoiser,
        prompts: list[str],
        negative_prompts: list[str],
        sigmas: torch.Tensor,
        scale: float,
        rescale: float = 0.0,
        extra: Mapping[str, torch.Tensor] | None = None,
        truncation: CFGTruncation | None = None,
    ) -> Denoiser:
        """`denoise(x, sigma)`: the prompts' conditioning at each step, CFG against the negatives
        (`truncation`: which evaluations skip the unconditional pass, as in `PromptConditioner`)."""
        m, family = self.model, self.model.family
        dim = family.unet.vector_embed_dim
        cond_schedules = sdxl_schedules(m, prompts, self.steps, self.clip_skip)
        zero_uncond = all(p == "" for p in negative_prompts)
        uncond_schedules = None
        if scale != 1:
            uncond_schedules = sdxl_schedules(m, negative_prompts, self.steps, self.clip_skip)
        empty = sdxl_schedules(m, [""], 1, self.clip_skip)[0][0][1][None]  # [1, 77, C]: pads chunk counts
        cond_numbers, uncond_numbers = (n.tensor(family)[None] for n in self.numbers)
        sigmas = sigmas.detach().float().cpu()
        extra = dict(extra or {})
        skip = (truncation or CFGTruncation()).counter(len(sigmas) - 1)

        def side(schedules: list[list[SDXL_ENTRY]], step: int, numbers: torch.Tensor, zero: bool):
            crossattn, pooled = sdxl_at_step(schedules, step)
            if zero:  # A1111's force_zero_negative_prompt: the text parts are zeros, the numbers stay
                crossattn, pooled = torch.zeros_like(crossattn), torch.zeros_like(pooled)
            vector = vector_conditioning(pooled.float(), numbers.expand(pooled.shape[0], -1), dim)
            return crossattn, vector

        def guided(x: torch.Tensor, sigma: Any) -> torch.Tensor:
            step = step_of(sigma, sigmas)
            c, c_vec = side(cond_schedules, step, cond_numbers, False)
            if uncond_schedules is None or skip(sigma, step):
                return base(x, sigma, {"crossattn": c, "vector": c_vec, **extra})
            u, u_vec = side(uncond_schedules, step, uncond_numbers, zero_uncond)
            c, u = pad_tokens(c, u, empty)
            cfg = CFGDenoiser(base, {"crossattn": u, "vector": u_vec, **extra}, scale, rescale)
            return cfg(x, sigma, {"crossattn": c, "vector": c_vec, **extra})

        return guided


def refiner_switch(
    base: Denoiser, refiner: Denoiser, model_sigmas: torch.Tensor, switch_at: float
) -> Denoiser:
    """A1111's refiner (`sd_samplers_common.apply_refiner`): the same sampler continues on the refiner
    once (999 - t) / 1000 >= switch_at, t the model timestep nearest the sigma; the switch is one-way."""
    switched = False
    model_sigmas = model_sigmas.double().cpu()

    def denoise(x: torch.Tensor, sigma: Any) -> torch.Tensor:
        nonlocal switched
        if not switched:
            value = float(torch.as_tensor(sigma).max())
            t = int(torch.argmin((model_sigmas - value).abs()))
            switched = (999 - t) / 1000 >= switch_at
        return (refiner if switched else base)(x, sigma)

    return denoise


def size_numbers(
    size_cond: SizeConditioning | None, width: int, height: int
) -> tuple[SizeNumbers, SizeNumbers]:
    """(cond, uncond) numbers of a pass at width x height: unset sizes are the image's (A1111), unset
    negative ones the positive's (diffusers' negative_original_size etc.)."""
    sc = size_cond or SizeConditioning()

    def hw(size: tuple[int, int], default: tuple[int, int]) -> tuple[int, int]:
        return (size[1], size[0]) if any(size) else default  # (width, height) -> sgm's (h, w)

    original, target = hw(sc.original_size, (height, width)), hw(sc.target_size, (height, width))
    cond = SizeNumbers(original, sc.crop_top_left, target, sc.aesthetic_score)
    uncond = SizeNumbers(
        hw(sc.negative_original_size, original),
        sc.crop_top_left if sc.negative_crop_top_left is None else sc.negative_crop_top_left,
        hw(sc.negative_target_size, target),
        sc.negative_aesthetic_score,
    )
    return cond, uncond


def batch_numbers(
    family: ModelFamily,
    original_size: torch.Tensor,
    crop_top_left: torch.Tensor,
    target_size: torch.Tensor,
    aesthetic_score: float = 6.0,
) -> torch.Tensor:
    """[B, N] numbers of a training batch ([B, 2] (h, w) sizes and (top, left) crops, as the bucketed data
    records them) in the family's `vector_inputs` order; `vector_conditioning` turns them into the vector."""
    columns = {
        "original_size": original_size.float(),
        "crop_top_left": crop_top_left.float(),
        "target_size": target_size.float(),
        "aesthetic_score": torch.full((len(original_size), 1), float(aesthetic_score)),
    }
    return torch.cat([columns[name] for name in family.vector_inputs], dim=1)
