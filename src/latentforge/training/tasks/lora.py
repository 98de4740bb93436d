"""`latentforge train lora CONFIG`: LoRA / LoCon adapters on a frozen model (Hu et al. 2021; kohya).

The step is the U-Net task's (`tasks/unet.py`: same noise, targets, Min-SNR, captions, buckets), but only
the adapters of `models/lora_layers.py` train: on the U-Net (`targets`: attention, feed_forward, conv for
LoCon) and/or the text encoder (its attention and MLP), each at its own learning rate. The export is a kohya
LoRA file (`checkpoints/lora_writing.py`) with sd-scripts' `ss_*` training metadata, which A1111, ComfyUI,
kohya's tools and `checkpoints/lora.read_lora` read. SDXL base models train as the U-Net task conditions
them (`vector`, both encoders); with `train_text_encoder` both encoders get adapters, as in kohya's
`sdxl_train_network.py`.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import nn

from latentforge.checkpoints.lora_writing import component_prefixes, kohya_metadata, save_kohya_lora
from latentforge.distributed import resolve_device
from latentforge.errors import ConfigError
from latentforge.models.lora_layers import LoRAAdapter, LoRANetwork, LoRASpec, text_targets, unet_targets
from latentforge.training.config import AT_LEAST_ONE, FRACTION, POSITIVE, Range, RunConfig
from latentforge.training.tasks.common import dtype_from_name, parse_options, unwrap
from latentforge.training.tasks.unet import UNetTask, UNetTaskOptions

UNET_TARGETS = ("attention", "feed_forward", "conv")


@dataclass(frozen=True)
class LoRATaskOptions(UNetTaskOptions):
    """`task_options` of the LoRA task: the U-Net task's (data, noise, captions, `init`) plus the network."""

    rank: int = 4  # kohya's network_dim
    alpha: float = 1.0  # kohya's network_alpha (its default 1): the update is alpha / rank * up @ down
    conv_rank: int | None = None  # LoCon rank of the 3x3 convs ("conv" target); default: rank
    conv_alpha: float | None = None  # default: alpha
    dropout: float = 0.0  # on the rank activations (kohya's network_dropout)
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    targets: tuple[str, ...] = ("attention", "feed_forward")  # kohya's default: Transformer2DModel layers
    train_unet: bool = True
    unet_lr: float | None = None  # default: the run's lr (`train_text_encoder`, `text_encoder_lr` inherited)
    training_comment: str = ""  # kohya's ss_training_comment

    RANGES: ClassVar[dict[str, Range]] = UNetTaskOptions.RANGES | {
        "rank": AT_LEAST_ONE,
        "conv_rank": AT_LEAST_ONE,
        "alpha": POSITIVE,
        "conv_alpha": POSITIVE,
        "dropout": FRACTION,
        "rank_dropout": Range(0.0, 1.0, high_open=True),
        "module_dropout": FRACTION,
        "unet_lr": POSITIVE,
    }


class LoRATask(UNetTask):
    """Adapters on a frozen U-Net and text encoder; see the module docstring."""

    name = "lora"

    def __init__(
        self,
        options: Mapping[str, Any] | LoRATaskOptions | None = None,
        seed: int = 0,
        device: str | torch.device = "cpu",
        progress: bool = True,
        run: RunConfig | None = None,
        explicit: set[str] | None = None,
    ) -> None:
        if explicit is None:
            explicit = set(options or {}) if not isinstance(options, LoRATaskOptions) else set()
        if not isinstance(options, LoRATaskOptions):
            options = parse_options(LoRATaskOptions, options or {}, self.name)
        self.lora = options
        _check_lora_options(options, self.name)
        # The U-Net task builds the frozen model; the text encoder trains through adapters only.
        super().__init__(
            replace(options, train_text_encoder=False), seed, device, progress, explicit=explicit
        )
        self.run = run
        self.unet.requires_grad_(False)
        self.network = self._build_network()
        self._trainable = self.network
        self.text_grad = options.train_text_encoder

    @property
    def may_skip_parameters(self) -> bool:
        """With module dropout a step may skip whole adapters (DDP must then look for unused parameters)."""
        return self.lora.module_dropout > 0

    def _build_network(self) -> LoRANetwork:
        o = self.lora
        spec = LoRASpec(o.rank, o.alpha, o.dropout, o.rank_dropout, o.module_dropout)
        conv_spec = replace(
            spec, rank=o.conv_rank or o.rank, alpha=o.conv_alpha if o.conv_alpha is not None else o.alpha
        )
        unet_layers = unet_targets(self.unet, o.targets) if o.train_unet else {}
        text_kinds = ["text_attention", "text_mlp"]
        text_layers = text_targets(self.text_encoder, text_kinds) if o.train_text_encoder else {}
        # SDXL: kohya trains both encoders' adapters (`lora_te1_`, `lora_te2_`) at the text learning rate
        second = self.text_encoder_2 if o.train_text_encoder else None
        text_layers_2 = None if second is None else text_targets(second, text_kinds)
        return LoRANetwork(
            self.unet, self.text_encoder, unet_layers, text_layers, spec, conv_spec, text_layers_2
        )

    # ------------------------------------------------------------------------------------------ optimizer

    def param_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]]:
        """U-Net adapters at `unet_lr`, text-encoder adapters at `text_encoder_lr` (each default: lr)."""
        network = unwrap(model)
        assert isinstance(network, LoRANetwork)
        o = self.lora
        return [
            {"params": network.component_parameters("unet"), "lr_scale": (o.unet_lr or lr) / lr},
            {
                "params": network.component_parameters("text_encoder")
                + network.component_parameters("text_encoder_2"),
                "lr_scale": (o.text_encoder_lr or lr) / lr,
            },
        ]

    def parts(self, model: nn.Module) -> tuple[nn.Module, nn.Module]:
        """The frozen U-Net and text encoder (the live adapters hook into both)."""
        return self.unet, self.text_encoder

    @contextlib.contextmanager
    def live(self, model: nn.Module) -> Iterator[LoRANetwork]:
        """Make `model`'s adapters (the trained ones, or the EMA copy's) the ones the models run."""
        network = unwrap(model)
        assert isinstance(network, LoRANetwork)
        with self.network.swap(network) as active:
            yield active

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        with self.live(model):
            return super().evaluate(model)

    def samples(self, model: nn.Module) -> Image.Image | None:
        with self.live(model):
            return super().samples(model)

    # ---------------------------------------------------------------------------------------------- export

    def export(self, model: nn.Module, path: Path) -> None:
        """A kohya LoRA `.safetensors` of `model`'s adapters, with sd-scripts' `ss_*` metadata."""
        network = unwrap(model)
        assert isinstance(network, LoRANetwork)
        modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        prefixes = component_prefixes(self.family)
        for name, adapter in network.adapters.items():
            assert isinstance(adapter, LoRAAdapter)
            component, module = network.module_names[name]
            modules[prefixes[component] + module] = adapter.factors()
        save_kohya_lora(
            path, modules, self.family, self.metadata(), dtype=dtype_from_name(self.options.export_dtype)
        )

    def metadata(self) -> dict[str, str]:
        """sd-scripts' `ss_*` fields (train_network.py's names; values as strings, as kohya stores them)."""
        o, run = self.lora, self.run or RunConfig(task=self.name)
        conv = "conv" in o.targets
        network_args = {
            k: str(v)
            for k, v in {
                "conv_dim": (o.conv_rank or o.rank) if conv else None,
                "conv_alpha": (o.conv_alpha if o.conv_alpha is not None else o.alpha) if conv else None,
                "rank_dropout": o.rank_dropout or None,
                "module_dropout": o.module_dropout or None,
            }.items()
            if v is not None
        }
        images = len(self.dataset("train"))  # type: ignore[arg-type]
        fields: dict[str, Any] = {
            "ss_output_name": Path(run.run_dir).name,
            "ss_sd_model_name": Path(o.init).name if o.init else "",
            "ss_learning_rate": run.lr,
            "ss_unet_lr": o.unet_lr or run.lr if o.train_unet else None,
            "ss_text_encoder_lr": o.text_encoder_lr or run.lr if o.train_text_encoder else None,
            "ss_network_dropout": o.dropout or None,
            "ss_num_train_images": images,
            "ss_num_reg_images": self.regularisation_images(),
            "ss_num_batches_per_epoch": max(1, images // run.batch_size),
            "ss_num_epochs": -(-run.max_steps * run.batch_size // max(1, images)),
            "ss_steps": run.max_steps,
            "ss_max_train_steps": run.max_steps,
            "ss_batch_size_per_device": run.batch_size // run.grad_accum,
            "ss_total_batch_size": run.batch_size,
            "ss_gradient_accumulation_steps": run.grad_accum,
            "ss_gradient_checkpointing": run.gradient_checkpointing or o.gradient_checkpointing,
            "ss_lr_warmup_steps": run.warmup_steps,
            "ss_lr_scheduler": run.lr_schedule,
            "ss_optimizer": f"torch.optim.AdamW(weight_decay={run.weight_decay},betas={tuple(run.betas)})",
            "ss_max_grad_norm": run.grad_clip,
            "ss_mixed_precision": run.mixed_precision,
            "ss_seed": run.seed,
            "ss_resolution": f"({o.resolution}, {o.resolution})",
            "ss_clip_skip": self.family.default_clip_skip,
            "ss_noise_offset": o.noise_offset or None,
            "ss_min_snr_gamma": o.min_snr_gamma,
            "ss_caption_dropout_rate": o.caption_dropout,
            "ss_shuffle_caption": o.shuffle_caption,
            "ss_keep_tokens": o.keep_tokens,
            "ss_flip_aug": o.flip,
            "ss_random_crop": not o.center_crop,
            "ss_enable_bucket": o.buckets,
            "ss_cache_latents": o.cache,
            "ss_network_train_unet_only": not o.train_text_encoder,
            "ss_network_train_text_encoder_only": not o.train_unet,
            "ss_training_comment": o.training_comment or None,
            "ss_training_finished_at": time.time(),
            "ss_latentforge_targets": json.dumps(list(o.targets)),
            "ss_latentforge_options": json.dumps(_plain(asdict(o))),
        }
        written = {k: str(v) for k, v in fields.items() if v is not None}
        return kohya_metadata(self.family, o.rank, o.alpha, **network_args) | written

    def regularisation_images(self) -> int:
        """Class (prior-preservation) images in the run; DreamBooth overrides it."""
        return 0


def _plain(value: Any) -> Any:
    """Dataclass values as JSON (configs as dicts, tuples as lists)."""
    return json.loads(
        json.dumps(value, default=lambda v: asdict(v) if hasattr(v, "__dataclass_fields__") else str(v))
    )


def _check_lora_options(options: LoRATaskOptions, task: str) -> None:
    if options.init is None:
        raise ConfigError(
            f"task_options.init is required for `train {task}`: adapters train on an existing model; set it "
            "to a checkpoint file or diffusers folder"
        )
    unknown = [t for t in options.targets if t not in UNET_TARGETS]
    if unknown:
        raise ConfigError(
            f"task_options.targets = {list(options.targets)}: unknown target {unknown[0]!r}; valid: "
            f"{', '.join(UNET_TARGETS)} (the text encoder: train_text_encoder = true)"
        )
    if not (options.train_unet and options.targets) and not options.train_text_encoder:
        raise ConfigError(
            "nothing to train: set task_options.train_unet = true with targets, or train_text_encoder = true"
        )
    if options.train_text_encoder and options.cache and options.cache_text == "hidden":
        raise ConfigError(
            'task_options.train_text_encoder = true cannot use cache_text = "hidden" (the text states change '
            'as the adapters train); set cache_text = "ids"'
        )


def make_lora_task(config: RunConfig) -> LoRATask:
    """The `TASKS["lora"]` factory."""
    device = resolve_device(config.device, int(os.environ.get("LOCAL_RANK", "0")))
    return LoRATask(config.task_options, seed=config.seed, device=device, run=config)
