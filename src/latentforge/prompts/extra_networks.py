"""A1111's "extra networks" prompt tags: `<lora:name:te:unet>`, found and removed before any parsing.

Rules of A1111 (`modules/extra_networks.py`, `extensions-builtin/Lora/extra_networks_lora.py`):
- a tag is `<kind:arg:arg...>` matching `<(\\w+):([^>]+)>`; every tag is removed from the text the text
  encoder sees, wherever it is (also inside prompt-editing brackets), before attention/editing parsing;
- args are split on `:`; `key=value` args are named, the rest positional: `name`, the text-encoder
  multiplier (default 1), the U-Net multiplier (default: the text-encoder one); `te=`/`unet=` override;
- `dyn` (rank truncation, a 4th positional) is refused;
- `lyco` is an alias of `lora`; other kinds (`hypernet`, ...) are removed and reported as unsupported;
- each tag is one application: the same LoRA twice adds its update twice (weights add up).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from latentforge.errors import ParameterError

EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")  # A1111's re_extra_net
LORA_KINDS = ("lora", "lyco")


@dataclass(frozen=True)
class LoraTag:
    """One `<lora:...>` tag: the file stem it names and its two multipliers."""

    name: str
    te_weight: float
    unet_weight: float

    @property
    def is_zero(self) -> bool:
        return self.te_weight == 0 and self.unet_weight == 0


def strip_extra_networks(prompt: str) -> str:
    """The prompt without its extra-network tags (what the text encoder sees)."""
    return EXTRA_NETWORK.sub("", prompt)


def _weight(text: str, tag: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ParameterError(f"{tag}: multiplier {text!r} is not a finite number (e.g. <lora:name:0.8>)")
    return value


def lora_tags(prompt: str) -> tuple[list[LoraTag], list[str]]:
    """(`<lora:>`/`<lyco:>` tags of the prompt in order, the other tags' text that we do not support)."""
    tags, unsupported = [], []
    for match in EXTRA_NETWORK.finditer(prompt):
        kind, args = match[1], match[2].split(":")
        if kind not in LORA_KINDS:
            unsupported.append(match[0])
            continue
        positional = [a for a in args if len(a.split("=", 2)) != 2]
        named = dict(a.split("=", 1) for a in args if len(a.split("=", 2)) == 2)
        unknown = sorted(set(named) - {"te", "unet"})
        if not positional or not positional[0].strip() or unknown or len(positional) > 3:
            # A1111's 4th positional / `dyn=` truncates the rank (dylora); not supported here
            what = f"unsupported option {unknown[0]}=" if unknown else "no LoRA name"
            what = "more than 3 arguments (dyn rank is not supported)" if len(positional) > 3 else what
            raise ParameterError(f"{match[0]}: {what}; write <lora:NAME:TE_WEIGHT[:UNET_WEIGHT]>")
        te = _weight(positional[1], match[0]) if len(positional) > 1 else 1.0
        te = _weight(named["te"], match[0]) if "te" in named else te
        unet = _weight(positional[2], match[0]) if len(positional) > 2 else te
        unet = _weight(named["unet"], match[0]) if "unet" in named else unet
        tags.append(LoraTag(positional[0], te, unet))
    return tags, unsupported
