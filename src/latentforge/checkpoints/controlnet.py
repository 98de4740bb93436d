"""Read and write ControlNet files: lllyasviel's `control_v11*` `.pth`/`.safetensors` (original `cldm` keys,
`control_model.` prefix or none), diffusers `ControlNetModel` folders, and our own exports.

Tensors are read safely (`reading.read_state_dict`: no pickle code runs). The family is detected from the
weights' keys and shapes against a ControlNet built on `meta` for each entry of the family table, so the
result is always an entry of the table. Control-LoRA and "difference" ControlNets are refused by name.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from latentforge.checkpoints import keymap_controlnet
from latentforge.checkpoints.diffusers_folder import (
    _read_json,
    _read_weights,
    _translated,
    unet_config_from_diffusers,
)
from latentforge.checkpoints.errors import CheckpointError, KeyMismatchError, UnknownArchitectureError
from latentforge.checkpoints.keymap_unet import _fit_projection
from latentforge.checkpoints.loading import asset_path
from latentforge.checkpoints.reading import StateDict, read_state_dict
from latentforge.checkpoints.writing import save_safetensors
from latentforge.models.configs import UNetConfig, config_from_dict, config_to_dict
from latentforge.models.controlnet import SD_HINT_BLOCK_CHANNELS, ControlNetConfig, ControlNetModel
from latentforge.models.families import FAMILIES

# ControlNets shipped beside the embedded model, loadable by name (`--controlnet latentforge-emoji-canny`).
EMBEDDED_CONTROLNETS = {"latentforge-emoji-canny": "latentforge-emoji-canny.safetensors"}
PREFIX = "control_model."  # lllyasviel's files (cldm's ControlLDM keeps the net as `control_model`)
CONFIG_METADATA = "latentforge.controlnet_config"  # our exports: the ControlNetConfig as JSON


@dataclass
class ControlNet:
    """A loaded ControlNet and how A1111's infotext names it: `"{name} [{short_hash}]"`."""

    model: ControlNetModel
    name: str
    short_hash: str = ""
    # The shuffle ControlNet is trained on globally pooled residuals; sd-webui-controlnet decides this by
    # "shuffle" in the file name (controlnet_model_guess.py) and then also applies it to the cond half only.
    global_average_pooling: bool = False

    @property
    def title(self) -> str:
        return f"{self.name} [{self.short_hash}]" if self.short_hash else self.name


def a1111_controlnet_hash(path: str | Path) -> str:
    """sd-webui-controlnet's "[hash]": A1111's old `model_hash` (SHA-256 of 64 KiB at 1 MiB, 8 hex digits)."""
    with Path(path).open("rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def _refuse_other_formats(path: Path, keys: set[str]) -> None:
    if "lora_controlnet" in keys:
        raise UnknownArchitectureError(
            path,
            "this is a Control-LoRA (Stability's low-rank ControlNet, key 'lora_controlnet'), which "
            "latentforge does not load; use a full ControlNet (control_v11*, or a diffusers ControlNetModel "
            "folder)",
        )
    if "difference" in keys:
        raise UnknownArchitectureError(
            path,
            "this is a 'difference' ControlNet (weights stored as the difference from a base U-Net), which "
            "latentforge does not load; use the full ControlNet file of the same model",
        )


def _candidates(hint_channels: int, hint_convs: int) -> list[tuple[str, ControlNetConfig]]:
    """A ControlNet config per distinct (4-channel) U-Net of the family table, with the file's hint widths."""
    # The hint encoder's convs: conv_in, two per stride-2 step, conv_out.
    hint_widths = SD_HINT_BLOCK_CHANNELS[: (hint_convs - 2) // 2 + 1]
    seen: dict[UNetConfig, tuple[str, ControlNetConfig]] = {}
    for family in FAMILIES.values():
        unet = replace(family.unet, in_channels=4, out_channels=4)  # inpainting models' ControlNets take 4
        seen.setdefault(unet, (family.name, ControlNetConfig(unet, hint_channels, hint_widths)))
    return list(seen.values())


def _shapes(config: ControlNetConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in ControlNetModel(config).state_dict().items()}


def detect_config(path: Path, state_dict: StateDict) -> tuple[str, ControlNetConfig]:
    """(family name, config) whose meta-built ControlNet has exactly the file's keys and shapes."""
    hint_key = "input_hint_block.0.weight"
    if hint_key not in state_dict:
        raise UnknownArchitectureError(path, f"not a ControlNet: no {hint_key!r} (the hint encoder)")
    hint_channels = int(state_dict[hint_key].shape[1])
    hint_convs = len({k.split(".")[1] for k in state_dict if k.startswith("input_hint_block.")})
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    best: tuple[int, str, dict[str, tuple[int, ...]]] | None = None
    for name, config in _candidates(hint_channels, hint_convs):
        want = _shapes(config)
        if want == {k: _fit(k, s, config) for k, s in shapes.items()}:
            return name, config
        misses = len(set(want) ^ set(shapes)) + sum(
            want[k] != _fit(k, shapes[k], config) for k in set(want) & set(shapes)
        )
        if best is None or misses < best[0]:
            best = (misses, name, want)
    assert best is not None
    _, name, want = best
    raise KeyMismatchError(
        path,
        "ControlNet",
        name,
        missing=set(want) - set(shapes),
        unexpected=set(shapes) - set(want),
        wrong_shape=[k for k in set(want) & set(shapes) if want[k] != shapes[k]],
    )


def _fit(key: str, shape: tuple[int, ...], config: ControlNetConfig) -> tuple[int, ...]:
    """proj_in/proj_out as 1x1 conv or Linear both load (thibaud's SD2 ControlNets use the conv form)."""
    if key.endswith(("proj_in.weight", "proj_out.weight")):
        return shape[:2] if config.unet.use_linear_proj else (*shape[:2], 1, 1)
    return shape


def _original_keys(path: Path, state_dict: StateDict) -> StateDict:
    if any(k.startswith(PREFIX) for k in state_dict):  # v1.0 files also carry the whole SD model: drop it
        state_dict = {k[len(PREFIX) :]: v for k, v in state_dict.items() if k.startswith(PREFIX)}
    _refuse_other_formats(path, set(state_dict))
    return state_dict


def _build(
    path: Path, config: ControlNetConfig, state_dict: StateDict, family: str, dtype: torch.dtype
) -> ControlNetModel:
    fitted = {k: _fit_projection(k, v, config.unet.use_linear_proj) for k, v in state_dict.items()}
    with torch.device("meta"):
        model = ControlNetModel(config)
    want = _shapes(config)
    got = {k: tuple(v.shape) for k, v in fitted.items()}
    if want != got:
        raise KeyMismatchError(
            path,
            "ControlNet",
            family,
            missing=set(want) - set(got),
            unexpected=set(got) - set(want),
            wrong_shape=[k for k in set(want) & set(got) if want[k] != got[k]],
        )
    model.load_state_dict({k: v.to(dtype) for k, v in fitted.items()}, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def load_controlnet(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    compute_hash: bool = True,
) -> ControlNet:
    """A ControlNet from an original-format file (`.pth`, `.ckpt`, `.safetensors`), a diffusers folder, or
    the name of one shipped with the package (`EMBEDDED_CONTROLNETS`; an existing path of that name wins)."""
    path = controlnet_path(path)
    if path.is_dir():
        cfg = _read_json(path / "config.json")
        if cfg.get("_class_name", "ControlNetModel") != "ControlNetModel":
            raise UnknownArchitectureError(
                path, f"config.json describes a {cfg['_class_name']}, not a ControlNetModel"
            )

        def translate() -> ControlNetConfig:
            unet = unet_config_from_diffusers({**cfg, "out_channels": cfg["in_channels"]})
            hint = tuple(cfg.get("conditioning_embedding_out_channels") or SD_HINT_BLOCK_CHANNELS)
            return ControlNetConfig(unet, int(cfg.get("conditioning_channels", 3)), hint)

        config = _translated(path / "config.json", translate)
        weights = _read_weights(path, dtype)
        try:
            state_dict = keymap_controlnet.diffusers_to_ours(weights, config)
        except ValueError as e:
            raise KeyMismatchError(path, "ControlNet", "diffusers config", [], [str(e)[:300]]) from None
        family = "diffusers config"
        short_hash = ""
        if compute_hash:
            weight_files = sorted(path.glob("diffusion_pytorch_model*.safetensors")) or sorted(
                path.glob("*.bin")
            )
            short_hash = a1111_controlnet_hash(weight_files[0]) if weight_files else ""
    else:
        tensors, metadata = read_state_dict(path, dtype=dtype)
        if "controlnet_cond_embedding.conv_in.weight" in tensors:
            raise UnknownArchitectureError(
                path, "a diffusers ControlNet saved as one file: load its folder (with config.json) instead"
            )
        state_dict = _original_keys(path, tensors)
        if CONFIG_METADATA in metadata:
            config = _config_from_json(path, metadata[CONFIG_METADATA])
            family = "its own metadata"
        else:
            family, config = detect_config(path, state_dict)
        short_hash = a1111_controlnet_hash(path) if compute_hash else ""
    model = _build(path, config, state_dict, family, dtype).to(device)
    name = path.name if path.is_dir() else path.stem
    return ControlNet(model, name, short_hash, global_average_pooling="shuffle" in name.lower())


def controlnet_path(name: str | Path) -> Path:
    """`name` as a path, or the shipped file it names when no such path exists."""
    path = Path(name)
    if not path.exists() and str(name) in EMBEDDED_CONTROLNETS:
        return asset_path(EMBEDDED_CONTROLNETS[str(name)], f"the ControlNet {name!r}", "pass its file's path")
    return path


def _config_from_json(path: Path, text: str) -> ControlNetConfig:
    try:
        data = json.loads(text)
        unet = config_from_dict(UNetConfig, data.pop("unet"))
        return ControlNetConfig(unet, int(data["hint_channels"]), tuple(data["hint_block_channels"]))
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(path, f"unreadable {CONFIG_METADATA} metadata ({e})") from None


def save_controlnet(path: str | Path, model: ControlNetModel, *, dtype: torch.dtype | None = None) -> Path:
    """An original-layout `.safetensors` (`control_model.` prefix) with our config in its metadata."""
    config = model.config
    meta = {"unet": config_to_dict(config.unet), "hint_channels": config.hint_channels}
    meta["hint_block_channels"] = list(config.hint_block_channels)
    tensors = {PREFIX + k: v for k, v in model.state_dict().items()}
    return save_safetensors(path, tensors, {CONFIG_METADATA: json.dumps(meta)}, dtype=dtype)
