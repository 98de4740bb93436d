"""The U-Net and the VAE decoder run by OpenVINO (optional package: `pip install 'latentforge[openvino]'`).

The graphs are exported from our own modules (`torch.export` -> `openvino.convert_model`): no second
model definition. Shapes are static: one compiled model per input shape (batch, latent size, context
length), a few kept in memory, each converted graph saved under `cache_dir` keyed by a hash of the
weights, of the U-Net's source files, the package versions and the shapes, so a later process only
compiles. Weights that change in place (a LoRA applied from Python, a merge) are noticed by their
version counters and the graph is converted again. Precision: bf16 where the CPU computes it natively
(AMX / AVX512-BF16: OpenVINO's "BF16" capability) or when the weights are bf16, fp32 otherwise;
inputs and outputs are fp32.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from latentforge.errors import LatentforgeError
from latentforge.models.vae import AutoencoderKL

KEPT_SHAPES = 4  # compiled models kept in memory (LRU): cond+uncond, cond only, a hires size ...
Key = tuple[tuple[int, ...], ...]


class BackendError(LatentforgeError):
    """A backend that cannot run here (package missing, unknown name) or not with this option."""


def _import_openvino() -> Any:
    try:
        return importlib.import_module("openvino")
    except ImportError as error:
        raise BackendError(
            f"--backend openvino needs the openvino package ({error}): pip install 'latentforge[openvino]'"
        ) from None


def default_cache_dir() -> Path:
    """Where converted graphs are kept: $XDG_CACHE_HOME/latentforge/openvino (~/.cache by default)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "latentforge" / "openvino"


class _UNetInterface(nn.Module):
    """The U-Net with fp32 inputs and output, whatever its weights' dtype (the casts are in the graph)."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, *y: torch.Tensor
    ) -> torch.Tensor:
        dtype = next(self.unet.parameters()).dtype
        vector = y[0].to(dtype) if y else None
        return self.unet(x.to(dtype), t.to(dtype), context.to(dtype), vector).float()


class _DecoderInterface(nn.Module):
    """The VAE's decode: unscaled latents -> pixels in [-1, 1], fp32 in and out."""

    def __init__(self, vae: AutoencoderKL) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z.to(next(self.vae.parameters()).dtype)).float()


class _TextInterface(nn.Module):
    """The text encoder at one clip skip: token ids [B, T] -> (hidden [B, T, C], pooled), fp32."""

    def __init__(self, text_encoder: nn.Module, clip_skip: int) -> None:
        super().__init__()
        self.text_encoder, self.clip_skip = text_encoder, clip_skip

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, pooled = self.text_encoder(input_ids, clip_skip=self.clip_skip)
        return hidden.float(), pooled.float()


class CompiledTextEncoder(nn.Module):
    """Stands in for a `CLIPTextModel`: its plain calls (token ids, a clip skip) run as OpenVINO graphs, one
    per clip skip; calls with textual-inversion vectors or without the final norm run the module itself."""

    def __init__(self, text_encoder: nn.Module, make_graph: Any) -> None:
        super().__init__()
        self.text_encoder, self.make_graph = text_encoder, make_graph
        self.graphs: dict[int, OpenVINOGraph] = {}

    def get_submodule(self, target: str) -> nn.Module:
        return self.text_encoder.get_submodule(target)

    def forward(
        self,
        input_ids: torch.Tensor,
        clip_skip: int = 1,
        token_embeds: torch.Tensor | None = None,
        final_norm: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if token_embeds is not None or not final_norm:
            return self.text_encoder(input_ids, clip_skip, token_embeds, final_norm)
        if clip_skip not in self.graphs:
            self.graphs[clip_skip] = self.make_graph(_TextInterface(self.text_encoder, clip_skip))
        dtype = next(self.text_encoder.parameters()).dtype
        hidden, pooled = self.graphs[clip_skip].outputs(input_ids)
        return hidden.to(dtype), pooled.to(dtype)


def weights_hash(module: nn.Module) -> str:
    """BLAKE2b of every parameter's and buffer's name, dtype, shape and bytes (hex, 32 digits)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _code_hash(module: nn.Module, ov_version: str) -> str:
    """What else the exported graph depends on: the source of the U-Net's modules and the versions."""
    digest = hashlib.blake2b(f"{torch.__version__}|{ov_version}".encode(), digest_size=8)
    sources = {inspect.getsourcefile(type(m)) for m in module.modules()}
    for path in sorted(s for s in sources if s and "latentforge" in s):
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()


class OpenVINOGraph:
    """One of our modules run by OpenVINO: fp32 tensors in, one fp32 tensor out, a graph per input shape."""

    def __init__(
        self, ov: Any, core: Any, interface: nn.Module, name: str, precision: str, cache_dir: Path | None,
        threads: int | None,
    ) -> None:  # fmt: skip
        self.ov, self.core, self.interface, self.name = ov, core, interface.eval(), name
        self.precision, self.cache_dir, self.threads = precision, cache_dir, threads
        # Taken once: walking the module tree costs ~10 ms, as much as a whole U-Net evaluation.
        self.parameters = list(interface.parameters())
        self.compiled: OrderedDict[Key, Any] = OrderedDict()
        self.fingerprint: tuple[tuple[int, int], ...] = ()
        self.weights: str | None = None  # weights_hash of the current fingerprint, computed when needed
        self.seconds = {"hash": 0.0, "export": 0.0, "convert": 0.0, "read": 0.0, "compile": 0.0}

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.outputs(*tensors)[0]

    def outputs(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """Every output of the graph for these inputs (floating inputs as fp32, integer ones as they are)."""
        # In-place writes (patches, load_state_dict) bump `_version`; a replaced tensor changes its pointer.
        fingerprint = tuple((p.data_ptr(), p._version) for p in self.parameters)
        if fingerprint != self.fingerprint:  # new or changed weights: every compiled graph is stale
            self.compiled.clear()
            self.fingerprint, self.weights = fingerprint, None
        dtypes = [torch.float32 if a.is_floating_point() else a.dtype for a in tensors]
        inputs = [a.detach().to("cpu", dtype).contiguous() for a, dtype in zip(tensors, dtypes, strict=True)]
        key = tuple(tuple(a.shape) for a in inputs)
        request = self.compiled.get(key)
        if request is None:
            request = self._build(key, inputs)
        else:
            self.compiled.move_to_end(key)
        request.infer([a.numpy() for a in inputs], share_inputs=True)
        count = len(request.model_outputs)
        return [torch.from_numpy(request.get_output_tensor(i).data.copy()) for i in range(count)]

    def _build(self, key: Key, inputs: list[torch.Tensor]) -> Any:
        model = self._read_or_convert(key, inputs)
        start = time.perf_counter()
        config = {
            "INFERENCE_PRECISION_HINT": self.precision,
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": self.threads or torch.get_num_threads(),
        }
        request = self.core.compile_model(model, "CPU", config).create_infer_request()
        self.seconds["compile"] += time.perf_counter() - start
        self.compiled[key] = request
        while len(self.compiled) > KEPT_SHAPES:
            self.compiled.popitem(last=False)
        return request

    def _read_or_convert(self, key: Key, inputs: list[torch.Tensor]) -> Any:
        path = None
        if self.cache_dir is not None:
            if self.weights is None:
                start = time.perf_counter()
                self.weights = weights_hash(self.interface)
                self.seconds["hash"] += time.perf_counter() - start
            shapes = "_".join("x".join(map(str, shape)) for shape in key)
            code = _code_hash(self.interface, self.ov.__version__)
            path = self.cache_dir / f"{self.name}-{self.weights}-{code}-{shapes}.xml"
            if path.is_file() and path.with_suffix(".bin").is_file():
                start = time.perf_counter()
                model = self.core.read_model(path)
                self.seconds["read"] += time.perf_counter() - start
                return model
        start = time.perf_counter()
        with torch.inference_mode(False), torch.no_grad():  # samplers call us in inference mode
            example = tuple(a.clone() for a in inputs)  # normal tensors, which export can trace
            program = torch.export.export(self.interface, example)
        self.seconds["export"] += time.perf_counter() - start
        start = time.perf_counter()
        model = self.ov.convert_model(program)
        self.seconds["convert"] += time.perf_counter() - start
        if path is not None:  # written under a temporary name, then renamed: readers never see half a file
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.xml")
            self.ov.save_model(model, partial, compress_to_fp16=False)
            os.replace(partial.with_suffix(".bin"), path.with_suffix(".bin"))
            os.replace(partial, path)
        return model


class OpenVINOBackend:
    """The U-Net (and the VAE's decoder, when given) computed by OpenVINO, fp32 tensors in and out.

    Args:
        unet: our `UNetModel` (fp32 or bf16 weights); it is read, never changed.
        vae: our `AutoencoderKL`, whose `decode` then runs here too (None: it stays eager).
        text_encoder: our `CLIPTextModel`, whose plain calls then run here too (`text_encoder_for`).
        cache_dir: where converted graphs are saved and read (None: convert in every process).
        precision: "bf16" or "f32" (default: bf16 if the CPU has native bf16 or the weights are bf16).
        threads: inference threads (default: torch's intra-op thread count at compile time).
    """

    def __init__(
        self,
        unet: nn.Module,
        vae: AutoencoderKL | None = None,
        text_encoder: nn.Module | None = None,
        *,
        cache_dir: str | Path | None = None,
        precision: str | None = None,
        threads: int | None = None,
    ) -> None:
        ov = _import_openvino()
        core = ov.Core()
        capabilities = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        dtypes = {p.dtype for m in (unet, vae, text_encoder) if m is not None for p in m.parameters()}
        precision = precision or ("bf16" if "BF16" in capabilities or torch.bfloat16 in dtypes else "f32")
        if precision not in ("bf16", "f32"):
            raise BackendError(f"openvino precision {precision!r}: use bf16 or f32")
        if precision == "f32" and dtypes != {torch.float32}:
            # OpenVINO's CPU plugin has no fp32 kernels for a bf16 graph's GroupNormalization
            raise BackendError("openvino f32 precision needs fp32 weights: load the model without a dtype")
        self.precision = precision
        folder = None if cache_dir is None else Path(cache_dir).expanduser()
        self.unet_graph = OpenVINOGraph(ov, core, _UNetInterface(unet), "unet", precision, folder, threads)
        self.vae, self.decoder_graph = vae, None
        if vae is not None:
            interface = _DecoderInterface(vae)
            self.decoder_graph = OpenVINOGraph(ov, core, interface, "vae-decoder", precision, folder, threads)
        self.text_encoder = None
        if text_encoder is not None:

            def make_graph(interface: nn.Module) -> OpenVINOGraph:
                name = f"text-encoder-skip{interface.clip_skip}"
                return OpenVINOGraph(ov, core, interface, name, precision, folder, threads)

            self.text_encoder = CompiledTextEncoder(text_encoder, make_graph)

    def unet(
        self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The U-Net's output for latents x [B, C, H, W], timesteps t ([B] or one), context [B, T, D]."""
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(x.shape[0])
        return self.unet_graph(x, t, context, *([] if y is None else [y]))

    def decode(self, vae: nn.Module, z: torch.Tensor) -> torch.Tensor | None:
        """Unscaled latents -> pixels in [-1, 1]; None when `vae` is not the one compiled here (swapped)."""
        return None if self.decoder_graph is None or vae is not self.vae else self.decoder_graph(z)

    def text_encoder_for(self, text_encoder: nn.Module) -> nn.Module:
        """What to call in place of `text_encoder`: its compiled stand-in, or itself if it is not the one
        compiled here (swapped, or SDXL's second tower)."""
        compiled = self.text_encoder
        return compiled if compiled is not None and compiled.text_encoder is text_encoder else text_encoder

    @property
    def seconds(self) -> dict[str, float]:
        """Seconds spent hashing, exporting, converting, reading and compiling, over all graphs."""
        graphs = [self.unet_graph, *([self.decoder_graph] if self.decoder_graph is not None else [])]
        graphs += list(self.text_encoder.graphs.values()) if self.text_encoder is not None else []
        return {name: sum(g.seconds[name] for g in graphs) for name in self.unet_graph.seconds}
