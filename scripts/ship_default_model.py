"""Put a trained default model into the package: `python scripts/ship_default_model.py RUNS_DIR`.

Copies RUNS_DIR/unet/final.safetensors (the SD single file the U-Net stage exports, fp16; `--unet FILE`: an
export of another step, `scripts/export_checkpoint.py`) to
src/latentforge/assets/latentforge-emoji.safetensors, and writes the CLIP of
RUNS_DIR/clip/final.safetensors next to it in fp16 as latentforge-emoji-clip.safetensors without its text
transformer, which is the model's text encoder (checked weight by weight): `latentforge eval` uses it as
its default feature network. `--vae FILE` swaps in a decoder fine-tuned afterwards (configs/default/
vae_decoder.toml: encoder frozen, so the U-Net's latent space is unchanged; checked key by key).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

from latentforge.checkpoints.exports import load_clip, save_clip_sharing_text
from latentforge.checkpoints.loading import DEFAULT_CLIP_FILE, DEFAULT_MODEL_FILE
from latentforge.checkpoints.single_file import save_single_file
from latentforge.model import load, swap_vae

ASSETS = Path(__file__).resolve().parent.parent / "src" / "latentforge" / "assets"


def swap_fine_tuned_vae(model_file: Path, vae_file: Path) -> None:
    """Rewrite `model_file` with the VAE of `vae_file`, whose encoder must equal the model's (fp16)."""
    model = load(model_file, compute_hash=False)
    old_encoder = {
        k: v for k, v in model.vae.state_dict().items() if k.startswith(("encoder.", "quant_conv."))
    }
    swap_vae(model, vae_file)
    new = model.vae.state_dict()
    changed = [k for k, v in old_encoder.items() if not torch.equal(v.half(), new[k].half())]  # file is fp16
    if changed:
        raise SystemExit(
            f"{vae_file}: its encoder differs from the model's ({changed[:3]}...): not a decoder fine-tune"
        )
    text = {k: v for k, v in model.text_encoder.state_dict().items() if not k.startswith("text_projection.")}
    save_single_file(model_file, model.unet.state_dict(), new, text, model.family, dtype=torch.float16)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", type=Path, help="the recipe's run folder (holds clip/, vae/ and unet/)")
    p.add_argument("--unet", type=Path, help="the U-Net stage's export to ship (default RUNS/unet/final)")
    p.add_argument(
        "--vae",
        type=Path,
        help="a decoder fine-tune of the recipe's VAE to ship instead (or a model with one)",
    )
    p.add_argument("--assets", type=Path, default=ASSETS, help="destination folder (default: the package's)")
    args = p.parse_args(argv)
    model_file, clip_file = args.assets / DEFAULT_MODEL_FILE, args.assets / DEFAULT_CLIP_FILE
    args.assets.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(args.unet or args.runs / "unet" / "final.safetensors", model_file)
    if args.vae:
        swap_fine_tuned_vae(model_file, args.vae)
    save_clip_sharing_text(
        load_clip(args.runs / "clip" / "final.safetensors"), clip_file, model_file, torch.float16
    )
    model = load(model_file)
    parameters = sum(
        p.numel() for part in (model.unet, model.vae, model.text_encoder) for p in part.parameters()
    )
    for path in (model_file, clip_file):
        print(f"{path}: {path.stat().st_size / 2**20:.1f} MiB")
    print(f"model {model.name} [{model.short_hash}]: {parameters / 1e6:.1f}M parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
