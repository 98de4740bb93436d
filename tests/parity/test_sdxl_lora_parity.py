"""SDXL adapters against diffusers on tiny random SDXL: LoRA files (kohya `lora_unet_` in sgm's original
U-Net names with `lora_te1_`/`lora_te2_`, and PEFT `unet.`/`text_encoder.`/`text_encoder_2.`) applied by
us equal `load_lora_weights` + `fuse_lora` on the U-Net and both encoders; txt2img with a `<lora:>` tag
equals diffusers end to end; `clip_l`/`clip_g` embeddings equal diffusers' two `load_textual_inversion`
calls (text_encoder/tokenizer, text_encoder_2/tokenizer_2) on the prompt embeddings and the pooled output;
a LoRA trained by our `train lora` on this model loads into diffusers whole and generates the same image.
Setup as test_sdxl_pipeline_parity.py (same components, same noise).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from latentforge.checkpoints import keymap_unet, keymap_vae
from latentforge.checkpoints.embeddings import write_embedding
from latentforge.model import StableDiffusion
from latentforge.models.families import TINY_XL
from latentforge.pipelines.request import GenerationRequest
from latentforge.pipelines.runner import run
from latentforge.pipelines.sdxl_conditioning import sdxl_schedules
from latentforge.sampling.noise import initial_noise
from references import (
    SD15_SCHEDULER,
    assert_close,
    diffusers_vae_config,
    transformers_text_config,
    write_hf_clip_vocab,
)

SEED, STEPS, SIZE = 1234, 6, 64
SCHEDULER = {**SD15_SCHEDULER, "timestep_spacing": "leading"}  # SDXL base's scheduler_config.json


def _text(ours, cls):  # noqa: ANN001, ANN202
    model = cls(transformers_text_config(ours.config)).eval()
    keys = model.state_dict().keys()
    sd = {k if k in keys else k.removeprefix("text_model."): v for k, v in ours.state_dict().items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)
    return model


@pytest.fixture
def pair(tmp_path_factory):
    torch.manual_seed(0)
    ours = StableDiffusion.from_family(TINY_XL).eval()
    with torch.no_grad():
        for p in ours.unet.label_emb.parameters():
            p.mul_(20)
    vocab = write_hf_clip_vocab(tmp_path_factory.mktemp("vocab"))
    unet = UNet2DConditionModel(
        **keymap_unet.diffusers_config(ours.family.unet), sample_size=SIZE // TINY_XL.vae.downsampling_factor
    )
    unet.load_state_dict(keymap_unet.ours_to_diffusers(ours.unet.state_dict(), ours.family.unet), strict=True)
    vae = AutoencoderKL(**diffusers_vae_config(ours.family.vae), scaling_factor=ours.family.latent_scale)
    vae.load_state_dict(keymap_vae.ours_to_diffusers(ours.vae.state_dict(), ours.family.vae), strict=True)
    pipe = StableDiffusionXLPipeline(
        unet=unet.eval(), vae=vae.eval(), scheduler=EulerDiscreteScheduler(**SCHEDULER),
        text_encoder=_text(ours.text_encoder, CLIPTextModel),
        text_encoder_2=_text(ours.text_encoder_2, CLIPTextModelWithProjection),
        tokenizer=CLIPTokenizer.from_pretrained(str(vocab), model_max_length=77, pad_token="<|endoftext|>"),
        tokenizer_2=CLIPTokenizer.from_pretrained(str(vocab), model_max_length=77, pad_token="!"),
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return ours, pipe


def _targets(ours: StableDiffusion, pipe) -> list[tuple[str, str, torch.nn.Linear]]:  # noqa: ANN001
    """(kohya module name, PEFT module name, layer): attention and feed-forward Linears of the U-Net (kohya
    in sgm's original names, as sd-scripts' SDXL LoRA), and every encoder layer Linear of both encoders."""
    out = []
    to_diffusers = {v.rsplit(".", 1)[0]: k.rsplit(".", 1)[0] for k, v in keymap_unet.diffusers_key_map(
        ours.family.unet).items()}  # fmt: skip
    for name, layer in ours.unet.named_modules():
        if isinstance(layer, torch.nn.Linear) and "transformer_blocks" in name:
            out.append(("lora_unet_" + name.replace(".", "_"), "unet." + to_diffusers[name], layer))
    for kohya, peft, encoder in (("lora_te1_", "text_encoder.", pipe.text_encoder),
                                 ("lora_te2_", "text_encoder_2.", pipe.text_encoder_2)):  # fmt: skip
        for name, layer in encoder.named_modules():
            if isinstance(layer, torch.nn.Linear) and ".layers." in name:
                out.append((kohya + name.replace(".", "_"), peft + name, layer))
    return out


def _lora_file(ours: StableDiffusion, pipe, path: Path, layout: str) -> Path:  # noqa: ANN001
    g = torch.Generator().manual_seed(11)
    tensors = {}
    for kohya, peft, layer in _targets(ours, pipe):
        down = torch.randn(4, layer.in_features, generator=g) * 0.3
        up = torch.randn(layer.out_features, 4, generator=g) * 0.3
        if layout == "kohya":
            tensors |= {f"{kohya}.lora_down.weight": down, f"{kohya}.lora_up.weight": up}
            tensors[f"{kohya}.alpha"] = torch.tensor(2.0)
        else:  # PEFT as diffusers' save_lora_weights writes it: no alpha, scale 1
            tensors |= {f"{peft}.lora_A.weight": down, f"{peft}.lora_B.weight": up}
    save_file(tensors, str(path))
    return path


def _compare_fused(ours: StableDiffusion, pipe) -> int:  # noqa: ANN001
    """Every U-Net and encoder weight of ours equals diffusers' fused one (1e-5 of its scale); returns how
    many were compared."""

    def plain(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # PEFT fuses into `.base_layer.`
        return {k.replace(".base_layer.", ".").removeprefix("text_model."): v for k, v in sd.items()}

    pairs = [
        (keymap_unet.ours_to_diffusers(ours.unet.state_dict(), ours.family.unet), pipe.unet.state_dict())
    ]
    for mine, theirs in ((ours.text_encoder, pipe.text_encoder), (ours.text_encoder_2, pipe.text_encoder_2)):
        pairs.append((mine.state_dict(), theirs.state_dict()))
    compared = 0
    for mine, theirs in pairs:
        mine, theirs = plain(mine), plain(theirs)
        assert set(mine) <= set(theirs)
        for key, value in mine.items():
            assert_close(value, theirs[key], 1e-5)
            compared += 1
    return compared


@pytest.mark.parametrize("layout", ["kohya", "peft"])
def test_lora_fused_weights_match_diffusers(pair, tmp_path, layout):
    ours, pipe = pair
    path = _lora_file(ours, pipe, tmp_path / f"{layout}.safetensors", layout)
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in ours.modules()]
    handle = ours.apply_lora(path, 0.7)
    expected = len(_targets(ours, pipe))  # before PEFT wraps diffusers' Linears
    pipe.load_lora_weights(str(path), adapter_name="x")
    pipe.fuse_lora(components=["unet", "text_encoder", "text_encoder_2"], lora_scale=0.7, adapter_names=["x"])
    assert _compare_fused(ours, pipe) > 100
    applied = sum(handle.reports[0].applied.values())
    assert applied == expected and not handle.reports[0].unmatched
    changed = [n for m, b in zip(ours.modules(), before, strict=True) for n, v in m.state_dict().items()
               if not torch.equal(v, b[n])]  # fmt: skip
    assert len(changed) == applied
    handle.undo()
    for module, saved in zip(ours.modules(), before, strict=True):
        assert all(torch.equal(v, saved[k]) for k, v in module.state_dict().items())


def test_txt2img_with_lora_tag_matches_diffusers(pair, tmp_path):
    ours, pipe = pair
    (tmp_path / "Lora").mkdir()
    lora = _lora_file(ours, pipe, tmp_path / "Lora" / "inkxl.safetensors", "kohya")
    ours.use_folders(lora_dirs=[tmp_path / "Lora"])
    pipe.scheduler.set_timesteps(STEPS)
    sigmas = pipe.scheduler.sigmas.double()
    request = GenerationRequest(
        prompt="a red apple <lora:inkxl:0.6>, on a table", negative_prompt="blurry", sampler="Euler",
        steps=STEPS, seed=SEED, width=SIZE, height=SIZE, cfg_scale=5.0, sigmas=tuple(sigmas.tolist()),
    )  # fmt: skip
    (result,) = run(ours, request, progress=False)
    assert "Lora hashes" in result.infotext
    pipe.load_lora_weights(str(lora), adapter_name="ink")
    pipe.fuse_lora(
        components=["unet", "text_encoder", "text_encoder_2"], lora_scale=0.6, adapter_names=["ink"]
    )
    generator = torch.Generator().manual_seed(SEED)
    side = SIZE // TINY_XL.vae.downsampling_factor
    noise = initial_noise([generator], (TINY_XL.vae.embed_dim, side, side))
    start = noise * sigmas[0].float() / (sigmas[0].float() ** 2 + 1).sqrt()  # diffusers multiplies back
    latents = pipe(
        "a red apple , on a table", negative_prompt="blurry", num_inference_steps=STEPS, guidance_scale=5.0,
        height=SIZE, width=SIZE, generator=[generator], latents=start, output_type="latent",
    ).images  # fmt: skip
    assert_close(result.latents[None], latents, 1e-4)
    plain = run(ours, replace(request, prompt="a red apple , on a table"), progress=False)[0]
    assert (plain.latents - result.latents).abs().max() > 1e-3  # the LoRA changed the image


@pytest.mark.parametrize("count", [1, 3])
def test_embedding_prompt_embeds_match_diffusers(pair, tmp_path, count):
    ours, pipe = pair
    g = torch.Generator().manual_seed(count)
    vectors = {
        "clip_l": torch.randn(count, ours.family.text_encoder.width, generator=g) * 2,
        "clip_g": torch.randn(count, ours.family.text_encoder_2.width, generator=g) * 2,
    }
    path = write_embedding(tmp_path / "sksxl.safetensors", "sksxl", vectors)
    prompt = "a photo of sksxl on a table"
    with torch.inference_mode():
        ((_, plain, plain_pooled),) = sdxl_schedules(ours, [prompt], 1, 2)[0]
    ours.load_embedding(path)
    with torch.inference_mode():
        ((_, crossattn, pooled),) = sdxl_schedules(ours, [prompt], 1, 2)[0]
    pipe.load_textual_inversion(vectors["clip_l"], token="sksxl", text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)  # fmt: skip
    pipe.load_textual_inversion(vectors["clip_g"], token="sksxl", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)  # fmt: skip
    embeds, _, reference_pooled, _ = pipe.encode_prompt(
        prompt, device="cpu", do_classifier_free_guidance=False
    )
    assert_close(crossattn[None], embeds, 1e-5)
    assert_close(pooled[None], reference_pooled, 1e-5)
    width_l = ours.family.text_encoder.width  # both encoders' halves changed, and the pooled output
    assert (crossattn - plain)[:, :width_l].abs().max() > 1e-2
    assert (crossattn - plain)[:, width_l:].abs().max() > 1e-2
    assert (pooled - plain_pooled).abs().max() > 1e-3


def test_a_lora_trained_by_us_loads_into_diffusers_and_generates_the_same(pair, tmp_path):
    """`train lora` on SDXL (U-Net attention + LoCon convs, both encoders) -> a kohya file diffusers'
    `load_lora_weights` takes whole: every module in the file becomes a PEFT layer (no unexpected or
    skipped keys), the fused weights equal ours and txt2img with it matches at 1e-4."""
    from latentforge.checkpoints.single_file import save_single_file
    from latentforge.training.config import RunConfig
    from latentforge.training.loop import train
    from latentforge.training.tasks.lora import make_lora_task

    ours, pipe = pair
    checkpoint = tmp_path / "base.safetensors"
    save_single_file(
        checkpoint, ours.unet.state_dict(), ours.vae.state_dict(), ours.text_encoder.state_dict(),
        ours.family, text_encoder_2=ours.text_encoder_2.state_dict(),
    )  # fmt: skip
    options = {
        "resolution": 32, "synthetic_items": 4, "max_holdout_items": 1, "eval_timesteps": [500],
        "sample_prompts": [], "init": str(checkpoint), "rank": 4, "alpha": 2.0,
        "targets": ["attention", "feed_forward", "conv"], "train_text_encoder": True,
    }  # fmt: skip
    (tmp_path / "Lora").mkdir()
    config = RunConfig(
        run_dir=str(tmp_path / "run"), task="lora", max_steps=2, batch_size=2, lr=5e-2,
        lr_schedule="constant", device="cpu", checkpoint_every=0, log_every=1, task_options=options,
    )  # fmt: skip
    lora = train(make_lora_task(config), config).rename(tmp_path / "Lora" / "trained.safetensors")
    modules = {key.split(".")[0] for key in load_file(lora)}
    assert {m[: len("lora_te1_")] for m in modules} >= {"lora_te1_", "lora_te2_", "lora_unet"}

    pipe.load_lora_weights(str(lora), adapter_name="trained")
    wrapped = [
        name
        for component in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
        for name, module in component.named_modules()
        if "trained" in getattr(module, "lora_A", {})
    ]
    assert len(wrapped) == len(modules)  # each module of the file landed on one layer, none left over
    pipe.fuse_lora(
        components=["unet", "text_encoder", "text_encoder_2"], lora_scale=1.0, adapter_names=["trained"]
    )
    ours.use_folders(lora_dirs=[tmp_path / "Lora"])
    with ours.apply_lora(lora, 1.0) as handle:
        assert sum(handle.reports[0].applied.values()) == len(modules) and not handle.reports[0].unmatched
        assert _compare_fused(ours, pipe) > 100
    pipe.scheduler.set_timesteps(STEPS)
    sigmas = pipe.scheduler.sigmas.double()
    request = GenerationRequest(
        prompt="a red apple <lora:trained:1>", negative_prompt="blurry", sampler="Euler", steps=STEPS,
        seed=SEED, width=SIZE, height=SIZE, cfg_scale=5.0, sigmas=tuple(sigmas.tolist()),
    )  # fmt: skip
    (result,) = run(ours, request, progress=False)
    generator = torch.Generator().manual_seed(SEED)
    side = SIZE // TINY_XL.vae.downsampling_factor
    noise = initial_noise([generator], (TINY_XL.vae.embed_dim, side, side))
    start = noise * sigmas[0].float() / (sigmas[0].float() ** 2 + 1).sqrt()
    latents = pipe(
        "a red apple", negative_prompt="blurry", num_inference_steps=STEPS, guidance_scale=5.0,
        height=SIZE, width=SIZE, generator=[generator], latents=start, output_type="latent",
    ).images  # fmt: skip
    assert_close(result.latents[None], latents, 1e-4)
    plain = run(ours, replace(request, prompt="a red apple"), progress=False)[0]
    assert (plain.latents - result.latents).abs().max() > 1e-4  # the trained LoRA changed the image
