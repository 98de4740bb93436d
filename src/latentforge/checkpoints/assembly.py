"""State dicts -> networks: build each component on `meta` and adopt the weights strictly (no copy)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

from latentforge.checkpoints.errors import KeyMismatchError
from latentforge.checkpoints.reading import StateDict
from latentforge.models.families import ModelFamily
from latentforge.models.quantize import quantize_int8
from latentforge.models.text_encoder import CLIPTextModel
from latentforge.models.unet import UNetModel
from latentforge.models.vae import AutoencoderKL


@dataclass
class Components:
    """The three networks of one checkpoint with its family; `latentforge.model` makes the bundle."""

    family: ModelFamily
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNetModel
    name: str
    short_hash: str | None = None
    text_encoder_2: CLIPTextModel | None = None  # SDXL base: OpenCLIP bigG


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


def load_into(
    module: torch.nn.Module,
    state_dict: StateDict,
    *,
    component: str,
    family: str,
    path: str | Path,
    dtype: torch.dtype | None = None,
) -> None:
    """Strictly load `state_dict` into a module built on `meta`, adopting (not copying) the tensors."""
    expected = module.state_dict()
    missing = expected.keys() - state_dict.keys()
    unexpected = state_dict.keys() - expected.keys()
    wrong_shape = [k for k in expected.keys() & state_dict.keys() if expected[k].shape != state_dict[k].shape]
    if missing or unexpected or wrong_shape:
        raise KeyMismatchError(path, component, family, missing, unexpected, wrong_shape)
    if dtype is not None:
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    module.load_state_dict(state_dict, strict=True, assign=True)
    left_on_meta = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left_on_meta:
        raise RuntimeError(f"{component}: tensors not in the state dict stayed on meta: {left_on_meta[:5]}")


def assemble(
    family: ModelFamily,
    unet: StateDict,
    vae: StateDict,
    text_encoder: StateDict,
    *,
    dtype: torch.dtype,
    path: str | Path,
    text_encoder_2: StateDict | None = None,
    int8_unet: bool = False,
) -> Components:
    """Build the networks on `meta` and adopt the weights: no second copy is made. `int8_unet`: the U-Net's
    state dict holds the int8 weights and scales of `quantize_int8` (quantized while read)."""
    with torch.device("meta"), SkipInitOnMeta():
        modules = {
            "unet": UNetModel(family.unet),
            "vae": AutoencoderKL(family.vae),
            "text_encoder": CLIPTextModel(family.text_encoder),
        }
        if family.text_encoder_2 is not None:
            modules["text_encoder_2"] = CLIPTextModel(family.text_encoder_2)
        if int8_unet:
            quantize_int8(modules["unet"])  # structure only: int8 `meta` buffers the state dict fills
    state_dicts = {"unet": unet, "vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    for name, module in modules.items():
        sd = state_dicts[name] or {}  # a missing second encoder is reported as missing keys
        load_into(module, sd, component=name, family=family.name, path=path, dtype=dtype)
    return Components(
        family=family,
        text_encoder=modules["text_encoder"],  # type: ignore[arg-type]
        vae=modules["vae"],  # type: ignore[arg-type]
        unet=modules["unet"],  # type: ignore[arg-type]
        name=Path(path).stem,
        text_encoder_2=modules.get("text_encoder_2"),  # type: ignore[arg-type]
    )
