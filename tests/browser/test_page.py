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
from safetensors.torch import save_file

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


VAE_NAME = "emoji-vae-copy.safetensors" if SHOTS else "blue.safetensors"


def _shots_folder(folder: Path) -> None:
    """The embedded model, a copy of its own VAE as a VAE/ file and an untrained (zero-initialised, so
    no-op) ControlNet of its U-Net: the panels filled for the screenshots, the images the model's own."""
    from latentforge.checkpoints.controlnet import save_controlnet
    from latentforge.checkpoints.loading import default_model_path
    from latentforge.model import load
    from latentforge.models.controlnet import ControlNetConfig, ControlNetModel

    embedded = default_model_path()
    (folder / embedded.name).symlink_to(embedded)
    model = load(embedded)
    (folder / "VAE").mkdir()
    save_file({k: v.contiguous() for k, v in model.vae.state_dict().items()}, str(folder / "VAE" / VAE_NAME))
    config = ControlNetConfig.for_base(model.family.unet, model.family.vae.downsampling_factor)
    (folder / "ControlNet").mkdir()
    save_controlnet(
        folder / "ControlNet" / "emoji-untrained.safetensors", ControlNetModel.from_unet(model.unet, config)
    )


def _tiny_folder(folder: Path, tiny_checkpoint: Path) -> None:
    """The tiny random model, an empty LoRA file, a random VAE and a random ControlNet (both tiny)."""
    import torch

    from latentforge.checkpoints.controlnet import save_controlnet
    from latentforge.models.controlnet import ControlNetConfig, ControlNetModel
    from latentforge.models.families import TINY
    from latentforge.models.vae import AutoencoderKL

    shutil.copy(tiny_checkpoint, folder / "tiny.safetensors")
    (folder / "Lora").mkdir()
    (folder / "Lora" / "ink_style.safetensors").write_bytes(b"")
    torch.manual_seed(1)
    vae = AutoencoderKL(TINY.vae)
    for p in vae.parameters():
        torch.nn.init.normal_(p, std=0.05)
    (folder / "VAE").mkdir()
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(folder / "VAE" / VAE_NAME))
    controlnet = ControlNetModel(ControlNetConfig.for_base(TINY.unet, TINY.vae.downsampling_factor))
    for p in controlnet.parameters():
        torch.nn.init.normal_(p, std=0.1)  # zero convolutions at zero would make the unit a no-op
    (folder / "ControlNet").mkdir()
    save_controlnet(folder / "ControlNet" / "cn_edges.safetensors", controlnet.eval())


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("page-models")
    if SHOTS:
        _shots_folder(folder)
    else:
        _tiny_folder(folder, tiny_checkpoint)
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


def test_vae_picker_names_the_vae_in_the_infotext(page):
    assert page.input_value("#vae") == "Automatic"
    assert [o for o in page.eval_on_selector_all("#vae option", "os => os.map((o) => o.value)")] == [
        "Automatic",
        "None",
        VAE_NAME,
    ]
    page.fill("#prompt", PROMPT)
    _fill(page, seed="4")
    page.select_option("#vae", VAE_NAME)
    page.press("#prompt", "Control+Enter")
    page.wait_for_selector("#gallery button", timeout=60000)
    assert f"VAE: {VAE_NAME}" in page.inner_text("#infotext") and "VAE hash: " in page.inner_text("#infotext")
    page.select_option("#vae", "None")  # A1111's "None": the model's own VAE
    page.press("#prompt", "Control+Enter")
    page.wait_for_function("document.querySelectorAll('#gallery button').length === 2", timeout=60000)
    assert "VAE" not in page.inner_text("#infotext")


def _image_b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def _drop_file(page, selector: str, b64: str, name: str) -> None:
    """A file dropped on `selector` as a browser's drag and drop delivers it (a DataTransfer)."""
    page.eval_on_selector(
        selector,
        """(el, [b64, name]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, { type: "image/png" }));
            el.dispatchEvent(new DragEvent("drop", { dataTransfer: transfer }));
        }""",
        [b64, name],
    )


def _square_png(path: Path) -> Path:
    image = np.zeros((64, 64, 3), np.uint8)
    image[16:48, 16:48] = 255
    Image.fromarray(image).save(path)
    return path


def test_controlnet_panel_previews_the_map_and_generates_with_the_unit(page, tmp_path):
    assert not page.is_visible("#cn-module")  # collapsed until opened
    page.click("#cn-panel summary")
    assert page.is_visible("#cn-note") is False and page.is_enabled("#cn-module")
    models = page.eval_on_selector_all("#cn-model option", "os => os.map((o) => o.value)")
    assert len(models) == 1 and models[0].startswith(("cn_edges [", "emoji-untrained ["))
    page.set_input_files("#cn-file", str(_square_png(tmp_path / "square.png")))  # (a native, tabbable input)
    page.wait_for_selector("#cn-image:not([hidden])")
    assert page.is_checked("#cn-enabled")  # an image enables the unit, as the extension does
    page.select_option("#cn-module", "canny")
    assert page.inner_text("#cn-a-name") == "low" and page.input_value("#cn-b") == "200"
    _fill(page, seed="6")  # 64 x 64, the control image's size
    page.check("#cn-pixel-perfect")
    assert page.is_hidden("#cn-res")  # derived from the image and the size, as the extension's UI
    page.click("#cn-preview")
    page.wait_for_selector("#cn-map:not([hidden])", timeout=30000)
    edges = _image(page.get_attribute("#cn-map", "src"))
    assert edges.shape[:2] == (64, 64)  # pixel perfect: the map at the generation's resolution
    assert edges[32, 32].max() == 0 and edges[0, 0].max() == 0 and edges.max() == 255  # the outline only
    page.fill("#cn-weight", "1.5")
    page.select_option("#cn-control-mode", "ControlNet is more important")
    page.fill("#prompt", PROMPT)
    page.press("#prompt", "Control+Enter")
    page.wait_for_selector("#gallery button", timeout=60000)
    infotext = page.inner_text("#infotext")
    assert 'ControlNet 0: "Module: canny' in infotext and "Weight: 1.5" in infotext
    assert "Pixel Perfect: True" in infotext
    assert "Control Mode: ControlNet is more important" in infotext
    _shot(page, "page-controlnet", tmp_path)
    with_unit = _image(page.get_attribute("#selected-image", "src"))
    page.uncheck("#cn-enabled")
    page.press("#prompt", "Control+Enter")
    page.wait_for_function("document.querySelectorAll('#gallery button').length === 2", timeout=60000)
    assert "ControlNet" not in page.inner_text("#infotext")
    if not SHOTS:  # the random ControlNet changes the image (the screenshots' untrained one cannot)
        assert (_image(page.get_attribute("#selected-image", "src")) != with_unit).any()
    page.click("#cn-clear")
    assert page.is_hidden("#cn-image") and page.is_hidden("#cn-map")
    _drop_file(page, "#cn-drop", _image_b64(tmp_path / "square.png"), "square.png")  # drag and drop
    page.wait_for_selector("#cn-image:not([hidden])")
    page.focus("#cn-enabled")
    order = []
    for _ in range(6):
        page.keyboard.press("Tab")
        order.append(page.evaluate("document.activeElement.id"))
    # no resolution field: pixel perfect derives it
    assert order == ["cn-file", "cn-module", "cn-model", "cn-a", "cn-b", "cn-weight"]
    page.set_viewport_size({"width": 390, "height": 844})
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # the open panel fits a phone


def test_controlnet_panel_is_disabled_with_a_note_without_models(page):
    page.route("**/controlnet/model_list", lambda route: route.fulfill(json={"model_list": []}, status=200))
    page.reload()
    page.wait_for_function("document.getElementById('status').textContent === 'ready'", timeout=30000)
    page.click("#cn-panel summary")
    assert page.is_visible("#cn-note") and "ControlNet/" in page.inner_text("#cn-note")
    assert page.is_disabled("#cn-enabled") and page.is_disabled("#cn-preview")


def test_interrupt_an_xyz_job(page):
    page.fill("#prompt", PROMPT)
    _fill(page)
    page.click("#tab-xyz")
    page.fill("#xyz-x", "seed=" + ",".join(str(s) for s in range(1, 11)))
    page.fill("#xyz-y", "steps=40,50")
    page.click("#generate")
    page.wait_for_function(
        "document.getElementById('progress').value > 0"
        " && document.getElementById('progress-text').textContent.includes('of 900')",
        timeout=60000,
    )
    page.click("#interrupt")
    page.wait_for_function(
        "document.getElementById('status').textContent.includes('interrupted')", timeout=60000
    )
    count = page.locator("#gallery button").count()
    assert 2 <= count < 21  # the grid and the cells made before the interrupt
    assert page.is_enabled("#generate")


def test_speed_group_is_off_by_default_and_its_options_reach_the_infotext(page, tmp_path):
    page.fill("#prompt", PROMPT)
    _fill(page, seed="5")
    assert page.evaluate("document.getElementById('speed-panel').open") is False
    page.click("#generate")
    page.wait_for_selector("#gallery button", timeout=60000)
    plain = page.inner_text("#infotext")
    assert not any(
        key in plain for key in ("NGMS", "CFG cutoff", "Token merging", "DeepCache", "Fast decode")
    )
    page.click("#speed-panel summary")
    _fill(page, seed="5", ngms="1", **{"cfg-cutoff": "0.5", "tome": "0.5", "deepcache": "2"})
    page.fill("#deepcache-branch", "1")
    page.click("#generate")
    page.wait_for_function("document.querySelectorAll('#gallery button').length === 2", timeout=60000)
    infotext = page.inner_text("#infotext")
    for key in (
        "NGMS: 1",
        "CFG cutoff: 0.5",
        "Token merging ratio: 0.5",
        "DeepCache interval: 2",
        "DeepCache branch: 1",
    ):
        assert key in infotext, infotext
    # PNG info -> txt2img: the image's speed options come back, and off where the infotext has none
    png = page.get_attribute("#selected-image", "src").partition(",")[2]
    page.fill("#cfg-cutoff", "1")
    page.click("#tab-pnginfo")
    _drop_file(page, "#drop", png, "fast.png")
    page.wait_for_function("document.getElementById('png-text').textContent.includes('DeepCache')")
    page.click("#png-to-txt2img")
    assert page.input_value("#cfg-cutoff") == "0.5" and page.input_value("#deepcache") == "2"
    if not SHOTS:  # the tiny model has no TAESD: the server's 422 names the field
        page.check("#fast-decode")
        page.click("#generate")
        page.wait_for_function("document.getElementById('status').textContent.includes('fast_decode')")
