"""Merge Block Weighted: supermerger's 26 block ids, which checkpoint key belongs to which, and its presets.

Ids (hako-mikan/sd-webui-supermerger `scripts/mergers/mergers.py`, `BLOCKID` and `blockfromkey` for
SD 1.x/2.x): `BASE` (everything outside the U-Net: the text encoder, and the VAE too, as there), `IN00`-`IN11`
(`input_blocks.N`), `M00` (`middle_block`), `OUT00`-`OUT11` (`output_blocks.N`). The U-Net's two loose
ends follow supermerger: `time_embed` goes with `IN00` (it feeds the first ResBlocks, "before input
blocks") and the final `out.` (norm + conv) with `OUT11` ("after output blocks"); `label_emb` (class
conditioned U-Nets) goes with `IN00` as in supermerger's SDXL table.

Presets are supermerger's `mbwpresets_master.txt` names, generated here from their formulas over the 25 U-Net
ids at x = i/24 (BASE 0 unless named); all 38 equal that file's values (as of its commit 2e92b87) to 4e-11,
the rounding of its decimals.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable

from latentforge.errors import ParameterError

BLOCK_IDS = (
    "BASE",
    *(f"IN{i:02d}" for i in range(12)),
    "M00",
    *(f"OUT{i:02d}" for i in range(12)),
)
_UNET = "model.diffusion_model."
_INDEXED = re.compile(r"(input_blocks|output_blocks)\.(\d+)\.")


def block_of(key: str) -> str:
    """The supermerger block id of an original-layout checkpoint key (EMA keys: pass the U-Net key)."""
    if not key.startswith(_UNET):
        return "BASE"
    name = key.removeprefix(_UNET)
    if name.startswith(("time_embed.", "label_emb.")):
        return "IN00"
    if name.startswith("out."):
        return "OUT11"
    if name.startswith("middle_block."):
        return "M00"
    match = _INDEXED.match(name)
    if match is None:
        raise ValueError(f"{key}: no Merge Block Weighted block for this U-Net key")
    return f"{'IN' if match[1] == 'input_blocks' else 'OUT'}{int(match[2]):02d}"


def _smoothstep(x: float) -> float:
    return 3 * x**2 - 2 * x**3


def _fold(v: float) -> float:
    """A triangle wave of period 2: 0..1 rises, 1..2 falls (supermerger's `*k` and `/k` variants)."""
    t = v % 2
    return t if t <= 1 else 2 - t


def _hermite(x: float, m0: float, m1: float) -> float:
    """Cubic Hermite from (0, 0) to (1, 1) with end tangents m0, m1."""
    return (-2 * x**3 + 3 * x**2) + m0 * (x**3 - 2 * x**2 + x) + m1 * (x**3 - x**2)


def _true_hermite(x: float) -> float:
    # supermerger's TRUE_CUBIC_HERMITE is this cubic at i = 1..24 and 0 at IN00
    return 0.0 if x == 0 else 77 / 12 * x**3 - 77 / 8 * x**2 + 25 / 6 * x + 1 / 24


def _times(k: int, x: float) -> float:
    return _fold(k * _smoothstep(x))


def _over(k: int, x: float) -> float:
    return _smoothstep(_fold(k * x))


def _curve(f: Callable[[float], float]) -> tuple[float, ...]:
    return (0.0, *(f(i / 24) for i in range(25)))


def _reverse(weights: tuple[float, ...]) -> tuple[float, ...]:
    return (weights[0], *(1 - w for w in weights[1:]))


def _ranges(*spans: str, value: float = 1.0, **single: float) -> tuple[float, ...]:
    """`value` on the id ranges "IN05-OUT05", `single` ids (M00=0.5) on top; 0 elsewhere."""
    weights = [0.0] * len(BLOCK_IDS)
    for span in spans:
        first, last = span.split("-")
        for i in range(BLOCK_IDS.index(first), BLOCK_IDS.index(last) + 1):
            weights[i] = value
    for name, w in single.items():
        weights[BLOCK_IDS.index(name)] = w
    return tuple(weights)


def _presets() -> dict[str, tuple[float, ...]]:
    p = {
        "GRAD_V": _curve(lambda x: abs(1 - 2 * x)),
        "FLAT_25": _curve(lambda x: 0.25),
        "FLAT_75": _curve(lambda x: 0.75),
        "WRAP08": _ranges("IN00-IN03", "OUT08-OUT11"),
        "WRAP12": _ranges("IN00-IN05", "OUT06-OUT11"),
        "WRAP14": _ranges("IN00-IN06", "OUT05-OUT11"),
        "WRAP16": _ranges("IN00-IN07", "OUT04-OUT11"),
        "MID12_50": _ranges("IN05-OUT05", value=0.5),
        "OUT07": _ranges("OUT05-OUT11"),
        "OUT12": _ranges("OUT00-OUT11"),
        "OUT12_5": _ranges("OUT00-OUT11", M00=0.5),
        "RING08_SOFT": _ranges("IN06-IN08", "OUT03-OUT05", IN05=0.5, IN09=0.5, OUT02=0.5, OUT06=0.5),
        "RING08_5": _ranges("IN06-IN09", "OUT02-OUT05"),
        "RING10_5": _ranges("IN05-IN09", "OUT02-OUT06"),
        "RING10_3": _ranges("IN06-IN10", "OUT01-OUT05"),
        "SMOOTHSTEP": _curve(_smoothstep),
        "COSINE": _curve(lambda x: (1 + math.cos(math.pi * x)) / 2),
        "TRUE_CUBIC_HERMITE": _curve(_true_hermite),
        "FAKE_CUBIC_HERMITE": _curve(lambda x: _hermite(x, 25 / 6, 25 / 6)),
        "ALL_A": (0.0,) * len(BLOCK_IDS),
        "ALL_B": (1.0,) * len(BLOCK_IDS),
    }
    p["GRAD_A"] = _reverse(p["GRAD_V"])
    p["REVERSE-SMOOTHSTEP"] = _reverse(p["SMOOTHSTEP"])
    p["REVERSE_COSINE"] = _reverse(p["COSINE"])
    p["TRUE_REVERSE_CUBIC_HERMITE"] = _reverse(p["TRUE_CUBIC_HERMITE"])
    p["FAKE_REVERSE_CUBIC_HERMITE"] = _reverse(p["FAKE_CUBIC_HERMITE"])
    for k in (2, 3, 4):
        # "*k": k times the curve folded back into [0, 1]; "/k": the curve over k folds of x
        p[f"SMOOTHSTEP*{k}"] = _curve(functools.partial(_times, k))
        p[f"R_SMOOTHSTEP*{k}"] = _reverse(p[f"SMOOTHSTEP*{k}"])
        p[f"SMOOTHSTEP/{k}"] = _curve(functools.partial(_over, k))
        p[f"R_SMOOTHSTEP/{k}"] = _reverse(p[f"SMOOTHSTEP/{k}"])
    return p


def preset_names() -> list[str]:
    return sorted(_presets())


def parse_block_weights(text: str) -> dict[str, float]:
    """26 comma-separated weights (BASE, IN00 .. OUT11) or a supermerger preset name -> {block id: weight}."""
    text = text.strip()
    presets = _presets()
    if "," not in text:
        if text not in presets:
            raise ParameterError(
                f"block weights {text!r}: not 26 comma-separated numbers nor a preset "
                f"({', '.join(sorted(presets))})"
            )
        return dict(zip(BLOCK_IDS, presets[text], strict=True))
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise ParameterError(f"block weights {text!r}: every entry must be a number") from None
    if len(values) != len(BLOCK_IDS):
        raise ParameterError(
            f"block weights: {len(values)} values given, Merge Block Weighted needs {len(BLOCK_IDS)} "
            f"({', '.join(BLOCK_IDS)})"
        )
    if not all(math.isfinite(v) for v in values):
        raise ParameterError(f"block weights {text!r}: NaN or Inf")
    return dict(zip(BLOCK_IDS, values, strict=True))
