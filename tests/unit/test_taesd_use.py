"""TAESD in generation: `fast_decode` (request field, infotext key, CLI flag) and `--preview taesd`."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from latentforge.checkpoints.single_file import save_single_file
from latentforge.cli import main
from latentforge.errors import ParameterError
from latentforge.model import StableDiffusion
from latentforge.models.families import TINY
from latentforge.models.taesd import TinyAutoencoder, TinyAutoencoderConfig
from latentforge.pipelines.images import tensor_to_pil
from latentforge.pipelines.infotext import read_infotext
from latentforge.pipelines.request import GenerationRequest
from latentforge.pipelines.request_infotext import from_infotext
from latentforge.pipelines.runner import run

PARAMS = GenerationRequest(prompt="a cat", steps=2, seed=3, width=32, height=32, sampler="Euler")
# TINY's VAE has factor 2: one upsampling stage
TINY_TAESD = TinyAutoencoderConfig(
    latent_channels=4, channels=8, encoder_blocks=(1, 1), decoder_blocks=(1, 1)
)


@pytest.fixture(scope="module")
def model() -> StableDiffusion:
    torch.manual_seed(0)
    return StableDiffusion.from_family(TINY).eval()


@pytest.fixture(scope="module")
def taesd() -> TinyAutoencoder:
    torch.manual_seed(1)
    return TinyAutoencoder(TINY_TAESD, encoder=False).eval()


def test_fast_decode_uses_taesd(model, taesd):
    with pytest.raises(ParameterError, match="--taesd"):
        run(model, replace(PARAMS, fast_decode=True), progress=False)
    fast_model = replace(model, taesd=taesd)
    plain = run(fast_model, PARAMS, progress=False)[0]
    fast = run(fast_model, replace(PARAMS, fast_decode=True), progress=False)[0]
    assert torch.equal(plain.latents, fast.latents)  # only the decode differs
    with torch.no_grad():
        expected = tensor_to_pil(taesd.decode(fast.latents[None]))[0]
    assert np.array_equal(np.asarray(fast.image), np.asarray(expected))
    assert not np.array_equal(np.asarray(fast.image), np.asarray(plain.image))
    assert "Fast decode: True" in fast.infotext and "Fast decode" not in plain.infotext
    assert from_infotext(fast.infotext).request.fast_decode


def test_cli_taesd_preview_and_fast_decode(model, taesd, tmp_path, capsys):
    checkpoint = tmp_path / "tiny.safetensors"
    save_single_file(
        checkpoint, model.unet.state_dict(), model.vae.state_dict(), model.text_encoder.state_dict(), TINY
    )
    folder = tmp_path / "taesd"
    folder.mkdir()
    save_file(
        {k.split(".", 1)[1]: v for k, v in taesd.state_dict().items()}, folder / "taesd_decoder.safetensors"
    )
    out = tmp_path / "out"
    argv = [
        "generate",
        "a cat",
        "--model",
        str(checkpoint),
        "--size",
        "32x32",
        "--steps",
        "2",
        "--out",
        str(out),
    ]
    assert main([*argv, "--preview", "taesd", "--preview-every", "1"]) == 2
    assert "--taesd" in capsys.readouterr().err
    argv += ["--taesd", str(folder), "--preview", "taesd", "--preview-every", "1", "--fast-decode"]
    assert main(argv) == 0
    assert Image.open(out / "preview.png").size == (32, 32)  # full size, not latent size
    assert "Fast decode: True" in (read_infotext(sorted(out.glob("0*.png"))[0]) or "")


def test_preview_kinds_are_a1111s_show_progress_types(model, taesd):
    """Full = the VAE's own decode (as the final image, at full size), TAESD = the tiny decoder,
    Approx cheap/NN = the latent-size linear map; TAESD without a tiny decoder falls back to the map."""
    from latentforge.pipelines.images import decode_latents
    from latentforge.pipelines.preview import (
        PREVIEW_TYPES,
        latent_preview,
        latent_rgb_projection,
        preview_image,
    )

    latents = run(model, PARAMS, progress=False)[0].latents[None]
    projection = latent_rgb_projection(model)
    with_taesd = replace(model, taesd=taesd)
    shown = {kind: np.asarray(preview_image(with_taesd, latents, kind, projection)) for kind in PREVIEW_TYPES}
    full = tensor_to_pil(decode_latents(model, latents)[0])[0]
    assert np.array_equal(shown["Full"], np.asarray(full)) and full.size == (32, 32)
    with torch.no_grad():
        expected = tensor_to_pil(taesd.decode(latents))[0]
    assert np.array_equal(shown["TAESD"], np.asarray(expected))
    cheap = np.asarray(latent_preview(latents, projection))
    assert cheap.shape[:2] == (16, 16)  # TINY's VAE: factor 2
    assert np.array_equal(shown["Approx cheap"], cheap) and np.array_equal(shown["Approx NN"], cheap)
    assert np.array_equal(np.asarray(preview_image(model, latents, "TAESD", projection)), cheap)
