"""The original CompVis/Lightning `.ckpt` layout loads through an allow-list of inert stand-ins, anything
else in a pickle is still refused unrun, and loaded tensors never stay backed by the file (issue 19)."""

import os
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest
import torch

from latentforge.checkpoints.errors import UnsafeCheckpointError
from latentforge.checkpoints.reading import LIGHTNING_SAFE_GLOBALS, InertObject, read_state_dict


def _lightning_modules() -> dict[str, types.ModuleType]:
    """`pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint` as a stand-in, only for pickling."""
    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        def __init__(self) -> None:
            self.monitor, self.best_model_path = None, "/fsx/stable-diffusion/checkpoints/last.ckpt"

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = module.__name__, "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint  # type: ignore[attr-defined]
    return {
        "pytorch_lightning": types.ModuleType("pytorch_lightning"),
        "pytorch_lightning.callbacks": types.ModuleType("pytorch_lightning.callbacks"),
        module.__name__: module,
    }


def _write_lightning_ckpt(path, state_dict, monkeypatch) -> None:
    """A checkpoint shaped like sd-v1-4.ckpt: Lightning's keys, its callback class and numpy scalars."""
    with monkeypatch.context() as patch:
        for name, module in _lightning_modules().items():
            patch.setitem(sys.modules, name, module)
        checkpoint_cls = sys.modules["pytorch_lightning.callbacks.model_checkpoint"].ModelCheckpoint
        torch.save(
            {
                "epoch": 6,
                "global_step": 470000,
                "pytorch-lightning_version": "1.4.2",
                # Lightning 1.4 keys callback states by the callback's class
                "callbacks": {
                    checkpoint_cls: {
                        "best_model_score": np.float64(0.125),
                        "current_score": np.float32(0.25),
                        "instance": checkpoint_cls(),
                    }
                },
                "state_dict": state_dict,
            },
            path,
        )
    assert "pytorch_lightning" not in sys.modules  # nothing of the stand-ins is left for the loader


def test_original_lightning_ckpt_loads(tmp_path, monkeypatch):
    state_dict = {"model.diffusion_model.w": torch.randn(3, 4), "first_stage_model.b": torch.arange(5)}
    path = tmp_path / "sd-v1-4.ckpt"
    _write_lightning_ckpt(path, state_dict, monkeypatch)
    raw = path.read_bytes()
    for name in (b"pytorch_lightning.callbacks.model_checkpoint", b"numpy.core.multiarray", b"numpy\ndtype"):
        assert name in raw  # the file really references the globals plain weights_only refuses
    with pytest.raises(Exception, match="Unsupported global"):
        torch.load(path, weights_only=True)
    allowed_before = list(torch.serialization.get_safe_globals())
    tensors, metadata = read_state_dict(path)
    assert metadata == {} and tensors.keys() == state_dict.keys()
    for key, value in state_dict.items():
        assert torch.equal(tensors[key], value)
    # the allow-list does not outlive the load (compared by our entries: torch may register its own safe
    # globals when a lazily imported module such as torch._dynamo first loads during the read)
    after = torch.serialization.get_safe_globals()
    assert all(entry not in after for entry in LIGHTNING_SAFE_GLOBALS if entry not in allowed_before)
    assert all(entry in after for entry in allowed_before)


def test_stand_ins_are_inert():
    obj = InertObject("anything", 1)
    obj.__setstate__({"__class__": "ignored"})
    assert obj.args == ("anything", 1) and type(obj) is InertObject


class _RunsAShellCommand:
    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _CallsAnAllowedNameWithPayload:
    """A pickle that reaches for `eval` beside the allowed Lightning names: still refused."""

    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))


@pytest.mark.parametrize("payload", ["os.system", "eval"])
def test_anything_outside_the_allow_list_is_refused_unrun(tmp_path, monkeypatch, payload):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    evil = _RunsAShellCommand(marker) if payload == "os.system" else _CallsAnAllowedNameWithPayload()
    _write_lightning_ckpt(path, {"w": torch.zeros(2), "payload": evil}, monkeypatch)  # type: ignore[dict-item]
    with pytest.raises(UnsafeCheckpointError, match="evil.ckpt: the pickle asks for more than tensors"):
        read_state_dict(path)
    assert not marker.exists()


def _save_plain(path, legacy: bool) -> dict[str, torch.Tensor]:
    state_dict = {"w": torch.linspace(-2, 2, 1 << 20), "i": torch.arange(4096)}
    torch.save({"state_dict": state_dict}, path, _use_new_zipfile_serialization=not legacy)
    return state_dict


def test_tensors_survive_the_file_being_truncated(tmp_path):
    """A `.ckpt` is memory-mapped while loading; after `read_state_dict` the file may change on disk
    (here: truncated to 0 bytes) and the tensors are still usable. Run in one child for all cases (zip
    and legacy pickle, kept and cast dtype): SIGBUS would kill it."""
    cases, expected = [], []
    for legacy in (False, True):
        for dtype in (None, torch.float16):
            path = tmp_path / f"model-{legacy}-{dtype}.ckpt"
            state_dict = _save_plain(path, legacy)
            cast = {k: v.to(dtype) if dtype and v.is_floating_point() else v for k, v in state_dict.items()}
            cases.append((str(path), str(dtype).removeprefix("torch.") if dtype else None))
            expected.append([float(cast[k].double().abs().sum()) for k in ("w", "i")])
    script = textwrap.dedent(f"""
        import os, torch
        from latentforge.checkpoints.reading import read_state_dict
        sums = []
        for path, dtype in {cases!r}:
            tensors, _ = read_state_dict(path, dtype=getattr(torch, dtype) if dtype else None)
            os.truncate(path, 0)
            sums.append([float(tensors[k].double().abs().sum()) for k in ("w", "i")])
        print(repr(sums))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    assert eval(done.stdout) == expected


def test_latentforge_load_reads_a_lightning_ckpt_of_a_whole_model(tmp_path, monkeypatch):
    from latentforge.checkpoints.single_file import to_single_file_state_dict
    from latentforge.model import StableDiffusion, load
    from latentforge.models.families import TINY

    model = StableDiffusion.from_family(TINY)
    parts = (model.unet.state_dict(), model.vae.state_dict(), model.text_encoder.state_dict())
    state_dict = to_single_file_state_dict(*parts, TINY)
    state_dict["model_ema.decay"] = torch.tensor(0.9999)  # as in sd-v1-4.ckpt: skipped, never an error
    path = tmp_path / "tiny.ckpt"
    _write_lightning_ckpt(path, state_dict, monkeypatch)
    loaded = load(path)
    assert loaded.family == TINY and loaded.short_hash is not None
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(loaded, name).state_dict(), getattr(model, name).state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), name
