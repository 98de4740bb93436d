"""`latentforge` command line: thin wrappers over the Python API (no model logic here)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _torch_dtype(name: str):  # noqa: ANN202 (torch imported lazily)
    import torch

    return getattr(torch, DTYPES[name])


def cmd_info(args: argparse.Namespace) -> int:
    from latentforge.checkpoints.loading import load

    bundle = load(args.model, prediction=args.prediction, compute_hash=True)
    family = bundle.family
    print(f"model: {bundle.name}\nhash: {bundle.short_hash}\nfamily: {family.name}")
    print(f"prediction: {family.prediction}\nlatent scale: {family.latent_scale}")
    for name in ("text_encoder", "vae", "unet"):
        module = getattr(bundle, name)
        print(f"{name}: {sum(p.numel() for p in module.parameters()) / 1e6:.1f}M parameters")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from latentforge.checkpoints.loading import load
    from latentforge.checkpoints.single_file import save_single_file

    bundle = load(args.model, prediction=args.prediction, vae=args.vae, compute_hash=False)
    save_single_file(
        args.output,
        bundle.unet.state_dict(),
        bundle.vae.state_dict(),
        bundle.text_encoder.state_dict(),
        bundle.family,
        dtype=_torch_dtype(args.dtype),
    )
    print(f"wrote {args.output}")
    return 0


def cmd_data_emoji(args: argparse.Namespace) -> int:
    from latentforge.data.emoji import build_emoji_dataset

    summary = build_emoji_dataset(Path(args.out_dir), cache_dir=args.cache_dir)
    print(summary)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentforge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, handler: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(handler=handler)
        return p

    p = add("info", cmd_info, "Show a checkpoint's family, hash and sizes.")
    p.add_argument("model", help="checkpoint file (.safetensors/.ckpt) or diffusers folder")
    p.add_argument("--prediction", choices=["epsilon", "v", "x0"])

    p = add("convert", cmd_convert, "Convert any checkpoint to an original-layout .safetensors.")
    p.add_argument("model")
    p.add_argument("output")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp16")
    p.add_argument("--vae", help="standalone VAE to bake in")
    p.add_argument("--prediction", choices=["epsilon", "v", "x0"])

    data = sub.add_parser("data", help="Build datasets.").add_subparsers(dest="dataset", required=True)
    p = data.add_parser("emoji", help="Emoji dataset from the npm packages emoji-datasource-{google,twitter}.")
    p.add_argument("out_dir")
    p.add_argument("--cache-dir", type=Path, default=None)
    p.set_defaults(handler=cmd_data_emoji)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from latentforge.checkpoints.errors import CheckpointError

    try:
        return args.handler(args)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
