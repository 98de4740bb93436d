"""The embedded default model: shipped in the package, loaded without --model, named in the infotext."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from latentforge.api import txt2img
from latentforge.checkpoints.loading import default_clip_path, default_model_path
from latentforge.cli import main
from latentforge.evaluation.extractors import load_extractor
from latentforge.model import load
from latentforge.pipelines.infotext import parse_infotext, read_infotext


def test_shipped_file_is_a_small_fp16_emoji_model():
    path = default_model_path()
    assert path.stat().st_size < 64 * 2**20  # 62.5 MiB: 12.6M of the 32.7M parameters are token embeddings
    model = load(path, dtype=torch.float16)
    assert model.family.name == "latentforge-emoji"
    assert model.vae.config.downsampling_factor == 4
    assert all(p.dtype == torch.float16 for p in model.unet.parameters())
    assert 10e6 < sum(p.numel() for p in model.unet.parameters()) < 40e6


def test_generate_without_model_uses_it(tmp_path: Path):
    assert main(["generate", "red apple, food-fruit, google style", "--steps", "8", "--seed", "3",
                 "--out", str(tmp_path)]) == 0  # fmt: skip
    (png,) = tmp_path.glob("*.png")
    image = Image.open(png)
    assert image.size == (64, 64)
    prompt, _, params = parse_infotext(read_infotext(png))
    assert prompt == "red apple, food-fruit, google style"
    assert params.get("Model") == "latentforge-emoji" and params.get("Seed") == "3"
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    assert pixels.std() > 10  # a picture, not a flat or blank image


def test_its_clip_ranks_a_generated_apple_by_its_caption():
    """The shipped CLIP (eval's default features) ranks a generated red apple closer to 'red apple'."""
    extractor = load_extractor(f"clip:{default_clip_path()}")
    assert extractor.encode_text is not None
    model = load(default_model_path())
    image = txt2img(model, "red apple, food-fruit, google style", steps=12, seed=0)[0]
    pixels = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)[None]
    feature = torch.as_tensor(np.asarray(extractor.image(pixels)))[0]
    texts = torch.as_tensor(
        extractor.encode_text(
            ["red apple, food-fruit, google style", "france flag, country-flag, google style"]
        )
    )
    feature = feature / feature.norm()
    assert float(feature @ texts[0]) > float(feature @ texts[1])
