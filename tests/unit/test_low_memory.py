"""Low-memory mode (`load(low_memory=True)`, models/residency.py): the same images bit for bit as the normal
mode, only the running network's pages resident, and the combinations it cannot serve refused."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from latentforge.backends import BackendError
from latentforge.checkpoints.lora_writing import kohya_targets, save_kohya_lora
from latentforge.cli import main
from latentforge.errors import ParameterError
from latentforge.model import StableDiffusion, load, swap_vae, use_vae
from latentforge.models.families import TINY
from latentforge.pipelines.request import GenerationRequest, Hires, InitImage
from latentforge.pipelines.runner import run
from references import random_lora_factors

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="madvise and /proc/self/smaps: Linux")
pytestmark = linux_only

REQUEST = GenerationRequest(
    prompt="a red apple", negative_prompt="blurry", steps=3, seed=5, width=32, height=32
)


def _pixels(model: StableDiffusion, request: GenerationRequest) -> list[np.ndarray]:
    return [np.asarray(result.image) for result in run(model, request, progress=False)]


def _same_images(a: StableDiffusion, b: StableDiffusion, request: GenerationRequest) -> None:
    got, expected = _pixels(a, request), _pixels(b, request)
    assert len(got) == len(expected) > 0
    assert all(np.array_equal(x, y) for x, y in zip(got, expected, strict=True))


def _in_store(model: StableDiffusion) -> bool:
    assert model.residency is not None
    tensors = [t for m in model.modules() for t in [*m.parameters(), *m.buffers()]]
    return all(model.residency._locate(t) is not None for t in tensors if t.numel())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_txt2img_img2img_and_hires_are_bit_identical(tiny_checkpoint, dtype):
    normal = load(tiny_checkpoint, dtype=dtype, compute_hash=False)
    low = load(tiny_checkpoint, dtype=dtype, compute_hash=False, low_memory=True)
    assert _in_store(low) and normal.residency is None
    for key, tensor in normal.unet.state_dict().items():  # the weights themselves, and their dtype
        assert torch.equal(low.unet.state_dict()[key], tensor) and low.unet.state_dict()[key].dtype == dtype
    _same_images(low, normal, REQUEST)
    init = _pixels(normal, replace(REQUEST, seed=9))[0]
    from PIL import Image

    img2img = replace(REQUEST, init=InitImage(images=(Image.fromarray(init),), denoising_strength=0.6))
    _same_images(low, normal, img2img)
    _same_images(low, normal, replace(REQUEST, hires=Hires(scale=1.5, steps=2, denoising_strength=0.5)))


def test_int8_is_bit_identical(tiny_checkpoint):
    normal = load(tiny_checkpoint, dtype=torch.bfloat16, compute_hash=False, int8=True)
    low = load(tiny_checkpoint, dtype=torch.bfloat16, compute_hash=False, int8=True, low_memory=True)
    assert _in_store(low)
    assert any(b.dtype == torch.int8 for b in low.unet.buffers()) or any(
        p.dtype == torch.int8 for p in low.unet.parameters()
    )
    _same_images(low, normal, REQUEST)


def test_lora_writes_into_the_mapping_and_undo_restores_every_bit(tiny_checkpoint, tmp_path):
    path = save_kohya_lora(
        tmp_path / "style.safetensors", random_lora_factors(TINY, kohya_targets(TINY), seed=3), TINY
    )
    normal = load(tiny_checkpoint, compute_hash=False)
    low = load(tiny_checkpoint, compute_hash=False, low_memory=True)
    before = {k: v.clone() for m in low.modules() for k, v in m.state_dict().items()}
    with normal.lora(path, 0.8), low.lora(path, 0.8):
        assert _in_store(low)  # patched in place: still the mapping's pages
        now = {k: v for m in low.modules() for k, v in m.state_dict().items()}
        assert any(not torch.equal(v, before[k]) for k, v in now.items())  # the LoRA did something
        _same_images(low, normal, REQUEST)
    after = {k: v for m in low.modules() for k, v in m.state_dict().items()}
    assert all(torch.equal(after[k], v) for k, v in before.items())
    _same_images(low, normal, REQUEST)


def test_a_swapped_vae_is_placed_too(tiny_checkpoint, tmp_path):
    torch.manual_seed(7)
    other = StableDiffusion.from_family(TINY).vae.state_dict()
    vae_file = tmp_path / "other.vae.safetensors"
    save_file({f"first_stage_model.{k}": v for k, v in other.items()}, str(vae_file))
    normal = load(tiny_checkpoint, compute_hash=False, vae=vae_file)
    low = load(tiny_checkpoint, compute_hash=False, low_memory=True)
    own = low.vae
    swap_vae(low, vae_file, compute_hash=False)
    assert _in_store(low) and low.vae is not own
    _same_images(low, normal, REQUEST)
    use_vae(low, own, None, None)  # the server's VAE picker going back to the checkpoint's own
    assert _in_store(low) and low.vae_name is None
    _same_images(low, load(tiny_checkpoint, compute_hash=False), REQUEST)


def _mapping_rss_kib(address: int) -> int:
    """Rss of the /proc/self/smaps entry whose address range holds `address`."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start <= address < end
        elif inside and line.startswith("Rss:"):
            return int(line.split()[1])
    raise AssertionError(f"no mapping holds {address:#x}")


def test_only_the_running_networks_pages_are_resident(tiny_checkpoint):
    low = load(tiny_checkpoint, compute_hash=False, low_memory=True)
    residency = low.residency
    assert residency is not None
    chunks = {id(c): c for ranges in residency.ranges.values() for c, _, _ in ranges}
    assert len(chunks) == 1  # a tiny model: one chunk of the loading file holds every network
    (chunk,) = chunks.values()

    def group_kib(group: str) -> int:
        return sum(length for _, _, length in residency.ranges[group]) // 1024

    unet = [g for g in residency.ranges if g.startswith("unet.")]  # the U-Net, block by block
    assert {"unet.input_blocks.0", "unet.middle_block", "unet.out"} <= set(unet)
    total = sum(group_kib(g) for g in residency.ranges)
    assert total == sum(group_kib(g) for g in ("text", "vae", *unet))
    assert _mapping_rss_kib(chunk.base) == 0  # load releases what it wrote: nothing resident yet
    for module in low.modules():  # read every weight: all pages fault in
        for tensor in [*module.parameters(), *module.buffers()]:
            tensor.float().sum()
    assert _mapping_rss_kib(chunk.base) == total
    residency.use("unet.middle_block")
    assert _mapping_rss_kib(chunk.base) == group_kib("unet.middle_block")
    run(low, REQUEST, progress=False)  # text encoder -> U-Net -> VAE: the VAE ran last
    assert residency.active == "vae"
    # a fault may map a few cached neighbour pages of the next group too (the kernel's fault-around, 64 KiB,
    # or a large folio): slack for the two boundaries of the VAE's range; without releasing: all 14 MiB
    slack = 256
    assert total > group_kib("vae") + 4 * slack
    assert 0 < _mapping_rss_kib(chunk.base) <= group_kib("vae") + slack


def test_refused_combinations(tiny_checkpoint):
    with pytest.raises(BackendError, match="low-memory"):
        load(tiny_checkpoint, low_memory=True, backend="openvino")
    with pytest.raises(ParameterError, match="CPU only"):
        load(tiny_checkpoint, low_memory=True, device="cuda")


def test_cli_refusal_is_one_line(tiny_checkpoint, tmp_path, capsys):
    argv = ["generate", "x", "--model", str(tiny_checkpoint), "--steps", "1", "--out", str(tmp_path / "out")]
    assert main([*argv, "--low-memory", "--backend", "openvino"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: low-memory mode"), err
    assert not list((tmp_path / "out").glob("*.png")) if (tmp_path / "out").exists() else True


def test_cli_low_memory_generates_the_same_image(tiny_checkpoint, tmp_path):
    common = ["generate", "x", "--model", str(tiny_checkpoint), "--steps", "2", "--size", "32x32"]
    common += ["--seed", "3"]
    assert main([*common, "--out", str(tmp_path / "a")]) == 0
    assert main([*common, "--out", str(tmp_path / "b"), "--low-memory"]) == 0
    a, b = sorted((tmp_path / "a").glob("*.png")), sorted((tmp_path / "b").glob("*.png"))
    assert len(a) == len(b) == 1
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(a[0])), np.asarray(Image.open(b[0])))
    assert Image.open(a[0]).info["parameters"] == Image.open(b[0]).info["parameters"]  # no infotext key


def test_switches_per_image_and_heap_trims_only_between_networks(tiny_checkpoint, monkeypatch):
    from latentforge.models import residency as residency_module

    low = load(tiny_checkpoint, compute_hash=False, low_memory=True)
    assert low.residency is not None
    used: list[str] = []
    trims: list[str] = []
    use = low.residency.use
    monkeypatch.setattr(low.residency, "use", lambda group: (used.append(group), use(group))[-1])
    monkeypatch.setattr(residency_module, "_trim_heap", lambda: trims.append(used[-1]))
    run(low, REQUEST, progress=False)
    networks = [g.split(".")[0] for g in used]
    assert [n for i, n in enumerate(networks) if i == 0 or n != networks[i - 1]] == ["text", "unet", "vae"]
    assert trims == [used[0], next(g for g in used if g.startswith("unet")), "vae"]


def test_the_server_loads_its_models_in_low_memory_mode(tiny_checkpoint):
    pytest.importorskip("fastapi")
    from latentforge.server.jobs import Catalog

    assert Catalog(None, tiny_checkpoint, low_memory=True).model().residency is not None
    assert Catalog(None, tiny_checkpoint).model().residency is None


def test_a_ckpt_loads_into_the_mapping_too(tiny_checkpoint, tmp_path):
    from latentforge.checkpoints.reading import read_state_dict

    state_dict, _ = read_state_dict(tiny_checkpoint)
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": state_dict}, ckpt)
    normal = load(tiny_checkpoint, dtype=torch.bfloat16, compute_hash=False)
    low = load(ckpt, dtype=torch.bfloat16, compute_hash=False, low_memory=True)
    assert _in_store(low)
    for a, b in zip(normal.modules(), low.modules(), strict=True):
        expected, got = a.state_dict(), b.state_dict()
        assert all(torch.equal(got[k], v) and got[k].dtype == v.dtype for k, v in expected.items())


def test_a_diffusers_folder_is_copied_into_the_mapping(tiny_checkpoint, tmp_path):
    from latentforge.checkpoints.diffusers_folder import save_diffusers_folder

    normal = load(tiny_checkpoint, compute_hash=False)
    parts = (normal.unet.state_dict(), normal.vae.state_dict(), normal.text_encoder.state_dict())
    folder = save_diffusers_folder(tmp_path / "tiny", *parts, TINY)
    low = load(folder, compute_hash=False, low_memory=True)
    assert _in_store(low)  # placed after the load: each network in a file of its own group's
    assert low.residency is not None and {"text", "vae"} <= set(low.residency.own_files)
    _same_images(low, normal, REQUEST)


def test_an_unwritable_cache_folder_is_one_error_line(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # the backing file's folder cannot be made
    argv = ["generate", "x", "--model", str(tiny_checkpoint), "--steps", "1", "--out", str(tmp_path / "out")]
    assert main([*argv, "--low-memory"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: low-memory mode cannot write its weights file"), err
    assert "XDG_CACHE_HOME" in err[0] and blocker.read_text() == "not a folder"
