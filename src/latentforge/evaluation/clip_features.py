"""Our CLIP as an evaluation network: image embeddings for FID-CLIP and precision/recall, text for CLIP score.

Images arrive as uint8 [B, 3, H, W] (the `FeatureExtractor` contract) and go through the one CLIP input
pipeline, `latentforge.models.clip.preprocess_images`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from latentforge.evaluation.features import ClipImageExtractor
from latentforge.evaluation.metrics import clip_score
from latentforge.models.clip import PREPROCESS_ID, CLIPModel, preprocess_images
from latentforge.models.tokenizer import CLIPTokenizer


def _device(model: CLIPModel) -> torch.device:
    return next(model.parameters()).device


def clip_image_extractor(
    model: CLIPModel, name: str = "latentforge-clip", normalize: bool = True
) -> ClipImageExtractor:
    """A `FeatureExtractor` of `model`'s image tower (L2-normalised embeddings unless `normalize=False`).

    Puts `model` in eval mode. `name` keys feature caches with the preprocessing id: give each set of
    weights its own name (e.g. with `latent_cache.weights_digest(model)[:12]` in it).
    """
    model.eval()
    size = model.config.vision.image_size

    def preprocess(images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images [B, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        return preprocess_images(images.to(_device(model)).float() / 127.5 - 1, size)

    return ClipImageExtractor(
        model.encode_image,
        preprocess,
        name=f"{name}/image-embeds",
        preprocess_id="uint8/127.5-1-" + PREPROCESS_ID.format(size=size),
        normalize=normalize,
    )


@torch.inference_mode()
def encode_captions(model: CLIPModel, captions: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """L2-normalised text embeddings [N, D] (float32) of `captions`, tokenised for `model`'s text tower."""
    tokenizer = CLIPTokenizer.for_config(model.config.text)
    model.eval()
    out = []
    for start in range(0, len(captions), batch_size):
        ids = tokenizer(list(captions[start : start + batch_size])).to(_device(model))
        out.append(model.encode_text(ids, normalize=True).float().cpu())
    if not out:
        raise ValueError("encode_captions got no captions")
    return torch.cat(out).numpy()


def clip_score_of(
    model: CLIPModel, images: torch.Tensor, captions: Sequence[str], batch_size: int = 64
) -> float:
    """CLIP score (Hessel et al. 2021) of uint8 images [N, 3, H, W] against their captions, with our CLIP."""
    if len(images) != len(captions):
        raise ValueError(f"clip_score_of needs one caption per image, got {len(images)} and {len(captions)}")
    extractor = clip_image_extractor(model)
    image_embeds = torch.cat([extractor(chunk) for chunk in images.split(batch_size)]).float().cpu().numpy()
    return clip_score(image_embeds, encode_captions(model, captions, batch_size))
