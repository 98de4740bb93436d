"""The U-Net run by OpenVINO (optional package: `pip install 'latentforge[openvino]'`).

The graph is exported from our own `UNetModel` (`torch.export` -> `openvino.convert_model`): no second
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


class _Float32Interface(nn.Module):
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


class OpenVINOUNet:
    """`(x, t, context, y=None) -> U-Net output`, fp32 tensors in and out, computed by OpenVINO.

    Args:
        unet: our `UNetModel` (fp32 or bf16 weights); it is read, never changed.
        cache_dir: where converted graphs are saved and read (None: convert in every process).
        precision: "bf16" or "f32" (default: bf16 if the CPU has native bf16 or the weights are bf16).
        threads: inference threads (default: torch's intra-op thread count at compile time).
    """

    def __init__(
        self,
        unet: nn.Module,
        *,
        cache_dir: str | Path | None = None,
        precision: str | None = None,
        threads: int | None = None,
    ) -> None:
        self.ov = _import_openvino()
        self.core = self.ov.Core()
        capabilities = self.core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        bf16 = "BF16" in capabilities or next(unet.parameters()).dtype == torch.bfloat16
        self.precision = precision or ("bf16" if bf16 else "f32")
        if self.precision not in ("bf16", "f32"):
            raise BackendError(f"openvino precision {self.precision!r}: use bf16 or f32")
        if self.precision == "f32" and next(unet.parameters()).dtype != torch.float32:
            # OpenVINO's CPU plugin has no fp32 kernels for a bf16 graph's GroupNormalization
            raise BackendError("openvino f32 precision needs fp32 weights: load the model without a dtype")
        self.unet = unet
        self.parameters = list(unet.parameters())
        self.cache_dir = None if cache_dir is None else Path(cache_dir).expanduser()
        self.threads = threads
        self.compiled: OrderedDict[Key, Any] = OrderedDict()
        self.fingerprint: tuple[tuple[int, int], ...] = ()
        self.weights: str | None = None  # weights_hash of the current fingerprint, computed when needed
        self.seconds = {"hash": 0.0, "export": 0.0, "convert": 0.0, "read": 0.0, "compile": 0.0}

    def _current_fingerprint(self) -> tuple[tuple[int, int], ...]:
        # In-place writes (patches, load_state_dict) bump `_version`; a replaced tensor changes its pointer.
        # The list is taken once: walking the module tree costs ~10 ms, as much as a whole evaluation.
        return tuple((p.data_ptr(), p._version) for p in self.parameters)

    def __call__(
        self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        fingerprint = self._current_fingerprint()
        if fingerprint != self.fingerprint:  # new or changed weights: every compiled graph is stale
            self.compiled.clear()
            self.fingerprint, self.weights = fingerprint, None
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(x.shape[0])
        inputs = [x, t, context, *([] if y is None else [y])]
        inputs = [a.detach().to("cpu", torch.float32).contiguous() for a in inputs]
        key = tuple(tuple(a.shape) for a in inputs)
        request = self.compiled.get(key)
        if request is None:
            request = self._build(key, inputs)
        else:
            self.compiled.move_to_end(key)
        request.infer([a.numpy() for a in inputs], share_inputs=True)
        return torch.from_numpy(request.get_output_tensor(0).data.copy()).to(x.device)

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
                self.weights = weights_hash(self.unet)
                self.seconds["hash"] += time.perf_counter() - start
            shapes = "_".join("x".join(map(str, shape)) for shape in key)
            name = f"unet-{self.weights}-{_code_hash(self.unet, self.ov.__version__)}-{shapes}"
            path = self.cache_dir / f"{name}.xml"
            if path.is_file() and path.with_suffix(".bin").is_file():
                start = time.perf_counter()
                model = self.core.read_model(path)
                self.seconds["read"] += time.perf_counter() - start
                return model
        start = time.perf_counter()
        with torch.inference_mode(False), torch.no_grad():  # samplers call us in inference mode
            example = tuple(a.clone() for a in inputs)  # normal tensors, which export can trace
            program = torch.export.export(_Float32Interface(self.unet).eval(), example)
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
