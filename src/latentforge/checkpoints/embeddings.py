"""Textual-inversion embeddings: the one reader and writer of their files.

Layouts read (A1111 `modules/textual_inversion/textual_inversion.py`, `create_embedding_from_data`):
- A1111 `.pt`: `{"string_to_param": {"*": [n, width]}, "string_to_token": {"*": 265}, "name", "step",
  "sd_checkpoint", "sd_checkpoint_name"}` (files from torch 1.11 pickle `string_to_param` as a
  `ParameterDict`; it is rebuilt from its state by an inert stand-in, never by running the file's code);
- one-tensor files: kohya's `{"emb_params": [n, width]}` (.safetensors or .pt) and diffusers'
  `learned_embeds.bin/.safetensors` `{token: [width] or [n, width]}`;
- SDXL: `{"clip_l": [n, 768], "clip_g": [n, 1280]}`, both kept (`sdxl`); its width is their sum, as A1111.
The name used in prompts is the file stem (A1111); the stored `name` is kept as `stored_name`.
`write_embedding` writes A1111's `.pt` layout or the `emb_params` `.safetensors` layout.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from latentforge.checkpoints.errors import CorruptCheckpointError, UnknownArchitectureError
from latentforge.checkpoints.hashing import sha256_file
from latentforge.checkpoints.reading import InertObject, load_torch_pickle, read_state_dict, sniff
from latentforge.checkpoints.writing import atomic_path, save_safetensors

EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors")
# Text-encoder widths -> the family an embedding of that width was trained for (SDXL: clip_l + clip_g).
WIDTH_FAMILIES = {768: "SD1", 1024: "SD2", 2048: "SDXL"}
_A1111_STAR_TOKEN = 265  # the id of "*" that A1111 writes in `string_to_token` (its placeholder)
# torch 1.11 pickled `string_to_param` as an nn.ParameterDict; an inert stand-in keeps its state.
_PARAMETER_DICT = [(InertObject, "torch.nn.modules.container.ParameterDict")]


@dataclass(frozen=True)
class Embedding:
    """One embedding: `vectors` [n, width] float32, one per token position it takes in a prompt."""

    name: str  # the file stem: the word prompts use
    vectors: torch.Tensor
    path: Path | None = None
    step: int | None = None
    stored_name: str | None = None
    checkpoint_hash: str | None = None  # A1111's `sd_checkpoint` / `sd_checkpoint_name`
    checkpoint_name: str | None = None
    sdxl: Mapping[str, torch.Tensor] = field(default_factory=dict)  # {"clip_l", "clip_g"} of SDXL files
    hash: str = ""  # A1111's short hash: the first 12 hex digits of the file's SHA-256

    @property
    def count(self) -> int:
        """Token positions it takes (A1111's `vectors`)."""
        return int(self.vectors.shape[0])

    @property
    def width(self) -> int:
        """A1111's `shape`: the vector width, clip_l + clip_g for SDXL files."""
        return sum(int(v.shape[-1]) for v in self.sdxl.values()) if self.sdxl else int(self.vectors.shape[-1])

    @property
    def family(self) -> str:
        return WIDTH_FAMILIES.get(self.width, f"a text encoder of width {self.width}")


def _as_vectors(path: Path, tensor: object, where: str) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or tensor.dim() not in (1, 2):
        raise CorruptCheckpointError(path, f"{where} is not a [tokens, width] float tensor")
    vectors = tensor.detach().to(torch.float32, copy=True).reshape(-1, tensor.shape[-1])  # [n, width]
    if vectors.shape[0] == 0 or vectors.shape[1] == 0:
        raise CorruptCheckpointError(path, f"{where} is empty ({tuple(tensor.shape)})")
    if not torch.isfinite(vectors).all():
        raise CorruptCheckpointError(path, f"{where} holds NaN or Inf values")
    return vectors


def _single(path: Path, tensors: Mapping[str, object], what: str) -> tuple[str, object]:
    if len(tensors) != 1:  # A1111: "embedding file has multiple terms in it"
        names = ", ".join(list(map(str, tensors))[:8])
        raise UnknownArchitectureError(path, f"{what} holds {len(tensors)} terms ({names}), expected one")
    return next(iter(tensors.items()))


def read_embedding(path: str | Path, name: str | None = None) -> Embedding:
    """Read one embedding file of any layout above; `name` defaults to the file stem."""
    path = Path(path)
    data: Mapping[str, object]
    if path.is_file() and sniff(path) == "torch":
        loaded = load_torch_pickle(path, _PARAMETER_DICT)
        if not isinstance(loaded, dict):
            raise CorruptCheckpointError(path, f"expected a dict, found {type(loaded).__name__}")
        data = loaded
    else:
        data, metadata = read_state_dict(path)
        data = {**data, **{k: v for k, v in metadata.items() if k in ("name", "step")}}
    info: dict[str, object] = {}
    sdxl: dict[str, torch.Tensor] = {}
    if "string_to_param" in data:
        params = data["string_to_param"]
        if isinstance(params, InertObject):  # torch 1.11's ParameterDict: its `_parameters` hold the tensors
            params = getattr(params, "state", {}).get("_parameters", {})
        if not isinstance(params, Mapping):
            raise CorruptCheckpointError(path, "string_to_param is not a mapping of tensors")
        term, tensor = _single(path, params, "string_to_param")
        vectors = _as_vectors(path, tensor, f"string_to_param[{term!r}]")
        info = {k: data.get(k) for k in ("name", "step", "sd_checkpoint", "sd_checkpoint_name")}
    elif "clip_l" in data and "clip_g" in data:
        sdxl = {k: _as_vectors(path, data[k], k) for k in ("clip_l", "clip_g")}
        vectors = sdxl["clip_l"]
    else:
        tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
        if not tensors:
            raise UnknownArchitectureError(
                path,
                "neither a textual-inversion embedding (string_to_param, emb_params) nor a diffusers "
                "concept ({token: tensor})",
            )
        term, tensor = _single(path, tensors, "the file")
        vectors = _as_vectors(path, tensor, repr(term))
        info = {k: data.get(k) for k in ("name", "step")}
    step = info.get("step")
    return Embedding(
        name=name if name is not None else path.stem,
        vectors=vectors,
        path=path,
        step=int(step) if isinstance(step, int | str) and str(step).lstrip("-").isdigit() else None,
        stored_name=str(info["name"]) if info.get("name") is not None else None,
        checkpoint_hash=_text(info.get("sd_checkpoint")),
        checkpoint_name=_text(info.get("sd_checkpoint_name")),
        sdxl=sdxl,
        hash=sha256_file(path)[:12],
    )


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def write_embedding(
    path: str | Path,
    name: str,
    vectors: torch.Tensor | Mapping[str, torch.Tensor],
    *,
    step: int | None = None,
    checkpoint_hash: str | None = None,
    checkpoint_name: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write an embedding A1111 reads: `.pt` in its own layout, `.safetensors` as `emb_params`.

    `vectors` is [n, width] (a [width] vector is one token), or for SDXL {"clip_l": ..., "clip_g": ...}
    (`.safetensors` only). The write is atomic (temporary name, fsync, rename); returns `path`.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".pt", ".safetensors"):
        raise ValueError(f"write an embedding as .pt or .safetensors, not {path.name!r}")
    if isinstance(vectors, Mapping):
        if set(vectors) != {"clip_l", "clip_g"} or suffix != ".safetensors":
            raise ValueError("SDXL embeddings are {'clip_l', 'clip_g'} tensors written as .safetensors")
        tensors = {k: _as_vectors(path, v, k).to(dtype) for k, v in vectors.items()}
    else:
        tensors = {"emb_params": _as_vectors(path, vectors, "vectors").to(dtype)}
    if suffix == ".safetensors":
        metadata = {"name": name, **({"step": str(step)} if step is not None else {})}
        return save_safetensors(path, tensors, metadata)
    data = {
        "string_to_token": {"*": _A1111_STAR_TOKEN},
        "string_to_param": {"*": tensors["emb_params"]},
        "name": name,
        "step": step,
        "sd_checkpoint": checkpoint_hash,
        "sd_checkpoint_name": checkpoint_name,
    }
    with atomic_path(path) as tmp:
        torch.save(data, tmp)
    return path


def find_embeddings(folders: list[Path] | tuple[Path, ...]) -> dict[str, Path]:
    """Embedding files under `folders` (recursively, as A1111) by file stem; the first folder wins."""
    found: dict[str, Path] = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*")):
            if path.suffix.lower() in EMBEDDING_SUFFIXES and path.is_file():
                found.setdefault(path.stem, path)
    return found
