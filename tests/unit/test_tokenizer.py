"""Tokenizer ids: specials, padding, truncation, decode, configuration (parity lives in tests/parity)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from latentforge.models.families import SD1_TEXT, SD2_TEXT
from latentforge.models.tokenizer import BOS_TOKEN, EOS_TOKEN, VOCAB_SIZE, CLIPTokenizer, byte_symbols

# CLIP's vocabulary (Radford et al. 2021; SPEC section 1): 49408 ids, the two specials last.
CLIP_VOCAB_SIZE, CLIP_BOS, CLIP_EOS = 49408, 49406, 49407


@pytest.fixture(scope="module")
def tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer()


def test_specials(tokenizer: CLIPTokenizer) -> None:
    assert (VOCAB_SIZE, BOS_TOKEN, EOS_TOKEN) == (CLIP_VOCAB_SIZE, CLIP_BOS, CLIP_EOS)
    specials = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert specials == (CLIP_BOS, CLIP_EOS, CLIP_EOS)
    assert tokenizer.vocab_size == CLIP_VOCAB_SIZE
    assert len(tokenizer.vocab.id_to_token) == CLIP_VOCAB_SIZE
    assert tokenizer.vocab.id_to_token[CLIP_BOS:] == ["<|startoftext|>", "<|endoftext|>"]


def test_byte_symbols_are_a_printable_bijection() -> None:
    symbols = byte_symbols()
    assert len(set(symbols)) == 256
    assert all(s.isprintable() and not s.isspace() for s in symbols)
    assert symbols[ord("a")] == "a" and symbols[ord(" ")] != " "


@pytest.mark.parametrize("pad", [CLIP_EOS, 0])
def test_empty_prompt(pad: int) -> None:
    ids = CLIPTokenizer(pad_token=pad)("")
    assert ids.shape == (1, 77) and ids.dtype == torch.long
    assert ids[0].tolist() == [CLIP_BOS, CLIP_EOS] + [pad] * 75


def test_padding_and_batch(tokenizer: CLIPTokenizer) -> None:
    texts = ["a photo of a cat", "a dog"]
    ids = tokenizer(texts)
    assert ids.shape == (2, 77)
    for row, text in zip(ids.tolist(), texts, strict=True):
        body = tokenizer.encode(text)
        assert row[: len(body) + 2] == [CLIP_BOS, *body, CLIP_EOS]
        assert set(row[len(body) + 2 :]) == {tokenizer.pad_token_id}
    assert torch.equal(tokenizer("a dog")[0], ids[1])


@pytest.mark.parametrize("pad", [CLIP_EOS, 0])
def test_truncation_keeps_eos_last(pad: int) -> None:
    tokenizer = CLIPTokenizer(pad_token=pad)
    text = "a very long prompt " * 40
    body = tokenizer.encode(text)
    assert len(body) > 75
    row = tokenizer(text)[0].tolist()
    assert row == [CLIP_BOS, *body[:75], CLIP_EOS]


def test_exact_fit_is_not_truncated(tokenizer: CLIPTokenizer) -> None:
    fits, over = "cat " * 75, "cat " * 76
    assert len(tokenizer.encode(fits)) == 75
    assert tokenizer(fits)[0, -2].item() == tokenizer.encode("cat")[0]
    assert torch.equal(tokenizer(over), tokenizer(fits))


def test_custom_max_length() -> None:
    tokenizer = CLIPTokenizer(pad_token=0, max_length=6)
    assert tokenizer("a b").tolist() == [[CLIP_BOS, *tokenizer.encode("a b"), CLIP_EOS, 0, 0]]
    assert tokenizer("a b c d e f")[0, -1].item() == CLIP_EOS


def test_encode_has_no_specials_and_is_stable(tokenizer: CLIPTokenizer) -> None:
    first = tokenizer.encode("A Photo of a cat!")
    assert first == tokenizer.encode("a photo   of a CAT!")  # lower-cased, whitespace collapsed
    assert CLIP_BOS not in first and CLIP_EOS not in first
    assert CLIPTokenizer().encode("A Photo of a cat!") == first  # a fresh cache gives the same ids


@pytest.mark.parametrize("text", ["a photo of a cat", "masterpiece best quality", "hello world 1 2 3"])
def test_decode_round_trip(tokenizer: CLIPTokenizer, text: str) -> None:
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.decode(tokenizer(text)[0]) == text


def test_decode_drops_padding() -> None:
    sd2 = CLIPTokenizer(pad_token=0, clean="openclip")
    assert sd2.decode(sd2("a cat")[0]) == "a cat"  # id 0 is "!", padding must not show up


def test_uppercase_special_string() -> None:
    # transformers 4.x python CLIPTokenizer: lower-cased text meets the special alternative of its word
    # regex, and its BPE cache is seeded with the specials, so "<|ENDOFTEXT|>" becomes <|endoftext|>.
    assert CLIPTokenizer().encode("<|ENDOFTEXT|>") == [CLIP_EOS]


def test_for_config() -> None:
    sd1, sd2 = CLIPTokenizer.for_config(SD1_TEXT), CLIPTokenizer.for_config(SD2_TEXT)
    assert (sd1.pad_token_id, sd1.clean, sd1.max_length) == (SD1_TEXT.pad_token, "hf", SD1_TEXT.max_length)
    assert (sd2.pad_token_id, sd2.clean) == (0, "openclip")
    assert CLIPTokenizer.for_config(replace(SD1_TEXT, max_length=16))("").shape == (1, 16)
    with pytest.raises(ValueError, match="vocab_size"):
        CLIPTokenizer.for_config(replace(SD1_TEXT, vocab_size=1000))


def test_bad_arguments_teach() -> None:
    with pytest.raises(ValueError, match="openclip"):
        CLIPTokenizer(clean="bert")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_length"):
        CLIPTokenizer(max_length=1)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        CLIPTokenizer().decode([CLIP_VOCAB_SIZE])
