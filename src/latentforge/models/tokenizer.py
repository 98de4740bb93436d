"""CLIP's byte-level BPE tokenizer (Radford et al. 2021), as Stable Diffusion feeds its text encoder.

Vocabulary: 256 byte symbols, the same 256 with the end-of-word mark `</w>`, 48 894 merges and two
specials, `<|startoftext|>` = 49406 and `<|endoftext|>` = 49407: 49 408 ids. A prompt becomes
`[BOS] + ids[: max_length - 2] + [EOS]`, padded to `max_length` (77) with `pad_token`.

Two text clean-up styles, because SD1 and SD2 were trained through different reference tokenizers:
- `"hf"` (SD 1.x: ldm's FrozenCLIPEmbedder, A1111 and diffusers use transformers' python
  `CLIPTokenizer`): `ftfy.fix_text`, whitespace runs collapsed to one space, lower-cased. ftfy
  unescapes HTML entities only when the text holds no `<` (else it takes the text for real HTML).
  The literal strings `<|startoftext|>` / `<|endoftext|>` are split out (case-sensitively) before
  clean-up and map to the special ids. Pads with 49407.
- `"openclip"` (SD 2.x: `open_clip.SimpleTokenizer`): `ftfy.fix_text`, then `html.unescape` twice
  whatever the text holds (`<b>&amp;amp;</b>` -> `<b>&</b>`, which "hf" leaves as is), whitespace
  collapsed, lower-cased. Its special strings are `<start_of_text>` / `<end_of_text>`, found by the
  word regex after clean-up. Pads with 0 (which is also the id of `!`).
"""

from __future__ import annotations

import gzip
import html
from collections.abc import Callable, Iterable, Sequence
from importlib.resources import files
from itertools import pairwise
from typing import TYPE_CHECKING, Literal

import ftfy
import regex
import torch

if TYPE_CHECKING:
    from latentforge.models.configs import TextEncoderConfig

Clean = Literal["hf", "openclip"]

VOCAB_SIZE = 49408
BOS_TOKEN = 49406  # <|startoftext|>
EOS_TOKEN = 49407  # <|endoftext|>
MAX_LENGTH = 77
VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
_NUM_MERGES = VOCAB_SIZE - 2 * 256 - 2  # the .gz holds more merges than CLIP's vocabulary uses
_END_OF_WORD = "</w>"
_CACHE_LIMIT = 100_000  # words; a long-running server must not grow without bound

# The word regex of the original CLIP tokenizer, with each reference's spelling of the specials.
_WORD_TAIL = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_SPECIALS: dict[Clean, tuple[str, str]] = {
    "hf": ("<|startoftext|>", "<|endoftext|>"),
    "openclip": ("<start_of_text>", "<end_of_text>"),
}
_WORD_PATTERNS = {
    style: regex.compile("|".join(regex.escape(s) for s in specials) + "|" + _WORD_TAIL, regex.IGNORECASE)
    for style, specials in _SPECIALS.items()
}
_HF_SPECIAL_SPLIT = regex.compile("(" + "|".join(regex.escape(s) for s in _SPECIALS["hf"]) + ")")
_WHITESPACE = regex.compile(r"\s+")


def _clean_hf(text: str) -> str:
    return _WHITESPACE.sub(" ", ftfy.fix_text(text)).strip().lower()


def _clean_openclip(text: str) -> str:
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


_CLEANERS: dict[Clean, Callable[[str], str]] = {"hf": _clean_hf, "openclip": _clean_openclip}


def byte_symbols() -> list[str]:
    """One printable unicode character per byte value, so that BPE never sees whitespace or controls.

    Printable latin-1 bytes stand for themselves; the other 68 are shifted to code points 256 and up
    (the GPT-2 / CLIP byte-level scheme).
    """
    printable = {
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    }
    symbols: list[str] = []
    shifted = 0
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + shifted))
            shifted += 1
    return symbols


class Vocabulary:
    """The id tables and merge ranks read from the packaged BPE file."""

    def __init__(self, merge_lines: Sequence[str]) -> None:
        self.byte_symbols = byte_symbols()
        self.byte_of_symbol = {s: b for b, s in enumerate(self.byte_symbols)}
        merges = [tuple(line.split()) for line in merge_lines]
        base = sorted(self.byte_symbols)  # ids follow code points: printable bytes first, then shifted ones
        tokens = [*base, *(s + _END_OF_WORD for s in base)]
        tokens += ["".join(m) for m in merges] + list(_SPECIALS["hf"])
        self.id_to_token = tokens
        self.token_to_id = {t: i for i, t in enumerate(tokens)}
        self.merge_rank: dict[tuple[str, ...], int] = {m: i for i, m in enumerate(merges)}

    @classmethod
    def load(cls) -> Vocabulary:
        data = files("latentforge").joinpath("assets", VOCAB_FILE).read_bytes()
        lines = gzip.decompress(data).decode("utf-8").split("\n")
        return cls(lines[1 : _NUM_MERGES + 1])  # line 0 is a version header


class CLIPTokenizer:
    """CLIP BPE tokenizer: `encode` for fragments, `__call__` for padded [B, max_length] id batches.

    Args:
        pad_token: id written after EOS; 49407 for SD 1.x, 0 for SD 2.x (OpenCLIP).
        max_length: context length including BOS and EOS.
        clean: text clean-up style, `"hf"` or `"openclip"` (see the module docstring).
    """

    def __init__(self, pad_token: int = EOS_TOKEN, max_length: int = MAX_LENGTH, clean: Clean = "hf") -> None:
        if clean not in _CLEANERS:
            raise ValueError(f"unknown clean-up style {clean!r}; choose one of {sorted(_CLEANERS)}")
        if max_length < 2:
            raise ValueError(f"max_length must leave room for BOS and EOS, got {max_length}")
        if not 0 <= pad_token < VOCAB_SIZE:
            raise ValueError(f"pad_token must be an id in [0, {VOCAB_SIZE}), got {pad_token}")
        self.max_length = max_length
        self.clean = clean
        self._pad_token = pad_token
        self._clean_text = _CLEANERS[clean]
        self._word_pattern = _WORD_PATTERNS[clean]
        self._special_ids = dict(zip(_SPECIALS[clean], (BOS_TOKEN, EOS_TOKEN), strict=True))
        self._vocab: Vocabulary | None = None
        self._word_cache: dict[str, tuple[int, ...]] = {}

    @classmethod
    def for_config(cls, config: TextEncoderConfig) -> CLIPTokenizer:
        """The tokenizer a text encoder was trained with: OpenCLIP's (SD 2.x) pads with 0, CLIP's with EOS."""
        if config.vocab_size < VOCAB_SIZE:
            raise ValueError(
                f"text encoder vocab_size {config.vocab_size} is smaller than the CLIP tokenizer's "
                f"{VOCAB_SIZE}; use a TextEncoderConfig with vocab_size={VOCAB_SIZE}"
            )
        clean: Clean = "openclip" if config.pad_token == 0 else "hf"
        return cls(pad_token=config.pad_token, max_length=config.max_length, clean=clean)

    @property
    def bos_token_id(self) -> int:
        return BOS_TOKEN

    @property
    def eos_token_id(self) -> int:
        return EOS_TOKEN

    @property
    def pad_token_id(self) -> int:
        return self._pad_token

    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE

    @property
    def vocab(self) -> Vocabulary:
        if self._vocab is None:
            self._vocab = Vocabulary.load()
        return self._vocab

    def encode(self, text: str) -> list[int]:
        """BPE ids of `text` after clean-up, without BOS/EOS and without truncation."""
        if self.clean == "hf":
            ids: list[int] = []
            # transformers splits its added tokens out of the raw text before anything else.
            for i, piece in enumerate(_HF_SPECIAL_SPLIT.split(text)):
                if i % 2:
                    ids.append(self._special_ids[piece])
                elif piece:
                    ids.extend(self._encode_clean(self._clean_text(piece)))
            return ids
        return self._encode_clean(self._clean_text(text))

    def _encode_clean(self, text: str) -> list[int]:
        ids: list[int] = []
        cache = self._word_cache
        for word in self._word_pattern.findall(text):
            word_ids = cache.get(word)
            if word_ids is None:
                if len(cache) >= _CACHE_LIMIT:
                    cache.clear()
                word_ids = cache[word] = self._encode_word(word)
            ids.extend(word_ids)
        return ids

    def _encode_word(self, word: str) -> tuple[int, ...]:
        if word in self._special_ids:
            return (self._special_ids[word],)
        vocab = self.vocab
        symbols = [vocab.byte_symbols[b] for b in word.encode("utf-8")]
        symbols[-1] += _END_OF_WORD
        return tuple(vocab.token_to_id[s] for s in _merge(symbols, vocab.merge_rank))

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Padded ids [B, max_length] (int64): BOS, ids truncated to max_length - 2, EOS, padding."""
        if isinstance(texts, str):
            texts = [texts]
        rows = [self.pad(self.encode(text)) for text in texts]
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), self.max_length)

    def pad(self, ids: Sequence[int]) -> list[int]:
        """[BOS] + ids[: max_length - 2] + [EOS] + padding, `max_length` ids in all."""
        row = [BOS_TOKEN, *ids[: self.max_length - 2], EOS_TOKEN]
        return row + [self._pad_token] * (self.max_length - len(row))

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """Text of `ids`; BOS is skipped and everything from the first EOS on (padding too) is dropped."""
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        vocab = self.vocab
        tokens: list[str] = []
        for token_id in ids:
            if token_id == EOS_TOKEN:
                break
            if token_id == BOS_TOKEN:
                continue
            if not 0 <= token_id < VOCAB_SIZE:
                raise ValueError(f"token id {token_id} is outside the vocabulary [0, {VOCAB_SIZE})")
            tokens.append(vocab.id_to_token[token_id])
        raw = bytes(vocab.byte_of_symbol[c] for c in "".join(tokens))
        return raw.decode("utf-8", errors="replace").replace(_END_OF_WORD, " ").strip()


def _merge(symbols: list[str], merge_rank: dict[tuple[str, ...], int]) -> list[str]:
    """Apply BPE merges: repeatedly join every occurrence of the adjacent pair with the lowest rank."""
    while len(symbols) > 1:
        ranked = [(rank, pair) for pair in pairwise(symbols) if (rank := merge_rank.get(pair)) is not None]
        if not ranked:
            break
        _, (first, second) = min(ranked)
        merged: list[str] = []
        i = 0
        while i < len(symbols):
            if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
                merged.append(first + second)
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols
