"""Adapters named by a request, resolved once: `<lora:...>` tags to files, and the embeddings prompts use.

What A1111 writes in the infotext (`extra_networks_lora.py`, `sd_hijack_clip.py`): `Lora hashes` and
`TI hashes`, each `"name: shorthash, name: shorthash"` with `:` and `,` removed from names; LoRA short
hashes are 12 hex digits of kohya's addnet hash (`checkpoints.lora.lora_short_hash`), embedding ones 12
of the file's SHA-256. `--from-png` resolves tags through `Lora hashes` (a file of that hash wins).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from latentforge.checkpoints.lora import lora_short_hash, resolve_lora
from latentforge.prompts.conditioning import EmbeddingVocabulary, tokenize_weighted
from latentforge.prompts.extra_networks import EXTRA_NETWORK, lora_tags, strip_extra_networks
from latentforge.prompts.parser import prompt_schedules

if TYPE_CHECKING:
    from latentforge.model import StableDiffusion


@dataclass(frozen=True)
class ResolvedLora:
    """One `<lora:name:te:unet>` tag resolved to its file (what the runner applies)."""

    name: str
    path: Path
    te_weight: float
    unet_weight: float
    hash: str


def parse_hashes(text: str) -> dict[str, str]:
    """`"a: 0123abcd, b: 4567"` -> {"a": "0123abcd", "b": "4567"} (A1111's `Lora hashes`/`TI hashes`)."""
    pairs = (item.rpartition(":") for item in text.split(",") if ":" in item)
    return {name.strip(): value.strip() for name, _, value in pairs if name.strip()}


def format_hashes(pairs: Iterable[tuple[str, str]]) -> str:
    """The infotext value: each name without `:` and `,` (A1111), first mention first, no repeats."""
    cleaned = {name.replace(":", "").replace(",", ""): value for name, value in pairs}
    return ", ".join(f"{name}: {value}" for name, value in cleaned.items())


def resolve_loras(model: StableDiffusion, prompt: str, want_hashes: str = "") -> tuple[ResolvedLora, ...]:
    """The LoRAs a prompt's tags name, in order, each file found and hashed once (cached on the model)."""
    tags, unsupported = lora_tags(prompt)
    if unsupported:
        warnings.warn(
            "extra-network tags other than <lora:>/<lyco:> are removed and not applied: "
            + ", ".join(unsupported),
            stacklevel=3,
        )
    wanted = parse_hashes(want_hashes)
    resolved = []
    for tag in tags:
        want = wanted.get(tag.name.replace(":", "").replace(",", ""), "")
        path = resolve_lora(tag.name, model.lora_dirs, want_hash=want, hashes=model.lora_hashes)
        if path not in model.lora_hashes:
            model.lora_hashes[path] = lora_short_hash(path)
        resolved.append(ResolvedLora(tag.name, path, tag.te_weight, tag.unet_weight, model.lora_hashes[path]))
    return tuple(resolved)


def lora_hashes(loras: Sequence[ResolvedLora]) -> str:
    return format_hashes((lora.name, lora.hash) for lora in loras)


def warn_negative_tags(negative_prompt: str) -> None:
    """A1111 reads extra networks from the positive prompt only; here a negative one's tags are dropped."""
    tags = EXTRA_NETWORK.findall(negative_prompt)
    if tags:
        found = ", ".join(f"<{kind}:{args}>" for kind, args in tags)
        warnings.warn(
            f"extra-network tags in the negative prompt are removed and not applied: {found}", stacklevel=3
        )


def embedding_hashes(model: StableDiffusion, prompts: Sequence[str], steps: int) -> str:
    """`TI hashes` of the embeddings the prompts use (every prompt-editing variant), first use first."""
    if not model.embeddings:
        return ""
    vocabulary = EmbeddingVocabulary(model.tokenizer, {k: e.count for k, e in model.embeddings.items()})
    used: dict[str, str] = {}
    for prompt in dict.fromkeys(prompts):
        for _, text in prompt_schedules(strip_extra_networks(prompt), steps):
            for chunk in tokenize_weighted(model.tokenizer, text, embeddings=vocabulary):
                for _, name in chunk.fixes:
                    used.setdefault(name, model.embeddings[name].hash)
    return format_hashes(used.items())


def check_embedding_hashes(model: StableDiffusion, want: str) -> None:
    """Warn where an infotext's `TI hashes` name an embedding we lack or have with other contents."""
    for name, value in parse_hashes(want).items():
        have = model.embeddings.get(name)
        if have is None:
            warnings.warn(
                f"the image used embedding {name!r} (hash {value}), which is not loaded: its name is read as "
                "words (pass --embeddings-dir)",
                stacklevel=3,
            )
        elif have.hash != value:
            warnings.warn(
                f"embedding {name!r}: the infotext names hash {value}, {have.path} hashes {have.hash}; "
                "the image will differ",
                stacklevel=3,
            )
