"""LoRA and LyCORIS files read onto our original checkpoint keys, and applied through `models/patches.py`.

Layouts (module names resolved through the generated U-Net key map and our text-encoder names, both
dotted and with kohya's `.` -> `_`):
- kohya sd-scripts / LyCORIS: `lora_unet_<module>.<factor>`, `lora_te_<module>.<factor>`; SDXL files name
  the U-Net in sgm's original spelling (`input_blocks_4_1_...`, sd-scripts' `sdxl_original_unet.py`) and
  the encoders `lora_te1_` (CLIP-L) / `lora_te2_` (bigG; transformers names, as `sdxl_model_util` converts);
- diffusers/PEFT: `unet.<module>.lora_A.weight` / `lora_B`, `text_encoder.<module>...` (and SDXL's
  `text_encoder_2.`), the older
  `.lora.down`/`.lora.up`, `.lora_linear_layer.down` and attention-processor `processor.to_q_lora.down`.
Update `dW` per module, with `s = alpha / r` (1 without alpha) (kohya `networks/lora.py`, LyCORIS `modules/`):
- LoRA / LoCon: `s * up @ down` (conv: down [r, in, k, k], up [out, r, 1, 1]); with `lora_mid` (Tucker)
  `s * einsum(mid, up, down)`; r = down.shape[0];
- LoHa: `s * (w1_a @ w1_b) * (w2_a @ w2_b)` (Hadamard product; Tucker `hada_t1/t2` rebuild each factor);
- LoKr: `s * kron(w1, w2)`, each either full or `a @ b` (w2 may be Tucker `lokr_t2`); r from a factored
  `_b`, s = 1 when both are full (A1111's `network_lokr.py`);
- full: `diff` (weight) and `diff_b` (bias) added as they are.
`dora_scale` (DoRA) and other LyCORIS kinds (OFT, BOFT, GLoRA) are refused by name.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from latentforge.checkpoints.errors import (
    CheckpointError,
    CorruptCheckpointError,
    KeyMismatchError,
    UnknownArchitectureError,
)
from latentforge.checkpoints.keymap_unet import diffusers_key_map
from latentforge.checkpoints.reading import read_state_dict
from latentforge.errors import ParameterError
from latentforge.models.families import ModelFamily
from latentforge.models.patches import PatchHandle, WeightDelta, check_deltas, patch_weights

UNET, TEXT, TEXT2 = "unet", "text_encoder", "text_encoder_2"
TEXT1 = (
    "te1"  # kohya's `lora_te1_`: SDXL's CLIP-L, never an SD1/SD2 text encoder (A1111 maps it only on SDXL)
)

# kohya / LyCORIS factor names (after the module name and a dot); canonical names used below.
_FACTORS = (
    "lora_down.weight",
    "lora_up.weight",
    "lora_mid.weight",
    "alpha",
    "hada_w1_a",
    "hada_w1_b",
    "hada_w2_a",
    "hada_w2_b",
    "hada_t1",
    "hada_t2",
    "lokr_w1",
    "lokr_w1_a",
    "lokr_w1_b",
    "lokr_w2",
    "lokr_w2_a",
    "lokr_w2_b",
    "lokr_t2",
    "diff",
    "diff_b",
    "dora_scale",
)
# Factors of LyCORIS kinds we do not apply: refused by name rather than reported as unknown keys.
_REFUSED = {
    "dora_scale": "DoRA (`dora_scale`)",
    "lora_magnitude_vector": "DoRA (PEFT `lora_magnitude_vector`)",
    "oft_blocks": "OFT",
    "oft_diag": "OFT",
    "oft_R": "BOFT",
    "a1.weight": "GLoRA",
    "b1.weight": "GLoRA",
}
# diffusers/PEFT spellings of a factor -> the canonical kohya name.
_DIFFUSERS_FACTORS = (
    (".lora_A.weight", "lora_down.weight"),
    (".lora_B.weight", "lora_up.weight"),
    (".lora.down.weight", "lora_down.weight"),
    (".lora.up.weight", "lora_up.weight"),
    (".lora_linear_layer.down.weight", "lora_down.weight"),
    (".lora_linear_layer.up.weight", "lora_up.weight"),
    (".lora_magnitude_vector", "lora_magnitude_vector"),
    (".alpha", "alpha"),
)
_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_KOHYA_PREFIXES = (("lora_unet_", UNET), ("lora_te_", TEXT), ("lora_te1_", TEXT1), ("lora_te2_", TEXT2))
_DIFFUSERS_PREFIXES = (("unet.", UNET), ("text_encoder.", TEXT), ("text_encoder_2.", TEXT2))
# Model families by cross-attention context width (what `family_hint` and the family check compare).
_CONTEXT_FAMILIES = {768: "SD1", 1024: "SD2", 2048: "SDXL", 1280: "SDXL refiner"}
_TEXT_ROOTS = ("text_model.", "encoder.layers.")
_UNET_ROOTS = ("down_blocks", "mid_block", "up_blocks", "input_blocks", "middle_block", "output_blocks")


class HasModels(Protocol):
    """What `apply_loras` needs of a `StableDiffusion` (checkpoints may not import model.py)."""

    @property
    def family(self) -> ModelFamily: ...
    @property
    def unet(self) -> nn.Module: ...
    @property
    def text_encoder(self) -> nn.Module: ...
    @property
    def text_encoder_2(self) -> nn.Module | None: ...


@dataclass
class LoraModule:
    """The factors of one patched module, and where it lands in our model (None: matches nothing)."""

    component: str  # as the file names it: "unet", "text_encoder", "te1" (kohya SDXL) or "text_encoder_2"
    source: str  # the module name as the file spells it
    factors: dict[str, torch.Tensor] = field(default_factory=dict)
    target: str | None = None  # our module name
    into: str = ""  # the model component it lands in ("unet", "text_encoder", "text_encoder_2")

    @property
    def kind(self) -> str:
        names = set(self.factors)
        if "hada_w1_a" in names:
            return "loha"
        if names & {"lokr_w1", "lokr_w1_a"}:
            return "lokr"
        if names & {"lora_down.weight", "lora_up.weight", "lora_mid.weight"}:
            return "lora"
        return "full"  # `diff` and/or `diff_b` (a LoRA/LoHa/LoKr module may carry `diff_b` as its bias)


@dataclass
class LoraFile:
    """A LoRA/LyCORIS file resolved against one model family."""

    path: Path
    family: str
    modules: list[LoraModule]
    metadata: dict[str, str]

    @property
    def unmatched(self) -> list[str]:
        return sorted(m.source for m in self.modules if m.target is None)

    @property
    def kinds(self) -> Counter[str]:
        return Counter(m.kind for m in self.modules if m.target is not None)


@dataclass
class LoraReport:
    """What one file did: modules applied per component and kind, and modules that matched nothing."""

    path: Path
    applied: Counter[str]
    unmatched: list[str]
    hash: str

    def summary(self) -> str:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.applied.items()))
        text = f"{self.path.name}: {kinds or 'nothing'} applied"
        if self.unmatched:
            text += f"; {len(self.unmatched)} modules match nothing: {', '.join(self.unmatched[:8])}"
        return text


@dataclass
class LoraHandle:
    """Applied LoRAs: `undo()` (or leaving the `with` block) restores the model bit for bit."""

    patch: PatchHandle
    reports: list[LoraReport]

    def undo(self) -> None:
        self.patch.undo()

    def __enter__(self) -> LoraHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.patch.baked:
            self.patch.undo()


def lora_short_hash(path: str | Path) -> str:
    """A1111's `Lora hashes` entry: first 12 hex digits of the file's hash (`network.py`, `set_hash`).

    For `.safetensors` that is kohya's `addnet_hash_safetensors` (SHA-256 of the bytes after the JSON
    header) unless the metadata carries `sshs_model_hash`; other files hash whole.
    """
    path = Path(path)
    digest = hashlib.sha256()
    with path.open("rb") as f:
        if path.suffix.lower() == ".safetensors":
            size = int.from_bytes(f.read(8), "little")
            _, metadata = read_state_dict(path, keep=lambda key: False)
            if metadata.get("sshs_model_hash"):
                return metadata["sshs_model_hash"][:12]
            f.seek(8 + size)
        else:
            f.seek(0)
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def module_names(module: nn.Module) -> set[str]:
    return {name.rsplit(".", 1)[0] for name, _ in module.named_parameters() if "." in name}


def _lookup_tables(
    family: ModelFamily, text_modules: set[str], text_modules_2: set[str] | None = None
) -> dict[str, dict[str, str]]:
    """Spelling -> our module name, per model component: diffusers and our names, dotted and underscored."""
    unet: dict[str, str] = {}
    for theirs, ours in diffusers_key_map(family.unet).items():
        for name in (theirs.rsplit(".", 1)[0], ours.rsplit(".", 1)[0]):
            unet[name] = ours.rsplit(".", 1)[0]

    # transformers 5 and some PEFT files drop the `text_model.` level of the CLIP names
    def text(names: set[str]) -> dict[str, str]:
        return {spelling: name for name in names for spelling in (name, name.removeprefix("text_model."))}

    components = [(UNET, unet), (TEXT, text(text_modules))]
    if text_modules_2 is not None:
        components.append((TEXT2, text(text_modules_2)))
    tables = {}
    for component, dotted in components:
        table = dict(dotted)
        for name, ours in dotted.items():
            underscored = name.replace(".", "_")
            if table.get(underscored, ours) != ours:  # a kohya name would be ambiguous: never guess
                raise AssertionError(f"{underscored} spells both {table[underscored]} and {ours}")
            table[underscored] = ours
        tables[component] = table
    return tables


def _split_key(key: str) -> tuple[str, str, str] | None:
    """(component, module as spelled, canonical factor) of one file key; None if no layout fits."""
    for prefix, kohya_component in _KOHYA_PREFIXES:
        if key.startswith(prefix):
            module, _, factor = key.partition(".")
            return kohya_component, module.removeprefix(prefix), factor
    component: str | None = None
    rest = key.removeprefix("base_model.model.")
    for prefix, name in _DIFFUSERS_PREFIXES:
        if rest.startswith(prefix):
            component, rest = name, rest.removeprefix(prefix)
            break
    if component is None:
        component = UNET if rest.startswith(_UNET_ROOTS) else TEXT if rest.startswith(_TEXT_ROOTS) else None
    if component is None:
        return None
    if match := _PROCESSOR.search(rest):
        leaf = "to_out.0" if match[1] == "to_out" else match[1]
        return component, f"{rest[: match.start()]}.{leaf}", f"lora_{match[2]}.weight"
    for spelling, factor in _DIFFUSERS_FACTORS:
        if rest.endswith(spelling):
            return component, rest.removesuffix(spelling), factor
    return None


def _context_width(modules: Sequence[LoraModule]) -> int | None:
    """The cross-attention context width a file's `attn2.to_k`/`to_v` factors take (None: no such module)."""
    for m in modules:
        if "attn2" in m.source and ("to_k" in m.source or "to_v" in m.source):
            for name in ("lora_down.weight", "hada_w1_b", "lokr_w2", "lokr_w2_b", "diff"):
                if name in m.factors:
                    return int(m.factors[name].shape[-1])
    return None


def family_hint(modules: Sequence[LoraModule]) -> str | None:
    """Which family the file was trained for, from the cross-attention context width, else from names."""
    width = _context_width(modules)
    if width in _CONTEXT_FAMILIES:
        return _CONTEXT_FAMILIES[width]
    if any(m.component in (TEXT1, TEXT2) for m in modules):
        return "SDXL"
    return None if width is None else f"context width {width}"


def family_label(family: ModelFamily) -> str:
    """The family as `family_hint` names files' families ("SD1", "SDXL", ...; else the table's name)."""
    label = _CONTEXT_FAMILIES.get(family.unet.context_dim)
    if family.is_sdxl:
        return "SDXL refiner" if family.is_refiner else "SDXL"
    return label if label in ("SD1", "SD2") else family.name


def _model_component(family: ModelFamily, component: str) -> str | None:
    """The model component a file's component lands in: `lora_te1_` only on SDXL base (CLIP-L, which
    `text_encoder.` and `lora_te_` also name there), bigG (`lora_te2_`) is the refiner's only encoder."""
    if component == UNET:
        return UNET
    if not family.is_sdxl:
        return TEXT if component == TEXT else None
    if family.is_refiner:
        return TEXT if component == TEXT2 else None
    return {TEXT1: TEXT, TEXT: TEXT, TEXT2: TEXT2}.get(component)


def read_lora(
    path: str | Path, family: ModelFamily, text_encoder: nn.Module, text_encoder_2: nn.Module | None = None
) -> LoraFile:
    """Read a LoRA/LyCORIS file onto our module names for `family` (refusing NaN/Inf and unknown kinds);
    `text_encoder_2` is SDXL base's bigG."""
    path = Path(path)
    tensors, metadata = read_state_dict(path)
    names_2 = module_names(text_encoder_2) if text_encoder_2 is not None else None
    tables = _lookup_tables(family, module_names(text_encoder), names_2)
    modules: dict[tuple[str, str], LoraModule] = {}
    unknown = []
    for key, tensor in tensors.items():
        split = _split_key(key)
        if split is None:
            unknown.append(key)
            continue
        component, source, factor = split
        if factor in _REFUSED:
            raise UnknownArchitectureError(
                path, f"{_REFUSED[factor]} is not supported (key {key}); use a plain LoRA/LoHa/LoKr file"
            )
        if factor not in _FACTORS:
            unknown.append(key)
            continue
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CorruptCheckpointError(path, f"{key} holds NaN or Inf values; the model was not changed")
        module = modules.setdefault((component, source), LoraModule(component, source))
        module.factors[factor] = tensor
    if unknown:
        raise UnknownArchitectureError(
            path, f"{len(unknown)} keys are in no LoRA/LyCORIS layout we read: {', '.join(unknown[:8])}"
        )
    for module in modules.values():
        into = _model_component(family, module.component)
        if into is not None and into in tables:
            module.into, module.target = into, tables[into].get(module.source)
        _check_complete(path, module)
    return LoraFile(path, family.name, list(modules.values()), metadata)


_REQUIRED = {
    "lora": ("lora_down.weight", "lora_up.weight"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
    "full": (),
}


def _check_complete(path: Path, module: LoraModule) -> None:
    kind, names = module.kind, set(module.factors)
    if kind != "full" and "diff" in names:
        raise CorruptCheckpointError(
            path, f"LoRA module {module.source} holds both `diff` and {kind} factors"
        )
    missing = [name for name in _REQUIRED.get(kind, ()) if name not in names]
    if kind == "full" and not names & {"diff", "diff_b"}:
        missing.append("its weights (only " + ", ".join(sorted(names)) + ")")
    if kind == "lokr":
        if "lokr_w1" not in names and not {"lokr_w1_a", "lokr_w1_b"} <= names:
            missing.append("lokr_w1 (or lokr_w1_a and lokr_w1_b)")
        if "lokr_w2" not in names and not {"lokr_w2_a", "lokr_w2_b"} <= names:
            missing.append("lokr_w2 (or lokr_w2_a and lokr_w2_b)")
    if missing:
        raise CorruptCheckpointError(path, f"LoRA module {module.source} lacks {', '.join(missing)}")


def _scale(module: LoraModule, rank: int | None) -> float:
    alpha = module.factors.get("alpha")
    if alpha is None or rank is None:
        return 1.0
    return float(alpha) / rank


def _tucker(core: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """LyCORIS `rebuild_tucker`: core [r, r, k, k] with a [r, out], b [r, in] -> [out, in, k, k]."""
    return torch.einsum("i j k l, j r, i p -> p r k l", core, b, a)


def _lora_delta(f: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    up, down = f["lora_up.weight"].flatten(1), f["lora_down.weight"]
    if "lora_mid.weight" in f:  # LoCon with a Tucker core: down [r, in, 1, 1], up [out, r, 1, 1]
        return torch.einsum("n m k l, i n, m j -> i j k l", f["lora_mid.weight"], up, down.flatten(1))
    return (up @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])  # [out, r] @ [r, in*k*k]


def _loha_delta(f: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    if "hada_t1" in f:
        w1 = _tucker(f["hada_t1"], f["hada_w1_a"], f["hada_w1_b"])
        w2 = _tucker(f["hada_t2"], f["hada_w2_a"], f["hada_w2_b"])
    else:
        w1, w2 = f["hada_w1_a"] @ f["hada_w1_b"], f["hada_w2_a"] @ f["hada_w2_b"]
    return (w1 * w2).reshape(shape)


def _lokr_delta(f: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
    if "lokr_w2" in f:
        w2 = f["lokr_w2"]
    elif "lokr_t2" in f:  # einsum as LyCORIS `make_weight_cp`: t2 [r, r, k, k], a [r, out], b [r, in]
        w2 = torch.einsum("i j k l, i p, j r -> p r k l", f["lokr_t2"], f["lokr_w2_a"], f["lokr_w2_b"])
    else:
        w2 = f["lokr_w2_a"] @ f["lokr_w2_b"]
    if len(shape) == 4:
        w2 = w2.reshape(w2.shape[0], -1, *shape[2:])  # [out2, in2*k*k] -> [out2, in2, k, k]
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2.contiguous()).reshape(shape)  # kron fails on the einsum's strided output


def _rank(module: LoraModule) -> int | None:
    f = module.factors
    if module.kind == "lora":
        return f["lora_down.weight"].shape[0]
    if module.kind == "loha":
        return f["hada_w1_b"].shape[0]
    if module.kind == "lokr":
        for name in ("lokr_w2_b", "lokr_w1_b"):  # A1111 takes w2_b's rank over w1_b's
            if name in f:
                return f[name].shape[0]
    return None


def _delta_shape(module: LoraModule, target: tuple[int, ...]) -> tuple[int, ...]:
    """The shape the file's factors produce (checked against the parameter before anything is computed)."""
    f = module.factors
    if module.kind == "lora":
        up, down = f["lora_up.weight"], f["lora_down.weight"]
        if "lora_mid.weight" in f:
            return (up.shape[0], down.shape[1], *f["lora_mid.weight"].shape[2:])
        return (up.shape[0], *down.shape[1:])
    if module.kind == "loha":
        if "hada_t1" in f:
            return (f["hada_w1_a"].shape[1], f["hada_w1_b"].shape[1], *f["hada_t1"].shape[2:])
        out, cols = f["hada_w1_a"].shape[0], f["hada_w1_b"].shape[1]
    else:  # lokr
        w1 = f.get("lokr_w1")
        out1, in1 = w1.shape if w1 is not None else (f["lokr_w1_a"].shape[0], f["lokr_w1_b"].shape[1])
        if "lokr_w2" in f:
            w2 = f["lokr_w2"].shape
            out2, cols2 = w2[0], int(torch.Size(w2[1:]).numel())
        elif "lokr_t2" in f:
            t2 = f["lokr_t2"].shape
            out2, cols2 = f["lokr_w2_a"].shape[1], f["lokr_w2_b"].shape[1] * t2[2] * t2[3]
        else:
            out2, cols2 = f["lokr_w2_a"].shape[0], f["lokr_w2_b"].shape[1]
        out, cols = out1 * out2, in1 * cols2
    kernel = int(torch.Size(target[2:]).numel())
    if cols % kernel:
        return (out, cols)
    return (out, cols // kernel, *target[2:])


def lora_deltas(lora: LoraFile, modules: dict[str, nn.Module], unet_weight: float, te_weight: float) -> list:
    """`WeightDelta`s of one file; factors stay in the file until each delta is computed."""
    out = []
    params = {name: dict(module.named_parameters()) for name, module in modules.items()}
    for module in lora.modules:
        if module.target is None:
            continue
        strength = unet_weight if module.into == UNET else te_weight
        component_params = params[module.into]
        if "diff_b" in module.factors:  # a bias update, of a full module or next to a low-rank weight update
            bias = module.factors["diff_b"]
            name = f"{module.target}.bias"
            out.append(WeightDelta(module.into, name, tuple(bias.shape), bias.float, strength))
        if module.kind == "full":
            if "diff" in module.factors:
                diff = module.factors["diff"]
                name = f"{module.target}.weight"
                out.append(WeightDelta(module.into, name, tuple(diff.shape), diff.float, strength))
            continue
        name = f"{module.target}.weight"
        parameter = component_params.get(name)
        target = tuple(parameter.shape) if parameter is not None else ()
        build = {"lora": _lora_delta, "loha": _loha_delta, "lokr": _lokr_delta}[module.kind]
        scale = _scale(module, _rank(module))
        shape = _delta_shape(module, target)

        def compute(module: LoraModule = module, build=build, scale: float = scale, shape=shape):  # noqa: ANN001, ANN202
            factors = {k: v.float() for k, v in module.factors.items()}
            return build(factors, shape) * scale

        out.append(WeightDelta(module.into, name, shape, compute, strength))
    return out


def apply_loras(
    model: HasModels,
    loras: Sequence[tuple[str | Path, float, float | None]],
    *,
    bake: bool = False,
) -> LoraHandle:
    """Apply `(path, unet_weight, te_weight)` files (te_weight None: same as unet_weight) all at once.

    Every file is read and checked (NaN/Inf, shapes, another family) before the model is touched; modules
    that match nothing are listed in each report and in a warning. `bake=True` keeps no undo data.
    """
    modules = {UNET: model.unet, TEXT: model.text_encoder}
    if model.text_encoder_2 is not None:
        modules[TEXT2] = model.text_encoder_2
    label = family_label(model.family)
    deltas, reports = [], []
    for path, unet_weight, te_weight in loras:
        lora = read_lora(path, model.family, model.text_encoder, model.text_encoder_2)
        hint = family_hint(lora.modules)
        # the refiner's bigG is `lora_te2_` too: only a U-Net context width tells a base LoRA from its own
        by_names = label == "SDXL refiner" and _context_width(lora.modules) is None
        if hint is not None and hint in _CONTEXT_FAMILIES.values() and hint != label and not by_names:
            raise LoraFamilyError(lora.path, hint, label, model.family.name)
        if not lora.kinds:
            looks = f" (it looks like a {hint} LoRA)" if hint else ""
            raise UnknownArchitectureError(
                lora.path,
                f"none of its {len(lora.modules)} modules matches a {model.family.name!r} model{looks}: "
                f"{', '.join(lora.unmatched[:8])}",
            )
        file_deltas = lora_deltas(lora, modules, unet_weight, unet_weight if te_weight is None else te_weight)
        problems = check_deltas(modules, file_deltas)
        if problems:
            raise KeyMismatchError(
                lora.path, f"LoRA for {hint or 'another model'}", model.family.name, (), (), problems
            )
        if lora.unmatched:
            warnings.warn(
                f"{lora.path.name}: {len(lora.unmatched)} LoRA modules match nothing in a "
                f"{model.family.name!r} model and are skipped: {', '.join(lora.unmatched[:8])}",
                stacklevel=2,
            )
        deltas += file_deltas
        reports.append(LoraReport(lora.path, lora.kinds, lora.unmatched, lora_short_hash(lora.path)))
    return LoraHandle(patch_weights(modules, deltas, bake=bake), reports)


LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")


class LoraFamilyError(KeyMismatchError):
    """A LoRA trained for another family (an SD1 LoRA on SDXL, an SDXL one on SD1): nothing is applied."""

    def __init__(self, path: str | Path, file_family: str, model_family: str, name: str) -> None:
        self.missing, self.unexpected, self.wrong_shape = [], [], []
        CheckpointError.__init__(
            self,
            path,
            f"this is an {file_family} LoRA and the model is {model_family} ({name!r}); its weights do not "
            f"fit, the model was not changed: use a LoRA trained for {model_family}",
        )


class UnknownLoraError(ParameterError):
    """A `<lora:name>` tag (or an infotext's `Lora hashes` entry) that no file in the LoRA folders matches."""


def find_loras(folders: Sequence[Path]) -> dict[str, Path]:
    """LoRA files under `folders` (recursively, as A1111's `list_available_networks`) by file stem; the
    first folder wins."""
    found: dict[str, Path] = {}
    for folder in folders:
        if folder.is_dir():
            for path in sorted(folder.rglob("*")):
                if path.suffix.lower() in LORA_SUFFIXES and path.is_file():
                    found.setdefault(path.stem, path)
    return found


def resolve_lora(
    name: str, folders: Sequence[Path], *, want_hash: str = "", hashes: dict[Path, str] | None = None
) -> Path:
    """The file of `<lora:name>`: the file stem `name` under `folders`.

    With `want_hash` (an infotext's `Lora hashes`), a file of that hash under any name is taken when the
    stem is missing or hashes otherwise (A1111 renames pasted tags by hash); `hashes` caches file hashes.
    """
    files = find_loras(folders)
    cache = {} if hashes is None else hashes

    def short_hash(path: Path) -> str:
        if path not in cache:
            cache[path] = lora_short_hash(path)
        return cache[path]

    path = files.get(name)
    if want_hash and (path is None or short_hash(path) != want_hash):
        by_hash = next((p for p in files.values() if short_hash(p) == want_hash), None)
        if by_hash is not None:
            return by_hash
        if path is not None:
            warnings.warn(
                f"LoRA {name!r}: the infotext names hash {want_hash}, {path.name} hashes {short_hash(path)}; "
                "using it, the image will differ",
                stacklevel=2,
            )
    if path is None:
        where = ", ".join(str(f) for f in folders) or "no LoRA folder (pass --lora-dir or --models-dir)"
        hashed = f" (hash {want_hash})" if want_hash else ""
        raise UnknownLoraError(
            f"LoRA {name!r}{hashed}: no file named {name}{{{','.join(LORA_SUFFIXES)}}} in {where}"
        )
    return path
