"""Feature extractors behind one small interface, and batched extraction to numpy.

An extractor maps uint8 images [B, 3, H, W] to features [B, D]. `name` identifies the network and output,
`preprocess_id` the input pipeline; together they key feature caches. Extractors with a `resize_mode`
(`resize.RESIZE_MODES`) take whole images of any size and resize them themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from latentforge.evaluation.inception import INPUT_SIZE, FIDInceptionV3
from latentforge.evaluation.resize import DEFAULT_RESIZE_MODE, check_resize_mode, preprocess_id, resize_images


@runtime_checkable
class FeatureExtractor(Protocol):
    """uint8 images [B, 3, H, W] -> features [B, D]; `name` and `preprocess_id` key caches."""

    name: str
    preprocess_id: str

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


class InceptionExtractor:
    """FID Inception output as features: "pool3" (FID/KID/PR, 2048-d) or "logits_unbiased"/"logits" (IS)."""

    def __init__(
        self,
        model: FIDInceptionV3,
        output: Literal["pool3", "logits", "logits_unbiased"] = "pool3",
        device: torch.device | str = "cpu",
        resize_mode: str = DEFAULT_RESIZE_MODE,
    ) -> None:
        if output not in ("pool3", "logits", "logits_unbiased"):
            raise ValueError(f"unknown Inception output {output!r}; choose pool3, logits or logits_unbiased")
        self.model = model.to(device).eval()
        self.output = output
        self.device = torch.device(device)
        self.name = f"inception-v3-fid-2015-12-05/{output}"
        self.resize_mode = check_resize_mode(resize_mode)
        self.preprocess_id = preprocess_id(resize_mode, INPUT_SIZE)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return getattr(self.model(images.to(self.device), self.resize_mode), self.output)


class ClipImageExtractor:
    """Adapter for any CLIP image tower: `preprocess` maps uint8 images to the encoder's input tensor.

    Embeddings are L2-normalised when `normalize`, as CLIP score and CLIP-FID use them.
    """

    def __init__(
        self,
        encoder: Callable[[torch.Tensor], torch.Tensor],
        preprocess: Callable[[torch.Tensor], torch.Tensor],
        name: str,
        preprocess_id: str,
        normalize: bool = True,
    ) -> None:
        self.encoder = encoder
        self.preprocess = preprocess
        self.name = name
        self.preprocess_id = preprocess_id
        self.normalize = normalize

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        embeds = self.encoder(self.preprocess(images))
        return F.normalize(embeds, dim=-1) if self.normalize else embeds


class RandomProjectionExtractor:
    """Cheap deterministic test features: average-pool to `pool`x`pool`, then a fixed random projection.

    With a `resize_mode`, images are first resized to `input_size` by that mode, as Inception's are to 299.
    """

    def __init__(
        self,
        dim: int = 64,
        pool: int = 8,
        seed: int = 0,
        resize_mode: str | None = None,
        input_size: int = 32,
    ) -> None:
        generator = torch.Generator().manual_seed(seed)
        # [3*pool*pool, dim], scaled to keep unit-variance inputs at unit variance
        self.projection = torch.randn(3 * pool * pool, dim, generator=generator) / (3 * pool * pool) ** 0.5
        self.pool = pool
        self.name = f"random-projection-{dim}-seed{seed}"
        self.resize_mode = None if resize_mode is None else check_resize_mode(resize_mode)
        self.input_size = input_size
        resize = "" if resize_mode is None else f"{resize_mode}-{input_size}-"
        self.preprocess_id = f"{resize}uint8/255-avgpool{pool}"

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images [B, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        x = images.float()
        if self.resize_mode is not None:
            x = resize_images(x, self.input_size, self.resize_mode)
        pooled = F.adaptive_avg_pool2d(x / 255, self.pool)  # [B, 3, pool, pool]
        return pooled.flatten(1) @ self.projection


def _batches(images: Iterable[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """Regroup single images [3, H, W] and/or batches [B, 3, H, W] into batches of `batch_size`.

    Whole photos go to resizing extractors at their own size: a batch also ends at `batch_size` images of
    512 x 512 worth of pixels, so that 50 camera images do not make a multi-gigabyte float batch.
    """
    pending: list[torch.Tensor] = []
    pixel_budget = batch_size * 512 * 512
    for item in images:
        for image in item if item.ndim == 4 else item[None]:
            if pending and image.shape != pending[0].shape:  # sizes differ: flush, cannot stack
                yield torch.stack(pending)
                pending = []
            pending.append(image)
            if len(pending) == batch_size or len(pending) * image[0].numel() >= pixel_budget:
                yield torch.stack(pending)
                pending = []
    if pending:
        yield torch.stack(pending)


def extract_features(
    extractor: FeatureExtractor,
    images: Iterable[torch.Tensor],
    batch_size: int = 50,
    progress: bool = True,
) -> np.ndarray:
    """Run `extractor` over uint8 images (an iterable of [3, H, W] images or [B, 3, H, W] batches).

    Args:
        extractor: any `FeatureExtractor`.
        images: images or batches of images, uint8; consecutive images of different sizes are not stacked.
        batch_size: images per extractor call.
        progress: show a tqdm bar (counted in images).

    Returns:
        features [N, D] as a float32 numpy array, in input order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    features = []
    with tqdm(desc=extractor.name, unit="img", disable=not progress) as bar:
        for batch in _batches(images, batch_size):
            features.append(extractor(batch).detach().to("cpu", torch.float32).numpy())
            bar.update(len(batch))
    if not features:
        raise ValueError("extract_features got no images")
    return np.concatenate(features)
