"""Evaluation networks selected by name: `clip:PATH`, `inception:PATH` or `random` (tests only).

An `EvalExtractor` bundles what `evaluate` needs from one network: image features (and, for Inception,
class logits for IS in the same forward pass), the input size, the resize mode (`resize.RESIZE_MODES`;
None for CLIP, whose preprocessing is fixed by the model), and for CLIP the text tower of CLIP score.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from latentforge.checkpoints.errors import CheckpointError
from latentforge.evaluation.features import FeatureExtractor, RandomProjectionExtractor
from latentforge.evaluation.image_sets import EvalInputError
from latentforge.evaluation.inception import INPUT_SIZE, NUM_CLASSES, FIDInceptionV3
from latentforge.evaluation.resize import DEFAULT_RESIZE_MODE, check_resize_mode, preprocess_id

SPEC_HELP = "clip:PATH (a `latentforge train clip` export), inception:PATH (FID Inception weights) or random"
RANDOM_INPUT_SIZE = 32


class ExtractorError(EvalInputError):
    """A feature-extractor spec or weights file that cannot be used; the message says what to pass."""


@dataclass
class EvalExtractor:
    """One evaluation network: uint8 [B, 3, H, W] -> [B, D + num_logits] (trailing columns: IS logits).

    With a `resize_mode` the network takes whole images of any size and resizes them by that mode; without
    one (CLIP, bare extractors) images arrive centre-cropped and resized to `input_size` (`square_resize`).
    """

    image: FeatureExtractor
    input_size: int
    num_logits: int = 0
    encode_text: Callable[[Sequence[str]], np.ndarray] | None = None  # L2-normalised text embeddings
    spec: str = ""
    resize_mode: str | None = None

    @property
    def kind(self) -> str:
        return self.spec.partition(":")[0] or self.image.name


class InceptionPoolAndLogits:
    """FID Inception pool3 features [B, 2048] and bias-free logits [B, 1008] from one forward pass."""

    def __init__(
        self,
        model: FIDInceptionV3,
        name: str,
        device: torch.device | str = "cpu",
        resize_mode: str = DEFAULT_RESIZE_MODE,
    ) -> None:
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.name = name
        self.resize_mode = check_resize_mode(resize_mode)
        self.preprocess_id = preprocess_id(resize_mode, INPUT_SIZE)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model(images.to(self.device), self.resize_mode)
        return torch.cat([out.pool3, out.logits_unbiased], dim=1)  # [B, 2048 + 1008]


def _short_digest(module: torch.nn.Module) -> str:
    from latentforge.checkpoints.hashing import weights_digest

    return weights_digest(module)[:12]


def load_inception_extractor(
    path: str | os.PathLike, device: torch.device | str = "cpu", resize_mode: str = DEFAULT_RESIZE_MODE
) -> EvalExtractor:
    """FID Inception from pytorch-fid's or torch-fidelity's weights file; others raise `ExtractorError`."""
    from latentforge.checkpoints.reading import sniff
    from latentforge.evaluation.inception import load_fid_inception

    hint = "inception:PATH expects the FID Inception-v3 weights (pt_inception-2015-12-05-*.pth)"
    try:
        sniff(Path(_existing(path, "inception")))
        model = load_fid_inception(path, device=device)
    except (CheckpointError, ValueError, RuntimeError, KeyError, OSError, pickle.UnpicklingError) as error:
        raise ExtractorError(f"{hint}; {path} cannot be used: {error}") from error
    name = f"inception-v3-fid-{_short_digest(model)}/pool3+logits_unbiased"
    image = InceptionPoolAndLogits(model, name, device, resize_mode)
    return EvalExtractor(image, INPUT_SIZE, NUM_CLASSES, spec=f"inception:{path}", resize_mode=resize_mode)


def load_clip_extractor(path: str | os.PathLike, device: torch.device | str = "cpu") -> EvalExtractor:
    """Our CLIP: image embeddings as features, text tower for CLIP score; others raise `ExtractorError`."""
    from latentforge.checkpoints.exports import load_clip
    from latentforge.evaluation.clip_features import clip_image_extractor, encode_captions

    hint = "clip:PATH expects a CLIP exported by `latentforge train clip`"
    try:
        model = load_clip(_existing(path, "clip")).float().to(device)  # metrics in float32
    except (CheckpointError, ValueError, RuntimeError, KeyError, OSError) as error:
        raise ExtractorError(f"{hint}; {path} cannot be used: {error}") from error
    extractor = clip_image_extractor(model, name=f"latentforge-clip-{_short_digest(model)}")

    def encode_text(captions: Sequence[str]) -> np.ndarray:
        return encode_captions(model, captions)

    return EvalExtractor(extractor, model.config.vision.image_size, 0, encode_text, spec=f"clip:{path}")


def _existing(path: str | os.PathLike, kind: str) -> str:
    if not os.path.isfile(path):
        raise ExtractorError(f"{kind}:PATH: no such file {os.fspath(path)!r}")
    return os.fspath(path)


def load_extractor(
    spec: str | EvalExtractor, device: torch.device | str = "cpu", resize_mode: str | None = None
) -> EvalExtractor:
    """An `EvalExtractor` from a spec string (see `SPEC_HELP`); an `EvalExtractor` passes through.

    `resize_mode` (default `DEFAULT_RESIZE_MODE`) applies to inception and random; CLIP refuses it.
    """
    if isinstance(spec, EvalExtractor):
        return spec
    kind, sep, path = spec.partition(":")
    if kind == "clip" and path:
        if resize_mode is not None:
            raise ExtractorError(
                f"resize mode {resize_mode!r} does not apply to clip:PATH features: a CLIP's preprocessing "
                "is fixed by the model (centre crop, bicubic to its image size, its mean/std); drop "
                "--resize-mode or use --features inception:PATH"
            )
        return load_clip_extractor(path, device)
    mode = check_resize_mode(resize_mode or DEFAULT_RESIZE_MODE)
    if kind == "random" and not path:
        image = RandomProjectionExtractor(resize_mode=mode, input_size=RANDOM_INPUT_SIZE)
        return EvalExtractor(image, RANDOM_INPUT_SIZE, spec="random", resize_mode=mode)
    if kind == "inception" and path:
        return load_inception_extractor(path, device, mode)
    raise ExtractorError(f"unknown feature extractor {spec!r}; use {SPEC_HELP}")


def as_eval_extractor(
    extractor: str | EvalExtractor | FeatureExtractor, input_size: int = 299
) -> EvalExtractor:
    """Accept a spec, an `EvalExtractor`, or any bare `FeatureExtractor` (features only, at `input_size`)."""
    if isinstance(extractor, (str, EvalExtractor)):
        return load_extractor(extractor)
    if isinstance(extractor, FeatureExtractor):
        size, mode = getattr(extractor, "input_size", input_size), getattr(extractor, "resize_mode", None)
        return EvalExtractor(extractor, size, spec=extractor.name, resize_mode=mode)
    raise TypeError(f"extractor must be a spec string ({SPEC_HELP}), an EvalExtractor or a FeatureExtractor")
