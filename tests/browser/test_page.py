"""The web page at `/` in a real headless Chromium (Debian's `chromium`, driven by Playwright), against
`latentforge serve` on loopback with a token: generate, infotext, interrupt, mask + inpaint, PNG info,
X/Y plot, phone width, labels. Skipped, with the reason, where the browser is not installed
(scripts/test.sh installs it). With LATENTFORGE_SCREENSHOTS=DIR the embedded model is served and the
screenshots land in DIR (docs/screenshots was made so); otherwise a tiny random model, 2 steps, 64 px.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM = Path("/usr/bin/chromium")
# no network of its own: no QUIC, sync, component updates or first-run work (this machine is offline)
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
if not CHROMIUM.exists():
    pytest.skip(
        f"{CHROMIUM} is missing: `apt-get install chromium` (scripts/test.sh does)", allow_module_level=True
    )
sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extra)")
uvicorn = pytest.importorskip("uvicorn")

from latentforge.server.app import create_app  # noqa: E402

TOKEN = "page-token"
SHOTS = os.environ.get("LATENTFORGE_SCREENSHOTS")
STEPS = 12 if SHOTS else 2  # the screenshots show the embedded model at a useful step count
PROMPT = "a smiling cat"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    if SHOTS:
        app = create_app(token=TOKEN, queue_size=4)  # the embedded model
    else:
        folder = tmp_path_factory.mktemp("page-models")
        shutil.copy(tiny_checkpoint, folder / "tiny.safetensors")
        (folder / "Lora").mkdir()
        (folder / "Lora" / "ink_style.safetensors").write_bytes(b"")
        app = create_app(models_dir=folder, token=TOKEN, queue_size=4)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/"
    server.should_exit = True
    thread.join(30)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    # the browser's own basic-auth login (any user name, the token as password) covers / and /static too
    context = browser.new_context(
        viewport={"width": 1280, "height": 900}, http_credentials={"username": "me", "password": TOKEN}
    )
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(server)
    page.wait_for_function("document.getElementById('status').textContent === 'ready'", timeout=30000)
    yield page
    context.close()
    assert not errors, errors


def _shot(page, name: str, tmp_path: Path) -> None:
    page.screenshot(path=str(tmp_path / f"{name}.png"), full_page=True)
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SHOTS) / f"{name}.png"), full_page=True)


def _image(src: str) -> np.ndarray:
    image = Image.open(io.BytesIO(base64.b64decode(src.partition(",")[2])))
    return np.asarray(image.convert("RGB"), dtype=int)


def _fill(page, **values: str) -> None:
    for field, value in {"steps": str(STEPS), "width": "64", "height": "64", **values}.items():
        page.fill(f"#{field}", value)


def test_page_needs_the_token(browser, server):
    context = browser.new_context()
    for path in ("", "static/app.js"):
        response = context.request.get(server + path)
        assert response.status == 401 and response.headers["www-authenticate"] == "Basic"
    with pytest.raises(sync_api.Error, match="AUTH"):  # a login the headless browser cannot answer
        context.new_page().goto(server)
    context.close()


def test_generate_shows_the_image_and_its_infotext(page, tmp_path):
    page.fill("#prompt", PROMPT)
    _fill(page, seed="3")
    page.press("#prompt", "Control+Enter")  # the keyboard shortcut
    page.wait_for_selector("#gallery button", timeout=60000)
    infotext = page.inner_text("#infotext")
    assert infotext.startswith(PROMPT) and f"Steps: {STEPS}," in infotext and "Seed: 3," in infotext
    assert page.eval_on_selector("#selected-image", "img => img.naturalWidth") == 64
    assert "1 image(s), seed 3" in page.inner_text("#status")
    page.click("#dice")
    assert page.input_value("#seed") == "-1"
    page.click("#recycle")
    assert page.input_value("#seed") == "3"
    _shot(page, "page-desktop", tmp_path)
    page.set_viewport_size({"width": 390, "height": 844})
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # no sideways scrolling
    _shot(page, "page-phone", tmp_path)


def test_lora_picker_inserts_a_tag(page):
    if SHOTS:
        pytest.skip("the embedded model's folder has no Lora/")
    page.fill("#prompt", "a fox")
    page.click("#insert-lora")
    assert page.input_value("#prompt") == "a fox, <lora:ink_style:1>"


def test_interrupt_a_long_job_keeps_the_finished_images(page):
    page.fill("#prompt", PROMPT)
    _fill(page, **{"batch-count": "100", "steps": "20"})  # the form's limit, as A1111's slider
    page.click("#generate")
    page.wait_for_function(
        "document.getElementById('progress').value > 0 && !!document.getElementById('preview').src",
        timeout=60000,
    )
    assert page.is_enabled("#interrupt") and page.is_disabled("#generate")
    page.click("#interrupt")
    page.wait_for_function(
        "document.getElementById('status').textContent.includes('interrupted')", timeout=60000
    )
    count = page.locator("#gallery button").count()
    assert 1 <= count < 100
    assert page.is_enabled("#generate")


def test_skip_ends_one_batch_and_the_others_finish(page):
    page.fill("#prompt", PROMPT)
    _fill(page, **{"batch-count": "3", "steps": "40", "seed": "20"})
    page.click("#generate")
    page.wait_for_function("document.getElementById('progress').value > 0", timeout=60000)
    page.click("#skip")
    page.wait_for_function("document.querySelectorAll('#gallery button').length === 3", timeout=120000)
    assert "(1 batch skipped)" in page.inner_text("#status")
    assert "interrupted" not in page.inner_text("#status")
    seeds = []
    for button in page.locator("#gallery button").all():
        button.click()
        seeds.append(page.inner_text("#infotext").split("Seed: ")[1].split(",")[0])
    assert sorted(seeds) == ["20", "21", "22"]  # the skipped batch's image is kept, the others ran


def test_paint_a_mask_and_inpaint(page, tmp_path):
    page.fill("#prompt", PROMPT)
    _fill(page, seed="5")
    page.click("#generate")
    page.wait_for_selector("#gallery button", timeout=60000)
    page.click("#to-img2img")
    page.wait_for_selector("#canvas-box:not([hidden])")
    init = _image(page.get_attribute("#init-image", "src"))
    page.fill("#mask-blur", "0")
    page.fill("#denoise", "1")
    page.eval_on_selector("#brush", "el => { el.value = '40'; }")
    box = page.locator("#mask").bounding_box()
    assert box is not None
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(cx - box["width"] / 8, cy)
    page.mouse.down()
    page.mouse.move(cx + box["width"] / 8, cy, steps=5)
    page.mouse.up()
    _shot(page, "page-inpaint-mask", tmp_path)
    page.press("#prompt", "Control+Enter")
    page.wait_for_function("document.querySelectorAll('#gallery button').length === 2", timeout=60000)
    infotext = page.inner_text("#infotext")
    assert "Mask blur: 0" in infotext and "Denoising strength: 1" in infotext
    _shot(page, "page-inpaint-result", tmp_path)
    result = _image(page.get_attribute("#selected-image", "src"))
    assert (result[:8] == init[:8]).all()  # outside the painted stroke: the init image, pasted back
    assert (result[28:36, 28:36] != init[28:36, 28:36]).any()  # under the stroke: repainted


def test_png_info_by_drag_and_drop_and_send_to_txt2img(page, server):
    page.fill("#prompt", PROMPT)
    _fill(page, seed="9")
    page.click("#generate")
    page.wait_for_selector("#gallery button", timeout=60000)
    png = page.get_attribute("#selected-image", "src").partition(",")[2]
    page.fill("#prompt", "something else")
    page.fill("#seed", "-1")
    page.click("#tab-pnginfo")
    page.evaluate(
        """(b64) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], "result.png", { type: "image/png" }));
            document.getElementById("drop").dispatchEvent(new DragEvent("drop", { dataTransfer: transfer }));
        }""",
        png,
    )
    page.wait_for_function("document.getElementById('png-text').textContent.includes('Seed: 9')")
    page.click("#png-to-txt2img")
    assert page.input_value("#prompt") == PROMPT and page.input_value("#seed") == "9"
    assert page.get_attribute("#tab-txt2img", "aria-selected") == "true"


def test_xyz_plot_form(page):
    page.fill("#prompt", PROMPT)
    _fill(page, seed="1")
    page.click("#tab-xyz")
    page.fill("#xyz-x", "steps=1,2")
    page.click("#generate")
    page.wait_for_function("document.querySelectorAll('#gallery button').length === 3", timeout=60000)
    assert page.inner_text("#infotext").startswith(PROMPT)  # the last cell, selected


def test_every_control_has_a_label_and_tab_order_follows_the_form(page):
    unlabelled = page.evaluate(
        """() => [...document.querySelectorAll('input, select, textarea')]
            .filter((el) => !el.labels.length && !el.getAttribute('aria-label')).map((el) => el.id)"""
    )
    assert unlabelled == []
    page.focus("#prompt")
    order = []
    for _ in range(4):
        page.keyboard.press("Tab")
        order.append(page.evaluate("document.activeElement.id"))
    # the LoRA picker is disabled (skipped by Tab) when Lora/ is empty, as for the embedded model
    expected = (
        ["negative", "sampler", "schedule", "steps"]
        if SHOTS
        else ["negative", "lora", "insert-lora", "sampler"]
    )
    assert order == expected


@pytest.mark.parametrize("suffix", [".jpg", ".webp"])
def test_png_info_reads_jpeg_and_webp(page, tmp_path, suffix):
    from latentforge.pipelines.infotext import save_image

    text = "a red fox\nNegative prompt: blur\nSteps: 7, Sampler: Euler a, Seed: 42, Size: 64x64"
    path = save_image(Image.new("RGB", (64, 64), "orange"), tmp_path / f"fox{suffix}", text)
    page.click("#tab-pnginfo")
    page.set_input_files("#png-file", str(path))
    page.wait_for_function("document.getElementById('png-text').textContent.includes('Seed: 42')")
    assert page.inner_text("#png-text") == text


def test_token_field_sends_a_bearer_token(page):
    page.evaluate("sessionStorage.setItem('latentforge-token', 'wrong')")  # overrides the browser's login
    page.reload()
    page.wait_for_function("document.getElementById('status').textContent.includes('401')")
    assert page.get_attribute("#auth", "open") is not None  # the Token field opens by itself
    page.fill("#token", TOKEN)
    page.press("#token", "Enter")
    page.wait_for_function("document.getElementById('status').textContent === 'ready'")
    assert page.evaluate("sessionStorage.getItem('latentforge-token')") == TOKEN
    page.fill("#prompt", PROMPT)
    _fill(page)
    page.press("#prompt", "Control+Enter")
    page.wait_for_selector("#gallery button", timeout=60000)
