"""Checkpoint + checkpoint (+ LoRA) merges on original-layout keys, streamed one tensor at a time.

With A, B, C the three inputs' tensors of one key and a the multiplier (per block with Merge Block
Weighted, `merge_blocks`), as A1111's `modules/extras.py` (`run_modelmerger`) computes them:
- weighted sum:   (1 - a) * A + a * B
- add difference: A + a * (B - C)          (a key C lacks: B - C = 0)
then `+ sum_i s_i * dW_i` for LoRAs baked in (`checkpoints/lora.py` delta math), then a baked VAE replaces
`first_stage_model.*`. Arithmetic is float32, rounded once to the output dtype. A1111's key rules: keys
with "model" in their name are merged, keys A has and B lacks are kept as A has them, keys only B or C
have are dropped, `position_ids` is never merged; an inpainting (9-channel) or instruct-pix2pix
(8-channel) A merged with a 4-channel B mixes the first 4 input channels of `conv_in` and keeps the rest.

The output is written while the inputs are read (`writing.save_safetensors_streamed`): one tensor of
each input is alive at a time, never a whole model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from latentforge.checkpoints import keymap_text, lora
from latentforge.checkpoints.errors import (
    CheckpointError,
    CorruptCheckpointError,
    KeyMismatchError,
    UnknownArchitectureError,
)
from latentforge.checkpoints.exports import read_vae_state_dict
from latentforge.checkpoints.hashing import sha256_file
from latentforge.checkpoints.merge_blocks import BLOCK_IDS, block_of
from latentforge.checkpoints.metadata import METADATA_FAMILY
from latentforge.checkpoints.single_file import (
    EMA_PREFIX,
    TEXT_PREFIXES,
    UNET_PREFIX,
    VAE_PREFIX,
    detect_families,
    split_components,
)
from latentforge.checkpoints.tensor_files import TensorFile, all_finite
from latentforge.checkpoints.writing import save_safetensors_streamed
from latentforge.errors import NonFiniteError, OutputError, ParameterError
from latentforge.models.families import ModelFamily
from latentforge.models.patches import WeightDelta, check_deltas
from latentforge.models.text_encoder import CLIPTextModel
from latentforge.models.unet import UNetModel

Mode = Literal["weighted_sum", "add_difference", "none"]
EmaChoice = Literal["drop", "keep", "use"]
MODES: dict[str, str] = {  # ours -> A1111's `interp_method` in the recipe
    "weighted_sum": "Weighted sum",
    "add_difference": "Add difference",
    "none": "No interpolation",
}
RECIPE_KEY, MODELS_KEY = "sd_merge_recipe", "sd_merge_models"  # A1111's metadata names
SKIP_ON_MERGE = ("cond_stage_model.transformer.text_model.embeddings.position_ids",)  # A1111 too


class MergeMismatchError(CheckpointError):
    """Inputs that cannot be merged: other model families, or tensors of another shape."""


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA to bake in: its file and strengths (te None: the U-Net strength)."""

    path: Path
    unet: float = 1.0
    te: float | None = None


@dataclass
class MergeResult:
    """The written file, its A1111 hash (SHA-256 of the whole file) and the recipe stored in it."""

    path: Path
    sha256: str
    family: str
    recipe: dict
    notes: list[str] = field(default_factory=list)

    @property
    def short_hash(self) -> str:
        return self.sha256[:10]


def legacy_hash(path: Path) -> str:
    """A1111's old 8-digit model hash: SHA-256 of 64 KiB at offset 1 MiB (`sd_models.model_hash`)."""
    with path.open("rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def detect_family(source: TensorFile) -> tuple[ModelFamily, int]:
    """The family of a checkpoint from its shapes alone, and its U-Net's input channels (4, 8 or 9)."""
    meta = source.meta_state_dict()
    conv_in = UNET_PREFIX + "input_blocks.0.0.weight"
    channels = meta[conv_in].shape[1] if conv_in in meta else 4
    if conv_in in meta:  # instruct-pix2pix (8) has no table entry: detect as its 4-channel base
        meta[conv_in] = torch.empty(meta[conv_in].shape[0], 4, *meta[conv_in].shape[2:], device="meta")
    return detect_families(split_components(meta), source.metadata, source.path)[0], channels


def _architecture(family: ModelFamily) -> tuple:
    """What must agree for two checkpoints to merge (not the input channels, not the prediction type)."""
    return (
        dataclasses.replace(family.unet, in_channels=4),
        family.vae,
        family.text_encoder,
        family.text_layout,
    )


def _ema_name(key: str) -> str:
    """LDM's EMA copy of a U-Net key: `model_ema.diffusion_model` + the name without dots."""
    return EMA_PREFIX + key.removeprefix("model.").replace(".", "")


def _mergeable(key: str, dtype: torch.dtype) -> bool:
    return "model" in key and dtype.is_floating_point and key not in SKIP_ON_MERGE


def _meta_modules(family: ModelFamily) -> dict[str, nn.Module]:
    with torch.device("meta"):
        return {lora.UNET: UNetModel(family.unet), lora.TEXT: CLIPTextModel(family.text_encoder)}


def checkpoint_key(family: ModelFamily, component: str, name: str) -> tuple[str, int | None]:
    """Where our parameter `name` lives in the original layout: (key, q/k/v index in a fused tensor)."""
    if component == lora.UNET:
        return UNET_PREFIX + name, None
    if family.text_layout == "hf":
        return TEXT_PREFIXES["hf"] + name, None
    prefix = TEXT_PREFIXES["openclip"]
    match = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
    if match:
        layer, module, param = match.groups()
        if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            index = "qkv".index(module[len("self_attn.")])
            return f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{param}", index
        for ours, theirs in keymap_text._LAYER_RENAMES:
            if module == ours:
                return f"{prefix}transformer.resblocks.{layer}.{theirs}.{param}", None
    raise ParameterError(
        f"a LoRA update of the text encoder's {name} cannot be baked into an SD 2.x checkpoint"
    )


def lora_updates(
    loras: Sequence[LoraSpec], family: ModelFamily, keys: Mapping[str, tuple[int, ...]]
) -> tuple[dict[str, list[tuple[WeightDelta, int | None]]], list[str]]:
    """Each LoRA's deltas by checkpoint key (checked against `keys` shapes before anything is written)."""
    modules = _meta_modules(family)
    updates: dict[str, list[tuple[WeightDelta, int | None]]] = {}
    notes = []
    for spec in loras:
        file = lora.read_lora(spec.path, family, modules[lora.TEXT])
        if not file.kinds:
            hint = lora.family_hint(file.modules)
            raise UnknownArchitectureError(
                spec.path,
                f"none of its {len(file.modules)} modules matches a {family.name!r} model"
                + (f" (it looks like a {hint} LoRA)" if hint else ""),
            )
        deltas = lora.lora_deltas(file, modules, spec.unet, spec.unet if spec.te is None else spec.te)
        problems = check_deltas(modules, deltas)
        if problems:
            raise KeyMismatchError(spec.path, "LoRA", family.name, (), (), problems)
        if file.unmatched:
            notes.append(f"{spec.path.name}: {len(file.unmatched)} modules match nothing and were skipped")
        for delta in deltas:
            key, index = checkpoint_key(family, delta.component, delta.name)
            if key not in keys:
                raise KeyMismatchError(spec.path, "LoRA", family.name, [key], ())
            updates.setdefault(key, []).append((delta, index))
    return updates, notes


def _add_updates(total: torch.Tensor, updates: Sequence[tuple[WeightDelta, int | None]]) -> None:
    for delta, index in updates:
        if delta.strength == 0:
            continue
        update = delta.compute().float()
        target = total if index is None else total.chunk(3, dim=0)[index]  # a view of fused q/k/v rows
        target.add_(update.reshape(target.shape), alpha=delta.strength)


def merge_checkpoints(
    out: str | Path,
    a: str | Path,
    b: str | Path | None = None,
    c: str | Path | None = None,
    *,
    mode: Mode = "weighted_sum",
    alpha: float = 0.5,
    block_weights: Mapping[str, float] | None = None,
    dtype: torch.dtype | None = None,
    bake_vae: str | Path | None = None,
    ema: EmaChoice = "drop",
    discard: str | None = None,
    loras: Sequence[LoraSpec] = (),
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> MergeResult:
    """Merge checkpoints A, B (and C) into `out` (`.safetensors`), see the module docstring for the math.

    `block_weights` ({block id: a}, `merge_blocks.parse_block_weights`) replaces `alpha` per block; `dtype`
    casts floating tensors (None: A's dtypes); `ema`: "drop" the `model_ema.*` copies, "keep" (merge
    them like A1111), or "use" them as each input's U-Net; `discard`: a regex of keys left out (A1111's
    "discard weights"). Nothing is written unless every input checks out.
    """
    out = Path(out)
    if mode not in MODES or ema not in ("drop", "keep", "use"):
        raise ParameterError(f"merge mode {mode!r} / ema {ema!r}: modes {list(MODES)}, ema drop, keep or use")
    needs = {"weighted_sum": 2, "add_difference": 3, "none": 1}[mode]
    given = [Path(p) for p in (a, b, c) if p is not None]
    if len(given) != needs:
        raise ParameterError(f"merge mode {mode!r} takes {needs} checkpoint(s) (A, B, C), {len(given)} given")
    if not (isinstance(alpha, int | float) and -1e6 < alpha < 1e6):
        raise ParameterError(f"alpha must be a finite number, got {alpha!r}")
    weights = dict(block_weights) if block_weights else None
    if weights is not None and set(weights) != set(BLOCK_IDS):
        raise ParameterError(
            f"block weights need exactly the ids {', '.join(BLOCK_IDS)}; got {sorted(weights)}"
        )
    _check_output(out, overwrite)
    try:
        pattern = re.compile(discard) if discard else None
    except re.error as e:
        raise ParameterError(f"discard pattern {discard!r} is not a regular expression ({e})") from None
    sources = [TensorFile(p) for p in given]
    detected = [detect_family(s) for s in sources]
    family, a_channels = detected[0]
    for source, (other, channels) in zip(sources[1:], detected[1:], strict=True):
        if _architecture(other) != _architecture(family):
            raise MergeMismatchError(
                source.path,
                f"is a {other.name!r} model and A ({sources[0].path.name}) a {family.name!r} one: "
                "only checkpoints of one family merge (see `latentforge info`)",
            )
        if channels != 4 and a_channels == 4:
            kind = "inpainting" if channels == 9 else "instruct-pix2pix"
            raise MergeMismatchError(
                source.path,
                f"is an {kind} model ({channels} input channels): A must be the {kind} model "
                "when merging it with a normal one (A1111's rule)",
            )
    plan = _plan(sources, mode, ema, pattern, dtype)
    vae = _read_vae(bake_vae, family, sources[0]) if bake_vae else {}
    updates, notes = lora_updates(loras, family, {k: s for k, (_, s) in plan.items()}) if loras else ({}, [])
    notes += _notes(sources, plan, ema)

    hashes = [sha256_file(s.path) for s in sources]
    recipe = {
        "type": "latentforge",
        "interp_method": MODES[mode],
        "primary_model_hash": hashes[0],
        "secondary_model_hash": hashes[1] if len(hashes) > 1 else None,
        "tertiary_model_hash": hashes[2] if len(hashes) > 2 else None,
        "multiplier": alpha,
        "block_weights": weights,
        "dtype": str(dtype).removeprefix("torch.") if dtype else None,
        "bake_in_vae": Path(bake_vae).name if bake_vae else None,
        "vae_hash": sha256_file(bake_vae) if bake_vae else None,
        "ema": ema,
        "discard_weights": discard,
        "loras": [
            {"name": s.path.name, "sha256": sha256_file(s.path), "unet": s.unet, "te": s.te} for s in loras
        ],
        "is_inpainting": a_channels == 9,
        "is_instruct_pix2pix": a_channels == 8,
        "family": family.name,
    }
    models = {
        h: {"name": s.path.stem, "legacy_hash": legacy_hash(s.path), RECIPE_KEY: s.metadata.get(RECIPE_KEY)}
        for h, s in zip(hashes, sources, strict=True)
    }
    metadata = {"format": "pt", RECIPE_KEY: json.dumps(recipe), MODELS_KEY: json.dumps(models)}
    if METADATA_FAMILY in sources[0].metadata:
        metadata[METADATA_FAMILY] = sources[0].metadata[METADATA_FAMILY]

    ema_keys = {_ema_name(k): k for k in sources[0].names if k.startswith(UNET_PREFIX)}
    done = [0]

    def produce(key: str) -> torch.Tensor:
        done[0] += 1
        if progress:
            progress(done[0], len(plan))
        if key.startswith(VAE_PREFIX) and key.removeprefix(VAE_PREFIX) in vae:  # baked last, as A1111
            return vae[key.removeprefix(VAE_PREFIX)].to(plan[key][0])
        block_alpha = _alpha(key, alpha, weights, ema_keys)
        return _merged(sources, key, mode, block_alpha, ema, plan[key][0], updates.get(key, ()))

    entries = [(key, dt, shape) for key, (dt, shape) in plan.items()]
    sha = save_safetensors_streamed(out, entries, produce, metadata)
    return MergeResult(out, sha, family.name, recipe, notes)


def _check_output(out: Path, overwrite: bool) -> None:
    if out.suffix.lower() != ".safetensors":
        raise ParameterError(f"{out}: merges are written as .safetensors; name the output *.safetensors")
    if out.is_dir():
        raise OutputError(f"{out}: is a folder; give a file name")
    if out.exists() and not overwrite:
        raise OutputError(f"{out}: exists; pass --overwrite (overwrite=True) to replace it")
    if not out.parent.is_dir():
        raise OutputError(f"{out}: the folder {out.parent} does not exist")


def _source_key(key: str, ema: EmaChoice) -> str:
    return _ema_name(key) if ema == "use" and key.startswith(UNET_PREFIX) else key


def _plan(
    sources: Sequence[TensorFile],
    mode: Mode,
    ema: EmaChoice,
    pattern: re.Pattern | None,
    dtype: torch.dtype | None,
) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Output key -> (dtype, shape), with the shapes of every key to be merged checked first."""
    a = sources[0]
    plan, mismatched = {}, []
    for key in a.names:
        if (key.startswith(EMA_PREFIX) and ema != "keep") or (pattern is not None and pattern.search(key)):
            continue
        source_key = _source_key(key, ema)
        for s in sources:
            if source_key not in s:
                if ema == "use" and source_key != key:
                    raise MergeMismatchError(
                        s.path, f"ema='use' but it has no EMA copy of {key}; choose ema='keep' or 'drop'"
                    )
                continue
            if s is a or not _mergeable(key, a.dtype(source_key)):
                continue
            sa, sb = a.shape(source_key), s.shape(source_key)
            # A1111: a 9- (inpainting) or 8-channel (instruct-pix2pix) A with a 4-channel B or C
            wider_a = len(sa) == 4 and sa[:1] + sa[2:] == sb[:1] + sb[2:] and sa[1] in (8, 9) and sb[1] == 4
            if sa != sb and not wider_a:
                mismatched.append(f"{key} {list(sb)} in {s.path.name} vs {list(sa)} in A")
        tensor_dtype = a.dtype(source_key)
        out_dtype = dtype if dtype is not None and tensor_dtype.is_floating_point else tensor_dtype
        plan[key] = (out_dtype, a.shape(source_key))
    if mismatched:
        raise MergeMismatchError(
            sources[1].path, f"{len(mismatched)} tensors differ in shape: {'; '.join(mismatched[:5])}"
        )
    return plan


def _alpha(key: str, alpha: float, weights: Mapping[str, float] | None, ema_keys: Mapping[str, str]) -> float:
    """The multiplier of `key`: its block's with block weights (an EMA copy: its U-Net key's block)."""
    if weights is None:
        return alpha
    return weights[block_of(ema_keys.get(key, key))]


_CHUNK = 1 << 20  # elements per step of the arithmetic: its float32 temporaries stay small and in cache


def _combine(
    a: torch.Tensor, b: torch.Tensor | None, c: torch.Tensor | None, mode: Mode, alpha: float
) -> torch.Tensor:
    """The merge formula on float32 tensors (b None: A's key is not in B; c None: not in C)."""
    if b is None or mode == "none":
        return a
    if mode == "add_difference":
        return a if c is None else a + alpha * (b - c)
    return (1 - alpha) * a + alpha * b


def _merged(
    sources: Sequence[TensorFile],
    key: str,
    mode: Mode,
    alpha: float,
    ema: EmaChoice,
    dtype: torch.dtype,
    updates: Sequence[tuple[WeightDelta, int | None]] = (),
) -> torch.Tensor:
    """One output tensor, in `dtype`, from the inputs' tensors of `key` (and LoRA updates of it)."""
    source_key = _source_key(key, ema)
    a = sources[0].read(source_key, check=False)
    present = [s for s in sources[1:] if source_key in s]
    if mode == "none" or not _mergeable(key, a.dtype) or sources[1] not in present:
        inputs = [a]
        if updates:
            out = a.float()
            _add_updates(out, updates)
            out = out.to(dtype)
        else:
            out = a.to(dtype)
    else:
        b = sources[1].read(source_key, check=False)
        c = sources[2].read(source_key, check=False) if len(sources) == 3 and sources[2] in present else None
        inputs = [a, b] + ([c] if c is not None else [])
        if a.shape != b.shape or updates:  # 9/8-channel conv_in of A with a 4-channel B, or LoRAs: whole
            full = a.float()
            shared = full[:, : b.shape[1]] if a.shape != b.shape else full
            shared.copy_(_combine(shared, b.float(), None if c is None else c.float(), mode, alpha))
            _add_updates(full, updates)
            out = full.to(dtype)
        else:
            out = torch.empty(a.shape, dtype=dtype)
            flat = [t.reshape(-1) for t in (out, *inputs)]
            for i in range(0, a.numel(), _CHUNK):
                part = [t[i : i + _CHUNK].float() for t in flat[1:]]
                flat[0][i : i + _CHUNK] = _combine(
                    part[0], part[1], part[2] if c is not None else None, mode, alpha
                )
    if out.is_floating_point() and not all_finite(out):
        # NaN/Inf in an input propagates into the result: name the file; else the formula overflowed dtype
        for source, tensor in zip([s for s in sources if source_key in s], inputs, strict=False):
            if tensor.is_floating_point() and not all_finite(tensor):
                raise CorruptCheckpointError(
                    source.path, f"{source_key} holds NaN or Inf values; nothing was written"
                )
        raise NonFiniteError(
            f"{key}: the merged values overflow {dtype}; choose a wider --dtype or a smaller alpha"
        )
    return out


def _read_vae(path: str | Path, family: ModelFamily, a: TensorFile) -> dict[str, torch.Tensor]:
    """A VAE to bake in: every tensor must replace one of A's `first_stage_model.*` of the same shape."""
    vae = read_vae_state_dict(path, family)
    wrong = [
        k for k, v in vae.items() if VAE_PREFIX + k not in a or a.shape(VAE_PREFIX + k) != tuple(v.shape)
    ]
    missing = [k for k in a.names if k.startswith(VAE_PREFIX) and k.removeprefix(VAE_PREFIX) not in vae]
    if wrong or missing:
        raise KeyMismatchError(path, "VAE", family.name, missing, [], wrong)
    for key, tensor in vae.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise KeyMismatchError(path, "VAE", family.name, (), (), [f"{key} holds NaN or Inf"])
    return vae


def _notes(sources: Sequence[TensorFile], plan: Mapping[str, object], ema: EmaChoice) -> list[str]:
    """What the A1111 key rules did: A's keys B lacks (kept as A), B's keys A lacks (dropped)."""
    if len(sources) < 2:
        return []
    a, b = sources[0], sources[1]
    only_a = [k for k in plan if _mergeable(k, a.dtype(_source_key(k, ema))) and _source_key(k, ema) not in b]
    only_b = [k for k in b.names if k not in a and not (k.startswith(EMA_PREFIX) and ema != "keep")]
    notes = []
    if only_a:
        notes.append(f"{len(only_a)} tensors are not in B and were kept as A has them (e.g. {only_a[0]})")
    if only_b:
        notes.append(f"{len(only_b)} tensors only B has were dropped (e.g. {only_b[0]})")
    return notes


def read_recipe(path: str | Path) -> dict | None:
    """The merge recipe stored in a `.safetensors` file's metadata (None if it has none)."""
    source = TensorFile(path)
    text = source.metadata.get(RECIPE_KEY)
    if not text:
        return None
    try:
        recipe = json.loads(text)
    except json.JSONDecodeError:
        warnings.warn(f"{path}: unreadable {RECIPE_KEY} metadata", stacklevel=2)
        return None
    return recipe if isinstance(recipe, dict) else None
