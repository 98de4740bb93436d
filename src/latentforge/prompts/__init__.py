"""Prompts as AUTOMATIC1111 reads them (weights, BREAK, editing, alternation) and the text conditioning."""

from latentforge.prompts.conditioning import (
    Chunk,
    conditioning_at_step,
    empty_chunk,
    encode_chunks,
    encode_prompts,
    scheduled_conditioning,
    tokenize_weighted,
)
from latentforge.prompts.parser import parse_attention, prompt_schedules

__all__ = [
    "Chunk",
    "conditioning_at_step",
    "empty_chunk",
    "encode_chunks",
    "encode_prompts",
    "parse_attention",
    "prompt_schedules",
    "scheduled_conditioning",
    "tokenize_weighted",
]
