"""Decompression bombs: images whose header promises far more pixels than the file holds, as init image,
mask, `png-info` input, `--from-png` source and in an `eval` folder. Each is refused with one `error:` line
before its pixels are decoded: peak memory (ru_maxrss of a fresh process running every case in turn)
grows by less than BOUND_MB over the same process after a tiny error case."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from hostile import png_bilevel, png_declaring

BOUND_MB = 100  # one decoded 8000x8000 image is 192 MB as RGB (768 MB as float): a decode cannot hide
HUGE = 100_000  # header only: 10^10 pixels, 30 GB as RGB
BIG = 8_000  # a real 1-bit image: 64 M pixels, under Pillow's bomb limit (89 M) but over ours (16.8 M)

SCRIPT = r"""
import json, resource, sys
from latentforge.cli import main
cases = json.loads(sys.argv[1])
peaks = {}
for name, argv in cases:
    code = main(argv)
    peaks[name] = [code, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]
print(json.dumps(peaks))
"""


def test_bombs_are_refused_before_decoding(tiny_checkpoint, tmp_path):
    (tmp_path / "huge.png").write_bytes(png_declaring(HUGE, HUGE))
    (tmp_path / "big.png").write_bytes(png_bilevel(BIG, BIG))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnothing")
    (tmp_path / "small.png").write_bytes(png_bilevel(32, 32))
    for name in ("huge", "small"):
        (tmp_path / f"eval-{name}").mkdir()
        for i in range(2):
            (tmp_path / f"eval-{name}" / f"{i}.png").write_bytes((tmp_path / f"{name}.png").read_bytes())
    out = tmp_path / "out"
    generate = ["generate", "x", "--model", str(tiny_checkpoint), "--steps", "1", "--out", str(out)]
    small = str(tmp_path / "small.png")
    cases = [("baseline: broken init image", [*generate, "--init-image", str(tmp_path / "broken.png")])]
    for name in ("huge", "big"):
        image = str(tmp_path / f"{name}.png")
        cases += [
            (f"{name} init image", [*generate, "--init-image", image]),
            (f"{name} mask", [*generate, "--init-image", small, "--mask", image]),
            (f"{name} --from-png", ["generate", *generate[2:4], "--from-png", image, "--out", str(out)]),
        ]
    cases.append(("huge png-info", ["png-info", str(tmp_path / "huge.png")]))  # big.png's header is fine
    cases.append(("huge eval folder", [
        "eval", "--generated", str(tmp_path / "eval-huge"), "--reference", str(tmp_path / "eval-small"),
        "--features", "random", "--metrics", "fid", "--out", str(tmp_path / "eval"),
    ]))  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(cases)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    peaks = json.loads(result.stdout.strip().splitlines()[-1])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == len(cases), result.stderr  # one line per case, the baseline's included
    baseline = peaks.pop("baseline: broken init image")[1]
    for name, (code, peak_mb) in peaks.items():
        assert code == 2, (name, result.stderr)
        assert peak_mb - baseline < BOUND_MB, (
            f"{name}: peak {peak_mb:.0f} MB, {peak_mb - baseline:.0f} MB over"
        )
    assert not out.exists() or not list(out.iterdir())
    print({name: round(peak - baseline) for name, (_, peak) in peaks.items()}, f"baseline {baseline:.0f} MB")
