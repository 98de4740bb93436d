"""DeepCache as a request option: which evaluations are cached and what they run, interval 1 being the
plain path, every sampler, CFG truncation's cond-only evaluations, ControlNet's residuals, a fresh cache per
pass, the infotext and CLI, and bad values. (Parity with the `deepcache` package: tests/parity.)"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from latentforge.errors import ParameterError
from latentforge.model import StableDiffusion
from latentforge.models.deepcache import DeepCache, input_block_count
from latentforge.models.families import TINY
from latentforge.models.unet import UNetModel
from latentforge.pipelines.request import GenerationRequest, Hires, InitImage, resolve
from latentforge.pipelines.request_infotext import from_infotext, to_infotext
from latentforge.pipelines.runner import run
from latentforge.sampling.registry import SAMPLERS

PARAMS = GenerationRequest(
    prompt="a cat", negative_prompt="dog", steps=4, seed=7, width=32, height=32, cfg_scale=5, sampler="Euler"
)
CONFIG = replace(TINY.unet, num_res_blocks=2)  # SD's layout: 6 input blocks


@pytest.fixture(scope="module")
def model() -> StableDiffusion:
    torch.manual_seed(0)
    return StableDiffusion.from_family(TINY).eval()


def _latents(model: StableDiffusion, request: GenerationRequest) -> torch.Tensor:
    return torch.stack([r.latents for r in run(model, request, progress=False)])


def _calls(unet: UNetModel) -> tuple[list[str], object]:
    """Records which top-level blocks each U-Net call runs ("i3" = input_blocks.3, "m", "o0" ...)."""
    ran: list[str] = []
    hooks = [
        module.register_forward_pre_hook(lambda _m, _a, name=name: ran.append(name))
        for name, module in [
            *((f"i{i}", b) for i, b in enumerate(unet.input_blocks)),
            ("m", unet.middle_block),
            *((f"o{i}", b) for i, b in enumerate(unet.output_blocks)),
        ]
    ]
    return ran, hooks


def test_cached_evaluations_run_the_shallow_branch_only():
    torch.manual_seed(0)
    unet = UNetModel(CONFIG).eval()
    blocks = input_block_count(CONFIG)
    assert blocks == len(unet.input_blocks) == len(unet.output_blocks) == 6
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([900.0, 900.0]), torch.randn(2, 5, 32)
    ran, hooks = _calls(unet)
    cache = DeepCache(interval=3, branch=1)
    with torch.no_grad():
        outputs = [unet(x + 0.1 * i, t - 10 * i, context, deep_cache=cache) for i in range(4)]
    for hook in hooks:
        hook.remove()
    full = [f"i{i}" for i in range(6)] + ["m"] + [f"o{i}" for i in range(6)]
    shallow = ["i0", "i1", "o4", "o5"]
    assert ran == full + shallow + shallow + full  # calls 0 and 3 are full, 1 and 2 cached
    with torch.no_grad():  # a cached evaluation = the shallow branch on the kept h_b of call 0
        plain = [unet(x + 0.1 * i, t - 10 * i, context) for i in range(4)]
    assert torch.equal(outputs[0], plain[0]) and torch.equal(outputs[3], plain[3])
    assert not torch.equal(outputs[1], plain[1])


def test_interval_one_is_the_plain_path_for_every_sampler(model):
    for name in SAMPLERS:
        request = replace(PARAMS, sampler=name, steps=3)
        plain = _latents(model, request)
        assert torch.equal(_latents(model, replace(request, deepcache_interval=1)), plain), name
        cached = _latents(model, replace(request, deepcache_interval=2))
        assert torch.isfinite(cached).all() and not torch.equal(cached, plain), name


def test_counts_unet_calls_not_steps(model):
    """Heun evaluates twice a step: with interval 2, every second call is cached, within each step."""
    ran, hooks = _calls(model.unet)
    try:
        run(model, replace(PARAMS, sampler="Heun", steps=3, deepcache_interval=2), progress=False)
    finally:
        for hook in hooks:
            hook.remove()
    middles = [i for i, name in enumerate(ran) if name == "m"]
    calls = ran.count("i0")
    assert calls == 5 and len(middles) == 3  # Heun: 2 + 2 + 1 (the last step is Euler); full calls 0, 2, 4


def test_cfg_truncation_reuses_the_cond_rows(model):
    """An evaluation without the uncond pass reuses the leading (cond) rows of a full CFG evaluation."""
    torch.manual_seed(1)
    unet = UNetModel(CONFIG).eval()
    x, context = torch.randn(2, 4, 8, 8), torch.randn(4, 5, 32)
    t2, t1 = torch.full((4,), 500.0), torch.full((2,), 450.0)
    both, alone = DeepCache(2), DeepCache(2)
    with torch.no_grad():
        unet(torch.cat([x, x]), t2, context, deep_cache=both)
        unet(torch.cat([x, x]), t2, context, deep_cache=alone)
        from_both = unet(torch.cat([x, x]), torch.cat([t1, t1]), context, deep_cache=both)[:2]
        from_cond = unet(x, t1, context[:2], deep_cache=alone)
    # Batch 2 and batch 4 may take different CPU kernels, so the shallow blocks agree to rounding,
    # not bit for bit. Reusing the wrong (uncond) rows is far outside that rounding: a cache kept from
    # the CFG batch with its halves swapped hands the cond-only evaluation the uncond rows' features.
    torch.testing.assert_close(from_cond, from_both, rtol=0, atol=1e-5)
    swapped = DeepCache(2)
    with torch.no_grad():
        unet(torch.cat([x, x]), t2, torch.cat([context[2:], context[:2]]), deep_cache=swapped)
        from_uncond_rows = unet(x, t1, context[:2], deep_cache=swapped)
    assert (from_uncond_rows - from_cond).abs().max() > 1e-2
    request = replace(PARAMS, steps=6, cfg_cutoff=0.5)
    assert not torch.equal(_latents(model, replace(request, deepcache_interval=3)), _latents(model, request))


def test_controlnet_residuals_of_the_deep_blocks_come_from_the_full_evaluation():
    torch.manual_seed(2)
    unet = UNetModel(CONFIG).eval()
    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([700.0]), torch.randn(1, 5, 32)
    shapes = _residual_shapes(unet, x, t, context)
    control = [torch.randn(s) for s in shapes]
    deep_changed = [c.clone() for c in control]
    for i in range(2, len(control)):  # branch 1: residuals 2.. and the middle's are the deep part
        deep_changed[i] += 1
    shallow_changed = [c.clone() for c in control]
    shallow_changed[1] += 1
    with torch.no_grad():
        cache = DeepCache(2, branch=1)
        unet(x, t, context, control=control, deep_cache=cache)
        same = unet(x, t, context, control=deep_changed, deep_cache=cache)
        cache = DeepCache(2, branch=1)
        unet(x, t, context, control=control, deep_cache=cache)
        other = unet(x, t, context, control=shallow_changed, deep_cache=cache)
        cache = DeepCache(2, branch=1)
        unet(x, t, context, control=control, deep_cache=cache)
        again = unet(x, t, context, control=control, deep_cache=cache)
    assert torch.equal(same, again)  # deep residuals on a cached call: not used (the kept h_b has them)
    assert not torch.equal(other, again)  # shallow residuals: added as in a full evaluation


def _residual_shapes(unet: UNetModel, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> list:
    shapes: list = []
    hooks = [b.register_forward_hook(lambda _m, _a, out: shapes.append(out.shape)) for b in unet.input_blocks]
    hooks.append(unet.middle_block.register_forward_hook(lambda _m, _a, out: shapes.append(out.shape)))
    with torch.no_grad():
        unet(x, t, context)
    for hook in hooks:
        hook.remove()
    return shapes


def test_each_pass_and_run_starts_afresh(model):
    from PIL import Image

    init = InitImage(images=(Image.new("RGB", (32, 32), (200, 40, 40)),), denoising_strength=0.6)
    for request in (
        replace(PARAMS, init=init, deepcache_interval=3),
        replace(
            PARAMS, hires=Hires(scale=1.5, denoising_strength=0.5, upscaler="Latent"), deepcache_interval=3
        ),
        replace(PARAMS, batch_count=2, deepcache_interval=3),
    ):
        first = _latents(model, request)
        assert torch.equal(_latents(model, request), first)  # nothing carried over from the last run
        assert not torch.equal(_latents(model, replace(request, deepcache_interval=0)), first)
    two = _latents(model, replace(PARAMS, batch_count=2, seed=7, deepcache_interval=3))
    assert torch.equal(two[1:], _latents(model, replace(PARAMS, seed=8, deepcache_interval=3)))


def test_infotext_round_trip_and_validation(model):
    request = replace(PARAMS, deepcache_interval=3, deepcache_branch=2)
    resolved = resolve(request, model).request
    text = to_infotext(resolved)
    assert "DeepCache interval: 3" in text and "DeepCache branch: 2" in text
    back = from_infotext(text).request
    assert (back.deepcache_interval, back.deepcache_branch) == (3, 2)
    assert torch.equal(_latents(model, back), _latents(model, request))
    for off in (0, 1):  # off: no keys, and 1 reads back as the default
        text = to_infotext(
            resolve(replace(PARAMS, deepcache_interval=off, deepcache_branch=2), model).request
        )
        assert "DeepCache" not in text
    last = input_block_count(TINY.unet) - 1
    for bad in ({"deepcache_interval": -1}, {"deepcache_branch": last + 1}, {"deepcache_interval": 2.5}):
        with pytest.raises(ParameterError, match="DeepCache"):
            resolve(replace(PARAMS, **bad), model)
    with pytest.raises(ParameterError, match=rf"DeepCache branch.*\[0, {last}\]"):
        resolve(replace(PARAMS, deepcache_interval=2, deepcache_branch=99), model)


def test_cli_flags():
    from latentforge.cli import build_parser, build_request

    args = build_parser().parse_args(["generate", "x", "--deepcache", "3", "--deepcache-branch", "1"])
    request = build_request(args)
    assert (request.deepcache_interval, request.deepcache_branch) == (3, 1)
    assert build_request(build_parser().parse_args(["generate", "x"])) == GenerationRequest(prompt="x")
