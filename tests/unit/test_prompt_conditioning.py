"""Weighted 75-token chunks and the text conditioning built from them (A1111's sd_hijack_clip.py)."""

import re

import pytest
import torch
from torch import nn

from latentforge.models.configs import TextEncoderConfig
from latentforge.models.text_encoder import CLIPTextModel
from latentforge.models.tokenizer import CLIPTokenizer
from latentforge.prompts import (
    Chunk,
    conditioning_at_step,
    empty_chunk,
    encode_prompts,
    scheduled_conditioning,
    tokenize_weighted,
)

BOS, EOS, COMMA = 1, 2, 3


class WordTokenizer:
    """One token per word: "<n>" is id 10 + n, "," is COMMA, any other word 200 + its length."""

    bos_token_id = BOS
    eos_token_id = EOS
    max_length = 77

    def __init__(self, pad_token_id: int = EOS) -> None:
        self.pad_token_id = pad_token_id

    def encode(self, text: str) -> list[int]:
        words = re.findall(r"[^\s,]+|,", text)
        return [COMMA if w == "," else 10 + int(w) if w.isdigit() else 200 + len(w) for w in words]


class StandInEncoder(nn.Module):
    """Token + position embeddings offset from zero (a well-defined mean); records every batch."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.token = nn.Embedding(300, width)
        self.position = nn.Embedding(77, width)
        self.calls: list[tuple[int, int]] = []  # (rows, clip_skip)

    def forward(self, input_ids: torch.Tensor, clip_skip: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls.append((input_ids.shape[0], clip_skip))
        hidden = self.token(input_ids) + self.position.weight + 2.0 + clip_skip  # [B, 77, width]
        return hidden, hidden[:, 0]


def words(first: int, count: int) -> str:
    return " ".join(str(i) for i in range(first, first + count))


def prompt_ids(chunk: Chunk) -> list[int]:
    """The prompt tokens of a chunk: between BOS and the first EOS."""
    tokens = list(chunk.tokens)
    return tokens[1 : tokens.index(EOS)]


# ---- tokenize_weighted ---------------------------------------------------------------------------------
@pytest.mark.parametrize("pad", [EOS, 0])  # SD1 pads with EOS, SD2 (OpenCLIP) with 0
def test_short_prompt_is_one_framed_chunk(pad: int) -> None:
    (chunk,) = tokenize_weighted(WordTokenizer(pad), "0 1 2")
    assert chunk.tokens == (BOS, 10, 11, 12, EOS) + (pad,) * 72
    assert chunk.weights == (1.0,) * 77


def test_empty_prompt_is_one_empty_chunk() -> None:
    tokenizer = WordTokenizer(0)
    assert tokenize_weighted(tokenizer, "") == [empty_chunk(tokenizer)]
    assert empty_chunk(tokenizer).tokens == (BOS, EOS) + (0,) * 75


@pytest.mark.parametrize(("count", "chunks"), [(74, 1), (75, 1), (76, 2), (150, 2), (151, 3), (400, 6)])
def test_75_token_boundaries_and_nothing_truncated(count: int, chunks: int) -> None:
    result = tokenize_weighted(WordTokenizer(), words(0, count))
    assert len(result) == chunks
    assert all(len(c.tokens) == len(c.weights) == 77 for c in result)
    assert [t for c in result for t in prompt_ids(c)] == [10 + i for i in range(count)]


def test_comma_backtrack_moves_the_words_after_the_last_comma() -> None:
    # 70 words, a comma, 10 words: the chunk fills 4 words after the comma, which move to chunk 2.
    first, second = tokenize_weighted(WordTokenizer(), words(0, 70) + " , " + words(70, 10))
    assert prompt_ids(first) == [10 + i for i in range(70)] + [COMMA]
    assert prompt_ids(second) == [10 + i for i in range(70, 80)]
    assert first.tokens[72:] == (EOS,) * 5  # padded after the comma


@pytest.mark.parametrize(("comma_at", "backtrack"), [(30, 20), (70, 0), (70, 4)])
def test_no_backtrack_when_the_comma_is_too_far(comma_at: int, backtrack: int) -> None:
    prompt = words(0, comma_at) + " , " + words(comma_at, 100 - comma_at)
    first, _ = tokenize_weighted(WordTokenizer(), prompt, comma_backtrack=backtrack)
    assert len(prompt_ids(first)) == 75  # a hard split at 75 tokens


def test_backtrack_boundary_is_inclusive() -> None:
    # the comma at index 55 is exactly 20 tokens from the end of a full chunk: it still backtracks
    first, _ = tokenize_weighted(WordTokenizer(), words(0, 55) + " , " + words(55, 40))
    assert prompt_ids(first)[-1] == COMMA and len(prompt_ids(first)) == 56


def test_break_starts_a_new_chunk() -> None:
    result = tokenize_weighted(WordTokenizer(), "0 1 BREAK 2")
    assert [prompt_ids(c) for c in result] == [[10, 11], [12]]
    assert len(tokenize_weighted(WordTokenizer(), "0 BREAK")) == 1  # no empty trailing chunk
    assert len(tokenize_weighted(WordTokenizer(), "BREAK")) == 1
    assert len(tokenize_weighted(WordTokenizer(), words(0, 75) + " BREAK 99")) == 2
    # inside brackets the marker is scaled, so A1111 reads it as the word "BREAK" (id 205 here)
    assert [prompt_ids(c) for c in tokenize_weighted(WordTokenizer(), "(0 BREAK 1)")] == [[10, 205, 11]]


def test_weights_follow_the_attention_syntax() -> None:
    (chunk,) = tokenize_weighted(WordTokenizer(), "(0 1) 2 [3] (4:1.5)")
    assert chunk.weights[:7] == (1.0, 1.1, 1.1, 1.0, 1 / 1.1, 1.5, 1.0)


def test_weights_carry_over_chunk_boundaries() -> None:
    first, second = tokenize_weighted(WordTokenizer(), "(" + words(0, 80) + ")")
    assert first.weights == (1.0,) + (1.1,) * 75 + (1.0,)
    assert second.weights[:7] == (1.0,) + (1.1,) * 5 + (1.0,)


# ---- encode_prompts ------------------------------------------------------------------------------------
def raw_hidden(encoder: StandInEncoder, chunk: Chunk) -> torch.Tensor:
    return encoder(torch.tensor([chunk.tokens]))[0][0]  # [77, C]


def test_weighted_tokens_scale_and_the_chunk_mean_is_restored() -> None:
    tokenizer, encoder = WordTokenizer(), StandInEncoder()
    (chunk,) = tokenize_weighted(tokenizer, "0 (1:1.5) [2]")
    raw = raw_hidden(encoder, chunk)
    cond = encode_prompts(encoder, tokenizer, ["0 (1:1.5) [2]"])[0]  # [77, C]
    weights = torch.tensor(chunk.weights)[:, None]
    expected = raw * weights * (raw.mean() / (raw * weights).mean())
    torch.testing.assert_close(cond, expected)
    torch.testing.assert_close(cond.mean(), raw.mean())
    ratio = cond / raw  # the same factor for every unweighted token, times the weight
    torch.testing.assert_close(ratio[2] / ratio[1], torch.full((8,), 1.5))
    torch.testing.assert_close(ratio[3] / ratio[1], torch.full((8,), 1 / 1.1))
    assert not torch.allclose(ratio[1], torch.ones(8))  # the mean restoration did rescale


def test_unweighted_prompt_is_the_plain_encoder_output() -> None:
    tokenizer, encoder = WordTokenizer(), StandInEncoder()
    (chunk,) = tokenize_weighted(tokenizer, "0 1 2")
    torch.testing.assert_close(encode_prompts(encoder, tokenizer, ["0 1 2"])[0], raw_hidden(encoder, chunk))


def test_mean_is_restored_per_chunk() -> None:
    tokenizer, encoder = WordTokenizer(), StandInEncoder()
    prompt = words(0, 75) + " BREAK (1:2)"
    first, second = tokenize_weighted(tokenizer, prompt)
    cond = encode_prompts(encoder, tokenizer, [prompt])[0]
    assert cond.shape == (154, 8)
    torch.testing.assert_close(cond[:77], raw_hidden(encoder, first))  # untouched by chunk 2's weights
    torch.testing.assert_close(cond[77:].mean(), raw_hidden(encoder, second).mean())


def test_batch_pads_with_empty_chunks_in_one_encoder_batch() -> None:
    tokenizer, encoder = WordTokenizer(), StandInEncoder()
    long, short = words(0, 100), "(5) 6"
    cond = encode_prompts(encoder, tokenizer, [short, long, short], clip_skip=2)
    assert cond.shape == (3, 154, 8)
    assert encoder.calls == [(4, 2)]  # one batch; identical rows (the repeated short prompt) run once
    alone = encode_prompts(encoder, tokenizer, [short], clip_skip=2)[0]
    torch.testing.assert_close(cond[0, :77], alone)  # independent of what else is in the batch
    torch.testing.assert_close(cond[2], cond[0])
    empty = encode_prompts(encoder, tokenizer, [""], clip_skip=2)[0]
    torch.testing.assert_close(cond[0, 77:], empty)


def test_negative_prompt_is_padded_to_the_positive_chunk_count() -> None:
    tokenizer, encoder = WordTokenizer(), StandInEncoder()
    positive = encode_prompts(encoder, tokenizer, [words(0, 200)])
    negative = encode_prompts(encoder, tokenizer, ["9"], chunks=positive.shape[1] // 77)
    assert positive.shape == negative.shape == (1, 231, 8)
    empty = encode_prompts(encoder, tokenizer, [""])[0]
    torch.testing.assert_close(negative[0, 77:154], empty)
    torch.testing.assert_close(negative[0, 154:], empty)


def test_too_few_chunks_raise_instead_of_truncating() -> None:
    with pytest.raises(ValueError, match=r"needs 2 chunks.*chunks>=2"):
        encode_prompts(StandInEncoder(), WordTokenizer(), [words(0, 80)], chunks=1)
    with pytest.raises(ValueError, match="at least one prompt"):
        encode_prompts(StandInEncoder(), WordTokenizer(), [])


# ---- prompt editing ------------------------------------------------------------------------------------
def test_scheduled_conditioning_encodes_each_text_once() -> None:
    tokenizer, encoder = WordTokenizer(), StandInEncoder()
    prompts = ["0 [1:2:3]", "0 [1:2:3]", "0 2"]  # "0 2" is also the edited text at steps 4..10
    schedules = scheduled_conditioning(encoder, tokenizer, prompts, 10)
    assert encoder.calls == [(2, 1)]
    assert [[end for end, _ in s] for s in schedules] == [[3, 10], [3, 10], [10]]
    for text, cond in [("0 1", schedules[0][0][1]), ("0 2", schedules[0][1][1]), ("0 2", schedules[2][0][1])]:
        torch.testing.assert_close(cond, encode_prompts(encoder, tokenizer, [text])[0])


@pytest.mark.parametrize(
    ("step", "texts"),
    [(0, ("0 1", "5")), (3, ("0 1", "5")), (4, ("0 2", "5")), (99, ("0 2", "5"))],  # step <= end_step
)
def test_conditioning_at_step_picks_per_image(step: int, texts: tuple[str, str]) -> None:
    tokenizer, encoder = WordTokenizer(), StandInEncoder()
    schedules = scheduled_conditioning(encoder, tokenizer, ["0 [1:2:3]", "5"], 10)
    expected = encode_prompts(encoder, tokenizer, list(texts))
    torch.testing.assert_close(conditioning_at_step(schedules, step), expected)


def test_alternation_switches_every_step() -> None:
    tokenizer, encoder = WordTokenizer(), StandInEncoder()
    (schedule,) = scheduled_conditioning(encoder, tokenizer, ["[1|2]"], 4)
    one, two = (encode_prompts(encoder, tokenizer, [t]) for t in ("1", "2"))
    # A1111's rule, step <= end_step: step 0 and 1 both use the first entry (end_step 1)
    for step, expected in [(0, one), (1, one), (2, two), (3, one)]:
        torch.testing.assert_close(conditioning_at_step([schedule], step), expected)


def test_schedules_share_a_chunk_count_and_mismatches_repeat_the_last_vector() -> None:
    tokenizer, encoder = WordTokenizer(), StandInEncoder()
    schedules = scheduled_conditioning(encoder, tokenizer, ["0", "[0:" + words(0, 80) + ":2]"], 4)
    assert {cond.shape for s in schedules for _, cond in s} == {(154, 8)}
    short = scheduled_conditioning(encoder, tokenizer, ["0"], 4)
    batch = conditioning_at_step([short[0], schedules[1]], 3)
    assert batch.shape == (2, 154, 8)
    torch.testing.assert_close(batch[0, 77:], short[0][0][1][-1:].expand(77, 8))


# ---- with the real tokenizer and text encoder ----------------------------------------------------------
@pytest.mark.parametrize("pad", [49407, 0])
def test_real_clip_tokenizer_and_encoder(pad: int) -> None:
    config = TextEncoderConfig(pad_token=pad)
    tokenizer, encoder = CLIPTokenizer.for_config(config), CLIPTextModel(config).eval()
    prompt = "a photo of a cat, sitting"
    (chunk,) = tokenize_weighted(tokenizer, prompt)
    assert list(chunk.tokens) == tokenizer.pad(tokenizer.encode(prompt))
    with torch.no_grad():
        plain = encoder(tokenizer([prompt]))[0]
        torch.testing.assert_close(encode_prompts(encoder, tokenizer, [prompt]), plain)
        weighted = encode_prompts(encoder, tokenizer, ["a photo of a (cat:1.5), sitting"])
    cat = 1 + len(tokenizer.encode("a photo of a"))  # BOS, then the first segment's tokens
    ratio = weighted[0] / plain[0]
    torch.testing.assert_close(ratio[cat] / ratio[1], torch.full((32,), 1.5))


def test_real_tokenizer_comma_backtrack() -> None:
    tokenizer = CLIPTokenizer()
    prompt = ", ".join(["red cat"] * 30)  # 3 tokens per "red cat, ": a comma near every chunk end
    chunks = tokenize_weighted(tokenizer, prompt)
    comma = tokenizer.encode(",")[0]
    assert len(chunks) == 2
    assert prompt_ids_real(chunks[0])[-1] == comma and len(prompt_ids_real(chunks[0])) == 75
    # 60 tokens, a comma, 60 tokens: the chunk fills 14 tokens after the comma, which move on
    first, second = tokenize_weighted(tokenizer, "red cat " * 30 + ", " + "blue dog " * 30)
    assert prompt_ids_real(first) == tokenizer.encode("red cat " * 30 + ",")
    assert prompt_ids_real(second) == tokenizer.encode("blue dog " * 30)


def prompt_ids_real(chunk: Chunk) -> list[int]:
    tokens = list(chunk.tokens)
    return tokens[1 : tokens.index(49407)]


class ZeroMeanEncoder(StandInEncoder):
    """Hidden states whose mean is exactly 0, as a fresh LayerNorm (unit weight, zero bias) gives."""

    def forward(self, input_ids: torch.Tensor, clip_skip: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = torch.zeros(input_ids.shape[0], 77, 8)
        hidden[:, :, 0], hidden[:, :, 1] = 1.0, -1.0
        return hidden, hidden[:, 0]


def test_a_chunk_of_zero_mean_keeps_its_scale_instead_of_becoming_nan() -> None:
    tokenizer, encoder = WordTokenizer(), ZeroMeanEncoder()
    for prompt in ("0 1 2", "0 (1:1.5) 2"):
        cond = encode_prompts(encoder, tokenizer, [prompt])[0]
        assert torch.isfinite(cond).all()  # A1111's mean restoration divides 0 by 0 here
    torch.testing.assert_close(
        encode_prompts(encoder, tokenizer, ["0 1 2"])[0], encoder(torch.zeros(1, 77))[0][0]
    )
