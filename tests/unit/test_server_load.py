"""A small run of benchmarks/server_load.py: concurrent mixed requests overflow a queue of 4 on loopback;
each completes or gets 429 with Retry-After, none 5xx, each answer carries its own prompt and seeds, an
interrupt mid-batch returns the finished batches, and resident memory does not grow with the load."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("uvicorn")
pytest.importorskip("httpx")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "server_load.py"


def test_load_burst_and_interrupt(tiny_checkpoint):
    spec = importlib.util.spec_from_file_location("server_load", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.run_load(tiny_checkpoint, requests=12, queue_size=4, steps=2, size=32, timeout_s=240)
    assert result["server_errors"] == 0 and result["other_statuses"] == 0, result
    # 10 of the 12 are generations: one runs, four wait, the rest are told to come back later
    assert result["statuses"].get("429", 0) >= 1 and result["retry_after_on_all_429"], result
    assert result["generations_done"] >= 5 and result["all_own"], result
    interrupt = result["interrupt"]
    assert interrupt["status"] == 200 and interrupt["interrupted"] and interrupt["seeds_ok"], interrupt
    assert 2 <= interrupt["images"] < interrupt["of"], interrupt
    first, second = result["rss_after_each_round_mib"]
    assert second - first < 16 and result["rss_after_mib"] - result["rss_baseline_mib"] < 64, result
