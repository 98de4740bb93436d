"""`evaluate(generated, reference)`: every metric of `metrics.py` from image folders or lists, in one call.

Images go to the extractor whole, resized by its resize mode (`resize.py`; CLIP: the square rule of
`image_sets`); unreadable ones are skipped and counted. Each metric is computed on its own: one that
cannot be (too few images, no logits, no captions) is reported with the reason and the others still come
out. Reference features are cached in `cache_dir` as `.npz`, keyed by the extractor's name, its
preprocessing, resize mode and rule, and a hash of the sorted file list with sizes and mtimes, so a second
run against the same reference reads them back.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from latentforge.errors import LatentforgeError
from latentforge.evaluation import metrics as m
from latentforge.evaluation.extractors import EvalExtractor, as_eval_extractor, load_extractor
from latentforge.evaluation.features import FeatureExtractor, extract_features
from latentforge.evaluation.image_sets import (
    EvalInputError,
    ImageSet,
    ImageSource,
    image_set,
    pil_to_uint8,
    resize_rule_id,
)

METRICS = ("fid", "kid", "precision_recall", "is", "clip_score")
CACHE_VERSION = 2  # 2: resize modes (whole images, no crop, for Inception and random)
NUM_SAMPLES = 8  # images per set kept for the report's sample grid


class MetricError(LatentforgeError, ValueError):
    """A metric that cannot be computed on these inputs; the message says what it needs."""


@dataclass(frozen=True)
class MetricSettings:
    """Metric hyperparameters (torch-fidelity's defaults; KID's subset size shrinks to the smaller set)."""

    kid_subsets: int = 100
    kid_subset_size: int = 1000
    pr_k: int = 3
    is_splits: int = 10


@dataclass
class FeatureSet:
    """Features of the readable images of an `ImageSet` (rows follow `indices`), with load counts."""

    images: ImageSet
    indices: list[int]
    features: np.ndarray | None  # [N, D], None when no image could be read
    logits: np.ndarray | None = None  # [N, C] class logits (Inception only)
    samples: list[Image.Image] = field(default_factory=list)
    cache: str = "off"  # "hit" | "miss" | "off"
    cache_path: str | None = None

    @property
    def count(self) -> int:
        return len(self.indices)

    @property
    def array(self) -> np.ndarray:
        """The features; `MetricError` when no image of the set could be read."""
        if self.features is None:
            raise MetricError(f"no readable {self.images.label} images")
        return self.features

    def summary(self) -> dict[str, Any]:
        skipped = [{"image": name, "reason": reason} for name, reason in self.images.skipped]
        return {
            "found": len(self.images),
            "used": self.count,
            "unreadable": len(skipped),
            "skipped": skipped,
            "cache": self.cache,
            "cache_path": self.cache_path,
        }


def _resize_rule(extractor: EvalExtractor) -> str:
    return resize_rule_id(extractor.input_size, extractor.resize_mode)


def _cache_key(extractor: EvalExtractor, fingerprint: str) -> dict[str, Any]:
    return {
        "version": CACHE_VERSION,
        "extractor": extractor.image.name,
        "preprocess_id": f"{extractor.image.preprocess_id}|{_resize_rule(extractor)}",
        "resize_mode": extractor.resize_mode,
        "files": fingerprint,
    }


def _read_cache(path: Path, key: str) -> dict[str, Any] | None:
    """The cached arrays when `path` holds them under exactly `key`; None when absent or unusable."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["key"]) != key:
                return None
            return {name: data[name] for name in data.files}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None


def _write_cache(path: Path, key: str, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        np.savez(f, key=np.array(key), **arrays)
    tmp.replace(path)


def compute_features(
    source: ImageSource | ImageSet,
    extractor: EvalExtractor,
    *,
    label: str = "images",
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 50,
    progress: bool = True,
) -> FeatureSet:
    """Features (and logits) of a folder or image list; with `cache_dir`, folders are cached as `.npz`."""
    images = source if isinstance(source, ImageSet) else image_set(source, label)
    square = None if extractor.resize_mode is not None else extractor.input_size  # CLIP: the square rule
    fingerprint = images.fingerprint() if cache_dir is not None else None
    cache_path = None
    if fingerprint is not None and cache_dir is not None:
        key = json.dumps(_cache_key(extractor, fingerprint), sort_keys=True)
        cache_path = Path(cache_dir) / f"features-{hashlib.sha256(key.encode()).hexdigest()[:24]}.npz"
        cached = _read_cache(cache_path, key)
        if cached is not None:
            images.skipped = [tuple(item) for item in json.loads(str(cached["skipped"]))]
            rows = [int(i) for i in cached["indices"]]
            shown = [image for _, image in images.iter_images(square, rows[:NUM_SAMPLES])]
            features = cached["features"] if rows else None
            logits = cached["logits"] if rows and extractor.num_logits else None
            return FeatureSet(images, rows, features, logits, shown, "hit", str(cache_path))

    indices: list[int] = []
    samples: list[Image.Image] = []

    def tensors():  # noqa: ANN202 (a generator of uint8 [3, H, W])
        for index, image in images.iter_images(square):
            indices.append(index)
            if len(samples) < NUM_SAMPLES:
                samples.append(image)
            yield pil_to_uint8(image)

    try:
        array = extract_features(extractor.image, tensors(), batch_size=batch_size, progress=progress)
    except ValueError:
        if indices:
            raise
        array = None  # no readable image: every metric reports it
    features = logits = None
    if array is not None:
        split = array.shape[1] - extractor.num_logits
        features = array[:, :split]
        logits = array[:, split:] if extractor.num_logits else None
    if cache_path is not None:
        arrays = {
            "indices": np.asarray(indices, dtype=np.int64),
            "features": features if features is not None else np.zeros((0, 0), np.float32),
            "logits": logits if logits is not None else np.zeros((0, 0), np.float32),
            "skipped": np.array(json.dumps(images.skipped)),
        }
        _write_cache(cache_path, key, arrays)
    cache = "off" if cache_path is None else "miss"
    return FeatureSet(
        images, indices, features, logits, samples, cache, None if cache_path is None else str(cache_path)
    )


def _require(metric: str, needed: int, generated: FeatureSet, reference: FeatureSet | None = None) -> None:
    """Raise `MetricError` naming the number of images `metric` needs when a set has fewer."""
    sets = [("generated", generated)] + ([("reference", reference)] if reference is not None else [])
    short = [f"{name} has {fs.count}" for name, fs in sets if fs.count < needed]
    if short:
        where = "in each set" if reference is not None else "generated"
        readable = " readable" if any(fs.images.skipped for _, fs in sets) else ""
        raise MetricError(f"{metric} needs at least {needed} images {where}; {' and '.join(short)}{readable}")


def _run_metric(compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """{"status": "ok", ...values, "warnings"?} or {"status": "failed", "reason": ...}; never raises."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = {"status": "ok", **compute()}
        except MetricError as error:
            return {"status": "failed", "reason": str(error)}
        except ValueError as error:  # metrics.py's own input checks
            return {"status": "failed", "reason": str(error)}
    if caught:
        out["warnings"] = sorted({str(w.message) for w in caught})
    return out


def _clip_score(
    generated: FeatureSet,
    extractor: EvalExtractor,
    clip: EvalExtractor | None,
    captions: Sequence[str] | None,
    batch_size: int,
    progress: bool,
) -> dict[str, Any]:
    scorer = extractor if extractor.encode_text is not None else clip
    if scorer is None or scorer.encode_text is None:
        raise _Skip("CLIP score needs a CLIP model: use --features clip:PATH or add --clip PATH")
    _require("clip_score", 1, generated)
    if captions is not None:
        if len(captions) != len(generated.images):
            raise MetricError(
                f"clip_score got {len(captions)} captions for {len(generated.images)} generated images"
            )
        texts: list[str | None] = [captions[i] for i in generated.indices]
    else:
        texts = generated.images.captions(generated.indices)
    rows = [row for row, text in enumerate(texts) if text]
    if not rows:
        raise MetricError(
            "clip_score needs captions: a same-stem .txt next to each generated image, PNG infotext with the "
            "prompt, or a prompts file"
        )
    if scorer is extractor:
        image_embeds = generated.array[rows]
    else:  # a second network: its own pass over the generated images
        images = generated.images
        again = compute_features(
            ImageSet(images.label, images.paths, images.images),
            scorer,
            batch_size=batch_size,
            progress=progress,
        )
        position = {index: row for row, index in enumerate(again.indices)}
        image_embeds = again.array[[position[generated.indices[row]] for row in rows]]
    score = m.clip_score(image_embeds, scorer.encode_text([texts[row] or "" for row in rows]))
    return {"value": score, "captioned": len(rows), "model": scorer.spec}


class _Skip(Exception):
    """A metric that does not apply to this extractor (reported as skipped, with the reason)."""


class Evaluation(NamedTuple):
    """`evaluate`'s answer: the JSON-able result and both `FeatureSet`s (their samples feed the report)."""

    result: dict[str, Any]
    generated: FeatureSet
    reference: FeatureSet


def evaluate(
    generated: ImageSource,
    reference: ImageSource | FeatureSet,
    *,
    extractor: str | EvalExtractor | FeatureExtractor,
    metrics: Sequence[str] = METRICS,
    captions: Sequence[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 50,
    progress: bool = True,
    clip: str | EvalExtractor | None = None,
    settings: MetricSettings | None = None,
) -> Evaluation:
    """Compare generated images with reference images.

    Args:
        generated, reference: image folders (recursive; a dataset split is its folder, e.g. DIR/holdout) or
            lists of PIL images; `reference` may also be a `FeatureSet` computed earlier (sweeps).
        extractor: a spec ("clip:PATH", "inception:PATH", "random"; resize mode: the default, see
            `load_extractor`), an `EvalExtractor` or a bare `FeatureExtractor` (features only).
        metrics: any of "fid", "kid", "precision_recall", "is", "clip_score".
        captions: one caption per generated image (in folder order) for CLIP score; default: same-stem .txt
            files, else the prompt of the PNG infotext.
        cache_dir: where reference features are cached (None: no cache).
        clip: a CLIP ("clip:PATH" or `EvalExtractor`) for CLIP score when `extractor` is not a CLIP.
        settings: metric hyperparameters.

    Returns:
        `Evaluation(result, generated, reference)`: `result` is {"metrics": {name: {"status": "ok"|"failed"|
        "skipped", ...}}, "values": flat numbers, "counts", "extractor", "clip", "settings"}; a metric that
        cannot be computed carries its "reason".
    """
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise EvalInputError(f"unknown metrics {unknown}; valid: {', '.join(METRICS)}")
    settings = settings or MetricSettings()
    image_set(generated, "generated")  # a missing folder is an error before any features are computed
    extractor = as_eval_extractor(extractor)
    clip_extractor = None if clip is None else load_extractor(clip)
    if isinstance(reference, FeatureSet):
        ref = reference
    else:
        ref = compute_features(
            reference, extractor, label="reference", cache_dir=cache_dir, batch_size=batch_size,
            progress=progress,
        )  # fmt: skip
    gen = compute_features(generated, extractor, label="generated", batch_size=batch_size, progress=progress)

    def fid() -> dict[str, Any]:
        _require("fid", 2, gen, ref)
        return {"value": m.fid(gen.array, ref.array)}

    def kid() -> dict[str, Any]:
        _require("kid", 2, gen, ref)
        size = min(settings.kid_subset_size, gen.count, ref.count)
        mean, std = m.kid(gen.array, ref.array, subsets=settings.kid_subsets, subset_size=size)
        return {"value": mean, "std": std, "subset_size": size, "subsets": settings.kid_subsets}

    def precision_recall() -> dict[str, Any]:
        _require("precision_recall", settings.pr_k + 1, gen, ref)
        precision, recall = m.precision_recall(ref.array, gen.array, k=settings.pr_k)
        return {"precision": precision, "recall": recall, "k": settings.pr_k}

    def inception_score() -> dict[str, Any]:
        if not extractor.num_logits:
            raise _Skip(
                "IS needs class logits: only the Inception extractor has them (--features inception:PATH)"
            )
        _require("is", settings.is_splits, gen)
        assert gen.logits is not None  # an Inception set with enough images has its logits
        mean, std = m.inception_score(gen.logits, splits=settings.is_splits)
        return {"value": mean, "std": std, "splits": settings.is_splits}

    def clip_score() -> dict[str, Any]:
        return _clip_score(gen, extractor, clip_extractor, captions, batch_size, progress)

    functions = {"fid": fid, "kid": kid, "precision_recall": precision_recall, "is": inception_score}
    functions["clip_score"] = clip_score
    results: dict[str, dict[str, Any]] = {}
    for name in metrics:
        try:
            results[name] = _run_metric(functions[name])
        except _Skip as skip:
            results[name] = {"status": "skipped", "reason": str(skip)}
    result = {
        "metrics": results,
        "values": flat_values(results),
        "counts": {"generated": gen.summary(), "reference": ref.summary()},
        "extractor": {
            "spec": extractor.spec,
            "name": extractor.image.name,
            "preprocess_id": extractor.image.preprocess_id,
            "input_size": extractor.input_size,
            "resize_mode": extractor.resize_mode,
            "resize_rule": _resize_rule(extractor),
        },
        "clip": None if clip_extractor is None else clip_extractor.spec,
        "settings": asdict(settings),
    }
    return Evaluation(result, gen, ref)


def flat_values(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Metric numbers in one flat dict: fid, kid, kid_std, precision, recall, is, is_std, clip_score."""
    names = {"value": "{}", "std": "{}_std", "precision": "precision", "recall": "recall"}
    out: dict[str, float] = {}
    for metric, entry in results.items():
        if entry.get("status") == "ok":
            for field_name, pattern in names.items():
                if field_name in entry:
                    out[pattern.format(metric)] = float(entry[field_name])
    return out
