"""ControlNet preprocessors that need no downloaded model, under sd-webui-controlnet's module names.

Each takes an RGB image [H, W, 3] uint8 and returns the detected map [H', W', 3] uint8, as the
extension's `scripts/preprocessor/legacy/processor.py` and `model_free_preprocessors.py` do: the image is
first scaled so its short side is the processor resolution (`resize_image_with_pad`). Canny, blurs and
resizes use OpenCV (`opencv-python-headless`), the library the reference implementation calls
(`cv2.Canny(img, low, high)`), so edge maps match A1111's pixel for pixel. Model-based annotators (depth,
openpose, segmentation, HED/PiDiNet soft edge, learned lineart) are not here: give their annotated image
with module `none`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from latentforge.errors import ParameterError

Array = np.ndarray[Any, Any]


def _cv2() -> Any:
    try:
        import cv2
    except ImportError:  # a runtime dependency; an incomplete install should still say what is missing
        raise ParameterError(
            "ControlNet preprocessors need OpenCV: pip install opencv-python-headless"
        ) from None
    return cv2


def resize_short_side(image: Array, resolution: int) -> Array:
    """Short side to `resolution` (cubic up, area down), as `resize_image_with_pad` without its padding."""
    cv2 = _cv2()
    height, width = image.shape[:2]
    k = float(resolution) / min(height, width)
    size = (round(width * k), round(height * k))
    if size == (width, height):
        return image
    return cv2.resize(image, size, interpolation=cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA)


def _gray3(gray: Array) -> Array:
    return np.repeat(gray[:, :, None], 3, axis=2)


def canny(image: Array, resolution: int, low: float = 100, high: float = 200, **_: Any) -> Array:
    return _gray3(_cv2().Canny(resize_short_side(image, resolution), int(low), int(high)))


def threshold(image: Array, resolution: int, level: float = 127, **_: Any) -> Array:
    """White where every channel exceeds `level` (the extension's `threshold`, a binary scribble)."""
    image = resize_short_side(image, resolution)
    return _gray3(np.where(image.min(axis=2) > level, 255, 0).astype(np.uint8))


def scribble_xdog(image: Array, resolution: int, level: float = 32, **_: Any) -> Array:
    """Difference of Gaussians (sigma 0.5 and 5.0), thresholded: white scribble lines on black."""
    cv2 = _cv2()
    x = resize_short_side(image, resolution).astype(np.float32)
    dog = 255 - np.min(cv2.GaussianBlur(x, (0, 0), 5.0) - cv2.GaussianBlur(x, (0, 0), 0.5), axis=2)
    dog = dog.clip(0, 255).astype(np.uint8)
    return _gray3(np.where(2 * (255 - dog.astype(np.int32)) > level, 255, 0).astype(np.uint8))


def lineart_standard(image: Array, resolution: int, **_: Any) -> Array:
    """Dark lines on a light page -> white lines: (blur(sigma 6) - image), normalised by its median."""
    x = resize_short_side(image, resolution).astype(np.float32)
    intensity = np.min(_cv2().GaussianBlur(x, (0, 0), 6.0) - x, axis=2).clip(0, 255)
    strong = intensity[intensity > 8]
    intensity /= max(16.0, float(np.median(strong)) if strong.size else 16.0)
    return _gray3((intensity * 127).clip(0, 255).astype(np.uint8))


def softedge_sobel(image: Array, resolution: int, sigma: float = 1.0, **_: Any) -> Array:
    """Soft edges by a classical filter: Sobel gradient magnitude of the blurred grey image, max -> 255.

    latentforge's own module (the extension's soft-edge modules are all learned: HED, PiDiNet, TEED).
    """
    cv2 = _cv2()
    gray = cv2.cvtColor(resize_short_side(image, resolution), cv2.COLOR_RGB2GRAY).astype(np.float32)
    gray = cv2.GaussianBlur(gray, (0, 0), float(sigma))
    magnitude = np.hypot(
        cv2.Sobel(gray, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(gray, cv2.CV_32F, 0, 1, ksize=3)
    )
    peak = float(magnitude.max())
    return _gray3(
        np.zeros_like(gray, np.uint8) if peak == 0 else (magnitude * (255 / peak)).round().astype(np.uint8)
    )


def invert(image: Array, resolution: int, **_: Any) -> Array:
    """255 - image: a black-on-white drawing becomes the white-on-black map ControlNets were trained on."""
    return 255 - image


def blur_gaussian(image: Array, resolution: int, sigma: float = 9.0, **_: Any) -> Array:
    return _cv2().GaussianBlur(resize_short_side(image, resolution), (0, 0), float(sigma))


def tile_resample(image: Array, resolution: int, rate: float = 1.0, **_: Any) -> Array:
    """The tile ControlNet's input: the image downsampled by `rate` (area), untouched below 1.1."""
    if rate < 1.1:
        return image
    cv2 = _cv2()
    height, width = image.shape[:2]
    return cv2.resize(image, (int(width / rate), int(height / rate)), interpolation=cv2.INTER_AREA)


def _noise_disk(rng: np.random.Generator, height: int, width: int, f: int = 256) -> Array:
    """Smooth random field in [0, 1]: a coarse uniform grid, bicubically upsampled (annotator.util)."""
    cv2 = _cv2()
    coarse = rng.uniform(0, 1, size=(height // f + 2, width // f + 2))
    noise = cv2.resize(coarse, (width + 2 * f, height + 2 * f), interpolation=cv2.INTER_CUBIC)[
        f : f + height, f : f + width
    ]
    noise -= noise.min()
    return noise / noise.max()


def shuffle(image: Array, resolution: int, rng: np.random.Generator | None = None, **_: Any) -> Array:
    """Content shuffle: remap every pixel through a smooth random flow (the shuffle ControlNet's input).

    The extension draws from numpy's global seed set from the image seed; here `rng` is seeded likewise.
    """
    cv2 = _cv2()
    rng = rng or np.random.default_rng(0)
    image = resize_short_side(image, resolution)
    height, width = image.shape[:2]
    flow_x = (_noise_disk(rng, height, width) * (width - 1)).astype(np.float32)
    flow_y = (_noise_disk(rng, height, width) * (height - 1)).astype(np.float32)
    return cv2.remap(image, flow_x, flow_y, cv2.INTER_LINEAR)


def identity(image: Array, resolution: int, **_: Any) -> Array:
    return image


@dataclass(frozen=True)
class Preprocessor:
    """A module: its function and the extension's defaults of threshold A and B (None: not used)."""

    function: Callable[..., Array]
    threshold_a: tuple[str, float] | None = None
    threshold_b: tuple[str, float] | None = None
    needs_mask: bool = False


# A1111/sd-webui-controlnet module names; `inpaint`/`inpaint_only` mark the masked pixels (the mask comes
# from the request's inpaint part) and are handled where the hint is built.
PREPROCESSORS: dict[str, Preprocessor] = {
    "none": Preprocessor(identity),
    "canny": Preprocessor(canny, ("low", 100), ("high", 200)),
    "threshold": Preprocessor(threshold, ("level", 127)),
    "scribble_xdog": Preprocessor(scribble_xdog, ("level", 32)),
    "lineart_standard": Preprocessor(lineart_standard),
    "softedge_sobel": Preprocessor(softedge_sobel, ("sigma", 1.0)),
    "invert": Preprocessor(invert),
    "blur_gaussian": Preprocessor(blur_gaussian, ("sigma", 9.0)),
    "tile_resample": Preprocessor(tile_resample, ("rate", 1.0)),
    "shuffle": Preprocessor(shuffle),
    "inpaint": Preprocessor(identity, needs_mask=True),
    "inpaint_only": Preprocessor(identity, needs_mask=True),
}
# Model-based modules users will name: explained instead of "unknown module".
BRING_YOUR_OWN = (
    "depth",
    "depth_midas",
    "depth_leres",
    "depth_zoe",
    "depth_anything",
    "openpose",
    "openpose_full",
    "dw_openpose_full",
    "segmentation",
    "seg_ofade20k",
    "normal_bae",
    "mlsd",
    "hed",
    "softedge_hed",
    "softedge_pidinet",
    "lineart",
    "lineart_realistic",
    "lineart_anime",
)


def get_preprocessor(module: str) -> Preprocessor:
    if module in PREPROCESSORS:
        return PREPROCESSORS[module]
    if module in BRING_YOUR_OWN:
        raise ParameterError(
            f"ControlNet module {module!r} needs a downloaded annotator model, which latentforge lacks: "
            "make the annotated image elsewhere (depth map, pose skeleton, segmentation) and pass it with "
            "module 'none'"
        )
    raise ParameterError(f"unknown ControlNet module {module!r}; valid: {', '.join(PREPROCESSORS)}")


def run_preprocessor(
    module: str,
    image: Array,
    resolution: int,
    threshold_a: float = -1,
    threshold_b: float = -1,
    rng: np.random.Generator | None = None,
) -> Array:
    """The detected map of one module; thresholds -1 (A1111's "unset") take the module's defaults."""
    spec = get_preprocessor(module)
    kwargs: dict[str, Any] = {"rng": rng}
    for given, slot in ((threshold_a, spec.threshold_a), (threshold_b, spec.threshold_b)):
        if slot is not None:
            kwargs[slot[0]] = slot[1] if given == -1 else given
    return spec.function(image, resolution, **kwargs)
