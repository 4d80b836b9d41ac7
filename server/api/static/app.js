// Qwen-Image-Edit Playground: vanilla JS over the same v3 API every client uses.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "qwenEdit.apiKey";
const HISTORY_STORE = "qwenEdit.history";
const HISTORY_MAX = 50;
const POLL_MS = 400;

const state = { config: null, input: null, current: null, polling: new Set() };

// ---- API ---------------------------------------------------------------------------------------

function apiKey() { return localStorage.getItem(KEY_STORE) || ""; }

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}), Authorization: `Bearer ${apiKey()}` };
  const resp = await fetch(path, { ...options, headers });
  let body = null;
  try { body = await resp.json(); } catch (_) { /* not JSON */ }
  if (resp.status === 401) askKey("That API key was refused; enter a valid one.");
  if (!resp.ok) throw new Error((body && (body.message || body.error)) || `HTTP ${resp.status}`);
  return body;
}

async function uploadFile(file) {
  // The v3 ticket flow: ask for a signed URL, PUT the bytes there (no key), use download_url.
  const ticket = await api("/api/v3/media/uploads", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ filename: file.name || "image.png", size: file.size, content_type: file.type || undefined }),
  });
  const up = ticket.data.upload;
  const put = await fetch(up.url, { method: up.method, headers: up.headers, body: file });
  if (!put.ok) {
    let msg = `upload failed (HTTP ${put.status})`;
    try { msg = (await put.json()).message || msg; } catch (_) { /* keep */ }
    throw new Error(msg);
  }
  return ticket.data.download_url;
}

// ---- key ---------------------------------------------------------------------------------------

function askKey(message) {
  const dlg = $("key-dialog");
  if (message) dlg.querySelector("p").textContent = message;
  $("api-key").value = apiKey();
  if (!dlg.open) dlg.showModal();
}

$("key-form").addEventListener("submit", () => {
  const key = $("api-key").value.trim();
  if (key) localStorage.setItem(KEY_STORE, key);
  renderKeyButton();
});
$("key-button").addEventListener("click", () => askKey());
function renderKeyButton() { $("key-button").textContent = apiKey() ? "API key ✓" : "Set API key"; }

// ---- input image -------------------------------------------------------------------------------

function setInput(url, label) {
  state.input = url;
  const img = $("input-preview");
  img.src = url;
  img.hidden = false;
  $("input-status").textContent = label || "";
}

async function takeFile(file) {
  if (!file) return;
  if (!file.type.startsWith("image/")) { showError("That file is not an image."); return; }
  $("input-status").textContent = `Uploading ${file.name}…`;
  try {
    const url = await uploadFile(file);
    setInput(url, `Uploaded ${file.name}`);
    $("image-url").value = "";
  } catch (err) {
    $("input-status").textContent = "";
    showError(`Upload failed: ${err.message}`);
  }
}

$("file").addEventListener("change", (e) => takeFile(e.target.files[0]));
const drop = $("drop");
["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.add("over"); }));
["dragleave", "drop"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.remove("over"); }));
drop.addEventListener("drop", (e) => takeFile(e.dataTransfer.files[0]));
drop.addEventListener("click", (e) => { if (e.target.tagName !== "LABEL" && e.target.id !== "file") $("file").click(); });
document.addEventListener("paste", (e) => {
  const item = [...(e.clipboardData?.items || [])].find((i) => i.type.startsWith("image/"));
  if (item) takeFile(item.getAsFile());
});
$("image-url").addEventListener("change", (e) => {
  const url = e.target.value.trim();
  if (url) setInput(url, "Using the URL above");
});

// ---- submit and progress -----------------------------------------------------------------------

function num(id) { const v = $(id).value.trim(); return v === "" ? null : Number(v); }

function buildBody() {
  const model = $("model").value;
  const body = { prompt: $("prompt").value.trim(), output_format: $("format").value };
  const multi = state.config && state.config.multi_image[model];
  if (multi) body.images = [state.input]; else body.image = state.input;
  const w = num("width"), h = num("height");
  if (w && h) body.size = `${w}*${h}`;
  const seed = num("seed");
  if (seed !== null) body.seed = seed;
  const steps = num("steps"), cfg = num("cfg"), neg = $("negative").value.trim();
  if (steps) body.num_inference_steps = steps;
  if (cfg) body.true_cfg_scale = cfg;
  if (neg) body.negative_prompt = neg;
  if (model.endsWith("-lora")) {
    const paths = [...document.querySelectorAll(".lora-path")], scales = [...document.querySelectorAll(".lora-scale")];
    const loras = paths.map((p, i) => ({ path: p.value.trim(), scale: Number(scales[i].value || 1) })).filter((l) => l.path);
    if (loras.length) body.loras = loras;
  }
  return { model, body };
}

$("edit-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  hideError();
  if (!apiKey()) { askKey(); return; }
  if (!state.input) { showError("Choose, drop or paste an image first."); return; }
  if (!$("prompt").value.trim()) { showError("Write an instruction in the prompt."); return; }
  const { model, body } = buildBody();
  $("submit").disabled = true;
  setStatus("Submitting…");
  try {
    const resp = await api(`/api/v3/${model}`, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    const entry = { id: resp.data.id, model, prompt: body.prompt, input: state.input, output: null,
      status: resp.data.status, error: "", created: Date.now() };
    saveEntry(entry);
    state.current = entry.id;
    renderHistory();
    poll(entry.id);
  } catch (err) {
    showError(err.message);
    setStatus("");
  } finally {
    $("submit").disabled = false;
  }
});

async function poll(id) {
  if (state.polling.has(id)) return;
  state.polling.add(id);
  try {
    for (;;) {
      let data;
      try {
        data = (await api(`/api/v3/predictions/${id}/result`)).data;
      } catch (err) {
        if (/not found/i.test(err.message)) { updateEntry(id, { status: "failed", error: err.message }); break; }
        await sleep(2000);
        continue;
      }
      if (id === state.current) showProgress(data);
      if (data.status === "completed" || data.status === "failed") {
        updateEntry(id, { status: data.status, output: data.outputs[0] || null, error: data.error || "" });
        if (id === state.current) showEntry(findEntry(id));
        break;
      }
      updateEntry(id, { status: data.status });
      await sleep(POLL_MS);
    }
  } finally {
    state.polling.delete(id);
  }
}

function showProgress(data) {
  const bar = $("progress");
  bar.hidden = false;
  if (data.progress && data.progress.total) {
    bar.max = data.progress.total;
    bar.value = data.progress.step;
    $("progress-text").textContent = `step ${data.progress.step} / ${data.progress.total}`;
  } else {
    bar.removeAttribute("value");
    $("progress-text").textContent = "";
  }
  setStatus(data.status === "created" ? "Queued…" : data.status === "processing" ? "Editing…" : data.status);
}

function showEntry(entry) {
  if (!entry) return;
  state.current = entry.id;
  hideError();
  $("progress").hidden = entry.status === "completed" || entry.status === "failed";
  if (entry.status === "completed" && entry.output) {
    setStatus(`Done · ${entry.prompt}`);
    $("progress-text").textContent = "";
    $("before").src = entry.input;
    $("after").src = entry.output;
    $("compare").hidden = false;
    $("result-actions").hidden = false;
    const ext = (entry.output.split(".").pop() || "jpg").split("?")[0];
    $("download").href = entry.output;
    $("download").setAttribute("download", `qwen-edit-${entry.id}.${ext}`);
    $("open-result").href = entry.output;
  } else if (entry.status === "failed") {
    setStatus("Failed");
    $("compare").hidden = true;
    $("result-actions").hidden = true;
    showError(entry.error || "The edit failed.");
  } else {
    setStatus("Working…");
    $("compare").hidden = true;
    $("result-actions").hidden = true;
    poll(entry.id);
  }
  renderHistory();
}

$("slider").addEventListener("input", (e) => {
  const pos = `${e.target.value}%`;
  $("after-wrap").style.clipPath = `inset(0 0 0 ${pos})`;
  $("after-wrap").style.setProperty("--pos", pos);
});

$("use-as-input").addEventListener("click", () => {
  const entry = findEntry(state.current);
  if (!entry || !entry.output) return;
  // An output of this server is an input as it is: the next edit reads it from storage (chained edits).
  setInput(entry.output, "Using the last result as input");
  $("image-url").value = "";
  $("prompt").focus();
  window.scrollTo({ top: 0, behavior: "smooth" });
});

// ---- history (this browser's jobs, in localStorage) --------------------------------------------

function loadHistory() {
  try { return JSON.parse(localStorage.getItem(HISTORY_STORE) || "[]"); } catch (_) { return []; }
}
function storeHistory(list) { localStorage.setItem(HISTORY_STORE, JSON.stringify(list.slice(0, HISTORY_MAX))); }
function saveEntry(entry) { storeHistory([entry, ...loadHistory().filter((e) => e.id !== entry.id)]); }
function findEntry(id) { return loadHistory().find((e) => e.id === id); }
function updateEntry(id, patch) {
  const list = loadHistory();
  const entry = list.find((e) => e.id === id);
  if (!entry) return;
  Object.assign(entry, patch);
  storeHistory(list);
  renderHistory();
}

function renderHistory() {
  const ul = $("history");
  ul.replaceChildren();
  for (const entry of loadHistory()) {
    const li = document.createElement("li");
    li.dataset.id = entry.id;
    li.className = entry.id === state.current ? "active" : "";
    const img = document.createElement("img");
    img.alt = "";
    img.src = entry.output || entry.input;
    const text = document.createElement("div");
    const prompt = document.createElement("div");
    prompt.className = "prompt";
    prompt.textContent = entry.prompt;
    const when = document.createElement("div");
    when.className = "muted";
    when.textContent = `${new Date(entry.created).toLocaleString()} · ${entry.model.split("/").pop()}`;
    text.append(prompt, when);
    const badge = document.createElement("span");
    badge.className = `badge ${entry.status}`;
    badge.textContent = entry.status;
    li.append(img, text, badge);
    li.addEventListener("click", () => showEntry(findEntry(entry.id)));
    ul.append(li);
  }
}

$("clear-history").addEventListener("click", () => { storeHistory([]); renderHistory(); });

// ---- small helpers and start-up ----------------------------------------------------------------

function sleep(ms) { return new Promise((r) => setTimeout(r, ms)); }
function setStatus(text) { $("status").textContent = text; }
function showError(text) { $("error").textContent = text; $("error").hidden = false; }
function hideError() { $("error").hidden = true; $("error").textContent = ""; }

async function loadConfig() {
  const resp = await fetch("/playground/config");
  const config = await resp.json();
  state.config = config;
  const select = $("model");
  // LoRA inputs only where the server serves -lora endpoints.
  for (const m of [...config.models, ...config.lora_models]) {
    const opt = document.createElement("option");
    opt.value = m;
    opt.textContent = m.replace("wavespeed-ai/", "");
    select.append(opt);
  }
  $("model-field").hidden = select.options.length < 2;
  select.addEventListener("change", () => { $("lora-box").hidden = !select.value.endsWith("-lora"); });
  $("overrides-note").hidden = config.allow_overrides;
  if (config.default_steps) $("steps").placeholder = `server default (${config.default_steps})`;
}

async function start() {
  renderKeyButton();
  renderHistory();
  await loadConfig().catch((err) => showError(`Could not load the server's configuration: ${err.message}`));
  if (!apiKey()) askKey();
  const list = loadHistory();
  if (list.length) showEntry(list[0]);
  for (const e of list) if (e.status !== "completed" && e.status !== "failed") poll(e.id);
}

start();
