"""The tiny decoder shipped for the embedded model (`EMBEDDED_TAESDS`): `load` attaches it, only while the
model's VAE is the one it was distilled from; `--fast-decode` and `--preview taesd` use it without --taesd,
and its decode stays close to the VAE's."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from latentforge.checkpoints.loading import default_model_path
from latentforge.checkpoints.taesd import EMBEDDED_TAESDS, embedded_taesd, vae_signature
from latentforge.cli import main
from latentforge.model import load
from latentforge.pipelines.infotext import read_infotext
from latentforge.pipelines.request import GenerationRequest
from latentforge.pipelines.runner import run

ASSET = default_model_path().parent / EMBEDDED_TAESDS["latentforge-emoji"]
pytestmark = pytest.mark.skipif(not ASSET.is_file(), reason=f"{ASSET.name} is not in this installation")


@pytest.fixture(scope="module")
def model():
    return load(default_model_path(), compute_hash=False)


def test_load_attaches_the_shipped_decoder_in_the_models_dtype(model):
    taesd = model.taesd
    assert taesd is not None and taesd.encoder is None
    assert taesd.config.latent_channels == model.family.vae.embed_dim
    assert taesd.downsampling_factor == model.family.vae.downsampling_factor
    assert ASSET.stat().st_size < 1024 * 1024  # a small asset (fp16)
    half = load(default_model_path(), dtype=torch.bfloat16, compute_hash=False)
    assert half.taesd is not None and next(half.taesd.parameters()).dtype == torch.bfloat16


def test_it_is_not_used_with_another_vae_or_another_model(model):
    signature = vae_signature(model.vae)
    assert vae_signature(model.vae.to(torch.float16)) == pytest.approx(signature, rel=1e-3)
    model.vae.float()
    assert embedded_taesd("some-other-model", model.vae) is None
    other = load(default_model_path(), compute_hash=False).vae
    with torch.no_grad():
        for p in other.decoder.parameters():
            p.mul_(1.05)  # a retrained decoder: 5% different weights
    with pytest.warns(UserWarning, match="retrain it"):
        assert embedded_taesd("latentforge-emoji", other) is None


def _psnr(a: Image.Image, b: Image.Image) -> float:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return 10 * math.log10(255**2 / float(((x - y) ** 2).mean()))


def test_fast_decode_is_close_to_the_vae_decode(model):
    request = GenerationRequest(prompt="a smiling cat", steps=12, seed=5, batch_size=4)
    plain = run(model, request, progress=False)
    fast = run(model, replace(request, fast_decode=True), progress=False)
    psnr = [_psnr(f.image, p.image) for f, p in zip(fast, plain, strict=True)]
    # measured 18.4-19.2 dB on these seeds (docs/performance.md "TAESD": ~28 dB on encoded held-out images,
    # ~19.7 on sampled latents, against 15.0 for the linear preview map); an untrained decoder gives ~7 dB
    assert min(psnr) > 17, psnr


def test_cli_uses_it_without_taesd(tmp_path):
    out = tmp_path / "out"
    argv = ["generate", "a cat", "--steps", "2", "--out", str(out), "--fast-decode"]
    assert main([*argv, "--preview", "taesd", "--preview-every", "1"]) == 0
    assert Image.open(out / "preview.png").size == (64, 64)
    assert "Fast decode: True" in (read_infotext(sorted(out.glob("0*.png"))[0]) or "")


def test_the_server_fast_decodes_the_embedded_model():
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from latentforge.server.app import create_app

    with TestClient(create_app(queue_size=1), base_url="http://127.0.0.1:7860") as client:
        response = client.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "steps": 2, "fast_decode": True})
    assert response.status_code == 200, response.text
    assert "Fast decode: True" in json.loads(response.json()["info"])["infotexts"][0]
