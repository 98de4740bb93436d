"""`latentforge` command line: thin wrappers over the Python API (no model logic here)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from latentforge.errors import LatentforgeError, ParameterError

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _torch_dtype(name: str):  # noqa: ANN202 (torch imported lazily)
    import torch

    return getattr(torch, DTYPES[name])


def cmd_info(args: argparse.Namespace) -> int:
    from latentforge.model import load

    if _print_merge_info(Path(args.model)):
        return 0  # a LoRA file: no model to describe
    bundle = load(args.model, prediction=args.prediction, compute_hash=True)
    family = bundle.family
    print(f"model: {bundle.name}\nhash: {bundle.short_hash}\nfamily: {family.name}")
    print(f"prediction: {family.prediction}\nlatent scale: {family.latent_scale}")
    print(f"default size: {family.default_size}")
    text = family.text_encoder
    # SDXL's encoders by their place in the sgm layout: base = CLIP-L + bigG, the refiner bigG alone
    roles = {"text_encoder": "", "text_encoder_2": ""}
    if family.is_sdxl:
        roles = {"text_encoder": " (OpenCLIP bigG)" if family.is_refiner else " (CLIP-L)"}
        roles["text_encoder_2"] = " (OpenCLIP bigG)"
    encoders = [
        ("text encoder", "text_encoder", text),
        ("text encoder 2", "text_encoder_2", family.text_encoder_2),
    ]
    for label, name, config in encoders:
        if config is None:
            continue
        pooled = (
            f", pooled projection {config.projection_dim}" if family.is_sdxl and config.projection_dim else ""
        )
        print(f"{label}{roles[name]}: {config.layers} layers, width {config.width}{pooled}")
    print(f"default clip skip: {family.default_clip_skip}")
    if family.name.endswith(f"-text{text.layers}"):
        print("  (diffusers' shortened SD 2.x text encoder: its last layer is the original's penultimate)")
    for name in ("text_encoder", "text_encoder_2", "vae", "unet"):
        module = getattr(bundle, name)
        if module is not None:
            print(f"{name}: {sum(p.numel() for p in module.parameters()) / 1e6:.1f}M parameters")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from latentforge.checkpoints.diffusers_folder import save_diffusers_folder
    from latentforge.checkpoints.single_file import save_single_file
    from latentforge.errors import OutputError
    from latentforge.model import load

    out = Path(args.output)
    if args.to == "diffusers" and (out.is_file() or (out.is_dir() and any(out.iterdir()))):
        raise OutputError(
            f"{out}: exists and is not an empty folder; choose a new folder for the diffusers model"
        )
    if args.to == "single-file" and out.is_dir():
        raise OutputError(f"{out}: is a folder; give a file name (or --to diffusers to write a folder)")
    bundle = load(args.model, prediction=args.prediction, vae=args.vae, compute_hash=False)
    save = save_diffusers_folder if args.to == "diffusers" else save_single_file
    save(
        out,
        bundle.unet.state_dict(),
        bundle.vae.state_dict(),
        bundle.text_encoder.state_dict(),
        bundle.family,
        dtype=_torch_dtype(args.dtype),
        text_encoder_2=None if bundle.text_encoder_2 is None else bundle.text_encoder_2.state_dict(),
    )
    print(f"wrote {out} ({args.to}, family {bundle.family.name}, prediction {bundle.family.prediction})")
    return 0


_KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")  # SDXL: te1 CLIP-L, te2 bigG


def _print_merge_info(path: Path) -> bool:
    """Print the merge recipe a file carries (and, for a LoRA file, its modules); True for a LoRA file."""
    import json

    from latentforge.checkpoints.merge import read_recipe
    from latentforge.checkpoints.tensor_files import TensorFile

    if not path.is_file() or path.suffix.lower() != ".safetensors":
        return False
    recipe = read_recipe(path)
    if recipe is not None:
        print("merge recipe:\n" + "\n".join(f"  {k}: {json.dumps(v)}" for k, v in recipe.items()))
    source = TensorFile(path)
    downs = [n for n in source.names if n.startswith(_KOHYA_PREFIXES) and n.endswith(".lora_down.weight")]
    if not downs and not any(n.startswith(_KOHYA_PREFIXES) for n in source.names):
        return False
    ranks = sorted({source.shape(n)[0] for n in downs})
    print(f"LoRA file: {len({n.split('.')[0] for n in source.names})} modules, ranks {ranks}")
    for key in (
        "ss_base_model_version",
        "ss_network_module",
        "ss_network_dim",
        "ss_network_alpha",
        "sshs_model_hash",
    ):
        if key in source.metadata:
            print(f"  {key}: {source.metadata[key]}")
    return True


def _parse_lora(text: str) -> tuple[str, float, float | None]:
    """FILE[:W[:W_UNET]] as A1111's `<lora:name:te:unet>`: W for both, a second number for the U-Net alone.

    Returns (file, unet strength, text-encoder strength); the weights are the trailing numeric parts.
    """
    parts = text.split(":")
    weights: list[float] = []
    while len(parts) > 1 and len(weights) < 2:
        try:
            weights.insert(0, float(parts[-1]))
        except ValueError:
            break
        parts.pop()
    te = weights[0] if weights else 1.0
    return ":".join(parts), weights[1] if len(weights) > 1 else te, te


def _print_result(result: Any, what: str) -> None:
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {result.path} ({what})")


def cmd_merge(args: argparse.Namespace) -> int:
    import latentforge

    inputs = [args.a, args.b, args.c]
    result = latentforge.merge(
        args.out, *inputs, alpha=args.alpha, blocks=args.blocks, loras=args.lora or (), dtype=args.dtype,
        bake_vae=args.bake_vae, ema=args.ema, discard=args.discard, overwrite=args.overwrite,
    )  # fmt: skip
    _print_result(result, f"{result.recipe['interp_method']}, family {result.family}")
    print(f"model hash: {result.short_hash} (sha256 {result.sha256})")
    return 0


def cmd_merge_loras(args: argparse.Namespace) -> int:
    import latentforge

    result = latentforge.merge_loras(
        args.out, args.loras, family=args.family, rank=args.rank, conv_rank=args.conv_rank, dtype=args.dtype,
        overwrite=args.overwrite,
    )  # fmt: skip
    _print_result(result, f"{result.modules} modules, {result.recipe['interp_method']}")
    print(f"relative error: {result.relative_error:.3g} (largest module: {result.max_module_error:.3g})")
    return 0


def cmd_extract_lora(args: argparse.Namespace) -> int:
    import latentforge

    result = latentforge.extract_lora(
        args.out, args.original, args.tuned, rank=args.rank, conv_rank=args.conv_rank,
        clamp_quantile=None if args.clamp_quantile >= 1 else args.clamp_quantile, min_diff=args.min_diff,
        dtype=args.dtype, overwrite=args.overwrite,
    )  # fmt: skip
    _print_result(result, f"{result.modules} modules, rank {args.rank}")
    print(f"relative error: {result.relative_error:.3g} (largest module: {result.max_module_error:.3g})")
    return 0


def _parse_size(text: str) -> tuple[int, int]:
    try:
        width, _, height = text.lower().partition("x")
        return int(width), int(height or width)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 512x512, got {text!r}") from None


def _parse_pair(text: str) -> tuple[int, int]:
    try:
        first, second = (int(v) for v in text.split(","))
        return first, second
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two whole numbers like 0,64, got {text!r}") from None


def _parse_margins(text: str) -> tuple[int, int, int, int]:
    try:
        left, right, top, bottom = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"outpaint margins must look like L,R,T,B, got {text!r}") from None
    return left, right, top, bottom


def _parse_option(text: str) -> tuple[str, float | int | bool | str]:
    """KEY=VALUE of --sampler-option: numbers become numbers, true/false booleans, the rest strings."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"sampler options look like s_noise=1.003, got {text!r}")
    if value.lower() in ("true", "false"):
        return key, value.lower() == "true"
    for kind in (int, float):
        try:
            return key, kind(value)
        except ValueError:
            pass
    return key, value


class _Flags(argparse.Namespace):
    """A command's flags, None for those it lacks (`eval` takes a subset of `generate`'s)."""

    def __getattr__(self, name: str) -> Any:
        return None


def _sdxl_parts(args: Any, request: Any) -> Any:
    """SDXL flags: the refiner switch and the size conditioning parts of the request."""
    from dataclasses import replace

    from latentforge.pipelines.request import Refiner, SizeConditioning

    if args.refiner or args.refiner_switch_at is not None:
        part = request.refiner or Refiner()
        switch = part.switch_at if args.refiner_switch_at is None else args.refiner_switch_at
        request = replace(request, refiner=replace(part, switch_at=switch))
    sizes = {
        "original_size": args.original_size,
        "crop_top_left": args.crop_top_left,
        "target_size": args.target_size,
        "negative_original_size": args.negative_original_size,
    }
    sizes = {k: v for k, v in sizes.items() if v is not None}
    if sizes:
        request = replace(request, size_cond=replace(request.size_cond or SizeConditioning(), **sizes))
    return request


def build_request(args: argparse.Namespace, base: Any = None) -> Any:
    """The command line's generation request: `base` (e.g. from --from-png) with the given flags over it."""
    from dataclasses import replace

    from latentforge.pipelines.request import GenerationRequest, Hires, InitImage, Inpaint

    args = _Flags(**vars(args))
    request = base or GenerationRequest()
    given = {
        "prompt": args.prompt,
        "negative_prompt": args.negative,
        "steps": args.steps,
        "sampler": args.sampler,
        "schedule": args.schedule,
        "cfg_scale": args.cfg,
        "cfg_rescale": args.cfg_rescale,
        "seed": args.seed,
        "subseed": args.subseed,
        "subseed_strength": args.subseed_strength,
        "width": args.size[0] if args.size else None,
        "height": args.size[1] if args.size else None,
        "batch_size": args.batch_size,
        "batch_count": args.batch_count,
        "clip_skip": args.clip_skip,
        "eta": args.eta,
        "eta_noise_seed_delta": args.ensd,
        "tiled_vae": args.tiled_vae,
        "s_min_uncond": args.ngms,
        "s_min_uncond_all": args.ngms_all_steps,
        "cfg_cutoff": args.cfg_cutoff,
        "fast_decode": args.fast_decode,
        "token_merging_ratio": args.tome,
        "token_merging_max_downsample": args.tome_max_downsample,
        "token_merging_random": args.tome_random,
        "deepcache_interval": args.deepcache,
        "deepcache_branch": args.deepcache_branch,
    }
    request = replace(request, **{k: v for k, v in given.items() if v is not None})
    if args.sampler_option:
        request = replace(request, sampler_options={**request.sampler_options, **dict(args.sampler_option)})
    if args.sampler and args.schedule is None and base is not None:  # a new sampler brings its own default
        request = replace(request, schedule="Automatic")
    hires_given = {
        "scale": args.hires_scale,
        "resize_width": args.hires_resize[0] if args.hires_resize else None,
        "resize_height": args.hires_resize[1] if args.hires_resize else None,
        "steps": args.hires_steps,
        "denoising_strength": args.hires_strength,
        "upscaler": args.hires_upscaler,
        "sampler": args.hires_sampler,
    }
    hires_given = {k: v for k, v in hires_given.items() if v is not None}
    if hires_given:
        request = replace(request, hires=replace(request.hires or Hires(), **hires_given))
    request = _sdxl_parts(args, request)
    init_images = tuple(args.init_images or ())
    if init_images or request.init is not None:
        init = request.init or InitImage()
        strength = args.strength if args.strength is not None else init.denoising_strength
        request = replace(request, init=replace(init, images=init_images, denoising_strength=strength))
    inpaint_given = {
        "mask": args.mask_image,
        "mask_blur": args.mask_blur,
        "masked_content": args.masked_content,
        "only_masked": args.only_masked,
        "only_masked_padding": args.only_masked_padding,
        "latent_blend": args.latent_blend,
        "outpaint": args.outpaint,
    }
    inpaint_given = {k: v for k, v in inpaint_given.items() if v is not None}
    if args.mask_image is not None or args.outpaint is not None or request.inpaint is not None:
        request = replace(request, inpaint=replace(request.inpaint or Inpaint(), **inpaint_given))
    return request


def _request_base(args: argparse.Namespace) -> Any:
    """The request stored in --from-png's image, with notes on what will differ printed to stderr."""
    from latentforge.pipelines.infotext import read_infotext
    from latentforge.pipelines.request_infotext import from_infotext

    text = read_infotext(args.from_png)
    if not text or not text.strip():
        raise ParameterError(f"{args.from_png} has no generation parameters (no A1111 infotext)")
    parsed = from_infotext(text)
    for note in parsed.notes:
        print(f"note: {note}", file=sys.stderr)
    if parsed.unused:
        print(f"note: infotext keys kept but not used: {', '.join(parsed.unused)}", file=sys.stderr)
    return parsed.request


def _vae_for(request: Any, args: argparse.Namespace, model_path: Path) -> str | None:
    """The VAE to load: --vae, or the one the infotext names when it lies beside the model or here."""
    if args.vae:
        return None if args.vae == "model" else args.vae
    if not request.vae:
        return None
    for folder in (model_path.parent, Path.cwd()):
        candidate = folder / request.vae
        if candidate.is_file():
            print(f"note: using the VAE the infotext names: {candidate}", file=sys.stderr)
            return str(candidate)
    raise ParameterError(
        f"the image was decoded with VAE {request.vae!r} ({request.vae_hash or 'no hash'}), not found beside "
        "the model or here; pass --vae PATH, or --vae model to decode with the model's own"
    )


# --control-X flag -> ControlNetUnit field; each given once (for all units) or once per --controlnet
_CONTROL_FLAGS = {
    "control_image": "image",
    "control_module": "module",
    "control_weight": "weight",
    "control_start": "guidance_start",
    "control_end": "guidance_end",
    "control_mode": "control_mode",
    "control_resize": "resize_mode",
    "control_res": "processor_res",
    "control_threshold_a": "threshold_a",
    "control_threshold_b": "threshold_b",
}


def _controlnet_units(args: argparse.Namespace, model: Any) -> tuple[Any, ...]:
    """One ControlNet unit per --controlnet, each --control-* flag given once (for all) or once per unit."""
    from latentforge.checkpoints.controlnet import load_controlnet
    from latentforge.data.images import load_image_rgb
    from latentforge.pipelines.controlnet import ControlNetUnit
    from latentforge.pipelines.request import DEFAULT_MAX_PIXELS

    count = len(args.controlnet)
    values: dict[str, list[Any]] = {}
    for flag, name in _CONTROL_FLAGS.items():
        given = getattr(args, flag) or []
        if len(given) not in (0, 1, count):
            raise ParameterError(f"--{flag.replace('_', '-')} is given {len(given)} times: give it once or "
                                 f"once per --controlnet ({count})")  # fmt: skip
        if given:
            values[name] = given * count if len(given) == 1 else given
    if "image" not in values:
        raise ParameterError(
            "--controlnet needs --control-image PATH (the image the control map is made from)"
        )
    units = []
    for i, path in enumerate(args.controlnet):
        fields = {name: v[i] for name, v in values.items()}
        fields["image"] = load_image_rgb(fields["image"], max_pixels=DEFAULT_MAX_PIXELS)
        network = load_controlnet(path, dtype=model.dtype, device=model.device)
        units.append(
            ControlNetUnit(network=network, pixel_perfect=bool(args.control_pixel_perfect), **fields)
        )
    return tuple(units)


def cmd_generate(args: argparse.Namespace) -> int:
    from latentforge.pipelines.sharding import sharded

    # low-memory mode parks weights in host memory: it picks the CPU unless a device is asked for (refused)
    wanted = args.device or ("cpu" if args.low_memory else None)
    with sharded(wanted) as (shard, device):  # under torchrun: this process's part and device
        return _generate(args, shard, device)


def _generate(args: argparse.Namespace, shard: Any, device: str) -> int:
    from dataclasses import replace

    from latentforge import distributed
    from latentforge.checkpoints.loading import default_model_path
    from latentforge.data.images import load_image_rgb
    from latentforge.model import load
    from latentforge.pipelines.inpaint import load_mask
    from latentforge.pipelines.outputs import next_number, prepare_folder
    from latentforge.pipelines.request import DEFAULT_MAX_PIXELS
    from latentforge.pipelines.runner import iter_images
    from latentforge.pipelines.sharding import agreed_seeds
    from latentforge.pipelines.xyz import parse_axis

    if (args.mask or args.outpaint) and not args.init_image:
        raise ParameterError("--mask and --outpaint need --init-image")
    if args.init_image and any(
        v is not None for v in (args.hires_scale, args.hires_resize, args.hires_steps, args.hires_upscaler)
    ):
        raise ParameterError("hires fix (--hires-*) is a txt2img option; drop --init-image")
    base = _request_base(args) if args.from_png else None
    axes = [parse_axis(text) for text in (args.x, args.y, args.z) if text]
    args.init_images = [load_image_rgb(path, max_pixels=DEFAULT_MAX_PIXELS) for path in args.init_image or []]
    args.mask_image = load_mask(args.mask) if args.mask else None
    if axes and shard.count > 1:
        raise ParameterError("the X/Y/Z plot (--x/--y/--z) runs in one process: start it without torchrun")
    request = agreed_seeds(build_request(args, base))  # a random seed: drawn once, by rank 0
    if args.prompts:
        request = replace(request, prompt_seeds=_prompt_seeds(args, request.seed))
    elif args.seeds:
        raise ParameterError("--seeds goes with --prompts FILE; for one prompt use --seed and --batch-count")
    out = prepare_folder(args.out)
    model_path = Path(args.model) if args.model else default_model_path()
    vae = _vae_for(request, args, model_path)
    model = load(
        model_path, dtype=_torch_dtype(args.dtype), device=device, vae=vae, prediction=args.prediction,
        use_ema=args.use_ema, backend=args.backend, int8=args.int8, low_memory=args.low_memory,
    )  # fmt: skip
    model.use_folders(lora_dirs=args.lora_dir, embedding_dirs=args.embeddings_dir, models_dir=args.models_dir)
    if args.controlnet:
        request = replace(request, controlnet=_controlnet_units(args, model))
    if args.taesd:
        from latentforge.checkpoints.taesd import read_taesd

        variant = "taesdxl" if model.family.is_sdxl else "taesd"
        model.taesd = read_taesd(args.taesd, variant=variant, dtype=_torch_dtype(args.dtype)).to(model.device)
    if args.preview == "taesd" and model.taesd is None:
        raise ParameterError(
            "--preview taesd needs --taesd DIR (taesd_decoder.pth from github.com/madebyollin/taesd); "
            "only the embedded model has its own"
        )
    preview = args.preview_every and shard.is_main  # one preview.png, from rank 0
    callback = _preview_writer(model, out, args.preview_every, args.preview) if preview else None
    refiner = (
        load(args.refiner, dtype=_torch_dtype(args.dtype), device=device, low_memory=args.low_memory)
        if args.refiner
        else None
    )
    if axes:
        return _xyz(model, request, axes, out, args.format)
    first = distributed.broadcast_object(next_number(out))  # image i is number first + i, whoever makes it
    written: list[Any] = []
    try:
        for result in iter_images(model, request, callback=callback, refiner=refiner, shard=shard):
            written.append(_save(out, result, args.format, first + result.index))
        if args.grid:
            _save_grid(out, written, args.format)
    except KeyboardInterrupt:
        print(f"interrupted; kept {len(written)} finished image(s) in {out}", file=sys.stderr)
        return 130
    return 0


def _xyz(model: Any, request: Any, axes: list[Any], out: Path, format: str) -> int:
    """Every cell's image, then one labelled grid per Z value (with the first cell's infotext)."""
    from functools import partial

    from latentforge.pipelines.infotext import save_image
    from latentforge.pipelines.outputs import write_new
    from latentforge.pipelines.xyz import xyz_plot

    grids, results = xyz_plot(model, request, axes)
    for result in results:
        _save(out, result, format)
    info = results[0].infotext
    for grid in grids:
        path = write_new(out, lambda n: f"xyz-{n:05d}.{format}", partial(save_image, grid, infotext=info))
        print(path)
    return 0


def _prompt_seeds(args: argparse.Namespace, seed: int) -> tuple[tuple[str, int], ...]:
    """--prompts FILE x --seeds (default: the one --seed): every prompt with every seed, prompt-major."""
    from latentforge.evaluation.runs import parse_seeds, read_prompts

    if args.prompt is not None or args.batch_count is not None:
        raise ParameterError("--prompts FILE gives the prompts: drop the prompt argument and --batch-count")
    seeds = parse_seeds(args.seeds) if args.seeds else [seed]
    return tuple((prompt, s) for prompt in read_prompts(args.prompts) for s in seeds)


def _save(out: Path, result: Any, format: str, number: int | None = None) -> Any:
    from latentforge.pipelines.infotext import save_image
    from latentforge.pipelines.outputs import write_new

    path = write_new(
        out,
        lambda n: f"{n:05d}-{result.seed}.{format}",
        lambda p: save_image(result.image, p, result.infotext),
        number,
    )
    print(path)
    return (path, result)


def _save_grid(out: Path, written: list[Any], format: str) -> None:
    """A1111's batch grid when a run makes several images: all of them (from every rank, written by rank 0),
    with the first image's infotext."""
    from latentforge import distributed
    from latentforge.pipelines.grid import image_grid
    from latentforge.pipelines.infotext import save_image
    from latentforge.pipelines.outputs import write_new

    parts = distributed.gather_to_main([(r.index, r.image, r.infotext) for _, r in written])
    results = sorted((item for part in parts or [] for item in part), key=lambda item: item[0])
    if len(results) < 2:
        return
    grid = image_grid([image for _, image, _ in results])
    infotext = results[0][2]
    path = write_new(out, lambda n: f"grid-{n:05d}.{format}", lambda p: save_image(grid, p, infotext))
    print(path)


def _preview_writer(model, out: Path, every: int, kind: str = "cheap"):  # noqa: ANN202 (lazy torch types)
    """A step callback that writes out/preview.png from the current x0 estimate every `every` steps."""
    from latentforge.pipelines.preview import latent_preview, latent_rgb_projection, taesd_preview

    projection = latent_rgb_projection(model) if kind == "cheap" else None

    def write(info) -> None:  # noqa: ANN001
        if (info.i + 1) % every == 0:
            if projection is None:
                taesd_preview(info.denoised, model.taesd).save(out / "preview.png")
            else:
                latent_preview(info.denoised, projection).save(out / "preview.png")

    return write


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
        options = ", ".join(f"{k}={v}" for k, v in spec.options.items()) or "none"
        print(f"{name:<18} Automatic schedule: {spec.schedule:<12} options: {options}")
    return 0


def cmd_schedules(args: argparse.Namespace) -> int:
    from latentforge.sampling.schedules import SCHEDULES

    print("Automatic")
    for name in SCHEDULES:
        print(name)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from latentforge.training.loop import run_training

    overrides = [*args.overrides, "restart=true"] if args.restart else args.overrides
    path = run_training(args.task, args.config, overrides)
    print(f"wrote {path}")
    return 0


def cmd_data_emoji(args: argparse.Namespace) -> int:
    from latentforge.data.emoji import build_emoji_dataset

    summary = build_emoji_dataset(Path(args.out_dir), cache_dir=args.cache_dir)
    print(summary)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from latentforge.pipelines.sharding import sharded

    with sharded(args.device) as (shard, device):  # under torchrun: generation split, rank 0 evaluates
        return _eval(args, shard, device)


def _eval(args: argparse.Namespace, shard: Any, device: str) -> int:
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
    if args.generated is not None and shard.count > 1:
        raise ParameterError("--generated evaluates a folder in one process: start it without torchrun")
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

    from latentforge.checkpoints.loading import default_model_path
    from latentforge.model import load

    request = build_request(args)  # the generation flags `eval` shares with `generate`
    prompts, seeds = runs.read_prompts(args.prompts), runs.parse_seeds(args.seeds)
    model = load(args.model or default_model_path(), dtype=_torch_dtype(args.dtype), device=device)
    spec = (model, request)
    if args.sweep:
        key, values = runs.parse_sweep(args.sweep)
        results = runs.sweep(
            *spec, key, values, prompts, seeds, args.reference, out, extractor=extractor,
            overwrite=args.overwrite, shard=shard, **options,
        )  # fmt: skip
        if not shard.is_main:
            return 0
        for value, result in zip(values, results, strict=True):
            print(f"{key}={value}: " + _format_values(result))
        print(f"wrote {out / 'report.md'}")
        return 0
    evaluated = runs.generate_and_evaluate(
        *spec, prompts, seeds, args.reference, out, extractor=extractor, overwrite=args.overwrite,
        shard=shard, **options,
    )  # fmt: skip
    if evaluated is not None:  # None: a rank other than 0, done once its images are written
        _print_eval(evaluated, out)
    return 0


def _eval_cache_dir() -> Path:
    import os

    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "latentforge" / "eval-features"


def _format_values(result: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in result["values"].items()) or "no metric computed"


def _print_eval(result: dict, out: Path) -> None:
    """The values, what failed and why; an error (exit 2) when no metric could be computed at all."""
    from latentforge.evaluation.evaluate import MetricError

    if not result["values"]:
        reasons = "; ".join(f"{name}: {entry['reason']}" for name, entry in result["metrics"].items())
        raise MetricError(f"no metric could be computed ({reasons}); see {out / 'report.md'}")
    print(_format_values(result))
    for name, entry in result["metrics"].items():
        if entry["status"] != "ok":
            print(f"{name} {entry['status']}: {entry['reason']}", file=sys.stderr)
    for name, count in result["counts"].items():
        if count["unreadable"]:
            print(f"{name}: skipped {count['unreadable']} unreadable image(s)", file=sys.stderr)
    print(f"wrote {out / 'report.md'}")


def cmd_serve(args: argparse.Namespace) -> int:
    from latentforge.server.app import serve

    serve(
        args.host, args.port, models_dir=args.models_dir, token=args.token, queue_size=args.queue_size,
        low_memory=args.low_memory,
    )  # fmt: skip
    return 0


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
    p.add_argument(
        "--prompts", metavar="FILE", help="one image per prompt (a line of FILE) and --seeds value"
    )
    p.add_argument(
        "--seeds", help="with --prompts: every prompt with each seed, e.g. 0-3 or 1,5 (default --seed)"
    )
    p.add_argument("--model", help="checkpoint or diffusers folder (default: the embedded model)")
    p.add_argument(
        "--vae",
        help="VAE to use instead of the model's: a standalone VAE file, or another model whose VAE to take "
        "('model': the model's own)",
    )
    p.add_argument(
        "--prediction", choices=["epsilon", "v", "x0"], help="override the detected prediction type"
    )
    p.add_argument("--use-ema", action="store_true", help="use the EMA U-Net of a training checkpoint")
    p.add_argument("-n", "--negative", help="negative prompt")
    p.add_argument("--steps", type=int)
    p.add_argument("--sampler", help="see `latentforge samplers`; A1111's 'DPM++ 2M Karras' names work too")
    p.add_argument("--schedule", help="see `latentforge schedules`")
    p.add_argument("--cfg", type=float, help="classifier-free guidance scale")
    p.add_argument("--cfg-rescale", type=float, help="CFG rescale phi in [0, 1] (Lin et al. 2023)")
    p.add_argument("--seed", type=int, help="-1 for random")
    p.add_argument("--subseed", type=int, help="variation seed (-1 for random)")
    p.add_argument("--subseed-strength", type=float, help="variation strength in [0, 1]")
    p.add_argument("--eta", type=float, help="the sampler's eta (ancestral/SDE noise, DDIM's eta)")
    p.add_argument(
        "--sampler-option",
        type=_parse_option,
        action="append",
        metavar="KEY=VALUE",
        help="another sampler option (s_noise, s_churn, order ...; `latentforge samplers` lists them)",
    )
    p.add_argument("--ensd", type=int, help="A1111's eta noise seed delta (step noise from seed + ENSD)")
    p.add_argument("--size", type=_parse_size, help="WIDTHxHEIGHT, multiples of 8")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--batch-count", type=int)
    p.add_argument("--clip-skip", type=int)
    p.add_argument(
        "--init-image", action="append", help="img2img: start from this image (repeat: one per image)"
    )
    p.add_argument("--strength", type=float, help="img2img/inpainting denoising strength in [0, 1]")
    p.add_argument("--mask", help="inpaint: white = repaint (alpha is used when the mask has one)")
    p.add_argument("--mask-blur", type=float, help="Gaussian mask blur in pixels (default 4)")
    p.add_argument(
        "--masked-content",
        choices=["original", "fill", "latent noise", "latent nothing"],
        help="what the masked area starts from (default original)",
    )
    p.add_argument(
        "--only-masked", action="store_true", default=None, help="inpaint the mask's box at full size"
    )
    p.add_argument("--only-masked-padding", type=int, help="padding around the box in pixels (default 32)")
    p.add_argument(
        "--latent-blend",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="blend with the init latents outside the mask at every step (default on, as A1111)",
    )
    p.add_argument("--outpaint", type=_parse_margins, metavar="L,R,T,B", help="extend the canvas (pixels)")
    p.add_argument("--hires-scale", type=float, help="hires fix: upscale factor of the first pass")
    p.add_argument(
        "--hires-resize", type=_parse_size, help="hires fix: target WIDTHxHEIGHT (instead of a scale)"
    )
    p.add_argument("--hires-steps", type=int, help="hires fix: second-pass steps (0 = --steps)")
    p.add_argument("--hires-strength", type=float, help="hires fix: second-pass denoising strength (0.7)")
    p.add_argument("--hires-upscaler", help="hires fix: Latent (default), Lanczos, Latent (bicubic), ...")
    p.add_argument("--hires-sampler", help="hires fix: second-pass sampler (default: --sampler)")
    p.add_argument("--refiner", metavar="MODEL", help="SDXL: continue sampling on this refiner model")
    p.add_argument(
        "--refiner-switch-at", type=float, help="SDXL: fraction of the timesteps before the refiner (0.8)"
    )
    p.add_argument("--original-size", type=_parse_size, help="SDXL size conditioning (default: --size)")
    p.add_argument(
        "--crop-top-left", type=_parse_pair, metavar="TOP,LEFT", help="SDXL crop conditioning (0,0)"
    )
    p.add_argument("--target-size", type=_parse_size, help="SDXL target size conditioning (default: --size)")
    p.add_argument(
        "--negative-original-size", type=_parse_size, help="SDXL: the negative prompt's original size"
    )
    p.add_argument(
        "--tiled-vae",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="VAE in tiles (default: only above 1536x1536 pixels)",
    )
    p.add_argument(
        "--controlnet",
        action="append",
        help="ControlNet file, diffusers folder or shipped name (latentforge-emoji-canny); repeat: units",
    )
    p.add_argument("--control-image", action="append", help="the image its control map is made from")
    p.add_argument("--control-module", action="append", help="preprocessor: none (default), canny, ...")
    p.add_argument("--control-weight", action="append", type=float, help="ControlNet weight in [0, 2] (1)")
    p.add_argument("--control-start", action="append", type=float, help="guidance start, fraction of steps")
    p.add_argument("--control-end", action="append", type=float, help="guidance end, fraction of steps")
    p.add_argument("--control-mode", action="append", help="balanced (default), prompt, control")
    p.add_argument("--control-resize", action="append", help="crop (default), resize, fill")
    p.add_argument("--control-res", action="append", type=int, help="preprocessor resolution (512)")
    p.add_argument("--control-threshold-a", action="append", type=float, help="module threshold A")
    p.add_argument("--control-threshold-b", action="append", type=float, help="module threshold B")
    p.add_argument("--control-pixel-perfect", action="store_true", help="preprocess at the output's size")
    p.add_argument("--preview-every", type=int, help="write OUT/preview.png every N steps")
    p.add_argument(
        "--ngms", type=float, help="skip the negative prompt below this sigma (A1111's NGMS; 0 off)"
    )
    p.add_argument(
        "--ngms-all-steps", action="store_true", default=None, help="NGMS on every step, not every other"
    )
    p.add_argument("--cfg-cutoff", type=float, help="fraction of steps with CFG, cond only after (1 = all)")
    p.add_argument(
        "--preview",
        choices=["cheap", "taesd"],
        default="cheap",
        help="preview decoder (taesd: --taesd, or the embedded model's own)",
    )
    p.add_argument(
        "--int8", action="store_true", help="hold the U-Net's weights as int8 (about half of bf16's memory)"
    )
    p.add_argument(
        "--low-memory",
        action="store_true",
        help="only the running network's weights in memory, the rest in the page cache (same images; CPU)",
    )
    p.add_argument(
        "--backend",
        choices=["torch", "openvino"],
        default="torch",
        help="run the U-Net eagerly (torch) or compiled by OpenVINO (pip install 'latentforge[openvino]')",
    )
    p.add_argument("--tome", type=float, help="ToMe: merge this fraction of self-attention tokens (0-0.75)")
    p.add_argument(
        "--tome-max-downsample", type=int, help="ToMe in blocks downsampled at most 1, 2, 4, 8x (1)"
    )
    p.add_argument(
        "--tome-random",
        action="store_true",
        default=None,
        help="ToMe: random dst tokens (seeded by the image)",
    )
    p.add_argument(
        "--deepcache",
        type=int,
        metavar="N",
        help="DeepCache: a full U-Net call every N, the shallow branch between",
    )
    p.add_argument(
        "--deepcache-branch", type=int, help="DeepCache's shallow branch depth (0: the shallowest)"
    )
    p.add_argument(
        "--taesd", help="folder (or file) with taesd_decoder.pth [+ encoder]: previews, --fast-decode"
    )
    p.add_argument(
        "--fast-decode",
        action="store_true",
        default=None,
        help="decode the final image with TAESD (--taesd, or the embedded model's own)",
    )
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--device", help="cpu, cuda, mps (default: cuda when available)")
    p.add_argument("--out", default="outputs", help="output folder (files are never overwritten)")
    p.add_argument(
        "--format", choices=["png", "jpg", "webp"], default="png", help="image format (infotext kept)"
    )
    p.add_argument(
        "--grid",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="a grid image when a run makes several",
    )
    p.add_argument("--from-png", help="take all parameters from an image's infotext (others override)")
    p.add_argument("--lora-dir", action="append", default=[], help="folder <lora:NAME:W> tags resolve in")
    p.add_argument(
        "--embeddings-dir", action="append", default=[], help="textual-inversion embeddings (by file name)"
    )
    p.add_argument("--models-dir", help="A1111 layout: DIR/Lora, DIR/LyCORIS, DIR/../embeddings")
    for axis in ("x", "y", "z"):
        p.add_argument(
            f"--{axis}",
            metavar="FIELD=V1,V2",
            help=f"X/Y/Z plot: vary a request field along {axis.upper()} (steps=10,20 sampler='Euler a,LMS' "
            "hires.scale=1.5,2 sampler_options.s_noise=1,1.003); writes each cell and a labelled grid",
        )

    p = add("png-info", cmd_png_info, "Print the generation parameters stored in an image.")
    p.add_argument("image")
    add("samplers", cmd_samplers, "List sampler names.")
    add("schedules", cmd_schedules, "List schedule types.")

    p = add(
        "info", cmd_info, "Show a checkpoint's family, hash and sizes (and a merge recipe, a LoRA's modules)."
    )
    p.add_argument("model", help="checkpoint file (.safetensors/.ckpt) or diffusers folder")
    p.add_argument("--prediction", choices=["epsilon", "v", "x0"])

    p = add(
        "convert",
        cmd_convert,
        "Convert any checkpoint to an original-layout .safetensors or a diffusers folder.",
    )
    p.add_argument("model", help="checkpoint file (.safetensors/.ckpt) or diffusers folder")
    p.add_argument("output", help="the .safetensors file, or with --to diffusers a new folder")
    p.add_argument("--to", choices=["single-file", "diffusers"], default="single-file")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp16")
    p.add_argument("--vae", help="standalone VAE to bake in")
    p.add_argument("--prediction", choices=["epsilon", "v", "x0"])

    p = add(
        "merge",
        cmd_merge,
        "Merge checkpoints (docs/merging.md): A + LoRAs, weighted sum (1-a)A + aB, add difference A+a(B-C).",
    )
    p.add_argument("a", help="checkpoint A (.safetensors/.ckpt; the inpainting one when mixing)")
    p.add_argument("b", nargs="?", help="checkpoint B (weighted sum)")
    p.add_argument("c", nargs="?", help="checkpoint C (add difference: A + a(B - C))")
    p.add_argument("-o", "--out", required=True, help="the merged .safetensors")
    p.add_argument("--alpha", type=float, default=0.5, help="multiplier a (default 0.5)")
    p.add_argument(
        "--blocks", help="Merge Block Weighted: 26 comma-separated weights (BASE,IN00..IN11,M00,"
        "OUT00..OUT11) or a supermerger preset name (GRAD_V, SMOOTHSTEP, ...)",
    )  # fmt: skip
    p.add_argument(
        "--lora",
        type=_parse_lora,
        action="append",
        metavar="FILE[:W[:W_UNET]]",
        help="bake in a LoRA at W (a second number: the U-Net's, as <lora:name:te:unet>); repeat for more",
    )
    p.add_argument("--dtype", choices=list(DTYPES), help="cast floating tensors (default: as A has them)")
    p.add_argument("--bake-vae", help="standalone VAE file to put in place of the merged VAE")
    p.add_argument(
        "--ema", choices=["drop", "keep", "use"], default="drop",
        help="model_ema.* copies: drop (default), keep (merged, as A1111), use them as the U-Nets",
    )  # fmt: skip
    p.add_argument(
        "--discard", metavar="REGEX", help="leave out keys matching REGEX (A1111's discard weights)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")

    p = add(
        "merge-loras",
        cmd_merge_loras,
        "Merge LoRA files into one kohya LoRA: ranks concatenated (exact) or SVD re-ranked (--rank).",
    )
    p.add_argument("loras", nargs="+", type=_parse_lora, metavar="FILE[:W[:W_UNET]]")
    p.add_argument("-o", "--out", required=True, help="the merged LoRA .safetensors")
    p.add_argument("--rank", type=int, help="re-rank every module to this rank by SVD (default: concatenate)")
    p.add_argument("--conv-rank", type=int, help="rank of 3x3 conv modules (default --rank)")
    p.add_argument("--family", help="model family when the files do not tell (sd1, sd2, ...)")
    p.add_argument("--dtype", choices=list(DTYPES), help="dtype of the factors (default float32)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")

    p = add(
        "extract-lora",
        cmd_extract_lora,
        "Extract a kohya LoRA from the difference of two checkpoints by SVD (kohya's extraction).",
    )
    p.add_argument("original")
    p.add_argument("tuned")
    p.add_argument("-o", "--out", required=True, help="the LoRA .safetensors")
    p.add_argument("--rank", type=int, default=4, help="rank of Linear and 1x1 conv modules (default 4)")
    p.add_argument("--conv-rank", type=int, help="also extract 3x3 convs (LoCon) at this rank")
    p.add_argument(
        "--clamp-quantile", type=float, default=0.99, help="clamp factors at this quantile (1: off)"
    )
    p.add_argument("--min-diff", type=float, default=0.01, help="skip the text encoder if it moved less")
    p.add_argument("--dtype", choices=list(DTYPES), help="dtype of the factors (default float32)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")

    p = add(
        "train",
        cmd_train,
        "Train a CLIP, VAE, U-Net or ControlNet, or fine-tune (unet with init, lora, embedding, dreambooth) "
        "from a run config (resumes automatically).",
    )
    p.add_argument(
        "task", choices=["clip", "vae", "unet", "controlnet", "lora", "embedding", "dreambooth", "taesd"]
    )
    p.add_argument("config", help="TOML run config")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. lr=1e-4 task_options.x=1")
    p.add_argument(
        "--restart",
        action="store_true",
        help="start over from step 0 although run_dir has checkpoints (they and the log are moved to "
        "run_dir/before-restart-N/, nothing is deleted)",
    )

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

    p = add(
        "serve", cmd_serve, "Serve the AUTOMATIC1111-compatible HTTP API (/sdapi/v1, see docs/server.md)."
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--models-dir", type=Path, help="folder of .safetensors checkpoints (default: embedded)")
    p.add_argument("--token", help="require it: 'Authorization: Bearer TOKEN', or basic auth USER:PASS")
    p.add_argument("--queue-size", type=int, default=8, help="jobs waiting at most; more get 503 (default 8)")
    p.add_argument(
        "--low-memory", action="store_true", help="only the running network's weights in memory (same images)"
    )

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
