"""X/Y/Z plots and batch grids: axis parsing, one request per cell with a shared seed, files written."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from latentforge.cli import main
from latentforge.errors import ParameterError
from latentforge.pipelines.infotext import read_infotext
from latentforge.pipelines.request import GenerationRequest, Hires
from latentforge.pipelines.xyz import Axis, cells, parse_axis


def test_axes_parse_to_the_fields_types():
    assert parse_axis("steps=10, 20,30") == Axis("steps", (10, 20, 30))
    assert parse_axis('sampler="Euler a","DPM++ 2M Karras"') == Axis(
        "sampler", ("Euler a", "DPM++ 2M Karras")
    )
    assert parse_axis("cfg_scale=3,7.5") == Axis("cfg_scale", (3.0, 7.5))
    assert parse_axis("hires.scale=1.5,2") == Axis("hires.scale", (1.5, 2.0))
    assert parse_axis("sampler_options.s_noise=1,1.003") == Axis("sampler_options.s_noise", (1.0, 1.003))
    assert parse_axis("tiled_vae=true,false") == Axis("tiled_vae", (True, False))
    with pytest.raises(ParameterError, match="FIELD one of .*cfg_scale.*hires.scale"):
        parse_axis("bogus=1,2")
    with pytest.raises(ParameterError, match="axis steps: 'ten' is not a int"):
        parse_axis("steps=ten")


def test_cells_share_one_seed_and_vary_x_fastest():
    base = GenerationRequest(prompt="x", seed=-1)
    axes = [parse_axis("steps=1,2"), parse_axis("cfg_scale=3,5"), parse_axis("hires.scale=1.5,2")]
    got = list(cells(base, axes))
    assert [index for index, _ in got][:3] == [(0, 0, 0), (1, 0, 0), (0, 1, 0)] and len(got) == 8
    assert len({request.seed for _, request in got}) == 1 and got[0][1].seed != -1
    assert got[7][1].steps == 2 and got[7][1].cfg_scale == 5 and got[7][1].hires == Hires(scale=2.0)


def generate_argv(checkpoint: Path, out: Path) -> list[str]:
    return ["generate", "a cat", "--model", str(checkpoint), "--size", "32x32", "--out", str(out)]


def test_cli_writes_every_cell_and_a_labelled_grid(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    argv = generate_argv(tiny_checkpoint, out)
    assert main([*argv, "--seed", "3", "--x", "steps=1,2", "--y", "sampler=Euler,Euler a"]) == 0
    cells_written = sorted(out.glob("0*.png"))
    grids = sorted(out.glob("xyz-*.png"))
    assert len(cells_written) == 4 and len(grids) == 1
    assert ["Steps: 1" in (read_infotext(p) or "") for p in cells_written] == [True, False, True, False]
    assert all("Seed: 3" in (read_infotext(p) or "") for p in cells_written)
    grid = Image.open(grids[0])
    assert grid.width > 2 * 32 and grid.height > 2 * 32  # two cells each way plus label bands


def test_a_batch_writes_a_grid_and_never_overwrites(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    argv = [*generate_argv(tiny_checkpoint, out), "--steps", "1"]
    assert main([*argv, "--seed", "1", "--batch-size", "2", "--batch-count", "2", "--format", "webp"]) == 0
    assert len(list(out.glob("0*.webp"))) == 4 and [p.name for p in out.glob("grid-*")] == ["grid-00000.webp"]
    first = sorted(out.glob("0*.webp"))[0]
    before = first.read_bytes()
    first.with_name("00002-3.webp").unlink()  # a deleted image: its number is not reused
    assert main([*argv, "--seed", "7", "--format", "webp"]) == 0
    assert first.read_bytes() == before
    names = sorted(p.name for p in out.glob("0*.webp"))
    assert names[-1] == "00004-7.webp" and len(names) == 4
