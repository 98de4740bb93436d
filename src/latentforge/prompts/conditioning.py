"""Text conditioning from prompts, as A1111's FrozenCLIPEmbedderWithCustomWords builds it.

A prompt is split by `parse_attention` into weighted runs, each run tokenized on its own, and the ids
packed into chunks of `max_length - 2` (75) tokens framed by BOS and EOS (`modules/sd_hijack_clip.py`).
Every chunk goes through the text encoder separately; the hidden states are scaled per token by the
weights and rescaled to the chunk's original mean (the "Original" emphasis of `modules/sd_emphasis.py`),
and the chunks of a prompt are concatenated along the token axis: [B, 77 * n_chunks, C].

Textual-inversion embeddings are found as A1111's `EmbeddingDatabase.find_embedding_at_position`: each
name is tokenized, and wherever its ids appear in a run's ids (longest name first) they are replaced by
the embedding's n vectors, n token positions (placeholder id 0, A1111's), counted in the 75-token chunk
and never split across chunks; the vectors replace the token embeddings at those positions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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


EMBEDDING_PLACEHOLDER = 0  # the id A1111 writes where an embedding's vectors go (`sd_hijack_clip.py`)


@dataclass(frozen=True)
class Chunk:
    """One text-encoder input row: BOS, up to 75 prompt ids, EOS, padding; weights (1.0 off the prompt).

    `fixes` are (row position, embedding name): its vectors replace the token embeddings from there.
    """

    tokens: tuple[int, ...]
    weights: tuple[float, ...]
    fixes: tuple[tuple[int, str], ...] = ()


class EmbeddingVocabulary:
    """Textual-inversion names as token-id sequences, matched longest first (A1111's `ids_lookup`)."""

    def __init__(self, tokenizer: Tokenizer, counts: Mapping[str, int]) -> None:
        self.counts = dict(counts)  # name -> vectors (token positions it takes)
        self.by_first: dict[int, list[tuple[tuple[int, ...], str]]] = {}
        for name in counts:
            ids = tuple(tokenizer.encode(name))
            if ids:
                self.by_first.setdefault(ids[0], []).append((ids, name))
        for entries in self.by_first.values():
            entries.sort(key=lambda entry: len(entry[0]), reverse=True)

    def match(self, ids: Sequence[int], position: int) -> tuple[str, int] | None:
        """(name, ids it spans) of the longest embedding whose ids start at `position`, if any."""
        for candidate, name in self.by_first.get(ids[position], ()):
            if tuple(ids[position : position + len(candidate)]) == candidate:
                return name, len(candidate)
        return None


def _make_chunk(
    tokenizer: Tokenizer, ids: list[int], weights: list[float], fixes: Sequence[tuple[int, str]] = ()
) -> Chunk:
    # A1111 pads with EOS and then (SD2, where pad != EOS) overwrites everything after the first EOS
    # with the pad id; writing EOS once and then the pad id gives the same row for both.
    padding = tokenizer.max_length - 2 - len(ids)
    tokens = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * padding
    return Chunk(tuple(tokens), (1.0, *weights, *[1.0] * (padding + 1)), tuple((i + 1, n) for i, n in fixes))


def empty_chunk(tokenizer: Tokenizer) -> Chunk:
    """The chunk of the empty prompt, used to pad prompts to a common chunk count."""
    return _make_chunk(tokenizer, [], [])


def tokenize_weighted(
    tokenizer: Tokenizer,
    prompt: str,
    *,
    comma_backtrack: int = COMMA_BACKTRACK,
    embeddings: EmbeddingVocabulary | None = None,
) -> list[Chunk]:
    """Token ids and weights of `prompt` in as many 75-token chunks as it needs (never truncated).

    A chunk that fills up moves the words after its last comma to the next chunk if the comma is within
    `comma_backtrack` tokens of the end (0 disables); `BREAK` starts a new chunk; "" gives one chunk.
    An embedding's vectors take one position each and start a new chunk rather than straddle two.
    """
    length = tokenizer.max_length - 2
    comma_ids = tokenizer.encode(",")
    comma = comma_ids[0] if len(comma_ids) == 1 else None
    chunks: list[Chunk] = []
    ids: list[int] = []
    weights: list[float] = []
    fixes: list[tuple[int, str]] = []  # (index in `ids`, embedding name)
    last_comma = -1  # index in `ids` of the last comma of the current chunk

    def close_chunk() -> None:
        nonlocal ids, weights, fixes, last_comma
        chunks.append(_make_chunk(tokenizer, ids, weights, fixes))
        ids, weights, fixes, last_comma = [], [], [], -1

    for text, weight in parse_attention(prompt):
        if text == BREAK and weight == BREAK_WEIGHT:
            close_chunk()
            continue
        tokens = tokenizer.encode(text)
        position = 0
        while position < len(tokens):
            token = tokens[position]
            found = embeddings.match(tokens, position) if embeddings is not None else None
            if found is not None:
                name, spanned = found
                count = embeddings.counts[name] if embeddings is not None else 0
                if len(ids) + count > length:
                    close_chunk()
                fixes.append((len(ids), name))
                ids += [EMBEDDING_PLACEHOLDER] * count
                weights += [weight] * count
                position += spanned
                continue
            position += 1
            if token == comma:
                last_comma = len(ids)
            elif len(ids) == length and last_comma != -1 and len(ids) - last_comma <= comma_backtrack:
                # the chunk is full: carry the words after its last comma over to the next chunk
                cut = last_comma + 1
                moved = ids[cut:], weights[cut:], [(i - cut, n) for i, n in fixes if i >= cut]
                ids, weights, fixes = ids[:cut], weights[:cut], [(i, n) for i, n in fixes if i < cut]
                close_chunk()
                ids, weights, fixes = moved
            if len(ids) == length:
                close_chunk()
            ids.append(token)
            weights.append(weight)
    if ids or not chunks:
        close_chunk()
    return chunks


def _device_of(module: nn.Module) -> torch.device:
    return next((p.device for p in module.parameters()), torch.device("cpu"))


def encode_chunks(
    text_encoder: nn.Module,
    chunks: Sequence[Chunk],
    *,
    clip_skip: int = 1,
    embeddings: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Weighted hidden states [N, 77, C] of N chunks, one encoder batch (identical rows run once).

    `embeddings` maps the names in the chunks' `fixes` to their vectors [n, C].
    """
    unique: dict[tuple[tuple[int, ...], tuple[tuple[int, str], ...]], int] = {}
    index = [unique.setdefault((chunk.tokens, chunk.fixes), len(unique)) for chunk in chunks]
    input_ids = torch.tensor([t for t, _ in unique], dtype=torch.long, device=_device_of(text_encoder))
    if any(fixes for _, fixes in unique):
        token_embeds = embeds_with_vectors(text_encoder, input_ids, [f for _, f in unique], embeddings or {})
        hidden, _pooled = text_encoder(input_ids, clip_skip=clip_skip, token_embeds=token_embeds)
    else:
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


def embeds_with_vectors(
    text_encoder: nn.Module,
    input_ids: torch.Tensor,
    row_fixes: Sequence[tuple[tuple[int, str], ...]],
    embeddings: Mapping[str, torch.Tensor],
) -> torch.Tensor:
    """The token embeddings [U, 77, C] with each fix's vectors written over its positions."""
    table = text_encoder.get_submodule("text_model.embeddings.token_embedding")
    embeds = table(input_ids).clone()  # a copy: the placeholder rows are overwritten in place
    for row, fixes in enumerate(row_fixes):
        for position, name in fixes:
            vectors = embeddings[name].to(embeds)  # [n, C]
            embeds[row, position : position + vectors.shape[0]] = vectors
    return embeds


def encode_prompts(
    text_encoder: nn.Module,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    *,
    clip_skip: int = 1,
    chunks: int | None = None,
    embeddings: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Cross-attention conditioning [B, 77 * n_chunks, C] of `prompts`, all chunks in one encoder batch.

    Args:
        prompts: A1111 syntax with attention weights and BREAK (no prompt editing: see
            `scheduled_conditioning`).
        clip_skip: A1111's "Clip skip"; 1 uses the last layer.
        chunks: chunk count to pad every prompt to with empty-prompt chunks, e.g. the positive prompt's
            count for the negative prompt; default the largest count in `prompts`. Too small raises.
        embeddings: textual-inversion vectors [n, C] by name, used where the name appears.
    """
    if not prompts:
        raise ValueError("encode_prompts needs at least one prompt (use '' for an empty one)")
    counts = {name: len(vectors) for name, vectors in (embeddings or {}).items()}
    vocabulary = EmbeddingVocabulary(tokenizer, counts) if counts else None
    by_prompt = {p: tokenize_weighted(tokenizer, p, embeddings=vocabulary) for p in dict.fromkeys(prompts)}
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
    z = encode_chunks(text_encoder, rows, clip_skip=clip_skip, embeddings=embeddings)  # [B * count, 77, C]
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
    embeddings: Mapping[str, torch.Tensor] | None = None,
) -> list[Schedule]:
    """Per prompt, the (end_step, cond [T, C]) pairs of its prompt-editing schedule.

    Every distinct text is encoded once, all in one batch, so all conds share one chunk count; encode the
    positive and negative prompts in one call (or pass `chunks`) to make them match each other too.
    """
    schedules = {p: prompt_schedules(p, steps, hires_steps=hires_steps) for p in dict.fromkeys(prompts)}
    texts = list(dict.fromkeys(text for schedule in schedules.values() for _, text in schedule))
    conds = encode_prompts(
        text_encoder, tokenizer, texts, clip_skip=clip_skip, chunks=chunks, embeddings=embeddings
    )
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
