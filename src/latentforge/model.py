"""`StableDiffusion`: the loaded model bundle every pipeline takes, and `load(path)` that makes one."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from latentforge.checkpoints.hashing import a1111_short_hash
from latentforge.checkpoints.loading import read_components, read_vae
from latentforge.models.families import ModelFamily, Prediction
from latentforge.models.taesd import TinyAutoencoder
from latentforge.models.text_encoder import CLIPTextModel
from latentforge.models.tokenizer import CLIPTokenizer
from latentforge.models.unet import UNetModel
from latentforge.models.vae import AutoencoderKL


@dataclass
class StableDiffusion:
    """Tokenizer, text encoder, VAE and U-Net of one model, with the family that pairs them."""

    family: ModelFamily
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNetModel
    name: str = "model"
    short_hash: str | None = None  # A1111's "Model hash": first 10 hex digits of the file's SHA-256
    # A swapped-in VAE as A1111's infotext names it (`modules/sd_vae.py`): "VAE" is the file's base name,
    # "VAE hash" the first 10 hex digits of its SHA-256; None while the checkpoint's own VAE is in use.
    vae_name: str | None = None
    vae_hash: str | None = None
    taesd: TinyAutoencoder | None = None  # optional tiny decoder: live previews and `fast_decode` (perf)

    @classmethod
    def from_family(
        cls, family: ModelFamily, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> StableDiffusion:
        """A randomly initialised model of a family (for tests and training from scratch)."""
        with torch.device(device):
            bundle = cls(
                family=family,
                tokenizer=CLIPTokenizer.for_config(family.text_encoder),
                text_encoder=CLIPTextModel(family.text_encoder),
                vae=AutoencoderKL(family.vae),
                unet=UNetModel(family.unet),
                name=family.name,
            )
        return bundle.to(dtype=dtype)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def vae_device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def to(
        self, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> StableDiffusion:
        for module in (self.text_encoder, self.vae, self.unet):
            module.to(device=device, dtype=dtype)
        return self

    def eval(self) -> StableDiffusion:
        for module in (self.text_encoder, self.vae, self.unet):
            module.eval().requires_grad_(False)
        return self


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
        prediction: "epsilon", "v" or "x0"; default: the family's, and for SD 2.x single files (512 eps
            or 768-v) one U-Net forward tells (1.5 s on a CPU core, see `checkpoints.prediction_probe`).
        vae: a standalone VAE file to use instead of the checkpoint's own.
        use_ema: take the U-Net's EMA weights of a full training checkpoint.
        compute_hash: compute A1111's model (and VAE) hash (reads the whole file once more).
    """
    parts = read_components(
        path, dtype=dtype or torch.float32, prediction=prediction, use_ema=use_ema, compute_hash=compute_hash
    )
    bundle = StableDiffusion(
        family=parts.family,
        tokenizer=CLIPTokenizer.for_config(parts.family.text_encoder),
        text_encoder=parts.text_encoder,
        vae=parts.vae,
        unet=parts.unet,
        name=parts.name,
        short_hash=parts.short_hash,
    )
    if vae is not None:
        swap_vae(bundle, vae, compute_hash=compute_hash)
    return bundle.to(device=device).eval()


def swap_vae(bundle: StableDiffusion, path: str | Path, *, compute_hash: bool = True) -> None:
    """Replace the bundle's VAE by the one in `path` (same architecture, other weights); records its
    file name and A1111 hash for the infotext."""
    bundle.vae = read_vae(path, bundle.family, bundle.dtype).to(bundle.device)
    bundle.vae_name = Path(path).name
    bundle.vae_hash = a1111_short_hash(path) if compute_hash else None
