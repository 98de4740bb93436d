"""LCM-LoRA, the fast path: an LCM-LoRA file + sampler "LCM" at 4-8 steps and CFG 1-2 equals diffusers'
`load_lora_weights` + `fuse_lora` + `LCMScheduler` end to end (tiny random SD1, same noise).

The file has the LCM-LoRA module set (diffusers' `train_lcm_distill_lora_sd_wds.py` targets: attention
q/k/v/out, proj_in/out, ff, resnet conv1/conv2/conv_shortcut/time_emb_proj, down/upsampler convs; no text
encoder) in both layouts it circulates in: kohya `lora_unet_<diffusers name>` with `alpha`, and PEFT
`unet.<name>.lora_A/B.weight` as diffusers' trainer saves it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from diffusers import LCMScheduler, StableDiffusionPipeline
from safetensors.torch import save_file

from latentforge.checkpoints.lora import apply_loras
from latentforge.models.families import TINY
from latentforge.pipelines.request import GenerationRequest
from latentforge.pipelines.runner import run
from latentforge.sampling.noise import initial_noise
from latentforge.sampling.registry import get_sampler
from references import SD15_SCHEDULER, assert_close, build_pair, write_hf_clip_vocab

LCM_TARGETS = (
    *("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"),
    *("conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"),
)
SEED, SIZE = 11, 32


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return build_pair(TINY, StableDiffusionPipeline, write_hf_clip_vocab(tmp_path_factory.mktemp("vocab")))


def lcm_lora_file(pipe, path: Path, layout: str, rank: int = 4) -> tuple[Path, int]:  # noqa: ANN001
    g = torch.Generator().manual_seed(3)
    tensors, modules = {}, 0
    for name, layer in pipe.unet.named_modules():
        if not name.endswith(LCM_TARGETS) or not isinstance(layer, torch.nn.Linear | torch.nn.Conv2d):
            continue
        w = layer.weight
        down = torch.randn((rank, *w.shape[1:]), generator=g) * 0.2
        up = torch.randn((w.shape[0], rank, *(1,) * (w.ndim - 2)), generator=g) * 0.2
        if layout == "kohya":
            key = "lora_unet_" + name.replace(".", "_")
            tensors |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up}
            tensors[f"{key}.alpha"] = torch.tensor(rank / 2)
        else:
            tensors |= {f"unet.{name}.lora_A.weight": down, f"unet.{name}.lora_B.weight": up}
        modules += 1
    save_file(tensors, path)
    return path, modules


@pytest.mark.parametrize(("layout", "steps", "cfg"), [("kohya", 4, 1.0), ("peft", 8, 1.5), ("kohya", 6, 2.0)])
def test_lcm_lora_txt2img_matches_diffusers(pair, tmp_path, layout, steps, cfg):
    ours, pipe = pair
    name = f"lcm-lora-sdv1-5-{layout}-{steps}"  # the model is shared: one file name per case
    path, modules = lcm_lora_file(pipe, tmp_path / f"{name}.safetensors", layout)
    with apply_loras(ours, [(path, 1.0, None)]) as handle:  # every module lands, none is skipped
        assert sum(handle.reports[0].applied.values()) == modules and not handle.reports[0].unmatched
    ours.use_folders(lora_dirs=[tmp_path])
    pipe.scheduler = LCMScheduler(**SD15_SCHEDULER)
    pipe.scheduler.set_timesteps(steps)
    # diffusers' timesteps (the 50-step distillation grid) as our explicit sigmas; "Automatic" for LCM is
    # Uniform, A1111's choice, which also works with LCM-LoRA (test below)
    abar = pipe.scheduler.alphas_cumprod.double()[pipe.scheduler.timesteps]
    sigmas = torch.cat([((1 - abar) / abar).sqrt(), torch.zeros(1, dtype=torch.float64)])
    request = GenerationRequest(
        prompt=f"a red apple <lora:{name}:1>", negative_prompt="blurry", sampler="LCM",
        steps=steps, cfg_scale=cfg, seed=SEED, width=SIZE, height=SIZE, sigmas=tuple(sigmas.tolist()),
    )  # fmt: skip
    before = {k: v.clone() for k, v in ours.unet.state_dict().items()}
    (result,) = run(ours, request, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in ours.unet.state_dict().items())

    pipe.load_lora_weights(str(path), adapter_name="lcm")
    pipe.fuse_lora(components=["unet"], lora_scale=1.0, adapter_names=["lcm"])
    try:
        generator = torch.Generator().manual_seed(SEED)
        side = SIZE // TINY.vae.downsampling_factor
        noise = initial_noise([generator], (TINY.vae.embed_dim, side, side))
        sigma_max = sigmas[0].float()
        start = get_sampler("LCM").initial_latent(noise, sigma_max) / (sigma_max**2 + 1).sqrt()
        latents = pipe(
            "a red apple", negative_prompt="blurry", num_inference_steps=steps, guidance_scale=cfg,
            height=SIZE, width=SIZE, generator=[generator], latents=start, output_type="latent",
        ).images  # fmt: skip
    finally:
        pipe.unfuse_lora()
        pipe.unload_lora_weights()
    assert_close(result.latents[None], latents, 1e-4)


def test_lcm_lora_with_a1111_defaults_runs_and_changes_the_image(pair, tmp_path):
    """`<lora:...>` + LCM + Automatic (Uniform) at 4 steps, CFG 1: finite, and the LoRA is what changed it."""
    ours, pipe = pair
    lcm_lora_file(pipe, tmp_path / "lcm.safetensors", "kohya")
    ours.use_folders(lora_dirs=[tmp_path])
    request = GenerationRequest(prompt="a red apple", sampler="LCM", steps=4, cfg_scale=1.0, seed=SEED,
                                width=SIZE, height=SIZE)  # fmt: skip
    (plain,) = run(ours, request, progress=False)
    (fast,) = run(ours, replace(request, prompt="a red apple <lora:lcm:1>"), progress=False)
    assert torch.isfinite(fast.latents).all() and (fast.latents - plain.latents).abs().max() > 1e-2
    assert "Sampler: LCM" in fast.infotext and "Lora hashes" in fast.infotext
