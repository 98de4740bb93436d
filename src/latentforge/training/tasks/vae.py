"""`latentforge train vae CONFIG`: a KL autoencoder (LDM `first_stage_model`) from images.

Loss per step (LDM autoencoder, Rombach et al. 2022, appendix G; `ldm/modules/losses/contperceptual.py`):
    rec  = mean |x - D(z)| (or squared), z ~ q(z|x) (+ noise of a random level up to `latent_noise` x std(z),
           a decoder fine-tune's option: the decoder learns to render the imperfect latents a U-Net makes)
    kl   = KL(q(z|x) || N(0, I)) summed over latent elements / pixel elements  (see losses.kl_loss)
    loss = rec + kl_weight * kl [+ gan_factor * w * (-E[D_patch(D(z))]) + E[hinge(D_patch)]]
The PatchGAN (`gan = true`, off by default) needs no second optimizer: the discriminator lives in the
trainable module next to the VAE, its hinge loss sees detached reconstructions, and the generator term
calls it through detached weights (`losses.frozen_call`), so one backward of the summed loss sends each
term only to the weights it should train; the loop's one optimizer (and LR) steps both. Its factor is 0
before `disc_start` optimizer steps, counted by a buffer of the trainable module (loss calls with gradients
divided by `grad_accum`), so the count survives resume.
LDM's LPIPS perceptual term is not included (it needs pretrained VGG weights).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from latentforge.checkpoints.exports import load_vae, save_vae
from latentforge.errors import ConfigError
from latentforge.models.configs import VAEConfig
from latentforge.models.vae import AutoencoderKL
from latentforge.training import losses
from latentforge.training.config import AT_LEAST_ONE, Range, RunConfig
from latentforge.training.tasks.common import (
    ExportDtype,
    ImageData,
    build_model,
    dtype_from_name,
    first_items,
    image_dataset,
    image_grid,
    model_device,
    parse_options,
    unwrap,
)


@dataclass(frozen=True)
class VAETaskOptions(ImageData):
    """`task_options` of the VAE task (all optional); the data fields come from `ImageData`."""

    vae: VAEConfig | None = None  # a table of VAEConfig fields (f = 2**(len(ch_mult)-1)); default: tiny
    init: str | None = None  # start from these VAE weights (our export, or original/diffusers with `vae`)
    # decoder fine-tuning (as SD's ft-EMA/ft-MSE VAEs): encoder and quant_conv frozen, so the latent space an
    # already-trained U-Net uses stays exactly the same; needs `init`
    frozen_encoder: bool = False
    # with frozen_encoder: decode z + s * std(z) * noise, s uniform in [0, latent_noise] per image, so
    # that the decoder turns a U-Net's residual latent error into a clean picture, not speckles (0: off)
    latent_noise: float = 0.0
    reconstruction: Literal["l1", "l2"] = "l1"
    kl_weight: float = 1e-6  # LDM's meaning (SD's VAE: 1e-6)
    sample_posterior: bool = True  # decode z ~ q(z|x) (LDM) rather than the mean
    gan: bool = False
    disc_start: int = 50001  # optimizer steps before the GAN terms switch on (SD's VAE: 50001)
    disc_weight: float = 0.5
    disc_layers: int = 3
    disc_width: int = 64
    adaptive_weight: bool = True  # LDM's gradient-norm balance of the generator term
    eval_batch_size: int = 16
    sample_images: int = 8
    rfid_inception: str | None = None  # FID Inception weights file: adds rFID to evaluate()
    # our CLIP export (`train clip`): adds FID-CLIP of the reconstructions (`rfid_clip`) to evaluate(), the
    # first-stage floor of the model card; needs more holdout images than feature dimensions (256)
    rfid_clip: str | None = None
    export_dtype: ExportDtype | None = None  # "float16"/"bfloat16" to shrink the export; default: as trained

    RANGES: ClassVar[dict[str, Range]] = ImageData.RANGES | {
        "disc_layers": AT_LEAST_ONE,
        "disc_width": AT_LEAST_ONE,
        "eval_batch_size": AT_LEAST_ONE,
    }


class AutoencoderTrainer(nn.Module):
    """The trainable module: the VAE, an optional PatchGAN discriminator and the optimizer-step counter.

    `forward` runs every network the loss needs, so DDP sees one forward through the wrapper.
    """

    def __init__(self, vae: AutoencoderKL, discriminator: nn.Module | None = None) -> None:
        super().__init__()
        self.vae = vae
        self.discriminator = discriminator
        self.micro_steps: torch.Tensor
        self.register_buffer("micro_steps", torch.zeros((), dtype=torch.int64))

    def forward(
        self, x: torch.Tensor, sample_posterior: bool, generator: torch.Generator, latent_noise: float = 0.0
    ) -> dict[str, Any]:
        posterior = self.vae.encode(x)
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        if latent_noise > 0:
            level = torch.rand(len(z), 1, 1, 1, generator=generator, device=generator.device) * latent_noise
            noise = torch.randn(z.shape, generator=generator, device=generator.device)
            z = z + (level * noise).to(z) * z.detach().std()
        recon = self.vae.decode(z)
        out: dict[str, Any] = {"recon": recon, "kl": posterior.kl()}
        if self.discriminator is not None:
            out["logits_real"] = self.discriminator(x)
            out["logits_fake_d"] = self.discriminator(recon.detach())  # trains D, not the VAE
            out["logits_fake_g"] = losses.frozen_call(self.discriminator, recon)  # trains the VAE, not D
        return out


class VAETask:
    """Trains an AutoencoderKL; see the module docstring for the loss."""

    name = "vae"

    def __init__(
        self, options: Mapping[str, Any] | VAETaskOptions | None = None, seed: int = 0, grad_accum: int = 1
    ) -> None:
        if not isinstance(options, VAETaskOptions):
            options = parse_options(VAETaskOptions, options or {}, "vae")
        self.options, self.seed, self.grad_accum = options, seed, grad_accum
        torch.manual_seed(seed)
        if options.latent_noise > 0 and not options.frozen_encoder:
            raise ConfigError(
                "task_options.latent_noise trains the decoder to render noisy latents, which only a "
                "decoder fine-tune may do (the latent space stays the U-Net's): set frozen_encoder = true"
            )
        if options.frozen_encoder and not options.init:
            raise ConfigError(
                "task_options.frozen_encoder = true fine-tunes a trained decoder: give its VAE as "
                "task_options.init"
            )
        vae = (
            load_vae(options.init, options.vae)
            if options.init
            else build_model("task_options.vae", AutoencoderKL, options.vae or VAEConfig())
        )
        factor = vae.config.downsampling_factor
        if options.resolution % factor:
            raise ConfigError(
                f"task_options.resolution = {options.resolution} is not a multiple of the VAE's factor "
                f"f = {factor}"
            )
        discriminator = None
        if options.gan:
            discriminator = losses.NLayerDiscriminator(
                vae.config.out_channels, width=options.disc_width, n_layers=options.disc_layers
            )
        if options.frozen_encoder:  # no parameter of the encoder path needs grad: autograd records none of it
            vae.encoder.requires_grad_(False)
            vae.quant_conv.requires_grad_(False)
        self.module = AutoencoderTrainer(vae, discriminator)
        self._datasets: dict[str, Dataset] = {}

    def trainable(self) -> nn.Module:
        return self.module

    def dataset(self, split: str) -> Dataset:
        if split not in self._datasets:
            self._datasets[split] = image_dataset(self.options, split, seed=self.seed)
        return self._datasets[split]

    def loss(
        self, model: nn.Module, batch: Mapping[str, Any], generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        opts = self.options
        inner: AutoencoderTrainer = unwrap(model)  # type: ignore[assignment]
        x = batch["pixels"].to(model_device(inner))
        out = model(x, opts.sample_posterior, generator, opts.latent_noise)
        rec = losses.reconstruction_loss(x, out["recon"], opts.reconstruction)
        kl = losses.kl_loss(out["kl"], x[0].numel())
        loss = rec + opts.kl_weight * kl
        metrics = {"rec": rec.item(), "kl": kl.item()}
        if inner.discriminator is not None:
            step = int(inner.micro_steps) // self.grad_accum
            factor = 1.0 if step >= opts.disc_start else 0.0
            g_loss = losses.hinge_g_loss(out["logits_fake_g"])
            d_loss = losses.hinge_d_loss(out["logits_real"], out["logits_fake_d"])
            weight = torch.tensor(opts.disc_weight, device=x.device)
            if opts.adaptive_weight and factor > 0 and torch.is_grad_enabled():
                last = inner.vae.decoder.conv_out.weight
                weight = weight * losses.adaptive_weight(rec, g_loss, last)
            loss = loss + factor * weight * g_loss + factor * d_loss
            metrics.update(g_loss=g_loss.item(), d_loss=d_loss.item(), disc_weight=weight.item())
            if torch.is_grad_enabled():
                inner.micro_steps.add_(1)
        metrics["loss"] = loss.item()
        return loss, metrics

    @torch.no_grad()
    def _reconstruct(self, vae: AutoencoderKL, pixels: torch.Tensor) -> torch.Tensor:
        device = model_device(vae)
        dtype = next(vae.parameters()).dtype
        return vae.decode(vae.encode(pixels.to(device, dtype)).mode()).float().clamp(-1, 1).cpu()

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """PSNR (dB), SSIM and L1 of mean reconstructions of the holdout images; rFID, FID-CLIP if set."""
        vae: AutoencoderKL = unwrap(model).vae  # type: ignore[assignment]
        was_training = vae.training
        vae.eval()
        psnrs, ssims, l1s, originals, recons = [], [], [], [], []
        loader = DataLoader(self.dataset("holdout"), batch_size=self.options.eval_batch_size)
        for batch in loader:
            x = batch["pixels"].float()
            recon = self._reconstruct(vae, x)
            psnrs.append(losses.psnr(recon, x))
            ssims.append(losses.ssim(recon, x))
            l1s.append((recon - x).abs().flatten(1).mean(1))
            if self.options.rfid_inception or self.options.rfid_clip:
                originals.append(x)
                recons.append(recon)
        vae.train(was_training)
        metrics = {
            "psnr": losses.mean_finite(torch.cat(psnrs), cap=100.0),
            "ssim": float(torch.cat(ssims).mean()),
            "l1": float(torch.cat(l1s).mean()),
        }
        if self.options.rfid_inception:
            metrics["rfid"] = reconstruction_fid(
                torch.cat(originals), torch.cat(recons), self.options.rfid_inception
            )
        if self.options.rfid_clip:
            metrics["rfid_clip"] = reconstruction_fid(
                torch.cat(originals), torch.cat(recons), clip_path=self.options.rfid_clip
            )
        return metrics

    def samples(self, model: nn.Module) -> Image.Image | None:
        """Holdout originals (top row) over their reconstructions (bottom row)."""
        vae: AutoencoderKL = unwrap(model).vae  # type: ignore[assignment]
        items = first_items(self.dataset("holdout"), self.options.sample_images)
        if not items:
            return None
        x = torch.stack([item["pixels"] for item in items]).float()
        was_training = vae.training
        vae.eval()
        recon = self._reconstruct(vae, x)
        vae.train(was_training)
        return image_grid([x, recon])

    def export(self, model: nn.Module, path: Path) -> None:
        """The VAE alone: bare original-layout keys with its VAEConfig in the metadata."""
        vae: AutoencoderKL = unwrap(model).vae  # type: ignore[assignment]
        save_vae(vae, path, dtype_from_name(self.options.export_dtype))


def reconstruction_fid(
    originals: torch.Tensor,
    recons: torch.Tensor,
    inception_path: str | None = None,
    *,
    clip_path: str | None = None,
) -> float:
    """FID between originals and reconstructions ([-1, 1] images): FID Inception-v3 or our CLIP's features.

    Features in float32 even inside the training loop's bf16 autocast, as `latentforge eval` computes them.
    """
    from latentforge.evaluation.extractors import load_clip_extractor
    from latentforge.evaluation.features import FeatureExtractor, InceptionExtractor
    from latentforge.evaluation.inception import load_fid_inception
    from latentforge.evaluation.metrics import fid

    extractor: FeatureExtractor
    if inception_path is not None and clip_path is None:
        extractor = InceptionExtractor(load_fid_inception(inception_path))
    elif clip_path is not None and inception_path is None:
        extractor = load_clip_extractor(clip_path).image
    else:
        raise ValueError("reconstruction_fid needs exactly one of inception_path and clip_path")

    def features(images: torch.Tensor) -> torch.Tensor:
        uint8 = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        return torch.cat([extractor(chunk).float() for chunk in uint8.split(32)])

    with torch.autocast("cpu", enabled=False):
        return fid(features(originals).numpy(), features(recons).numpy())


def make_vae_task(config: RunConfig) -> VAETask:
    """The `TASKS["vae"]` factory: reads `config.task_options` and `config.seed`."""
    return VAETask(config.task_options, seed=config.seed, grad_accum=config.grad_accum)
