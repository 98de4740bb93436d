"""Every error a user can cause reaches the command line as one `error:` line and exit code 2.

One case per `LatentforgeError` subclass, run through `cli.main`; the training errors have their own
file (test_train_cli_errors.py, one test named per class below). A new error class without a case here
fails `test_every_error_class_has_a_cli_case`.
"""

from __future__ import annotations

import importlib
import pickle
import pkgutil
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import latentforge
from latentforge.checkpoints.single_file import save_single_file
from latentforge.cli import main
from latentforge.errors import LatentforgeError
from latentforge.model import StableDiffusion
from latentforge.models.families import TINY, TINY_SD2

# Classes run through the CLI in test_train_cli_errors.py (its test names).
TRAINING = {
    "ConfigError": "test_config_errors",
    "DatasetError": "test_dataset_errors_name_the_files",
    "DataLoadError": "test_image_that_breaks_during_training_is_named",
    "CheckpointsUnloadable": "test_resume_errors",
    "ResumeMismatch": "test_resume_errors",
    "TrainingDiverged": "test_divergence",
}
BASES = {"LatentforgeError", "CheckpointError", "FileFormatError"}  # raised only through subclasses


def all_error_classes() -> set[str]:
    for module in pkgutil.walk_packages(latentforge.__path__, "latentforge."):
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)

    def subclasses(cls: type) -> set[type]:
        found = set(cls.__subclasses__())
        return found.union(*(subclasses(sub) for sub in found)) if found else found

    return {cls.__name__ for cls in subclasses(LatentforgeError)} | {"LatentforgeError"}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("files")
    torch.manual_seed(0)
    model = StableDiffusion.from_family(TINY)
    good = root / "tiny.safetensors"
    save_single_file(
        good, model.unet.state_dict(), model.vae.state_dict(), model.text_encoder.state_dict(), TINY
    )
    sd2 = StableDiffusion.from_family(TINY_SD2)
    parts = (sd2.unet.state_dict(), sd2.vae.state_dict(), sd2.text_encoder.state_dict())
    save_single_file(root / "sd2.safetensors", *parts, TINY_SD2)
    nan_unet = {k: torch.full_like(v, float("nan")) for k, v in model.unet.state_dict().items()}
    broken = root / "nan.safetensors"
    save_single_file(broken, nan_unet, model.vae.state_dict(), model.text_encoder.state_dict(), TINY)
    unet = {k: v for k, v in model.unet.state_dict().items() if "out.2" not in k}
    partial = root / "partial.safetensors"
    save_single_file(partial, unet, model.vae.state_dict(), model.text_encoder.state_dict(), TINY)
    (root / "lfs.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\n")
    (root / "short.safetensors").write_bytes(good.read_bytes()[:1000])
    save_file({"something.else": torch.zeros(3)}, root / "other.safetensors")
    (root / "payload.ckpt").write_bytes(pickle.dumps(_Payload(root / "ran")))
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    (root / "a-file").write_text("x")
    for name in ("gen", "ref"):
        (root / name).mkdir()
        Image.new("RGB", (16, 16), (200, 10, 10)).save(root / name / "0.png")
    (root / "notempty").mkdir()
    (root / "notempty" / "mine.txt").write_text("keep me")
    return {p.stem if p.is_file() else p.name: p for p in root.iterdir()} | {"root": root}


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (Path.touch, (self.marker,))


def _eval(f: dict[str, Path], generated: Path, *extra: str) -> list[str]:
    return ["eval", "--generated", str(generated), "--reference", str(f["ref"]), *extra]


def _sd15_lora(f: dict[str, Path]) -> Path:
    """A folder with a kohya LoRA for SD 1.x's 768-wide cross-attention context (not the tiny model's)."""
    folder = f["root"] / "loras"
    folder.mkdir(exist_ok=True)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    tensors = {f"{name}.lora_down.weight": torch.zeros(4, 768), f"{name}.lora_up.weight": torch.zeros(320, 4)}
    save_file({**tensors, f"{name}.alpha": torch.tensor(4.0)}, str(folder / "sd15.safetensors"))
    return folder


def _generate(f: dict[str, Path], model: str, *extra: str) -> list[str]:
    return [
        "generate",
        "x",
        "--model",
        str(f[model]),
        "--steps",
        "1",
        "--out",
        str(f["root"] / "out"),
        *extra,
    ]


CASES: dict[str, Callable[[dict[str, Path]], list[str]]] = {
    "ParameterError": lambda f: _generate(f, "tiny", "--sampler", "Euler b"),
    "OutputError": lambda f: _generate(f, "tiny", "--out", str(f["a-file"])),
    "NonFiniteError": lambda f: _generate(f, "nan", "--size", "32x32"),
    "ImageLoadError": lambda f: _generate(f, "tiny", "--init-image", str(f["broken"])),
    "CheckpointNotFoundError": lambda f: _generate(f, "tiny", "--model", str(f["root"] / "no.safetensors")),
    "NotAWeightsFileError": lambda f: _generate(f, "lfs"),
    "CorruptCheckpointError": lambda f: _generate(f, "short"),
    "UnsafeCheckpointError": lambda f: _generate(f, "payload"),
    "UnknownArchitectureError": lambda f: _generate(f, "other"),
    "KeyMismatchError": lambda f: _generate(f, "partial"),
    "EvalInputError": lambda f: _eval(f, f["root"] / "nothing"),
    "ExtractorError": lambda f: _eval(f, f["gen"], "--features", "bogus"),
    "ExportError": lambda f: _eval(f, f["gen"], "--features", f"clip:{f['other']}"),
    "MetricError": lambda f: _eval(
        f, f["gen"], "--features", "random", "--metrics", "fid", "--out", str(f["root"] / "eval")
    ),
    "EmojiDatasetError": lambda f: ["data", "emoji", str(f["notempty"])],
    "UnknownLoraError": lambda f: ["generate", "a <lora:missing:1>", "--model", str(f["tiny"]), "--steps",
                                   "1", "--out", str(f["root"] / "out"), "--lora-dir", str(f["gen"])],
    "LoraFamilyError": lambda f: ["generate", "a <lora:sd15:1>", "--model", str(f["tiny"]), "--steps", "1",
                                  "--out", str(f["root"] / "out"), "--lora-dir", str(_sd15_lora(f))],
    "BackendError": lambda f: _generate(f, "tiny", "--backend", "openvino", "--int8"),
    "MergeMismatchError": lambda f: [
        "merge", str(f["tiny"]), str(f["sd2"]), "-o", str(f["root"] / "merged.safetensors")
    ],
}  # fmt: skip


def test_every_error_class_has_a_cli_case():
    missing = all_error_classes() - BASES - set(CASES) - set(TRAINING)
    assert not missing, f"error classes never run through the CLI: {sorted(missing)}"
    training = (Path(__file__).parent / "test_train_cli_errors.py").read_text(encoding="utf-8")
    assert all(f"def {name}(" in training for name in TRAINING.values())


@pytest.mark.parametrize("name", list(CASES))
def test_error_is_one_line_and_exit_2(name, files, capsys):
    argv = CASES[name](files)
    assert main(argv) == 2
    err = capsys.readouterr().err
    progress = re.compile(r"(\d+|\?)(step|img|it)/s|s/(step|img|it)\b")  # tqdm bars, fast or slow
    lines = [
        line for line in err.replace("\r", "\n").splitlines() if line.strip() and not progress.search(line)
    ]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert not (files["root"] / "ran").exists()  # the pickle payload never ran
    assert (files["notempty"] / "mine.txt").read_text() == "keep me"
    assert not list((files["root"] / "out").glob("*.png")) if (files["root"] / "out").exists() else True
