"""Text conditioning from prompts, as A1111's FrozenCLIPEmbedderWithCustomWords builds it.

A prompt is split by `parse_attention` into weighted runs, each run tokenized on its own, and the ids
packed into chunks of `max_length - 2` (75) tokens framed by BOS and EOS (`modules/sd_hijack_clip.py`).
Every chunk goes through the text encoder separately; the hidden states are scaled per token by the
weights and rescaled to the chunk's original mean (the "Original" emphasis of `modules/sd_emphasis.py`),
and the chunks of a prompt are concatenated along the token axis: [B, 77 * n_chunks, C].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from latentforge.prompts.parser import BREAK, BREAK_WEIGHT, parse_attention, prompt_schedules

COMMA_BACKTRACK = 20  # A1111's default opts.comma_padding_backtrack, in tokens

Schedule = list[tuple[int, torch.Tensor]]  # (end_step, cond [T, C]) pairs of one prompt


class Tokenizer(Protocol):
    """What the prompt code needs from a tokenizer (latentforge.models.tokenizer.CLIPTokenizer has it)."""

    @property
    def bos_token_id(self) -> int: ...
    @property
    def eos_token_id(self) -> int: ...
    @property
    def pad_token_id(self) -> int: ...

    max_length: int

    def encode(self, text: str) -> list[int]: ...


@dataclass(frozen=True)
class Chunk:
    """One text-encoder input row: BOS, up to 75 prompt ids, EOS, padding; weights (1.0 off the prompt)."""

    tokens: tuple[int, ...]
    weights: tuple[float, ...]


def _make_chunk(tokenizer: Tokenizer, ids: list[int], weights: list[float]) -> Chunk:
    # A1111 pads with EOS and then (SD2, where pad != EOS) overwrites everything after the first EOS
    # with the pad id; writing EOS once and then the pad id gives the same row for both.
    padding = tokenizer.max_length - 2 - len(ids)
    tokens = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * padding
    return Chunk(tuple(tokens), (1.0, *weights, *[1.0] * (padding + 1)))


def empty_chunk(tokenizer: Tokenizer) -> Chunk:
    """The chunk of the empty prompt, used to pad prompts to a common chunk count."""
    return _make_chunk(tokenizer, [], [])


def tokenize_weighted(
    tokenizer: Tokenizer, prompt: str, *, comma_backtrack: int = COMMA_BACKTRACK
) -> list[Chunk]:
    """Token ids and weights of `prompt` in as many 75-token chunks as it needs (never truncated).

    A chunk that fills up moves the words after its last comma to the next chunk if the comma is within
    `comma_backtrack` tokens of the end (0 disables); `BREAK` starts a new chunk; "" gives one chunk.
    """
    length = tokenizer.max_length - 2
    comma_ids = tokenizer.encode(",")
    comma = comma_ids[0] if len(comma_ids) == 1 else None
    chunks: list[Chunk] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1  # index in `ids` of the last comma of the current chunk

    def close_chunk() -> None:
        nonlocal ids, weights, last_comma
        chunks.append(_make_chunk(tokenizer, ids, weights))
        ids, weights, last_comma = [], [], -1

    for text, weight in parse_attention(prompt):
        if text == BREAK and weight == BREAK_WEIGHT:
            close_chunk()
            continue
        for token in tokenizer.encode(text):
            if token == comma:
                last_comma = len(ids)
            elif len(ids) == length and last_comma != -1 and len(ids) - last_comma <= comma_backtrack:
                # the chunk is full: carry the words after its last comma over to the next chunk
                moved_ids, moved_weights = ids[last_comma + 1 :], weights[last_comma + 1 :]
                ids, weights = ids[: last_comma + 1], weights[: last_comma + 1]
                close_chunk()
                ids, weights = moved_ids, moved_weights
            if len(ids) == length:
                close_chunk()
            ids.append(token)
            weights.append(weight)
    if ids or not chunks:
        close_chunk()
    return chunks


def _device_of(module: nn.Module) -> torch.device:
    return next((p.device for p in module.parameters()), torch.device("cpu"))


def encode_chunks(text_encoder: nn.Module, chunks: Sequence[Chunk], *, clip_skip: int = 1) -> torch.Tensor:
    """Weighted hidden states [N, 77, C] of N chunks, one encoder batch (identical token rows run once)."""
    unique: dict[tuple[int, ...], int] = {}
    index = [unique.setdefault(chunk.tokens, len(unique)) for chunk in chunks]
    input_ids = torch.tensor(list(unique), dtype=torch.long, device=_device_of(text_encoder))
    hidden, _pooled = text_encoder(input_ids, clip_skip=clip_skip)  # [U, 77, C]
    z = hidden[torch.tensor(index, device=hidden.device)].float()  # [N, 77, C]
    weights = torch.tensor([chunk.weights for chunk in chunks], dtype=torch.float32, device=z.device)
    original_mean = z.mean(dim=(1, 2), keepdim=True)
    z = z * weights[..., None]
    # A1111 restores the mean ("likely not correct, but it seems to work well to prevent artifacts").
    # A chunk whose mean is exactly 0 (a LayerNorm output with unit affine: fresh text encoders) keeps
    # its scale; A1111's 0/0 would make the whole prompt NaN.
    new_mean = z.mean(dim=(1, 2), keepdim=True)
    z = z * torch.where(new_mean == 0, torch.ones_like(new_mean), original_mean / new_mean)
    return z.to(hidden.dtype)


def encode_prompts(
    text_encoder: nn.Module,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    *,
    clip_skip: int = 1,
    chunks: int | None = None,
) -> torch.Tensor:
    """Cross-attention conditioning [B, 77 * n_chunks, C] of `prompts`, all chunks in one encoder batch.

    Args:
        prompts: A1111 syntax with attention weights and BREAK (no prompt editing: see
            `scheduled_conditioning`).
        clip_skip: A1111's "Clip skip"; 1 uses the last layer.
        chunks: chunk count to pad every prompt to with empty-prompt chunks, e.g. the positive prompt's
            count for the negative prompt; default the largest count in `prompts`. Too small raises.
    """
    if not prompts:
        raise ValueError("encode_prompts needs at least one prompt (use '' for an empty one)")
    by_prompt = {prompt: tokenize_weighted(tokenizer, prompt) for prompt in dict.fromkeys(prompts)}
    needed = max(len(prompt_chunks) for prompt_chunks in by_prompt.values())
    count = needed if chunks is None else chunks
    if count < needed:
        longest = max(by_prompt, key=lambda p: len(by_prompt[p]))
        raise ValueError(
            f"prompt {longest[:60]!r}... needs {needed} chunks of {tokenizer.max_length - 2} tokens but "
            f"chunks={chunks}; pass chunks>={needed} (prompts are never truncated)"
        )
    padding = empty_chunk(tokenizer)
    rows = [c for p in prompts for c in by_prompt[p] + [padding] * (count - len(by_prompt[p]))]
    z = encode_chunks(text_encoder, rows, clip_skip=clip_skip)  # [B * count, 77, C]
    return z.reshape(len(prompts), count * z.shape[1], z.shape[2])


def scheduled_conditioning(
    text_encoder: nn.Module,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    steps: int,
    clip_skip: int = 1,
    *,
    chunks: int | None = None,
    hires_steps: int | None = None,
) -> list[Schedule]:
    """Per prompt, the (end_step, cond [T, C]) pairs of its prompt-editing schedule.

    Every distinct text is encoded once, all in one batch, so all conds share one chunk count; encode the
    positive and negative prompts in one call (or pass `chunks`) to make them match each other too.
    """
    schedules = {p: prompt_schedules(p, steps, hires_steps=hires_steps) for p in dict.fromkeys(prompts)}
    texts = list(dict.fromkeys(text for schedule in schedules.values() for _, text in schedule))
    conds = encode_prompts(text_encoder, tokenizer, texts, clip_skip=clip_skip, chunks=chunks)
    cond_of = dict(zip(texts, conds, strict=True))
    return [[(end, cond_of[text]) for end, text in schedules[p]] for p in prompts]


def conditioning_at_step(schedules: Sequence[Schedule], step: int) -> torch.Tensor:
    """The batch's conditioning [B, T, C] at 0-based sampling `step` (A1111's counter).

    Each image takes the first entry with step <= end_step (past the end: the last entry). Conds of
    different lengths are padded by repeating their last token vector, as A1111's stack_conds.
    """
    picked = [next((cond for end, cond in s if step <= end), s[-1][1]) for s in schedules]
    length = max(cond.shape[0] for cond in picked)
    return torch.stack([torch.cat([c, c[-1:].expand(length - c.shape[0], -1)]) for c in picked])
