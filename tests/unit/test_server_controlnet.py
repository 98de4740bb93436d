"""ControlNet through A1111's API as sd-webui-controlnet exposes it: `alwayson_scripts.controlnet.args`
units over HTTP against the library on the same unit, the extension's /controlnet/* routes, refusals, and
`webuiapi.ControlNetUnit` driving txt2img against uvicorn on loopback."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from test_server import LOCAL, PAYLOAD, REQUEST, _decode, _free_port, _png, _same_pixels  # noqa: E402

from latentforge.api import run  # noqa: E402
from latentforge.checkpoints.controlnet import a1111_controlnet_hash, load_controlnet, save_controlnet  # noqa: E402
from latentforge.model import load  # noqa: E402
from latentforge.models.controlnet import ControlNetConfig, ControlNetModel  # noqa: E402
from latentforge.models.families import TINY  # noqa: E402
from latentforge.pipelines.controlnet import ControlNetUnit  # noqa: E402
from latentforge.pipelines.preprocessors import PREPROCESSORS, run_preprocessor  # noqa: E402
from latentforge.pipelines.request import InitImage  # noqa: E402
from latentforge.server.app import create_app  # noqa: E402
from references import save_random_model


def _controlnet(seed: int, context_dim: int | None = None) -> ControlNetModel:
    torch.manual_seed(seed)
    unet = TINY.unet if context_dim is None else replace(TINY.unet, context_dim=context_dim)
    model = ControlNetModel(ControlNetConfig.for_base(unet, TINY.vae.downsampling_factor)).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)  # zero convolutions at zero would make any unit a no-op
    return model


def _square() -> Image.Image:
    image = np.zeros((32, 32, 3), np.uint8)
    image[8:24, 8:24] = 255
    return Image.fromarray(image)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    save_random_model(TINY, folder / "tiny.safetensors")
    (folder / "ControlNet").mkdir()
    save_controlnet(folder / "ControlNet" / "cn_edges.safetensors", _controlnet(1))
    save_controlnet(folder / "ControlNet" / "cn_wide.safetensors", _controlnet(2, context_dim=48))
    return folder


@pytest.fixture(scope="module")
def client(models_dir):
    with TestClient(create_app(models_dir=models_dir, queue_size=2), base_url=LOCAL) as client:
        yield client


def _with_units(*units: dict) -> dict:
    return {**PAYLOAD, "alwayson_scripts": {"controlnet": {"args": list(units)}}}


UNIT = {
    "enabled": True,
    "image": _png(_square()),
    "module": "canny",
    "model": "cn_edges",
    "weight": 0.5,
    "resize_mode": 0,
    "control_mode": "My prompt is more important",
    "low_vram": False,
}


def test_one_unit_is_the_library_bit_for_bit_with_its_infotext(client, models_dir):
    response = client.post("/sdapi/v1/txt2img", json=_with_units(UNIT))
    assert response.status_code == 200, response.text
    body = response.json()
    reference = load(models_dir / "tiny.safetensors")
    network = load_controlnet(models_dir / "ControlNet" / "cn_edges.safetensors")
    unit = ControlNetUnit(
        image=_square(), network=network, module="canny", weight=0.5, resize_mode="Just Resize",
        control_mode="My prompt is more important",
    )  # fmt: skip
    expected = run(reference, replace(REQUEST, controlnet=(unit,)), progress=False)[0]
    plain = run(reference, REQUEST, progress=False)[0]
    image = _decode(body["images"][0])
    _same_pixels(image, expected)
    assert not np.array_equal(np.asarray(image.convert("RGB")), np.asarray(plain.convert("RGB")))
    title = f"cn_edges [{a1111_controlnet_hash(models_dir / 'ControlNet' / 'cn_edges.safetensors')}]"
    assert (
        f'ControlNet 0: "Module: canny, Model: {title}, Weight: 0.5, Resize Mode: Just Resize'
        in (image.info["parameters"])
    )
    assert image.info["parameters"] == expected.info["parameters"] and body["warnings"] == []
    assert json.loads(body["info"])["infotexts"] == [expected.info["parameters"]]


def test_disabled_unit_is_no_unit_and_unused_fields_are_reported(client):
    plain = client.post("/sdapi/v1/txt2img", json=PAYLOAD).json()
    off = client.post("/sdapi/v1/txt2img", json=_with_units({**UNIT, "enabled": False})).json()
    assert off["images"] == plain["images"] and off["warnings"] == []
    # webuiapi's payload shape: script key "ControlNet", the image as {image, mask}, hr_option left at Both
    odd = {**UNIT, "weight": 0.0, "image": {"image": UNIT["image"], "mask": None}, "hr_option": "Both"}
    odd |= {"resize_mode": "Crop and Resize", "foo": 1, "low_vram": True, "hr_option": "High res only"}
    body = client.post(
        "/sdapi/v1/txt2img", json={**PAYLOAD, "alwayson_scripts": {"ControlNet": {"args": [odd]}}}
    ).json()
    # weight 0 adds nothing (the pipeline's own guarantee); the infotext still names the unit
    _same_pixels(_decode(body["images"][0]), _decode(plain["images"][0]))
    assert body["warnings"] == [
        "alwayson_scripts.ControlNet.args[0].hr_option: accepted but not supported; ignored",
        "alwayson_scripts.ControlNet.args[0].foo: not a ControlNet unit field; ignored",
    ]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model": "nope"}, "'nope' is not in the catalogue; valid: cn_edges ["),
        ({"model": "../ControlNet/cn_edges.safetensors"}, "not a path"),
        ({"model": "C:\\models\\cn_edges.pth"}, "not a path"),
        ({"model": ".."}, "not a path"),
        ({"model": "None"}, "args[0].model: name a ControlNet"),
        ({"module": "depth_midas"}, "needs a downloaded annotator model"),
        ({"module": "sobel?"}, "unknown ControlNet module"),
        ({"resize_mode": 5}, "resize_mode must be 0-2"),
        ({"control_mode": "loud"}, "unknown ControlNet control mode 'loud'"),
        ({"weight": "heavy"}, "weight must be a finite number"),
        ({"image": "!!"}, "args[0].image is not valid base64"),
        ({"image": ""}, "needs an `image`"),
        ({"model": "cn_wide"}, "ControlNet cn_wide ["),
    ],
)
def test_bad_units_are_422_naming_the_field(client, change, message):
    response = client.post("/sdapi/v1/txt2img", json=_with_units({**UNIT, **change}))
    assert response.status_code == 422, response.text
    assert message in response.json()["detail"]
    if change.get("model") == "cn_wide":  # found, loaded by the worker, refused for its family
        assert "another model family" in response.json()["detail"]
    assert client.post("/sdapi/v1/txt2img", json=PAYLOAD).status_code == 200


def test_controlnet_routes(client, models_dir):
    folder = models_dir / "ControlNet"
    titles = [f"{n} [{a1111_controlnet_hash(folder / f'{n}.safetensors')}]" for n in ("cn_edges", "cn_wide")]
    assert client.get("/controlnet/model_list").json() == {"model_list": titles}
    assert client.get("/controlnet/version").json() == {"version": 2}
    modules = client.get("/controlnet/module_list").json()
    assert modules["module_list"] == list(PREPROCESSORS)
    canny = modules["module_detail"]["canny"]
    assert canny["model_free"] and [s["name"] for s in canny["sliders"]] == [
        "Preprocessor Resolution",
        "low",
        "high",
    ]
    assert "controlnet" in client.get("/sdapi/v1/scripts").json()["txt2img"]
    body = {"controlnet_module": "canny", "controlnet_input_images": [_png(_square())]}
    body |= {"controlnet_processor_res": 64, "controlnet_threshold_a": 50, "controlnet_threshold_b": 150}
    detected = client.post("/controlnet/detect", json=body).json()
    assert detected["info"] == "Success"
    expected = run_preprocessor("canny", np.asarray(_square()), 64, 50, 150)
    np.testing.assert_array_equal(np.asarray(_decode(detected["images"][0])), expected)
    refused = client.post("/controlnet/detect", json={**body, "controlnet_module": "openpose"})
    assert refused.status_code == 422 and "annotator" in refused.json()["detail"]


def test_webuiapi_controlnet_unit_against_uvicorn(models_dir):
    webuiapi = pytest.importorskip("webuiapi")
    uvicorn = pytest.importorskip("uvicorn")
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(models_dir=models_dir), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 20
        while not server.started and time.time() < deadline:
            time.sleep(0.05)
        api = webuiapi.WebUIApi(host="127.0.0.1", port=port)
        assert api.controlnet_model_list()[0].startswith("cn_edges [")
        # webuiapi's unit defaults: "Resize and Fill", thresholds 64/64 (used by canny as low/high)
        unit = webuiapi.ControlNetUnit(image=_square(), module="canny", model="cn_edges", weight=0.8)
        result = api.txt2img(
            prompt="a cat", negative_prompt="dog", seed=7, steps=3, width=32, height=32, cfg_scale=5,
            controlnet_units=[unit],
        )  # fmt: skip
        network = load_controlnet(models_dir / "ControlNet" / "cn_edges.safetensors")
        ours = ControlNetUnit(
            image=_square(), network=network, module="canny", weight=0.8, resize_mode="Resize and Fill",
            threshold_a=64, threshold_b=64,
        )  # fmt: skip
        expected = run(load(models_dir / "tiny.safetensors"), replace(REQUEST, controlnet=(ours,)))[0]
        _same_pixels(result.image, expected)
        assert 'ControlNet 0: "Module: canny, Model: cn_edges [' in result.info["infotexts"][0]
    finally:
        server.should_exit = True
        thread.join(20)


def test_networks_are_loaded_once_and_released_on_a_model_switch(models_dir, tmp_path, monkeypatch):
    import shutil
    import weakref

    import latentforge.server.jobs as jobs

    for name in ("a.safetensors", "b.safetensors"):
        shutil.copy(models_dir / "tiny.safetensors", tmp_path / name)
    shutil.copytree(models_dir / "ControlNet", tmp_path / "ControlNet")
    loads = []
    monkeypatch.setattr(
        jobs, "load_controlnet", lambda path, **kw: loads.append(path) or load_controlnet(path, **kw)
    )
    app = create_app(models_dir=tmp_path)
    with TestClient(app, base_url=LOCAL) as client:
        for _ in range(2):
            assert client.post("/sdapi/v1/txt2img", json=_with_units(UNIT)).status_code == 200
        assert loads == [tmp_path / "ControlNet" / "cn_edges.safetensors"]  # cached by file
        network = weakref.ref(app.state.worker.networks[loads[0]])
        assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "b"}).status_code == 200
        import gc

        gc.collect()
        assert app.state.worker.networks == {} and network() is None


def test_img2img_unit_without_image_uses_the_init_image(client, models_dir):
    init = _square().rotate(45)
    payload = {**_with_units({**UNIT, "image": ""}), "init_images": [_png(init)], "denoising_strength": 0.6}
    response = client.post("/sdapi/v1/img2img", json=payload)
    assert response.status_code == 200, response.text
    network = load_controlnet(models_dir / "ControlNet" / "cn_edges.safetensors")
    unit = ControlNetUnit(
        image=init, network=network, module="canny", weight=0.5, resize_mode="Just Resize",
        control_mode="My prompt is more important",
    )  # fmt: skip
    request = replace(REQUEST, init=InitImage((init,), 0.6), controlnet=(unit,))
    _same_pixels(
        _decode(response.json()["images"][0]), run(load(models_dir / "tiny.safetensors"), request)[0]
    )


def test_controlnet_routes_need_the_token(models_dir):
    with TestClient(create_app(models_dir=models_dir, token="t0ken"), base_url=LOCAL) as client:
        for method, path in [("get", "/controlnet/model_list"), ("get", "/controlnet/module_list"),
                             ("get", "/controlnet/version"), ("post", "/controlnet/detect")]:  # fmt: skip
            assert getattr(client, method)(path).status_code == 401, path
        bearer = {"Authorization": "Bearer t0ken"}
        assert client.get("/controlnet/version", headers=bearer).status_code == 200
        cross = bearer | {"Origin": "http://evil.example"}
        assert client.post("/controlnet/detect", json={}, headers=cross).status_code == 403
