"""Each resize mode's resize step against the reference that defines it, on 8-bit images of several sizes."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cleanfid.resize import build_resizer, make_resizer
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

from latentforge.evaluation.image_sets import EvalInputError
from latentforge.evaluation.resize import RESIZE_MODES, check_resize_mode, resize_images

SIZES = [(64, 64), (256, 256), (80, 96), (300, 200), (299, 299)]  # (H, W); 300 x 200 also shrinks one side


def _image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _batch(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array).permute(2, 0, 1)[None].float()  # [H, W, 3] -> [1, 3, H, W]


@pytest.mark.parametrize(("height", "width"), SIZES)
def test_clean_is_clean_fids_pil_bicubic_on_float(height: int, width: int) -> None:
    array = _image(height, width)
    expected = make_resizer("PIL", False, "bicubic", (299, 299))(array)  # [299, 299, 3] float32, unquantised
    assert build_resizer("clean")(array).tobytes() == expected.tobytes()  # clean-fid's own "clean"
    ours = resize_images(_batch(array), 299, "clean")[0].permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(ours, expected)
    assert not np.array_equal(expected, np.round(expected)) or (height, width) == (299, 299)


@pytest.mark.parametrize(("height", "width"), SIZES)
def test_legacy_tensorflow_is_torch_fidelitys_tf1_bilinear(height: int, width: int) -> None:
    x = _batch(_image(height, width, seed=1))
    expected = interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
    torch.testing.assert_close(resize_images(x, 299, "legacy-tensorflow"), expected, rtol=0, atol=1e-4)
    if (height, width) != (299, 299):  # and differs from PyTorch's half-pixel bilinear by far more
        pytorch = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        assert (pytorch - expected).abs().max() > 1


@pytest.mark.parametrize(("height", "width"), SIZES)
def test_legacy_pytorch_is_bilinear_align_corners_false(height: int, width: int) -> None:
    array = _image(height, width, seed=2)
    expected = make_resizer("PyTorch", False, "bilinear", (299, 299))(array)  # clean-fid's legacy_pytorch
    ours = resize_images(_batch(array), 299, "legacy-pytorch")[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-4)


def test_unknown_mode_lists_the_modes() -> None:
    assert check_resize_mode("clean") == "clean" and len(RESIZE_MODES) == 3
    with pytest.raises(EvalInputError, match="clean, legacy-pytorch, legacy-tensorflow"):
        check_resize_mode("legacy_tensorflow")
