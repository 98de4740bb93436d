"""Execution backends of the U-Net: `torch` (eager, the default) or `openvino` (optional package).

A backend is chosen at load time (`load(path, backend="openvino")`, `--backend openvino`) and held by
the `StableDiffusion` bundle; pipelines call it in place of the U-Net module (`pipelines/generate.py`).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from latentforge.backends.openvino import BackendError, OpenVINOBackend, default_cache_dir
from latentforge.models.vae import AutoencoderKL

BACKENDS = ("torch", "openvino")

__all__ = ["BACKENDS", "BackendError", "OpenVINOBackend", "make_backend"]


def make_backend(
    name: str,
    unet: nn.Module,
    vae: AutoencoderKL | None = None,
    text_encoder: nn.Module | None = None,
    *,
    cache_dir: str | Path | None = None,
) -> OpenVINOBackend | None:
    """The runner of backend `name` for the U-Net, VAE decoder and text encoder (None: eager torch;
    `cache_dir` None: `default_cache_dir()`). BackendError for an unknown name, a missing package or a
    U-Net that is not on the CPU."""
    if name == "torch":
        return None
    if name == "openvino":
        device = next(unet.parameters()).device
        if device.type != "cpu":
            raise BackendError(f"the openvino backend runs on the CPU; the model is on {device}")
        folder = default_cache_dir() if cache_dir is None else cache_dir
        return OpenVINOBackend(unet, vae, text_encoder, cache_dir=folder)
    raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
