"""Read TAESD weights: madebyollin's `taesd_encoder.pth`/`taesd_decoder.pth` (or `.safetensors`, keys
`N.*`), diffusers' `AutoencoderTiny` (`encoder.layers.N.*`, `decoder.layers.N.*`, one file or a folder),
and ComfyUI's combined `taesd_encoder.N.*` / `taesd_decoder.N.*`. Pickled files go through the safe reader.

The diffusers map is generated from our module's own keys: the encoder's indices are the same, the
decoder's are one lower (diffusers keeps the parameter-free Clamp outside its Sequential). The
architecture (latent channels, width, blocks per stage) is read off the weights.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch

from latentforge.checkpoints.assembly import load_into
from latentforge.checkpoints.errors import CheckpointError, CheckpointNotFoundError
from latentforge.checkpoints.loading import asset_path
from latentforge.checkpoints.reading import StateDict, read_state_dict
from latentforge.models.taesd import TinyAutoencoder, TinyAutoencoderConfig
from latentforge.models.vae import AutoencoderKL

SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
# Published base names per latent space: SD 1.x/2.x and SDXL (github.com/madebyollin/taesd).
VARIANTS = {"sd": "taesd", "sdxl": "taesdxl"}
# Tiny decoders trained here for the models shipped with the package (`latentforge train taesd`), by model
# name: `model.load` attaches one when it was distilled from that model's VAE decoder (`VAE_SIGNATURE`).
EMBEDDED_TAESDS = {"latentforge-emoji": "latentforge-emoji-taesd.safetensors"}
VAE_SIGNATURE = "latentforge.vae_signature"  # metadata: `vae_signature` of the VAE it was distilled from
SIGNATURE_TOLERANCE = 5e-3  # relative; fp32/bf16/fp16 copies of one VAE differ by < 1e-4


def vae_signature(vae: AutoencoderKL) -> list[float]:
    """Mean |w| of each tensor of the VAE's decoder (post_quant_conv and decoder), in float64: which
    decoder a tiny decoder imitates, the same for any dtype the VAE is loaded in."""
    decoder = [*vae.post_quant_conv.parameters(), *vae.decoder.parameters()]
    return [float(p.detach().double().abs().mean()) for p in decoder]


def embedded_taesd(
    model_name: str, vae: AutoencoderKL, *, dtype: torch.dtype = torch.float32
) -> TinyAutoencoder | None:
    """The shipped tiny decoder of the model named `model_name` (`EMBEDDED_TAESDS`), if it is installed
    and was trained against this `vae`; None otherwise (a warning when it was trained for another VAE)."""
    if model_name not in EMBEDDED_TAESDS:
        return None
    try:
        path = asset_path(EMBEDDED_TAESDS[model_name], "its tiny decoder", "pass --taesd")
    except CheckpointNotFoundError:
        return None
    _, metadata = read_state_dict(path)
    trained_for = json.loads(metadata.get(VAE_SIGNATURE, "[]"))
    here = vae_signature(vae)
    if len(trained_for) != len(here) or any(
        abs(a - b) > SIGNATURE_TOLERANCE * abs(a) for a, b in zip(trained_for, here, strict=True)
    ):
        warnings.warn(
            f"{path.name} was trained for another VAE than the one this {model_name} uses; not used "
            "(retrain it: "
            "`latentforge train taesd configs/perf/taesd.toml`, docs/performance.md)",
            stacklevel=2,
        )
        return None
    return read_taesd(path, dtype=dtype)


def diffusers_key(key: str) -> str:
    """Our key (`decoder.3.conv.0.weight`) -> diffusers AutoencoderTiny's (`decoder.layers.2.conv.0...`)."""
    part, index, rest = key.split(".", 2)
    return f"{part}.layers.{int(index) - (part == 'decoder')}.{rest}"


def to_ours(state_dict: StateDict) -> StateDict:
    """Any known layout -> our keys (`encoder.N.*`, `decoder.N.*`)."""
    out: StateDict = {}
    for key, value in state_dict.items():
        match = re.fullmatch(r"(?:taesd_)?(encoder|decoder)\.(?:layers\.)?(\d+)\.(.+)", key)
        if match is None:
            out[key] = value  # reported as unexpected by the strict load
            continue
        part, index, rest = match.groups()
        shift = part == "decoder" and ".layers." in key
        out[f"{part}.{int(index) + shift}.{rest}"] = value
    return out


def _stages(indices: list[int], blocks: set[int]) -> tuple[int, ...]:
    """Lengths of the runs of consecutive block indices."""
    runs: list[int] = []
    previous = None
    for i in indices:
        if i in blocks:
            if previous is not None and previous == i - 1 and previous in blocks:
                runs[-1] += 1
            else:
                runs.append(1)
        previous = i
    return tuple(runs)


def infer_config(state_dict: StateDict, path: str | Path) -> TinyAutoencoderConfig:
    """The architecture of TAESD weights in our layout (the decoder is required)."""
    try:
        stem = state_dict["decoder.1.weight"]  # [channels, latent channels, 3, 3]
    except KeyError:
        raise CheckpointError(path, "no TAESD decoder weights (decoder.1.weight / layers.0.weight)") from None

    def layout(part: str) -> tuple[list[int], set[int]]:
        keys = [k.split(".") for k in state_dict if k.startswith(part + ".")]
        indices = sorted({int(k[1]) for k in keys})
        return list(range(max(indices) + 1)), {int(k[1]) for k in keys if k[2] == "conv"}

    encoder = _stages(*layout("encoder")) if any(k.startswith("encoder.") for k in state_dict) else None
    return TinyAutoencoderConfig(
        latent_channels=stem.shape[1],
        channels=stem.shape[0],
        encoder_blocks=encoder or TinyAutoencoderConfig.encoder_blocks,
        decoder_blocks=_stages(*layout("decoder")),
    )


def _files(path: Path, variant: str) -> list[Path]:
    """The weight files of one TAESD in a folder: split encoder/decoder files, else one combined file."""
    for base in (f"{variant}_decoder", "taesd_decoder"):
        decoder = [path / f"{base}{s}" for s in SUFFIXES if (path / f"{base}{s}").is_file()]
        if decoder:
            enc = base.replace("decoder", "encoder")
            encoder = [path / f"{enc}{s}" for s in SUFFIXES if (path / f"{enc}{s}").is_file()]
            return decoder[:1] + encoder[:1]
    for name in ("diffusion_pytorch_model.safetensors", f"{variant}.safetensors", "taesd.safetensors"):
        for folder in (path, path / "vae"):
            if (folder / name).is_file():
                return [folder / name]
    return []


def read_taesd(
    path: str | Path, *, variant: str = "taesd", dtype: torch.dtype = torch.float32
) -> TinyAutoencoder:
    """A TAESD from a file or a folder (`{variant}_decoder.pth` [+ `_encoder`], or an AutoencoderTiny)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointNotFoundError(path, "no such TAESD file or folder")
    files = _files(path, variant) if path.is_dir() else [path]
    if not files:
        raise CheckpointNotFoundError(
            path,
            f"no TAESD weights here: expected {variant}_decoder.pth (or .safetensors) from "
            "github.com/madebyollin/taesd, or a diffusers AutoencoderTiny folder",
        )
    state_dict: StateDict = {}
    for file in files:
        raw, _ = read_state_dict(file)
        part = "decoder" if "decoder" in file.name else "encoder" if "encoder" in file.name else None
        if part and not any(k.startswith(("encoder.", "decoder.", "taesd_")) for k in raw):
            raw = {f"{part}.{k}": v for k, v in raw.items()}  # the split files hold a bare Sequential
        state_dict.update(to_ours(raw))
    config = infer_config(state_dict, files[0])
    with torch.device("meta"):
        model = TinyAutoencoder(config, encoder=any(k.startswith("encoder.") for k in state_dict))
    load_into(model, state_dict, component="TAESD", family=variant, path=files[0], dtype=dtype)
    return model.eval().requires_grad_(False)
