"""A1111's "infotext": the generation parameters stored in a PNG `parameters` text chunk.

    prompt (may span lines)
    Negative prompt: negative (may span lines)
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, ...

Values holding a comma, colon or newline are written as JSON strings, as A1111 does, so A1111,
ComfyUI and model sites read our images and we read theirs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import regex
from PIL import Image, PngImagePlugin

PNG_KEY = "parameters"
NEGATIVE = "Negative prompt:"
# One `Key: value` pair of the last line; a value is a JSON string or runs to the next comma.
_PARAM = regex.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def quote(value: Any) -> str:
    text = str(value)
    if not any(c in text for c in ",\n:"):
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        try:
            return str(json.loads(text))
        except json.JSONDecodeError:
            return text
    return text


def format_infotext(prompt: str, negative_prompt: str, params: Mapping[str, Any]) -> str:
    """Infotext lines; parameters whose value is None are left out."""
    line = ", ".join(f"{k}: {quote(v)}" for k, v in params.items() if v is not None)
    negative = f"\n{NEGATIVE} {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{line}"


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, parameters) from an infotext; inverse of `format_infotext`."""
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:  # A1111's rule: a parameter line has at least 3 pairs
        lines.append(last)
        last = ""
    prompt: list[str] = []
    negative: list[str] = []
    for line in lines:
        line = line.strip()
        if line.startswith(NEGATIVE):
            negative.append(line[len(NEGATIVE) :].strip())
        elif negative:
            negative.append(line)
        else:
            prompt.append(line)
    params = {k.strip(): unquote(v.strip()) for k, v in _PARAM.findall(last)}
    return "\n".join(prompt), "\n".join(negative), params


def save_png(image: Image.Image, path: str | Path, infotext: str) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_KEY, infotext)
    image.save(path, format="PNG", pnginfo=info)


def read_infotext(path: str | Path) -> str | None:
    """The infotext of a PNG (or another image whose text chunk has one), None if it has none."""
    with Image.open(path) as image:
        value = image.info.get(PNG_KEY)
    return value if isinstance(value, str) else None
