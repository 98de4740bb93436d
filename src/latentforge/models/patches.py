"""The one weight-patch mechanism: add deltas at a strength to named parameters, undo bit-exactly, or bake.

A patch is `W <- W + sum_i s_i * dW_i`, computed in float32 and rounded once to the parameter's dtype, so
several deltas on one parameter cost one rounding. Undo copies back an exact clone of every touched
parameter taken before the first write (never `W - dW`, which is not exact in fp16/bf16). Deltas are
callables so a full-size LoRA never holds every dense delta at once; every name and shape is checked before
any parameter is written. LoRA, LyCORIS and merges (`checkpoints/lora.py`) all go through `patch_weights`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary


@dataclass(frozen=True)
class WeightDelta:
    """`strength * compute()` is added to parameter `name` of module `component` (shape `shape`)."""

    component: str
    name: str
    shape: tuple[int, ...]
    compute: Callable[[], torch.Tensor]
    strength: float = 1.0


class PatchShapeError(ValueError):
    """A delta whose name or shape does not fit the module; raised before anything is written."""


# Live (not undone, not baked) handles per parameter, oldest first: undo must go newest first, since a
# later handle's copies hold the earlier patch and undoing the earlier one first would resurrect it.
_LIVE = WeakIdKeyDictionary()  # keyed by identity: tensors compare element-wise


@dataclass(eq=False)
class PatchHandle:
    """Undo data of one `patch_weights` call: exact copies of the touched parameters before the patch."""

    originals: dict[tuple[str, str], tuple[nn.Parameter, torch.Tensor]] = field(default_factory=dict)
    baked: bool = False
    undone: bool = False

    @property
    def touched(self) -> list[tuple[str, str]]:
        return sorted(self.originals)

    def undo(self) -> None:
        """Restore every touched parameter bit for bit (idempotent). Undo stacked patches in reverse order."""
        if self.baked:
            raise RuntimeError("a baked patch keeps no undo data")
        if self.undone:
            return
        if any(_LIVE.get(parameter, [self])[-1] is not self for parameter, _ in self.originals.values()):
            raise RuntimeError("a later patch of the same weights is still applied: undo it first")
        with torch.no_grad():
            for parameter, original in self.originals.values():
                parameter.copy_(original)
                _LIVE[parameter].pop()
        self.originals.clear()
        self.undone = True

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if not self.baked:
            self.undo()


def _fits(delta_shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    """Same shape, or equal up to trailing 1x1 kernel dims (a Linear delta on a 1x1 conv and back)."""

    def squeeze(shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape[:2] if len(shape) == 4 and shape[2:] == (1, 1) else shape

    return squeeze(tuple(delta_shape)) == squeeze(tuple(target))


def check_deltas(modules: Mapping[str, nn.Module], deltas: Iterable[WeightDelta]) -> list[str]:
    """Problems (unknown component/parameter, wrong shape) of `deltas` against `modules`; empty when fine."""
    problems = []
    params = {name: dict(module.named_parameters()) for name, module in modules.items()}
    for delta in deltas:
        target = params.get(delta.component, {}).get(delta.name)
        if target is None:
            problems.append(f"{delta.component}.{delta.name}: no such parameter")
        elif not _fits(delta.shape, tuple(target.shape)):
            problems.append(
                f"{delta.component}.{delta.name}: delta {list(delta.shape)} vs parameter {list(target.shape)}"
            )
    return problems


def patch_weights(
    modules: Mapping[str, nn.Module], deltas: Iterable[WeightDelta], *, bake: bool = False
) -> PatchHandle:
    """Add every delta (several may share a parameter) and return the handle that undoes them exactly.

    `bake=True` keeps no copies (the patch is permanent). Raises `PatchShapeError` before any write.
    """
    deltas = list(deltas)
    problems = check_deltas(modules, deltas)
    if problems:
        more = f" (+{len(problems) - 8} more)" if len(problems) > 8 else ""
        raise PatchShapeError(f"{len(problems)} deltas do not fit: {'; '.join(problems[:8])}{more}")
    grouped: dict[tuple[str, str], list[WeightDelta]] = {}
    for delta in deltas:
        grouped.setdefault((delta.component, delta.name), []).append(delta)
    params = {name: dict(module.named_parameters()) for name, module in modules.items()}
    handle = PatchHandle(baked=bake)
    with torch.no_grad():
        for (component, name), group in grouped.items():
            parameter = params[component][name]
            total = parameter.detach().to(torch.float32, copy=True)
            for delta in group:
                if delta.strength == 0:
                    continue  # weight 0 must leave the parameter bit-identical, as no patch would
                update = delta.compute().to(device=total.device, dtype=torch.float32)
                total.add_(update.reshape(total.shape), alpha=delta.strength)
            if not bake:
                handle.originals[(component, name)] = (parameter, parameter.detach().clone())
                _LIVE.setdefault(parameter, []).append(handle)
            if any(delta.strength != 0 for delta in group):
                parameter.copy_(total.to(parameter.dtype))
    return handle
