"""scripts/export_checkpoint.py (a checkpoint of a run exported as the run's own final export) and
scripts/ledger_rows.py (the card's ledger row of a run)."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from latentforge.training.loop import run_training

ROOT = Path(__file__).resolve().parents[2]
CONFIG = """
task = "vae"
max_steps = 4
batch_size = 4
lr = 1e-3
ema_decay = 0.9
checkpoint_every = 2
keep_checkpoints = 0
device = "cpu"
[task_options]
resolution = 16
synthetic_items = 8
max_holdout_items = 4
[task_options.vae]
ch = 8
ch_mult = [1, 2]
norm_groups = 4
"""


def _script(name: str = "export_checkpoint"):  # noqa: ANN202 (a module)
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_the_last_checkpoint_exports_as_the_final_file(tmp_path: Path) -> None:
    config = tmp_path / "vae.toml"
    config.write_text(CONFIG)
    final = run_training("vae", config, [f"run_dir={tmp_path / 'run'}"])
    script = _script()
    result = script.export_checkpoint(tmp_path / "run", None, None, evaluate=True)
    assert result["step"] == 4 and set(result["eval"]) >= {"psnr", "ssim", "l1"}
    expected, exported = load_file(final), load_file(result["export"])
    assert expected.keys() == exported.keys()
    assert all(torch.equal(expected[k], exported[k]) for k in expected)
    earlier = load_file(
        script.export_checkpoint(tmp_path / "run", 2, tmp_path / "s2.safetensors", False)["export"]
    )
    assert not torch.equal(earlier["decoder.conv_out.weight"], expected["decoder.conv_out.weight"])
    with pytest.raises(SystemExit, match="no checkpoint of step 3"):
        script.export_checkpoint(tmp_path / "run", 3, None, False)


def test_ledger_row_of_a_run(tmp_path: Path) -> None:
    config = tmp_path / "vae.toml"
    config.write_text(CONFIG)
    run_training("vae", config, [f"run_dir={tmp_path / 'run'}", "eval_every=2", "log_every=1"])
    row = _script("ledger_rows").ledger_row(tmp_path / "run", threads=2, since=2, machine="test cpu")
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:4] == ["vae", str(tmp_path / "run"), "2 -> 4 of 4"]
    assert float(cells[4]) >= 0 and cells[5].startswith("step 4: PSNR ") and "SSIM" in cells[5]
    assert cells[6] == "test cpu"


def test_a_decoder_fine_tune_is_swapped_in_only_over_the_same_encoder(tmp_path: Path) -> None:
    """`export_checkpoint.py --vae` / `ship_default_model.py --vae`: a VAE file or another model holding one;
    refused when its encoder differs (the U-Net's latents would change)."""
    from latentforge.checkpoints.single_file import save_single_file
    from latentforge.model import StableDiffusion, load
    from latentforge.models.families import TINY

    def save(bundle: StableDiffusion, path: Path) -> Path:
        sd = (bundle.unet.state_dict(), bundle.vae.state_dict(), bundle.text_encoder.state_dict())
        save_single_file(path, *sd, bundle.family, dtype=torch.float16)
        return path

    torch.manual_seed(0)
    base = StableDiffusion.from_family(TINY)
    tuned = StableDiffusion.from_family(TINY)  # the same encoder, another decoder
    tuned.vae.load_state_dict(
        {k: v for k, v in base.vae.state_dict().items() if k.startswith(("encoder.", "quant_conv."))},
        strict=False,
    )
    swap = _script("ship_default_model").swap_fine_tuned_vae
    target = save(base, tmp_path / "export.safetensors")
    swap(target, save(tuned, tmp_path / "tuned.safetensors"))
    swapped = load(target, compute_hash=False)
    for key, value in tuned.vae.state_dict().items():
        assert torch.equal(swapped.vae.state_dict()[key], value.half().float()), key
    for key, value in base.unet.state_dict().items():
        assert torch.equal(swapped.unet.state_dict()[key], value.half().float()), key
    with pytest.raises(SystemExit, match="its encoder differs"):
        swap(target, save(StableDiffusion.from_family(TINY), tmp_path / "other.safetensors"))
