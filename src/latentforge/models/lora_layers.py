"""Trainable LoRA / LoCon adapters on the Linear and Conv2d layers of a U-Net and text encoder.

One adapter per wrapped layer, as kohya's sd-scripts `networks/lora.py` (`LoRAModule`) builds it:
    y = W x + m * s * up(mask_r * dropout(down(x))),  s = alpha / r
with `down` [r, in] (a Conv2d with the layer's kernel/stride/padding for convolutions), `up` [out, r]
(1x1 for convolutions), `down` Kaiming-uniform (a = sqrt 5) and `up` zero at init, so a new adapter
changes nothing. In training only: `dropout` on down(x), `rank_dropout` (a per-sample mask over the r
ranks, s scaled by 1 / (1 - p)) and `module_dropout` (the whole adapter skipped with probability p).
Adapters attach through forward hooks, so the wrapped model keeps its state-dict keys and `detach()`
restores it exactly. Adapter names are kohya's (`lora_unet_<module with _ for .>`, `lora_te_...`), so
`LoRANetwork.state_dict()` is already the kohya file layout on our original module names.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from copy import deepcopy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

# What `targets` may name, and which layers each covers (our original checkpoint module names).
TARGETS = ("attention", "feed_forward", "conv", "text_attention", "text_mlp")
_ATTENTION_LEAVES = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out")
_FF_LEAVES = ("ff.net.0.proj", "ff.net.2")
_TEXT_ATTENTION_LEAVES = ("q_proj", "k_proj", "v_proj", "out_proj")
_TEXT_MLP_LEAVES = ("fc1", "fc2")
PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}


@dataclass(frozen=True)
class LoRASpec:
    """Rank and alpha of one kind of layer, and the kohya dropouts."""

    rank: int = 4
    alpha: float = 1.0
    dropout: float = 0.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0


class LoRAAdapter(nn.Module):
    """down/up factors and alpha for one Linear or Conv2d; applied by `LoRANetwork`'s hook."""

    def __init__(self, layer: nn.Linear | nn.Conv2d, spec: LoRASpec) -> None:
        super().__init__()
        rank = spec.rank
        if isinstance(layer, nn.Conv2d):
            self.lora_down: nn.Module = nn.Conv2d(
                layer.in_channels,
                rank,
                layer.kernel_size,  # type: ignore[arg-type]
                layer.stride,  # type: ignore[arg-type]
                layer.padding,  # type: ignore[arg-type]
                bias=False,
            )
            self.lora_up: nn.Module = nn.Conv2d(rank, layer.out_channels, 1, bias=False)
        else:
            self.lora_down = nn.Linear(layer.in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, layer.out_features, bias=False)
        # kohya and PEFT (`init_lora_weights=True`) both init this way: the adapter starts as a no-op.
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.register_buffer("alpha", torch.tensor(float(spec.alpha)))
        self.rank, self.spec = rank, spec
        self.multiplier = 1.0
        dtype = layer.weight.dtype
        self.to(device=layer.weight.device, dtype=dtype if dtype.is_floating_point else None)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(down, up, alpha) as a LoRA file stores them (detached)."""
        down, up = self.lora_down.weight, self.lora_up.weight
        return down.detach(), up.detach(), float(self.alpha)  # type: ignore[union-attr,operator,arg-type]

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank  # type: ignore[arg-type]

    def delta(self, x: torch.Tensor) -> torch.Tensor | None:
        """The adapter's contribution to the layer's output for input `x` (None: skipped this call)."""
        spec = self.spec
        if self.training and spec.module_dropout and float(torch.rand(())) < spec.module_dropout:
            return None
        hidden = self.lora_down(x.to(self.lora_down.weight.dtype))  # type: ignore[arg-type]
        scale = self.scale
        if self.training and spec.dropout:
            hidden = F.dropout(hidden, p=spec.dropout)
        if self.training and spec.rank_dropout:
            # [B, r] mask, broadcast over tokens ([B, T, r]) or pixels ([B, r, H, W]) as kohya does
            mask = (torch.rand(hidden.shape[0], self.rank, device=hidden.device) > spec.rank_dropout).to(
                hidden
            )
            if hidden.dim() == 3:
                mask = mask[:, None, :]
            elif hidden.dim() == 4:
                mask = mask[:, :, None, None]
            hidden = hidden * mask
            scale /= 1.0 - spec.rank_dropout
        return self.lora_up(hidden) * (self.multiplier * scale)


def _leaf_matches(name: str, leaves: Sequence[str]) -> bool:
    return any(name == leaf or name.endswith("." + leaf) for leaf in leaves)


def unet_targets(unet: nn.Module, targets: Iterable[str]) -> dict[str, nn.Linear | nn.Conv2d]:
    """U-Net layers for `targets`: attention (q/k/v/out and proj_in/out, kohya's Transformer2DModel set),
    feed_forward (GEGLU in, out), conv (LoCon: every Conv2d/Linear of ResBlocks, Downsample, Upsample)."""
    from latentforge.models.unet import Downsample, ResBlock, SpatialTransformer, Upsample

    wanted = set(targets)
    found: dict[str, nn.Linear | nn.Conv2d] = {}
    for parent_name, parent in unet.named_modules():
        if isinstance(parent, SpatialTransformer):
            leaves = (_ATTENTION_LEAVES if "attention" in wanted else ()) + (
                _FF_LEAVES if "feed_forward" in wanted else ()
            )
        elif isinstance(parent, ResBlock | Downsample | Upsample) and "conv" in wanted:
            leaves = ("",)
        else:
            continue
        for name, layer in parent.named_modules():
            if isinstance(layer, nn.Linear | nn.Conv2d) and (leaves == ("",) or _leaf_matches(name, leaves)):
                found[f"{parent_name}.{name}"] = layer
    return found


def text_targets(text_encoder: nn.Module, targets: Iterable[str]) -> dict[str, nn.Linear | nn.Conv2d]:
    """Text-encoder layers: text_attention (q/k/v/out_proj), text_mlp (fc1, fc2) of every encoder layer."""
    wanted = set(targets)
    leaves = (_TEXT_ATTENTION_LEAVES if "text_attention" in wanted else ()) + (
        _TEXT_MLP_LEAVES if "text_mlp" in wanted else ()
    )
    return {
        name: layer
        for name, layer in text_encoder.named_modules()
        if isinstance(layer, nn.Linear) and ".encoder.layers." in f".{name}" and _leaf_matches(name, leaves)
    }


def kohya_name(component: str, module: str) -> str:
    """`lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q` for ("unet", "input_blocks.1.1....")."""
    return PREFIXES[component] + module.replace(".", "_")


class LoRANetwork(nn.Module):
    """The adapters of one model (the trainable module of LoRA training); `forward` runs the U-Net.

    The U-Net and text encoder(s) are held outside the module tree, so `state_dict()` holds only adapters.
    `text_layers_2` are SDXL's second (bigG) encoder's layers.
    """

    def __init__(
        self,
        unet: nn.Module,
        text_encoder: nn.Module | None,
        unet_layers: dict[str, nn.Linear | nn.Conv2d],
        text_layers: dict[str, nn.Linear | nn.Conv2d],
        spec: LoRASpec,
        conv_spec: LoRASpec | None = None,
        text_layers_2: dict[str, nn.Linear | nn.Conv2d] | None = None,
    ) -> None:
        super().__init__()
        self._models = (unet, text_encoder)
        self.adapters = nn.ModuleDict()
        self._layers: dict[str, nn.Module] = {}
        self.module_names: dict[str, tuple[str, str]] = {}  # adapter name -> (component, module name)
        components = (("unet", unet_layers), ("text_encoder", text_layers), ("text_encoder_2", text_layers_2))
        for component, layers in ((c, layers) for c, layers in components if layers):
            for module, layer in layers.items():
                is_spatial = isinstance(layer, nn.Conv2d) and layer.kernel_size != (1, 1)
                adapter = LoRAAdapter(layer, conv_spec if is_spatial and conv_spec else spec)
                name = kohya_name(component, module)
                self.adapters[name] = adapter
                self._layers[name] = layer
                self.module_names[name] = (component, module)
        self._handles: list[RemovableHandle] = []
        self.attach()

    @property
    def unet(self) -> nn.Module:
        return self._models[0]

    @property
    def text_encoder(self) -> nn.Module | None:
        return self._models[1]

    def component_parameters(self, component: str) -> list[nn.Parameter]:
        """Parameters of the adapters of "unet", "text_encoder" or "text_encoder_2" (for learning rates)."""
        prefix = PREFIXES[component]
        return [p for name, a in self.adapters.items() if name.startswith(prefix) for p in a.parameters()]

    def attach(self) -> None:
        """Hook every adapter onto its layer (idempotent)."""
        if self._handles:
            return
        for name, layer in self._layers.items():
            adapter = self.adapters[name]

            def hook(_module: nn.Module, args: tuple, output: torch.Tensor, adapter=adapter) -> torch.Tensor:  # noqa: ANN001
                delta = adapter.delta(args[0])
                return output if delta is None else output + delta.to(output.dtype)

            self._handles.append(layer.register_forward_hook(hook))

    def detach(self) -> None:
        """Remove every hook: the model computes exactly what it did before `attach`."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __deepcopy__(self, memo: dict) -> LoRANetwork:
        """A copy of the adapters (e.g. the EMA's) on the same models, detached: `swap` makes it live."""
        copy = LoRANetwork.__new__(LoRANetwork)
        nn.Module.__init__(copy)
        copy._models = self._models
        copy.adapters = deepcopy(self.adapters, memo)
        copy._layers, copy.module_names, copy._handles = self._layers, dict(self.module_names), []
        copy.train(self.training)
        return copy

    @contextmanager
    def swap(self, other: LoRANetwork) -> Iterator[LoRANetwork]:
        """Run `other` (adapters on the same layers, e.g. an EMA copy) instead of this network for a while."""
        if other is self:
            yield self
            return
        self.detach()
        other.attach()
        try:
            yield other
        finally:
            other.detach()
            self.attach()

    def set_multiplier(self, value: float) -> None:
        for adapter in self.adapters.values():
            adapter.multiplier = value  # type: ignore[assignment]

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.unet(x, timesteps, context, y=y)  # y: SDXL's vector
