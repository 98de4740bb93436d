"""Adapters in generation against diffusers: textual inversion (`load_textual_inversion`) and txt2img with
a `<lora:>` tag plus an embedding (`load_lora_weights` + `fuse_lora` + `load_textual_inversion`).

Same tiny random SD1 weights on both sides (references.build_pair); same noise handed to diffusers as in
test_txt2img_parity.py.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
from safetensors.torch import save_file

from latentforge.checkpoints.embeddings import write_embedding
from latentforge.models.families import TINY, TINY_SD2
from latentforge.pipelines.request import GenerationRequest
from latentforge.pipelines.runner import run
from latentforge.prompts.conditioning import encode_prompts
from latentforge.sampling.noise import initial_noise
from latentforge.sampling.registry import get_sampler
from references import SD15_SCHEDULER, assert_close, build_pair, write_hf_clip_vocab

SEED, STEPS, SIZE = 77, 5, 32


@pytest.fixture
def pair(tmp_path_factory):
    return build_pair(TINY, StableDiffusionPipeline, write_hf_clip_vocab(tmp_path_factory.mktemp("vocab")))


def _embedding(
    folder: Path, name: str, count: int, suffix: str, width: int = 32
) -> tuple[Path, torch.Tensor]:
    vectors = torch.randn(count, width, generator=torch.Generator().manual_seed(count)) * 2
    return write_embedding(folder / f"{name}{suffix}", name, vectors, step=10), vectors


def _diffusers_embeds(pipe, prompt: str, clip_skip: int | None = None) -> torch.Tensor:  # noqa: ANN001
    embeds, _ = pipe.encode_prompt(prompt, "cpu", 1, do_classifier_free_guidance=False, clip_skip=clip_skip)
    return embeds


@pytest.mark.parametrize(("count", "suffix"), [(1, ".pt"), (3, ".pt"), (2, ".safetensors")])
def test_embedding_prompt_embeds_match_diffusers(pair, tmp_path, count, suffix):
    ours, pipe = pair
    path, _ = _embedding(tmp_path, "sksstyle", count, suffix)
    pipe.load_textual_inversion(str(path), token="sksstyle")
    ours.load_embedding(path)
    prompt = "a photo of sksstyle on a table"
    vectors = {name: e.vectors for name, e in ours.embeddings.items()}
    with torch.inference_mode():
        mine = encode_prompts(ours.text_encoder, ours.tokenizer, [prompt], embeddings=vectors)
        plain = encode_prompts(ours.text_encoder, ours.tokenizer, [prompt])
    reference = _diffusers_embeds(pipe, prompt)
    assert_close(mine, reference, 1e-5)
    assert (mine - plain).abs().max() > 1e-2  # the embedding really changed the conditioning


def _kohya_file(pipe, path: Path) -> Path:  # noqa: ANN001
    """kohya keys for every attention Linear of the U-Net and the text encoder's q/v projections."""
    g = torch.Generator().manual_seed(5)
    tensors = {}
    for prefix, module in (("lora_unet_", pipe.unet), ("lora_te_text_model_", pipe.text_encoder)):
        for name, layer in module.named_modules():
            if isinstance(layer, torch.nn.Linear) and ("attn" in name) and "to_out" not in name:
                key = prefix + name.replace(".", "_")
                tensors[f"{key}.lora_down.weight"] = torch.randn(4, layer.in_features, generator=g) * 0.3
                tensors[f"{key}.lora_up.weight"] = torch.randn(layer.out_features, 4, generator=g) * 0.3
                tensors[f"{key}.alpha"] = torch.tensor(2.0)
    save_file(tensors, path)
    return path


def test_txt2img_with_lora_tag_and_embedding_matches_diffusers(pair, tmp_path):
    ours, pipe = pair
    (tmp_path / "Lora").mkdir()
    (tmp_path / "embeddings").mkdir()
    lora = _kohya_file(pipe, tmp_path / "Lora" / "inkstyle.safetensors")
    emb, _ = _embedding(tmp_path / "embeddings", "badhands", 2, ".pt")
    ours.use_folders(models_dir=tmp_path / "Lora" / "..")
    before = {k: v.clone() for k, v in ours.unet.state_dict().items()}
    prompt = "a red apple <lora:inkstyle:0.6>, on a table"
    request = GenerationRequest(
        prompt=prompt, negative_prompt="badhands, blurry", sampler="Euler", schedule="Automatic",
        steps=STEPS, cfg_scale=5.0, seed=SEED, width=SIZE, height=SIZE,
    )  # fmt: skip
    pipe.scheduler = EulerDiscreteScheduler(**SD15_SCHEDULER)
    pipe.scheduler.set_timesteps(STEPS)
    sigmas = pipe.scheduler.sigmas.double()
    (result,) = run(ours, replace(request, sigmas=tuple(sigmas.tolist())), progress=False)
    assert all(torch.equal(v, before[k]) for k, v in ours.unet.state_dict().items())  # undone afterwards
    assert "Lora hashes" in result.infotext and "TI hashes" in result.infotext

    pipe.load_lora_weights(str(lora), adapter_name="ink")
    pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=0.6, adapter_names=["ink"])
    pipe.load_textual_inversion(str(emb), token="badhands")
    generator = torch.Generator().manual_seed(SEED)
    side = SIZE // TINY.vae.downsampling_factor
    noise = initial_noise([generator], (TINY.vae.embed_dim, side, side))
    start = get_sampler("Euler").initial_latent(noise, sigmas[0].float()) / pipe.scheduler.init_noise_sigma
    latents = pipe(
        "a red apple , on a table", negative_prompt="badhands, blurry", num_inference_steps=STEPS,
        guidance_scale=5.0, height=SIZE, width=SIZE, generator=[generator], latents=start,
        output_type="latent",
    ).images  # fmt: skip
    assert_close(result.latents[None], latents, 1e-4)


def test_embedding_prompt_embeds_match_diffusers_sd2(tmp_path_factory, tmp_path):
    """SD2's layout: OpenCLIP padding (id 0, the same id as the placeholder) and the penultimate layer."""
    ours, pipe = build_pair(
        TINY_SD2, StableDiffusionPipeline, write_hf_clip_vocab(tmp_path_factory.mktemp("v"))
    )
    pipe.tokenizer.pad_token = "!"  # OpenCLIP pads with id 0 after the EOS
    # diffusers' clip_skip path reads `text_encoder.text_model.final_layer_norm`, a level transformers 5
    # dropped; an unregistered alias restores it without touching the module tree
    object.__setattr__(pipe.text_encoder, "text_model", pipe.text_encoder)
    path, _ = _embedding(tmp_path, "sksstyle", 2, ".pt", width=TINY_SD2.text_encoder.width)
    pipe.load_textual_inversion(str(path), token="sksstyle")
    ours.load_embedding(path)
    prompt = "a photo of sksstyle, (on a table:1.0)"
    vectors = {name: e.vectors for name, e in ours.embeddings.items()}
    with torch.inference_mode():
        mine = encode_prompts(ours.text_encoder, ours.tokenizer, [prompt], clip_skip=2, embeddings=vectors)
    assert_close(mine, _diffusers_embeds(pipe, prompt.replace(", (on a table:1.0)", ", on a table"), 1), 1e-5)
