"""The speed options over HTTP: A1111's names where A1111 has them (`s_min_uncond`, `override_settings`
token merging ratios and NGMS all steps), our top-level fields where it has none; each reaches the
request, a bad value is a 422 naming the field, the infotext carries the keys, the image is the runner's."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from test_server import LOCAL, _png  # noqa: E402

from latentforge.api import run  # noqa: E402
from latentforge.errors import ParameterError  # noqa: E402
from latentforge.model import load  # noqa: E402
from latentforge.models.families import TINY  # noqa: E402
from latentforge.pipelines.request import GenerationRequest, Hires  # noqa: E402
from latentforge.server.app import create_app  # noqa: E402
from latentforge.server.payload import request_from_payload  # noqa: E402
from references import save_random_model

PAYLOAD = {"prompt": "a cat", "negative_prompt": "dog", "seed": 7, "steps": 4, "sampler_name": "Euler"}
PAYLOAD |= {"width": 32, "height": 32, "cfg_scale": 5}
REQUEST = GenerationRequest(
    prompt="a cat", negative_prompt="dog", seed=7, steps=4, sampler="Euler", width=32, height=32, cfg_scale=5
)


@pytest.mark.parametrize(
    ("change", "field", "value"),
    [
        ({"s_min_uncond": 1.5}, "s_min_uncond", 1.5),
        ({"cfg_cutoff": 0.5}, "cfg_cutoff", 0.5),
        ({"deepcache_interval": 3}, "deepcache_interval", 3),
        ({"deepcache_branch": 2}, "deepcache_branch", 2),
        ({"token_merging_max_downsample": 2}, "token_merging_max_downsample", 2),
        ({"token_merging_random": True}, "token_merging_random", True),
        ({"fast_decode": True}, "fast_decode", True),
        ({"override_settings": {"token_merging_ratio": 0.4}}, "token_merging_ratio", 0.4),
        ({"override_settings": {"s_min_uncond_all": True}}, "s_min_uncond_all", True),
    ],
)
def test_each_speed_field_reaches_the_request(change, field, value):
    plain = request_from_payload(PAYLOAD, "txt2img").request
    assert getattr(plain, field) == getattr(GenerationRequest(), field) != value  # off unless asked
    for mode, extra in (("txt2img", {}), ("img2img", {"init_images": [_png(Image.new("RGB", (32, 32)))]})):
        mapped = request_from_payload(PAYLOAD | extra | change, mode)
        assert getattr(mapped.request, field) == value and not mapped.warnings


def test_token_merging_ratios_follow_a1111s_rules():
    """processing.py `get_token_merging_ratio`: the hires pass's ratio and img2img's apply when not 0."""
    hires = PAYLOAD | {"enable_hr": True, "hr_scale": 1.5, "denoising_strength": 0.5}
    mapped = request_from_payload(hires | {"override_settings": {"token_merging_ratio_hr": 0.3}}, "txt2img")
    assert mapped.request.hires is not None and mapped.request.hires.token_merging_ratio == 0.3
    assert mapped.request.token_merging_ratio == 0 and not mapped.warnings
    no_hires = request_from_payload(
        PAYLOAD | {"override_settings": {"token_merging_ratio_hr": 0.3}}, "txt2img"
    )
    assert no_hires.request.hires is None

    init = PAYLOAD | {"init_images": [_png(Image.new("RGB", (32, 32)))]}
    for settings, want in [
        ({"token_merging_ratio_img2img": 0.3}, 0.3),
        ({"token_merging_ratio_img2img": 0.3, "token_merging_ratio": 0.5}, 0.5),  # an override wins
        ({"token_merging_ratio": 0, "token_merging_ratio_img2img": 0.3}, 0.3),  # ... unless it is 0
        ({"token_merging_ratio": 0.2, "token_merging_ratio_img2img": 0}, 0.2),
    ]:
        assert (
            request_from_payload(
                init | {"override_settings": settings}, "img2img"
            ).request.token_merging_ratio
            == want
        )
    # the other mode's option: reported, not used
    txt = request_from_payload(
        PAYLOAD | {"override_settings": {"token_merging_ratio_img2img": 0.3}}, "txt2img"
    )
    assert txt.request.token_merging_ratio == 0 and "token_merging_ratio_img2img" in txt.warnings[0]
    img = request_from_payload(init | {"override_settings": {"token_merging_ratio_hr": 0.3}}, "img2img")
    assert img.request.hires is None and "token_merging_ratio_hr" in img.warnings[0]


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"cfg_cutoff": "half"}, "cfg_cutoff"),
        ({"deepcache_interval": 2.5}, "deepcache_interval"),
        ({"deepcache_branch": True}, "deepcache_branch"),
        ({"fast_decode": "yes"}, "fast_decode"),
        ({"token_merging_random": 2}, "token_merging_random"),
        ({"override_settings": {"token_merging_ratio": "a lot"}}, "override_settings.token_merging_ratio"),
        ({"override_settings": {"s_min_uncond_all": "sometimes"}}, "override_settings.s_min_uncond_all"),
        ({"override_settings": {"token_merging_ratio_hr": None}}, "override_settings.token_merging_ratio_hr"),
    ],
)
def test_a_badly_typed_speed_field_is_named(change, named):
    with pytest.raises(ParameterError, match=named.replace(".", r"\.")):
        request_from_payload(PAYLOAD | change, "txt2img")


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    save_random_model(TINY, folder / "tiny.safetensors")
    return folder


@pytest.fixture(scope="module")
def client(models_dir):
    with TestClient(create_app(models_dir=models_dir, queue_size=2), base_url=LOCAL) as client:
        yield client


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"cfg_cutoff": 1.5}, "cfg_cutoff"),
        ({"deepcache_interval": -1}, "deepcache_interval"),
        ({"deepcache_branch": 99}, "deepcache_branch"),
        ({"token_merging_max_downsample": 3}, "token_merging_max_downsample"),
        ({"override_settings": {"token_merging_ratio": 0.9}}, "token_merging_ratio"),
        ({"enable_hr": True, "override_settings": {"token_merging_ratio_hr": 0.9}}, "token_merging_ratio_hr"),
        ({"fast_decode": True}, "fast_decode"),  # this model has no TAESD
    ],
)
def test_out_of_range_speed_values_are_422_naming_the_field(client, change, named):
    response = client.post("/sdapi/v1/txt2img", json=PAYLOAD | change)
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "ParameterError" and named in response.json()["detail"]


def test_speed_fields_are_in_the_infotext_and_the_image_is_the_runners(client, models_dir):
    change = {
        "s_min_uncond": 2.0,
        "cfg_cutoff": 0.5,
        "deepcache_interval": 2,
        "deepcache_branch": 1,
        "token_merging_max_downsample": 2,
        "override_settings": {"token_merging_ratio": 0.5, "s_min_uncond_all": True},
        "enable_hr": True,
        "hr_scale": 2.0,
        "denoising_strength": 0.5,
    }
    change["override_settings"]["token_merging_ratio_hr"] = 0.25
    response = client.post("/sdapi/v1/txt2img", json=PAYLOAD | change)
    assert response.status_code == 200, response.text
    body = response.json()
    assert not body["warnings"]
    infotext = json.loads(body["info"])["infotexts"][0]
    for key in (
        "NGMS: 2",
        "NGMS all steps: True",
        "CFG cutoff: 0.5",
        "DeepCache interval: 2",
        "DeepCache branch: 1",
        "Token merging ratio: 0.5",
        "Token merging max downsample: 2",
        "Token merging ratio hr: 0.25",
    ):
        assert key in infotext, (key, infotext)
    request = GenerationRequest(
        **{
            **REQUEST.__dict__,
            "s_min_uncond": 2.0,
            "s_min_uncond_all": True,
            "cfg_cutoff": 0.5,
            "deepcache_interval": 2,
            "deepcache_branch": 1,
            "token_merging_ratio": 0.5,
            "token_merging_max_downsample": 2,
            "hires": Hires(scale=2.0, denoising_strength=0.5, token_merging_ratio=0.25),
        }
    )
    want = run(load(models_dir / "tiny.safetensors"), request)[0]
    got = Image.open(io.BytesIO(base64.b64decode(body["images"][0])))
    assert got.size == want.size == (64, 64)
    np.testing.assert_array_equal(np.asarray(got.convert("RGB")), np.asarray(want.convert("RGB")))


def test_the_hires_pass_uses_its_own_token_merging_ratio(models_dir):
    from latentforge.pipelines.request_infotext import from_infotext
    from latentforge.pipelines.runner import run as run_results

    model = load(models_dir / "tiny.safetensors")
    hires = GenerationRequest(**{**REQUEST.__dict__, "hires": Hires(scale=2.0, denoising_strength=0.5)})

    def image(base: float, hr: float) -> np.ndarray:
        second = Hires(scale=2.0, denoising_strength=0.5, token_merging_ratio=hr)
        request = GenerationRequest(**{**hires.__dict__, "token_merging_ratio": base, "hires": second})
        return np.asarray(run(model, request)[0].convert("RGB"))

    # the hires ratio replaces the first pass's in the second pass only (A1111: when not 0)
    assert not np.array_equal(image(0, 0.5), image(0, 0))
    assert not np.array_equal(image(0, 0.5), image(0.5, 0))
    np.testing.assert_array_equal(image(0.5, 0), image(0.5, 0.5))
    result = run_results(
        model, GenerationRequest(**{**hires.__dict__, "hires": Hires(token_merging_ratio=0.25)})
    )
    assert from_infotext(result[0].infotext).request.hires.token_merging_ratio == 0.25


def test_a_tiny_decoder_in_models_vae_taesd_serves_fast_decode_and_previews(tmp_path):
    """A1111's folder for TAESD (models/VAE-taesd/taesd_decoder.*): the server attaches it to the loaded
    model, so `fast_decode` works and the default TAESD previews use it."""
    import torch
    from safetensors.torch import save_file

    from latentforge.checkpoints.taesd import read_taesd
    from latentforge.models.taesd import TinyAutoencoder, TinyAutoencoderConfig

    save_random_model(TINY, tmp_path / "tiny.safetensors")
    torch.manual_seed(1)
    config = TinyAutoencoderConfig(4, channels=8, encoder_blocks=(1, 1), decoder_blocks=(1, 1))
    decoder = TinyAutoencoder(config, encoder=False).state_dict()
    (tmp_path / "VAE-taesd").mkdir()
    bare = {k.split(".", 1)[1]: v for k, v in decoder.items()}  # the published files' bare Sequential
    save_file(bare, tmp_path / "VAE-taesd/taesd_decoder.safetensors")
    with TestClient(create_app(models_dir=tmp_path, queue_size=2), base_url=LOCAL) as client:
        response = client.post("/sdapi/v1/txt2img", json=PAYLOAD | {"fast_decode": True})
    assert response.status_code == 200, response.text
    model = load(tmp_path / "tiny.safetensors")
    model.taesd = read_taesd(tmp_path / "VAE-taesd")
    want = run(model, GenerationRequest(**{**REQUEST.__dict__, "fast_decode": True}))[0]
    got = Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0])))
    np.testing.assert_array_equal(np.asarray(got.convert("RGB")), np.asarray(want.convert("RGB")))
