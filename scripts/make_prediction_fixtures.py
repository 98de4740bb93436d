"""Train the two tiny SD 2.x-layout models in tests/fixtures/ that really predict epsilon and v.

Random weights predict neither, so the v-prediction probe (`checkpoints/prediction_probe.py`) is tested
on these: the `tiny-sd2` U-Net trained briefly (a few hundred Adam steps, seconds on one CPU core) on
simple synthetic latents, once with the epsilon target and once with the v target (Salimans & Ho 2022,
v = sqrt(abar) eps - sqrt(1 - abar) x0). Each is saved as a community-style single file: original keys,
fp16, no latentforge metadata, so loading must detect the family from shapes and the prediction by the
probe. VAE and text encoder are random (seeded): the probe only runs the U-Net.

    python scripts/make_prediction_fixtures.py [--steps 300] [--out tests/fixtures]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from latentforge.checkpoints.prediction_probe import eps_relative_error
from latentforge.checkpoints.single_file import to_single_file_state_dict
from latentforge.checkpoints.writing import save_safetensors
from latentforge.model import StableDiffusion
from latentforge.models.families import FAMILIES
from latentforge.sampling import schedules

FIXTURES = {"epsilon": "tiny-sd2-eps.safetensors", "v": "tiny-sd2-v.safetensors"}


def synthetic_latents(n: int, generator: torch.Generator) -> torch.Tensor:
    """[n, 4, 8, 8]: per-channel offsets plus a random-phase wave, a data set with a clear mean."""
    grid = torch.linspace(0, 2 * math.pi, 8)
    phase = torch.rand(n, 1, 1, 1, generator=generator) * 2 * math.pi
    wave = torch.sin(grid[None, None, :, None] + grid[None, None, None, :] + phase)  # [n, 1, 8, 8]
    offsets = torch.tensor([0.8, -0.6, 0.4, -0.2])[None, :, None, None]
    amplitude = 0.3 + 0.4 * torch.rand(n, 4, 1, 1, generator=generator)
    return offsets + amplitude * wave


def train(prediction: str, steps: int, batch: int = 32, seed: int = 0) -> StableDiffusion:
    family = FAMILIES["tiny-sd2-v" if prediction == "v" else "tiny-sd2"]
    torch.manual_seed(seed)
    model = StableDiffusion.from_family(family)
    abar = schedules.alphas_cumprod(
        schedules.betas(family.beta_schedule, 1000, family.beta_start, family.beta_end)
    )
    abar = abar.float()
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.unet.parameters(), lr=2e-3)
    model.unet.train()
    for step in range(steps):
        x0 = synthetic_latents(batch, generator)
        t = torch.randint(0, 1000, (batch,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        a = abar[t][:, None, None, None]
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        target = noise if prediction == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
        context = torch.randn(batch, 2, family.unet.context_dim, generator=generator)
        loss = (model.unet(x_t, t.float(), context) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"{prediction}: step {step} loss {loss.item():.4f}")
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent.parent / "tests" / "fixtures"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    for prediction, name in FIXTURES.items():
        start = time.perf_counter()
        model = train(prediction, args.steps)
        error = eps_relative_error(model.unet, model.family)
        parts = (model.unet.state_dict(), model.vae.state_dict(), model.text_encoder.state_dict())
        path = save_safetensors(
            args.out / name, to_single_file_state_dict(*parts, model.family), dtype=torch.float16
        )
        took = time.perf_counter() - start
        print(f"{path}: {path.stat().st_size} bytes, probe error {error:.3f}, trained in {took:.1f} s")


if __name__ == "__main__":
    main()
