"""`latentforge train taesd CONFIG`: a TAESD decoder distilled from a model's VAE decoder.

The model's VAE (frozen) encodes each image to the latents its U-Net samples in (scaled by the family's
latent scale), and the tiny decoder learns to map those latents to what the VAE's decoder makes of them
(`target = "vae"`, TAESD's purpose: a cheap stand-in for that decoder) or to the image (`"image"`):
    loss = mean |TAESD(z) - target|,  z = latent_scale * mode(q(z|x))
madebyollin's published decoders add an adversarial term; this task trains the plain L1 part.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset

from latentforge.checkpoints.taesd import VAE_SIGNATURE, vae_signature
from latentforge.errors import ConfigError
from latentforge.models.taesd import TinyAutoencoder, TinyAutoencoderConfig
from latentforge.training import losses
from latentforge.training.config import AT_LEAST_ONE, Range, RunConfig
from latentforge.training.tasks.common import (
    ImageData,
    first_items,
    image_dataset,
    image_grid,
    model_device,
    parse_options,
    unwrap,
)


@dataclass(frozen=True)
class TAESDTaskOptions(ImageData):
    """`task_options` of the TAESD task; the data fields come from `ImageData`."""

    model: str | None = None  # the checkpoint whose VAE is distilled; default: the embedded model
    channels: int = 32  # width of every layer (the published SD decoders use 64)
    target: Literal["vae", "image"] = "vae"
    eval_batch_size: int = 16
    sample_images: int = 8

    RANGES: ClassVar[dict[str, Range]] = ImageData.RANGES | {
        "channels": AT_LEAST_ONE,
        "eval_batch_size": AT_LEAST_ONE,
    }


class TAESDTask:
    """Trains `TinyAutoencoder.decoder` against a frozen VAE; see the module docstring."""

    name = "taesd"

    def __init__(self, options: Mapping[str, Any] | TAESDTaskOptions | None = None, seed: int = 0) -> None:
        from latentforge.checkpoints.loading import default_model_path
        from latentforge.model import load

        if not isinstance(options, TAESDTaskOptions):
            options = parse_options(TAESDTaskOptions, options or {}, "taesd")
        self.options, self.seed = options, seed
        torch.manual_seed(seed)
        source = load(options.model or default_model_path(), compute_hash=False)
        self.vae, self.latent_scale = (
            source.vae.float().eval().requires_grad_(False),
            source.family.latent_scale,
        )
        factor = source.family.vae.downsampling_factor
        if options.resolution % factor:
            raise ConfigError(
                f"task_options.resolution = {options.resolution} is not a multiple of f = {factor}"
            )
        stages = int(math.log2(factor))
        # TAESD's shape: one block after the stem, three per further stage (mirrored in the decoder)
        config = TinyAutoencoderConfig(
            latent_channels=source.family.vae.embed_dim,
            channels=options.channels,
            encoder_blocks=(1,) + (3,) * stages,
            decoder_blocks=(3,) * stages + (1,),
        )
        self.module = TinyAutoencoder(config, encoder=False)
        self._datasets: dict[str, Dataset] = {}

    def trainable(self) -> nn.Module:
        return self.module

    def dataset(self, split: str) -> Dataset:
        if split not in self._datasets:
            self._datasets[split] = image_dataset(self.options, split, seed=self.seed)
        return self._datasets[split]

    @torch.no_grad()
    def _latents_and_target(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vae = self.vae.to(pixels.device)
        with torch.autocast(pixels.device.type, enabled=False):
            z = vae.encode(pixels.float()).mode()
            target = vae.decode(z).clamp(-1, 1) if self.options.target == "vae" else pixels.float()
        return z * self.latent_scale, target

    def loss(
        self, model: nn.Module, batch: Mapping[str, Any], generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        inner: TinyAutoencoder = unwrap(model)  # type: ignore[assignment]
        z, target = self._latents_and_target(batch["pixels"].to(model_device(inner)))
        loss = (model(z) - target).abs().mean()
        return loss, {"loss": loss.item()}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """PSNR (dB) of the tiny decoder against the VAE's decode and against the images, on the holdout."""
        taesd: TinyAutoencoder = unwrap(model)  # type: ignore[assignment]
        device = model_device(taesd)
        vs_vae, vs_image = [], []
        for batch in DataLoader(self.dataset("holdout"), batch_size=self.options.eval_batch_size):
            x = batch["pixels"].float().to(device)
            z, _ = self._latents_and_target(x)
            with torch.no_grad():
                fast = taesd.decode(z).float().clamp(-1, 1)
                slow = self.vae.decode(z / self.latent_scale).float().clamp(-1, 1)
            vs_vae.append(losses.psnr(fast.cpu(), slow.cpu()))
            vs_image.append(losses.psnr(fast.cpu(), x.cpu()))
        return {
            "psnr_vs_vae": losses.mean_finite(torch.cat(vs_vae), cap=100.0),
            "psnr_vs_image": losses.mean_finite(torch.cat(vs_image), cap=100.0),
        }

    def samples(self, model: nn.Module) -> Image.Image | None:
        """Holdout images, the VAE's decode, TAESD's decode (rows)."""
        taesd: TinyAutoencoder = unwrap(model)  # type: ignore[assignment]
        items = first_items(self.dataset("holdout"), self.options.sample_images)
        if not items:
            return None
        x = torch.stack([item["pixels"] for item in items]).float().to(model_device(taesd))
        z, _ = self._latents_and_target(x)
        with torch.no_grad():
            rows = [x, self.vae.decode(z / self.latent_scale), taesd.decode(z)]
        return image_grid([row.cpu() for row in rows])

    def export(self, model: nn.Module, path: Path) -> None:
        """The decoder in our layout (`decoder.N.*`), which `--taesd FILE` and `read_taesd` load."""
        taesd: TinyAutoencoder = unwrap(model)  # type: ignore[assignment]
        state = {k: v.detach().float().contiguous().cpu() for k, v in taesd.state_dict().items()}
        signature = json.dumps(vae_signature(self.vae))  # which VAE it imitates (`embedded_taesd` checks)
        save_file(state, str(path), metadata={"format": "latentforge-taesd", VAE_SIGNATURE: signature})


def make_taesd_task(config: RunConfig) -> TAESDTask:
    """The `TASKS["taesd"]` factory."""
    return TAESDTask(config.task_options, seed=config.seed)
