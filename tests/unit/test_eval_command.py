"""`latentforge eval` end to end on tiny random models and tiny image sets (32x32, a few dozen images)."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from latentforge.checkpoints.exports import save_clip
from latentforge.cli import main
from latentforge.evaluation import metrics as m
from latentforge.evaluation.evaluate import MetricSettings, compute_features, evaluate
from latentforge.evaluation.extractors import EvalExtractor
from latentforge.evaluation.features import RandomProjectionExtractor
from latentforge.evaluation.inception import random_fid_inception
from latentforge.evaluation.report import write_sweep_report
from latentforge.evaluation.resize import DEFAULT_RESIZE_MODE
from latentforge.evaluation.runs import parse_seeds, parse_sweep, read_prompts
from latentforge.models.clip import CLIPConfig, CLIPModel
from latentforge.pipelines.infotext import parse_infotext, read_infotext


def _write_images(
    folder: Path, count: int, seed: int, size: tuple[int, int] = (32, 32), caption: str = ""
) -> Path:
    """`count` random RGB PNGs (smooth blobs plus noise) with optional same-stem captions."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize(size, Image.Resampling.BILINEAR)
        noisy = np.clip(np.asarray(image, np.int16) + rng.integers(-20, 21, (size[1], size[0], 3)), 0, 255)
        Image.fromarray(noisy.astype(np.uint8)).save(folder / f"{i:03d}.png")
        if caption:
            (folder / f"{i:03d}.txt").write_text(f"{caption} {i % 3}")
    return folder


def _run(*argv: str) -> int:
    return main(["eval", *map(str, argv)])


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip") / "clip.safetensors"
    save_clip(CLIPModel(CLIPConfig()), path)  # image size 32, 32-d embeddings
    return path


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def test_fid_of_a_set_against_itself_is_zero_through_the_command(tmp_path: Path) -> None:
    images = _write_images(tmp_path / "a", 24, seed=0)
    other = _write_images(tmp_path / "b", 24, seed=1)
    assert (
        _run(
            "--generated",
            images,
            "--reference",
            images,
            "--features",
            "random",
            "--out",
            tmp_path / "same",
            "--no-cache",
        )
        == 0
    )
    same = _metrics(tmp_path / "same")
    assert abs(same["values"]["fid"]) < 1e-6
    assert same["values"]["precision"] == 1.0 and same["values"]["recall"] == 1.0
    assert (
        _run(
            "--generated",
            other,
            "--reference",
            images,
            "--features",
            "random",
            "--out",
            tmp_path / "diff",
            "--no-cache",
        )
        == 0
    )
    assert _metrics(tmp_path / "diff")["values"]["fid"] > 1e-3  # the same path does tell sets apart


def test_reference_features_are_cached_and_rekeyed_when_files_change(tmp_path: Path, monkeypatch) -> None:
    generated = _write_images(tmp_path / "gen", 12, seed=0)
    reference = _write_images(tmp_path / "ref", 20, seed=1)
    seen: list[int] = []
    original = RandomProjectionExtractor.__call__

    def counting(self, images: torch.Tensor) -> torch.Tensor:
        seen.append(len(images))
        return original(self, images)

    monkeypatch.setattr(RandomProjectionExtractor, "__call__", counting)
    args = [
        "--generated",
        generated,
        "--reference",
        reference,
        "--features",
        "random",
        "--cache-dir",
        tmp_path / "cache",
    ]
    assert _run(*args, "--out", tmp_path / "first") == 0
    assert sum(seen) == 32
    seen.clear()
    assert _run(*args, "--out", tmp_path / "second") == 0
    assert sum(seen) == 12  # only the generated images went through the network
    first, second = _metrics(tmp_path / "first"), _metrics(tmp_path / "second")
    assert (first["counts"]["reference"]["cache"], second["counts"]["reference"]["cache"]) == ("miss", "hit")
    assert second["values"] == first["values"]
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1

    stat = (reference / "000.png").stat()  # a changed mtime is a changed file list: new key, recomputed
    os.utime(reference / "000.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    seen.clear()
    assert _run(*args, "--out", tmp_path / "third") == 0
    assert sum(seen) == 32 and _metrics(tmp_path / "third")["counts"]["reference"]["cache"] == "miss"

    # the resize mode is part of the key: another mode recomputes, and says so in metrics.json and the report
    for mode in ("legacy-pytorch", "legacy-pytorch"):
        assert _run(*args, "--resize-mode", mode, "--out", tmp_path / mode) == 0
    pytorch = _metrics(tmp_path / "legacy-pytorch")
    assert (
        pytorch["counts"]["reference"]["cache"] == "hit"
        and len(list((tmp_path / "cache").glob("*.npz"))) == 3
    )
    assert (pytorch["extractor"]["resize_mode"], first["extractor"]["resize_mode"]) == (
        "legacy-pytorch",
        "legacy-tensorflow",
    )
    assert pytorch["extractor"]["resize_rule"] == "whole-image-legacy-pytorch-32"
    assert pytorch["extractor"]["preprocess_id"].startswith("legacy-pytorch-32-")
    report = (tmp_path / "legacy-pytorch" / "report.md").read_text()
    assert "Resize mode: `legacy-pytorch` (reproduces pytorch-fid" in report


def test_unreadable_images_are_skipped_and_counted(tmp_path: Path, capsys) -> None:
    generated = _write_images(tmp_path / "gen", 10, seed=0)
    reference = _write_images(tmp_path / "ref", 10, seed=1)
    (generated / "garbage.png").write_bytes(b"not an image at all")
    whole = (reference / "000.png").read_bytes()
    (reference / "truncated.png").write_bytes(whole[: len(whole) // 2])
    assert (
        _run(
            "--generated",
            generated,
            "--reference",
            reference,
            "--features",
            "random",
            "--out",
            tmp_path / "out",
            "--no-cache",
        )
        == 0
    )
    counts = _metrics(tmp_path / "out")["counts"]
    assert (counts["generated"]["found"], counts["generated"]["used"], counts["generated"]["unreadable"]) == (
        11,
        10,
        1,
    )
    assert (counts["reference"]["found"], counts["reference"]["used"], counts["reference"]["unreadable"]) == (
        11,
        10,
        1,
    )
    assert counts["generated"]["skipped"][0]["image"].endswith("garbage.png")
    assert "truncated" in counts["reference"]["skipped"][0]["reason"]
    assert "skipped 1 unreadable" in capsys.readouterr().err
    assert "garbage.png" in (tmp_path / "out" / "report.md").read_text()


def test_too_few_images_names_the_number_needed_and_other_metrics_still_come_out(tmp_path: Path) -> None:
    generated = _write_images(tmp_path / "gen", 3, seed=0)
    reference = _write_images(tmp_path / "ref", 12, seed=1)
    assert (
        _run(
            "--generated",
            generated,
            "--reference",
            reference,
            "--features",
            "random",
            "--out",
            tmp_path / "out",
            "--no-cache",
        )
        == 0
    )
    result = _metrics(tmp_path / "out")
    pr = result["metrics"]["precision_recall"]
    assert (
        pr["status"] == "failed" and "at least 4 images" in pr["reason"] and "generated has 3" in pr["reason"]
    )
    assert result["metrics"]["fid"]["status"] == "ok" and result["metrics"]["kid"]["subset_size"] == 3
    assert {"fid", "kid"} <= set(result["values"]) and "precision" not in result["values"]
    assert "at least 4 images" in (tmp_path / "out" / "report.md").read_text()


def test_inception_gives_is_and_reports_each_shortfall(tmp_path: Path) -> None:
    """IS comes from the same Inception pass as the features; with 3 reference images only PR fails."""
    weights = tmp_path / "inception.pth"
    torch.save(random_fid_inception(seed=1).state_dict(), weights)
    generated = _write_images(tmp_path / "gen", 5, seed=0)
    reference = _write_images(tmp_path / "ref", 3, seed=1)
    settings = MetricSettings(is_splits=5)
    result, gen, _ = evaluate(
        generated, reference, extractor=f"inception:{weights}", progress=False, settings=settings
    )
    assert result["metrics"]["precision_recall"]["status"] == "failed"
    assert "reference has 3" in result["metrics"]["precision_recall"]["reason"]
    assert result["metrics"]["fid"]["status"] == "ok" and result["metrics"]["is"]["splits"] == 5
    assert result["values"]["is"] == pytest.approx(m.inception_score(gen.logits, splits=5)[0], rel=1e-9)
    assert result["metrics"]["clip_score"]["status"] == "skipped"
    # Whole images go to the network, which resizes them by the default mode (torch-fidelity's TF resize).
    assert result["extractor"]["resize_mode"] == DEFAULT_RESIZE_MODE == "legacy-tensorflow"
    images = [np.asarray(Image.open(generated / f"{i:03d}.png")) for i in range(3)]
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    expected = random_fid_inception(seed=1)(pixels, "legacy-tensorflow")
    np.testing.assert_allclose(gen.logits[:3], expected.logits_unbiased.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gen.features[:3], expected.pool3.numpy(), rtol=1e-4, atol=1e-4)


def test_evaluate_takes_pil_lists_and_captions(tmp_path: Path, clip_path: Path) -> None:
    folder = _write_images(tmp_path / "images", 6, seed=0)
    images = [Image.open(path).convert("RGB") for path in sorted(folder.glob("*.png"))]
    captions = [f"a picture {i}" for i in range(len(images))]
    result = evaluate(images, images, extractor=f"clip:{clip_path}", captions=captions, progress=False).result
    assert abs(result["values"]["fid"]) < 1e-6
    assert result["metrics"]["clip_score"]["captioned"] == len(images)
    assert result["counts"]["generated"]["skipped"] == [] and result["counts"]["reference"]["cache"] == "off"
    wrong = evaluate(images, images, extractor=f"clip:{clip_path}", captions=captions[:2], progress=False)[0]
    assert (
        wrong["metrics"]["clip_score"]["status"] == "failed"
        and "2 captions for 6" in wrong["metrics"]["clip_score"]["reason"]
    )
    assert wrong["metrics"]["fid"]["status"] == "ok"


def test_square_rule_without_resize_mode_centre_crops_and_bicubic_resizes(tmp_path: Path) -> None:
    """Extractors without a resize mode (CLIP, bare ones) get centre-cropped squares at their input size."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    stripes = np.zeros((32, 64, 3), np.uint8)  # 64 wide: red | blue centre square | green
    stripes[:, :16] = (255, 0, 0)
    stripes[:, 16:48] = (0, 0, 255)
    stripes[:, 48:] = (0, 255, 0)
    Image.fromarray(stripes).save(folder / "a_wide.png")
    rng = np.random.default_rng(0)
    big = Image.fromarray(rng.integers(0, 256, (80, 80, 3), dtype=np.uint8))
    big.save(folder / "b_big.png")
    tall = Image.fromarray(rng.integers(0, 256, (50, 40, 3), dtype=np.uint8))  # 40 wide, 50 high
    tall.save(folder / "c_tall.png")
    extractor = EvalExtractor(RandomProjectionExtractor(pool=4), input_size=16)
    got = compute_features(folder, extractor, progress=False).features

    def expected(array: np.ndarray) -> np.ndarray:
        image = torch.from_numpy(array.copy()).permute(2, 0, 1)[None]
        return extractor.image(image).numpy()[0]

    blue = np.zeros((16, 16, 3), np.uint8)
    blue[..., 2] = 255
    np.testing.assert_allclose(got[0], expected(blue), atol=1e-6)  # the stripes were cropped away
    np.testing.assert_allclose(
        got[1], expected(np.asarray(big.resize((16, 16), Image.Resampling.BICUBIC))), atol=1e-6
    )
    tall_square = np.asarray(tall)[5:45]  # rows (50 - 40) // 2 .. + 40
    resized = Image.fromarray(tall_square).resize((16, 16), Image.Resampling.BICUBIC)
    np.testing.assert_allclose(got[2], expected(np.asarray(resized)), atol=1e-6)


def test_generation_spec_writes_images_json_and_report(
    tmp_path: Path, tiny_checkpoint: Path, clip_path: Path
) -> None:
    reference = _write_images(tmp_path / "ref", 8, seed=1, caption="a cat")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# comment\na red circle\n\na blue square\n")
    out = tmp_path / "out"
    code = _run(
        "--model", tiny_checkpoint, "--prompts", prompts, "--seeds", "3-5", "--steps", "2", "--cfg", "3",
        "--size", "32x32", "--reference", reference, "--features", f"clip:{clip_path}", "--out", out,
        "--no-cache",
    )  # fmt: skip
    assert code == 0
    images = sorted((out / "images").glob("*.png"))
    assert [p.name for p in images] == [
        "00000-3.png",
        "00001-4.png",
        "00002-5.png",
        "00003-3.png",
        "00004-4.png",
        "00005-5.png",
    ]
    prompt, _, values = parse_infotext(read_infotext(images[4]))
    assert (prompt, values["Seed"], values["CFG scale"], values["Steps"]) == ("a blue square", "4", "3", "2")
    assert images[4].with_suffix(".txt").read_text().strip() == "a blue square"
    result = _metrics(out)
    assert set(result) >= {"metrics", "values", "counts", "extractor", "settings", "generation"}
    assert (
        result["metrics"]["clip_score"]["status"] == "ok"
        and result["metrics"]["clip_score"]["captioned"] == 6
    )
    assert result["metrics"]["is"]["status"] == "skipped"
    assert result["generation"]["seeds"] == "3-5" and result["generation"]["params"]["cfg_scale"] == 3.0
    assert result["extractor"]["input_size"] == 32 and result["extractor"]["spec"] == f"clip:{clip_path}"
    report = (out / "report.md").read_text()
    for text in (
        "| FID |",
        "| CLIP score |",
        "| generated | 6 | 6 | 0 |",
        "| reference | 8 | 8 | 0 |",
        "samples.png",
        "centre-square-PIL-bicubic-32",
    ):
        assert text in report
    assert Image.open(out / "samples.png").size[1] == 2 * (96 + 4)
    # a second run refuses to mix with the first run's images unless told to replace them
    assert (
        _run(
            "--model",
            tiny_checkpoint,
            "--prompts",
            prompts,
            "--reference",
            reference,
            "--features",
            "random",
            "--out",
            out,
        )
        == 2
    )
    # and the generated folder can be evaluated again on its own, captions read from the .txt files
    assert (
        _run(
            "--generated",
            out / "images",
            "--reference",
            reference,
            "--features",
            f"clip:{clip_path}",
            "--out",
            tmp_path / "again",
            "--no-cache",
        )
        == 0
    )
    again = _metrics(tmp_path / "again")
    assert again["values"]["clip_score"] == pytest.approx(result["values"]["clip_score"], rel=1e-6)
    assert again["values"]["fid"] == pytest.approx(result["values"]["fid"], rel=1e-6)
    # captions from a prompts file instead (one per image, sorted order): other captions, another score
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(["a green triangle"] * 6))
    code = _run(
        "--generated", out / "images", "--prompts", captions, "--reference", reference,
        "--features", f"clip:{clip_path}", "--out", tmp_path / "captioned", "--no-cache",
    )  # fmt: skip
    assert code == 0
    captioned = _metrics(tmp_path / "captioned")["values"]["clip_score"]
    assert captioned != pytest.approx(result["values"]["clip_score"], rel=1e-6)


def test_cfg_sweep_writes_the_plot_and_one_row_per_value(
    tmp_path: Path, tiny_checkpoint: Path, clip_path: Path
) -> None:
    pytest.importorskip("matplotlib")
    reference = _write_images(tmp_path / "ref", 8, seed=1)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    out = tmp_path / "sweep"
    code = _run(
        "--model", tiny_checkpoint, "--prompts", prompts, "--seeds", "0-3", "--steps", "2", "--size", "32x32",
        "--sweep", "cfg=1,3,7.5", "--reference", reference, "--features", f"clip:{clip_path}", "--out", out,
        "--cache-dir", tmp_path / "cache",
    )  # fmt: skip
    assert code == 0
    document = _metrics(out)
    rows = document["sweep"]["rows"]
    assert [row["cfg"] for row in rows] == [1.0, 3.0, 7.5]
    assert all({"fid", "clip_score", "precision"} <= set(row) and row["images"] == 8 for row in rows)
    plot = Image.open(out / "sweep_cfg.png")
    assert plot.size[0] > 500
    report = (out / "report.md").read_text()
    assert [
        line.split("|")[1].strip()
        for line in report.splitlines()
        if line.startswith("| ") and line[2].isdigit()
    ] == ["1.0", "3.0", "7.5"]
    assert "sweep_cfg.png" in report
    for value in ("1.0", "3.0", "7.5"):
        run = out / f"cfg={value}"
        assert len(list((run / "images").glob("*.png"))) == 8 and (run / "report.md").is_file()
        assert (
            parse_infotext(read_infotext(run / "images" / "00000-0.png"))[2]["CFG scale"]
            == f"{float(value):g}"
        )
    assert [r["counts"]["reference"]["cache"] for r in document["runs"]] == [
        "miss"
    ] * 3  # computed once, reused


def test_sweep_report_without_matplotlib_says_why(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    result = {
        "metrics": {"fid": {"status": "ok", "value": 1.0}}, "values": {"fid": 1.0},
        "counts": {"generated": {"used": 4}},
        "extractor": {"spec": "random", "name": "r", "preprocess_id": "p", "resize_rule": "x"},
        "settings": {},
    }  # fmt: skip
    paths = write_sweep_report("steps", [(10, result), (20, result)], tmp_path)
    assert "plot" not in paths and not (tmp_path / "sweep_steps.png").exists()
    assert "pip install matplotlib" in (tmp_path / "report.md").read_text()


def test_wrong_weights_files_are_clear_errors(
    tmp_path: Path, clip_path: Path, tiny_checkpoint: Path, capsys
) -> None:
    images = _write_images(tmp_path / "images", 4, seed=0)
    common = ["--generated", images, "--reference", images, "--out", tmp_path / "out", "--no-cache"]
    assert _run(*common, "--features", f"inception:{clip_path}") == 2
    err = capsys.readouterr().err
    assert "FID Inception" in err and "missing keys" in err
    torch.save({"conv.weight": torch.zeros(2, 2)}, tmp_path / "foreign.pth")
    for bad in (tmp_path / "foreign.pth", tiny_checkpoint):
        assert _run(*common, "--features", f"clip:{bad}") == 2
        assert "expects a CLIP exported by `latentforge train clip`" in capsys.readouterr().err
    assert _run(*common, "--features", f"clip:{tmp_path / 'missing.safetensors'}") == 2
    assert "no such file" in capsys.readouterr().err
    assert _run(*common, "--features", "resnet") == 2
    assert "clip:PATH" in capsys.readouterr().err
    # CLIP's preprocessing is fixed by the model: a resize mode is refused, not silently ignored
    assert _run(*common, "--features", f"clip:{clip_path}", "--resize-mode", "clean") == 2
    assert "does not apply to clip:PATH features" in capsys.readouterr().err


def test_resize_mode_choices_are_the_library_modes() -> None:
    from latentforge.cli import build_parser
    from latentforge.evaluation.resize import RESIZE_MODES

    eval_parser = build_parser()._subparsers._group_actions[0].choices["eval"]  # type: ignore[union-attr]
    action = next(a for a in eval_parser._actions if a.dest == "resize_mode")
    assert tuple(action.choices) == RESIZE_MODES and action.default is None


def test_argument_errors(tmp_path: Path, capsys) -> None:
    images = _write_images(tmp_path / "images", 4, seed=0)
    assert _run("--reference", images, "--features", "random") == 2  # neither --generated nor --prompts
    assert "either --generated" in capsys.readouterr().err
    assert (
        _run("--generated", images, "--sweep", "cfg=1,2", "--reference", images, "--features", "random") == 2
    )
    assert "drop them to evaluate --generated" in capsys.readouterr().err
    assert (
        _run("--generated", images, "--reference", images, "--features", "random", "--out", images / "x") == 2
    )
    assert "inside the evaluated folder" in capsys.readouterr().err
    dataset = tmp_path / "dataset"
    _write_images(dataset / "train", 2, seed=0)
    _write_images(dataset / "holdout", 2, seed=1)
    assert (
        _run("--generated", images, "--reference", dataset, "--features", "random", "--out", tmp_path / "o")
        == 2
    )
    assert str(dataset / "holdout") in capsys.readouterr().err
    assert (
        _run(
            "--generated",
            images,
            "--reference",
            images,
            "--features",
            "random",
            "--metrics",
            "fid,fjd",
            "--out",
            tmp_path / "o",
        )
        == 2
    )
    assert "valid: fid, kid" in capsys.readouterr().err


def test_spec_parsers(tmp_path: Path) -> None:
    assert parse_seeds("0-3,10,20-21") == [0, 1, 2, 3, 10, 20, 21]
    with pytest.raises(ValueError, match="0-99"):
        parse_seeds("a-b")
    assert parse_sweep("cfg=1,3,7.5") == ("cfg", [1.0, 3.0, 7.5])
    assert parse_sweep("steps=10,20") == ("steps", [10, 20])
    with pytest.raises(ValueError, match="steps, cfg, sampler"):
        parse_sweep("eta=0,1")
    split = _write_images(tmp_path / "holdout", 4, seed=0, caption="emoji")
    assert read_prompts(split) == ["emoji 0", "emoji 1", "emoji 2", "emoji 0"]


def test_batches_of_whole_images_stay_within_a_pixel_budget() -> None:
    from latentforge.evaluation.features import _batches

    small = [torch.zeros(3, 64, 64, dtype=torch.uint8)] * 5
    large = [torch.zeros(3, 1024, 1024, dtype=torch.uint8)] * 3  # each over 2 x 512 x 512 pixels
    assert [len(b) for b in _batches(small + large + small, batch_size=2)] == [2, 2, 1, 1, 1, 1, 2, 2, 1]
