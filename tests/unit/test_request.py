"""The request layer: resolve() once, infotext both ways through one table, sampler options per sampler,
A1111's combined sampler names, and regeneration from PNG/JPEG/WebP metadata bit for bit."""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from latentforge.api import from_png
from latentforge.errors import ParameterError
from latentforge.model import StableDiffusion
from latentforge.models.families import TINY
from latentforge.pipelines.infotext import parse_infotext, read_infotext, save_image
from latentforge.pipelines.request import GenerationRequest, Hires, InitImage, Inpaint, resolve
from latentforge.pipelines.request_infotext import INFOTEXT_KEYS, from_infotext, to_infotext
from latentforge.pipelines.runner import run
from latentforge.prompts.extra_networks import strip_extra_networks
from latentforge.sampling.registry import SAMPLERS
from latentforge.sampling.schedules import SCHEDULES

BASE = GenerationRequest(
    prompt="a cat, sitting: on a mat", negative_prompt="dog", steps=3, seed=9, cfg_scale=5
)
MASK = Image.new("L", (32, 32), 255)


@pytest.fixture(scope="module")
def model() -> StableDiffusion:
    torch.manual_seed(0)
    bundle = StableDiffusion.from_family(TINY).eval()
    bundle.short_hash = "0123456789"
    return bundle


def single(model: StableDiffusion, request: GenerationRequest) -> GenerationRequest:
    """The resolved single-image request of image 0: what an image's infotext describes."""
    if request.vae:  # a model whose VAE was swapped for the one the request names
        model = copy.copy(model)
        model.vae_name, model.vae_hash = request.vae, request.vae_hash
    if request.fast_decode:  # a model with a TAESD (any module: resolve only checks it is there)
        model = copy.copy(model)
        model.taesd = torch.nn.Module()  # type: ignore[assignment]
    resolved = resolve(request, model)
    return resolved.image_request(resolved.batches[0], 0)


REQUESTS = {
    **{f"sampler {name}": replace(BASE, sampler=name) for name in SAMPLERS},
    **{f"schedule {name}": replace(BASE, sampler="Euler", schedule=name) for name in SCHEDULES},
    "hires scale": replace(BASE, hires=Hires(scale=1.5, steps=2, upscaler="Lanczos", denoising_strength=0.4)),
    "hires token merging": replace(BASE, hires=Hires(scale=1.5, token_merging_ratio=0.3)),
    "hires resize, own sampler": replace(
        BASE, hires=Hires(resize_width=64, resize_height=48, sampler="DPM++ SDE Karras")
    ),
    "img2img": replace(BASE, init=InitImage(denoising_strength=0.35)),
    "inpaint": replace(
        BASE,
        init=InitImage(denoising_strength=0.6),
        inpaint=Inpaint(
            mask=MASK, mask_blur=2, masked_content="fill", only_masked=True, only_masked_padding=8
        ),
    ),
    "outpaint": replace(BASE, init=InitImage(), inpaint=Inpaint(outpaint=(8, 0, 0, 16), latent_blend=False)),
    "variation seed": replace(BASE, subseed=1234, subseed_strength=0.25),
    "vae and model": replace(BASE, vae="ft-mse.safetensors", vae_hash="abcdef0123"),
    "clip skip": replace(BASE, clip_skip=2),
    "sampler options": replace(
        BASE, sampler="Euler", sampler_options={"s_churn": 0.5, "s_noise": 1.003, "s_tmin": 0.1}
    ),
    "eta and ensd": replace(BASE, sampler="Euler a", eta=0.7, eta_noise_seed_delta=31337),
    "cfg rescale, tiled": replace(BASE, cfg_rescale=0.7, tiled_vae=True),
    "unknown keys": replace(
        BASE, extra={"ADetailer confidence": "0.3", "ADetailer model": "face_yolov8n.pt"}
    ),
    "speed options": replace(
        BASE,
        s_min_uncond=1.5,
        s_min_uncond_all=True,
        cfg_cutoff=0.8,
        fast_decode=True,
        token_merging_ratio=0.5,
        token_merging_max_downsample=2,
        token_merging_random=True,
    ),
    "deepcache": replace(BASE, deepcache_interval=3, deepcache_branch=1),
    "multi-line prompts": replace(BASE, prompt="line one,\nline two: (x:1.2)", negative_prompt="a\nb"),
}


@pytest.mark.parametrize("name", list(REQUESTS))
def test_infotext_round_trips_every_request_exactly(model, name):
    one = single(model, REQUESTS[name])
    parsed = from_infotext(to_infotext(one))
    assert parsed.request == one
    assert parsed.unused == tuple(one.extra)


def test_every_table_key_is_written_by_some_request(model):
    written = set()
    for request in REQUESTS.values():
        written |= set(parse_infotext(to_infotext(single(model, request)))[2])
    # Keys the grid above cannot reach: the other sampler options (order/variant are UniPC's, tmax is inf
    # by default and written only when set); the adapter hashes need files (tests/unit/test_adapter_tags.py).
    unreached = {"Sigma tmax", "Sampler order", "Sampler variant", "Lora hashes", "TI hashes"}
    # SDXL's keys need an SDXL model: tests/unit/test_sdxl_request.py writes each of them
    unreached |= {e.key for e in INFOTEXT_KEYS if e.field.startswith(("refiner.", "size_cond."))}
    assert {entry.key for entry in INFOTEXT_KEYS} - unreached <= written


def test_combined_a1111_sampler_names_split_into_sampler_and_schedule(model):
    for legacy, sampler, schedule in [
        ("DPM++ 2M Karras", "DPM++ 2M", "Karras"),
        ("DPM++ SDE Karras", "DPM++ SDE", "Karras"),
        ("DPM++ 2M SDE Exponential", "DPM++ 2M SDE", "Exponential"),
        ("Euler a", "Euler a", "Uniform"),
        ("DPM2 a Karras", "DPM2 a", "Karras"),
    ]:
        resolved = resolve(replace(BASE, sampler=legacy), model).request
        assert (resolved.sampler, resolved.schedule) == (sampler, schedule)
        text = "x\nSteps: 20, Sampler: " + legacy + ", Schedule type: Automatic, CFG scale: 7, Seed: 1"
        parsed = from_infotext(text).request
        assert (parsed.sampler, resolve(parsed, model).request.schedule) == (sampler, schedule)
    # the combined name's schedule wins over the schedule field (A1111's get_sampler_and_scheduler)
    combined = resolve(replace(BASE, sampler="DPM++ 2M Karras", schedule="Exponential"), model).request
    assert combined.schedule == "Karras"
    for alias in ("DPM++ 2M sgm_uniform", "DPM++ 2M SGMUniform"):
        assert resolve(replace(BASE, sampler=alias), model).request.schedule == "SGM Uniform"
    assert resolve(replace(BASE, schedule="karras"), model).request.schedule == "Karras"
    with pytest.raises(ParameterError, match="unknown sampler 'DPM fast'; valid names: DPM\\+\\+ 2M"):
        resolve(replace(BASE, sampler="DPM fast"), model)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_each_option_is_accepted_exactly_by_the_samplers_that_declare_it(model, sampler):
    spec = SAMPLERS[sampler]
    all_options = {name for s in SAMPLERS.values() for name in s.options}
    for option in sorted(all_options):
        default = next(s.options[option] for s in SAMPLERS.values() if option in s.options)
        request = replace(BASE, sampler=sampler, sampler_options={option: default})
        if option in spec.options:
            assert resolve(request, model).first.options == {option: default}
        else:
            with pytest.raises(ParameterError, match=f"takes no option '{option}'; samplers that take it: "):
                resolve(request, model)
    if "eta" in spec.options:
        assert resolve(replace(BASE, sampler=sampler, eta=0.5), model).first.options == {"eta": 0.5}
    else:
        with pytest.raises(ParameterError, match="takes no option 'eta'"):
            resolve(replace(BASE, sampler=sampler, eta=0.5), model)


def test_option_values_are_checked(model):
    for options, message in [
        ({"eta": -1.0}, "must be >= 0"),
        ({"eta": float("nan")}, "finite number"),
        ({"eta": "high"}, "finite number"),
    ]:
        with pytest.raises(ParameterError, match=message):
            resolve(replace(BASE, sampler="Euler a", sampler_options=options), model)
    with pytest.raises(ParameterError, match="variant must be one of \\('bh1', 'bh2'\\)"):
        resolve(replace(BASE, sampler="UniPC", sampler_options={"variant": "bh3"}), model)
    with pytest.raises(ParameterError, match="order must be a whole number"):
        resolve(replace(BASE, sampler="LMS", sampler_options={"order": 2.5}), model)


def test_hires_options_go_to_the_pass_whose_sampler_takes_them(model):
    request = replace(BASE, sampler="DPM++ 2M", eta=0.3, hires=Hires(sampler="Euler a"))
    resolved = resolve(request, model)
    assert resolved.first.options == {} and resolved.second is not None
    assert resolved.second.options == {"eta": 0.3}


def test_eta_reaches_the_sampler(model):
    plain = run(model, replace(BASE, sampler="Euler a", width=32, height=32), progress=False)[0]
    zero = run(model, replace(BASE, sampler="Euler a", eta=0.0, width=32, height=32), progress=False)[0]
    euler = run(model, replace(BASE, sampler="Euler", width=32, height=32), progress=False)[0]
    assert not torch.equal(plain.latents, zero.latents)
    # Euler a with eta 0 has no ancestral noise: it is Euler
    assert torch.allclose(zero.latents, euler.latents, atol=1e-5 * euler.latents.abs().max())


def test_ensd_changes_only_the_step_noise(model):
    request = replace(BASE, sampler="Euler a", width=32, height=32)
    a = run(model, request, progress=False)[0]
    b = run(model, replace(request, eta_noise_seed_delta=31337), progress=False)[0]
    c = run(model, replace(request, sampler="Euler", eta_noise_seed_delta=31337), progress=False)[0]
    d = run(model, replace(request, sampler="Euler"), progress=False)[0]
    assert not torch.equal(a.latents, b.latents) and torch.equal(c.latents, d.latents)
    assert "ENSD: 31337" in b.infotext


def test_model_hash_mismatch_warns_and_gpu_noise_is_noted(model):
    text = "x\nSteps: 3, Sampler: Euler, CFG scale: 7, Seed: 1, Model hash: ffffffffff, Version: v1.6.0"
    parsed = from_infotext(text)
    assert parsed.notes and "GPU noise" in parsed.notes[0]
    with pytest.warns(UserWarning, match="model hash ffffffffff .* has 0123456789"):
        resolve(parsed.request, model)
    ours = from_infotext(to_infotext(single(model, BASE)))
    assert ours.notes == ()


def test_empty_or_broken_infotexts_are_errors():
    with pytest.raises(ParameterError, match="empty"):
        from_infotext("  \n")
    with pytest.raises(ParameterError, match="'Steps' has an unreadable value 'many'"):
        from_infotext("x\nSteps: many, Sampler: Euler, CFG scale: 7, Seed: 1")


@pytest.mark.parametrize("suffix", ["png", "jpg", "webp"])
@pytest.mark.parametrize(
    "name", ["sampler Euler a", "sampler DPM++ 2M SDE", "hires scale", "variation seed", "sampler options"]
)
def test_regenerating_from_a_saved_image_is_bit_identical(model, tmp_path, name, suffix):
    request = replace(REQUESTS[name], width=32, height=32)
    first = run(model, request, progress=False)[0]
    path = save_image(first.image, tmp_path / f"a.{suffix}", first.infotext)
    assert read_infotext(path) == first.infotext
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # our own infotext: nothing unused, no noise note
        again = run(model, from_png(path), progress=False)[0]
    assert torch.equal(first.latents, again.latents) and again.infotext == first.infotext


def test_inpainting_regenerates_from_its_infotext_given_the_image_and_mask(model):
    image = Image.effect_noise((32, 32), 40).convert("RGB")
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    request = replace(
        REQUESTS["inpaint"], init=InitImage((image,), 0.6), inpaint=Inpaint(mask=mask, mask_blur=2)
    )
    first = run(model, request, progress=False)[0]
    parsed = from_infotext(first.infotext).request
    assert parsed.init is not None and parsed.inpaint is not None and parsed.inpaint.mask is None
    with pytest.raises(ParameterError, match="give the init image"):
        run(model, parsed, progress=False)
    given = replace(
        parsed, init=replace(parsed.init, images=(image,)), inpaint=replace(parsed.inpaint, mask=mask)
    )
    assert torch.equal(run(model, given, progress=False)[0].latents, first.latents)


CORPUS = Path(__file__).parents[1] / "data" / "a1111_infotexts"


@pytest.mark.skipif(not CORPUS.is_dir(), reason="corpus not present")
def test_a1111_corpus_parses_into_requests_keeping_every_unknown_key():
    files = sorted(CORPUS.glob("*.txt"))
    assert len(files) >= 30
    for path in files:
        text = path.read_text(encoding="utf-8")
        try:
            parsed = from_infotext(text)
        except ParameterError as e:  # only samplers we do not have may be refused, and say so
            assert "unknown sampler" in str(e), (path.name, e)
            continue
        _, _, values = parse_infotext(text)
        for key in parsed.unused:
            assert parsed.request.extra[key] == values[key], (path.name, key)
        # written back, every unknown key is still there with its value
        again = parse_infotext(to_infotext(parsed.request))[2]
        assert all(again[key] == values[key] for key in parsed.unused), path.name


@pytest.mark.skipif(not CORPUS.is_dir(), reason="corpus not present")
def test_a1111_images_regenerate_with_the_schedule_they_were_made_with(model):
    """Before 1.9 a name without a schedule suffix ran the model's own sigmas; A1111 1.9+ pastes such an
    infotext as "Automatic" (Karras for DPM++ 2M ...), we keep what made the image (corpus expectations)."""
    expected = json.loads((CORPUS / "expected.json").read_text(encoding="utf-8"))
    checked = 0
    for name, entry in expected.items():
        if not isinstance(entry, dict) or entry.get("schedule_at_writing") is None:
            continue
        parsed = from_infotext((CORPUS / name).read_text(encoding="utf-8")).request
        # the schedule only: their <lora:> files are not here (a missing one is an error, test_adapter_tags)
        parsed = replace(parsed, prompt=strip_extra_networks(parsed.prompt), lora_hashes="")
        assert resolve(parsed, model).request.schedule == entry["schedule_at_writing"], name
        checked += 1
    assert checked >= 30
