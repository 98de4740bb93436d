"""CFG truncation (A1111's NGMS, diffusers' CFG cut-off): which evaluations skip the unconditional pass,
how many network rows that saves, and that the defaults are the exact path bit for bit."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from latentforge.errors import ParameterError
from latentforge.model import StableDiffusion
from latentforge.models.families import TINY
from latentforge.pipelines.request import GenerationRequest, resolve
from latentforge.pipelines.request_infotext import from_infotext, to_infotext
from latentforge.pipelines.runner import run
from latentforge.sampling.guidance import CFGTruncation

PARAMS = GenerationRequest(
    prompt="a cat", negative_prompt="dog", steps=4, seed=7, width=32, height=32, cfg_scale=5, sampler="Euler"
)


@pytest.fixture(scope="module")
def model() -> StableDiffusion:
    torch.manual_seed(0)
    return StableDiffusion.from_family(TINY).eval()


def _rows(model: StableDiffusion, request: GenerationRequest) -> tuple[torch.Tensor, list[int]]:
    """The latents of a run and the batch size of every U-Net call it made."""
    rows: list[int] = []
    hook = model.unet.register_forward_pre_hook(lambda _m, args: rows.append(args[0].shape[0]))
    try:
        latents = run(model, request, progress=False)[0].latents
    finally:
        hook.remove()
    return latents, rows


def test_rules():
    ngms = CFGTruncation(min_sigma=1.0)
    # A1111 skips on odd denoiser calls only, and only strictly below the threshold
    assert [ngms.skips(0.5, call, 0, 10) for call in range(4)] == [False, True, False, True]
    assert not ngms.skips(1.0, 1, 0, 10) and not ngms.skips(2.0, 1, 0, 10)
    assert CFGTruncation(1.0, every_call=True).skips(0.5, 0, 0, 10)
    cut = CFGTruncation(cutoff=0.4)  # diffusers: steps after index int(10 * 0.4) = 4 are unguided
    assert [cut.skips(5.0, 0, step, 10) for step in range(10)] == [False] * 5 + [True] * 5
    assert not any(CFGTruncation().skips(s, c, i, 10) for s in (0.1, 14.0) for c in (0, 1) for i in range(10))


def test_defaults_are_the_plain_path_bit_for_bit(model, monkeypatch):
    from latentforge.pipelines import prompt_guidance

    plain_denoiser = prompt_guidance.PromptConditioner.denoiser

    def without_truncation(self, *args, truncation=None, **kwargs):  # the path before truncation existed
        return plain_denoiser(self, *args, **kwargs)

    latents, rows = _rows(model, PARAMS)
    monkeypatch.setattr(prompt_guidance.PromptConditioner, "denoiser", without_truncation)
    plain, plain_rows = _rows(model, PARAMS)
    assert torch.equal(latents, plain) and rows == plain_rows == [2] * 4
    zero = replace(PARAMS, s_min_uncond=0.0, s_min_uncond_all=True, cfg_cutoff=1.0)
    assert torch.equal(_rows(model, zero)[0], plain)


def test_network_rows_saved_and_cond_only_equals_cfg_1(model):
    latents, rows = _rows(model, replace(PARAMS, s_min_uncond=1e9))
    assert rows == [2, 1, 2, 1]  # every other evaluation is cond only
    everything, rows = _rows(model, replace(PARAMS, s_min_uncond=1e9, s_min_uncond_all=True))
    assert rows == [1, 1, 1, 1]
    # cond alone is exactly the unguided denoiser: the same as CFG scale 1
    assert torch.equal(everything, _rows(model, replace(PARAMS, cfg_scale=1.0))[0])
    _, rows = _rows(model, replace(PARAMS, cfg_cutoff=0.5))
    assert rows == [2, 2, 2, 1]  # steps after int(4 * 0.5) = 2
    plain = _rows(model, PARAMS)[0]
    assert not torch.equal(latents, plain)
    # Heun evaluates twice per step; A1111 counts calls, so the alternation follows calls, not steps
    _, rows = _rows(model, replace(PARAMS, sampler="Heun", steps=2, s_min_uncond=1e9))
    assert rows == [2, 1, 2]


def test_infotext_and_validation(model):
    request = replace(PARAMS, s_min_uncond=2.5, s_min_uncond_all=True, cfg_cutoff=0.6, seed=3)
    text = to_infotext(resolve(request, model).request)
    assert "NGMS: 2.5" in text and "NGMS all steps: True" in text and "CFG cutoff: 0.6" in text
    back = from_infotext(text).request
    assert (back.s_min_uncond, back.s_min_uncond_all, back.cfg_cutoff) == (2.5, True, 0.6)
    assert "NGMS" not in to_infotext(resolve(PARAMS, model).request)
    # A1111 writes NGMS only while it applied; reading one of its infotexts gives the same field
    assert from_infotext("a\nSteps: 20, Sampler: Euler, NGMS: 0.8, Seed: 1").request.s_min_uncond == 0.8
    for bad in ({"s_min_uncond": -1.0}, {"cfg_cutoff": 1.5}, {"cfg_cutoff": float("nan")}):
        with pytest.raises(ParameterError, match="NGMS|CFG cutoff"):
            resolve(replace(PARAMS, **bad), model)


def test_cli_flags():
    from latentforge.cli import build_parser, build_request

    args = build_parser().parse_args(
        ["generate", "x", "--ngms", "1.5", "--ngms-all-steps", "--cfg-cutoff", ".5"]
    )
    request = build_request(args)
    assert (request.s_min_uncond, request.s_min_uncond_all, request.cfg_cutoff) == (1.5, True, 0.5)
    assert build_request(build_parser().parse_args(["generate", "x"])) == GenerationRequest(prompt="x")
