"""Evaluation outputs: `metrics.json`, a Markdown `report.md`, a sample grid PNG and the sweep plot.

matplotlib is optional: only `plot_sweep` imports it (Agg canvas, no pyplot state), and says how to
install it when it is missing.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from latentforge.evaluation.resize import REFERENCES

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
SAMPLES_FILE = "samples.png"
THUMBNAIL = 96
# (column title, key of `values`, key of its std or None, format)
COLUMNS = (
    ("FID", "fid", None, "{:.4g}"),
    ("KID", "kid", "kid_std", "{:.3g}"),
    ("Precision", "precision", None, "{:.3f}"),
    ("Recall", "recall", None, "{:.3f}"),
    ("IS", "is", "is_std", "{:.4g}"),
    ("CLIP score", "clip_score", None, "{:.2f}"),
)
ROW_METRIC = {"fid": "fid", "kid": "kid", "precision": "precision_recall", "recall": "precision_recall"}
ROW_METRIC.update({"is": "is", "clip_score": "clip_score"})


def run_dir_name(key: str, value: object) -> str:
    """Folder of one sweep value: `cfg=7.5`, `sampler=DPM++_2M` (characters outside [A-Za-z0-9._+=-] -> _)."""
    return re.sub(r"[^A-Za-z0-9._+=-]", "_", f"{key}={value}")


def sample_grid(
    generated: Sequence[Image.Image], reference: Sequence[Image.Image], size: int = THUMBNAIL
) -> Image.Image:
    """Two labelled rows of thumbnails: generated on top, reference below."""
    label_width, gap = 72, 4
    columns = max(len(generated), len(reference), 1)
    grid = Image.new("RGB", (label_width + columns * (size + gap), 2 * (size + gap)), "white")
    draw = ImageDraw.Draw(grid)
    for row, (name, images) in enumerate((("generated", generated), ("reference", reference))):
        top = row * (size + gap)
        draw.text((4, top + size // 2 - 6), name, fill="black")
        for column, image in enumerate(images):
            grid.paste(
                image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC),
                (label_width + column * (size + gap), top),
            )
    return grid


def _cell(values: dict[str, float], key: str, std_key: str | None, fmt: str) -> str:
    if key not in values:
        return "n/a"
    text = fmt.format(values[key])
    return f"{text} ± {fmt.format(values[std_key])}" if std_key and std_key in values else text


def metric_table(result: dict[str, Any]) -> list[str]:
    """Markdown table of one result: value, or the reason a metric failed or was skipped."""
    values, metrics = result["values"], result["metrics"]
    lines = ["| Metric | Value | Notes |", "| --- | --- | --- |"]
    for title, key, std_key, fmt in COLUMNS:
        entry = metrics.get(ROW_METRIC[key])
        if entry is None:
            continue
        if entry["status"] != "ok":
            lines.append(f"| {title} | {entry['status']} | {entry['reason']} |")
            continue
        notes = {
            "kid": f"{entry.get('subsets')} subsets of {entry.get('subset_size')}",
            "precision": f"k = {entry.get('k')}",
            "recall": f"k = {entry.get('k')}",
            "is": f"{entry.get('splits')} splits",
            "clip_score": f"{entry.get('captioned')} captioned images, {entry.get('model')}",
        }.get(key, "")
        if entry.get("warnings"):
            notes = "; ".join(filter(None, [notes, *entry["warnings"]]))
        lines.append(f"| {title} | {_cell(values, key, std_key, fmt)} | {notes} |")
    return lines


def _counts(result: dict[str, Any], show: int = 10) -> list[str]:
    lines = ["| Set | Found | Used | Unreadable | Feature cache |", "| --- | --- | --- | --- | --- |"]
    skipped = []
    for name, count in result["counts"].items():
        lines.append(
            f"| {name} | {count['found']} | {count['used']} | {count['unreadable']} | {count['cache']} |"
        )
        skipped += [f"- {name}: `{s['image']}`: {s['reason']}" for s in count["skipped"]]
    if skipped:
        lines += ["", "Skipped (unreadable) images:", *skipped[:show]]
        if len(skipped) > show:
            lines.append(f"- ... and {len(skipped) - show} more (see {METRICS_FILE})")
    return lines


def _settings(result: dict[str, Any]) -> list[str]:
    extractor = result["extractor"]
    mode = extractor.get("resize_mode")
    lines = [
        f"- Features: `{extractor['spec']}` ({extractor['name']})",
        f"- Resize mode: `{mode}` (reproduces {REFERENCES.get(mode, '?')})"
        if mode
        else "- Resize mode: none; the CLIP model's own preprocessing (fixed by the model)",
        f"- Preprocessing: `{extractor['preprocess_id']}` after the resize rule `{extractor['resize_rule']}`",
        "- Metric settings: " + ", ".join(f"{k} = {v}" for k, v in result["settings"].items()),
    ]
    if result.get("clip"):
        lines.append(f"- CLIP score model: `{result['clip']}`")
    generation = result.get("generation")
    if generation:
        lines.append(
            "- Generation: " + ", ".join(f"{k} = {v}" for k, v in generation.items() if k != "params")
        )
        lines.append(
            "- Parameters: " + ", ".join(f"{k} = {v!r}" for k, v in generation.get("params", {}).items())
        )
    return lines


def write_report(
    result: dict[str, Any],
    out_dir: str | os.PathLike,
    samples: tuple[Sequence[Image.Image], Sequence[Image.Image]] | None = None,
    title: str = "Evaluation",
) -> dict[str, Path]:
    """Write metrics.json, report.md and (with `samples`: generated, reference images) samples.png."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"metrics": out / METRICS_FILE, "report": out / REPORT_FILE}
    paths["metrics"].write_text(json.dumps(result, indent=2, default=str) + "\n")
    lines = [f"# {title}", "", *metric_table(result), "", "## Images", "", *_counts(result)]
    if samples is not None and (samples[0] or samples[1]):
        paths["samples"] = out / SAMPLES_FILE
        sample_grid(*samples).save(paths["samples"])
        lines += ["", f"![generated (top) and reference (bottom) samples]({SAMPLES_FILE})"]
    lines += ["", "## Settings", "", *_settings(result), ""]
    paths["report"].write_text("\n".join(lines))
    return paths


def sweep_rows(key: str, runs: Sequence[tuple[Any, dict[str, Any]]]) -> list[dict[str, Any]]:
    """One flat row per swept value: the value, the metric numbers and the image count."""
    return [
        {key: value, **result["values"], "images": result["counts"]["generated"]["used"]}
        for value, result in runs
    ]


def write_sweep_report(
    key: str,
    runs: Sequence[tuple[Any, dict[str, Any]]],
    out_dir: str | os.PathLike,
    title: str = "Evaluation sweep",
) -> dict[str, Path]:
    """metrics.json (rows and every run's full result), report.md (one row per value) and the plot.

    Returns the written paths; when matplotlib is missing the plot is left out and the report says why.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = sweep_rows(key, runs)
    paths = {"metrics": out / METRICS_FILE, "report": out / REPORT_FILE, "plot": out / f"sweep_{key}.png"}
    document: dict[str, Any] = {"sweep": {"key": key, "values": [value for value, _ in runs], "rows": rows}}
    document["runs"] = [{"value": value, **result} for value, result in runs]
    paths["metrics"].write_text(json.dumps(document, indent=2, default=str) + "\n")
    header = [key, *(title for title, *_ in COLUMNS), "Images", "Run"]
    lines = [f"# {title}: {key}", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for (value, _), row in zip(runs, rows, strict=True):
        cells = [_cell(row, k, std, fmt) for _, k, std, fmt in COLUMNS]
        run_dir = run_dir_name(key, value)
        lines.append(
            f"| {value} | "
            + " | ".join(cells)
            + f" | {row['images']} | [{run_dir}]({run_dir}/{REPORT_FILE}) |"
        )
    try:
        plot_sweep(key, rows, paths["plot"])
        lines += ["", f"![{key} sweep]({paths['plot'].name})"]
    except ImportError as error:
        del paths["plot"]
        lines += ["", f"Plot not drawn: {error}"]
    if runs:
        values = ", ".join(str(value) for value, _ in runs)
        swept = f"- Swept: {key} = {values}; the other settings below are the first run's"
        lines += ["", "## Settings", "", swept, *_settings(runs[0][1]), ""]
    paths["report"].write_text("\n".join(lines))
    return paths


def plot_sweep(key: str, rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """FID against the swept value (CLIP score or IS on a second axis) and, when either exists, the FID vs
    CLIP score (or IS) trade-off curve, each point labelled by its value (the LDM paper's guidance study)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("the sweep plot needs matplotlib: pip install matplotlib") from error

    def series(name: str) -> list[float]:
        return [float(row.get(name, math.nan)) for row in rows]

    values = [row[key] for row in rows]
    numeric = all(isinstance(v, (int, float)) for v in values)
    x = values if numeric else list(range(len(values)))
    other = next((name for name in ("clip_score", "is") if any(math.isfinite(v) for v in series(name))), None)
    other_label = {"clip_score": "CLIP score", "is": "Inception Score"}.get(other or "", "")
    figure = Figure(figsize=(11 if other else 5.5, 4), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2 if other else 1, squeeze=False)[0]
    ax = axes[0]
    ax.plot(x, series("fid"), "o-", color="tab:blue", label="FID")
    ax.set_xlabel(key)
    ax.set_ylabel("FID (lower is better)", color="tab:blue")
    if not numeric:
        ax.set_xticks(x, [str(v) for v in values], rotation=30)
    if other:
        twin = ax.twinx()
        twin.plot(x, series(other), "s--", color="tab:orange")
        twin.set_ylabel(f"{other_label} (higher is better)", color="tab:orange")
        trade = axes[1]
        trade.plot(series(other), series("fid"), "o-", color="tab:green")
        for value, ox, fy in zip(values, series(other), series("fid"), strict=True):
            if math.isfinite(ox) and math.isfinite(fy):
                trade.annotate(
                    f"{key}={value}", (ox, fy), textcoords="offset points", xytext=(4, 4), fontsize=8
                )
        trade.set_xlabel(f"{other_label} (higher is better)")
        trade.set_ylabel("FID (lower is better)")
        trade.set_title(f"FID vs {other_label} across {key}")
    ax.set_title(f"FID vs {key}")
    path = Path(path)
    figure.savefig(path, dpi=100)
    return path
