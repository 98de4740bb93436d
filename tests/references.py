"""Builders shared by the parity tests: reference-library twins of our configs, and comparison helpers."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch

from latentforge.models.configs import TextEncoderConfig, VAEConfig
from latentforge.models.tokenizer import VOCAB_FILE

HF_SPECIALS = ("<|startoftext|>", "<|endoftext|>")


def assert_close(ours: torch.Tensor, reference: torch.Tensor, tolerance: float = 1e-4) -> None:
    """Max abs error at most `tolerance` times the reference's output scale."""
    assert ours.shape == reference.shape, (ours.shape, reference.shape)
    error = (ours.double() - reference.double()).abs().max().item()
    scale = reference.double().abs().max().item()
    assert error <= tolerance * scale, f"max abs error {error:.3g} vs output scale {scale:.3g}"


def randomize_norms(model: torch.nn.Module) -> None:
    """Norms start at (1, 0); random affine parameters make their weight mapping observable."""
    for module in model.modules():
        if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            torch.nn.init.normal_(module.weight, mean=1.0, std=0.2)
            torch.nn.init.normal_(module.bias, std=0.2)


def diffusers_vae_config(config: VAEConfig) -> dict:
    assert config.embed_dim == config.z_channels, "diffusers ties embed_dim to latent_channels"
    levels = len(config.ch_mult)
    return {
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "down_block_types": ("DownEncoderBlock2D",) * levels,
        "up_block_types": ("UpDecoderBlock2D",) * levels,
        "block_out_channels": tuple(config.ch * m for m in config.ch_mult),
        "layers_per_block": config.num_res_blocks,
        "latent_channels": config.z_channels,
        "norm_num_groups": config.norm_groups,
    }


def transformers_text_config(config: TextEncoderConfig):  # -> transformers.CLIPTextConfig
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.width,
        intermediate_size=config.mlp_width,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        max_position_embeddings=config.max_length,
        hidden_act=config.activation,
        projection_dim=config.projection_dim or config.width,
    )


def write_hf_clip_vocab(folder: Path) -> Path:
    """transformers' vocab.json/merges.txt derived from our BPE file, as they were made from OpenAI's."""
    from importlib.resources import files

    from open_clip.tokenizer import bytes_to_unicode

    data = files("latentforge").joinpath("assets", VOCAB_FILE).read_bytes()
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    tokens = (
        symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + list(HF_SPECIALS)
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder


SD15_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


def scheduler_cases() -> dict:
    """Sampler name -> (diffusers scheduler class, options, whether its latents are variance-preserving).

    set_alpha_to_one=True ends DDIM at sigma 0, which is what our DDIM schedule does.
    """
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
    )

    return {
        "DDIM": (DDIMScheduler, {"set_alpha_to_one": True, "clip_sample": False}, True),
        "Euler": (EulerDiscreteScheduler, {}, False),
        "Euler a": (EulerAncestralDiscreteScheduler, {}, False),
        "DPM++ 2M": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}, True),
    }


def scheduler_sigmas(name: str, scheduler) -> torch.Tensor:  # noqa: ANN001
    """The full descending sigmas (trailing 0) a diffusers scheduler runs after `set_timesteps`."""
    if name == "DDIM":  # sigmas of DDIM's timesteps, then its final step to alpha = 1
        alphas = scheduler.alphas_cumprod.double()[scheduler.timesteps]
        return torch.cat([((1 - alphas) / alphas).sqrt(), torch.zeros(1, dtype=torch.float64)])
    return scheduler.sigmas.double()


def build_pair(family, pipeline_cls: type, vocab: Path):  # noqa: ANN001, ANN201
    """Our random model of `family` and a diffusers pipeline of `pipeline_cls` holding the same weights."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from latentforge.checkpoints import keymap_unet, keymap_vae
    from latentforge.model import StableDiffusion

    torch.manual_seed(0)
    ours = StableDiffusion.from_family(family).eval()
    unet = UNet2DConditionModel(**keymap_unet.diffusers_config(family.unet), sample_size=64)
    unet.load_state_dict(keymap_unet.ours_to_diffusers(ours.unet.state_dict(), family.unet), strict=True)
    vae = AutoencoderKL(**diffusers_vae_config(family.vae), scaling_factor=family.latent_scale)
    vae.load_state_dict(keymap_vae.ours_to_diffusers(ours.vae.state_dict(), family.vae), strict=True)
    text = CLIPTextModel(transformers_text_config(family.text_encoder))
    text_sd = {k.removeprefix("text_model."): v for k, v in ours.text_encoder.state_dict().items()}
    text.load_state_dict(text_sd, strict=False)  # transformers 5 keeps a position_ids buffer of its own
    tokenizer = CLIPTokenizer.from_pretrained(str(vocab), model_max_length=77, pad_token="<|endoftext|>")
    pipe = pipeline_cls(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return ours, pipe


def save_random_model(family, path: Path, seed: int = 0):  # noqa: ANN001, ANN201
    """A random model of `family` (seeded) saved as one original-layout file at `path`; returns the model."""
    from latentforge.checkpoints.single_file import save_single_file
    from latentforge.model import StableDiffusion

    torch.manual_seed(seed)
    model = StableDiffusion.from_family(family)
    te2 = None if model.text_encoder_2 is None else model.text_encoder_2.state_dict()
    parts = (model.unet.state_dict(), model.vae.state_dict(), model.text_encoder.state_dict())
    save_single_file(path, *parts, family, text_encoder_2=te2)
    return model


def diffusers_start(family, sampler: str, sigmas: torch.Tensor, scheduler, seeds, size: int):  # noqa: ANN001, ANN201
    """The generators and initial latents a diffusers pipeline needs to start where our pipeline starts.

    Draws our initial noise per seed (advancing each generator past it, as our pipeline does), applies
    the sampler's initial scaling at sigma_max, then divides by the diffusers scheduler's own scale:
    sqrt(sigma_max^2 + 1) for variance-preserving latents, else its `init_noise_sigma`.
    """
    from latentforge.sampling.noise import initial_noise
    from latentforge.sampling.registry import get_sampler

    generators = [torch.Generator().manual_seed(s) for s in seeds]
    side = size // family.vae.downsampling_factor
    noise = initial_noise(generators, (family.vae.embed_dim, side, side))
    sigma_max = sigmas[0].float()
    start = get_sampler(sampler).initial_latent(noise, sigma_max)
    variance_preserving = scheduler_cases()[sampler][2]
    scale = (sigma_max**2 + 1).sqrt() if variance_preserving else scheduler.init_noise_sigma
    return generators, start / scale


def random_lora_factors(family, names, seed: int = 0, rank: int = 3) -> dict:  # noqa: ANN001
    """Random factors of kohya's shapes for each module (conv: down [r, in, k, k], up [out, r, 1, 1])."""
    from latentforge.checkpoints.lora_writing import LoraFactors, module_shapes

    generator = torch.Generator().manual_seed(seed)
    shapes = module_shapes(family)
    out = {}
    for name in names:
        shape = shapes[name]
        down = torch.randn(rank, *shape[1:], generator=generator) * 0.3
        up = torch.randn(shape[0], rank, *(1,) * (len(shape) - 2), generator=generator) * 0.3
        out[name] = LoraFactors(down, up, rank / 2)
    return out
