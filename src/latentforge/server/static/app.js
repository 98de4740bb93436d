// latentforge page: plain JS over the server's A1111 routes (docs/server.md). No build step, no CDN.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  mode: "txt2img", busy: false, lastSeed: -1, selected: null, maskPainted: false, pngParams: null,
  cnImage: null, cnDetail: {}, cnHasRes: false,  // the ControlNet unit's image (data URL), module_detail of /controlnet/module_list
};

// ---- requests: relative URLs (works behind a path prefix), optional bearer token from this tab only
function authHeaders() {
  const token = sessionStorage.getItem("latentforge-token");
  return token ? { Authorization: `Bearer ${token}` } : {};
}

async function api(path, body) {
  const options = { headers: { ...authHeaders() } };
  if (body !== undefined) {
    options.method = "POST";
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  const data = await response.json().catch(() => null);
  if (!response.ok) {
    if (response.status === 401) $("auth").open = true;
    const retry = response.headers.get("Retry-After");
    const detail = (data && data.detail) || response.statusText;
    throw new Error(`${response.status}: ${detail}${retry ? ` (retry in ${retry} s)` : ""}`);
  }
  return data;
}

function say(text, error = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", error);
}

function fillSelect(select, items, selected) {
  select.replaceChildren(
    ...items.map(([value, label]) => {
      const option = new Option(label, value);
      option.selected = value === selected;
      return option;
    }),
  );
}

async function loadLists() {
  const [samplers, schedulers, models, vaes, loras, options] = await Promise.all(
    ["samplers", "schedulers", "sd-models", "sd-vae", "loras", "options"].map((r) => api(`sdapi/v1/${r}`)),
  );
  const [modules, cnModels] = await Promise.all([api("controlnet/module_list"), api("controlnet/model_list")]);
  fillSelect($("sampler"), samplers.map((s) => [s.name, s.name]), "Euler a");
  fillSelect($("schedule"), schedulers.map((s) => [s.label, s.label]), "Automatic");
  fillSelect($("model"), models.map((m) => [m.title, m.model_name]), options.sd_model_checkpoint);
  // A1111's choices: Automatic (a VAE named like the model, else its own), None (the model's own), the files
  const vaeChoices = ["Automatic", "None", ...vaes.map((v) => v.model_name)];
  fillSelect($("vae"), vaeChoices.map((v) => [v, v]), options.sd_vae);
  fillSelect($("lora"), loras.map((l) => [l.name, l.alias || l.name]));
  $("lora").disabled = $("insert-lora").disabled = loras.length === 0;
  if (!loras.length) fillSelect($("lora"), [["", "none in Lora/"]]);
  state.cnDetail = modules.module_detail || {};
  fillSelect($("cn-module"), modules.module_list.map((m) => [m, m]), $("cn-module").value || "none");
  fillSelect($("cn-model"), cnModels.model_list.map((m) => [m, m]));
  const noModels = cnModels.model_list.length === 0;
  $("cn-fields").disabled = noModels;  // a unit needs a model: say where to put one instead
  $("cn-note").hidden = !noModels;
  if (noModels) $("cn-enabled").checked = false;
  showModuleSliders();
}

// ---- tabs
function setMode(mode) {
  state.mode = mode;
  for (const tab of document.querySelectorAll("[role=tab]")) {
    tab.setAttribute("aria-selected", String(tab.id === `tab-${mode}`));
  }
  $("generate-panel").hidden = mode === "pnginfo";
  $("generate-panel").setAttribute("aria-labelledby", `tab-${mode}`);
  $("pnginfo-panel").hidden = mode !== "pnginfo";
  $("img2img-fields").hidden = mode !== "img2img";
  $("xyz-fields").hidden = mode !== "xyz";
  $("generate").textContent = mode === "xyz" ? "Run plot" : "Generate";
}

// ---- the A1111 payload from the form
const num = (id) => Number($(id).value);

function payload() {
  const body = {
    prompt: $("prompt").value,
    negative_prompt: $("negative").value,
    sampler_name: $("sampler").value,
    scheduler: $("schedule").value,
    steps: num("steps"),
    cfg_scale: num("cfg"),
    width: num("width"),
    height: num("height"),
    seed: num("seed"),
    batch_size: num("batch-size"),
    n_iter: num("batch-count"),
  };
  body.override_settings = { sd_vae: $("vae").value };  // for this request, as A1111's override_settings
  speedFields(body);
  if ($("cn-enabled").checked && !$("cn-fields").disabled) {
    body.alwayson_scripts = { controlnet: { args: [controlNetUnit()] } };
  }
  return body;
}

// ---- Speed: A1111's NGMS field and token merging option, our extension fields; sent when not off
function speedFields(body) {
  if (num("ngms") > 0) body.s_min_uncond = num("ngms");
  if ($("cfg-cutoff").value !== "" && num("cfg-cutoff") < 1) body.cfg_cutoff = num("cfg-cutoff");
  if (num("tome") > 0) body.override_settings.token_merging_ratio = num("tome");
  if (num("deepcache") > 1) {
    body.deepcache_interval = num("deepcache");
    body.deepcache_branch = num("deepcache-branch");
  }
  if ($("fast-decode").checked) body.fast_decode = true;
}

// ---- ControlNet: one unit, sd-webui-controlnet's API fields
function showModuleSliders() {
  // module_detail sliders: the resolution first (not for "none"), then the module's thresholds by name
  const sliders = (state.cnDetail[$("cn-module").value] || {}).sliders || [];
  const thresholds = sliders.filter((s) => s.name !== "Preprocessor Resolution");
  state.cnHasRes = sliders.length > thresholds.length;
  // as the extension's UI: pixel perfect hides the resolution (it is derived from the image and size)
  $("cn-res-label").hidden = !state.cnHasRes || $("cn-pixel-perfect").checked;
  for (const [i, key] of [[0, "a"], [1, "b"]]) {
    const slider = thresholds[i];
    $(`cn-${key}-label`).hidden = !slider;
    if (slider) {
      $(`cn-${key}-name`).textContent = slider.name;
      $(`cn-${key}`).value = slider.value;
    }
  }
}

function moduleSettings() {
  return {
    processor_res: state.cnHasRes ? num("cn-res") : -1,
    threshold_a: $("cn-a-label").hidden ? -1 : num("cn-a"),
    threshold_b: $("cn-b-label").hidden ? -1 : num("cn-b"),
  };
}

function controlNetUnit() {
  const unit = {
    enabled: true,
    module: $("cn-module").value,
    model: $("cn-model").value,
    weight: num("cn-weight"),
    guidance_start: num("cn-start"),
    guidance_end: num("cn-end"),
    control_mode: $("cn-control-mode").value,
    resize_mode: $("cn-resize-mode").value,
    pixel_perfect: $("cn-pixel-perfect").checked,
    ...moduleSettings(),
  };
  if (state.cnImage) unit.image = state.cnImage;
  else if (state.mode !== "img2img") throw new Error("ControlNet: choose a control image (or untick Enable)");
  return unit;  // img2img without its own image: the extension uses the init image
}

async function setControlImage(file) {
  if (!file || $("cn-fields").disabled) return;
  state.cnImage = await readFile(file);
  $("cn-image").src = state.cnImage;
  $("cn-image").hidden = false;
  $("cn-map").hidden = true;
  $("cn-enabled").checked = true;  // as the extension's "upload enables the unit"
}

function clearControlImage() {
  state.cnImage = null;
  $("cn-image").hidden = $("cn-map").hidden = true;
  $("cn-file").value = "";
}

function pixelPerfectResolution() {
  // the extension's (external_code.py): the resolution that lands the map on the generation's pixels
  const image = $("cn-image");
  const [w, h] = [image.naturalWidth, image.naturalHeight];
  const [kw, kh] = [num("width") / w, num("height") / h];
  const k = $("cn-resize-mode").value === "Resize and Fill" ? Math.min(kw, kh) : Math.max(kw, kh);
  return Math.min(4096, Math.max(64, Math.round(k * Math.min(w, h))));  // /controlnet/detect's range
}

async function previewMap() {
  if (!state.cnImage) {
    say("ControlNet: choose a control image first", true);
    return;
  }
  const s = moduleSettings();
  if ($("cn-pixel-perfect").checked && state.cnHasRes) s.processor_res = pixelPerfectResolution();
  try {
    const result = await api("controlnet/detect", {
      controlnet_module: $("cn-module").value,
      controlnet_input_images: [state.cnImage],
      controlnet_processor_res: s.processor_res,
      controlnet_threshold_a: s.threshold_a,
      controlnet_threshold_b: s.threshold_b,
    });
    $("cn-map").src = `data:image/png;base64,${result.images[0]}`;
    $("cn-map").hidden = false;
    say(`${$("cn-module").value} map ready`);
  } catch (error) {
    say(error.message, true);
  }
}

function img2imgFields(body) {
  const init = $("init-image");
  if (!init.src || $("canvas-box").hidden) throw new Error("img2img: choose an init image first");
  body.init_images = [init.src];
  body.denoising_strength = num("denoise");
  if (state.maskPainted) {
    body.mask = maskDataUrl();
    body.mask_blur = num("mask-blur");
    body.inpainting_fill = num("fill");
    body.inpaint_full_res = $("full-res").value === "true";
  }
  return body;
}

// ---- generation, progress, interrupt/skip
async function generate() {
  if (state.busy) return;
  let body, route;
  try {
    body = payload();
    if (state.mode === "img2img") {
      body = img2imgFields(body);
      route = "sdapi/v1/img2img";
    } else if (state.mode === "xyz") {
      body = { payload: body, x: $("xyz-x").value, y: $("xyz-y").value };
      route = "latentforge/v1/xyz";
    } else {
      route = "sdapi/v1/txt2img";
    }
  } catch (error) {
    say(error.message, true);
    return;
  }
  setBusy(true);
  say("generating...");
  const poller = setInterval(pollProgress, 500);
  try {
    const result = await api(route, body);
    const info = JSON.parse(result.info);
    if (info.all_seeds && info.all_seeds.length) state.lastSeed = info.all_seeds[0];
    const shown = [...(result.grids || []), ...result.images];
    const texts = [...(result.grids || []).map(() => "X/Y plot grid"), ...info.infotexts];
    shown.forEach((image, i) => addResult(`data:image/png;base64,${image}`, texts[i] || ""));
    const warnings = result.warnings && result.warnings.length ? ` Warnings: ${result.warnings.join("; ")}` : "";
    const skipped = info.skipped ? ` (${info.skipped} batch${info.skipped > 1 ? "es" : ""} skipped)` : "";
    const stopped = (info.interrupted ? " (interrupted)" : "") + skipped;
    say(`${result.images.length} image(s), seed ${state.lastSeed}${stopped}.${warnings}`);
  } catch (error) {
    say(error.message, true);
  } finally {
    clearInterval(poller);
    setBusy(false);
  }
}

function setBusy(busy) {
  state.busy = busy;
  $("generate").disabled = busy;
  $("interrupt").disabled = $("skip").disabled = !busy;
  $("progress").value = 0;
  $("progress-text").textContent = "";
  $("preview").hidden = true;
}

async function pollProgress() {
  try {
    const p = await api("sdapi/v1/progress?skip_current_image=false");
    if (!state.busy) return;
    $("progress").value = p.progress;
    const s = p.state;
    const eta = p.eta_relative > 0 ? `, about ${p.eta_relative.toFixed(1)} s left` : "";
    const queued = s.job_count > 1 ? `, ${s.job_count - 1} queued` : "";
    $("progress-text").textContent = s.sampling_steps
      ? `step ${s.sampling_step} of ${s.sampling_steps}${eta}${queued}`
      : `waiting${queued}`;
    if (p.current_image) {
      $("preview").src = `data:image/png;base64,${p.current_image}`;
      $("preview").hidden = false;
    }
  } catch (error) {
    // progress is advisory: the generation request reports its own errors
  }
}

// ---- gallery
function addResult(src, infotext) {
  const button = document.createElement("button");
  button.type = "button";
  button.setAttribute("role", "listitem");
  button.setAttribute("aria-pressed", "false");
  button.setAttribute("aria-label", `result ${$("gallery").children.length + 1}: ${infotext.slice(0, 60)}`);
  const img = document.createElement("img");
  img.src = src;
  img.alt = "";
  button.append(img);
  button.addEventListener("click", () => select(button, src, infotext));
  $("gallery").prepend(button);
  select(button, src, infotext);
}

function select(button, src, infotext) {
  for (const b of $("gallery").children) b.setAttribute("aria-pressed", String(b === button));
  state.selected = { src, infotext };
  $("selected").hidden = false;
  $("selected-image").src = src;
  $("infotext").textContent = infotext;
  $("download").href = src;
  $("use-seed").disabled = !/Seed: (-?\d+)/.test(infotext);
}

// ---- img2img: init image and the mask brush (white = repaint, A1111's convention)
function setInit(src) {
  const img = $("init-image");
  img.onload = () => {
    const canvas = $("mask");
    canvas.width = img.naturalWidth;
    canvas.height = img.naturalHeight;
    clearMask();
    $("canvas-box").hidden = false;
    $("width").value = img.naturalWidth;
    $("height").value = img.naturalHeight;
  };
  img.src = src;
}

function clearMask() {
  const canvas = $("mask");
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  state.maskPainted = false;
}

function maskDataUrl() {
  const source = $("mask");
  const out = document.createElement("canvas");
  out.width = source.width;
  out.height = source.height;
  const pixels = source.getContext("2d").getImageData(0, 0, source.width, source.height);
  const d = pixels.data;
  for (let i = 0; i < d.length; i += 4) {
    const v = d[i + 3] > 0 ? 255 : 0;  // painted anywhere -> white
    d[i] = d[i + 1] = d[i + 2] = v;
    d[i + 3] = 255;
  }
  out.getContext("2d").putImageData(pixels, 0, 0);
  return out.toDataURL("image/png");
}

function setupBrush() {
  const canvas = $("mask");
  let drawing = false;
  let last = null;
  const point = (event) => {
    const r = canvas.getBoundingClientRect();
    return [((event.clientX - r.left) * canvas.width) / r.width, ((event.clientY - r.top) * canvas.height) / r.height];
  };
  const paint = (event) => {
    const ctx = canvas.getContext("2d");
    const [x, y] = point(event);
    const scale = canvas.width / canvas.getBoundingClientRect().width;
    ctx.strokeStyle = ctx.fillStyle = "#ff3d6e";  // shown tinted; exported as white (alpha > 0)
    ctx.lineWidth = num("brush") * scale;
    ctx.lineCap = "round";
    ctx.beginPath();
    if (last) {
      ctx.moveTo(...last);
      ctx.lineTo(x, y);
      ctx.stroke();
    } else {
      ctx.arc(x, y, ctx.lineWidth / 2, 0, 2 * Math.PI);
      ctx.fill();
    }
    last = [x, y];
    state.maskPainted = true;
  };
  canvas.addEventListener("pointerdown", (e) => {
    drawing = true;
    last = null;
    canvas.setPointerCapture(e.pointerId);
    paint(e);
  });
  canvas.addEventListener("pointermove", (e) => drawing && paint(e));
  for (const end of ["pointerup", "pointercancel"]) canvas.addEventListener(end, () => { drawing = false; last = null; });
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

// ---- PNG info (PNG/JPEG/WebP: the server reads the infotext chunk or EXIF)
async function pngInfo(file) {
  if (!file) return;
  try {
    const result = await api("sdapi/v1/png-info", { image: await readFile(file) });
    $("png-text").textContent = result.info || "(no generation parameters in this image)";
    state.pngParams = result.info ? result.parameters : null;
    $("png-to-txt2img").disabled = !state.pngParams;
  } catch (error) {
    say(error.message, true);
  }
}

function applyParameters(p) {
  const set = (id, key) => { if (p[key] !== undefined) $(id).value = p[key]; };
  set("prompt", "Prompt");
  set("negative", "Negative prompt");
  set("steps", "Steps");
  set("cfg", "CFG scale");
  set("seed", "Seed");
  set("width", "Size-1");
  set("height", "Size-2");
  if (p.Sampler && [...$("sampler").options].some((o) => o.value === p.Sampler)) $("sampler").value = p.Sampler;
  if (p["Schedule type"] && [...$("schedule").options].some((o) => o.value === p["Schedule type"])) {
    $("schedule").value = p["Schedule type"];
  }
  if (p.VAE && [...$("vae").options].some((o) => o.value === p.VAE)) $("vae").value = p.VAE;
  // the speed options: the image's, or off where its infotext has none
  const speed = { ngms: ["NGMS", 0], "cfg-cutoff": ["CFG cutoff", 1], tome: ["Token merging ratio", 0],
    deepcache: ["DeepCache interval", 0], "deepcache-branch": ["DeepCache branch", 0] };
  for (const [id, [key, off]] of Object.entries(speed)) $(id).value = p[key] !== undefined ? p[key] : off;
  $("fast-decode").checked = String(p["Fast decode"]) === "True";
}

// ---- wiring
function wire() {
  for (const mode of ["txt2img", "img2img", "xyz", "pnginfo"]) $(`tab-${mode}`).addEventListener("click", () => setMode(mode));
  $("generate-panel").addEventListener("submit", (e) => { e.preventDefault(); generate(); });
  document.addEventListener("keydown", (e) => {
    if ((e.ctrlKey || e.metaKey) && e.key === "Enter" && state.mode !== "pnginfo") {
      e.preventDefault();
      $("generate-panel").requestSubmit();  // through the form's own checks (min/max), as a click
    }
  });
  $("interrupt").addEventListener("click", () => api("sdapi/v1/interrupt", {}).catch((e) => say(e.message, true)));
  $("skip").addEventListener("click", () => api("sdapi/v1/skip", {}).catch((e) => say(e.message, true)));
  $("dice").addEventListener("click", () => { $("seed").value = -1; });
  $("recycle").addEventListener("click", () => { $("seed").value = state.lastSeed; });
  $("insert-lora").addEventListener("click", () => {
    const box = $("prompt");
    const tag = `<lora:${$("lora").value}:1>`;
    const at = box.selectionEnd ?? box.value.length;
    const before = box.value.slice(0, at);
    const sep = before && !/[\s,]$/.test(before) ? ", " : "";
    box.value = before + sep + tag + box.value.slice(at);
    box.focus();
    box.selectionStart = box.selectionEnd = at + sep.length + tag.length;
  });
  $("model").addEventListener("change", async () => {
    const name = $("model").value;
    say(`loading ${name} (after the running jobs)...`);
    try {
      await api("sdapi/v1/options", { sd_model_checkpoint: name });
      say(`model ${name} loaded`);
    } catch (error) {
      say(error.message, true);
    }
  });
  $("init-file").addEventListener("change", async (e) => e.target.files[0] && setInit(await readFile(e.target.files[0])));
  $("clear-mask").addEventListener("click", clearMask);
  $("to-img2img").addEventListener("click", () => {
    if (!state.selected) return;
    setInit(state.selected.src);
    setMode("img2img");
    $("tab-img2img").focus();
  });
  $("use-seed").addEventListener("click", () => {
    const match = state.selected && /Seed: (-?\d+)/.exec(state.selected.infotext);
    if (match) $("seed").value = match[1];
  });
  $("png-file").addEventListener("change", (e) => pngInfo(e.target.files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    pngInfo(e.dataTransfer.files[0]);
  });
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") $("png-file").click(); });
  $("png-to-txt2img").addEventListener("click", () => {
    applyParameters(state.pngParams);
    setMode("txt2img");
    $("prompt").focus();
  });
  $("cn-file").addEventListener("change", (e) => setControlImage(e.target.files[0]));
  const cnDrop = $("cn-drop");
  cnDrop.addEventListener("dragover", (e) => { e.preventDefault(); cnDrop.classList.add("over"); });
  cnDrop.addEventListener("dragleave", () => cnDrop.classList.remove("over"));
  cnDrop.addEventListener("drop", (e) => {
    e.preventDefault();
    cnDrop.classList.remove("over");
    setControlImage(e.dataTransfer.files[0]);
  });
  $("cn-module").addEventListener("change", () => { showModuleSliders(); $("cn-map").hidden = true; });
  $("cn-pixel-perfect").addEventListener("change", showModuleSliders);
  $("cn-preview").addEventListener("click", previewMap);
  $("cn-clear").addEventListener("click", clearControlImage);
  $("token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem("latentforge-token", $("token").value);
    $("auth").open = false;
    start();
  });
  setupBrush();
}

async function start() {
  try {
    await loadLists();
    say("ready");
  } catch (error) {
    say(`could not reach the server: ${error.message}`, true);
  }
}

wire();
setMode("txt2img");
start();
