"""`StableDiffusion`: the loaded model bundle every pipeline takes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from latentforge.models.families import ModelFamily
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
