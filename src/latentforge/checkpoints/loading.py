"""Any SD checkpoint a user has -> its family and three networks (`latentforge.model.load` bundles them)."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from latentforge.checkpoints.assembly import Components, assemble, load_into
from latentforge.checkpoints.diffusers_folder import load_diffusers_folder
from latentforge.checkpoints.errors import CheckpointError, CheckpointNotFoundError
from latentforge.checkpoints.exports import read_vae_state_dict
from latentforge.checkpoints.hashing import a1111_short_hash
from latentforge.checkpoints.prediction_probe import probe_prediction
from latentforge.checkpoints.reading import Convert, StateDict, read_state_dict
from latentforge.checkpoints.single_file import (
    UNET_PREFIX,
    MissingEMAError,
    detect_families,
    is_weight_key,
    split_components,
    text_encoder_from_single_file,
)
from latentforge.models.families import ModelFamily, Prediction
from latentforge.models.quantize import quantizable, quantize_entry, quantize_int8
from latentforge.models.residency import Residency
from latentforge.models.vae import AutoencoderKL

DEFAULT_MODEL_FILE = "latentforge-emoji.safetensors"  # its stem names the model in infotexts
DEFAULT_CLIP_FILE = "latentforge-emoji-clip.safetensors"


def asset_path(name: str, what: str, instead: str) -> Path:
    """A file shipped in the package's assets/; a missing one names `what` it is and what to do `instead`."""
    path = Path(__file__).resolve().parent.parent / "assets" / name
    if not path.is_file():
        raise CheckpointNotFoundError(path, f"{what} is not in this installation; {instead}")
    return path


def default_model_path() -> Path:
    """The embedded default model shipped in the package (trained here on the emoji dataset)."""
    return asset_path(DEFAULT_MODEL_FILE, "the embedded default model", "pass --model PATH")


def default_clip_path() -> Path:
    """The CLIP trained with the default model (its text tower is the model's text encoder): the default
    feature network of `latentforge eval`."""
    return asset_path(DEFAULT_CLIP_FILE, "the default model's CLIP", "pass --features clip:PATH")


def read_components(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    prediction: Prediction | None = None,
    use_ema: bool = False,
    compute_hash: bool = True,
    int8: bool = False,
    residency: Residency | None = None,
) -> Components:
    """The family and networks of an original single file (`.safetensors`/`.ckpt`) or a diffusers folder.

    See `latentforge.model.load` for the arguments. Without `prediction`, a single file whose shapes fit
    both an epsilon and a v family (SD 2.x 512 / 768-v) is probed: one U-Net forward on an 8x8 latent
    (`prediction_probe`; full-size SD 2.x in fp32 on one CPU thread: 1.5 s); `prediction` given: no probe.
    `int8`: the U-Net's layers are quantized (`models.quantize`) one at a time as they are read from a
    single file, so its float weights never exist whole (folders and `use_ema`: after loading).
    `residency` (low-memory mode): each tensor of a single file goes into its backing file as it is read,
    so the weights never sit in the process's memory together (the caller places the networks).
    """
    path = Path(path)
    if path.is_dir():
        return _quantized(load_diffusers_folder(path, dtype=dtype, prediction=prediction), int8)
    if not path.exists():
        raise CheckpointNotFoundError(path, "no such file or folder")
    on_read = int8 and not use_ema  # EMA weights reach the U-Net through a key map: quantized after
    # cast per tensor while reading and skip EMA/training keys: peak memory stays near the final size
    convert = _quantize_unet_entry if on_read else None
    state_dict, metadata = read_state_dict(
        path,
        dtype=dtype,
        keep=functools.partial(is_weight_key, use_ema=use_ema),
        convert=convert if residency is None else functools.partial(_into, residency, convert),
    )
    try:
        parts = split_components(state_dict, use_ema=use_ema)
    except MissingEMAError as e:
        raise CheckpointError(path, f"{e.args[0]} (a pruned checkpoint?): load it without use_ema") from None
    del state_dict
    candidates = detect_families(parts, metadata, path)
    family = _with_prediction(candidates, prediction) if prediction is not None else candidates[0]
    text_sd = _text_encoder(parts, "", family, path)
    # SDXL base: OpenCLIP bigG, `conditioner.embedders.1.model.`
    text_2 = _text_encoder(parts, "_2", family, path) if family.text_encoder_2 is not None else None
    components = assemble(
        family, parts.pop("unet"), parts.pop("vae"), text_sd, dtype=dtype, path=path, text_encoder_2=text_2,
        int8_unet=on_read,
    )  # fmt: skip
    _quantized(components, int8 and not on_read)
    if prediction is None and len({c.prediction for c in candidates}) > 1:
        # same shapes, different targets (sd2 / sd2-v): run the U-Net once to tell (see prediction_probe)
        components.family = _with_prediction(candidates, probe_prediction(components.unet, family))
    components.short_hash = a1111_short_hash(path) if compute_hash else None
    return components


def _quantize_unet_entry(key: str, tensor: torch.Tensor, dtype: torch.dtype | None) -> dict | None:
    """A quantizable U-Net weight of a single file as an int8 U-Net loaded in `dtype` holds it."""
    if key.startswith(UNET_PREFIX) and key.endswith(".weight") and quantizable(tuple(tensor.shape)):
        return quantize_entry(key, tensor, dtype if tensor.is_floating_point() else None)
    return None


def _into(
    residency: Residency, convert: Convert | None, key: str, tensor: torch.Tensor, dtype: torch.dtype | None
) -> StateDict:
    """`convert`'s entries (else the tensor, cast as `read_state_dict` casts it) copied into `residency`."""
    entries = convert(key, tensor, dtype) if convert is not None else None
    if entries is not None:
        return {name: residency.put(value) for name, value in entries.items()}
    return {key: residency.put(tensor, dtype if tensor.is_floating_point() else None)}


def _quantized(components: Components, int8: bool) -> Components:
    if int8:
        quantize_int8(components.unet)
    return components


def _text_encoder(parts: dict, suffix: str, family: ModelFamily, path: Path) -> dict:
    """Text encoder `suffix` ("" or "_2") of a split single file in our keys; layout errors name the file."""
    config = family.text_encoder if not suffix else family.text_encoder_2
    assert config is not None
    try:
        return text_encoder_from_single_file(
            parts.pop(f"text_encoder{suffix}"), parts[f"text_layout{suffix}"], config
        )
    except (KeyError, ValueError) as e:
        raise CheckpointError(
            path, f"text_encoder{suffix} does not match family {family.name!r}: {e.args[0]}"
        ) from None


def _with_prediction(candidates: list[ModelFamily], prediction: Prediction) -> ModelFamily:
    """The table entry with this prediction (so sd2-v brings its 768 px default), else the first one
    with the prediction replaced (e.g. an x0 model, which the table has no entry for)."""
    exact = [c for c in candidates if c.prediction == prediction]
    return exact[0] if exact else candidates[0].with_prediction(prediction)


def read_vae(path: str | Path, family: ModelFamily, dtype: torch.dtype) -> AutoencoderKL:
    """A standalone VAE file (any layout) for a model of `family`, on the CPU in `dtype`."""
    state_dict = read_vae_state_dict(path, family)
    with torch.device("meta"):
        vae = AutoencoderKL(family.vae)
    load_into(vae, state_dict, component="standalone VAE", family=family.name, path=path, dtype=dtype)
    return vae
