"""The embedded model's tiny decoder (TAESD) against its VAE decoder: decode time and fidelity.

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/taesd_decode.py --data /work/data/emoji --rounds 20

Speed: one decode of a batch of latents (64 px images, batch 8 by default) by the VAE decoder and by the
tiny decoder, interleaved rounds, median CPU time per side and their ratio, in fp32 and bf16, one
thread. Fidelity: the held-out images are encoded by the model's VAE (mode of q(z|x)) and each latent
decoded both ways; PSNR and SSIM (losses.ssim, [-1, 1], 11x11 gaussian) of the tiny decode against the
VAE's decode, and of each against the image. `--taesd FILE` measures
another decoder (a training run's final.safetensors); default: the shipped one (`EMBEDDED_TAESDS`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.utils.data import DataLoader

from latentforge.checkpoints.loading import default_model_path
from latentforge.checkpoints.taesd import read_taesd
from latentforge.model import load
from latentforge.training import losses
from latentforge.training.tasks.common import ImageData, image_dataset


@torch.inference_mode()
def fidelity(model, taesd, data: str, resolution: int, limit: int) -> dict[str, float]:  # noqa: ANN001
    holdout = image_dataset(ImageData(data=data, resolution=resolution, max_holdout_items=limit), "holdout")
    scale = model.family.latent_scale
    pairs = ("fast_vae", "vae_image", "fast_image")
    rows: dict[str, list[torch.Tensor]] = {f"{m}_{p}": [] for m in ("psnr", "ssim") for p in pairs}
    for batch in DataLoader(holdout, batch_size=32):
        x = batch["pixels"].float()
        z = model.vae.encode(x).mode()
        slow = model.vae.decode(z).float().clamp(-1, 1)
        fast = taesd.decode(z * scale).float().clamp(-1, 1)
        for name, (a, b) in {
            "fast_vae": (fast, slow),
            "vae_image": (slow, x),
            "fast_image": (fast, x),
        }.items():
            rows[f"psnr_{name}"].append(losses.psnr(a, b))
            rows[f"ssim_{name}"].append(losses.ssim(a, b))
    out = {k: float(torch.cat(v).mean()) for k, v in rows.items()}
    out["images"] = float(len(holdout))
    return out


@torch.inference_mode()
def speed(model, taesd, dtype: torch.dtype, batch: int, size: int, rounds: int) -> dict[str, float]:  # noqa: ANN001
    vae = model.vae.to(dtype)
    tiny = taesd.to(dtype)
    factor = model.family.vae.downsampling_factor
    z = torch.randn(batch, model.family.vae.embed_dim, size // factor, size // factor, dtype=dtype)
    sides = {"vae": lambda: vae.decode(z / model.family.latent_scale), "taesd": lambda: tiny.decode(z)}
    times: dict[str, list[float]] = {k: [] for k in sides}
    for f in sides.values():  # warm-up
        f()
    for _ in range(rounds):
        for name, f in sides.items():
            start = time.process_time()  # CPU time of this process: the shared machine's load stays out
            f()
            times[name].append(time.process_time() - start)
    vae.float(), tiny.float()
    med = {f"{k}_ms": 1000 * statistics.median(v) for k, v in times.items()}
    return med | {"speedup": med["vae_ms"] / med["taesd_ms"]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True, help="the emoji dataset (DATA/holdout)")
    parser.add_argument("--taesd", help="a tiny decoder file (default: the shipped one)")
    parser.add_argument("--holdout", type=int, default=583, help="held-out images used (at most)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load(default_model_path(), compute_hash=False)
    taesd = read_taesd(args.taesd) if args.taesd else model.taesd
    if taesd is None:
        raise SystemExit("no tiny decoder: pass --taesd FILE")
    params = {"vae_decoder": sum(p.numel() for m in (model.vae.decoder, model.vae.post_quant_conv)
                                 for p in m.parameters()),
              "taesd": sum(p.numel() for p in taesd.parameters())}  # fmt: skip
    print(json.dumps({"parameters": params}))
    quality = fidelity(model, taesd, args.data, args.size, args.holdout)
    print(json.dumps({"fidelity": quality}))
    rows = {name: speed(model, taesd, dtype, args.batch, args.size, args.rounds)
            for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}  # fmt: skip
    print(json.dumps({"speed": rows}))
    print(
        f"\n| decode {args.size} px, batch {args.batch} | VAE CPU ms | TAESD CPU ms | speed-up |"
        "\n|---|---|---|---|"
    )
    for name, r in rows.items():
        print(f"| {name} | {r['vae_ms']:.1f} | {r['taesd_ms']:.1f} | {r['speedup']:.1f}x |")
    q = quality
    print(f"\nholdout ({q['images']:.0f} images): TAESD vs VAE decode {q['psnr_fast_vae']:.2f} dB, SSIM "
          f"{q['ssim_fast_vae']:.3f}; VAE vs image {q['psnr_vae_image']:.2f} dB / {q['ssim_vae_image']:.3f}; "
          f"TAESD vs image {q['psnr_fast_image']:.2f} dB / {q['ssim_fast_image']:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
