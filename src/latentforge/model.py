"""`StableDiffusion`: the loaded model bundle every pipeline takes, and `load(path)` that makes one."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from latentforge.backends import BackendError, OpenVINOBackend, make_backend
from latentforge.checkpoints.embeddings import Embedding, find_embeddings, read_embedding
from latentforge.checkpoints.errors import CheckpointError
from latentforge.checkpoints.hashing import a1111_short_hash
from latentforge.checkpoints.loading import read_components, read_vae
from latentforge.checkpoints.lora import LoraHandle, apply_loras
from latentforge.checkpoints.taesd import embedded_taesd
from latentforge.errors import ParameterError
from latentforge.models.families import ModelFamily, Prediction
from latentforge.models.residency import Residency, blocks, supported
from latentforge.models.taesd import TinyAutoencoder
from latentforge.models.text_encoder import CLIPTextModel
from latentforge.models.tokenizer import CLIPTokenizer
from latentforge.models.unet import UNetModel
from latentforge.models.vae import AutoencoderKL


@dataclass
class StableDiffusion:
    """Tokenizer, text encoder, VAE and U-Net of one model, with the family that pairs them."""

    family: ModelFamily
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNetModel
    name: str = "model"
    short_hash: str | None = None  # A1111's "Model hash": first 10 hex digits of the file's SHA-256
    # A swapped-in VAE as A1111's infotext names it (`modules/sd_vae.py`): "VAE" is the file's base name,
    # "VAE hash" the first 10 hex digits of its SHA-256; None while the checkpoint's own VAE is in use.
    vae_name: str | None = None
    vae_hash: str | None = None
    # Adapters (docs/adapters.md): folders `<lora:name>` tags resolve in, and the textual-inversion
    # embeddings prompts use by name; LoRA file hashes are cached per path (A1111 caches them too).
    lora_dirs: tuple[Path, ...] = ()
    embeddings: dict[str, Embedding] = field(default_factory=dict)
    lora_hashes: dict[Path, str] = field(default_factory=dict, repr=False)
    # SDXL base: the second text encoder (OpenCLIP bigG) and its tokenizer (pads with 0)
    text_encoder_2: CLIPTextModel | None = None
    tokenizer_2: CLIPTokenizer | None = None
    taesd: TinyAutoencoder | None = None  # optional tiny decoder: live previews and `fast_decode` (perf)
    # The U-Net and VAE decoder compiled (`backends/`, `load(backend="openvino")`); None: eager torch
    backend: OpenVINOBackend | None = field(default=None, repr=False)
    # Low-memory mode (`load(low_memory=True)`): the networks' weights in a file-backed mapping, only the
    # running network's pages resident (models/residency.py); None: ordinary memory
    residency: Residency | None = field(default=None, repr=False)

    @classmethod
    def from_family(
        cls, family: ModelFamily, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> StableDiffusion:
        """A randomly initialised model of a family (for tests and training from scratch)."""
        with torch.device(device):
            bundle = cls(
                family=family,
                tokenizer=CLIPTokenizer.for_config(family.text_encoder),
                text_encoder=CLIPTextModel(family.text_encoder),
                vae=AutoencoderKL(family.vae),
                unet=UNetModel(family.unet),
                name=family.name,
            )
            if family.text_encoder_2 is not None:
                bundle.text_encoder_2 = CLIPTextModel(family.text_encoder_2)
                bundle.tokenizer_2 = CLIPTokenizer.for_config(family.text_encoder_2)
        return bundle.to(dtype=dtype)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def vae_device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def to(
        self, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> StableDiffusion:
        for module in self.modules():
            module.to(device=device, dtype=dtype)
        return self

    def modules(self) -> list[torch.nn.Module]:
        """The networks of the bundle (with the second text encoder of SDXL)."""
        extra = [] if self.text_encoder_2 is None else [self.text_encoder_2]
        return [self.text_encoder, *extra, self.vae, self.unet]

    def eval(self) -> StableDiffusion:
        for module in self.modules():
            module.eval().requires_grad_(False)
        return self

    def apply_lora(
        self,
        path: str | Path,
        unet_weight: float = 1.0,
        te_weight: float | None = None,
        *,
        bake: bool = False,
    ) -> LoraHandle:
        """Apply a LoRA/LyCORIS file (te_weight None: unet_weight); `handle.undo()` or leaving a `with`
        block restores every weight bit for bit, `bake=True` keeps it for good."""
        return apply_loras(self, [(path, unet_weight, te_weight)], bake=bake)

    lora = apply_lora  # reads better as a context manager: `with model.lora("x.safetensors", 0.8): ...`

    def use_folders(
        self,
        *,
        lora_dirs: Sequence[str | Path] = (),
        embedding_dirs: Sequence[str | Path] = (),
        models_dir: str | Path | None = None,
    ) -> None:
        """Add folders `<lora:name>` tags resolve in, and load the embeddings of embedding folders.

        `models_dir` is A1111's layout: `models/Lora`, `models/LyCORIS`, embeddings in `embeddings/` beside
        `models/` (or inside it). Embeddings of another family or unreadable files are skipped with a warning.
        """
        loras = [Path(d).expanduser() for d in lora_dirs]
        embeddings = [Path(d).expanduser() for d in embedding_dirs]
        root = Path(models_dir).expanduser() if models_dir is not None else None
        for folder in [*loras, *embeddings, *([root] if root is not None else [])]:
            if not folder.is_dir():
                raise ParameterError(f"{folder} is not a folder (LoRA, embeddings or models folder)")
        if root is not None:
            loras += [root / "Lora", root / "LyCORIS"]
            embeddings += [root / "embeddings", root.parent / "embeddings"]
        self.lora_dirs = tuple(dict.fromkeys((*self.lora_dirs, *loras)))
        for name, path in find_embeddings(embeddings).items():
            try:
                self.load_embedding(path, name)
            except (CheckpointError, ParameterError) as error:
                warnings.warn(f"embedding {path} skipped: {error}", stacklevel=2)

    def load_embedding(self, path: str | Path, name: str | None = None) -> Embedding:
        """Read a textual-inversion embedding and use it in prompts by `name` (default: the file stem).

        One trained for another text-encoder width (an SD2 embedding on SD1) is refused naming its family.
        """
        embedding = read_embedding(path, name)
        # SDXL: `clip_l` feeds CLIP-L and `clip_g` bigG (the refiner's only encoder), as A1111's sd_hijack
        f = self.family
        if f.is_sdxl:
            parts = {"clip_l": f.text_encoder, "clip_g": f.text_encoder_2} if f.text_encoder_2 else {}
            parts = parts or {"clip_g": f.text_encoder}
            have = {p: embedding.sdxl[p].shape for p in parts if p in embedding.sdxl}
            fits = len(have) == len(parts) and all(have[p][-1] == c.width for p, c in parts.items())
            fits = fits and len({shape[0] for shape in have.values()}) == 1
            takes = " + ".join(f"{p} width {c.width}" for p, c in parts.items())
        else:
            fits = not embedding.sdxl and embedding.width == f.text_encoder.width
            takes = f"width {f.text_encoder.width}"
        if not fits:
            raise ParameterError(
                f"embedding {embedding.name!r} ({path}) is for {embedding.family} (width {embedding.width}); "
                f"this {f.name} model's text encoders take {takes}"
            )
        if embedding.count > self.tokenizer.max_length - 2:
            raise ParameterError(
                f"embedding {embedding.name!r} has {embedding.count} vectors, more than one "
                f"{self.tokenizer.max_length - 2}-token chunk holds"
            )
        self.embeddings[embedding.name] = embedding
        return embedding


def load(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    prediction: Prediction | None = None,
    vae: str | Path | None = None,
    use_ema: bool = False,
    compute_hash: bool = True,
    backend: str = "torch",
    backend_cache_dir: str | Path | None = None,
    int8: bool = False,
    low_memory: bool = False,
) -> StableDiffusion:
    """Load an original single-file checkpoint (`.safetensors`/`.ckpt`) or a diffusers folder.

    Args:
        path: the checkpoint file or diffusers folder.
        dtype: weights dtype (default: float32).
        device: where the weights go.
        prediction: "epsilon", "v" or "x0"; default: the family's, and for SD 2.x single files (512 eps
            or 768-v) one U-Net forward tells (1.5 s on a CPU core, see `checkpoints.prediction_probe`).
        vae: a standalone VAE file to use instead of the checkpoint's own.
        use_ema: take the U-Net's EMA weights of a full training checkpoint.
        compute_hash: compute A1111's model (and VAE) hash (reads the whole file once more).
        backend: "torch" (eager) or "openvino" (U-Net, VAE decoder, text encoder: `backends/openvino.py`).
        backend_cache_dir: where the openvino backend keeps converted graphs (default ~/.cache/latentforge).
        int8: hold the U-Net's weights as int8 (`models.quantize`), quantized layer by layer while read.
        low_memory: keep only the running network's weights in memory, the others parked in a file-backed
            mapping (`models/residency.py`, docs/performance.md); the same images, CPU and torch backend only.
    """
    if int8 and backend != "torch":
        raise BackendError(f"int8 weights (--int8) patch the eager U-Net: drop them or the {backend} backend")
    residency = _residency(backend, device) if low_memory else None
    parts = read_components(
        path, dtype=dtype or torch.float32, prediction=prediction, use_ema=use_ema, compute_hash=compute_hash,
        int8=int8, residency=residency,
    )  # fmt: skip
    bundle = StableDiffusion(
        family=parts.family,
        tokenizer=CLIPTokenizer.for_config(parts.family.text_encoder),
        text_encoder=parts.text_encoder,
        vae=parts.vae,
        unet=parts.unet,
        name=parts.name,
        short_hash=parts.short_hash,
        text_encoder_2=parts.text_encoder_2,
        tokenizer_2=None if (g := parts.family.text_encoder_2) is None else CLIPTokenizer.for_config(g),
    )
    if vae is not None:
        swap_vae(bundle, vae, compute_hash=compute_hash)
    # the tiny decoder shipped for an embedded model (previews, fast decode); `--taesd` replaces it
    taesd = embedded_taesd(bundle.name, bundle.vae, dtype=dtype or torch.float32)
    bundle.taesd = None if taesd is None else taesd.to(device)
    bundle = bundle.to(device=device).eval()
    if residency is not None:
        bundle.residency = residency
        text = [bundle.text_encoder, *([bundle.text_encoder_2] if bundle.text_encoder_2 else [])]
        residency.place("text", *text)
        for group, block in blocks("unet", bundle.unet):  # the U-Net block by block: its largest one resident
            residency.place(group, block)
        residency.place("vae", bundle.vae)
        residency.loaded()
    networks = (bundle.unet, bundle.vae, bundle.text_encoder)
    bundle.backend = make_backend(backend, *networks, cache_dir=backend_cache_dir)
    return bundle


def _residency(backend: str, device: str | torch.device) -> Residency:
    if backend != "torch":
        raise BackendError(f"low-memory mode (--low-memory) parks the eager networks: drop it or {backend}")
    if torch.device(device).type != "cpu":
        raise ParameterError(f"low-memory mode (--low-memory) runs on the CPU only, not {device}")
    if not supported():
        raise ParameterError("low-memory mode (--low-memory) needs madvise(MADV_DONTNEED): Linux or macOS")
    return Residency()


def swap_vae(bundle: StableDiffusion, path: str | Path, *, compute_hash: bool = True) -> None:
    """Replace the bundle's VAE by the one in `path` (same architecture, other weights); records its
    file name and A1111 hash for the infotext."""
    vae = read_vae(path, bundle.family, bundle.dtype).to(bundle.device)
    use_vae(bundle, vae, Path(path).name, a1111_short_hash(path) if compute_hash else None)


def use_vae(bundle: StableDiffusion, vae: AutoencoderKL, name: str | None, short_hash: str | None) -> None:
    """Make `vae` the bundle's VAE with its infotext name and hash (None, None: the checkpoint's own)."""
    bundle.vae, bundle.vae_name, bundle.vae_hash = vae, name, short_hash
    if bundle.residency is not None:  # low-memory mode: its weights parked and switched like the others'
        bundle.residency.place("vae", vae)
