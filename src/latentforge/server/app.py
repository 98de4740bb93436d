"""The FastAPI app: A1111's `/sdapi/v1` routes over the worker queue, with optional token auth.

Response shapes follow A1111's modules/api/models.py and api.py: images as base64 PNGs carrying their
infotext, `parameters` (the payload with defaults) and `info` (a JSON string, processing.py `Processed.js`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
import secrets
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image

from latentforge.errors import LatentforgeError, ParameterError
from latentforge.pipelines.infotext import parse_infotext, read_infotext
from latentforge.pipelines.preprocessors import PREPROCESSORS, get_preprocessor, run_preprocessor
from latentforge.pipelines.preview import PREVIEW_TYPES
from latentforge.pipelines.request import UPSCALERS, GenerationRequest
from latentforge.pipelines.xyz import parse_axis
from latentforge.sampling.registry import SAMPLERS
from latentforge.sampling.schedules import SCHEDULES
from latentforge.server.jobs import Catalog, JobResult, QueueFullError, Worker
from latentforge.server.payload import (
    Limits,
    check_limits,
    decode_image,
    encode_png,
    parameters,
    request_from_payload,
)

# POST /sdapi/v1/options may change only these (A1111 lets a client set any option; we keep to the model).
SETTABLE_OPTIONS = ("sd_model_checkpoint", "sd_vae", "show_progress_type")
MAX_BODY_BYTES = 200 * 2**20  # a few base64 images; larger bodies get 413 before they are read
RETRY_AFTER_S = 5  # told to clients that find the queue full (429)
STATIC = Path(__file__).parent / "static"  # the web page: plain HTML/CSS/JS, no build step
LOOPBACK = ("127.0.0.1", "localhost", "::1")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def _loopback(host: str) -> bool:
    return host in LOOPBACK or host.startswith("127.")


def _host_problem(request: Request, token: str | None) -> str | None:
    """Why a request must be refused as DNS rebinding or cross-site (CSRF), or None.

    Without a token only loopback Host names are served (a rebound domain sends its own name); a
    state-changing request that names an Origin must come from the page's own origin.
    """
    host = request.headers.get("host", "")
    name = urllib.parse.urlsplit(f"//{host}").hostname or ""
    if not token and not _loopback(name):
        return f"Host {host!r} is not a loopback name; serve with --token to be reached by other names"
    origin = request.headers.get("origin")
    unsafe = request.method not in SAFE_METHODS
    if unsafe and origin is not None and urllib.parse.urlsplit(origin).netloc != host:
        return f"cross-origin request from {origin!r} refused"
    return None


def _error(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """A1111's error body (api.py `api_middleware`: error, detail, body, errors), never a traceback."""
    body = {"error": kind, "detail": message, "body": "", "errors": message}
    return JSONResponse(body, status_code=status, headers=headers)


def _authorized(header: str, token: str) -> bool:
    """Bearer <token>, or Basic auth: user:pass when the token is "user:pass" (A1111's --api-auth), else
    any user with the token as password."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer":
        return secrets.compare_digest(value.encode(), token.encode())
    if scheme.lower() == "basic":
        try:
            user, _, password = base64.b64decode(value, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return False
        given = f"{user}:{password}" if ":" in token else password
        return secrets.compare_digest(given.encode(), token.encode())
    return False


async def _json(request: Request) -> Any:
    try:
        return await asyncio.to_thread(json.loads, await request.body())  # big bodies: off the loop
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ParameterError(f"the request body is not JSON: {error}") from None


def _info(result: JobResult, warnings: list[str]) -> dict[str, Any]:
    """A1111's `Processed.js()` fields for the images made."""
    requests = [image.request for image in result.images]
    first = requests[0] if requests else None
    return {
        "prompt": first.prompt if first else "",
        "all_prompts": [r.prompt for r in requests],
        "negative_prompt": first.negative_prompt if first else "",
        "all_negative_prompts": [r.negative_prompt for r in requests],
        "seed": first.seed if first else -1,
        "all_seeds": [r.seed for r in requests],
        "subseed": first.subseed if first else -1,
        "all_subseeds": [r.subseed for r in requests],
        "subseed_strength": first.subseed_strength if first else 0,
        "width": first.width if first else 0,
        "height": first.height if first else 0,
        "sampler_name": first.sampler if first else "",
        "scheduler": first.schedule if first else "",
        "cfg_scale": first.cfg_scale if first else 0,
        "steps": first.steps if first else 0,
        "batch_size": len(requests),
        "restore_faces": False,
        "sd_model_name": first.model if first else None,
        "sd_model_hash": first.model_hash if first else None,
        "sd_vae_name": (first.vae or None) if first else None,
        "sd_vae_hash": (first.vae_hash or None) if first else None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": first.denoising_strength if first else None,
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": [image.infotext for image in result.images],
        "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": first.clip_skip if first else 0,
        "is_using_inpainting_conditioning": False,
        "version": "latentforge",
        "interrupted": result.interrupted,
        "skipped": result.skipped,  # ours: batches ended early by /skip
        "warnings": warnings,
    }


def create_app(
    *,
    models_dir: Path | None = None,
    default_model: Path | None = None,
    token: str | None = None,
    queue_size: int = 8,
    limits: Limits | None = None,
    low_memory: bool = False,
) -> FastAPI:
    """The server's app; `models_dir` None serves the embedded model (or `default_model`)."""
    limits = limits or Limits()
    if models_dir is None and default_model is None:
        from latentforge.checkpoints.loading import default_model_path

        default_model = default_model_path()
    if models_dir is not None and not models_dir.is_dir():
        raise ParameterError(f"--models-dir {models_dir} is not a folder")
    if queue_size < 1:
        raise ParameterError(f"--queue-size must be at least 1, got {queue_size}")
    catalog = Catalog(models_dir, default_model, low_memory=low_memory)
    worker = Worker(catalog, queue_size)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(worker.close)  # interrupts the running job and joins the thread

    app = FastAPI(title="latentforge", description="A1111-compatible API", lifespan=lifespan)
    app.state.worker, app.state.catalog = worker, catalog

    @app.middleware("http")
    async def guard(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        # every route: the API, /docs, /openapi.json, the page at / and its /static files
        if token and not _authorized(request.headers.get("authorization", ""), token):
            return _error(401, "Unauthorized", "missing or wrong token", {"WWW-Authenticate": "Basic"})
        problem = _host_problem(request, token)
        if problem is not None:
            return _error(403, "Forbidden", problem)
        length = request.headers.get("content-length", "0")
        if not length.isdigit() or int(length) > MAX_BODY_BYTES:
            return _error(413, "PayloadTooLarge", f"the body exceeds {MAX_BODY_BYTES // 2**20} MiB")
        return await call_next(request)

    @app.exception_handler(LatentforgeError)
    async def user_error(request: Request, error: LatentforgeError) -> Response:
        status = 422 if isinstance(error, ParameterError) else 500
        return _error(status, type(error).__name__, str(error))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> Response:
        # a bug of ours: its type and message, the traceback only in the server's log (uvicorn prints it)
        return _error(500, type(error).__name__, f"internal error: {error}")

    def controlnet_files(request: GenerationRequest) -> tuple[Path, ...]:
        """Each ControlNet unit's file in the catalogue (422 before queueing for an unknown or path name)."""
        return tuple(
            catalog.find_controlnet(u.model, f"alwayson_scripts.controlnet.args[{i}].model")
            for i, u in enumerate(request.controlnet)
        )

    def vae_choice(name: str) -> str:
        """override_settings.sd_vae as a catalogue value (422 before queueing for an unknown or path name)."""
        return catalog.find_vae(name, "override_settings.sd_vae") if name else ""

    async def generate(request: Request, mode: str) -> Response:
        payload = await _json(request)
        try:
            mapped = await asyncio.to_thread(request_from_payload, payload, mode)
            check_limits(mapped.request, limits)
            use = catalog.find(mapped.checkpoint).title if mapped.checkpoint else ""
            job = worker.submit(
                mapped.request,
                use_model=use,
                use_vae=vae_choice(mapped.vae),
                controlnets=controlnet_files(mapped.request),
                task_id=mapped.task_id,
            )
        except ParameterError as error:
            return _error(422, "ParameterError", str(error))
        except QueueFullError as error:
            return _error(429, "QueueFull", str(error), {"Retry-After": str(RETRY_AFTER_S)})
        try:
            result = await asyncio.wrap_future(job.future)
        except ParameterError as error:
            return _error(422, "ParameterError", str(error))
        except LatentforgeError as error:
            return _error(500, type(error).__name__, str(error))
        except Exception as error:  # a bug of ours; the worker thread survives it
            return _error(500, type(error).__name__, f"internal error: {error}")
        warnings = [*mapped.warnings, *result.warnings]
        images = await asyncio.to_thread(lambda: [encode_png(i.image, i.infotext) for i in result.images])
        return JSONResponse(
            {
                "images": images if mapped.send_images else [],
                "parameters": parameters(payload, mode),
                "info": json.dumps(_info(result, warnings)),
                "warnings": warnings,
            }
        )

    @app.get("/", include_in_schema=False)
    def page() -> Response:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(request: Request) -> Response:
        return await generate(request, "txt2img")

    @app.post("/sdapi/v1/img2img")
    async def img2img(request: Request) -> Response:
        return await generate(request, "img2img")

    @app.get("/sdapi/v1/samplers")
    def samplers() -> list[dict[str, Any]]:
        return [{"name": name, "aliases": [], "options": dict(s.options)} for name, s in SAMPLERS.items()]

    @app.get("/sdapi/v1/schedulers")
    def schedulers() -> list[dict[str, Any]]:
        labels = ["Automatic", *SCHEDULES]
        return [
            {
                "name": label.lower().replace(" ", "_"),
                "label": label,
                "aliases": None,
                "default_rho": -1,
                "need_inner_model": False,
            }
            for label in labels
        ]

    @app.get("/sdapi/v1/sd-models")
    def sd_models() -> list[dict[str, Any]]:
        return [
            {
                "title": c.title,
                "model_name": c.model_name,
                "hash": catalog.hash_of(c),
                "sha256": None,
                "filename": c.path.name,
                "config": None,
            }
            for c in catalog.checkpoints()
        ]

    @app.get("/sdapi/v1/upscalers")
    def upscalers() -> list[dict[str, Any]]:
        return [
            {"name": n, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
            for n in UPSCALERS
        ]

    @app.get("/sdapi/v1/latent-upscale-modes")
    def latent_upscale_modes() -> list[dict[str, str]]:
        return [{"name": n} for n, u in UPSCALERS.items() if u.latent]

    @app.get("/sdapi/v1/sd-vae")
    def sd_vae() -> list[dict[str, Any]]:
        # A1111: [{model_name: file name, filename: path}]; "Automatic" and "None" are not listed there
        root = catalog.models_dir
        return [
            {"model_name": p.name, "filename": str(p.relative_to(root)) if root else p.name}
            for p in catalog.vaes()
        ]

    @app.get("/sdapi/v1/loras")
    def loras() -> list[dict[str, Any]]:
        # A1111 (extensions-builtin/Lora): name (the tag's name), alias, path, metadata; our path is
        # relative to the models folder (a server does not tell its file system)
        root = catalog.models_dir
        return [
            {
                "name": p.stem,
                "alias": p.stem,
                "path": str(p.relative_to(root)) if root else p.name,
                "metadata": {},
            }
            for p in catalog.loras()
        ]

    @app.get("/sdapi/v1/embeddings")
    def embeddings() -> dict[str, Any]:
        # A1111's shape: {loaded: {name: {step, sd_checkpoint, sd_checkpoint_name, shape, vectors}}, skipped}
        empty = {
            "step": None,
            "sd_checkpoint": None,
            "sd_checkpoint_name": None,
            "shape": None,
            "vectors": None,
        }
        loaded = catalog.loaded[1].embeddings if catalog.loaded else {}
        listing: dict[str, Any] = {"loaded": {}, "skipped": {}}
        for path in catalog.embeddings():
            e = loaded.get(path.stem)
            if e is None:  # another family's (skipped on load) or no model loaded yet
                listing["loaded" if not catalog.loaded else "skipped"][path.stem] = dict(empty)
                continue
            listing["loaded"][e.name] = {
                "step": e.step,
                "sd_checkpoint": e.checkpoint_hash,
                "sd_checkpoint_name": e.checkpoint_name,
                "shape": e.width,
                "vectors": e.count,
            }
        return listing

    @app.post("/sdapi/v1/refresh-checkpoints")
    def refresh_checkpoints() -> Response:
        return JSONResponse(None)  # the models folder is read on every listing: nothing is cached

    @app.post("/sdapi/v1/refresh-loras")
    def refresh_loras() -> Response:
        return JSONResponse(None)  # Lora/ is read on every listing too

    @app.post("/sdapi/v1/refresh-embeddings")
    def refresh_embeddings() -> Response:
        return JSONResponse(None)

    @app.get("/sdapi/v1/memory")
    def memory() -> dict[str, Any]:
        return _memory()

    @app.get("/sdapi/v1/scripts")
    def scripts() -> dict[str, list[str]]:
        # A1111 lists script titles in lower case; clients probe it for ControlNet (webuiapi: "controlnet")
        return {"txt2img": ["controlnet"], "img2img": ["controlnet"]}

    # sd-webui-controlnet's routes (scripts/api.py), over the models folder's ControlNet/ and our modules
    @app.get("/controlnet/version")
    def controlnet_version() -> dict[str, int]:
        return {"version": CONTROLNET_API_VERSION}

    @app.get("/controlnet/model_list")
    def controlnet_model_list(update: bool = True) -> dict[str, list[str]]:
        return {"model_list": [catalog.controlnet_title(p) for p in catalog.controlnets()]}

    @app.get("/controlnet/module_list")
    def controlnet_module_list(alias_names: bool = False) -> dict[str, Any]:
        return {"module_list": list(PREPROCESSORS), "module_detail": _module_detail()}

    @app.get("/controlnet/settings")
    def controlnet_settings() -> dict[str, int]:
        return {"control_net_unit_count": CONTROLNET_UNITS}

    @app.post("/controlnet/detect")
    async def controlnet_detect(request: Request) -> Response:
        body = await _json(request)
        if not isinstance(body, dict):
            return _error(422, "ParameterError", "detect: send a JSON object")
        images = await asyncio.to_thread(_detect, body)
        return JSONResponse({"images": images, "info": "Success"})

    @app.get("/sdapi/v1/options")
    def get_options() -> dict[str, Any]:
        return {
            "sd_model_checkpoint": catalog.selected,
            "sd_vae": catalog.selected_vae,
            "show_progress_type": worker.preview_type,
            "samples_format": "png",
        }

    @app.post("/sdapi/v1/options")
    async def set_options(request: Request) -> Response:
        body = await _json(request)
        if not isinstance(body, dict):
            return _error(422, "ParameterError", "options: send a JSON object of option names")
        unknown = sorted(set(body) - set(SETTABLE_OPTIONS))
        if unknown:
            return _error(
                422, "ParameterError", f"options {unknown} cannot be set; settable: {SETTABLE_OPTIONS}"
            )
        kind = body.get("show_progress_type", worker.preview_type)
        if kind not in PREVIEW_TYPES:
            return _error(422, "ParameterError", f"show_progress_type {kind!r}: one of {PREVIEW_TYPES}")
        switch = {}
        if "sd_model_checkpoint" in body:
            name = body["sd_model_checkpoint"]
            switch["checkpoint"] = catalog.find(name if isinstance(name, str) else repr(name)).title
        if "sd_vae" in body:
            name = body["sd_vae"]
            switch["select_vae"] = catalog.find_vae(name if isinstance(name, str) else repr(name))
        if switch:
            try:  # a queued switch: it waits for the running and queued jobs, then loads (A1111 blocks too)
                job = worker.submit(None, **switch)
            except QueueFullError as error:
                return _error(429, "QueueFull", str(error), {"Retry-After": str(RETRY_AFTER_S)})
            await asyncio.wrap_future(job.future)
        worker.preview_type = kind  # a display setting: the next preview uses it (not queued)
        return JSONResponse(None)

    @app.get("/sdapi/v1/progress")
    def progress(skip_current_image: bool = False) -> dict[str, Any]:
        job = worker.current
        pending = worker.queue.qsize()
        state = {
            "skipped": bool(job and job.skipped),
            "interrupted": bool(job and job.interrupted),
            "stopping_generation": False,
            "job": "",
            "job_count": pending + (job is not None),
            "job_timestamp": "0",
            "job_no": 0,
            "sampling_step": job.step if job else 0,
            "sampling_steps": job.total_steps if job else 0,
        }
        if job is None or not job.total_steps:
            return {
                "progress": 0.0,
                "eta_relative": 0.0,
                "state": state,
                "current_image": None,
                "textinfo": None,
            }
        done = min(job.step / job.total_steps, 1.0)
        elapsed = time.time() - job.started
        eta = elapsed / done - elapsed if done > 0 else 0.0
        image = None
        latest, model = job.latest, job.model
        if not skip_current_image and latest is not None and model is not None:
            preview = worker.preview(model, latest)
            image = encode_png(preview, None)
        return {
            "progress": done,
            "eta_relative": eta,
            "state": state,
            "current_image": image,
            "textinfo": None,
        }

    @app.post("/internal/progress")
    async def task_progress(request: Request) -> dict[str, Any]:
        """A1111's per-task progress (modules/progress.py): any queued, running or recent job by the
        `force_task_id` its request carried; `textinfo` says how many jobs wait before a queued one."""
        body = await _json(request)
        task_id = body.get("id_task") if isinstance(body, dict) else None
        job = worker.tasks.get(task_id) if isinstance(task_id, str) else None
        reply: dict[str, Any] = {"active": False, "queued": False, "completed": False, "progress": None}
        reply |= {"eta": None, "live_preview": None, "id_live_preview": -1, "textinfo": None}
        if job is None:
            return reply | {"textinfo": "Unknown task"}
        if job.future.done():
            return reply | {"completed": True, "progress": 1.0, "textinfo": "Done"}
        ahead = worker.ahead_of(job)
        if ahead is not None:
            return reply | {"queued": True, "textinfo": f"In queue: {ahead} ahead"}
        done = min(job.step / job.total_steps, 1.0) if job.total_steps else 0.0
        elapsed = time.time() - job.started
        eta = elapsed / done - elapsed if done > 0 else None
        preview = None
        latest, model = job.latest, job.model
        if body.get("live_preview", True) and latest is not None and model is not None:
            preview = "data:image/png;base64," + encode_png(worker.preview(model, latest), None)
        return reply | {
            "active": True,
            "progress": done,
            "eta": eta,
            "live_preview": preview,
            "id_live_preview": job.step,
            "textinfo": f"Step {job.step} of {job.total_steps}",
        }

    @app.post("/sdapi/v1/interrupt")
    def interrupt() -> Response:
        worker.interrupt()
        return JSONResponse(None)

    @app.post("/sdapi/v1/skip")
    def skip() -> Response:
        worker.skip()
        return JSONResponse(None)

    @app.post("/latentforge/v1/xyz")
    async def xyz(request: Request) -> Response:
        """An X/Y/Z plot (not an A1111 route): {payload: txt2img fields, x, y, z: "FIELD=V1,V2"}."""
        body = await _json(request)
        if not isinstance(body, dict):
            return _error(422, "ParameterError", "xyz: send {payload, x, y, z}")
        axes = [
            parse_axis(body[k]) for k in ("x", "y", "z") if isinstance(body.get(k), str) and body[k].strip()
        ]
        if not axes:
            return _error(422, "ParameterError", "x: give at least the X axis as FIELD=V1,V2,...")
        mapped = await asyncio.to_thread(request_from_payload, body.get("payload", {}), "txt2img")
        check_limits(mapped.request, limits)
        cells = 1
        for axis in axes:
            cells *= len(axis.values)
        if cells > limits.max_images:
            return _error(
                422, "ParameterError", f"{cells} cells exceed this server's limit of {limits.max_images}"
            )
        try:
            use = catalog.find(mapped.checkpoint).title if mapped.checkpoint else ""
            files = controlnet_files(mapped.request)
            job = worker.submit(
                mapped.request,
                axes=tuple(axes),
                use_model=use,
                use_vae=vae_choice(mapped.vae),
                controlnets=files,
            )
        except QueueFullError as error:
            return _error(429, "QueueFull", str(error), {"Retry-After": str(RETRY_AFTER_S)})
        result = await asyncio.wrap_future(job.future)
        encode = encode_png
        grids = await asyncio.to_thread(lambda: [encode(g, None) for g in result.grids])
        images = await asyncio.to_thread(lambda: [encode(i.image, i.infotext) for i in result.images])
        warnings = [*mapped.warnings, *result.warnings]
        return JSONResponse(
            {
                "grids": grids,
                "images": images,
                "info": json.dumps(_info(result, warnings)),
                "warnings": warnings,
            }
        )

    @app.post("/sdapi/v1/png-info")
    async def png_info(request: Request) -> Response:
        body = await _json(request)
        image = decode_image("image", body.get("image") if isinstance(body, dict) else None)
        text = read_infotext(image)
        if text is None:
            return JSONResponse({"info": "", "items": {}, "parameters": {}})
        prompt, negative, values = parse_infotext(text)
        params: dict[str, Any] = {"Prompt": prompt, "Negative prompt": negative, **values}
        if "Size" in values:  # A1111's parse_generation_parameters splits the size
            params["Size-1"], _, params["Size-2"] = values["Size"].partition("x")
        items = {k: v for k, v in image.info.items() if isinstance(v, str) and k != "parameters"}
        return JSONResponse({"info": text, "items": {"parameters": text, **items}, "parameters": params})

    return app


CONTROLNET_API_VERSION = 2  # sd-webui-controlnet's external_code.get_api_version()
CONTROLNET_UNITS = 3  # its default "Multi-ControlNet: max models" setting; we take any number of units
_DETECT_KEYS = (
    "controlnet_module",
    "controlnet_input_images",
    "controlnet_processor_res",
    "controlnet_threshold_a",
    "controlnet_threshold_b",
    "controlnet_masks",
    "low_vram",
)


def _module_detail() -> dict[str, Any]:
    """The extension's `module_detail`: model_free, and the sliders (resolution, thresholds) with defaults."""
    detail = {}
    for name, spec in PREPROCESSORS.items():
        sliders: list[dict[str, Any]] = []
        if name != "none":
            sliders.append(
                {"name": "Preprocessor Resolution", "value": 512, "min": 64, "max": 2048, "step": 8}
            )
        for slot in (spec.threshold_a, spec.threshold_b):
            if slot is not None:
                sliders.append({"name": slot[0], "value": slot[1]})
        detail[name] = {"model_free": True, "sliders": sliders}
    return detail


def _detect(body: dict[str, Any]) -> list[str]:
    """/controlnet/detect: each base64 image through one module, the maps as base64 PNGs."""
    import numpy as np

    from latentforge.server.payload import _float, _int, _str

    unknown = sorted(set(body) - set(_DETECT_KEYS))
    if unknown:
        raise ParameterError(f"detect: unknown fields {unknown}; valid: {', '.join(_DETECT_KEYS)}")
    module = _str("controlnet_module", body.get("controlnet_module", "none"))
    spec = get_preprocessor(module)
    if spec.needs_mask:
        raise ParameterError(
            f"controlnet_module {module!r}: its map is made from the request's inpainting mask"
        )
    images = body.get("controlnet_input_images", [])
    if not isinstance(images, list) or not images:
        raise ParameterError("controlnet_input_images: give a non-empty list of base64 images")
    res = _int("controlnet_processor_res", body.get("controlnet_processor_res", -1))
    res = 512 if res == -1 else res
    if not 64 <= res <= 4096:
        raise ParameterError(f"controlnet_processor_res must be in [64, 4096] (or -1), got {res}")
    a = _float("controlnet_threshold_a", body.get("controlnet_threshold_a", -1))
    b = _float("controlnet_threshold_b", body.get("controlnet_threshold_b", -1))
    out = []
    for i, value in enumerate(images):
        image = np.asarray(decode_image(f"controlnet_input_images[{i}]", value).convert("RGB"))
        detected = run_preprocessor(module, image, res, a, b, rng=np.random.default_rng(0))
        out.append(encode_png(Image.fromarray(detected), None))
    return out


def _memory() -> dict[str, Any]:
    """A1111's /memory: `ram` used = this process's resident memory; `cuda` or its error."""
    page = os.sysconf("SC_PAGE_SIZE")
    total = os.sysconf("SC_PHYS_PAGES") * page
    try:
        with open("/proc/self/statm") as f:  # Linux; the second field is resident pages
            used = int(f.read().split()[1]) * page
    except OSError:
        import resource

        used = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # peak, where statm is missing
    ram = {"free": total - used, "used": used, "total": total}
    import torch

    if not torch.cuda.is_available():
        return {"ram": ram, "cuda": {"error": "no CUDA device"}}
    free, total_gpu = torch.cuda.mem_get_info()
    system = {"free": free, "used": total_gpu - free, "total": total_gpu}
    return {"ram": ram, "cuda": {"system": system, "active": {"current": torch.cuda.memory_allocated()}}}


def serve(
    host: str = "127.0.0.1",
    port: int = 7860,
    *,
    models_dir: Path | None = None,
    token: str | None = None,
    queue_size: int = 8,
    low_memory: bool = False,
) -> None:
    """Run the app under uvicorn until interrupted; a non-loopback bind needs a token."""
    import uvicorn

    if not _loopback(host) and not token:
        raise ParameterError(f"--host {host} is reachable from other machines: also give --token")
    app = create_app(models_dir=models_dir, token=token, queue_size=queue_size, low_memory=low_memory)
    uvicorn.run(app, host=host, port=port, log_level="info")
