"""Parity of our CLIP tokenizer with transformers (SD 1.x, "hf" clean-up) and open_clip (SD 2.x).

transformers >= 5 ships only the Rust-backed `CLIPTokenizer`, which normalizes with NFC where the
python tokenizer of transformers 4.x (the one SD1 checkpoints, ldm, A1111 and diffusers used) ran
`ftfy.fix_text`; both then collapse whitespace and lower-case. So the SD1 reference here is
`hf_fast(ftfy.fix_text(text))`, and prompts that ftfy leaves alone are also checked against the
untouched Rust tokenizer. Where Rust and Python lower-casing differ (final sigma), the reference is
the original OpenAI algorithm in open_clip's `SimpleTokenizer` with the python HF clean-up.
"""

from __future__ import annotations

import ftfy
import open_clip
import pytest
import regex
import torch
from open_clip.tokenizer import SimpleTokenizer
from prompts_corpus import FAST_TOKENIZER_DIVERGENT, HTML, LONG, PROMPTS
from transformers import CLIPTokenizer as HFCLIPTokenizer

from latentforge.models.families import SD1_TEXT, SD2_TEXT
from latentforge.models.tokenizer import CLIPTokenizer
from references import HF_SPECIALS, write_hf_clip_vocab

OPENCLIP_SPECIALS = ("<start_of_text>", "<end_of_text>")


@pytest.fixture(scope="module")
def hf_fast(tmp_path_factory: pytest.TempPathFactory) -> HFCLIPTokenizer:
    """transformers' CLIPTokenizer built from open_clip's BPE file, as vocab.json/merges.txt are derived."""
    return HFCLIPTokenizer.from_pretrained(str(write_hf_clip_vocab(tmp_path_factory.mktemp("clip_vocab"))))


@pytest.fixture(scope="module")
def openai_with_hf_clean() -> SimpleTokenizer:
    """The original OpenAI BPE code, with transformers 4.x's python clean-up (its `_tokenize`)."""
    reference = SimpleTokenizer()
    reference.clean_fn = lambda text: regex.sub(r"\s+", " ", ftfy.fix_text(text)).strip().lower()
    return reference


@pytest.fixture(scope="module")
def sd1() -> CLIPTokenizer:
    return CLIPTokenizer.for_config(SD1_TEXT)


@pytest.fixture(scope="module")
def sd2() -> CLIPTokenizer:
    return CLIPTokenizer.for_config(SD2_TEXT)


def _hf_ids(hf_fast: HFCLIPTokenizer, texts: list[str], *, fix: bool = True) -> torch.Tensor:
    texts = [ftfy.fix_text(t) for t in texts] if fix else texts
    batch = hf_fast(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    return batch.input_ids


def _fragments(prompt: str) -> list[str]:
    """Pieces the A1111 prompt parser hands to `encode`: text between weight syntax characters."""
    return [f for f in regex.split(r"[()\[\]:|,]|\bBREAK\b", prompt) if f]


def test_corpus_is_varied() -> None:
    assert len(PROMPTS) >= 200
    assert "" in PROMPTS and any("\n" in p for p in PROMPTS) and any("BREAK" in p for p in PROMPTS)


def test_sd1_matches_transformers(sd1: CLIPTokenizer, hf_fast: HFCLIPTokenizer) -> None:
    ours = sd1(PROMPTS)
    reference = _hf_ids(hf_fast, PROMPTS)
    mismatched = [p for p, a, b in zip(PROMPTS, ours, reference, strict=True) if not torch.equal(a, b)]
    assert not mismatched, f"{len(mismatched)} prompts differ, e.g. {mismatched[:5]}"


def test_sd1_matches_untouched_transformers_where_ftfy_is_identity(
    sd1: CLIPTokenizer, hf_fast: HFCLIPTokenizer
) -> None:
    prompts = [p for p in PROMPTS if ftfy.fix_text(p) == p]
    assert len(prompts) > 150
    assert torch.equal(sd1(prompts), _hf_ids(hf_fast, prompts, fix=False))


def test_sd1_matches_original_algorithm(sd1: CLIPTokenizer, openai_with_hf_clean: SimpleTokenizer) -> None:
    prompts = [
        p
        for p in PROMPTS + FAST_TOKENIZER_DIVERGENT
        if not any(s in p.lower() for s in HF_SPECIALS + OPENCLIP_SPECIALS)
    ]
    for prompt in prompts:
        assert sd1.encode(prompt) == openai_with_hf_clean.encode(prompt), prompt


def test_rust_lowercase_divergence_is_real(sd1: CLIPTokenizer, hf_fast: HFCLIPTokenizer) -> None:
    """Keeps FAST_TOKENIZER_DIVERGENT honest: each entry really differs in the Rust tokenizer."""
    for prompt in FAST_TOKENIZER_DIVERGENT:
        rust = hf_fast(ftfy.fix_text(prompt), add_special_tokens=False).input_ids
        assert sd1.encode(prompt) != rust, prompt


def test_sd2_matches_open_clip(sd2: CLIPTokenizer) -> None:
    ours = sd2(PROMPTS)
    reference = open_clip.tokenize(PROMPTS)
    assert ours.dtype == reference.dtype
    mismatched = [p for p, a, b in zip(PROMPTS, ours, reference, strict=True) if not torch.equal(a, b)]
    assert not mismatched, f"{len(mismatched)} prompts differ, e.g. {mismatched[:5]}"


def test_long_prompts_are_truncated_like_references(
    sd1: CLIPTokenizer, sd2: CLIPTokenizer, hf_fast: HFCLIPTokenizer
) -> None:
    assert all(len(sd1.encode(p)) > 75 for p in LONG)
    assert torch.equal(sd1(LONG), _hf_ids(hf_fast, LONG))
    assert torch.equal(sd2(LONG), open_clip.tokenize(LONG))


def test_html_clean_up_follows_each_reference(
    sd1: CLIPTokenizer, sd2: CLIPTokenizer, hf_fast: HFCLIPTokenizer
) -> None:
    assert torch.equal(sd1(HTML), _hf_ids(hf_fast, HTML))
    assert torch.equal(sd2(HTML), open_clip.tokenize(HTML))
    # open_clip unescapes after ftfy; ftfy leaves entities alone when the text holds a '<'.
    differing = [
        p
        for p in HTML
        if hf_fast(ftfy.fix_text(p), add_special_tokens=False).input_ids
        != open_clip.tokenizer._tokenizer.encode(p)
    ]
    assert differing and all("<" in p for p in differing)


def test_encode_fragments(
    sd1: CLIPTokenizer, sd2: CLIPTokenizer, hf_fast: HFCLIPTokenizer, openai_with_hf_clean: SimpleTokenizer
) -> None:
    fragments = sorted({f for p in PROMPTS for f in _fragments(p)})
    assert len(fragments) > 200
    for fragment in fragments:
        expected = hf_fast(ftfy.fix_text(fragment), add_special_tokens=False).input_ids
        assert sd1.encode(fragment) == expected, fragment
        assert sd2.encode(fragment) == open_clip.tokenizer._tokenizer.encode(fragment), fragment


def test_special_strings_in_text(sd1: CLIPTokenizer, sd2: CLIPTokenizer, hf_fast: HFCLIPTokenizer) -> None:
    texts = ["a cat <|endoftext|> a dog", "<|startoftext|>x", "x!!<|endoftext|>y", "<end_of_text> z"]
    assert torch.equal(sd1(texts), _hf_ids(hf_fast, texts))
    assert torch.equal(sd2(texts), open_clip.tokenize(texts))
    assert sd1.eos_token_id in sd1.encode(texts[0]) and sd2.eos_token_id in sd2.encode(texts[3])


def test_decode_matches_references(sd1: CLIPTokenizer, hf_fast: HFCLIPTokenizer) -> None:
    reference = open_clip.tokenizer._tokenizer
    for prompt in PROMPTS:
        ids = sd1.encode(prompt)
        if sd1.eos_token_id in ids or sd1.bos_token_id in ids:
            continue
        assert sd1.decode(ids) == hf_fast.decode(ids), prompt
        assert sd1.decode(ids) == reference.decode(ids).strip(), prompt
