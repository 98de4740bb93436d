"""The metric helpers and the subject builder of scripts/finetune_demo.py (the fine-tuning demonstrations),
on hand-computed cases."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


def _load_script(name: str):  # noqa: ANN202 (a module)
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


demo = _load_script("finetune_demo")


def test_cosine_and_mean_similarity_by_hand() -> None:
    # (3,4)/5 . (4,3)/5 = 24/25; (3,4)/5 . (0,2)/2 = 8/10
    a, b = np.array([[3.0, 4.0]]), np.array([[4.0, 3.0], [0.0, 2.0]])
    np.testing.assert_allclose(demo.cosine_matrix(a, b), [[0.96, 0.8]], atol=1e-12)
    assert demo.mean_similarity(a, b) == pytest.approx(0.88, abs=1e-12)


def test_paired_similarity_by_hand() -> None:
    a, b = np.array([[1.0, 0.0], [1.0, 1.0]]), np.array([[2.0, 0.0], [0.0, 5.0]])
    assert demo.paired_similarity(a, b) == pytest.approx((1 + 1 / math.sqrt(2)) / 2, abs=1e-12)
    # pairs, not all pairs: swapping one side's rows changes it
    assert demo.paired_similarity(a, b[::-1]) == pytest.approx((0 + 1 / math.sqrt(2)) / 2, abs=1e-12)
    with pytest.raises(ValueError, match="one length"):
        demo.paired_similarity(a, b[:1])


def test_nearest_hit_share_by_hand() -> None:
    queries = np.array([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1]])
    gallery = np.array([[1.0, 0.1], [0.1, 1.0], [-1.0, 0.0]])
    # nearest: query 0 -> gallery 0 (subject), query 1 -> gallery 1, query 2 -> gallery 0 (subject)
    assert demo.nearest_hit_share(queries, gallery, np.array([True, False, False])) == pytest.approx(2 / 3)
    assert demo.nearest_hit_share(queries, gallery, np.array([False, True, True])) == pytest.approx(1 / 3)


def _fake_emoji(root: Path) -> None:
    rows = [
        ("1F44C", None, "holdout", "google", "1F44C"),
        ("1F44C", "dark skin tone", "holdout", "google", "1F44C-1F3FF"),
        ("1F44C", "light skin tone", "holdout", "twitter", "1F44C-1F3FB"),
        ("1F600", None, "train", "google", "1F600"),
    ]
    lines = []
    for identity, tone, split, style, unified in rows:
        name = f"{split}/{style}/{unified.lower()}.png"
        (root / split / style).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), "red").save(root / name)
        lines.append(
            json.dumps(
                {
                    "identity": identity,
                    "skin_tone": tone,
                    "split": split,
                    "style": style,
                    "unified": unified,
                    "file_name": name,
                }  # fmt: skip
            )
        )
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def test_subject_splits_skin_tones_from_the_default_tone(tmp_path: Path) -> None:
    _fake_emoji(tmp_path / "emoji")
    demo.subject(tmp_path / "emoji", tmp_path / "out", "1F44C")
    train = sorted(p.name for p in (tmp_path / "out" / "train").iterdir())
    holdout = sorted(p.name for p in (tmp_path / "out" / "holdout").iterdir())
    assert train == ["google-1f44c-1f3ff.png", "google-1f44c-1f3ff.txt", "twitter-1f44c-1f3fb.png",
                     "twitter-1f44c-1f3fb.txt"]  # fmt: skip
    assert holdout == ["google-1f44c.png", "google-1f44c.txt"]
    # the caption is only the style: the emoji's name never reaches the new word
    assert (tmp_path / "out" / "train" / "twitter-1f44c-1f3fb.txt").read_text() == "twitter style"


def test_subject_refuses_an_emoji_the_model_was_trained_on(tmp_path: Path) -> None:
    _fake_emoji(tmp_path / "emoji")
    with pytest.raises(SystemExit, match="training split"):
        demo.subject(tmp_path / "emoji", tmp_path / "out", "1F600")
