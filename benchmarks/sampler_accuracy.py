"""Accuracy of every sampler in `SAMPLERS` against an exact solution, by model evaluations (NFE).

Usage: python benchmarks/sampler_accuracy.py [--nfe 5 10 20 50] [--schedule Automatic|Karras|...]
       [--seeds 64] [--dim 4096] [--pipeline-start] [--out docs/plots/sampler_accuracy.png]

Model: data x0 ~ N(mu, s^2 I) (tests/analytic.py), wrapped as an eps-prediction network over SD1.5's
1000-step scaled-linear alphas_cumprod and turned back into `denoise(x, sigma) -> x0` by DiscreteDenoiser,
so every sampler sees SD's real sigma range, sigma <-> t mapping and timestep grid. A counting wrapper
records the denoiser calls (NFE); per target NFE each sampler runs the step count whose NFE is closest
(ties: the smaller NFE), so second-order samplers get about half the steps. Every run starts from the
same seeded noise z, as x = mu + sqrt(s^2 + sigma_0^2) z, an exact sample of the marginal at sigma_0
(--pipeline-start uses the pipeline's start instead: z * sigma_0, or z * sqrt(1 + sigma_0^2) for vp_start).

Two metrics, not comparable with each other:
    ODE error   (deterministic samplers) RMS of x - x_exact, x_exact the exact probability-flow ODE
                solution from the same start; measures integration error alone.
    W2          (all samplers) 2-Wasserstein distance per coordinate between N(mean, std^2) of the
                samples (seeds x dim values) and the data N(mu, s^2): sqrt((mean - mu)^2 + (std - s)^2).
                Monte Carlo: exact samples of the same size score the printed "floor".
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from analytic import AnalyticGaussian  # noqa: E402
from latentforge.sampling import schedules  # noqa: E402
from latentforge.sampling.denoisers import DiscreteDenoiser  # noqa: E402
from latentforge.sampling.noise import BrownianNoiseSampler, NoiseSampler, initial_noise  # noqa: E402
from latentforge.sampling.registry import SAMPLERS, get_sampler, resolve_schedule, sampling_sigmas  # noqa: E402

GAUSS = AnalyticGaussian(mu=0.5, s=1.0)  # unit variance, like SD latents after the 0.18215 scaling
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "plots" / "sampler_accuracy.png"


class CountingDenoiser:
    """Wraps a denoiser and counts its calls (one call = one model evaluation of the whole batch)."""

    def __init__(self, denoise: DiscreteDenoiser) -> None:
        self.denoise, self.calls = denoise, 0

    def __call__(self, x: Tensor, sigma: Tensor, cond: Any = None) -> Tensor:
        self.calls += 1
        return self.denoise(x, sigma, cond)


def sd15_denoiser() -> DiscreteDenoiser:
    """The analytic Gaussian as an eps-network on SD1.5's discrete schedule."""
    abar = schedules.alphas_cumprod(schedules.betas("scaled_linear"))
    return DiscreteDenoiser(GAUSS.network("epsilon", abar), abar, "epsilon")


def _noise_source(kind: str, seeds: Sequence[int], dim: int, sigmas: Tensor):
    """Seeded step noise as the pipeline makes it (generate._noise_source), in float64."""
    if kind == "gaussian":
        return NoiseSampler(seeds, (dim,), dtype=torch.float64)
    if kind == "brownian":
        positive = sigmas[sigmas > 0]
        return BrownianNoiseSampler(
            seeds, (dim,), float(positive.min()), float(positive.max()), dtype=torch.float64
        )
    return None


@dataclass(frozen=True)
class Run:
    steps: int
    nfe: int
    ode_rms: float
    w2: float


def run(
    name: str,
    schedule: str,
    steps: int,
    seeds: Sequence[int],
    dim: int,
    *,
    noise_seeds: Sequence[int] | None = None,
    pipeline_start: bool = False,
) -> tuple[Tensor, Tensor, int]:
    """Sample once: (output, exact ODE solution from the same start, NFE)."""
    spec, denoiser = get_sampler(name), sd15_denoiser()
    sigmas = sampling_sigmas(name, schedule, steps, denoiser.sigmas)
    z = initial_noise(seeds, (dim,), dtype=torch.float64)
    x = spec.initial_latent(z, sigmas[0]) if pipeline_start else GAUSS.prior_sample(z, float(sigmas[0]))
    counter = CountingDenoiser(denoiser)
    noise = _noise_source(spec.noise, noise_seeds or seeds, dim, sigmas)
    with torch.no_grad():
        out = spec.function(counter, x, sigmas, noise=noise)
    return out, GAUSS.ode_solution(x, float(sigmas[0]), float(sigmas[-1])), counter.calls


def w2_to_data(samples: Tensor) -> float:
    """Per-coordinate 2-Wasserstein distance of the samples' Gaussian fit from N(mu, s^2)."""
    return math.hypot(float(samples.mean()) - GAUSS.mu, float(samples.std()) - GAUSS.s)


def is_deterministic(name: str, schedule: str, steps: int = 25) -> bool:
    """True if the output does not depend on the step noise (same start, two noise seeds)."""
    a, _, _ = run(name, schedule, steps, [0, 1], 16, noise_seeds=[10, 11])
    b, _, _ = run(name, schedule, steps, [0, 1], 16, noise_seeds=[20, 21])
    return bool(torch.equal(a, b))


def steps_for_nfe(name: str, schedule: str, targets: Sequence[int]) -> dict[int, tuple[int, int]]:
    """target NFE -> (steps, actual NFE): the closest NFE, ties to the smaller (NFE >= steps always)."""
    nfe = {steps: run(name, schedule, steps, [0], 1)[2] for steps in range(1, max(targets) + 1)}
    return {t: min(((s, n) for s, n in nfe.items()), key=lambda sn: (abs(sn[1] - t), sn[1])) for t in targets}


def benchmark(
    schedule: str, targets: Sequence[int], n_seeds: int, dim: int, pipeline_start: bool
) -> dict[str, tuple[bool, list[Run]]]:
    """name -> (deterministic, one Run per target NFE)."""
    seeds = list(range(n_seeds))
    results = {}
    for name in SAMPLERS:
        deterministic = is_deterministic(name, schedule)
        runs = []
        for steps, nfe in steps_for_nfe(name, schedule, targets).values():
            out, exact, calls = run(name, schedule, steps, seeds, dim, pipeline_start=pipeline_start)
            assert calls == nfe, (name, steps, calls, nfe)
            runs.append(Run(steps, nfe, float((out - exact).pow(2).mean().sqrt()), w2_to_data(out)))
        results[name] = (deterministic, runs)
        print(f"  {name}: done", file=sys.stderr)
    return results


def _cell(value: float, nfe: int, target: int) -> str:
    return f"{value:.2e}" if nfe == target else f"{value:.2e} ({nfe})"


def markdown(
    results: dict[str, tuple[bool, list[Run]]], schedule: str, targets: Sequence[int], floor: float
) -> str:
    """Two Markdown tables: ODE error of the deterministic samplers, W2 of all samplers."""
    head = " | ".join(f"NFE {t}" for t in targets)
    rule = "|---" * (len(targets) + 3) + "|"

    def row(name: str, runs: list[Run], metric: str, kind: str) -> str:
        label = resolve_schedule(name, schedule)
        steps = ", ".join(str(r.steps) for r in runs)
        cells = " | ".join(_cell(getattr(r, metric), r.nfe, t) for r, t in zip(runs, targets, strict=True))
        return f"| {name} | {kind}{label} | {steps} | {cells} |"

    lines = [
        "**ODE error** (deterministic samplers): RMS of x - x_exact, the exact probability-flow solution "
        "from the same start.",
        "",
        f"| Sampler | Schedule | Steps | {head} |",
        rule,
    ]
    lines += [row(n, runs, "ode_rms", "") for n, (det, runs) in results.items() if det]
    lines += [
        "",
        "**Distribution error W2** (all samplers; a different metric): per-coordinate 2-Wasserstein "
        f"distance of the samples from the data N({GAUSS.mu:g}, {GAUSS.s:g}^2); Monte Carlo floor "
        f"{floor:.1e}.",
        "",
        f"| Sampler | Kind, schedule | Steps | {head} |",
        rule,
    ]
    for name, (det, runs) in results.items():
        kind = "ODE" if det else {"brownian": "SDE", "gaussian": "ancestral"}[get_sampler(name).noise]
        lines.append(row(name, runs, "w2", f"{kind}, "))
    lines += ["", "Cells show the error at the target NFE; `(n)` gives the actual NFE when it differs."]
    return "\n".join(lines)


def plot(
    results: dict[str, tuple[bool, list[Run]]], schedule: str, targets: Sequence[int], floor: float, out: Path
) -> None:
    """Log-log error vs actual NFE: ODE error (deterministic) and W2 (all, deterministic dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_ode, ax_w2) = plt.subplots(1, 2, figsize=(13, 5.5))
    palette = plt.get_cmap("tab20")([*range(0, 20, 2), *range(1, 20, 2)])  # dark shades first
    markers = "osD^v<>phX*"
    for k, (name, (det, runs)) in enumerate(results.items()):
        nfes = [r.nfe for r in runs]
        style = dict(color=palette[k % 20], marker=markers[k % len(markers)], markersize=4, label=name)
        if det:
            ax_ode.loglog(nfes, [max(r.ode_rms, 1e-16) for r in runs], **style)
        ax_w2.loglog(nfes, [r.w2 for r in runs], linestyle="--" if det else "-", **style)
    ax_w2.axhline(floor, color="gray", linestyle=":", label="Monte Carlo floor")
    ax_ode.set(
        title="Deterministic: RMS error vs exact ODE solution", xlabel="model evaluations (NFE)", ylabel="RMS"
    )
    ax_w2.set(
        title="All samplers: W2 to the data distribution", xlabel="model evaluations (NFE)", ylabel="W2"
    )
    for ax in (ax_ode, ax_w2):
        ax.set_xticks(targets, [str(n) for n in targets], minor=False)
        ax.set_xticks([], minor=True)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle(
        f"Analytic N({GAUSS.mu:g}, {GAUSS.s:g}^2) on SD1.5's discrete schedule, schedule: {schedule}"
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--nfe", type=int, nargs="+", default=[5, 10, 20, 50], help="target model evaluations"
    )
    parser.add_argument(
        "--schedule", default="Automatic", help="a schedule name for all, or each one's default"
    )
    parser.add_argument("--seeds", type=int, default=64, help="images (one seed each)")
    parser.add_argument("--dim", type=int, default=4096, help="values per image")
    parser.add_argument("--pipeline-start", action="store_true", help="start as the pipeline does")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="plot path (PNG)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.schedule != "Automatic":
        schedules.get_schedule(args.schedule)  # fail early, listing the valid names
    targets = sorted(args.nfe)
    results = benchmark(args.schedule, targets, args.seeds, args.dim, args.pipeline_start)
    z = initial_noise(list(range(args.seeds)), (args.dim,), dtype=torch.float64)
    floor = w2_to_data(GAUSS.mu + GAUSS.s * z)
    print(markdown(results, args.schedule, targets, floor))
    plot(results, args.schedule, targets, floor, args.out)
    print(f"\nplot: {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
