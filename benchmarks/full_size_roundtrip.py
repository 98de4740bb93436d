"""A random-weight SD 1.5-size checkpoint, loaded by us and by diffusers' `from_single_file`: same outputs?

Usage: python benchmarks/full_size_roundtrip.py [--checkpoint PATH] [--threads 2] [--size 32]

The checkpoint (default /tmp/latentforge-bench/sd15-random-fp16.safetensors: families.SD1 with
PyTorch's default init and random norm affines, saved by us in the original single-file layout, fp16,
~2.1 GB) is written once if missing. diffusers reads it offline (`config=` a local folder with
model_index.json and component configs, `local_files_only=True`). Both sides run in fp32: one U-Net
forward (latent 4 x size x size, batch 1, same timestep and text context), one VAE decode and one text
encoding; we print the max abs difference relative to the reference's output scale and the times.
Needs ~11 GB of RAM (peak RSS measured: two fp32 copies of the model, ~4.3 GB each, plus imports).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from latentforge.checkpoints.diffusers_folder import write_diffusers_configs
from latentforge.checkpoints.single_file import save_single_file
from latentforge.models.families import SD1, ModelFamily
from latentforge.models.text_encoder import CLIPTextModel
from latentforge.models.unet import UNetModel
from latentforge.models.vae import AutoencoderKL

DEFAULT_CHECKPOINT = Path(tempfile.gettempdir()) / "latentforge-bench" / "sd15-random-fp16.safetensors"
REPO = Path(__file__).resolve().parent.parent


def _random_state_dict(module: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """PyTorch's default init plus random norm affines (so their mapping is observable), cast to dtype."""
    for sub in module.modules():
        if isinstance(sub, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            torch.nn.init.normal_(sub.weight, mean=1.0, std=0.2)
            torch.nn.init.normal_(sub.bias, std=0.2)
    return {k: v.detach().to(dtype) for k, v in module.state_dict().items()}


def write_random_checkpoint(
    path: Path, family: ModelFamily = SD1, dtype: torch.dtype = torch.float16, seed: int = 0
) -> Path:
    """Write a random-weight checkpoint of `family` once (one fp32 network alive at a time)."""
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    builders = {"unet": UNetModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}
    configs = {"unet": family.unet, "vae": family.vae, "text_encoder": family.text_encoder}
    parts = {name: _random_state_dict(build(configs[name]), dtype) for name, build in builders.items()}
    save_single_file(path, parts["unet"], parts["vae"], parts["text_encoder"], family)
    return path


def write_diffusers_config_folder(folder: Path, family: ModelFamily = SD1) -> Path:
    """model_index.json, component configs and a CLIP tokenizer: what `from_single_file(config=)` reads."""
    sys.path.insert(0, str(REPO / "tests"))
    from references import write_hf_clip_vocab

    write_diffusers_configs(family, folder)
    write_hf_clip_vocab(folder / "tokenizer")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=32, help="latent size (image size / 8)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["HF_HUB_OFFLINE"] = "1"

    start = time.perf_counter()
    path = write_random_checkpoint(args.checkpoint)
    ready = time.perf_counter() - start
    print(f"checkpoint: {path} ({path.stat().st_size / 2**30:.2f} GiB), ready in {ready:.1f}s")

    import latentforge

    start = time.perf_counter()
    ours = latentforge.load(path, dtype=torch.float32, compute_hash=False)
    print(f"latentforge.load: {time.perf_counter() - start:.1f}s (family {ours.family.name})")

    from diffusers import StableDiffusionPipeline

    with tempfile.TemporaryDirectory() as tmp:
        config = write_diffusers_config_folder(Path(tmp) / "sd15-config")
        start = time.perf_counter()
        pipe = StableDiffusionPipeline.from_single_file(
            str(path),
            config=str(config),
            local_files_only=True,
            torch_dtype=torch.float32,
            safety_checker=None,
            requires_safety_checker=False,
        )
        print(f"diffusers from_single_file: {time.perf_counter() - start:.1f}s")

    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 4, args.size, args.size, generator=generator)
    context = torch.randn(1, 77, SD1.unet.context_dim, generator=generator)
    timestep = torch.tensor([500.0])
    with torch.inference_mode():
        start = time.perf_counter()
        eps_ours = ours.unet(latent, timestep, context)
        t_ours = time.perf_counter() - start
        start = time.perf_counter()
        eps_ref = pipe.unet(latent, timestep, encoder_hidden_states=context).sample
        t_ref = time.perf_counter() - start
        report("U-Net forward", eps_ours, eps_ref, t_ours, t_ref)

        start = time.perf_counter()
        image_ours = ours.vae.decode(latent)
        t_ours = time.perf_counter() - start
        start = time.perf_counter()
        image_ref = pipe.vae.decode(latent).sample
        t_ref = time.perf_counter() - start
        report("VAE decode", image_ours, image_ref, t_ours, t_ref)

        ids = ours.tokenizer(["a photograph of an astronaut riding a horse"])
        ids = torch.as_tensor(ids) if not isinstance(ids, torch.Tensor) else ids
        start = time.perf_counter()
        hidden_ours = ours.text_encoder(ids)[0]
        t_ours = time.perf_counter() - start
        start = time.perf_counter()
        hidden_ref = pipe.text_encoder(ids).last_hidden_state
        t_ref = time.perf_counter() - start
        report("text encoder", hidden_ours, hidden_ref, t_ours, t_ref)


def report(what: str, ours: torch.Tensor, reference: torch.Tensor, t_ours: float, t_ref: float) -> None:
    error = (ours.double() - reference.double()).abs().max().item()
    scale = reference.double().abs().max().item()
    print(
        f"{what}: max abs diff {error:.3g} / scale {scale:.3g} = {error / scale:.2e} relative; "
        f"ours {t_ours:.2f}s, diffusers {t_ref:.2f}s"
    )


if __name__ == "__main__":
    main()
