"""LoRA + LoRA (exact rank concatenation or SVD re-rank) and LoRA extraction from two checkpoints by SVD.

Per module, with strengths w_i and scales s_i = alpha_i / r_i:
- concatenation: dW = sum_i w_i s_i up_i @ down_i = [w_1 s_1 up_1, w_2 s_2 up_2] @ [down_1; down_2], written
  with alpha = r_1 + r_2 (scale 1): exact, ranks add;
- re-rank: the best rank-k approximation of the sum (Eckart-Young: truncated SVD), up = U_k S_k, down = V_k^T;
  for plain LoRA factors the SVD is taken of an R x R core after QR of the stacked factors (exact, cheap);
- extraction (kohya `networks/extract_lora_from_models.py`): dW = tuned - original per kohya target module,
  truncated SVD to `rank` (`conv_rank` for 3x3 convs), U_k S_k and V_k^T clamped to the `clamp_quantile`
  quantile of their values, alpha = rank; the text encoder is left out when no weight moved more than
  `min_diff`, as kohya does.
The reported error is ||dW - up @ down||_F / ||dW||_F over all written modules, computed from the factors as
written (after clamping and the cast to the output dtype), and the largest per-module value.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from latentforge.checkpoints import lora
from latentforge.checkpoints.hashing import sha256_file
from latentforge.checkpoints.lora_writing import (
    TEXT_PREFIX,
    LoraFactors,
    kohya_metadata,
    kohya_targets,
    module_shapes,
    save_kohya_lora,
)
from latentforge.checkpoints.merge import (
    RECIPE_KEY,
    LoraSpec,
    MergeMismatchError,
    _architecture,
    _meta_modules,
    checkpoint_key,
    detect_family,
)
from latentforge.checkpoints.single_file import UNET_PREFIX
from latentforge.checkpoints.tensor_files import TensorFile
from latentforge.errors import OutputError, ParameterError
from latentforge.models.families import FAMILIES, ModelFamily


@dataclass
class LoraResult:
    """A written LoRA file, its modules and the relative Frobenius error of its factors (0: exact)."""

    path: Path
    modules: int
    relative_error: float
    max_module_error: float
    recipe: dict
    notes: list[str] = field(default_factory=list)


@dataclass
class _Errors:
    """Running sums for the relative Frobenius error over modules."""

    residual: float = 0.0
    total: float = 0.0
    worst: float = 0.0

    def add(self, delta: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> None:
        target = delta.double().flatten(1)
        residual = float((target - up.double().flatten(1) @ down.double().flatten(1)).norm() ** 2)
        norm = float(target.norm() ** 2)
        self.residual, self.total = self.residual + residual, self.total + norm
        self.worst = max(self.worst, math.sqrt(residual / norm) if norm else 0.0)

    @property
    def relative(self) -> float:
        return math.sqrt(self.residual / self.total) if self.total else 0.0


def _check_output(out: Path, overwrite: bool) -> None:
    if out.suffix.lower() != ".safetensors":
        raise ParameterError(f"{out}: LoRA files are written as .safetensors; name the output *.safetensors")
    if out.exists() and not overwrite:
        raise OutputError(f"{out}: exists; pass --overwrite (overwrite=True) to replace it")
    if not out.parent.is_dir():
        raise OutputError(f"{out}: the folder {out.parent} does not exist")


def _quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile's linear interpolation without its 2**24-element limit."""
    ordered = values.flatten().sort().values
    position = q * (ordered.numel() - 1)
    low = int(math.floor(position))
    high = min(low + 1, ordered.numel() - 1)
    return ordered[low] + (position - low) * (ordered[high] - ordered[low])


def _truncate(
    delta: torch.Tensor, rank: int, clamp_quantile: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(up [out, k], down [k, n]): the rank-k truncated SVD of a 2-D `delta`, optionally clamped as kohya."""
    rank = min(rank, *delta.shape)
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    up, down = u[:, :rank] * s[:rank], vh[:rank]
    if clamp_quantile is not None:  # kohya: one bound from the values of both factors, symmetric
        high = _quantile(torch.cat([up.flatten(), down.flatten()]), clamp_quantile)
        up, down = up.clamp(-high, high), down.clamp(-high, high)
    return up, down


def _shape_factors(up: torch.Tensor, down: torch.Tensor, shape: tuple[int, ...]) -> LoraFactors:
    """2-D factors in kohya's form for a weight of `shape` (conv: down [k, in, kh, kw], up [out, k, 1, 1])."""
    if len(shape) == 4:
        return LoraFactors(down.reshape(down.shape[0], *shape[1:]), up[:, :, None, None], float(up.shape[1]))
    return LoraFactors(down, up, float(up.shape[1]))


def _family_of(files: Sequence[Path], family: ModelFamily | None) -> ModelFamily:
    """The given family, else the one every file's cross-attention width points to (SD1 or SD2)."""
    if family is not None:
        return family
    text = _meta_modules(FAMILIES["sd1"])[lora.TEXT]
    hints = {lora.family_hint(lora.read_lora(path, FAMILIES["sd1"], text).modules) for path in files}
    named = {"SD1": "sd1", "SD2": "sd2"}
    if len(hints) == 1 and (hint := hints.pop()) in named:
        return FAMILIES[named[hint]]
    raise ParameterError(
        f"cannot tell which model family the LoRAs are for (found {sorted(map(str, hints))}); "
        f"pass the family ({', '.join(FAMILIES)})"
    )


def merge_loras(
    out: str | Path,
    loras: Sequence[LoraSpec],
    family: ModelFamily | None = None,
    *,
    rank: int | None = None,
    conv_rank: int | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> LoraResult:
    """LoRA files at strengths into one kohya LoRA: ranks concatenated (exact, `rank` None) or SVD to `rank`.

    Any format `checkpoints/lora.py` reads; LoHa/LoKr/full modules need `rank` (their sum has no exact
    low-rank factors to concatenate). `conv_rank` is the rank of 3x3 convs (default `rank`).
    """
    out = Path(out)
    _check_output(out, overwrite)
    if not loras:
        raise ParameterError("LoRA merge: give at least one LoRA file")
    if rank is not None and rank < 1 or conv_rank is not None and conv_rank < 1:
        raise ParameterError("LoRA merge: --rank and --conv-rank must be at least 1")
    family = _family_of([s.path for s in loras], family)
    modules = _meta_modules(family)
    shapes = module_shapes(family)
    groups: dict[str, list[tuple[lora.LoraModule, float, lora.LoraFile]]] = {}
    notes = []
    for spec in loras:
        file = lora.read_lora(spec.path, family, modules[lora.TEXT])
        if not file.kinds:
            raise MergeMismatchError(spec.path, f"none of its modules matches a {family.name!r} model")
        if file.unmatched:
            notes.append(f"{spec.path.name}: {len(file.unmatched)} modules match nothing and were skipped")
        for module in file.modules:
            if module.target is None:
                continue
            if "diff_b" in module.factors:
                raise ParameterError(
                    f"{spec.path}: module {module.source} updates a bias (`diff_b`), which a kohya LoRA "
                    "cannot hold"
                )
            strength = (
                spec.unet if module.component == lora.UNET else (spec.unet if spec.te is None else spec.te)
            )
            prefix = UNET_PREFIX if module.component == lora.UNET else TEXT_PREFIX
            groups.setdefault(prefix + module.target, []).append((module, strength, file))
    errors = _Errors()
    written: dict[str, LoraFactors] = {}
    for name, contributions in groups.items():
        shape = shapes[name]
        plain = all(m.kind == "lora" and "lora_mid.weight" not in m.factors for m, _, _ in contributions)
        if plain:
            up, down = _stacked(contributions)
            if rank is None:
                written[name] = _cast(_shape_factors(up, down, shape), dtype)
                errors.add(up @ down, written[name].up, written[name].down)
                continue
            k = conv_rank if conv_rank is not None and len(shape) == 4 and shape[2:] != (1, 1) else rank
            up_k, down_k = _low_rank_truncate(up, down, k)
            delta = up @ down
        elif rank is None:
            kind = next(
                m.kind for m, _, _ in contributions if m.kind != "lora" or "lora_mid.weight" in m.factors
            )
            raise ParameterError(
                f"LoRA merge: {name} is a {kind} module; only plain LoRA factors concatenate exactly. "
                "Pass a rank (--rank N) to re-rank the sum by SVD"
            )
        else:
            delta = _dense_sum(contributions, modules, family).flatten(1)
            k = conv_rank if conv_rank is not None and len(shape) == 4 and shape[2:] != (1, 1) else rank
            up_k, down_k = _truncate(delta, k)
        written[name] = _cast(_shape_factors(up_k, down_k, shape), dtype)
        errors.add(delta, written[name].up, written[name].down)
    recipe = {
        "type": "latentforge",
        "interp_method": "LoRA concat" if rank is None else "LoRA SVD",
        "loras": [
            {"name": s.path.name, "sha256": sha256_file(s.path), "unet": s.unet, "te": s.te} for s in loras
        ],
        "rank": rank,
        "conv_rank": conv_rank,
        "relative_error": errors.relative,
        "family": family.name,
    }
    top = max(int(f.down.shape[0]) for f in written.values())
    metadata = {**kohya_metadata(family, top, top), RECIPE_KEY: json.dumps(recipe)}
    save_kohya_lora(out, written, family, metadata, dtype=None)
    return LoraResult(out, len(written), errors.relative, errors.worst, recipe, notes)


def _cast(factors: LoraFactors, dtype: torch.dtype | None) -> LoraFactors:
    if dtype is None:
        return factors
    return LoraFactors(factors.down.to(dtype), factors.up.to(dtype), factors.alpha)


def _stacked(
    contributions: Sequence[tuple[lora.LoraModule, float, lora.LoraFile]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """[w_1 s_1 up_1, ...] [out, R] and [down_1; ...] [R, n]: their product is the sum of the updates."""
    ups, downs = [], []
    for module, strength, _ in contributions:
        down = module.factors["lora_down.weight"].float().flatten(1)
        alpha = module.factors.get("alpha")
        scale = 1.0 if alpha is None else float(alpha) / down.shape[0]
        ups.append(module.factors["lora_up.weight"].float().flatten(1) * (strength * scale))
        downs.append(down)
    return torch.cat(ups, dim=1), torch.cat(downs, dim=0)


def _low_rank_truncate(up: torch.Tensor, down: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD of up @ down from QR of each factor and the SVD of the small core (exact)."""
    q1, r1 = torch.linalg.qr(up.double())  # up = Q1 R1, Q1 [out, R]
    q2, r2 = torch.linalg.qr(down.double().T)  # down^T = Q2 R2, Q2 [n, R]
    u, s, vh = torch.linalg.svd(r1 @ r2.T)  # up @ down = Q1 (u s vh) Q2^T
    rank = min(rank, s.numel())
    return ((q1 @ u[:, :rank]) * s[:rank]).float(), (vh[:rank] @ q2.T).float()


def _dense_sum(
    contributions: Sequence[tuple[lora.LoraModule, float, lora.LoraFile]],
    modules: dict[str, torch.nn.Module],
    family: ModelFamily,
) -> torch.Tensor:
    """The summed dense update of one module, through `lora.py`'s own delta math (every kind it reads)."""
    total = None
    for module, strength, file in contributions:
        single = lora.LoraFile(file.path, file.family, [module], file.metadata)
        for delta in lora.lora_deltas(single, modules, strength, strength):
            update = delta.compute().float() * delta.strength
            total = update if total is None else total + update.reshape(total.shape)
    assert total is not None
    return total


def extract_lora(
    out: str | Path,
    original: str | Path,
    tuned: str | Path,
    *,
    rank: int = 4,
    conv_rank: int | None = None,
    clamp_quantile: float | None = 0.99,
    min_diff: float = 0.01,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> LoraResult:
    """The LoRA that takes `original` towards `tuned` (kohya's extraction), streamed tensor by tensor."""
    out = Path(out)
    _check_output(out, overwrite)
    if rank < 1 or (conv_rank is not None and conv_rank < 1):
        raise ParameterError("LoRA extraction: --rank and --conv-rank must be at least 1")
    if clamp_quantile is not None and not 0 < clamp_quantile <= 1:
        raise ParameterError(f"LoRA extraction: clamp quantile must be in (0, 1], got {clamp_quantile}")
    sources = [TensorFile(original), TensorFile(tuned)]
    (family, _), (other, _) = detect_family(sources[0]), detect_family(sources[1])
    if _architecture(family) != _architecture(other):
        raise MergeMismatchError(
            sources[1].path, f"is a {other.name!r} model and the original a {family.name!r} one"
        )
    targets = kohya_targets(family, conv=conv_rank is not None)
    shapes = module_shapes(family)
    written: dict[str, LoraFactors] = {}
    unet_errors, text_errors = _Errors(), _Errors()
    text_moved = 0.0
    for i, name in enumerate(targets):
        is_text = name.startswith(TEXT_PREFIX)
        component = lora.TEXT if is_text else lora.UNET
        ours = name.removeprefix(TEXT_PREFIX if is_text else UNET_PREFIX) + ".weight"
        key, index = checkpoint_key(family, component, ours)
        missing = [s.path for s in sources if key not in s]
        if missing:
            raise MergeMismatchError(missing[0], f"has no {key}, a module kohya's LoRA targets")
        a, b = (s.read(key).float() for s in sources)
        if index is not None:
            a, b = a.chunk(3, dim=0)[index], b.chunk(3, dim=0)[index]
        delta = b - a
        shape = shapes[name]
        if is_text:
            text_moved = max(text_moved, float(delta.abs().max()))
        conv3 = len(shape) == 4 and shape[2:] != (1, 1)
        up, down = _truncate(delta.flatten(1), conv_rank if conv3 and conv_rank else rank, clamp_quantile)
        written[name] = _cast(_shape_factors(up, down, shape), dtype)
        (text_errors if is_text else unet_errors).add(delta, written[name].up, written[name].down)
        if progress:
            progress(i + 1, len(targets))
    notes = []
    errors = unet_errors
    if text_moved <= min_diff:
        notes.append(
            f"the text encoders differ by at most {text_moved:.3g} <= {min_diff}: U-Net only (kohya)"
        )
        written = {k: v for k, v in written.items() if not k.startswith(TEXT_PREFIX)}
    else:
        errors = _Errors(
            unet_errors.residual + text_errors.residual,
            unet_errors.total + text_errors.total,
            max(unet_errors.worst, text_errors.worst),
        )
    recipe = {
        "type": "latentforge",
        "interp_method": "Extract LoRA",
        "primary_model_hash": sha256_file(sources[0].path),
        "secondary_model_hash": sha256_file(sources[1].path),
        "rank": rank,
        "conv_rank": conv_rank,
        "clamp_quantile": clamp_quantile,
        "min_diff": min_diff,
        "relative_error": errors.relative,
        "family": family.name,
    }
    args = {"conv_dim": str(conv_rank), "conv_alpha": str(float(conv_rank))} if conv_rank else {}
    metadata = {**kohya_metadata(family, rank, rank, **args), RECIPE_KEY: json.dumps(recipe)}
    save_kohya_lora(out, written, family, metadata)
    return LoraResult(out, len(written), errors.relative, errors.worst, recipe, notes)
