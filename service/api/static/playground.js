// The ldm-serve playground: plain JavaScript over the native REST API (POST /v1/jobs, its events as server-sent
// events, its images), served by the API itself; no library, no CDN, no build step.
// The events are read with fetch() rather than EventSource, which cannot send the Authorization header.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "ldm-serve.api-key";
const PROMPT_TASKS = ["txt2img", "img2img", "inpaint", "upscale"];
const ALL_TASKS = ["txt2img", "img2img", "inpaint", "upscale", "class", "layout", "semantic", "unconditional"];
// which parts of the form each task shows (elements with data-for="PART")
const PARTS = {
  prompt: PROMPT_TASKS,
  class: ["class"],
  canvas: ["img2img", "inpaint", "upscale", "layout", "semantic"],
  image: ["img2img", "inpaint", "upscale"],
  size: ["txt2img", "class", "layout", "unconditional"],
  strength: ["img2img", "inpaint"],
  guidance: ["txt2img", "img2img", "inpaint", "upscale", "class", "layout", "semantic"],
  brush: ["inpaint", "semantic"],
  "paint-label": ["layout", "semantic"],
  "canvas-size": ["layout", "semantic"],
};
const HINTS = {
  img2img: "The image to start from.",
  inpaint: "Paint the area to repaint; everything else is kept exactly.",
  upscale: "The image to enlarge.",
  layout: "Drag to draw a box for the chosen label.",
  semantic: "Paint labels: each colour is a class (Background = 0).",
};

const state = {
  models: [],            // /v1/models cards
  modelCalls: 0,         // loadModels calls so far (only the latest one's answer is shown)
  job: null,             // the running job's id
  image: null,           // {element, dataUrl} of the input image
  width: 64, height: 64, // the canvas's size in image pixels
  paint: new Uint8Array(64 * 64), // inpainting mask (0 / 255) or label map (label values)
  boxes: [],             // layout: [{label, box: [x0, y0, x1, y1]}] in fractions
  drag: null,            // pointer state while painting or drawing
};

// ------------------------------------------------------------------------------------------------ API calls

function headers(extra = {}) {
  const key = $("api-key").value.trim();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(options.headers) });
  if (!response.ok) {
    let message = response.statusText;
    try {
      const body = await response.json();
      message = body.message || (typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail));
    } catch (_) { /* not JSON */ }
    throw new Error(`${response.status}: ${message}`);
  }
  return response;
}

// The job's events until a terminal one (SSE frames: "id:", "event:", "data:" lines, a blank line after each).
async function follow(jobId, onEvent) {
  const response = await api(`/v1/jobs/${jobId}/events`);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) throw new Error("the event stream ended early");
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const fields = {};
      for (const line of frame.split("\n")) {
        const at = line.indexOf(":");
        if (at > 0) fields[line.slice(0, at)] = line.slice(at + 1).trimStart();
      }
      if (!fields.data || !fields.event) continue;
      const event = { type: fields.event, ...JSON.parse(fields.data) };
      onEvent(event);
      if (["succeeded", "failed", "cancelled"].includes(event.type)) {
        reader.cancel();
        return event;
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------ models, tasks

// The model list for the current key; a slower answer to an earlier call (another key) is dropped. The body's
// data-models attribute says "ready" once the latest list is shown.
async function loadModels() {
  const call = ++state.modelCalls;
  document.body.dataset.models = "loading";
  let models = [];
  let error = "";
  try {
    models = (await (await api("/v1/models")).json()).data;
  } catch (failure) {
    error = `Could not list the models (${failure.message}). Is the API key right?`;
  }
  if (call !== state.modelCalls) return;
  state.models = models;
  showError(error);
  const select = $("model");
  const chosen = select.value;
  select.replaceChildren(...state.models.map((m) => new Option(m.id, m.id)));
  if (state.models.some((m) => m.id === chosen)) select.value = chosen;
  modelChanged();
  document.body.dataset.models = "ready";
}

function currentModel() {
  return state.models.find((m) => m.id === $("model").value) || null;
}

function modelChanged() {
  const model = currentModel();
  const tasks = model && model.tasks.length ? model.tasks : ALL_TASKS;
  const select = $("task");
  const chosen = select.value;
  select.replaceChildren(...tasks.map((t) => new Option(t, t)));
  if (tasks.includes(chosen)) select.value = chosen;
  $("model-info").textContent = model
    ? `${model.id}: ${model.workers} worker(s); tasks: ${model.tasks.join(", ") || "not said"}`
    : "";
  const labels = (model && model.labels) || null;
  const names = labels ? Array.from({ length: labels.n_classes }, (_, i) => labels.class_names[i] || `class ${i}`) : [];
  $("class-label").replaceChildren(...names.map((n, i) => new Option(n, String(i))));
  taskChanged();
}

function task() {
  return $("task").value || "txt2img";
}

function taskChanged() {
  const t = task();
  for (const element of document.querySelectorAll("[data-for]")) {
    element.hidden = !(PARTS[element.dataset.for] || []).includes(t);
  }
  const model = currentModel();
  const labels = (model && model.labels) || null;
  const names = labels ? Array.from({ length: labels.n_classes }, (_, i) => labels.class_names[i] || `class ${i}`) : [];
  const options = t === "semantic" ? [new Option("Background", "0"), ...names.map((n, i) => new Option(n, String(i + 1)))]
    : names.map((n, i) => new Option(n, n));
  $("paint-label").replaceChildren(...options);
  $("canvas-legend").textContent = { layout: "Layout", semantic: "Label map" }[t] || "Input image";
  $("canvas-hint").textContent = HINTS[t] || "";
  if (t === "layout" || t === "semantic") resizeCanvas(Number($("canvas-width").value), Number($("canvas-height").value));
  else if (state.image) resizeCanvas(state.image.element.naturalWidth, state.image.element.naturalHeight);
  draw();
}

// ------------------------------------------------------------------------------------------------ the canvas

function resizeCanvas(width, height) {
  if (!(width > 0 && height > 0)) return;
  if (width !== state.width || height !== state.height) {
    state.width = width;
    state.height = height;
    state.paint = new Uint8Array(width * height);
  }
  const canvas = $("canvas");
  canvas.width = width;
  canvas.height = height;
  const scale = Math.max(1, Math.floor(384 / Math.max(width, height)));
  canvas.style.width = `${width * scale}px`;
  canvas.style.height = `${height * scale}px`;
  draw();
}

const PALETTE = [[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
  [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128]];

function draw() {
  const canvas = $("canvas");
  const context = canvas.getContext("2d");
  const t = task();
  context.fillStyle = "#202020";
  context.fillRect(0, 0, canvas.width, canvas.height);
  if (state.image && PARTS.image.includes(t)) context.drawImage(state.image.element, 0, 0, canvas.width, canvas.height);
  if (t === "inpaint" || t === "semantic") {
    const overlay = new ImageData(state.width, state.height);
    state.paint.forEach((value, i) => {
      const colour = t === "inpaint" ? [255, 0, 80] : PALETTE[value % PALETTE.length];
      overlay.data.set([...colour, t === "inpaint" ? (value ? 140 : 0) : 255], i * 4);
    });
    const layer = new OffscreenCanvas(state.width, state.height);
    layer.getContext("2d").putImageData(overlay, 0, 0);
    context.drawImage(layer, 0, 0);
  }
  if (t === "layout") {
    const drafts = state.drag && state.drag.box ? [...state.boxes, state.drag.box] : state.boxes;
    context.lineWidth = Math.max(1, state.width / 128);
    context.font = `${Math.max(8, state.width / 12)}px sans-serif`;
    drafts.forEach((b, i) => {
      const [x0, y0, x1, y1] = b.box.map((v, k) => v * (k % 2 ? state.height : state.width));
      context.strokeStyle = context.fillStyle = `rgb(${PALETTE[(i % (PALETTE.length - 1)) + 1].join(",")})`;
      context.strokeRect(x0, y0, x1 - x0, y1 - y0);
      context.fillText(String(b.label), x0 + 2, y0 + Math.max(8, state.width / 12));
    });
  }
  showBoxes();
}

function pixelAt(event) {
  const rect = $("canvas").getBoundingClientRect();
  const x = Math.floor(((event.clientX - rect.left) * state.width) / rect.width);
  const y = Math.floor(((event.clientY - rect.top) * state.height) / rect.height);
  return [Math.min(Math.max(x, 0), state.width - 1), Math.min(Math.max(y, 0), state.height - 1)];
}

// A square brush of `brush` pixels, hard-edged: each mask pixel is 0 or 255 (a label map's: one label).
function stamp([x, y]) {
  const size = Number($("brush").value);
  const value = task() === "inpaint" ? 255 : Number($("paint-label").value);
  const x0 = Math.max(0, x - Math.floor(size / 2));
  const y0 = Math.max(0, y - Math.floor(size / 2));
  for (let yy = y0; yy < Math.min(state.height, y0 + size); yy++) {
    state.paint.fill(value, yy * state.width + x0, yy * state.width + Math.min(state.width, x0 + size));
  }
}

function strokeTo(point) {
  const [fx, fy] = state.drag.last;
  const steps = Math.max(Math.abs(point[0] - fx), Math.abs(point[1] - fy), 1);
  for (let s = 1; s <= steps; s++) {
    stamp([Math.round(fx + ((point[0] - fx) * s) / steps), Math.round(fy + ((point[1] - fy) * s) / steps)]);
  }
  state.drag.last = point;
}

function pointerDown(event) {
  const t = task();
  if (!["inpaint", "semantic", "layout"].includes(t)) return;
  event.preventDefault();
  $("canvas").setPointerCapture(event.pointerId);
  const point = pixelAt(event);
  state.drag = { start: point, last: point, box: null };
  if (t !== "layout") stamp(point);
  draw();
}

function pointerMove(event) {
  if (!state.drag) return;
  const point = pixelAt(event);
  if (task() === "layout") {
    const [x0, x1] = [state.drag.start[0], point[0]].sort((a, b) => a - b);
    const [y0, y1] = [state.drag.start[1], point[1]].sort((a, b) => a - b);
    state.drag.box = { label: $("paint-label").value,
      box: [x0 / state.width, y0 / state.height, (x1 + 1) / state.width, (y1 + 1) / state.height] };
  } else {
    strokeTo(point);
  }
  draw();
}

function pointerUp() {
  if (state.drag && state.drag.box) state.boxes.push(state.drag.box);
  state.drag = null;
  draw();
}

function showBoxes() {
  const list = $("boxes");
  list.hidden = task() !== "layout";
  list.replaceChildren(...state.boxes.map((b, i) => {
    const item = document.createElement("li");
    item.textContent = `${b.label}: [${b.box.map((v) => v.toFixed(2)).join(", ")}] `;
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "Remove";
    remove.setAttribute("aria-label", `Remove box ${i + 1}`);
    remove.addEventListener("click", () => { state.boxes.splice(i, 1); draw(); });
    item.append(remove);
    return item;
  }));
}

function loadImage(dataUrl) {
  return new Promise((resolve, reject) => {
    const element = new Image();
    element.onload = () => {
      state.image = { element, dataUrl };
      state.width = 0; // a new image: a new, empty mask
      resizeCanvas(element.naturalWidth, element.naturalHeight);
      resolve();
    };
    element.onerror = () => reject(new Error("that file is not an image the browser can show"));
    element.src = dataUrl;
  });
}

function readAsDataUrl(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

// ------------------------------------------------------------------------------------------------ PNG (grayscale)
// Masks and label maps go as 8-bit grayscale PNGs: the server reads label maps only as mode L (or P), and a
// canvas can only export RGBA. Stored (uncompressed) deflate blocks keep the encoder small.

const CRC_TABLE = Array.from({ length: 256 }, (_, n) => {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  return c >>> 0;
});

function crc32(bytes) {
  let c = 0xffffffff;
  for (const b of bytes) c = CRC_TABLE[(c ^ b) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

function u32(value) {
  return [(value >>> 24) & 255, (value >>> 16) & 255, (value >>> 8) & 255, value & 255];
}

function concat(parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const part of parts) { out.set(part, at); at += part.length; }
  return out;
}

function chunk(type, data) {
  const body = concat([new Uint8Array([...type].map((c) => c.charCodeAt(0))), data]);
  return concat([new Uint8Array(u32(data.length)), body, new Uint8Array(u32(crc32(body)))]);
}

function pngGray(width, height, pixels) {
  const raw = new Uint8Array((width + 1) * height); // each row: filter type 0, then the row's pixels
  for (let y = 0; y < height; y++) raw.set(pixels.subarray(y * width, (y + 1) * width), y * (width + 1) + 1);
  const parts = [new Uint8Array([0x78, 0x01])];
  for (let at = 0; at < raw.length; at += 65535) {
    const block = raw.subarray(at, at + 65535);
    const last = at + 65535 >= raw.length ? 1 : 0;
    const n = block.length;
    parts.push(new Uint8Array([last, n & 255, n >> 8, ~n & 255, (~n >> 8) & 255]), block);
  }
  let a = 1;
  let b = 0;
  for (const byte of raw) { a = (a + byte) % 65521; b = (b + a) % 65521; }
  parts.push(new Uint8Array(u32(((b << 16) | a) >>> 0)));
  const header = new Uint8Array([...u32(width), ...u32(height), 8, 0, 0, 0, 0]);
  return concat([new Uint8Array([137, 80, 78, 71, 13, 10, 26, 10]), chunk("IHDR", header), chunk("IDAT", concat(parts)),
    chunk("IEND", new Uint8Array(0))]);
}

function base64(bytes) {
  let text = "";
  for (let i = 0; i < bytes.length; i += 8192) text += String.fromCharCode(...bytes.subarray(i, i + 8192));
  return btoa(text);
}

// ------------------------------------------------------------------------------------------------ generate

function number(id) {
  const value = $(id).value.trim();
  return value === "" ? undefined : Number(value);
}

function buildBody() {
  const t = task();
  const [sampler, karras] = $("sampler").value.split(" ");  // "": the model's default sampler
  const body = { model: $("model").value || undefined, task: t, steps: number("steps"),
    sampler: sampler || undefined, n: number("n"),
    seed: number("seed") };
  if (karras) body.karras = true;
  if (PARTS.prompt.includes(t)) {
    body.prompt = $("prompt").value;
    body.negative_prompt = $("negative-prompt").value;
  }
  if (PARTS.guidance.includes(t)) body.guidance_scale = number("guidance");
  if (PARTS.size.includes(t)) Object.assign(body, { width: number("width"), height: number("height") });
  if (PARTS.strength.includes(t)) body.strength = number("strength");
  if (PARTS.image.includes(t)) {
    if (!state.image) throw new Error("Choose an input image first.");
    body.image = state.image.dataUrl;
  }
  if (t === "inpaint") {
    if (!state.paint.some((v) => v)) throw new Error("Paint the area to repaint on the image first.");
    body.mask = base64(pngGray(state.width, state.height, state.paint));
  }
  if (t === "class") body.class_label = Number($("class-label").value);
  if (t === "layout") {
    if (!state.boxes.length) throw new Error("Draw at least one box first.");
    Object.assign(body, { layout: state.boxes, width: state.width, height: state.height });
  }
  if (t === "semantic") body.label_map = base64(pngGray(state.width, state.height, state.paint));
  return JSON.parse(JSON.stringify(body)); // drops the undefined fields
}

function showError(message) {
  $("error").textContent = message;
}

function setStatus(message) {
  $("status").textContent = message;
}

function onEvent(event) {
  const bar = $("progress");
  if (event.type === "progress" && event.total) {
    bar.max = event.total;
    bar.value = event.step;
    bar.dataset.events = String(Number(bar.dataset.events) + 1);
    setStatus(`Step ${event.step} of ${event.total}`);
  } else if (event.type === "started") {
    setStatus("Running");
  } else if (event.type === "requeued") {
    setStatus("Requeued (a worker went away)");
  }
}

function describe(request) {
  const rows = [["seed", request.seed], ["steps", request.steps],
    ["sampler", request.sampler + (request.karras ? " (Karras)" : "")], ["guidance", request.guidance_scale],
    ["size", request.width ? `${request.width}×${request.height}` : "model default"], ["strength", request.strength],
    ["class", request.class_label]];
  return rows.filter(([, v]) => v !== null && v !== undefined);
}

async function showResults(jobId) {
  const job = await (await api(`/v1/jobs/${jobId}`)).json();
  const request = job.request;
  const alt = request.prompt || (request.class_label !== null && request.class_label !== undefined
    ? `class ${request.class_label}` : `${request.task} sample`);
  for (let i = job.results - 1; i >= 0; i--) {
    const blob = await (await api(`/v1/jobs/${jobId}/images/${i}`)).blob();
    const url = URL.createObjectURL(blob);
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.src = url;
    img.alt = alt;
    img.dataset.job = jobId;
    const caption = document.createElement("figcaption");
    const list = document.createElement("dl");
    for (const [k, v] of [["model", job.model], ["task", request.task], ...describe({ ...request,
      seed: request.seed + i })]) {
      const term = document.createElement("dt");
      term.textContent = k;
      const detail = document.createElement("dd");
      detail.textContent = String(v);
      list.append(term, detail);
    }
    const link = document.createElement("a");
    link.href = url;
    link.download = `ldm-${jobId}-${i}.png`;
    link.textContent = "Download";
    const reuse = document.createElement("button");
    reuse.type = "button";
    reuse.textContent = "Use as input";
    reuse.addEventListener("click", async () => {
      await loadImage(await readAsDataUrl(blob));
      if (!PARTS.image.includes(task())) { $("task").value = "inpaint"; taskChanged(); }
    });
    caption.append(list, link, " ", reuse);
    figure.append(img, caption);
    $("gallery").prepend(figure);
  }
}

async function generate(event) {
  event.preventDefault();
  showError("");
  let body;
  try {
    body = buildBody();
  } catch (error) {
    showError(error.message);
    return;
  }
  $("generate").disabled = true;
  $("progress").value = 0;
  $("progress").dataset.events = "0";
  try {
    const response = await api("/v1/jobs", { method: "POST", body: JSON.stringify(body),
      headers: { "Content-Type": "application/json" } });
    const job = await response.json();
    state.job = job.id;
    $("cancel").disabled = false;
    setStatus(`Queued (job ${job.id})`);
    const end = await follow(job.id, onEvent);
    if (end.type === "succeeded") {
      await showResults(job.id);
      setStatus(`Done: ${end.results} image(s)`);
    } else {
      setStatus(end.type === "cancelled" ? "Cancelled" : `Failed: ${end.error}`);
    }
  } catch (error) {
    showError(error.message);
    setStatus("");
  } finally {
    state.job = null;
    $("cancel").disabled = true;
    $("generate").disabled = false;
  }
}

async function cancel() {
  if (!state.job) return;
  try {
    await api(`/v1/jobs/${state.job}`, { method: "DELETE" });
    setStatus("Cancelling");
  } catch (error) {
    showError(error.message);
  }
}

// ------------------------------------------------------------------------------------------------ wiring

function start() {
  $("api-key").value = sessionStorage.getItem(KEY_STORE) || "";
  $("api-key").addEventListener("change", () => {
    sessionStorage.setItem(KEY_STORE, $("api-key").value.trim());
    loadModels();
  });
  $("model").addEventListener("change", modelChanged);
  $("task").addEventListener("change", taskChanged);
  $("form").addEventListener("submit", generate);
  $("cancel").addEventListener("click", cancel);
  $("image-file").addEventListener("change", async () => {
    const file = $("image-file").files[0];
    if (!file) return;
    try {
      await loadImage(await readAsDataUrl(file));
    } catch (error) {
      showError(error.message);
    }
  });
  for (const id of ["canvas-width", "canvas-height"]) {
    $(id).addEventListener("change", () => resizeCanvas(number("canvas-width"), number("canvas-height")));
  }
  $("clear-canvas").addEventListener("click", () => { state.paint.fill(0); state.boxes = []; draw(); });
  const canvas = $("canvas");
  canvas.addEventListener("pointerdown", pointerDown);
  canvas.addEventListener("pointermove", pointerMove);
  canvas.addEventListener("pointerup", pointerUp);
  canvas.addEventListener("pointercancel", pointerUp);
  resizeCanvas(64, 64);
  loadModels();
}

start();
