"""Prompts -> the guided denoiser a sampler runs: per-step text conditioning plus classifier-free guidance.

Per-step conditioning (A1111's prompt editing, `[a:b:0.5]`) has one channel: the conditioning in force at
a sigma is the schedule entry of the step that sigma belongs to (`step_of`), so every evaluation a
sampler makes, including Heun's and DPM2's intermediate ones, sees the prompt of its step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from latentforge.model import StableDiffusion
from latentforge.prompts.conditioning import conditioning_at_step, encode_prompts, scheduled_conditioning
from latentforge.prompts.extra_networks import strip_extra_networks
from latentforge.sampling.common import ConditionedDenoiser, Denoiser
from latentforge.sampling.guidance import CFGDenoiser, CFGTruncation


def step_of(sigma: torch.Tensor | float, sigmas: torch.Tensor) -> int:
    """The step a (possibly intermediate) sigma belongs to: i when sigmas[i] >= sigma > sigmas[i+1]."""
    value = float(torch.as_tensor(sigma).reshape(-1)[0])
    return int((sigmas[1:] >= value).sum())


def pad_tokens(
    a: torch.Tensor, b: torch.Tensor, empty_chunk: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Give cond and uncond the same number of 77-token chunks by appending empty-prompt chunks (A1111)."""
    chunk = empty_chunk.shape[1]

    def extend(t: torch.Tensor, tokens: int) -> torch.Tensor:
        extra = (tokens - t.shape[1]) // chunk
        return torch.cat([t, empty_chunk.to(t).expand(t.shape[0], -1, -1).repeat(1, extra, 1)], dim=1)

    tokens = max(a.shape[1], b.shape[1])
    return extend(a, tokens), extend(b, tokens)


class PromptConditioner:
    """Encodes prompts once per distinct text and builds the guided denoiser a sampler runs."""

    def __init__(self, model: StableDiffusion, clip_skip: int, steps: int) -> None:
        self.model, self.clip_skip, self.steps = model, clip_skip, steps

    @torch.inference_mode()
    def _schedules(self, prompts: list[str]) -> list[list[tuple[int, torch.Tensor]]]:
        """Extra-network tags (`<lora:...>`, applied by the runner) are removed from the text first."""
        m = self.model
        texts = [strip_extra_networks(p) for p in prompts]
        embeddings = {name: e.vectors for name, e in m.embeddings.items()}
        return scheduled_conditioning(
            self._encoder(), m.tokenizer, texts, self.steps, self.clip_skip, embeddings=embeddings
        )

    def _encoder(self) -> torch.nn.Module:
        """The text encoder, or its compiled stand-in under a backend (`backends/`)."""
        m = self.model
        return m.text_encoder if m.backend is None else m.backend.text_encoder_for(m.text_encoder)

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
        """`denoise(x, sigma)`: the prompts' conditioning at each step, CFG against the negatives.

        `extra` holds conditioning shared by cond and uncond (e.g. the inpainting `concat` channels);
        `truncation` says which evaluations skip the unconditional pass.
        """
        cond_schedules = self._schedules(prompts)
        uncond_schedules = self._schedules(negative_prompts) if scale != 1 else None
        empty: list[torch.Tensor] = []  # the empty prompt's chunk, encoded only when lengths differ

        def empty_chunk() -> torch.Tensor:
            if not empty:
                with torch.inference_mode():
                    m = self.model
                    empty.append(encode_prompts(self._encoder(), m.tokenizer, [""], clip_skip=self.clip_skip))
            return empty[0]

        sigmas = sigmas.detach().float().cpu()
        extra = dict(extra or {})
        skip = (truncation or CFGTruncation()).counter(len(sigmas) - 1)

        def guided(x: torch.Tensor, sigma: Any) -> torch.Tensor:
            step = step_of(sigma, sigmas)
            c = conditioning_at_step(cond_schedules, step)
            if uncond_schedules is None or skip(sigma, step):
                return base(x, sigma, {"crossattn": c, **extra})
            u = conditioning_at_step(uncond_schedules, step)
            if c.shape[1] != u.shape[1]:
                c, u = pad_tokens(c, u, empty_chunk())
            cfg = CFGDenoiser(base, {"crossattn": u, **extra}, scale, rescale)
            return cfg(x, sigma, {"crossattn": c, **extra})

        return guided
