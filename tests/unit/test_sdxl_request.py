"""SDXL request parts: the refiner and size conditioning through resolve and A1111's infotext."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from latentforge.errors import ParameterError
from latentforge.model import StableDiffusion
from latentforge.models.families import TINY, TINY_XL, TINY_XL_REFINER
from latentforge.pipelines.infotext import parse_infotext
from latentforge.pipelines.request import (
    GenerationRequest,
    Hires,
    InitImage,
    Refiner,
    SizeConditioning,
    resolve,
)
from latentforge.pipelines.request_infotext import INFOTEXT_KEYS, from_infotext, to_infotext
from latentforge.pipelines.sdxl_conditioning import size_numbers

DATA = Path(__file__).parent.parent / "data" / "a1111_infotexts"


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {f.name: StableDiffusion.from_family(f) for f in (TINY, TINY_XL, TINY_XL_REFINER)}


FULL = SizeConditioning(
    original_size=(512, 384),
    crop_top_left=(8, 24),
    target_size=(1024, 768),
    negative_original_size=(256, 256),
    negative_crop_top_left=(4, 4),
    negative_target_size=(640, 640),
    aesthetic_score=7.0,
    negative_aesthetic_score=2.0,
)


def test_sdxl_keys_round_trip(models):
    base, refiner = models["tiny-sdxl"], models["tiny-sdxl-refiner"]
    refiner.short_hash = "7440042bbd"
    request = GenerationRequest(prompt="a cat", seed=1, size_cond=FULL, refiner=Refiner(switch_at=0.7))
    resolved = resolve(request, base, refiner=refiner).request
    assert resolved.refiner == Refiner("tiny-sdxl-refiner [7440042bbd]", 0.7)
    text = to_infotext(resolved)
    keys = set(parse_infotext(text)[2])
    assert {e.key for e in INFOTEXT_KEYS if e.field.startswith(("refiner.", "size_cond."))} <= keys
    parsed = from_infotext(text)
    assert parsed.request.size_cond == FULL and parsed.request.refiner == resolved.refiner
    assert not parsed.unused


def test_a1111_refiner_infotext_reads_into_the_refiner_part():
    text = (DATA / "20-v1.9-sdxl-refiner.txt").read_text()
    parsed = from_infotext(text)
    assert parsed.request.refiner == Refiner("sd_xl_refiner_1.0 [7440042bbd]", 0.8)
    assert "Refiner" not in parsed.unused
    assert "Refiner: sd_xl_refiner_1.0 [7440042bbd], Refiner switch at: 0.8" in to_infotext(parsed.request)


def test_size_numbers_defaults_are_the_image_size():
    cond, uncond = size_numbers(None, 832, 1216)
    assert cond.original_size == cond.target_size == (1216, 832) and cond.crop_top_left == (0, 0)
    assert (uncond.original_size, uncond.aesthetic_score, cond.aesthetic_score) == ((1216, 832), 2.5, 6.0)
    cond, uncond = size_numbers(FULL, 64, 64)
    assert cond.tensor(TINY_XL).tolist() == [384, 512, 8, 24, 768, 1024]
    assert uncond.tensor(TINY_XL).tolist() == [256, 256, 4, 4, 640, 640]
    assert cond.tensor(TINY_XL_REFINER).tolist() == [384, 512, 8, 24, 7.0]


def test_bad_sdxl_requests_say_what_to_do(models):
    base, refiner, sd1 = models["tiny-sdxl"], models["tiny-sdxl-refiner"], models["tiny"]
    with pytest.raises(ParameterError, match="is an SDXL refiner: it only refines.*--refiner MODEL"):
        resolve(GenerationRequest(prompt="x"), refiner)
    with pytest.raises(ParameterError, match="size conditioning is for SDXL models; tiny has none"):
        resolve(GenerationRequest(size_cond=FULL), sd1)
    with pytest.warns(UserWarning, match="names refiner x; none is loaded"):
        assert resolve(GenerationRequest(refiner=Refiner("x")), base).request.refiner is None
    with pytest.raises(ParameterError, match="a refiner model but no refiner part"):
        resolve(GenerationRequest(), base, refiner=refiner)
    with pytest.raises(ParameterError, match="refiner switch at must be a finite number in"):
        resolve(GenerationRequest(refiner=Refiner(switch_at=1.5)), base, refiner=refiner)
    with pytest.raises(ParameterError, match="got tiny and tiny-sdxl-refiner"):
        resolve(GenerationRequest(refiner=Refiner()), sd1, refiner=refiner)
    # the refiner with the hires fix refines the second pass (test_sdxl_generate.py)
    assert resolve(GenerationRequest(refiner=Refiner(), hires=Hires()), base, refiner=refiner).second
    # img2img on the refiner alone is what it is for
    assert resolve(GenerationRequest(init=InitImage()), refiner).request.mode == "img2img"
    with pytest.raises(ParameterError, match="crop top left must be a whole number"):
        resolve(GenerationRequest(size_cond=replace(FULL, crop_top_left=(-1, 0))), base)


def test_batch_numbers_match_the_request_numbers():
    from latentforge.pipelines.sdxl_conditioning import batch_numbers

    cond, _ = size_numbers(FULL, 64, 64)
    for family in (TINY_XL, TINY_XL_REFINER):
        got = batch_numbers(
            family,
            torch.tensor([cond.original_size]),
            torch.tensor([cond.crop_top_left]),
            torch.tensor([cond.target_size]),
            cond.aesthetic_score,
        )
        assert got[0].tolist() == cond.tensor(family).tolist()
