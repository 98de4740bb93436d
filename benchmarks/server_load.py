"""Load test of `latentforge serve` on loopback: concurrent mixed requests against a bounded queue.

N clients start at once (a barrier) against a server with a queue of Q jobs: txt2img (batches of 1-2),
img2img, inpaint, X/Y plots, progress and png-info. Every request must complete (200) or be told the
queue is full (429 with Retry-After); none may be a 5xx; each 200 must carry its own prompt and seeds.
Then a 40-batch job is interrupted mid-run and must return the batches finished so far. Resident memory
is read after a warm-up (baseline), after each of `--rounds` bursts, at the peak and at the end
(`/proc/self/status`; the server runs in this process). Only
127.0.0.1 is contacted; every request has a timeout and the whole run a deadline, so it stops by itself.

    python benchmarks/server_load.py --requests 32 --queue-size 16 [--checkpoint FILE] [--json]
"""

from __future__ import annotations

import argparse
import base64
import gc
import io
import json
import socket
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

KINDS = ("txt2img", "txt2img-batch", "img2img", "inpaint", "xyz", "progress", "png-info", "txt2img")


def rss_mib(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def tiny_checkpoint(folder: Path) -> Path:
    """families.TINY with random weights (seed 0): the same model the unit tests serve."""
    import torch

    from latentforge.checkpoints.single_file import save_single_file
    from latentforge.model import StableDiffusion
    from latentforge.models.families import TINY

    torch.manual_seed(0)
    model = StableDiffusion.from_family(TINY)
    path = folder / "tiny.safetensors"
    save_single_file(
        path, model.unet.state_dict(), model.vae.state_dict(), model.text_encoder.state_dict(), TINY
    )
    return path


def _png(image: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _request(i: int, steps: int, size: int, init: str, mask: str) -> tuple[str, str, dict[str, Any]]:
    """(kind, route, body) of request i; generation bodies carry a prompt and seed of their own."""
    kind = KINDS[i % len(KINDS)]
    base = {"prompt": f"load request {i}", "seed": 1000 + 10 * i, "steps": steps, "width": size}
    base |= {"height": size, "sampler_name": "Euler a", "cfg_scale": 5}
    if kind == "txt2img":
        return kind, "sdapi/v1/txt2img", base
    if kind == "txt2img-batch":
        return kind, "sdapi/v1/txt2img", base | {"batch_size": 2}
    if kind == "img2img":
        return kind, "sdapi/v1/img2img", base | {"init_images": [init], "denoising_strength": 0.6}
    if kind == "inpaint":
        return kind, "sdapi/v1/img2img", base | {"init_images": [init], "mask": mask, "mask_blur": 0}
    if kind == "xyz":
        return kind, "latentforge/v1/xyz", {"payload": base, "x": f"steps=1,{steps}"}
    if kind == "progress":
        return kind, "sdapi/v1/progress", {}
    return kind, "sdapi/v1/png-info", {"image": init}


def _own(kind: str, body: dict[str, Any], answer: dict[str, Any]) -> bool:
    """Does a 200 answer carry this request's own prompt and seeds (not a neighbour's)?"""
    if kind in ("progress", "png-info"):
        return "progress" in answer or "info" in answer
    info = json.loads(answer["info"])
    payload = body.get("payload", body)
    count = {"txt2img-batch": 2, "xyz": 2}.get(kind, 1)
    seeds = [payload["seed"] + i for i in range(count)] if kind != "xyz" else [payload["seed"]] * 2
    return info["all_prompts"] == [payload["prompt"]] * count and info["all_seeds"] == seeds


def run_load(
    checkpoint: Path | None = None,
    *,
    requests: int = 32,
    queue_size: int = 16,
    steps: int = 3,
    size: int = 32,
    rounds: int = 2,
    timeout_s: float = 300.0,
) -> dict[str, Any]:
    """Serve, load, interrupt; returns the figures (statuses, latencies, RSS) and the checks' outcomes."""
    import httpx
    import uvicorn
    from PIL import Image

    from latentforge.server.app import create_app

    deadline = time.monotonic() + timeout_s
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if checkpoint is None:
            checkpoint = tiny_checkpoint(folder)
        models = folder / "models"
        models.mkdir()
        (models / checkpoint.name).symlink_to(checkpoint.resolve())
        app = create_app(models_dir=models, queue_size=queue_size)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}/"
        limits = httpx.Limits(max_connections=requests + 4)
        timeout = httpx.Timeout(max(deadline - time.monotonic(), 1.0))
        try:
            with httpx.Client(base_url=url, timeout=timeout, limits=limits) as client:
                warm = client.post(
                    "sdapi/v1/txt2img", json={"prompt": "warm", "steps": steps, "width": size, "height": size}
                )
                warm.raise_for_status()
                init = json.loads(warm.text)["images"][0]
                mask = Image.new("L", (size, size), 0)
                mask.paste(255, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
                mask_b64 = _png(mask)
                gc.collect()
                baseline = rss_mib()
                after_rounds = []
                for _ in range(rounds):  # the same burst again: memory must not grow round by round
                    result = _burst(client, requests, steps, size, init, mask_b64)
                    gc.collect()
                    after_rounds.append(round(rss_mib(), 1))
                    if not result["all_own"] or result["server_errors"]:
                        break
                result["interrupt"] = _interrupt(client, steps, size)
            gc.collect()
            result |= {
                "rss_after_each_round_mib": after_rounds,
                "rss_baseline_mib": round(baseline, 1),
                "rss_peak_mib": round(rss_mib("VmHWM"), 1),
                "rss_after_mib": round(rss_mib(), 1),
                "requests": requests,
                "queue_size": queue_size,
                "steps": steps,
                "size": size,
            }
            return result
        finally:
            server.should_exit = True
            thread.join(30)


def _burst(client: Any, requests: int, steps: int, size: int, init: str, mask: str) -> dict[str, Any]:
    barrier = threading.Barrier(requests)

    def one(i: int) -> dict[str, Any]:
        kind, route, body = _request(i, steps, size, init, mask)
        barrier.wait(30)  # all clients start together, so the queue really overflows
        start = time.perf_counter()
        response = client.get(route) if kind == "progress" else client.post(route, json=body)
        seconds = time.perf_counter() - start
        row = {"kind": kind, "status": response.status_code, "seconds": seconds, "own": None}
        if response.status_code == 200:
            row["own"] = _own(kind, body, response.json())
        elif response.status_code == 429:
            row["retry_after"] = response.headers.get("retry-after")
        return row

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=requests) as pool:
        rows = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    statuses: dict[str, int] = {}
    for row in rows:
        statuses[str(row["status"])] = statuses.get(str(row["status"]), 0) + 1
    done = [r["seconds"] for r in rows if r["status"] == 200 and r["kind"] not in ("progress", "png-info")]
    return {
        "statuses": statuses,
        "server_errors": sum(r["status"] >= 500 for r in rows),
        "other_statuses": sum(r["status"] not in (200, 429) for r in rows),
        "all_own": all(r["own"] for r in rows if r["status"] == 200),
        "retry_after_on_all_429": all(r.get("retry_after") for r in rows if r["status"] == 429),
        "wall_s": round(wall, 2),
        "generations_done": len(done),
        "latency_p50_s": round(statistics.median(done), 2) if done else None,
        "latency_max_s": round(max(done), 2) if done else None,
    }


def _interrupt(client: Any, steps: int, size: int) -> dict[str, Any]:
    """A 40-batch job, interrupted once some of its batches are done: they must come back."""
    batches = 40
    body = {"prompt": "interrupt me", "seed": 5, "steps": steps, "width": size, "height": size}
    body["n_iter"] = batches
    answer: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: answer.update(r=client.post("sdapi/v1/txt2img", json=body)))
    thread.start()
    stop = time.monotonic() + 60
    while time.monotonic() < stop:  # until at least two batches are finished
        progress = client.get("sdapi/v1/progress", params={"skip_current_image": True}).json()
        if progress["state"]["sampling_step"] >= 2 * steps + 1:
            break
        time.sleep(0.02)
    client.post("sdapi/v1/interrupt")
    thread.join(120)
    response = answer["r"]
    info = json.loads(response.json()["info"])
    images = len(response.json()["images"])
    seeds_ok = info["all_seeds"] == [5 + i for i in range(images)]
    interrupted = info["interrupted"]
    return {"status": response.status_code, "images": images, "of": batches, "interrupted": interrupted,
            "seeds_ok": seeds_ok}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--queue-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="bursts in a row (memory growth check)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: a tiny random model")
    parser.add_argument("--timeout", type=float, default=300.0, help="the whole run's deadline (s)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    result = run_load(
        args.checkpoint,
        requests=args.requests,
        queue_size=args.queue_size,
        steps=args.steps,
        size=args.size,
        rounds=args.rounds,
        timeout_s=args.timeout,
    )
    print(json.dumps(result, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
