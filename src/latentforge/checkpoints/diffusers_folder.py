"""diffusers folder layouts (`unet/`, `vae/`, `text_encoder/` with `config.json`) -> our bundle.

The component configs are translated once from diffusers' `config.json` files; the family is the
table entry with exactly those configs, that entry with a shortened text encoder for SD 2.x as
diffusers ships it (23 layers, see `family_from_diffusers`), or a `custom` family (a tiny test model).
Weights: `.safetensors` or `.bin`, diffusers' or transformers' file names, sharded or not, fp16 variants.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import torch

from latentforge.checkpoints import keymap_unet, keymap_vae
from latentforge.checkpoints.assembly import Components, assemble
from latentforge.checkpoints.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    UnknownArchitectureError,
)
from latentforge.checkpoints.reading import StateDict, read_state_dict
from latentforge.checkpoints.writing import save_safetensors
from latentforge.models.configs import TextEncoderConfig, UNetConfig, VAEConfig
from latentforge.models.families import FAMILIES, TINY, ModelFamily, Prediction
from latentforge.models.tokenizer import Vocabulary

T = TypeVar("T")
WEIGHT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")  # diffusers', then transformers' names
PREDICTIONS: dict[str, Prediction] = {"epsilon": "epsilon", "v_prediction": "v", "sample": "x0"}
# U-Net config values that mean an architecture we do not build (SDXL, LCM-distilled, class-conditioned).
COMPONENTS = ("unet", "vae", "text_encoder")
UNSUPPORTED_UNET = ("addition_embed_type", "class_embed_type", "num_class_embeds", "time_cond_proj_dim")


def unet_config_from_diffusers(cfg: dict[str, Any]) -> UNetConfig:
    """`UNet2DConditionModel` config.json -> our `UNetConfig` (ValueError for what we do not build)."""
    unsupported = {k: cfg[k] for k in UNSUPPORTED_UNET if cfg.get(k) is not None}
    text_time = unsupported.pop("addition_embed_type", None) == "text_time"  # SDXL's `vector`
    if unsupported or (cfg.get("addition_embed_type") is not None and not text_time):
        shown = unsupported or {"addition_embed_type": cfg.get("addition_embed_type")}
        raise ValueError(f"unsupported U-Net options {shown} (SD 1.x/2.x/XL U-Nets have none of these)")
    widths = list(cfg["block_out_channels"])
    levels = [i for i, kind in enumerate(cfg["down_block_types"]) if kind.startswith("CrossAttn")]
    # diffusers' `attention_head_dim` historically holds the head *count* (an int for SD 1.x,
    # a per-level list for SD 2.x); `num_attention_heads`, when set, is the count.
    heads = cfg.get("num_attention_heads") or cfg["attention_head_dim"]
    heads = [heads] * len(widths) if isinstance(heads, int) else list(heads)
    head_widths = {widths[i] // heads[i] for i in levels}
    depth = cfg.get("transformer_layers_per_block", 1)
    depths = [depth] * len(widths) if isinstance(depth, int) else list(depth)
    # Depths at levels without attention mean nothing except the last level's (the middle block's); our
    # canonical form is one `transformer_depth` when the used ones agree, else sgm's list with zeros.
    used = {depths[i] for i in (*levels, len(widths) - 1)}
    level_depths = (
        ()
        if len(used) == 1
        else tuple(d if i in levels or i == len(widths) - 1 else 0 for i, d in enumerate(depths))
    )
    if len(set(heads[i] for i in levels)) == 1:
        num_heads, head_dim = heads[levels[0]], None
    elif len(head_widths) == 1:
        num_heads, head_dim = None, head_widths.pop()
    else:
        raise ValueError(f"unsupported per-level attention heads {heads}")
    return UNetConfig(
        in_channels=cfg["in_channels"],
        out_channels=cfg["out_channels"],
        model_channels=widths[0],
        channel_mult=tuple(w // widths[0] for w in widths),
        num_res_blocks=cfg["layers_per_block"],
        attention_levels=tuple(levels),
        num_heads=num_heads,
        head_dim=head_dim,
        transformer_depth=used.pop() if not level_depths else 1,
        level_depths=level_depths,
        adm_in_channels=cfg["projection_class_embeddings_input_dim"] if text_time else 0,
        vector_embed_dim=cfg["addition_time_embed_dim"] if text_time else 0,
        context_dim=cfg["cross_attention_dim"],
        use_linear_proj=bool(cfg.get("use_linear_projection", False)),
        norm_groups=cfg.get("norm_num_groups", 32),
    )


def vae_config_from_diffusers(cfg: dict[str, Any]) -> VAEConfig:
    widths = list(cfg["block_out_channels"])
    return VAEConfig(
        in_channels=cfg["in_channels"],
        out_channels=cfg["out_channels"],
        z_channels=cfg["latent_channels"],
        embed_dim=cfg["latent_channels"],
        ch=widths[0],
        ch_mult=tuple(w // widths[0] for w in widths),
        num_res_blocks=cfg["layers_per_block"],
        norm_groups=cfg.get("norm_num_groups", 32),
    )


def text_config_from_diffusers(cfg: dict[str, Any], pad_token: int) -> TextEncoderConfig:
    with_projection = "CLIPTextModelWithProjection" in cfg.get("architectures", [])
    return TextEncoderConfig(
        vocab_size=cfg["vocab_size"],
        max_length=cfg["max_position_embeddings"],
        width=cfg["hidden_size"],
        layers=cfg["num_hidden_layers"],
        heads=cfg["num_attention_heads"],
        mlp_width=cfg["intermediate_size"],
        activation=cfg["hidden_act"],
        projection_dim=cfg["projection_dim"] if with_projection else None,
        pad_token=pad_token,
    )


def _read_json(path: Path, *, optional: bool = False) -> dict[str, Any]:
    """A config file of the folder as a dict; {} for a missing optional one."""
    if not path.is_file():
        if optional:
            return {}
        raise CheckpointNotFoundError(path, "missing from the diffusers folder")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CorruptCheckpointError(path, f"not valid JSON ({str(e)[:200]})") from None
    if not isinstance(data, dict):
        raise CorruptCheckpointError(path, f"expected a JSON object, found a {type(data).__name__}")
    return data


def _translated(path: Path, translate: Callable[[], T]) -> T:
    """Run a config translation; a missing or mistyped field is an error naming the file."""
    try:
        return translate()
    except (KeyError, ValueError, TypeError, AttributeError, ZeroDivisionError) as e:
        detail = f"missing field {e.args[0]!r}" if isinstance(e, KeyError) else str(e)[:200]
        raise UnknownArchitectureError(path, f"not an SD 1.x/2.x component config: {detail}") from None


def _read_weights(folder: Path, dtype: torch.dtype) -> StateDict:
    """The component's weights: `.safetensors` before `.bin`, the plain file before the fp16 variant."""
    if not folder.is_dir():
        raise CheckpointNotFoundError(folder, "missing from the diffusers folder")
    for variant in ("", ".fp16"):
        for ext in ("safetensors", "bin"):
            for stem in WEIGHT_STEMS:
                index = folder / f"{stem}{variant}.{ext}.index.json"
                if index.is_file():  # sharded: {"weight_map": {key: shard file}}
                    weight_map = _read_json(index).get("weight_map")
                    if not isinstance(weight_map, dict):
                        raise CorruptCheckpointError(index, "no 'weight_map' object in the shard index")
                    shards = sorted({str(v) for v in weight_map.values()})
                    state_dict: StateDict = {}
                    for shard in shards:
                        state_dict.update(read_state_dict(folder / shard, dtype=dtype)[0])
                    return state_dict
                if (folder / f"{stem}{variant}.{ext}").is_file():
                    return read_state_dict(folder / f"{stem}{variant}.{ext}", dtype=dtype)[0]
    names = [f"{stem}.{ext}" for ext in ("safetensors", "bin") for stem in WEIGHT_STEMS]
    raise CheckpointNotFoundError(
        folder, f"no weights file (looked for {', '.join(names)} and .fp16 variants)"
    )


def text_encoder_from_diffusers(state_dict: StateDict) -> StateDict:
    """transformers' CLIP keys -> ours: transformers 5 saves `CLIPTextModel` without the `text_model.`
    level (`CLIPTextModelWithProjection` and older versions keep it); `position_ids` is a buffer."""
    out = {}
    for key, tensor in state_dict.items():
        if key.endswith("position_ids"):
            continue
        out[key if key.startswith(("text_model.", "text_projection.")) else f"text_model.{key}"] = tensor
    return out


def _pad_token(root: Path, tokenizer: str = "tokenizer") -> int:
    """OpenCLIP-style tokenizers (SD 2.x) pad with "!" (id 0), CLIP's with <|endoftext|>.

    transformers < 5 writes the pad token to special_tokens_map.json, transformers 5 only to
    tokenizer_config.json.
    """
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        file = root / tokenizer / name
        pad = _read_json(file, optional=True).get("pad_token")
        pad = pad.get("content") if isinstance(pad, dict) else pad
        if pad is not None:
            return 0 if pad == "!" else 49407
    return 49407


def _pick(families: list[ModelFamily], prediction: Prediction | None, size: int | None) -> ModelFamily:
    """Among table entries with equal configs (sd2 / sd2-v) the one whose prediction and size fit best."""
    best = max(families, key=lambda f: (f.prediction == prediction, f.default_size == size))
    return best if prediction is None or best.prediction == prediction else best.with_prediction(prediction)


def family_from_diffusers(root: Path, prediction: Prediction | None = None) -> ModelFamily:
    """The family of a diffusers folder, from its config files alone.

    A table entry when the configs equal one; for a text encoder cut short as diffusers ships SD 2.x
    (23 of OpenCLIP's 24 layers, no projection: its last layer already is the penultimate one), that
    entry with the shorter text encoder, named e.g. `sd2-v-text23`, and a default clip skip lowered
    by the missing layers (1 instead of 2, the same hidden states); all layers but no projection (our
    `convert --to diffusers` of SD 2.x) gives e.g. `sd2-noproj`; else a `custom` family.
    """
    unet_json = _read_json(root / "unet" / "config.json")
    unet = _translated(root / "unet" / "config.json", lambda: unet_config_from_diffusers(unet_json))
    vae_json = _read_json(root / "vae" / "config.json")
    vae = _translated(root / "vae" / "config.json", lambda: vae_config_from_diffusers(vae_json))
    texts = []
    for folder, tokenizer in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        if not (root / folder).is_dir():
            continue  # an SDXL refiner has text_encoder_2/ alone; SD 1.x/2.x text_encoder/ alone
        text_json = _read_json(root / folder / "config.json")
        pad_token = _pad_token(root, tokenizer)
        texts.append(
            _translated(
                root / folder / "config.json",
                lambda j=text_json, p=pad_token: text_config_from_diffusers(j, p),  # type: ignore[misc]
            )
        )
    text, text_2 = texts[0], (texts[1] if len(texts) > 1 else None)
    schedule = _read_json(root / "scheduler" / "scheduler_config.json", optional=True)
    if prediction is None:
        prediction = PREDICTIONS.get(schedule.get("prediction_type", "epsilon"))
    sample_size = unet_json.get("sample_size")  # latent size; None in configs that leave it out
    size = sample_size * vae.downsampling_factor if isinstance(sample_size, int) else None
    same_networks = [f for f in FAMILIES.values() if (f.unet, f.vae) == (unet, vae)]
    if unet.adm_in_channels:  # SDXL: the table entry or nothing (a custom SDXL has no `vector` recipe)
        sdxl = [f for f in same_networks if (f.text_encoder, f.text_encoder_2) == (text, text_2)]
        if not sdxl:
            raise UnknownArchitectureError(
                root,
                f"an SDXL-style U-Net (addition_embed_type text_time) matching no SDXL family with these "
                f"text encoders; known: {', '.join(f.name for f in FAMILIES.values() if f.is_sdxl)}",
            )
        return _pick(sdxl, prediction, size)
    exact = [f for f in same_networks if f.text_encoder == text]
    if exact:
        return _pick(exact, prediction, size)
    truncated = [
        f
        for f in same_networks
        if text.layers <= f.text_encoder.layers
        and replace(f.text_encoder, layers=text.layers, projection_dim=None) == text
    ]
    if truncated:
        base = _pick(truncated, prediction, size)
        skipped = base.text_encoder.layers - text.layers
        return replace(
            base,
            name=f"{base.name}-text{text.layers}" if skipped else f"{base.name}-noproj",
            text_encoder=text,
            default_clip_skip=max(1, base.default_clip_skip - skipped),
        )
    return replace(
        TINY,
        name="custom",
        beta_start=schedule.get("beta_start", TINY.beta_start),
        beta_end=schedule.get("beta_end", TINY.beta_end),
        beta_schedule=schedule.get("beta_schedule", TINY.beta_schedule),
        unet=unet,
        vae=vae,
        text_encoder=text,
        prediction=prediction or "epsilon",
        latent_scale=vae_json.get("scaling_factor", 0.18215),
        text_layout="openclip" if text.pad_token == 0 else "hf",
        default_size=size or TINY.default_size,
    )


def load_diffusers_folder(
    root: Path, *, dtype: torch.dtype, prediction: Prediction | None = None
) -> Components:
    """Build the family from the configs, read each component's weights (cast while reading), assemble."""
    missing = [f"{name}/" for name in COMPONENTS if not (root / name).is_dir()]
    if missing == ["text_encoder/"] and (root / "text_encoder_2").is_dir():
        missing = []  # the SDXL refiner: OpenCLIP bigG alone, as text_encoder_2/
    if len(missing) == len(COMPONENTS):
        raise UnknownArchitectureError(
            root, "a folder, but not a diffusers model (no unet/, vae/, text_encoder/)"
        )
    if missing:
        raise CheckpointNotFoundError(
            root, f"incomplete diffusers model: missing {', '.join(missing)} (needs {', '.join(COMPONENTS)})"
        )
    family = family_from_diffusers(root, prediction)
    unet = keymap_unet.diffusers_to_ours(_read_weights(root / "unet", dtype), family.unet)
    vae = keymap_vae.diffusers_to_ours(_read_weights(root / "vae", dtype), family.vae)
    folders = [f for f in ("text_encoder", "text_encoder_2") if (root / f).is_dir()]
    texts = [text_encoder_from_diffusers(_read_weights(root / f, dtype)) for f in folders]
    text_2 = texts[1] if len(texts) > 1 else None
    components = assemble(family, unet, vae, texts[0], dtype=dtype, path=root, text_encoder_2=text_2)
    components.name = root.name
    return components


def diffusers_configs(family: ModelFamily) -> dict[str, dict[str, Any]]:
    """The diffusers config files of a family ({"unet/config.json": {...}, ...}); no weights, no vocab.

    The inverse of `family_from_diffusers` (for `from_single_file(config=...)` and exports). The
    pipeline's text encoder is a plain `CLIPTextModel` even when the family has a projection.
    """
    f = family.vae.downsampling_factor
    widths = [family.vae.ch * m for m in family.vae.ch_mult]
    text = family.text_encoder
    schedule = {
        "beta_start": family.beta_start,
        "beta_end": family.beta_end,
        "beta_schedule": family.beta_schedule,
    }
    pad = "!" if text.pad_token == 0 else "<|endoftext|>"
    unet_config = {
        k: list(v) if isinstance(v, tuple) else v
        for k, v in keymap_unet.diffusers_config(family.unet).items()
    }
    configs: dict[str, dict[str, Any]] = {
        "model_index.json": {
            "_class_name": "StableDiffusionPipeline",
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
            "safety_checker": [None, None],
            "scheduler": ["diffusers", "DDIMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        },
        "unet/config.json": {
            "_class_name": "UNet2DConditionModel",
            **unet_config,
            "sample_size": family.default_size // f,
        },
        "vae/config.json": {
            "_class_name": "AutoencoderKL",
            "in_channels": family.vae.in_channels,
            "out_channels": family.vae.out_channels,
            "down_block_types": ["DownEncoderBlock2D"] * len(widths),
            "up_block_types": ["UpDecoderBlock2D"] * len(widths),
            "block_out_channels": widths,
            "layers_per_block": family.vae.num_res_blocks,
            "latent_channels": family.vae.z_channels,
            "norm_num_groups": family.vae.norm_groups,
            "scaling_factor": family.latent_scale,
            "sample_size": family.default_size,
        },
        "text_encoder/config.json": {
            "architectures": ["CLIPTextModelWithProjection" if text.projection_dim else "CLIPTextModel"],
            "model_type": "clip_text_model",
            "vocab_size": text.vocab_size,
            "max_position_embeddings": text.max_length,
            "hidden_size": text.width,
            "num_hidden_layers": text.layers,
            "num_attention_heads": text.heads,
            "intermediate_size": text.mlp_width,
            "hidden_act": text.activation,
            "projection_dim": text.projection_dim or text.width,
            "layer_norm_eps": 1e-5,
            "bos_token_id": 49406,
            "eos_token_id": 49407,
            "pad_token_id": text.pad_token,
        },
        "tokenizer/special_tokens_map.json": {
            "bos_token": "<|startoftext|>",
            "eos_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>",
            "pad_token": pad,
        },
        "tokenizer/tokenizer_config.json": {
            "model_max_length": text.max_length,
            "do_lower_case": True,
            "pad_token": pad,
        },
        "scheduler/scheduler_config.json": {
            "_class_name": "DDIMScheduler",
            **schedule,
            "num_train_timesteps": 1000,
            "prediction_type": {"epsilon": "epsilon", "v": "v_prediction", "x0": "sample"}[family.prediction],
            "clip_sample": False,
            "set_alpha_to_one": False,
            "steps_offset": 1,
        },
    }
    return _sdxl_configs(family, configs) if family.is_sdxl else configs


def _sdxl_configs(family: ModelFamily, configs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """SDXL's folder: bigG in text_encoder_2/ (with tokenizer_2/); the refiner has no text_encoder/."""
    out = dict(configs)
    index = dict(out["model_index.json"])
    index.pop("safety_checker")
    index.pop("requires_safety_checker")
    if family.text_encoder_2 is not None:
        g = family.text_encoder_2
        index |= {"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True}
    else:  # the refiner: its one encoder is the second one
        g = family.text_encoder
        for name in (
            "text_encoder/config.json",
            "tokenizer/special_tokens_map.json",
            "tokenizer/tokenizer_config.json",
        ):
            out[name.replace("text_encoder/", "text_encoder_2/").replace("tokenizer/", "tokenizer_2/")] = (
                out.pop(name)
            )
        index |= {"_class_name": "StableDiffusionXLImg2ImgPipeline", "requires_aesthetics_score": True}
        index |= {"text_encoder": [None, None], "tokenizer": [None, None]}
    pad = "!" if g.pad_token == 0 else "<|endoftext|>"
    out["text_encoder_2/config.json"] = {
        **configs["text_encoder/config.json"],
        "architectures": ["CLIPTextModelWithProjection"],
        **{k: v for k, v in _text_fields(g).items()},
    }
    out["tokenizer_2/special_tokens_map.json"] = {
        **configs["tokenizer/special_tokens_map.json"],
        "pad_token": pad,
    }
    out["tokenizer_2/tokenizer_config.json"] = {
        **configs["tokenizer/tokenizer_config.json"],
        "pad_token": pad,
    }
    index |= {
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
    }
    out["model_index.json"] = index
    return out


def _text_fields(text: TextEncoderConfig) -> dict[str, Any]:
    return {
        "vocab_size": text.vocab_size,
        "max_position_embeddings": text.max_length,
        "hidden_size": text.width,
        "num_hidden_layers": text.layers,
        "num_attention_heads": text.heads,
        "intermediate_size": text.mlp_width,
        "hidden_act": text.activation,
        "projection_dim": text.projection_dim or text.width,
        "pad_token_id": text.pad_token,
    }


def write_diffusers_configs(family: ModelFamily, root: str | Path) -> Path:
    """Write `diffusers_configs(family)` under `root` (the tokenizer's vocab files are not included)."""
    root = Path(root)
    for name, config in diffusers_configs(family).items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(json.dumps(config, indent=2) + "\n")
    return root


def write_tokenizer_files(folder: str | Path) -> Path:
    """transformers' `vocab.json` and `merges.txt` from our packaged BPE file (OpenAI CLIP's tables)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = Vocabulary.load()
    merges = sorted(vocab.merge_rank, key=vocab.merge_rank.__getitem__)
    tokens = {token: i for i, token in enumerate(vocab.id_to_token)}
    (folder / "vocab.json").write_text(json.dumps(tokens, ensure_ascii=False), encoding="utf-8")
    merges_text = "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"
    (folder / "merges.txt").write_text(merges_text, encoding="utf-8")
    return folder


def save_diffusers_folder(
    root: str | Path,
    unet: StateDict,
    vae: StateDict,
    text_encoder: StateDict,
    family: ModelFamily,
    *,
    dtype: torch.dtype | None = None,
    text_encoder_2: StateDict | None = None,
) -> Path:
    """Write a `StableDiffusionPipeline` folder: configs, tokenizer and weights in diffusers' names.

    The text encoder is a plain `CLIPTextModel`, as diffusers ships SD 2.x: a text projection (unused
    by SD 1.x/2.x generation) is left out, so the pipeline loads with no unexpected keys. SDXL: a
    `StableDiffusionXLPipeline` (the refiner: `...Img2ImgPipeline`) with bigG in `text_encoder_2/`.
    """
    root = Path(root)
    if family.is_sdxl and family.text_encoder_2 is not None and text_encoder_2 is None:
        raise ValueError(f"family {family.name} has a second text encoder: pass text_encoder_2")
    # written beside the target and renamed into place: a crash leaves no half model under `root`
    staging = root.with_name(f".{root.name}.{os.getpid()}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        write_diffusers_configs(family, staging)
        weights = {
            "unet/diffusion_pytorch_model.safetensors": keymap_unet.ours_to_diffusers(unet, family.unet),
            "vae/diffusion_pytorch_model.safetensors": keymap_vae.ours_to_diffusers(vae, family.vae),
        }
        if family.is_sdxl:  # bigG keeps its projection (the pooled output) and the `text_model.` level
            bigg = text_encoder if family.text_encoder_2 is None else text_encoder_2
            assert bigg is not None
            weights["text_encoder_2/model.safetensors"] = bigg
            write_tokenizer_files(staging / "tokenizer_2")
        if not family.is_sdxl or family.text_encoder_2 is not None:
            text_config = staging / "text_encoder" / "config.json"
            config = json.loads(text_config.read_text())
            text_config.write_text(
                json.dumps({**config, "architectures": ["CLIPTextModel"]}, indent=2) + "\n"
            )
            write_tokenizer_files(staging / "tokenizer")
            weights["text_encoder/model.safetensors"] = {
                k.removeprefix("text_model."): v  # transformers 5 saves CLIPTextModel without `text_model.`
                for k, v in text_encoder.items()
                if not k.startswith("text_projection.")
            }
        for name, tensors in weights.items():
            # transformers and diffusers refuse safetensors files without the "format" metadata key
            save_safetensors(staging / name, tensors, {"format": "pt"}, dtype=dtype)
        os.replace(staging, root)  # onto a missing or empty folder
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root
