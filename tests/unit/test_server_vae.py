"""The server's VAE choice (A1111's `sd_vae`: the models folder's VAE/, "Automatic", "None") per request and
through `/options`, against the library loading the same file; and an X/Y plot job's progress, interrupt
and skip, as for any other job."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from test_server import LOCAL, PAYLOAD, REQUEST, _decode, _same_pixels  # noqa: E402

from latentforge.api import run  # noqa: E402
from latentforge.checkpoints.hashing import sha256_file  # noqa: E402
from latentforge.model import load  # noqa: E402
from latentforge.models.families import TINY  # noqa: E402
from latentforge.models.vae import AutoencoderKL  # noqa: E402
from latentforge.server.app import create_app  # noqa: E402
from references import save_random_model


def _save_random_vae(path: Path, seed: int) -> None:
    """A tiny VAE with random weights, bare original keys (as vae-ft-mse-840000-ema-pruned.safetensors)."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(TINY.vae)
    for p in vae.parameters():
        torch.nn.init.normal_(p, std=0.05)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(path))


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    save_random_model(TINY, folder / "tiny.safetensors")
    _save_random_vae(folder / "VAE" / "blue.safetensors", seed=1)
    return folder


@pytest.fixture(scope="module")
def client(models_dir):
    with TestClient(create_app(models_dir=models_dir, queue_size=2), base_url=LOCAL) as client:
        yield client


def _txt2img(client, **override):
    payload = PAYLOAD | ({"override_settings": override} if override else {})
    response = client.post("/sdapi/v1/txt2img", json=payload)
    assert response.status_code == 200, response.text
    body = response.json()
    return _decode(body["images"][0]), json.loads(body["info"])


def test_sd_vae_per_request_and_through_options_is_the_library_with_that_file(client, models_dir):
    vae_path = models_dir / "VAE" / "blue.safetensors"
    assert client.get("/sdapi/v1/sd-vae").json() == [
        {"model_name": "blue.safetensors", "filename": "VAE/blue.safetensors"}
    ]
    own, info = _txt2img(client)
    assert "VAE" not in own.info["parameters"] and info["sd_vae_name"] is None
    _same_pixels(own, run(load(models_dir / "tiny.safetensors"), REQUEST, progress=False)[0])

    swapped, info = _txt2img(client, sd_vae="blue.safetensors")
    expected = run(load(models_dir / "tiny.safetensors", vae=vae_path), REQUEST, progress=False)[0]
    _same_pixels(swapped, expected)  # the same file through the library: bit for bit
    assert not np.array_equal(np.asarray(swapped), np.asarray(own))  # and another decode than the own VAE
    text = swapped.info["parameters"]
    assert f"VAE hash: {sha256_file(vae_path)[:10]}, VAE: blue.safetensors" in text
    assert info["sd_vae_name"] == "blue.safetensors" and info["sd_vae_hash"] == sha256_file(vae_path)[:10]

    again, _ = _txt2img(client)  # override_settings is for that request only: the own VAE, restored exactly
    _same_pixels(again, own)

    assert client.post("/sdapi/v1/options", json={"sd_vae": "blue"}).status_code == 200
    assert client.get("/sdapi/v1/options").json()["sd_vae"] == "blue.safetensors"
    selected, _ = _txt2img(client)
    _same_pixels(selected, swapped)
    none, _ = _txt2img(client, sd_vae="None")  # A1111's "None": the checkpoint's own VAE
    _same_pixels(none, own)
    assert client.post("/sdapi/v1/options", json={"sd_vae": "Automatic"}).status_code == 200
    _same_pixels(_txt2img(client)[0], own)  # no VAE named like the checkpoint: its own


@pytest.mark.parametrize("name", ["../VAE/blue.safetensors", "/etc/passwd", "green.safetensors"])
def test_unknown_or_path_vae_is_a_422(client, name):
    response = client.post("/sdapi/v1/txt2img", json=PAYLOAD | {"override_settings": {"sd_vae": name}})
    assert response.status_code == 422 and "override_settings.sd_vae" in response.json()["detail"]
    response = client.post("/sdapi/v1/options", json={"sd_vae": name})
    assert response.status_code == 422
    if "/" not in name:
        assert "Automatic, None, blue.safetensors" in response.json()["detail"]
    assert client.app.state.worker.queue.empty()


def test_automatic_takes_the_vae_named_like_the_checkpoint(models_dir, tmp_path):
    shutil.copy(models_dir / "tiny.safetensors", tmp_path / "tiny.safetensors")
    shutil.copytree(models_dir / "VAE", tmp_path / "VAE")  # blue.safetensors: not named like the model
    _save_random_vae(tmp_path / "VAE" / "tiny.vae.safetensors", seed=2)  # A1111: name starts with "tiny"
    with TestClient(create_app(models_dir=tmp_path), base_url=LOCAL) as client:
        automatic, _ = _txt2img(client)
        assert "VAE: tiny.vae.safetensors" in automatic.info["parameters"]
        none, _ = _txt2img(client, sd_vae="None")
        assert "VAE" not in none.info["parameters"]
        assert not np.array_equal(np.asarray(automatic), np.asarray(none))


def _run_in_thread(client, route: str, body: dict) -> tuple[threading.Thread, dict]:
    results: dict = {}
    thread = threading.Thread(target=lambda: results.update(response=client.post(route, json=body)))
    thread.start()
    return thread, results


def _wait(condition, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while not condition() and time.time() < deadline:
        time.sleep(0.01)
    assert condition()


def test_xyz_job_shows_progress_and_stops_on_interrupt(client):
    worker = client.app.state.worker
    xs = ",".join(str(s) for s in range(1, 11))
    body = {"payload": PAYLOAD, "x": f"seed={xs}", "y": "steps=20,30"}  # 20 cells, 500 steps
    thread, results = _run_in_thread(client, "/latentforge/v1/xyz", body)
    try:
        _wait(lambda: worker.current is not None and worker.current.step >= 25)
        progress = client.get("/sdapi/v1/progress").json()
        assert progress["state"]["sampling_steps"] == 10 * 20 + 10 * 30
        assert 0 < progress["progress"] < 1 and progress["current_image"] is not None
        assert client.post("/sdapi/v1/interrupt").status_code == 200
    finally:
        worker.interrupt()
        thread.join(60)
    response = results["response"]
    assert response.status_code == 200, response.text
    result = response.json()
    assert 2 <= len(result["images"]) < 20 and len(result["grids"]) == 1  # finished cells, blank others
    assert json.loads(result["info"])["interrupted"] is True
    assert client.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0


def test_skip_ends_one_xyz_cell_and_the_plot_goes_on(client):
    worker = client.app.state.worker
    body = {"payload": PAYLOAD | {"steps": 40}, "x": "seed=1,2,3"}
    thread, results = _run_in_thread(client, "/latentforge/v1/xyz", body)
    try:
        _wait(lambda: worker.current is not None and worker.current.step >= 1)
        assert client.post("/sdapi/v1/skip").status_code == 200
    finally:
        thread.join(60)
    result = results["response"].json()
    info = json.loads(result["info"])
    assert len(result["images"]) == 3 and info["skipped"] == 1 and info["interrupted"] is False
