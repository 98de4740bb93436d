"""Inpainting and outpainting, as A1111's img2img "inpaint" tab does them (modules/processing.py, masking.py).

White (255) in the mask means "repaint", black "keep", as in A1111 and diffusers. The steps:
  1. the mask is blurred (Gaussian, sigma = `mask_blur` pixels, as A1111's cv2 blur);
  2. either the whole image is resized to the generation size, or ("only masked") the mask's bounding
     box plus padding, widened to the generation aspect ratio, is cropped and resized to it;
  3. "masked content" prepares the init image: original, fill (colours pulled in from the unmasked
     area), latent noise (the repainted latents start from the seed noise), latent nothing (zeros);
  4. img2img with a `LatentSource` whose `keep` mask blends each x0 estimate and the final latents
     with the init latents (any model), and, for 9-channel inpainting models, whose `concat` holds
     [mask, masked-image latents] (the channel order of LDM's hybrid conditioning and diffusers);
  5. the decoded image is pasted back over the original through the blurred mask.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from latentforge.data.images import open_image, read_image_size, to_rgb
from latentforge.errors import ParameterError
from latentforge.model import StableDiffusion
from latentforge.pipelines.generate import LatentSource
from latentforge.pipelines.images import encode_images, pil_to_tensor
from latentforge.pipelines.request import DEFAULT_MAX_PIXELS, GenerationRequest


def mask_to_l(mask: Image.Image) -> Image.Image:
    """A mask as 8-bit greyscale: the alpha channel if not all opaque (alpha > 128 -> 255), else luminance."""
    if mask.mode == "RGBA" and mask.getextrema()[-1] != (255, 255):
        return mask.getchannel("A").point(lambda a: 255 if a > 128 else 0)
    return to_rgb(mask).convert("L") if mask.mode not in ("L", "1") else mask.convert("L")


def load_mask(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read a mask file (same error rules as images: `ImageLoadError` naming the file and the reason).

    Pixels past the request's limit are refused from the header, before decoding (issue 19: an 8000x8000
    mask was decoded and resized to the image size)."""
    read_image_size(path, max_pixels=max_pixels)
    with open_image(Path(path)) as image:
        image.load()
        return mask_to_l(image)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [N, C, H, W]; kernel 2 * int(2.5 sigma + 0.5) + 1 taps, mirrored borders.

    The kernel size and BORDER_REFLECT_101 border are those of A1111's cv2.GaussianBlur mask blur.
    """
    if sigma <= 0:
        return x
    radius = int(2.5 * sigma + 0.5)
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-(taps**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).to(x)
    channels = x.shape[1]
    for dim in (3, 2):  # x then y, as A1111 blurs
        pad = (radius, radius, 0, 0) if dim == 3 else (0, 0, radius, radius)
        x = F.pad(x, pad, mode="reflect" if radius < x.shape[dim] else "replicate")
        weight = kernel.view(1, 1, 1, -1) if dim == 3 else kernel.view(1, 1, -1, 1)
        x = F.conv2d(x, weight.repeat(channels, 1, 1, 1), groups=channels)
    return x


def blur_mask(mask: Image.Image, radius: float) -> Image.Image:
    """Gaussian-blurred 8-bit mask (sigma `radius` pixels), rounded back to 8 bits."""
    if radius <= 0:
        return mask
    array = torch.from_numpy(np.asarray(mask, dtype=np.float32))[None, None]
    blurred = gaussian_blur(array, radius)[0, 0].round().clamp(0, 255)
    return Image.fromarray(blurred.numpy().astype(np.uint8), mode="L")


def crop_region(mask: np.ndarray, padding: int) -> tuple[int, int, int, int] | None:
    """(x1, y1, x2, y2) of the non-zero part of a mask grown by `padding`, clipped; None for an empty mask."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    h, w = mask.shape
    return (
        max(int(xs.min()) - padding, 0),
        max(int(ys.min()) - padding, 0),
        min(int(xs.max()) + 1 + padding, w),
        min(int(ys.max()) + 1 + padding, h),
    )


def expand_to_ratio(
    region: tuple[int, int, int, int], width: int, height: int, image_width: int, image_height: int
) -> tuple[int, int, int, int]:
    """Grow a region about its centre to the aspect ratio width:height, shifted to stay inside the image."""
    x1, y1, x2, y2 = region

    def grow(a: int, b: int, desired: float, limit: int) -> tuple[int, int]:
        extra = max(int(desired - (b - a)), 0)
        a, b = a - extra // 2, b + extra - extra // 2
        if b > limit:  # shift back inside, then clip what still does not fit
            a, b = a - (b - limit), limit
        if a < 0:
            a, b = 0, b - a
        return a, min(b, limit)

    if (x2 - x1) / (y2 - y1) > width / height:
        y1, y2 = grow(y1, y2, (x2 - x1) * height / width, image_height)
    else:
        x1, x2 = grow(x1, x2, (y2 - y1) * width / height, image_width)
    return x1, y1, x2, y2


def fill_masked(
    image: Image.Image, mask: Image.Image, radii: tuple[float, ...] = (64, 16, 4, 1)
) -> Image.Image:
    """Masked pixels replaced by colours pulled in from the unmasked area ("fill", as A1111's masking.fill).

    Normalised convolution: blur(image * known) / blur(known) at decreasing radii, each finer level laid
    over the coarser one where it has support; the known pixels are kept as they are.
    """
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)[None]
    known = 1 - torch.from_numpy(np.asarray(mask, dtype=np.float32))[None, None] / 255
    if float(known.sum()) == 0:
        return image.convert("RGB")
    result = ((pixels * known).sum((2, 3), keepdim=True) / known.sum()).expand_as(pixels)
    for radius in radii:
        support = gaussian_blur(known, radius)
        estimate = gaussian_blur(pixels * known, radius) / support.clamp_min(1e-6)
        alpha = (support * 4).clamp(0, 1)  # trust a level where a quarter of its kernel saw known pixels
        result = estimate * alpha + result * (1 - alpha)
    result = pixels * known + result * (1 - known)
    array = result[0].permute(1, 2, 0).round().clamp(0, 255).numpy().astype(np.uint8)
    return Image.fromarray(array)


def extend_canvas(
    image: Image.Image, left: int, right: int, top: int, bottom: int, *, overlap: int = 0
) -> tuple[Image.Image, Image.Image]:
    """Outpainting canvas: the image padded with its edge pixels, and a mask of the new area.

    The mask reaches `overlap` pixels into the original image so that a blurred mask still covers
    the whole new area (A1111's "poor man's outpainting" grows it by the mask blur).
    """
    array = np.asarray(image.convert("RGB"))
    canvas = np.pad(array, ((top, bottom), (left, right), (0, 0)), mode="edge")
    mask = np.zeros(canvas.shape[:2], dtype=np.uint8)
    h, w = mask.shape
    for start, end, axis in ((0, top, 0), (h - bottom, h, 0), (0, left, 1), (w - right, w, 1)):
        if end > start:
            grown = (max(start - overlap, 0), end) if start > 0 else (0, min(end + overlap, mask.shape[axis]))
            index = [slice(None), slice(None)]
            index[axis] = slice(*grown)
            mask[tuple(index)] = 255
    return Image.fromarray(canvas), Image.fromarray(mask, mode="L")


@dataclass(frozen=True)
class Overlay:
    """How a generated image goes back over the original: the region it fills and the blend mask."""

    original: Image.Image
    mask: Image.Image  # 255 = generated, 0 = original, at the original's size
    region: tuple[int, int, int, int] | None  # only-masked crop (x1, y1, x2, y2)

    def apply(self, generated: Image.Image) -> Image.Image:
        if self.region is not None:
            x1, y1, x2, y2 = self.region
            pasted = self.original.copy()
            pasted.paste(generated.resize((x2 - x1, y2 - y1), Image.Resampling.LANCZOS), (x1, y1))
            generated = pasted
        return Image.composite(generated, self.original, self.mask)


def latent_mask(mask: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """[1, 1, h, w] in {0, 1}: the blurred mask resized to the latent size (bicubic) and rounded, as A1111."""
    small = np.asarray(mask.resize(size, Image.Resampling.BICUBIC), dtype=np.float32) / 255
    return torch.from_numpy(small).round()[None, None]


def inpaint_concat(model: StableDiffusion, pixels: torch.Tensor, mask: Image.Image) -> torch.Tensor:
    """Inpainting-model channels [1, 5, h, w]: the rounded mask (nearest-resized) and masked-image latents."""
    binary = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255).round()[None, None]  # [1, 1, H, W]
    masked = encode_images(model, pixels * (1 - binary))
    return torch.cat([F.interpolate(binary, size=masked.shape[-2:]), masked], dim=1)


def inpaint_source(model: StableDiffusion, request: GenerationRequest) -> tuple[LatentSource, Overlay]:
    """An inpainting or outpainting request's latent source, and how its images go back over the original.

    `request` is resolved: its size is the generation size, `init.images[0]` the picture and
    `inpaint.mask` the mask (or `inpaint.outpaint` the margins that make both).
    """
    assert request.init is not None and request.inpaint is not None
    part = request.inpaint
    image = to_rgb(request.init.images[0])
    if part.outpaint is not None:
        image, mask = extend_canvas(image, *part.outpaint, overlap=int(part.mask_blur))
    else:
        assert part.mask is not None
        mask = mask_to_l(part.mask)
    if mask.size != image.size:
        warnings.warn(f"mask {mask.size} resized to the image size {image.size}", stacklevel=2)
        mask = mask.resize(image.size, Image.Resampling.LANCZOS)
    size = (request.width, request.height)
    blurred = blur_mask(mask, part.mask_blur)
    if part.only_masked:
        region = crop_region(np.asarray(blurred), part.only_masked_padding)
        if region is None:
            raise ParameterError("the mask is empty (all black): there is nothing to inpaint")
        region = expand_to_ratio(region, *size, *image.size)
        work_image = image.crop(region).resize(size, Image.Resampling.LANCZOS)
        work_mask = blurred.crop(region).resize(size, Image.Resampling.LANCZOS)
        overlay = Overlay(image, blurred, region)
    else:
        work_image = image if image.size == size else image.resize(size, Image.Resampling.LANCZOS)
        work_mask = blurred if blurred.size == size else blurred.resize(size, Image.Resampling.LANCZOS)
        # A1111 doubles the blurred mask for the paste-back, so the repainted area is fully opaque.
        overlay = Overlay(work_image, work_mask.point(lambda v: min(255, 2 * v)), None)
    if part.masked_content != "original":
        work_image = fill_masked(work_image, work_mask)

    pixels = pil_to_tensor([work_image])
    init = encode_images(model, pixels, tiled=request.use_tiled_vae(*size))
    repaint = latent_mask(work_mask, (init.shape[-1], init.shape[-2]))
    if part.masked_content == "latent nothing":
        init = init * (1 - repaint)
    concat = inpaint_concat(model, pixels, work_mask) if model.family.unet.in_channels == 9 else None
    source = LatentSource(
        init,
        keep=1 - repaint if part.latent_blend else None,
        noise_mask=repaint if part.masked_content == "latent noise" else None,
        concat=concat,
        region=None if overlay.region is None else (image.size, overlay.region),
    )
    return source, overlay
