"""Image-folder dataset (kohya/A1111 layout), aspect buckets and the per-bucket DDP batch sampler."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from latentforge.data.buckets import BucketBatchSampler, make_buckets, nearest_bucket
from latentforge.data.image_folder import ImageFolderDataset


def _image(path: Path, size: tuple[int, int], caption: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(path.name))
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    _image(tmp_path / "3_sks dog" / "a.png", (48, 32))  # no caption: the folder name is used
    _image(tmp_path / "3_sks dog" / "b.png", (32, 32), "sks dog on grass")
    _image(tmp_path / "nested" / "deeper" / "wide.png", (64, 16), "a wide banner")
    _image(tmp_path / "nested" / "tall.png", (16, 48), "a tall tower")
    _image(tmp_path / "loose.png", (32, 32))  # no caption, no N_ folder: skipped
    return tmp_path


def test_repeats_nested_folders_and_captions(folder: Path) -> None:
    dataset = ImageFolderDataset(folder, resolution=16)
    assert len(dataset) == 3 + 3 + 1 + 1
    captions = sorted(dataset[i]["caption"] for i in range(len(dataset)))
    assert captions.count("sks dog") == 3 and captions.count("sks dog on grass") == 3
    assert {"a wide banner", "a tall tower"} <= set(captions)
    assert [p.name for p in dataset.report.missing_captions] == ["loose.png"]
    item = dataset[0]
    assert item["pixels"].shape == (3, 16, 16) and item["pixels"].dtype == torch.float32
    assert item["pixels"].min().item() >= -1.0 and item["pixels"].max().item() <= 1.0
    assert Path(item["path"]).parent.name == "3_sks dog"


def test_center_crop_matches_manual_resize_and_crop(tmp_path: Path) -> None:
    _image(tmp_path / "x.png", (64, 16), "x")
    item = ImageFolderDataset(tmp_path, resolution=16, center_crop=True)[0]
    expected = Image.open(tmp_path / "x.png").resize((64, 16), Image.Resampling.LANCZOS).crop((24, 0, 40, 16))
    manual = torch.from_numpy(np.asarray(expected).copy()).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.equal(item["pixels"], manual)
    assert item["crop_top_left"].tolist() == [0, 24] and item["original_size"].tolist() == [16, 64]


def test_random_crop_and_flip_deterministic_per_seed_and_epoch(tmp_path: Path) -> None:
    _image(tmp_path / "3_x" / "wide.png", (128, 16), "x")

    def crops(seed: int, epoch: int) -> list[tuple[list[int], bool]]:
        dataset = ImageFolderDataset(tmp_path, resolution=16, center_crop=False, flip=True, seed=seed)
        dataset.set_epoch(epoch)
        return [(dataset[i]["crop_top_left"].tolist(), float(dataset[i]["pixels"].sum())) for i in range(3)]

    assert crops(0, 0) == crops(0, 0)
    assert crops(0, 0) != crops(0, 1)
    assert crops(0, 0) != crops(1, 0)
    lefts = {left for (_, left), _ in crops(0, 0) + crops(0, 1) + crops(0, 2)}
    assert len(lefts) > 1  # repeats of one image get different crops


def test_bucketed_items_take_their_bucket_shape(folder: Path) -> None:
    dataset = ImageFolderDataset(folder, resolution=32, buckets=True)
    for index in range(len(dataset)):
        width, height = dataset.sizes[dataset.bucket_ids[index]]
        assert dataset[index]["pixels"].shape == (3, height, width)
    shapes = {dataset.sizes[b] for b in dataset.bucket_ids}
    assert any(w > h for w, h in shapes) and any(w < h for w, h in shapes)


def test_truncated_image_falls_back_with_warning(tmp_path: Path) -> None:
    _image(tmp_path / "good.png", (16, 16), "good")
    _image(tmp_path / "cut.png", (64, 64), "cut")
    data = (tmp_path / "cut.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    dataset = ImageFolderDataset(tmp_path, resolution=16)  # header-only scan keeps the truncated file
    paths = [Path(e.path).name for e in dataset.entries]
    with pytest.warns(UserWarning, match="cut.png"):
        item = dataset[paths.index("cut.png")]
    assert item["caption"] == "good"
    assert len(ImageFolderDataset(tmp_path, resolution=16, verify=True)) == 1


def test_make_buckets_kohya_style() -> None:
    buckets = make_buckets(512)
    assert (512, 512) in buckets
    for known in [(256, 1024), (320, 768), (384, 640), (448, 576), (576, 448), (1024, 256)]:
        assert known in buckets
    assert all(w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 for w, h in buckets)
    assert all(256 <= side <= 1024 for bucket in buckets for side in bucket)
    assert all((h, w) in buckets for w, h in buckets)
    tiny = make_buckets(32)
    assert (32, 32) in tiny and all(w % 8 == 0 and h % 8 == 0 for w, h in tiny)


def test_nearest_bucket_by_log_aspect() -> None:
    buckets = make_buckets(512)
    assert buckets[nearest_bucket(1000, 500, buckets)] == (704, 320)
    assert buckets[nearest_bucket(500, 1000, buckets)] == (320, 704)
    assert buckets[nearest_bucket(777, 777, buckets)] == (512, 512)


BUCKET_IDS = [0] * 10 + [1] * 7 + [2] * 5 + [3] * 1


def _run(world_size: int, epoch: int = 0, **kwargs: object) -> list[list[list[int]]]:
    out = []
    for rank in range(world_size):
        sampler = BucketBatchSampler(BUCKET_IDS, 2, seed=3, rank=rank, world_size=world_size, **kwargs)
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        out.append(batches)
    return out


def test_sampler_batches_share_a_bucket_and_cover_everything() -> None:
    (batches,) = _run(1)
    assert all(len({BUCKET_IDS[i] for i in batch}) == 1 for batch in batches)
    assert sorted(i for batch in batches for i in batch) == list(range(len(BUCKET_IDS)))
    assert len(batches) == 5 + 4 + 3 + 1


def test_sampler_sharding_equal_counts_and_disjoint() -> None:
    for world_size in (2, 3, 4):
        per_rank = _run(world_size)
        assert len({len(b) for b in per_rank}) == 1
        assert len(per_rank[0]) == math.ceil(13 / world_size)
        covered = {i for batches in per_rank for batch in batches for i in batch}
        assert covered == set(range(len(BUCKET_IDS)))
        dropped = _run(world_size, drop_last=True)
        assert len({len(b) for b in dropped}) == 1 and len(dropped[0]) == 10 // world_size
        flat = [i for batches in dropped for batch in batches for i in batch]
        assert len(flat) == len(set(flat))
        assert all(len(batch) == 2 for batches in dropped for batch in batches)


def test_sampler_deterministic_per_epoch() -> None:
    assert _run(2, epoch=0) == _run(2, epoch=0)
    assert _run(2, epoch=0) != _run(2, epoch=1)
    unshuffled = _run(1, shuffle=False)[0]
    assert unshuffled[0] == [0, 1]
