"""The three FID input pipelines, by clean-fid's names (Parmar et al. 2022, "On Aliased Resizing and
Surprising Subtleties in GAN Evaluation"), each reproducing one reference implementation.

mode: resize of the whole image to S x S (no crop); Inception normalisation; what it reproduces
- `clean`: Pillow bicubic on float32 per channel, clipped to [0, 255], not re-quantised; (x - 128) / 128;
  clean-fid `compute_fid(mode="clean")`
- `legacy-pytorch`: `F.interpolate(bilinear, align_corners=False)` on x / 255; 2 x - 1; pytorch-fid
- `legacy-tensorflow`: TensorFlow 1.x `resize_bilinear` (no half-pixel offset); (x - 128) / 128;
  torch-fidelity and the original TF FID (TTUR)

The normalisations are those of clean-fid's `InceptionV3W` (clean), pytorch-fid's `InceptionV3` and
torch-fidelity's `FeatureExtractorInceptionV3`. Every resize is the identity at S x S.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from latentforge.evaluation.image_sets import EvalInputError

RESIZE_MODES = ("clean", "legacy-pytorch", "legacy-tensorflow")
# The number papers print: TTUR's TensorFlow FID, reproduced by torch-fidelity (docs/evaluation.md says why).
DEFAULT_RESIZE_MODE = "legacy-tensorflow"
REFERENCES = {
    "clean": "clean-fid compute_fid(mode='clean')",
    "legacy-pytorch": "pytorch-fid calculate_fid_given_paths",
    "legacy-tensorflow": "torch-fidelity calculate_metrics / TF FID (TTUR)",
}


def check_resize_mode(mode: str) -> str:
    """`mode` when it is one of `RESIZE_MODES`; otherwise an `EvalInputError` listing them."""
    if mode not in RESIZE_MODES:
        raise EvalInputError(f"unknown resize mode {mode!r}; choose one of {', '.join(RESIZE_MODES)}")
    return mode


def preprocess_id(mode: str, size: int) -> str:
    """Identifies mode, size and normalisation in cache keys and reports."""
    return {
        "clean": f"clean:PIL-bicubic-float-{size}-clip0,255-(x-128)/128",
        "legacy-pytorch": f"legacy-pytorch:x/255-bilinear{size}-align_corners=False-2x-1",
        "legacy-tensorflow": f"legacy-tensorflow:tf1-bilinear{size}-(x-128)/128",
    }[check_resize_mode(mode)]


def pil_bicubic_float(images: torch.Tensor, size: int) -> torch.Tensor:
    """clean-fid's resize: each channel as a float32 Pillow image ("F"), bicubic to size x size, clipped.

    Unlike resizing the 8-bit RGB image, nothing is rounded to integers (clean-fid's `quantize_after=False`).
    """
    out = np.empty((*images.shape[:2], size, size), dtype=np.float32)
    for i, image in enumerate(images.detach().to("cpu", torch.float32).numpy()):  # [3, H, W]
        for c, channel in enumerate(image):
            resized = Image.fromarray(np.ascontiguousarray(channel)).resize(
                (size, size), Image.Resampling.BICUBIC
            )
            out[i, c] = np.asarray(resized)
    return torch.from_numpy(out.clip(0, 255)).to(images.device)


def tf1_bilinear(images: torch.Tensor, size: int) -> torch.Tensor:
    """TensorFlow 1.x `resize_bilinear(align_corners=False)`: output pixel i reads input position i * in/out.

    No half-pixel offset (TF2's `half_pixel_centers` and PyTorch add one); positions computed in float32 as
    TF does, the same arithmetic as torch-fidelity's `interpolate_bilinear_2d_like_tensorflow1x`.
    """

    def taps(n_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scale = torch.tensor(n_in / size, dtype=torch.float32)
        position = torch.arange(size, dtype=torch.float32) * scale
        low = position.long()  # positions are >= 0: truncation is floor
        high = (low + 1).clamp(max=n_in - 1)
        return low.to(images.device), high.to(images.device), (position - low).to(images.device, images.dtype)

    y_low, y_high, dy = taps(images.shape[2])
    x_low, x_high, dx = taps(images.shape[3])
    top, bottom = images[:, :, y_low], images[:, :, y_high]  # [B, C, S, W]
    top = top[..., x_low] + (top[..., x_high] - top[..., x_low]) * dx  # [B, C, S, S]
    bottom = bottom[..., x_low] + (bottom[..., x_high] - bottom[..., x_low]) * dx
    return top + (bottom - top) * dy[:, None]


def resize_images(images: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """Float images [B, C, H, W] -> [B, C, size, size] by `mode`'s resize (`clean` expects [0, 255])."""
    check_resize_mode(mode)
    if tuple(images.shape[2:]) == (size, size):
        return images
    if mode == "clean":
        return pil_bicubic_float(images, size).to(images.dtype)
    if mode == "legacy-pytorch":
        return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return tf1_bilinear(images, size)


def network_input(
    images: torch.Tensor, size: int, mode: str, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> Inception input [B, 3, size, size] in about [-1, 1], in the reference's order."""
    x = images.to(dtype)
    if mode == "legacy-pytorch":  # pytorch-fid: ToTensor (x / 255), resize in the network, then 2 x - 1
        return 2 * resize_images(x / 255, size, mode) - 1
    return (resize_images(x, size, mode) - 128) / 128
