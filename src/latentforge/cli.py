"""`latentforge` command line: thin wrappers over the Python API (no model logic here)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

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
    text = family.text_encoder
    print(f"text encoder: {text.layers} layers, default clip skip {family.default_clip_skip}")
    if family.name.endswith(f"-text{text.layers}"):
        print("  (diffusers' shortened SD 2.x text encoder: its last layer is the original's penultimate)")
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


def _parse_size(text: str) -> tuple[int, int]:
    try:
        width, _, height = text.lower().partition("x")
        return int(width), int(height or width)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 512x512, got {text!r}") from None


def _parse_margins(text: str) -> tuple[int, int, int, int]:
    try:
        left, right, top, bottom = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"outpaint margins must look like L,R,T,B, got {text!r}") from None
    return left, right, top, bottom


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from latentforge.checkpoints.loading import default_model_path, load
    from latentforge.data.images import ImageLoadError, load_image_rgb
    from latentforge.pipelines.generate import iter_generate
    from latentforge.pipelines.hires import iter_hires
    from latentforge.pipelines.infotext import parse_infotext, read_infotext, save_png
    from latentforge.pipelines.inpaint import iter_inpaint, iter_outpaint, load_mask
    from latentforge.pipelines.params import GenerationParams, ParameterError

    values: dict = {}
    hires_values: dict = {}
    if args.from_png:
        text = read_infotext(args.from_png)
        if text is None:
            print(f"error: {args.from_png} has no generation parameters", file=sys.stderr)
            return 2
        parsed = parse_infotext(text)
        values = params_from_infotext(*parsed)
        hires_values = hires_from_infotext(parsed[2])
    given = {
        "prompt": args.prompt,
        "negative_prompt": args.negative,
        "steps": args.steps,
        "sampler": args.sampler,
        "schedule": args.schedule,
        "cfg_scale": args.cfg,
        "seed": args.seed,
        "width": args.size[0] if args.size else None,
        "height": args.size[1] if args.size else None,
        "batch_size": args.batch_size,
        "batch_count": args.batch_count,
        "clip_skip": args.clip_skip,
        "denoising_strength": args.strength,
        "tiled_vae": args.tiled_vae,
    }
    values.update({k: v for k, v in given.items() if v is not None})
    hires_given = {
        "scale": args.hires_scale,
        "hires_steps": args.hires_steps,
        "denoising_strength": args.hires_strength,
        "upscaler": args.hires_upscaler,
        "hires_sampler": args.hires_sampler,
    }
    hires_values.update({k: v for k, v in hires_given.items() if v is not None})
    params = GenerationParams(**values)
    editing = args.mask or args.outpaint
    if editing and not args.init_image:
        print("error: --mask and --outpaint need --init-image", file=sys.stderr)
        return 2
    if hires_values and args.init_image:
        print("error: hires fix (--hires-*) is a txt2img option; drop --init-image", file=sys.stderr)
        return 2
    try:
        init = load_image_rgb(args.init_image) if args.init_image else None
        mask = load_mask(args.mask) if args.mask else None
    except ImageLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if (args.outpaint or mask is not None) and init is None:
        print("error: --mask and --outpaint need --init-image", file=sys.stderr)
        return 2
    model_path = args.model or default_model_path()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load(model_path, dtype=_torch_dtype(args.dtype), device=device, vae=args.vae)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    callback = _preview_writer(model, out, args.preview_every) if args.preview_every else None
    if args.outpaint and init is not None:
        left, right, top, bottom = args.outpaint
        results = iter_outpaint(
            model, params, init, left=left, right=right, top=top, bottom=bottom, mask_blur=args.mask_blur,
            masked_content=args.masked_content, callback=callback,
        )  # fmt: skip
    elif mask is not None and init is not None:
        results = iter_inpaint(
            model, params, init, mask, mask_blur=args.mask_blur, masked_content=args.masked_content,
            only_masked=args.only_masked, only_masked_padding=args.only_masked_padding, callback=callback,
        )  # fmt: skip
    elif hires_values:
        results = iter_hires(model, params, callback=callback, **hires_values)
    else:
        results = iter_generate(
            model, params, init_images=None if init is None else [init], callback=callback
        )
    index = len(list(out.glob("*.png")))
    written = 0
    try:
        for result in results:
            path = out / f"{index + written:05d}-{result.seed}.png"
            save_png(result.image, path, result.infotext)
            written += 1
            print(path)
    except ParameterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted; kept {written} finished image(s) in {out}", file=sys.stderr)
        return 130
    return 0


def _preview_writer(model, out: Path, every: int):  # noqa: ANN202 (torch types imported lazily)
    """A step callback that writes out/preview.png from the current x0 estimate every `every` steps."""
    from latentforge.pipelines.preview import latent_preview, latent_rgb_projection

    projection = latent_rgb_projection(model)

    def write(info) -> None:  # noqa: ANN001
        if (info.i + 1) % every == 0:
            latent_preview(info.denoised, projection).save(out / "preview.png")

    return write


def params_from_infotext(prompt: str, negative: str, values: dict[str, str]) -> dict:
    """GenerationParams fields from a parsed infotext (A1111's names)."""
    names: dict[str, tuple[str, Callable[[str], Any]]] = {
        "Steps": ("steps", int),
        "Sampler": ("sampler", str),
        "Schedule type": ("schedule", str),
        "CFG scale": ("cfg_scale", float),
        "Seed": ("seed", int),
        "Clip skip": ("clip_skip", int),
        "Denoising strength": ("denoising_strength", float),
        "Variation seed": ("subseed", int),
        "Variation seed strength": ("subseed_strength", float),
        "CFG rescale": ("cfg_rescale", float),
        "Eta": ("eta", float),
        "Tiled VAE": ("tiled_vae", lambda v: v == "True"),
    }
    out: dict = {"prompt": prompt, "negative_prompt": negative}
    for key, (field, kind) in names.items():
        if key in values:
            out[field] = kind(values[key])
    if "Size" in values:
        out["width"], out["height"] = _parse_size(values["Size"])
    if "Hires upscaler" in values:  # the strength belongs to the hires pass, see hires_from_infotext
        out.pop("denoising_strength", None)
    return out


def hires_from_infotext(values: dict[str, str]) -> dict:
    """`hires` keyword arguments from a parsed infotext; empty when the image had no hires pass."""
    if "Hires upscaler" not in values and "Hires upscale" not in values:
        return {}
    out: dict = {"upscaler": values.get("Hires upscaler", "Latent")}
    if "Hires upscale" in values:
        out["scale"] = float(values["Hires upscale"])
    if "Hires resize" in values:
        out["width"], out["height"] = _parse_size(values["Hires resize"])
    if "Hires steps" in values:
        out["hires_steps"] = int(values["Hires steps"])
    if "Hires sampler" in values:
        out["hires_sampler"] = values["Hires sampler"]
    if "Denoising strength" in values:
        out["denoising_strength"] = float(values["Denoising strength"])
    return out


def cmd_png_info(args: argparse.Namespace) -> int:
    from latentforge.pipelines.infotext import read_infotext

    text = read_infotext(args.image)
    if text is None:
        print(f"{args.image}: no generation parameters", file=sys.stderr)
        return 1
    print(text)
    return 0


def cmd_samplers(args: argparse.Namespace) -> int:
    from latentforge.sampling.registry import SAMPLERS

    for name, spec in SAMPLERS.items():
        print(f"{name:<14} (Automatic schedule: {spec.schedule})")
    return 0


def cmd_schedules(args: argparse.Namespace) -> int:
    from latentforge.sampling.schedules import SCHEDULES

    print("Automatic")
    for name in SCHEDULES:
        print(name)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from latentforge.training.loop import run_training

    path = run_training(args.task, args.config, args.overrides)
    print(f"wrote {path}")
    return 0


def cmd_data_emoji(args: argparse.Namespace) -> int:
    from latentforge.data.emoji import build_emoji_dataset

    summary = build_emoji_dataset(Path(args.out_dir), cache_dir=args.cache_dir)
    print(summary)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from latentforge.evaluation.image_sets import EvalInputError

    try:
        return _eval(args)
    except (EvalInputError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _eval(args: argparse.Namespace) -> int:
    import torch

    from latentforge.checkpoints.loading import default_clip_path
    from latentforge.evaluation import runs
    from latentforge.evaluation.evaluate import METRICS, MetricSettings
    from latentforge.evaluation.extractors import load_extractor

    if args.generated is None and args.prompts is None:
        print("error: pass either --generated DIR or a generation spec (--prompts FILE ...)", file=sys.stderr)
        return 2
    if args.generated is not None and (args.model or args.sweep):
        print("error: --model and --sweep generate; drop them to evaluate --generated", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else list(METRICS)
    options = {
        "metrics": metrics,
        "cache_dir": None if args.no_cache else (args.cache_dir or _eval_cache_dir()),
        "batch_size": args.extract_batch_size,
        "clip": load_extractor(f"clip:{args.clip}", device) if args.clip else None,
        "settings": MetricSettings(
            kid_subset_size=args.kid_subset_size, pr_k=args.pr_k, is_splits=args.is_splits
        ),
    }
    extractor = load_extractor(args.features or f"clip:{default_clip_path()}", device, args.resize_mode)
    out = Path(args.out)
    if args.generated is not None:
        captions = runs.read_prompts(args.prompts) if args.prompts else None
        result = runs.evaluate_to_dir(
            args.generated, args.reference, out, extractor=extractor, captions=captions, **options
        )
        _print_eval(result, out)
        return 0

    from latentforge.checkpoints.loading import default_model_path, load
    from latentforge.pipelines.params import GenerationParams

    given = {
        "negative_prompt": args.negative,
        "steps": args.steps,
        "sampler": args.sampler,
        "schedule": args.schedule,
        "cfg_scale": args.cfg,
        "width": args.size[0] if args.size else None,
        "height": args.size[1] if args.size else None,
        "batch_size": args.batch_size,
    }
    params = GenerationParams(**{k: v for k, v in given.items() if v is not None})
    prompts, seeds = runs.read_prompts(args.prompts), runs.parse_seeds(args.seeds)
    model = load(args.model or default_model_path(), dtype=_torch_dtype(args.dtype), device=device)
    spec = (model, params)
    if args.sweep:
        key, values = runs.parse_sweep(args.sweep)
        results = runs.sweep(
            *spec, key, values, prompts, seeds, args.reference, out, extractor=extractor,
            overwrite=args.overwrite, **options,
        )  # fmt: skip
        for value, result in zip(values, results, strict=True):
            print(f"{key}={value}: " + _format_values(result))
        print(f"wrote {out / 'report.md'}")
        return 0
    result = runs.generate_and_evaluate(
        *spec, prompts, seeds, args.reference, out, extractor=extractor, overwrite=args.overwrite, **options
    )
    _print_eval(result, out)
    return 0


def _eval_cache_dir() -> Path:
    import os

    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "latentforge" / "eval-features"


def _format_values(result: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in result["values"].items()) or "no metric computed"


def _print_eval(result: dict, out: Path) -> None:
    print(_format_values(result))
    for name, entry in result["metrics"].items():
        if entry["status"] != "ok":
            print(f"{name} {entry['status']}: {entry['reason']}", file=sys.stderr)
    for name, count in result["counts"].items():
        if count["unreadable"]:
            print(f"{name}: skipped {count['unreadable']} unreadable image(s)", file=sys.stderr)
    print(f"wrote {out / 'report.md'}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentforge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, handler: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(handler=handler)
        return p

    p = add(
        "generate",
        cmd_generate,
        "Generate images: txt2img, img2img (--init-image), inpainting (--mask), outpainting (--outpaint), "
        "hires fix (--hires-scale).",
    )
    p.add_argument("prompt", nargs="?", default=None)
    p.add_argument("--model", help="checkpoint or diffusers folder (default: the embedded model)")
    p.add_argument("--vae", help="standalone VAE to use instead of the model's")
    p.add_argument("-n", "--negative", help="negative prompt")
    p.add_argument("--steps", type=int)
    p.add_argument("--sampler", help="see `latentforge samplers`")
    p.add_argument("--schedule", help="see `latentforge schedules`")
    p.add_argument("--cfg", type=float, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, help="-1 for random")
    p.add_argument("--size", type=_parse_size, help="WIDTHxHEIGHT, multiples of 8")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--batch-count", type=int)
    p.add_argument("--clip-skip", type=int)
    p.add_argument("--init-image", help="img2img: start from this image")
    p.add_argument("--strength", type=float, help="img2img/inpainting denoising strength in [0, 1]")
    p.add_argument("--mask", help="inpaint: white = repaint (alpha is used when the mask has one)")
    p.add_argument("--mask-blur", type=float, default=4, help="Gaussian mask blur in pixels (default 4)")
    p.add_argument(
        "--masked-content",
        choices=["original", "fill", "latent noise", "latent nothing"],
        default="original",
        help="what the masked area starts from",
    )
    p.add_argument("--only-masked", action="store_true", help="inpaint the mask's box at full size")
    p.add_argument("--only-masked-padding", type=int, default=32, help="padding around the box (pixels)")
    p.add_argument("--outpaint", type=_parse_margins, metavar="L,R,T,B", help="extend the canvas (pixels)")
    p.add_argument("--hires-scale", type=float, help="hires fix: upscale factor of the first pass")
    p.add_argument("--hires-steps", type=int, help="hires fix: second-pass steps (0 = --steps)")
    p.add_argument("--hires-strength", type=float, help="hires fix: second-pass denoising strength (0.7)")
    p.add_argument("--hires-upscaler", help="hires fix: Latent (default), Lanczos, Latent (bicubic), ...")
    p.add_argument("--hires-sampler", help="hires fix: second-pass sampler (default: --sampler)")
    p.add_argument(
        "--tiled-vae",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="VAE in tiles (default: only above 1536x1536 pixels)",
    )
    p.add_argument("--preview-every", type=int, help="write OUT/preview.png every N steps")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--device", help="cpu, cuda, mps (default: cuda when available)")
    p.add_argument("--out", default="outputs", help="output folder")
    p.add_argument("--from-png", help="take all parameters from an image's infotext (others override)")

    p = add("png-info", cmd_png_info, "Print the generation parameters stored in an image.")
    p.add_argument("image")
    add("samplers", cmd_samplers, "List sampler names.")
    add("schedules", cmd_schedules, "List schedule types.")

    p = add("info", cmd_info, "Show a checkpoint's family, hash and sizes.")
    p.add_argument("model", help="checkpoint file (.safetensors/.ckpt) or diffusers folder")
    p.add_argument("--prediction", choices=["epsilon", "v", "x0"])

    p = add("convert", cmd_convert, "Convert any checkpoint to an original-layout .safetensors.")
    p.add_argument("model")
    p.add_argument("output")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp16")
    p.add_argument("--vae", help="standalone VAE to bake in")
    p.add_argument("--prediction", choices=["epsilon", "v", "x0"])

    p = add("train", cmd_train, "Train a CLIP, VAE or U-Net from a run config (resumes automatically).")
    p.add_argument("task", choices=["clip", "vae", "unet"])
    p.add_argument("config", help="TOML run config")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. lr=1e-4 task_options.x=1")

    p = add(
        "eval",
        cmd_eval,
        "Evaluate generated images against reference images: FID, KID, precision/recall, IS, CLIP score. "
        "Generates from a spec (--prompts, --seeds, ...) or evaluates a folder (--generated).",
    )
    p.add_argument("--reference", required=True, help="reference folder or dataset split (DATASET/holdout)")
    p.add_argument(
        "--features",
        help="feature network: clip:PATH (`latentforge train clip` export; default: the CLIP trained with "
        "the embedded model), inception:PATH (FID Inception weights, pt_inception-2015-12-05-*.pth) or "
        "random (tests only)",
    )
    p.add_argument(
        "--resize-mode",
        choices=["clean", "legacy-pytorch", "legacy-tensorflow"],
        help="how images reach 299 x 299 for inception/random features (clean-fid's names): clean = "
        "clean-fid, legacy-pytorch = pytorch-fid, legacy-tensorflow = torch-fidelity / TF FID (default); "
        "not for clip: features (CLIP's preprocessing is fixed)",
    )
    p.add_argument("--generated", help="evaluate this image folder instead of generating")
    p.add_argument("--model", help="checkpoint to generate with (default: the embedded model)")
    p.add_argument(
        "--prompts",
        help="prompts file (one per line) or a dataset folder whose captions to use; with --generated, "
        "one caption per image in sorted file order, for CLIP score",
    )
    p.add_argument("--seeds", default="0", help="seeds for every prompt, e.g. 0-99 or 1,5,9-12 (default 0)")
    p.add_argument("-n", "--negative", help="negative prompt")
    p.add_argument("--steps", type=int)
    p.add_argument("--sampler", help="see `latentforge samplers`")
    p.add_argument("--schedule", help="see `latentforge schedules`")
    p.add_argument("--cfg", type=float, help="classifier-free guidance scale")
    p.add_argument("--size", type=_parse_size, help="WIDTHxHEIGHT, multiples of 8")
    p.add_argument("--batch-size", type=int, default=4, help="images per generation batch (default 4)")
    p.add_argument("--sweep", metavar="KEY=V1,V2", help="one run per value: steps=10,20,50, cfg=1,3,7.5")
    p.add_argument("--clip", help="CLIP export for CLIP score when --features is not a CLIP")
    p.add_argument("--metrics", help="comma-separated subset of fid,kid,precision_recall,is,clip_score")
    p.add_argument("--out", default="eval", help="output folder: metrics.json, report.md (default eval)")
    p.add_argument("--cache-dir", type=Path, help="reference feature cache (default in ~/.cache/latentforge)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write cached reference features")
    p.add_argument("--extract-batch-size", type=int, default=50, help="images per feature-network call")
    p.add_argument("--kid-subset-size", type=int, default=1000, help="KID subset size (capped at set sizes)")
    p.add_argument("--pr-k", type=int, default=3, help="k of precision/recall's k-NN radii (default 3)")
    p.add_argument("--is-splits", type=int, default=10, help="Inception Score splits (default 10)")
    p.add_argument("--overwrite", action="store_true", help="replace images a previous run left in OUT")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--device", help="cpu, cuda, mps (default: cuda when available)")

    data = sub.add_parser("data", help="Build datasets.").add_subparsers(dest="dataset", required=True)
    p = data.add_parser(
        "emoji", help="Emoji dataset from the npm packages emoji-datasource-{google,twitter}."
    )
    p.add_argument("out_dir")
    p.add_argument("--cache-dir", type=Path, default=None)
    p.set_defaults(handler=cmd_data_emoji)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from latentforge.errors import LatentforgeError

    try:
        return args.handler(args)
    except LatentforgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
