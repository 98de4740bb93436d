"""X/Y/Z plots (A1111's script): one request per cell, a field varied along each axis, labelled grids.

An axis is `FIELD=V1,V2,...` over any `GenerationRequest` field, or a part's field as `hires.scale`,
`init.denoising_strength`, `inpaint.mask_blur`, or a sampler option as `sampler_options.s_noise`.
Values are read as CSV (quote values holding commas) and converted to the field's type. Every cell uses
the same seed (drawn once when random), as A1111 does, so only the axes differ between cells.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from dataclasses import dataclass, fields, replace
from typing import Any

from PIL import Image

from latentforge.errors import ParameterError
from latentforge.model import StableDiffusion
from latentforge.pipelines.generate import SKIP, GeneratedImage, StepCallback
from latentforge.pipelines.grid import labelled_grid
from latentforge.pipelines.request import GenerationRequest, Hires, InitImage, Inpaint
from latentforge.pipelines.runner import iter_images
from latentforge.pipelines.seeds import resolve_seed

_PARTS: dict[str, type] = {"hires": Hires, "init": InitImage, "inpaint": Inpaint}
_NOT_AXES = (
    "prompt_seeds",
    "sigmas",
    "extra",
    "init",
    "inpaint",
    "hires",
    "sampler_options",
    "images",
    "mask",
)


@dataclass(frozen=True)
class Axis:
    field: str  # "steps", "hires.scale", "sampler_options.s_noise"
    values: tuple[Any, ...]

    @property
    def labels(self) -> list[str]:
        return [f"{self.field}: {value}" for value in self.values]


def _field_types(cls: type) -> dict[str, Any]:
    return {f.name: f.default for f in fields(cls) if f.name not in _NOT_AXES}


def _convert(field: str, text: str, default: Any) -> Any:
    try:
        if isinstance(default, bool) or default is None and text.lower() in ("true", "false"):
            if text.lower() not in ("true", "false"):
                raise ValueError
            return text.lower() == "true"
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float) or default is None:
            return float(text)
    except ValueError:
        kind = "true/false" if isinstance(default, bool) else type(default).__name__
        raise ParameterError(f"axis {field}: {text!r} is not a {kind}") from None
    return text


def parse_axis(text: str) -> Axis:
    """`FIELD=V1,V2` -> Axis; errors name the valid fields."""
    field, sep, values = text.partition("=")
    field = field.strip()
    head, _, tail = field.partition(".")
    if head in _PARTS:
        known = _field_types(_PARTS[head])
    elif head == "sampler_options" and tail:
        known = {tail: None}
    else:
        known = _field_types(GenerationRequest)
    key = tail if head in _PARTS or head == "sampler_options" else head
    if not sep or key not in known or not values.strip():
        valid = sorted(_field_types(GenerationRequest)) + [
            f"{part}.{name}" for part, cls in _PARTS.items() for name in _field_types(cls)
        ]
        raise ParameterError(
            f"an axis looks like FIELD=V1,V2,... with FIELD one of {', '.join(valid)} or "
            f"sampler_options.NAME; got {text!r}"
        )
    row = next(csv.reader(io.StringIO(values), skipinitialspace=True))
    converted = tuple(_convert(field, v.strip(), known[key]) for v in row if v.strip())
    return Axis(field, converted)


def with_value(request: GenerationRequest, field: str, value: Any) -> GenerationRequest:
    """The request with one (possibly nested) field set."""
    head, _, tail = field.partition(".")
    if head == "sampler_options":
        return replace(request, sampler_options={**request.sampler_options, tail: value})
    if head in _PARTS:
        part = getattr(request, head) or _PARTS[head]()
        return replace(request, **{head: replace(part, **{tail: value})})
    return replace(request, **{head: value})


def cells(base: GenerationRequest, axes: list[Axis]) -> Iterator[tuple[tuple[int, ...], GenerationRequest]]:
    """((x, y, z) index, request) of every cell, X fastest; one seed for all cells."""
    base = replace(base, seed=resolve_seed(base.seed))
    sizes = [len(axis.values) for axis in axes]
    total = 1
    for size in sizes:
        total *= size
    for flat in range(total):
        index, request, rest = [], base, flat
        for axis, size in zip(axes, sizes, strict=True):
            i, rest = rest % size, rest // size
            index.append(i)
            request = with_value(request, axis.field, axis.values[i])
        yield tuple(index), request


def xyz_plot(
    model: StableDiffusion,
    base: GenerationRequest,
    axes: list[Axis],
    *,
    callback: StepCallback | None = None,
    progress: bool = True,
) -> tuple[list[Image.Image], list[GeneratedImage]]:
    """(one labelled grid per Z value, the first image of every cell in X, Y, Z order).

    `callback` sees every step of every cell, as in `iter_images`: True stops the plot after the current
    cell (the cells not made stay blank in the grid, as A1111's), `SKIP` ends the current cell early.
    """
    if not 1 <= len(axes) <= 3:
        raise ParameterError(f"an X/Y/Z plot takes 1 to 3 axes, got {len(axes)}")
    results: list[GeneratedImage] = []
    by_cell: dict[tuple[int, ...], Image.Image] = {}
    stopped = False

    def on_step(info: Any) -> bool | str | None:
        nonlocal stopped
        answer = callback(info) if callback is not None else None
        stopped = stopped or (bool(answer) and answer != SKIP)
        return answer

    for index, request in cells(base, axes):
        cell = replace(request, batch_count=1)
        result = next(iter_images(model, cell, callback=on_step, progress=progress))
        by_cell[index if len(axes) > 1 else (index[0], 0)] = result.image
        results.append(result)
        if stopped:
            break
    y_labels = axes[1].labels if len(axes) > 1 else [""]
    z_labels = axes[2].labels if len(axes) > 2 else None
    return labelled_grid(by_cell, axes[0].labels, y_labels, z_labels), results
