"""`latentforge train unet CONFIG`: latent diffusion (Rombach et al. 2022) with a frozen VAE and text encoder.

Per step (SPEC section 4; notation in `training/losses.py`):
    z0   = latent_scale * z, z ~ q(z | image)       (or the posterior mode / a cached posterior)
    c    = text_encoder(tokens(caption)), caption -> "" with probability `caption_dropout` (for CFG)
    t    ~ U{0, ..., 999}, eps ~ N(0, I) (+ noise offset), z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps
    loss = w(t) * || unet(z_t, t, c) - target ||^2, target = eps or v, w = 1 or Min-SNR-gamma
Only the U-Net trains. `latent_scale` is 1 / std of the VAE latents of the first `latent_scale_items`
training images, measured once (SD measured 0.18215 the same way) unless given; the export stores it in
the model family so `latentforge.load` and the pipelines use it.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.distributed as dist
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from latentforge.checkpoints.exports import load_text_encoder, load_vae
from latentforge.checkpoints.hashing import weights_digest
from latentforge.checkpoints.single_file import save_single_file
from latentforge.data.captions import check_template, process_caption
from latentforge.distributed import resolve_device
from latentforge.errors import ConfigError
from latentforge.model import StableDiffusion
from latentforge.model import load as load_checkpoint
from latentforge.models.configs import TextEncoderConfig, UNetConfig, VAEConfig
from latentforge.models.families import ModelFamily
from latentforge.models.text_encoder import CLIPTextModel
from latentforge.models.tokenizer import CLIPTokenizer
from latentforge.models.unet import UNetModel, set_dropout, vector_conditioning
from latentforge.models.vae import AutoencoderKL, DiagonalGaussian
from latentforge.pipelines.request import GenerationRequest
from latentforge.pipelines.runner import iter_images
from latentforge.pipelines.sdxl_conditioning import SDXL_PENULTIMATE, batch_numbers
from latentforge.sampling import schedules
from latentforge.training import losses
from latentforge.training.config import AT_LEAST_ONE, FRACTION, POSITIVE, Range, RunConfig
from latentforge.training.latent_cache import (
    LatentCache,
    TensorRowsDataset,
    cache_key,
    cached_or_encode,
    dataset_fingerprint,
)
from latentforge.training.logging import image_grid
from latentforge.training.tasks.common import (
    ExportDtype,
    ImageData,
    build_model,
    dtype_from_name,
    first_items,
    image_dataset,
    model_device,
    parse_options,
    unwrap,
)

NUM_TIMESTEPS = 1000  # what the pipelines and the family table assume


@dataclass(frozen=True)
class UNetTaskOptions(ImageData):
    """`task_options` of the U-Net task (all optional); the data fields come from `ImageData`."""

    # Continue training a model: any file `latentforge.load` reads (single file, diffusers folder). Its family
    # (configs, prediction, schedule, latent scale, size, clip skip) is kept: the options below that describe
    # a new model (unet ... beta_end, latent_scale) are refused with it unless they agree with the file.
    init: str | None = None
    unet: UNetConfig | None = None  # table of UNetConfig fields; default: tiny, sized to the VAE and text
    vae: str | None = None  # VAE file (from `train vae`); None: a random frozen VAE (tests, smoke runs)
    vae_config: VAEConfig | None = None  # for a VAE file without our metadata, or the random VAE
    text_encoder: str | None = None  # text encoder file (from `train clip`); None: random frozen one
    text_encoder_config: TextEncoderConfig | None = None
    clip_skip: int = 1
    prediction: Literal["epsilon", "v"] = "epsilon"
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    caption_dropout: float = 0.1
    dropout: float = 0.0  # in every ResBlock while training (models/unet.py set_dropout); DDPM used 0.1
    min_snr_gamma: float | None = None  # Hang et al. 2023 use 5
    noise_offset: float = 0.0  # 0.05-0.1 in practice
    gradient_checkpointing: bool = False
    latent_scale: float | None = None  # None: 1 / std of the training latents
    latent_scale_items: int = 256
    sample_posterior: bool = True  # z ~ q(z|x) each step (LDM); False: the posterior mode
    cache: bool = False  # encode latents and captions once, reuse every epoch
    cache_dir: str | None = None  # default: $XDG_CACHE_HOME/latentforge/latents
    cache_text: Literal["ids", "hidden"] = (
        "ids"  # token ids (small) or text-encoder states (no per-step CLIP)
    )
    encode_batch_size: int = 16
    eval_timesteps: tuple[int, ...] = (100, 300, 500, 700, 900)
    eval_seed: int = 1234
    eval_batch_size: int = 16
    sample_prompts: tuple[str, ...] | None = None  # default: the first four holdout captions
    sample_seeds: tuple[int, ...] = (0, 1)
    sample_steps: int = 20
    sample_cfg: float = 5.0
    family_name: str = "custom"
    export_dtype: ExportDtype | None = None  # "float16" to halve the export; default: float32
    # Fine-tuning the text encoder too (kohya's `train_text_encoder`), at its own learning rate.
    train_text_encoder: bool = False
    text_encoder_lr: float | None = None  # default: the run's lr
    # Captions (data/captions.py): kohya's shuffle_caption / keep_tokens, and a template over {caption}
    # (and {token}, {class} in DreamBooth), e.g. "an emoji of {caption}".
    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_template: str | None = None

    RANGES: ClassVar[dict[str, Range]] = ImageData.RANGES | {
        "clip_skip": AT_LEAST_ONE,
        "beta_start": Range(0.0, 1.0, low_open=True, high_open=True),
        "beta_end": Range(0.0, 1.0, low_open=True, high_open=True),
        "caption_dropout": FRACTION,
        "dropout": Range(0.0, 1.0, high_open=True),
        "min_snr_gamma": POSITIVE,
        "latent_scale": POSITIVE,
        "latent_scale_items": Range(2),  # a variance needs two values
        "encode_batch_size": AT_LEAST_ONE,
        "eval_timesteps": Range(0, NUM_TIMESTEPS - 1),
        "eval_batch_size": AT_LEAST_ONE,
        "sample_steps": AT_LEAST_ONE,
        "text_encoder_lr": POSITIVE,
    }


class UNetWithText(nn.Module):
    """The trainable module of a fine-tune that also trains the text encoder; `forward` runs the U-Net."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module) -> None:
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.unet(x, timesteps, context, y=y)  # y: SDXL's vector


def _freeze(module: nn.Module) -> nn.Module:
    return module.eval().requires_grad_(False)


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "latentforge" / "latents"


class UNetTask:
    """Trains a UNetModel on VAE latents conditioned on frozen CLIP text states; see the module docstring."""

    name = "unet"

    def __init__(
        self,
        options: Mapping[str, Any] | UNetTaskOptions | None = None,
        seed: int = 0,
        device: str | torch.device = "cpu",
        progress: bool = True,
        explicit: set[str] | None = None,
    ) -> None:
        if explicit is None:
            explicit = set(options or {}) if not isinstance(options, UNetTaskOptions) else set()
        if not isinstance(options, UNetTaskOptions):
            options = parse_options(UNetTaskOptions, options or {}, "unet")
        self.options, self.seed, self.progress = options, seed, progress
        self.device = torch.device(device)
        torch.manual_seed(seed)
        text_encoder_2: CLIPTextModel | None = None
        if options.init is not None:
            family, vae, text_encoder, unet, text_encoder_2 = _from_checkpoint(options, explicit)
        else:
            vae, text_encoder = _frozen_encoders(options)
            family = _new_family(options, vae.config, text_encoder.config)
            unet = build_model("task_options.unet", UNetModel, family.unet)
        # Everything the model is (configs, prediction, schedule, latent scale, size, clip skip) is read from
        # this one family, which is also what `export` writes.
        self._family = family
        _check_caption_options(options)
        # Whether text states need gradients (the text encoder or adapters on it train).
        self.text_grad = options.train_text_encoder
        self._latent_scale_known = options.init is not None or options.latent_scale is not None
        self.vae: AutoencoderKL = _freeze(vae).to(self.device)  # type: ignore[assignment]
        self.text_encoder: CLIPTextModel = _freeze(text_encoder).to(self.device)  # type: ignore[assignment]
        self.tokenizer = CLIPTokenizer.for_config(text_encoder.config)
        # SDXL's second (bigG) encoder, frozen: its penultimate states and pooled output (issue 21).
        self.text_encoder_2: CLIPTextModel | None = None
        self.tokenizer_2: CLIPTokenizer | None = None
        if text_encoder_2 is not None:
            self.text_encoder_2 = _freeze(text_encoder_2).to(self.device)  # type: ignore[assignment]
            self.tokenizer_2 = CLIPTokenizer.for_config(text_encoder_2.config)
        self.unet = unet
        set_dropout(self.unet, options.dropout)
        self.unet.gradient_checkpointing = options.gradient_checkpointing
        if options.train_text_encoder:
            self.text_encoder.requires_grad_(True)
            self._trainable: nn.Module = UNetWithText(self.unet, self.text_encoder)
        else:
            self._trainable = self.unet
        self.alphas_cumprod = family_alphas_cumprod(family)  # float64 [1000]
        self._datasets: dict[str, Dataset] = {}
        self._cache_hit: bool | None = None
        self._holdout: dict[str, torch.Tensor] | None = None
        self._empty: dict[str, torch.Tensor] = {}

    @property
    def family(self) -> ModelFamily:
        """The model family trained and exported; its latent scale is measured on first use unless known."""
        if not self._latent_scale_known:
            self.dataset("train")  # its first call measures the latent scale
        return self._family

    # ---------------------------------------------------------------------------------------------- encoders

    def trainable(self) -> nn.Module:
        return self._trainable

    def param_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]]:
        """Optimizer groups with an `lr_scale` each (the loop multiplies its lr schedule by it)."""
        inner = unwrap(model)
        if not isinstance(inner, UNetWithText):
            return [{"params": list(inner.parameters())}]
        text_lr = self.options.text_encoder_lr or lr
        return [
            {"params": list(inner.unet.parameters())},
            {"params": list(inner.text_encoder.parameters()), "lr_scale": text_lr / lr},
        ]

    def parts(self, model: nn.Module) -> tuple[nn.Module, nn.Module]:
        """(U-Net, text encoder) of a trainable as the loop hands it over (live, EMA copy, DDP-wrapped)."""
        inner = unwrap(model)
        if isinstance(inner, UNetWithText):
            return inner.unet, inner.text_encoder
        return inner, self.text_encoder

    def encode_text(self, input_ids: torch.Tensor, text_encoder: nn.Module | None = None) -> torch.Tensor:
        """Token ids [B, 77] -> text-encoder states [B, 77, width] (with clip skip); with gradients only
        when the text encoder trains and grad mode is on."""
        encoder = self.text_encoder if text_encoder is None else text_encoder
        with torch.set_grad_enabled(self.text_grad and torch.is_grad_enabled()):
            return encoder(input_ids.to(self.device), self._family.default_clip_skip)[0]

    def encode_sdxl(
        self, input_ids: torch.Tensor, input_ids_2: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """SDXL text as generation builds it (`pipelines/sdxl_conditioning.py`): CLIP-L at the family's clip
        skip and bigG at its penultimate layer, both without the final LayerNorm, concatenated [B, 77, 2048];
        and bigG's pooled, projected output [B, P]. With gradients only when encoder adapters train."""
        assert self.text_encoder_2 is not None
        skip = self._family.default_clip_skip
        with torch.set_grad_enabled(self.text_grad and torch.is_grad_enabled()):
            hidden_l = self.text_encoder(input_ids.to(self.device), skip, final_norm=False)[0]
            hidden_g, pooled = self.text_encoder_2(
                input_ids_2.to(self.device), SDXL_PENULTIMATE, final_norm=False
            )
        return torch.cat([hidden_l, hidden_g], dim=-1), pooled

    @torch.no_grad()
    def _empty_prompt(self, name: str) -> torch.Tensor:
        # The states only when asked for: a text-encoder forward on first use would draw from the global RNG
        # (adapter dropout) in whichever step first drops a caption, and a resumed run would draw elsewhere.
        if name not in self._empty:
            ids = self.tokenizer([""]).cpu()
            self._empty = {"input_ids": ids} | (
                {"hidden": self.encode_text(ids).float().cpu()} if name == "hidden" else {}
            )
        return self._empty[name]

    def template_fields(self) -> dict[str, str]:
        """{token} and {class} of `caption_template` (DreamBooth's identifier and class word)."""
        return {"token": "", "class_word": ""}

    def prepare_captions(self, batch: Mapping[str, Any], generator: torch.Generator) -> Mapping[str, Any]:
        """Shuffle tags and apply the template, drawing from the step's generator (exact on resume)."""
        options = self.options
        if "caption" not in batch or not (options.shuffle_caption or options.caption_template):
            return batch
        rng = random.Random(int(torch.randint(0, 2**62, (), generator=generator)))
        captions = [
            process_caption(
                caption,
                rng,
                shuffle=options.shuffle_caption,
                keep_tokens=options.keep_tokens,
                template=options.caption_template,
                **self.template_fields(),
            )
            for caption in batch["caption"]
        ]
        return {**batch, "caption": captions}

    @torch.no_grad()
    def _encode_batch(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Cache rows: posterior moments or mode, and caption ids or hidden states."""
        posterior = self.vae.encode(batch["pixels"].to(self.device, next(self.vae.parameters()).dtype))
        ids = self.tokenizer(list(batch["caption"]))
        out: dict[str, torch.Tensor] = {}
        if self.options.sample_posterior:
            out.update(mean=posterior.mean.float(), logvar=posterior.logvar.float())
        else:
            out["latent"] = posterior.mode().float()
        if self.tokenizer_2 is not None:  # SDXL: both encoders' text, and the size/crop numbers
            ids_2 = self.tokenizer_2(list(batch["caption"]))
            out.update(_sizes(batch))
            if self.options.cache_text == "hidden":
                out["hidden"], out["pooled"] = (t.float() for t in self.encode_sdxl(ids, ids_2))
            else:
                out.update(input_ids=ids, input_ids_2=ids_2)
            return out
        if self.options.cache_text == "hidden":
            out["hidden"] = self.encode_text(ids).float()
        else:
            out["input_ids"] = ids
        return out

    def _build_cache(self, split: str, images: Dataset) -> Dataset:
        if self.options.flip or not self.options.center_crop or self.options.buckets:
            raise ConfigError(
                "task_options.cache = true needs center_crop = true, flip = false and buckets = false "
                "(a cache holds one view of one size)"
            )
        key = cache_key(
            vae=weights_digest(self.vae),
            text_encoder=weights_digest(self.text_encoder),
            data=dataset_fingerprint(images),
            split=split,
            sample_posterior=self.options.sample_posterior,
            cache_text=self.options.cache_text,
            clip_skip=self._family.default_clip_skip if self.options.cache_text == "hidden" else None,
            # SDXL only, so SD caches keep their keys
            **(
                {} if self.text_encoder_2 is None else {"text_encoder_2": weights_digest(self.text_encoder_2)}
            ),
        )
        cache = LatentCache(self.options.cache_dir or _default_cache_dir(), key)
        # Every rank asks for "train" (rank 0 writes, the others then read); only rank 0 evaluates.
        distributed = (
            split == "train" and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        )
        if distributed and dist.get_rank() != 0:
            dist.barrier()  # rank 0 writes the cache first
        info = {"split": split, "vae": self.options.vae, "text_encoder": self.options.text_encoder}
        tensors, hit = cached_or_encode(
            cache,
            images,
            self._encode_batch,
            info,
            batch_size=self.options.encode_batch_size,
            progress=self.progress,
        )
        if distributed and dist.get_rank() == 0:
            dist.barrier()
        if split == "train":
            self._cache_hit = hit
        return TensorRowsDataset(tensors)

    def dataset(self, split: str) -> Dataset:
        """Images and captions, or cache rows with `cache = true`; the first train call fixes latent_scale."""
        if split not in self._datasets:
            images = image_dataset(self.options, split, seed=self.seed)
            self._datasets[split] = self._build_cache(split, images) if self.options.cache else images
            if split == "train" and not self._latent_scale_known:  # now, outside the loop's autocast
                self._family = replace(self._family, latent_scale=self.measure_latent_scale())
                self._latent_scale_known = True
        return self._datasets[split]

    @property
    def cache_hit(self) -> bool | None:
        """Whether the training cache was found (True) or built (False); None before/without caching."""
        return self._cache_hit

    def latents_and_context(
        self,
        batch: Mapping[str, Any],
        generator: torch.Generator | None,
        caption_dropout: float = 0.0,
        text_encoder: nn.Module | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled latents [B, C, h, w] and text states [B, 77, width] for a raw or cached batch (the text
        states carry gradients when the text encoder trains); SD 1.x/2.x only (SDXL: `latents_and_cond`)."""
        if self._family.is_sdxl:
            raise ConfigError(
                f"task_options.init is an SDXL model ({self._family.name}); only the unet task trains SDXL"
            )
        z, context, _ = self.latents_and_cond(batch, generator, caption_dropout, text_encoder)
        return z, context

    def latents_and_cond(
        self,
        batch: Mapping[str, Any],
        generator: torch.Generator | None,
        caption_dropout: float = 0.0,
        text_encoder: nn.Module | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Scaled latents, text states and (SDXL) the `vector` [B, adm_in_channels], else None."""
        with torch.no_grad():
            if "pixels" in batch:
                batch = self._encode_batch(batch)
            if "latent" in batch:
                z = batch["latent"].to(self.device)
            else:
                moments = torch.cat([batch["mean"], batch["logvar"]], dim=1).to(self.device)
                posterior = DiagonalGaussian(moments)
                z = posterior.sample(generator=generator) if generator is not None else posterior.mode()
        if self._family.is_sdxl:
            context, vector = self._sdxl_cond(batch, z, generator, caption_dropout)
            return z.float() * self.latent_scale, context, vector
        name = "hidden" if "hidden" in batch else "input_ids"
        cond = batch[name].to(self.device)
        if caption_dropout > 0:
            device = generator.device if generator is not None else torch.device("cpu")
            drop = torch.rand(len(cond), generator=generator, device=device).to(self.device) < caption_dropout
            empty = self._empty_prompt(name).to(cond.device, cond.dtype)
            cond = torch.where(drop.view(-1, *([1] * (cond.ndim - 1))), empty, cond)
        context = cond.float() if name == "hidden" else self.encode_text(cond, text_encoder).float()
        return z.float() * self.latent_scale, context, None

    def _sdxl_cond(
        self, batch: Mapping[str, Any], z: torch.Tensor, generator: torch.Generator | None, dropout: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """crossattn [B, 77, 2048] and `vector` of an encoded SDXL batch. Caption dropout zeroes a dropped
        caption's text embeddings and pooled output as sgm's `ucg_rate` does (one draw for both encoders,
        as generation's all-zero empty negative prompt); its size numbers stay."""
        if "hidden" in batch:
            context, pooled = batch["hidden"].to(self.device).float(), batch["pooled"].to(self.device).float()
        else:
            context, pooled = (t.float() for t in self.encode_sdxl(batch["input_ids"], batch["input_ids_2"]))
        if dropout > 0:
            device = generator.device if generator is not None else torch.device("cpu")
            keep = (torch.rand(len(context), generator=generator, device=device) >= dropout).to(self.device)
            context, pooled = context * keep[:, None, None], pooled * keep[:, None]
        # target size: the training crop itself, from the latent's shape (cache rows keep no pixels)
        factor = self._family.vae.downsampling_factor
        target = torch.tensor([[z.shape[-2] * factor, z.shape[-1] * factor]]).expand(len(z), -1)
        numbers = batch_numbers(self._family, batch["original_size"], batch["crop_top_left"], target)
        vector = vector_conditioning(pooled, numbers.to(self.device), self._family.unet.vector_embed_dim)
        return context, vector

    @property
    def latent_scale(self) -> float:
        """The family's latent scale: 1 / std of the unscaled training latents unless given or from init."""
        return self.family.latent_scale

    @torch.no_grad()
    def measure_latent_scale(self) -> float:
        """1 / std of posterior samples of the first `latent_scale_items` train items (fixed seed, fp32)."""
        dataset = self.dataset("train")
        with torch.autocast(self.device.type, enabled=False):
            return self._measure_latent_scale(dataset)

    def _measure_latent_scale(self, dataset: Dataset) -> float:
        count = min(self.options.latent_scale_items, len(dataset))  # type: ignore[arg-type]
        generator = torch.Generator("cpu").manual_seed(self.seed)
        loader = DataLoader(  # one item at a time with buckets: their sizes differ
            torch.utils.data.Subset(dataset, range(count)),
            batch_size=1 if self.options.buckets else self.options.encode_batch_size,
        )
        total, total_sq, n = 0.0, 0.0, 0
        for batch in loader:
            raw = batch if "pixels" not in batch else self._encode_batch(batch)
            if "latent" in raw:
                z = raw["latent"].double()
            else:
                posterior = DiagonalGaussian(torch.cat([raw["mean"], raw["logvar"]], dim=1).cpu())
                z = posterior.sample(generator=generator).double()
            total, total_sq, n = total + float(z.sum()), total_sq + float(z.pow(2).sum()), n + z.numel()
        variance = (total_sq - total**2 / n) / (n - 1)
        if not variance > 0:
            raise ConfigError(
                "task_options.latent_scale cannot be measured: the VAE latents of the training set have "
                f"variance {variance} (a constant dataset or a broken VAE); check them or set latent_scale"
            )
        return float(variance**-0.5)

    # ---------------------------------------------------------------------------------------------- training

    def _loss_terms(
        self,
        model: nn.Module,
        z0: torch.Tensor,
        context: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
        vector: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample MSE [B] in the prediction space, and the Min-SNR weights [B] (ones without it)."""
        abar = self.alphas_cumprod.to(z0.device)[t]  # [B] float64
        z_t = losses.add_noise(z0, noise, abar)
        pred = model(z_t, t, context) if vector is None else model(z_t, t, context, y=vector)
        target = losses.diffusion_target(self._family.prediction, z0, noise, abar)
        mse = (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)
        if self.options.min_snr_gamma is None:
            return mse, torch.ones_like(mse)
        weights = losses.min_snr_weights(
            losses.snr(abar), self.options.min_snr_gamma, self._family.prediction
        )
        return mse, weights.to(mse)

    def loss(
        self, model: nn.Module, batch: Mapping[str, Any], generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        batch = self.prepare_captions(batch, generator)
        text_encoder = self.parts(model)[1]
        z0, context, vector = self.latents_and_cond(
            batch, generator, self.options.caption_dropout, text_encoder
        )
        t = losses.sample_timesteps(len(z0), NUM_TIMESTEPS, generator).to(self.device)
        noise = losses.sample_noise(tuple(z0.shape), generator, self.options.noise_offset).to(self.device)
        mse, weights = self._loss_terms(model, z0, context, t, noise, vector)
        loss = (mse * weights).mean()
        return loss, {"loss": loss.item(), "mse": mse.mean().item()}

    # --------------------------------------------------------------------------------------------- evaluation

    def _holdout_batches(
        self, text_encoder: nn.Module | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """Holdout latents (posterior mode), text states and SDXL vectors, encoded once while the text
        encoder is frozen (with `text_encoder` each time when it trains)."""
        holdout = self._holdout
        if holdout is None:
            zs, contexts, vectors = [], [], []
            for batch in DataLoader(self.dataset("holdout"), batch_size=self.options.eval_batch_size):
                # the captions training sees (template, token), drawn from a fixed generator
                batch = self.prepare_captions(batch, torch.Generator().manual_seed(self.options.eval_seed))
                z, c, v = self.latents_and_cond(batch, None, text_encoder=text_encoder)
                zs.append(z.cpu())
                contexts.append(c.cpu())
                vectors += [] if v is None else [v.cpu()]
            holdout = {"z": torch.cat(zs), "context": torch.cat(contexts)}
            if vectors:
                holdout["vector"] = torch.cat(vectors)
            if not self.text_grad:
                self._holdout = holdout
        size = self.options.eval_batch_size
        z, c, v = holdout["z"], holdout["context"], holdout.get("vector")
        return [
            (z[i : i + size], c[i : i + size], None if v is None else v[i : i + size])
            for i in range(0, len(z), size)
        ]

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Unweighted holdout MSE (prediction space) at fixed timesteps and noise seeds, per t and overall."""
        unet = unwrap(model)
        was_training = unet.training
        unet.eval()
        device = model_device(self.parts(model)[0])
        metrics: dict[str, float] = {}
        batches = self._holdout_batches(self.parts(model)[1])
        for t_value in self.options.eval_timesteps:
            generator = torch.Generator("cpu").manual_seed(self.options.eval_seed + t_value)
            errors = []
            for z0, context, vector in batches:
                noise = torch.randn(z0.shape, generator=generator).to(device)
                t = torch.full((len(z0),), t_value, device=device, dtype=torch.long)
                vector = None if vector is None else vector.to(device)
                mse, _ = self._loss_terms(unet, z0.to(device), context.to(device), t, noise, vector)
                errors.append(mse.cpu())
            metrics[f"loss_t{t_value}"] = float(torch.cat(errors).mean())
        metrics["loss"] = sum(metrics.values()) / len(metrics)
        unet.train(was_training)
        return metrics

    def _prompts(self) -> list[str]:
        if self.options.sample_prompts is not None:
            return list(self.options.sample_prompts)
        # The raw images even when cached: cache rows hold tokens, not caption text.
        items = first_items(
            image_dataset(replace(self.options, max_holdout_items=4), "holdout", self.seed), 4
        )
        return [item["caption"] for item in items]

    def pipeline_model(self, model: nn.Module) -> StableDiffusion:
        """The task's VAE, the trainable's U-Net and text encoder as the bundle the pipelines take."""
        unet, text_encoder = self.parts(model)
        return StableDiffusion(
            family=self.family,
            tokenizer=self.tokenizer,
            text_encoder=text_encoder,  # type: ignore[arg-type]
            vae=self.vae,
            unet=unet,  # type: ignore[arg-type]
            name=self.family.name,
            text_encoder_2=self.text_encoder_2,
            tokenizer_2=self.tokenizer_2,
        )

    def samples(self, model: nn.Module) -> Image.Image | None:
        """One row per prompt, one column per seed, made by the real txt2img pipeline (Euler, `sample_steps`
        steps, CFG `sample_cfg`, the family's size), so the grid shows what users of the export will get."""
        prompts = self._prompts()
        if not prompts:
            return None
        unet = unwrap(model)
        was_training = unet.training
        unet.eval()
        seeds = list(self.options.sample_seeds)
        request = GenerationRequest(
            steps=self.options.sample_steps,
            sampler="Euler",
            cfg_scale=self.options.sample_cfg,
            batch_size=len(seeds),
            prompt_seeds=tuple((p, s) for p in prompts for s in seeds),
        )
        try:
            images = preview_images(self.pipeline_model(unet), request)
        finally:
            unet.train(was_training)
        return image_grid(images, columns=len(seeds))

    # ---------------------------------------------------------------------------------------------- export

    def export(self, model: nn.Module, path: Path) -> None:
        """One original-layout single file (U-Net, VAE, text encoder) with the family in its metadata."""
        unet, text_encoder = self.parts(model)
        text_sd = text_encoder.state_dict()
        if self.text_encoder_2 is None:  # SD: the family has no projection; SDXL's bigG keeps its own
            text_sd = {k: v for k, v in text_sd.items() if not k.startswith("text_projection.")}
        save_single_file(
            path,
            unet.state_dict(),
            self.vae.state_dict(),
            text_sd,
            self.family,
            dtype=dtype_from_name(self.options.export_dtype),
            text_encoder_2=None if self.text_encoder_2 is None else self.text_encoder_2.state_dict(),
        )


def preview_images(model: StableDiffusion, request: GenerationRequest) -> list[Image.Image]:
    """The task's one call into the generation API: txt2img of each (prompt, seed) pair."""
    return [result.image for result in iter_images(model, request, progress=False)]


def family_alphas_cumprod(family: ModelFamily) -> torch.Tensor:
    """abar_t [1000] (float64) of the family's beta schedule, as the pipelines compute it."""
    betas = schedules.betas(family.beta_schedule, NUM_TIMESTEPS, family.beta_start, family.beta_end)
    return schedules.alphas_cumprod(betas)


def _sizes(batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """SDXL's `original_size` and `crop_top_left` [B, 2] of a batch: as the bucketed data records them, or
    for data without them (fixed-size center crops, synthetic) the crop's own size and no offset."""
    if "original_size" in batch:
        return {
            "original_size": batch["original_size"].long(),
            "crop_top_left": batch["crop_top_left"].long(),
        }
    pixels = batch["pixels"]
    size = torch.tensor([[pixels.shape[-2], pixels.shape[-1]]]).expand(len(pixels), -1)
    return {"original_size": size.clone(), "crop_top_left": torch.zeros_like(size)}


def _check_caption_options(options: UNetTaskOptions) -> None:
    """Caption options that need the caption text or a text encoder with gradients refuse a text cache."""
    if options.caption_template is not None:
        check_template(options.caption_template)
    if options.cache and (options.shuffle_caption or options.caption_template):
        raise ConfigError(
            "task_options.shuffle_caption/caption_template need the caption text, which the latent cache "
            "does not keep; set cache = false"
        )
    if options.train_text_encoder and options.cache and options.cache_text == "hidden":
        raise ConfigError(
            'task_options.train_text_encoder = true cannot use cache_text = "hidden" (the states change as '
            'the text encoder trains); set cache_text = "ids"'
        )


def _frozen_encoders(options: UNetTaskOptions) -> tuple[AutoencoderKL, CLIPTextModel]:
    """The VAE and text encoder from their files, or random ones of the given (or tiny) configs."""
    if options.vae is not None:
        vae = load_vae(options.vae, options.vae_config)
    else:
        vae = build_model("task_options.vae_config", AutoencoderKL, options.vae_config or VAEConfig())
    if options.text_encoder is not None:
        text_encoder = load_text_encoder(options.text_encoder, options.text_encoder_config)
    else:
        config = options.text_encoder_config or TextEncoderConfig()
        text_encoder = build_model("task_options.text_encoder_config", CLIPTextModel, config)
    return vae, text_encoder


def _new_family(options: UNetTaskOptions, vae: VAEConfig, text: TextEncoderConfig) -> ModelFamily:
    """The family of a U-Net trained from scratch on these encoders (latent scale 1 until measured)."""
    channels, width = vae.embed_dim, text.width
    unet = options.unet or UNetConfig(in_channels=channels, out_channels=channels, context_dim=width)
    wrong = [
        f"{name} = {got} but the VAE/text encoder need {want}"
        for name, got, want in (
            ("in_channels", unet.in_channels, channels),
            ("out_channels", unet.out_channels, channels),
            ("context_dim", unet.context_dim, width),
        )
        if got != want
    ]
    if wrong:
        raise ConfigError(f"task_options.unet does not fit the frozen encoders: {', '.join(wrong)}")
    _check_resolution(options.resolution, vae, unet)
    return ModelFamily(
        name=options.family_name,
        unet=unet,
        vae=vae,
        text_encoder=replace(text, projection_dim=None),  # the U-Net never reads the pooled output
        prediction=options.prediction,
        latent_scale=options.latent_scale or 1.0,
        text_layout="hf",
        default_size=options.resolution,
        default_clip_skip=options.clip_skip,
        beta_start=options.beta_start,
        beta_end=options.beta_end,
        beta_schedule=options.beta_schedule,
    )


def _check_resolution(resolution: int, vae: VAEConfig, unet: UNetConfig) -> None:
    multiple = vae.downsampling_factor * 2 ** (len(unet.channel_mult) - 1)
    if resolution % multiple:
        raise ConfigError(
            f"task_options.resolution = {resolution} is not a multiple of {multiple} "
            "(the VAE's factor x the U-Net's downsampling)"
        )


def _from_checkpoint(
    options: UNetTaskOptions, explicit: set[str]
) -> tuple[ModelFamily, AutoencoderKL, CLIPTextModel, UNetModel, CLIPTextModel | None]:
    """Family and weights of `options.init` (any file `latentforge.load` reads), fp32 on the CPU.

    Options that would describe another model are refused rather than ignored; `family_name` renames.
    """
    new_model = [name for name in ("unet", "vae", "vae_config", "text_encoder", "text_encoder_config")]
    given = [name for name in new_model if getattr(options, name) is not None]
    if given:
        raise ConfigError(
            f"task_options.init = {options.init!r} brings its own U-Net, VAE and text encoder, so "
            f"task_options {', '.join(given)} cannot be set with it; remove them"
        )
    model = load_checkpoint(options.init, dtype=torch.float32, compute_hash=False)  # type: ignore[arg-type]
    family = model.family
    if family.is_refiner:
        raise ConfigError(
            f"task_options.init = {options.init!r} is an SDXL refiner ({family.name}); the U-Net task trains "
            "SDXL base models only (the refiner's aesthetic-score conditioning is not implemented)"
        )
    if family.is_sdxl and options.train_text_encoder:
        raise ConfigError(
            f"task_options.train_text_encoder = true is not supported for the SDXL model {options.init!r} "
            "(its two encoders stay frozen); set train_text_encoder = false"
        )
    kept = {
        "prediction": family.prediction,
        "beta_schedule": family.beta_schedule,
        "beta_start": family.beta_start,
        "beta_end": family.beta_end,
        "clip_skip": family.default_clip_skip,
        "latent_scale": family.latent_scale,
    }
    for name, value in kept.items():
        if name in explicit and getattr(options, name) != value:
            raise ConfigError(
                f"task_options.{name} = {getattr(options, name)!r} differs from the {value!r} of "
                f"task_options.init = {options.init!r}, whose model family is kept; remove it"
            )
    if "family_name" in explicit:
        family = replace(family, name=options.family_name)
    _check_resolution(options.resolution, family.vae, family.unet)
    # `load` hands out inference models (eval mode, no gradients): the U-Net trains here.
    unet = model.unet.train().requires_grad_(True)
    return family, model.vae, model.text_encoder, unet, model.text_encoder_2


def make_unet_task(config: RunConfig) -> UNetTask:
    """The `TASKS["unet"]` factory: reads `task_options`, `seed` and `device` (for the frozen encoders)."""
    device = resolve_device(config.device, int(os.environ.get("LOCAL_RANK", "0")))
    return UNetTask(config.task_options, seed=config.seed, device=device)
