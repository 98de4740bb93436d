"""Put a trained tiny decoder into the package: `python scripts/ship_taesd.py runs/taesd/final.safetensors`.

Writes the decoder of `latentforge train taesd` (configs/perf/taesd.toml) in fp16 as
src/latentforge/assets/latentforge-emoji-taesd.safetensors (`EMBEDDED_TAESDS`), with the signature of the
embedded model's VAE decoder it was distilled from; `model.load` attaches it to that model only while its
VAE has that signature, so a new default VAE (a retrained model) needs a retrained tiny decoder.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from latentforge.checkpoints.loading import default_model_path
from latentforge.checkpoints.taesd import EMBEDDED_TAESDS, VAE_SIGNATURE, read_taesd, vae_signature
from latentforge.model import load

ASSETS = Path(__file__).resolve().parent.parent / "src" / "latentforge" / "assets"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("decoder", help="the training run's final.safetensors")
    args = parser.parse_args()
    model = load(default_model_path(), compute_hash=False)
    taesd = read_taesd(args.decoder)
    if taesd.config.latent_channels != model.family.vae.embed_dim:
        raise SystemExit(
            f"{args.decoder} takes {taesd.config.latent_channels} latent channels, not the model's"
        )
    if taesd.downsampling_factor != model.family.vae.downsampling_factor:
        raise SystemExit(f"{args.decoder} upsamples x{taesd.downsampling_factor}, the model's VAE does not")
    state = {k: v.to(torch.float16).contiguous() for k, v in taesd.state_dict().items()}
    out = ASSETS / EMBEDDED_TAESDS[model.name]
    metadata = {"format": "latentforge-taesd", VAE_SIGNATURE: json.dumps(vae_signature(model.vae))}
    save_file(state, str(out), metadata=metadata)
    print(
        f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB, {sum(v.numel() for v in state.values())} weights)"
    )


if __name__ == "__main__":
    main()
