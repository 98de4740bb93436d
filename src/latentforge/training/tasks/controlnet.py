"""`latentforge train controlnet CONFIG`: a ControlNet (Zhang et al. 2023) for a frozen base model.

Per step (the paper's section 3.3; the diffusion terms as in `tasks/unet.py`):
    hint = preprocessor(image) in [0, 1]            (`module`, built on the fly from each training image)
    c    = text_encoder(caption), caption -> "" with probability 0.5 (the paper drops 50% of prompts)
    z_t  = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps
    loss = || unet(z_t, t, c, control=controlnet(z_t, t, c, hint)) - target ||^2
The ControlNet starts as a copy of the base U-Net's encoder half with zero convolutions, so at step 0 the
controlled U-Net equals the base; only the ControlNet trains. The base model (its VAE, text encoder, U-Net,
family) comes from any file `latentforge.load` reads, by default the embedded model.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from latentforge.checkpoints.controlnet import ControlNet, load_controlnet, save_controlnet
from latentforge.checkpoints.loading import default_model_path
from latentforge.distributed import resolve_device
from latentforge.errors import ConfigError, ParameterError
from latentforge.models.controlnet import ControlNetConfig, ControlNetModel
from latentforge.pipelines.controlnet import ControlNetUnit
from latentforge.pipelines.preprocessors import run_preprocessor
from latentforge.pipelines.request import GenerationRequest
from latentforge.training import losses
from latentforge.training.config import FRACTION, Range, RunConfig
from latentforge.training.logging import image_grid
from latentforge.training.tasks.common import (
    ExportDtype,
    ImageData,
    dtype_from_name,
    first_items,
    image_dataset,
    model_device,
    parse_options,
    unwrap,
)
from latentforge.training.tasks.unet import NUM_TIMESTEPS, UNetTask, preview_images


@dataclass(frozen=True)
class ControlNetTaskOptions(ImageData):
    """`task_options` of the ControlNet task (all optional); the data fields come from `ImageData`."""

    base: str | None = (
        None  # the model to control (any file `latentforge.load` reads); None: the embedded one
    )
    init: str | None = None  # continue training this ControlNet file instead of copying the base's encoder
    module: str = "canny"  # the preprocessor that makes each training image's hint (pipelines/preprocessors)
    threshold_a: float | None = None  # its thresholds; None: the module's defaults (canny 100 / 200)
    threshold_b: float | None = None
    caption_dropout: float = 0.5
    eval_timesteps: tuple[int, ...] = (100, 300, 500, 700, 900)
    eval_seed: int = 1234
    eval_batch_size: int = 16
    sample_items: int = 4  # holdout images whose hints (and captions) drive the sample grid
    sample_seeds: tuple[int, ...] = (0, 1)
    sample_steps: int = 20
    sample_cfg: float = 5.0
    export_dtype: ExportDtype | None = None

    RANGES: ClassVar[dict[str, Range]] = ImageData.RANGES | {
        "caption_dropout": FRACTION,
        "eval_timesteps": Range(0, NUM_TIMESTEPS - 1),
        "eval_batch_size": Range(1),
        "sample_items": Range(1),
        "sample_steps": Range(1),
    }


def hints(
    pixels: torch.Tensor, module: str, threshold_a: float, threshold_b: float, seed: int
) -> torch.Tensor:
    """Images [B, 3, H, W] in [-1, 1] -> their preprocessed hints [B, 3, H, W] in [0, 1] at the same size."""
    array = ((pixels.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    out = []
    for i, image in enumerate(array.permute(0, 2, 3, 1).numpy()):  # [B, 3, H, W] -> [B, H, W, 3]
        rng = np.random.default_rng([seed, i])
        detected = run_preprocessor(module, image, min(image.shape[:2]), threshold_a, threshold_b, rng)
        out.append(torch.from_numpy(np.array(detected, copy=True)))
    return torch.stack(out).permute(0, 3, 1, 2).float() / 255  # [B, H, W, 3] -> [B, 3, H, W]


class ControlNetTask:
    """Trains a ControlNet on a frozen base model; see the module docstring."""

    name = "controlnet"

    def __init__(
        self,
        options: Mapping[str, Any] | ControlNetTaskOptions | None = None,
        seed: int = 0,
        device: str | torch.device = "cpu",
        progress: bool = True,
    ) -> None:
        if not isinstance(options, ControlNetTaskOptions):
            options = parse_options(ControlNetTaskOptions, options or {}, "controlnet")
        self.options, self.seed = options, seed
        self.device = torch.device(device)
        try:
            run_preprocessor(options.module, np.zeros((8, 8, 3), np.uint8), 8)
        except ParameterError as error:
            raise ConfigError(f"task_options.module: {error}") from None
        base = options.base or str(default_model_path())
        data = {f.name: getattr(options, f.name) for f in fields(ImageData)}
        # The base model's frozen parts, its family and its latent/caption handling, from the U-Net task.
        self.base = UNetTask(
            {**data, "init": base, "caption_dropout": options.caption_dropout}, seed, device, progress
        )
        self.family = self.base.family
        self.unet = self.base.unet.eval().requires_grad_(False).to(self.device)
        f = self.family.vae.downsampling_factor
        config = ControlNetConfig.for_base(self.family.unet, f)
        torch.manual_seed(seed)
        if options.init is not None:
            self.controlnet = load_controlnet(options.init, compute_hash=False).model.requires_grad_(True)
            if self.controlnet.config != config:
                raise ConfigError(
                    f"task_options.init = {options.init!r} is a ControlNet for another model family"
                )
        else:
            self.controlnet = ControlNetModel.from_unet(self.unet, config)
        self.controlnet.train()
        self._holdout: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None

    def trainable(self) -> nn.Module:
        return self.controlnet

    def dataset(self, split: str) -> Dataset:
        return self.base.dataset(split)

    def _hints(self, pixels: torch.Tensor, seed: int) -> torch.Tensor:
        o = self.options
        a, b = (-1 if v is None else v for v in (o.threshold_a, o.threshold_b))
        return hints(pixels, o.module, a, b, seed).to(self.device)

    def _mse(
        self, model: nn.Module, z0: torch.Tensor, context: torch.Tensor, hint: torch.Tensor, t: torch.Tensor,
        noise: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        """Per-sample MSE [B] of the controlled U-Net in the prediction space."""
        abar = self.base.alphas_cumprod.to(z0.device)[t]
        z_t = losses.add_noise(z0, noise, abar)
        residuals = model(z_t, t, context, hint)
        pred = self.unet(z_t, t, context, control=residuals)
        target = losses.diffusion_target(self.family.prediction, z0, noise, abar)
        return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)

    def loss(
        self, model: nn.Module, batch: Mapping[str, Any], generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        hint_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))  # shuffle's field; resumable
        hint = self._hints(batch["pixels"], hint_seed)
        z0, context = self.base.latents_and_context(batch, generator, self.options.caption_dropout)
        t = losses.sample_timesteps(len(z0), NUM_TIMESTEPS, generator).to(self.device)
        noise = losses.sample_noise(tuple(z0.shape), generator).to(self.device)
        loss = self._mse(model, z0, context, hint, t, noise).mean()
        return loss, {"loss": loss.item()}

    def _holdout_batches(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        if self._holdout is None:
            self._holdout = []
            for batch in DataLoader(self.dataset("holdout"), batch_size=self.options.eval_batch_size):
                z, c = self.base.latents_and_context(batch, None)
                self._holdout.append(
                    (z.cpu(), c.cpu(), self._hints(batch["pixels"], self.options.eval_seed).cpu())
                )
        return self._holdout

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Holdout MSE at fixed timesteps and noise: with the ControlNet (`loss`), without (`loss_base`)."""
        net = unwrap(model)
        was_training = net.training
        net.eval()
        device = model_device(net)
        metrics: dict[str, float] = {}
        with_control, without = [], []
        for t_value in self.options.eval_timesteps:
            generator = torch.Generator("cpu").manual_seed(self.options.eval_seed + t_value)
            for z0, context, hint in self._holdout_batches():
                noise = torch.randn(z0.shape, generator=generator).to(device)
                t = torch.full((len(z0),), t_value, device=device, dtype=torch.long)
                z0, context, hint = z0.to(device), context.to(device), hint.to(device)
                with_control.append(self._mse(net, z0, context, hint, t, noise).cpu())
                without.append(self._mse(lambda *_: None, z0, context, hint, t, noise).cpu())  # type: ignore[arg-type]
        metrics["loss"] = float(torch.cat(with_control).mean())
        metrics["loss_base"] = float(torch.cat(without).mean())
        net.train(was_training)
        return metrics

    def samples(self, model: nn.Module) -> Image.Image | None:
        """One row per holdout image: its hint, then the controlled txt2img of its caption per seed."""
        o = self.options
        items = first_items(image_dataset(o, "holdout", self.seed), o.sample_items)
        if not items:
            return None
        net = unwrap(model)
        was_training = net.training
        net.eval()
        network = ControlNet(net, "training")  # type: ignore[arg-type]
        rows = []
        try:
            for item in items:
                hint = self._hints(item["pixels"][None], o.eval_seed)[0]
                image = Image.fromarray((hint.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8))
                unit = ControlNetUnit(image=image, network=network, resize_mode="Just Resize")
                request = GenerationRequest(
                    steps=o.sample_steps, sampler="Euler", cfg_scale=o.sample_cfg,
                    batch_size=len(o.sample_seeds), controlnet=(unit,),
                    prompt_seeds=tuple((item["caption"], s) for s in o.sample_seeds),
                )  # fmt: skip
                rows.append([image, *preview_images(self.base.pipeline_model(self.unet), request)])
        finally:
            net.train(was_training)
        return image_grid([im for row in rows for im in row], columns=1 + len(o.sample_seeds))

    def export(self, model: nn.Module, path: Path) -> None:
        """An original-layout ControlNet `.safetensors` (`control_model.` keys) with its config."""
        save_controlnet(path, unwrap(model), dtype=dtype_from_name(self.options.export_dtype))  # type: ignore[arg-type]


def make_controlnet_task(config: RunConfig) -> ControlNetTask:
    """The `TASKS["controlnet"]` factory."""
    device = resolve_device(config.device, int(os.environ.get("LOCAL_RANK", "0")))
    return ControlNetTask(config.task_options, seed=config.seed, device=device)
