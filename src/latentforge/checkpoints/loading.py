"""`load(path)`: any SD checkpoint a user has -> a `StableDiffusion` bundle."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

from latentforge.checkpoints import keymap_vae
from latentforge.checkpoints.errors import CheckpointNotFoundError
from latentforge.checkpoints.hashing import a1111_short_hash
from latentforge.checkpoints.reading import StateDict, read_state_dict
from latentforge.checkpoints.single_file import (
    EMA_PREFIX,
    IGNORED_PREFIXES,
    VAE_PREFIX,
    detect_family,
    is_weight_key,
    load_into,
    split_components,
    text_encoder_to_ours,
)
from latentforge.model import StableDiffusion
from latentforge.models.families import ModelFamily, Prediction
from latentforge.models.text_encoder import CLIPTextModel
from latentforge.models.tokenizer import CLIPTokenizer
from latentforge.models.unet import UNetModel
from latentforge.models.vae import AutoencoderKL

DEFAULT_MODEL_FILE = "latentforge-emoji.safetensors"  # its stem names the model in infotexts
DEFAULT_CLIP_FILE = "latentforge-emoji-clip.safetensors"


def _asset(name: str, what: str, instead: str) -> Path:
    path = Path(__file__).resolve().parent.parent / "assets" / name
    if not path.is_file():
        raise CheckpointNotFoundError(path, f"{what} is not in this installation; {instead}")
    return path


def default_model_path() -> Path:
    """The embedded default model shipped in the package (trained here on the emoji dataset)."""
    return _asset(DEFAULT_MODEL_FILE, "the embedded default model", "pass --model PATH")


def default_clip_path() -> Path:
    """The CLIP trained with the default model (its text tower is the model's text encoder): the default
    feature network of `latentforge eval`."""
    return _asset(DEFAULT_CLIP_FILE, "the default model's CLIP", "pass --features clip:PATH")


def load(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    prediction: Prediction | None = None,
    vae: str | Path | None = None,
    use_ema: bool = False,
    compute_hash: bool = True,
) -> StableDiffusion:
    """Load an original single-file checkpoint (`.safetensors`/`.ckpt`) or a diffusers folder.

    Args:
        path: the checkpoint file or diffusers folder.
        dtype: weights dtype (default: float32).
        device: where the weights go.
        prediction: "epsilon", "v" or "x0" when the family default is wrong (v-models of SD 2.x).
        vae: a standalone VAE file to use instead of the checkpoint's own.
        use_ema: take the U-Net's EMA weights of a full training checkpoint.
        compute_hash: compute A1111's model hash (reads the whole file once more).
    """
    path = Path(path)
    dtype = dtype or torch.float32
    if path.is_dir():
        from latentforge.checkpoints.diffusers_folder import load_diffusers_folder

        bundle = load_diffusers_folder(path, dtype=dtype, prediction=prediction)
    elif not path.exists():
        raise CheckpointNotFoundError(path, "no such file or folder")
    else:
        # cast per tensor while reading and skip EMA/training keys: peak memory stays near the final size
        state_dict, metadata = read_state_dict(
            path, dtype=dtype, keep=functools.partial(is_weight_key, use_ema=use_ema)
        )
        parts = split_components(state_dict, use_ema=use_ema)
        del state_dict
        family = detect_family(parts, metadata, path)
        if prediction is not None:
            family = family.with_prediction(prediction)
        text_sd = text_encoder_to_ours(parts.pop("text_encoder"), parts["text_layout"], family.text_encoder)
        bundle = assemble(family, parts.pop("unet"), parts.pop("vae"), text_sd, dtype=dtype, path=path)
        bundle.short_hash = a1111_short_hash(path) if compute_hash else None
    if vae is not None:
        swap_vae(bundle, vae)
    return bundle.to(device=device).eval()


class SkipInitOnMeta(TorchFunctionMode):
    """Skip random init of `meta` tensors: it computes nothing, yet `normal_` on `meta` (nn.Embedding's
    init) makes torch import its Python meta kernels and sympy, ~150 MB of RSS for nothing."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        tensor = args[0] if args else (kwargs or {}).get("tensor")
        is_init = getattr(func, "__module__", None) == "torch.nn.init" or func in _TENSOR_INIT_METHODS
        if is_init and isinstance(tensor, torch.Tensor) and tensor.is_meta:
            return tensor
        return func(*args, **(kwargs or {}))


_TENSOR_INIT_METHODS = frozenset({torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.erfinv_})


def assemble(
    family: ModelFamily,
    unet: StateDict,
    vae: StateDict,
    text_encoder: StateDict,
    *,
    dtype: torch.dtype,
    path: str | Path,
) -> StableDiffusion:
    """Build the three networks on `meta` and adopt the weights: no second copy is made."""
    with torch.device("meta"), SkipInitOnMeta():
        modules = {
            "unet": UNetModel(family.unet),
            "vae": AutoencoderKL(family.vae),
            "text_encoder": CLIPTextModel(family.text_encoder),
        }
    for name, sd in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        load_into(modules[name], sd, component=name, family=family.name, path=path, dtype=dtype)
    return StableDiffusion(
        family=family,
        tokenizer=CLIPTokenizer.for_config(family.text_encoder),
        text_encoder=modules["text_encoder"],  # type: ignore[arg-type]
        vae=modules["vae"],  # type: ignore[arg-type]
        unet=modules["unet"],  # type: ignore[arg-type]
        name=Path(path).stem,
    )


def read_vae_state_dict(path: str | Path, bundle_family: ModelFamily) -> StateDict:
    """A standalone VAE in the original layout (bare or `first_stage_model.`-prefixed) or diffusers'."""
    state_dict, _ = read_state_dict(path)
    state_dict = {
        (k[len(VAE_PREFIX) :] if k.startswith(VAE_PREFIX) else k): v
        for k, v in state_dict.items()
        if not k.startswith(EMA_PREFIX) and not k.startswith(IGNORED_PREFIXES) and not k.startswith("loss.")
    }
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in state_dict):
        state_dict = keymap_vae.diffusers_to_ours(state_dict, bundle_family.vae)
    return state_dict


def swap_vae(bundle: StableDiffusion, path: str | Path) -> None:
    """Replace the bundle's VAE by the one in `path` (same architecture, other weights)."""
    state_dict = read_vae_state_dict(path, bundle.family)
    with torch.device("meta"):
        vae = AutoencoderKL(bundle.family.vae)
    load_into(
        vae, state_dict, component="standalone VAE", family=bundle.family.name, path=path, dtype=bundle.dtype
    )
    bundle.vae = vae.to(bundle.device)
