// onnxforge dashboard: drives the public /v1 API (no private endpoints). Charts are plain SVG.
"use strict";

const $ = (sel) => document.querySelector(sel);
const KEY = "onnxforge.apiKey";
const SVG = "http://www.w3.org/2000/svg";
const state = { model: null, version: null, inputs: [], described: null };

// -- API ------------------------------------------------------------------------------------------

function headers(extra) {
  const key = sessionStorage.getItem(KEY);
  return Object.assign(key ? { Authorization: "Bearer " + key } : {}, extra || {});
}

async function apiAnswer(path, options) {
  const opts = Object.assign({}, options || {});
  opts.headers = headers(opts.headers);
  const response = await fetch(path, opts);
  const text = await response.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch (e) { body = { error: text }; }
  if (!response.ok) {
    const error = new Error((body && body.error) || response.status + " " + response.statusText);
    error.status = response.status;
    throw error;
  }
  return { body, headers: response.headers };
}

async function api(path, options) {
  return (await apiAnswer(path, options)).body;
}

// Every model, page after page: GET /v1/models answers at most 1000 and names the last one in X-Next-After when
// more follow (without following it, a service with more models showed the first 1000 only).
async function listModels() {
  let models = [];
  let after = null;
  do {
    const page = await apiAnswer("/v1/models" + (after === null ? "" : "?after=" + after));
    models = models.concat(page.body);
    after = page.headers.get("X-Next-After");
  } while (after);
  return models;
}

const enc = encodeURIComponent;
const fmt = (x, digits) => (x === null || x === undefined ? "—" : Number(x).toFixed(digits === undefined ? 3 : digits));
const el = (tag, attrs, text) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
};
const row = (cells) => {
  const tr = el("tr");
  for (const c of cells) tr.appendChild(c instanceof Node ? wrapCell(c) : el("td", {}, String(c)));
  return tr;
};
const wrapCell = (node) => { const td = el("td"); td.appendChild(node); return td; };

// -- models list ----------------------------------------------------------------------------------

// The list (and a report waiting for its job) is read again every POLL_MS while a job is queued or running, every
// IDLE_POLL_MS otherwise: a version that finished, or an upload from elsewhere (CLI, another tab), showed its first
// state until Refresh was clicked.
const POLL_MS = 2000, IDLE_POLL_MS = 15000;
const PENDING = ["queued", "optimizing"];
let pollTimer = null;
// A version's report and its provider do not change once it serves: read once per model@version@variant, not on
// every list refresh (two requests per model each time made a list of many models slow, more so while polling).
const servedInfo = new Map();

async function servedFacts(m) {
  const key = `${m.name}@${m.serving_version}@${m.serving_variant}@${m.latest_status}`;
  if (!servedInfo.has(key)) {
    let failed = false;
    const facts = Promise.all([
      api("/v1/models/" + enc(m.name)).catch(() => { failed = true; return null; }),
      // 409: no report (a failed version, or one serving its original while it optimizes): kept until the key changes
      api(`/v1/models/${enc(m.name)}/versions/${m.serving_version}/report`)
        .catch((e) => { failed = failed || e.status !== 409; return null; }),
    ]).then(([described, report]) => {
      if (failed) servedInfo.delete(key);  // read again next time
      return { provider: described ? described.provider : "—", report: report && report.report };
    });
    servedInfo.set(key, facts);
  }
  return servedInfo.get(key);
}

async function loadModels() {
  clearTimeout(pollTimer);
  pollTimer = null;
  checkService();
  const tbody = $("#models tbody");
  let models;
  try { models = await listModels(); } catch (e) {
    showListError(e);
    // A key problem waits for a new key (which reloads the list); anything else (a restart, a proxy's 502 during a
    // rolling deploy, the network) is tried again: the page stopped following the service after one failed read.
    if (e.status !== 401 && e.status !== 403) pollTimer = setTimeout(loadModels, IDLE_POLL_MS);
    return;
  }
  $("#models-empty").hidden = models.length > 0;
  const rows = await Promise.all(models.map(async (m) => {
    const facts = m.serving_version ? await servedFacts(m) : { provider: "—", report: null };
    const r = facts.report;
    const status = el("span", { class: "status-" + m.latest_status }, m.latest_status);
    // The name is a button: a keyboard reaches it with Tab and opens the report with Enter (a row cannot be focused).
    const open = el("button", { type: "button", class: "link", title: "Open the report of " + m.name }, m.name);
    const tr = row([open, m.versions, status, servingCell(m), m.serving_variant || "—", facts.provider,
      r ? servedSpeedup(r).text : "—", r ? fmt(r.size_ratio, 2) : "—"]);
    tr.dataset.model = m.name;
    tr.addEventListener("click", () => openReport(m.name, m.latest_version));
    return tr;
  }));
  tbody.replaceChildren(...rows);
  if (state.described && !$("#report-section").hidden && reportIsStale(models.find((m) => m.name === state.model))) {
    await refreshReport().catch(() => null);  // the next poll tries again
  }
  clearTimeout(pollTimer);  // a Refresh click or an upload may have loaded the list meanwhile
  const pending = models.some((m) => PENDING.includes(m.latest_status));
  pollTimer = setTimeout(loadModels, pending ? POLL_MS : IDLE_POLL_MS);
}

// The report shown is out of date when its model changed (a version added, deleted, finished; pinned elsewhere) or
// went, or the version shown is still waiting for its job.
function reportIsStale(summary) {
  const d = state.described, shown = d.versions.find((v) => v.version === state.version);
  return !summary || summary.versions !== d.versions.length || summary.latest_version !== d.versions.at(-1).version
    || summary.latest_status.replace("queued", "optimizing") !== d.versions.at(-1).status
    || summary.serving_version !== d.serving_version
    || summary.pinned_version !== d.pinned_version || (shown && PENDING.includes(shown.status));
}

// Re-read the model shown and its version (it finished, failed, or was deleted elsewhere).
async function refreshReport() {
  let described;
  try { described = await api("/v1/models/" + enc(state.model)); } catch (e) {
    if (e.status === 404) { closeReport(); return; }
    throw e;
  }
  const before = state.described && state.described.serving_version;
  state.described = described;
  state.inputs = described.inputs;
  const version = described.versions.find((v) => v.version === state.version) || described.versions.at(-1);
  renderVersions(described, version.version);
  if (described.serving_version !== before) fillTryIt(described.inputs);  // "try it" runs the serving version
  $("#try").hidden = described.serving_version === null;
  $("#try-none").hidden = described.serving_version !== null;
  await showVersion(version);
}

function closeReport() {
  $("#report-section").hidden = true;
  state.model = null; state.version = null; state.described = null;
}

// The service's own warnings (GET /readyz): no optimizer worker while jobs wait, low disk, database unreachable.
// Without it a job queued with no worker running read "queued" for ever, with nothing to act on.
async function checkService() {
  const banner = $("#service-warning");
  let health;
  try {
    const response = await fetch("/readyz");
    health = await response.json();
  } catch (e) { return; }
  const problems = [health.warning, health.storage_warning,
    health.status === "degraded" ? `Database ${health.database}: ${health.note}` : null,
    health.status !== "ready" && health.status !== "degraded" ? health.error : null].filter(Boolean);
  banner.textContent = problems.join("\n");
  banner.hidden = problems.length === 0;
}

function servingCell(m) {
  if (!m.serving_version) return "—";
  if (m.pinned_version === null || m.pinned_version === undefined) return "v" + m.serving_version;
  const cell = el("span", {}, "v" + m.serving_version + " ");
  cell.appendChild(el("span", { class: "pinned", title: "pinned by an admin: newer versions wait until unpinned" },
    "pinned"));
  return cell;
}

function showListError(e) {
  const tbody = $("#models tbody");
  const td = el("td", { colspan: 8, class: "error" }, "Cannot list the models: " + e.message +
    (e.status === 401 || e.status === 403 ? " (enter an API key at the top right)" : ""));
  tbody.replaceChildren(wrapRow(td));
}
const wrapRow = (td) => { const tr = el("tr"); tr.appendChild(td); return tr; };

// -- upload and job progress ----------------------------------------------------------------------

// The upload whose job the page follows: a newer upload takes over the job line. Was: every upload's watcher kept
// writing it, so two uploads in a row flickered between both jobs every half second.
let watching = 0;

async function upload(event) {
  event.preventDefault();
  const token = ++watching;
  const form = new FormData(event.target);
  const file = form.get("calibration");
  if (file && file.size === 0 && !file.name) form.delete("calibration");
  for (const [key, value] of [...form.entries()]) if (typeof value === "string" && !value.trim()) form.delete(key);
  const submit = event.target.querySelector("button[type=submit]");
  submit.disabled = true;
  $("#job").hidden = false;
  $("#job").dataset.status = "uploading";
  $("#job-error").hidden = true;
  $("#job-lost").hidden = true;
  $("#job-bar").style.width = "0";
  $("#job-text").textContent = "Uploading…";
  let accepted;
  try {
    accepted = await api("/v1/models", { method: "POST", body: form });
  } catch (e) {
    $("#job-text").textContent = "";  // nothing is uploading any more: the error below says why
    return showJobError("The upload was refused: " + e.message);
  } finally {
    submit.disabled = false;
  }
  loadModels();
  if (token !== watching) return;  // a newer upload has the job line
  $("#job-text").textContent = `${accepted.name} v${accepted.version}: queued`;
  watchJob(accepted, token);
}

function showJobError(message) {
  const box = $("#job-error");
  box.textContent = message;
  box.hidden = false;
  $("#job").dataset.status = "failed";
}

async function watchJob(accepted, token) {
  $("#job").dataset.status = "queued";
  for (;;) {
    let job;
    try { job = await api(accepted.status_url); } catch (e) {
      return token === watching ? showJobError("Cannot read the job: " + e.message) : null;
    }
    if (token !== watching) return;
    $("#job").dataset.status = job.status;
    $("#job-bar").style.width = Math.round(job.progress * 100) + "%";
    const stage = job.stage ? ", stage " + job.stage : "";
    $("#job-text").textContent =
      `${job.model} v${job.version}: ${job.status}${stage} (${Math.round(job.progress * 100)}%)`;
    // Was: a job whose worker died read "running" with its progress frozen, and nothing said why or what next.
    $("#job-lost").textContent = job.worker_lost ? "The job's worker was lost: " + job.worker_lost : "";
    $("#job-lost").hidden = !job.worker_lost;
    if (job.status === "succeeded") {
      await loadModels();
      return openReport(job.model, job.version);
    }
    if (job.status === "failed") {
      showJobError(`Optimization failed: ${job.error || "no reason recorded"}\n` +
        "A ready version that served before keeps serving; if there is none, this one keeps serving its original.");
      await loadModels();
      return openReport(job.model, job.version);
    }
    await new Promise((resolve) => setTimeout(resolve, 500));
  }
}

// -- report ---------------------------------------------------------------------------------------

async function openReport(name, version) {
  const described = await api("/v1/models/" + enc(name)).catch((e) => { alert(e.message); return null; });
  if (!described) return;
  state.model = name;
  state.inputs = described.inputs;
  state.described = described;
  $("#report-section").hidden = false;
  $("#report-model").textContent = name;
  renderVersions(described, version);
  fillTryIt(described.inputs);
  $("#try").hidden = described.serving_version === null;
  $("#try-none").hidden = described.serving_version !== null;
  $("#pin-error").hidden = true;
  $("#delete-error").hidden = true;
  await showVersion(described.versions.find((v) => v.version === Number(version)) || described.versions.at(-1));
  $("#report-section").scrollIntoView({ behavior: "instant", block: "start" });
  // The keyboard follows the eye: Tab goes on from the report, not from the models list above the upload form.
  $("#report-title").focus({ preventScroll: true });
}

function renderVersions(described, selected) {
  const select = $("#report-version");
  select.replaceChildren(...described.versions.map((v) => {
    const notes = [v.status];
    if (v.version === described.serving_version) notes.push("serves");
    if (v.version === described.pinned_version) notes.push("pinned");
    return el("option", { value: v.version }, `v${v.version} (${notes.join(", ")})`);
  }));
  select.value = String(selected);
}

// Which version serves and why, with the admin's controls: pin the version shown (rollback), or unpin.
function renderServing() {
  const d = state.described;
  const shown = d.versions.find((v) => v.version === state.version);
  const box = $("#serving");
  box.dataset.serving = d.serving_version ?? "";
  box.dataset.pinned = d.pinned_version ?? "";
  const served = d.versions.find((v) => v.version === d.serving_version);
  $("#serving-text").textContent = !served ? "No version serves yet."
    : d.pinned_version !== null
      ? `v${served.version} serves: pinned, so newer versions wait until it is unpinned.`
      : served.status === "ready" ? `v${served.version} serves: the newest ready version (nothing pinned).`
        : `v${served.version} serves its validated original: no version is ready (nothing pinned).`;
  const pin = $("#pin");
  pin.textContent = `Pin v${state.version} to serve`;
  // Pinnable: ready, or failed (it serves its validated original) unless its model cannot run; not one optimizing.
  pin.hidden = !shown || !["ready", "failed"].includes(shown.status) || shown.servable === false
    || d.pinned_version === state.version;
  $("#unpin").hidden = d.pinned_version === null;
  $("#delete-version").textContent = `Delete v${state.version}`;
}

async function setPin(version) {
  const path = `/v1/models/${enc(state.model)}/serving`;
  const error = $("#pin-error");
  error.hidden = true;
  try {
    if (version === null) await api(path, { method: "DELETE" });
    else await api(path, { method: "PUT", body: JSON.stringify({ version }),
      headers: { "Content-Type": "application/json" } });
  } catch (e) {
    error.textContent = (version === null ? "Unpin" : `Pin v${version}`) + " refused: " + e.message;
    error.hidden = false;
    return;
  }
  const before = state.described.serving_version;
  const described = await api("/v1/models/" + enc(state.model)).catch(() => null);
  if (described) {
    state.described = described;
    state.inputs = described.inputs;
    renderVersions(described, state.version);
    if (described.serving_version !== before) fillTryIt(described.inputs);  // "try it" runs the serving version
    renderServing();
  }
  await loadModels();
}

// Delete the version shown, or the whole model (DELETE /v1/models/{name}[/versions/{n}]), after the browser's confirm.
async function remove(whole) {
  const what = whole ? `every version of ${state.model}` : `${state.model} v${state.version}`;
  if (!window.confirm(`Delete ${what}? Its files go; a running optimization is stopped.`)) return;
  const path = `/v1/models/${enc(state.model)}` + (whole ? "" : `/versions/${state.version}`);
  const error = $("#delete-error");
  error.hidden = true;
  try { await api(path, { method: "DELETE" }); } catch (e) {
    error.textContent = "Delete refused: " + e.message;
    error.hidden = false;
    return;
  }
  if (whole) closeReport();
  else { state.version = null; await refreshReport(); }
  await loadModels();
}

async function showVersion(v) {
  state.version = v.version;
  if (state.described) renderServing();
  const failed = $("#report-failed");
  const body = $("#report-body");
  $("#report-section").dataset.version = v.version;
  if (v.status !== "ready") {
    body.hidden = true;
    failed.hidden = false;
    failed.textContent = v.status === "failed"
      ? `Version ${v.version} failed to optimize: ${v.error || "no reason recorded"}`
      : `Version ${v.version} is still optimizing (${v.job ? v.job.stage || v.job.status : ""}).` +
        (v.job && v.job.worker_lost ? "\nIts worker was lost: " + v.job.worker_lost : "");
    return;
  }
  let answer;
  try {
    answer = await api(`/v1/models/${enc(state.model)}/versions/${v.version}/report`);
  } catch (e) {
    body.hidden = true; failed.hidden = false; failed.textContent = "No report: " + e.message;
    return;
  }
  failed.hidden = true;
  body.hidden = false;
  renderReport(answer.report, v);
}

// The speed-up the service proves for what it serves: the confirmation run's paired figure (speedup_paired: median of
// round-by-round ratios over the original, 95% interval), 1x when the original serves. Not speedup_p50: a ratio of two
// p50s timed apart; nor the selection run's figure of the winner, its best draw among the candidates (tends higher).
// The interval line says what the CLI's summary says (optimizer/report_table.served_speedup): the figure the winner
// was chosen by in the selection run, or the candidate that a second timing did not confirm when the original serves.
function servedSpeedup(r) {
  const p = r.speedup_paired, conf = r.confirmation;
  const ratio = (x) => `${fmt(x.median, 2)}x [${fmt(x.low, 2)}–${fmt(x.high, 2)}]`;
  if (r.selected === r.baseline) {
    return { text: "1.00x (original)",
      interval: conf && conf.speedup ? `${conf.variant} measured ${ratio(conf.speedup)} when timed again: not confirmed`
        : "" };
  }
  if (!p) return { text: fmt(r.speedup_p50, 2) + "x (p50s)", interval: "p50 ratio: no paired timing in this report" };
  const chosen = r.speedup_selection ? `; chosen at ${ratio(r.speedup_selection)} in the selection run` : "";
  return { text: ratio(p), interval: `95%, ${p.rounds} paired rounds, timed again against the original alone${chosen}` };
}

// A variant's own paired speed-up over the original, timed with all the others in the selection run.
function variantSpeedup(x, r) {
  const batch = String((r.noise && r.noise.batch) || 1);
  const p = ((x.latency_by_batch || {})[batch] || {}).speedup_vs_original;
  if (x.name === r.baseline) return "1.00x";
  return p ? `${fmt(p.median, 2)}x [${fmt(p.low, 2)}–${fmt(p.high, 2)}]` : "";
}

function renderReport(r, v) {
  const variants = r.variants || [];
  const speed = servedSpeedup(r);
  const cards = [
    ["Serves", r.selected], ["Speed-up", speed.text, speed.interval], ["Size ratio", fmt(r.size_ratio, 2)],
    ["Provider", r.provider, measuredOn(r.environment)], ["Optimized in", fmt(r.duration_s, 1) + " s"],
  ];
  $("#summary").replaceChildren(...cards.map(([label, value, sub]) => {
    const card = el("div", { class: "card", "data-field": label }, label);
    card.appendChild(el("b", {}, String(value)));
    if (sub) card.appendChild(el("small", {}, sub));
    return card;
  }));
  $("#selection-reason").textContent = "Why: " + (r.selection_reason || "—");
  const link = $("#download");
  link.href = `/v1/models/${enc(state.model)}/versions/${v.version}/artifact?variant=optimized`;
  link.dataset.filename = `${state.model}-v${v.version}-optimized.onnx`;
  link.textContent = r.selected === r.baseline ? "Download the served model (the original: nothing beat it)"
    : `Download the served model (${r.selected})`;

  const timed = variants.filter((x) => x.latency_ms && x.latency_ms.p50 != null);
  $("#latency-chart").replaceChildren(latencyChart(timed, r));
  const sized = variants.filter((x) => x.size_bytes != null);
  $("#size-chart").replaceChildren(barChart(sized.map((x) => ({
    name: x.name, value: x.size_bytes, label: kb(x.size_bytes), mark: mark(x, r),
  })), "size"));

  readTolerance(r);
  $("#tolerance").textContent = gatesText(r);
  $("#accuracy tbody").replaceChildren(...accuracyRows(variants, r));
  $("#accuracy-notes").replaceChildren(...(r.accuracy_notes || []).map((n) => el("li", {}, n)));
  $("#graph").replaceChildren(graphView(r));
  const skipped = r.skipped_candidates || [];
  $("#skipped-count").textContent = skipped.length;
  $("#skipped").replaceChildren(...skipped.map((s) => el("li", {}, `${s.name}: ${s.reason}`)));
  const rejected = variants.filter((x) => x.status !== "ok");
  $("#rejected-count").textContent = rejected.length;
  $("#rejected").replaceChildren(...rejected.map((x) => el("li", {}, `${x.name}: ${x.reason || x.status}`)));
}

// Which machine timed the candidates: a speed-up holds for that CPU and ONNX Runtime, not for another.
function measuredOn(env) {
  if (!env) return "";
  const cpu = env.cpu && env.cpu.model;
  return [cpu ? "on " + cpu : null, env.onnxruntime ? "ONNX Runtime " + env.onnxruntime : null]
    .filter(Boolean).join(", ");
}

const kb = (bytes) => (bytes >= 1e6 ? fmt(bytes / 1e6, 2) + " MB" : fmt(bytes / 1e3, 1) + " kB");
const mark = (x, r) => (x.name === r.selected ? "selected" : x.name === r.baseline ? "baseline" :
  x.status === "ok" ? "ok" : "rejected");
const COLORS = { selected: "#17733a", baseline: "#5a6272", ok: "#3b6fd8", rejected: "#c9ced8" };
// The report's inner width (1000 px in a wide window): the bars get what the names and values leave. Was a fixed
// 1000 px, so in a window under ~1080 px the values ran out of the section and the page scrolled sideways.
const chartWidth = () => $("#report-body").clientWidth || 1000;

// A chart's <svg>: its viewBox lets CSS (max-width: 100%) scale it down where even 200 px of bars do not fit.
const chartSvg = (width, height, attrs) => svg("svg", { width, height, viewBox: `0 0 ${width} ${height}`, ...attrs });

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

// Room for the longest label in the charts' 11px font: auto's variant names run to 55 characters and were cut off
// at a fixed 250 px.
function labelWidth(names) {
  const ctx = document.createElement("canvas").getContext("2d");
  ctx.font = "11px system-ui, sans-serif";
  return Math.ceil(Math.max(60, ...names.map((n) => ctx.measureText(n).width))) + 12;
}

// Horizontal bars: p50 as the bar, p90..p99 as a whisker. The axis ends a little past the largest p90 so
// one noisy p99 does not flatten every bar; a whisker cut by the axis ends in an arrow and says its value.
// Each bar also says the variant's paired speed-up over the original (what the choice is made by).
function latencyChart(variants, r) {
  const left = labelWidth(variants.map((x) => x.name)), values = 300, rowH = 24, top = 8;
  const width = Math.max(200, chartWidth() - left - values);
  const axisMax = Math.max(...variants.map((x) => Math.max(x.latency_ms.p50, x.latency_ms.p90 || 0))) * 1.25 || 1;
  const scale = (ms) => left + Math.min(ms, axisMax) / axisMax * width;
  const chart = chartSvg(left + width + values, top + rowH * variants.length + 24, {
    class: "latency", role: "img" });
  variants.forEach((x, i) => {
    const y = top + i * rowH;
    const { p50, p90, p99 } = x.latency_ms;
    const g = svg("g", { class: "bar", "data-variant": x.name, "data-p50": p50, "data-p90": p90, "data-p99": p99 });
    g.appendChild(svg("text", { x: left - 6, y: y + 15, "text-anchor": "end", class: "name" }, x.name));
    g.appendChild(svg("rect", { x: left, y: y + 4, width: Math.max(1, scale(p50) - left), height: rowH - 8,
      fill: COLORS[mark(x, r)] }));
    if (p90 != null && p99 != null) {
      const x1 = scale(p90), x2 = scale(p99), cy = y + rowH / 2;
      g.appendChild(svg("line", { x1, x2, y1: cy, y2: cy, stroke: "#1d2330" }));
      g.appendChild(svg("line", { x1, x2: x1, y1: cy - 5, y2: cy + 5, stroke: "#1d2330" }));
      g.appendChild(p99 > axisMax
        ? svg("path", { d: `M${x2 - 6},${cy - 4} L${x2},${cy} L${x2 - 6},${cy + 4}`, fill: "none", stroke: "#1d2330" })
        : svg("line", { x1: x2, x2, y1: cy - 5, y2: cy + 5, stroke: "#1d2330" }));
    }
    const speed = variantSpeedup(x, r);
    const label = `p50 ${fmt(p50, 3)} ms` + (p99 != null && p99 > axisMax ? ` (p99 ${fmt(p99, 2)})` : "") +
      (speed ? `, ${speed}` : "");
    g.appendChild(svg("text", { x: left + width + 6, y: y + 15, class: "value" }, label));
    g.appendChild(svg("title", {}, `${x.name}: p50 ${p50} ms, p90 ${p90} ms, p99 ${p99} ms (${x.status})` +
      (speed ? `; ${speed} the original by paired rounds (median [95%])` : "")));
    chart.appendChild(g);
  });
  const base = top + rowH * variants.length + 14;
  chart.appendChild(svg("line", { x1: left, x2: left + width, y1: base - 8, y2: base - 8, stroke: "#9aa1ad" }));
  chart.appendChild(svg("text", { x: left, y: base + 6 }, "0 ms"));
  chart.appendChild(svg("text", { x: left + width, y: base + 6, "text-anchor": "end" }, fmt(axisMax, 3) + " ms"));
  return chart;
}

function barChart(items, cls) {
  const left = labelWidth(items.map((i) => i.name)), values = 120, rowH = 22;
  const width = Math.max(200, chartWidth() - left - values);
  const max = Math.max(...items.map((i) => i.value)) || 1;
  const chart = chartSvg(left + width + values, rowH * items.length + 8, { class: cls, role: "img" });
  items.forEach((item, i) => {
    const y = 4 + i * rowH;
    const g = svg("g", { class: "bar", "data-variant": item.name, "data-value": item.value });
    g.appendChild(svg("text", { x: left - 6, y: y + 14, "text-anchor": "end", class: "name" }, item.name));
    g.appendChild(svg("rect", { x: left, y: y + 3, width: Math.max(1, item.value / max * width), height: rowH - 6,
      fill: COLORS[item.mark] }));
    g.appendChild(svg("text", { x: left + width + 6, y: y + 14, class: "value" }, item.label));
    chart.appendChild(g);
  });
  return chart;
}

// -- accuracy: what each output was gated on (accuracy.Tolerance; the module docstring has the rules) -----------

// accuracy.Tolerance's slice limits and float rounding, from the report's `tolerance` (these defaults: older reports).
let SLICE_COSINE = 0.98, SLICE_ERROR = 0.25, FLOAT_ROUNDING = 1e-4;
function readTolerance(r) {
  const t = r.tolerance || {};
  SLICE_COSINE = t.min_slice_cosine ?? 0.98;
  SLICE_ERROR = t.max_slice_error ?? 0.25;
  FLOAT_ROUNDING = t.float_rounding ?? 1e-4;
}
const pct = (x, digits) => (x === null || x === undefined ? "—" : fmt(x * 100, digits === undefined ? 2 : digits) + "%");

// The gates in the header: the metric of each output not on the default (declared in config.metrics, or "exact"
// for a string or bool output, as its accuracy rows say), the default (cosine and top-1) for the others.
// Was: only top1 and mask:<t> were known, so a declared "cosine" read "cosine (its region x > ne...) ≥ 0.990".
function gatesText(r) {
  const cfg = r.config || {};
  const metrics = Object.assign({}, cfg.metrics || {});
  for (const x of r.variants || []) {
    for (const [name, o] of Object.entries((x.accuracy || {}).outputs || {})) {
      if (!(name in metrics) && o.metric && o.metric !== "default") metrics[name] = o.metric;
    }
  }
  const declared = Object.entries(metrics).filter(([, m]) => m !== "default");
  const outputs = cfg.outputs || (((r.graph || {}).before || {}).outputs || []).map((o) => o.name);
  const slices = `channel slices cosine ≥ ${SLICE_COSINE} and error ≤ ${pct(SLICE_ERROR, 0)}`;
  const gate = (name, m) => m === "top1" ? `${name}: top-1 ≥ ${fmt(cfg.min_top1, 3)}`
    : m === "exact" ? `${name}: values equal to the original's ≥ ${fmt(cfg.min_top1, 3)}`
      : m === "cosine" ? `${name}: cosine ≥ ${fmt(cfg.min_cosine, 3)}, ${slices}`
        : `${name}: ${m} (its region x > ${m.slice(5)} against the original's) ≥ ${fmt(cfg.min_top1, 3)}`;
  const parts = declared.map(([name, m]) => gate(name, m));
  const rest = outputs.filter((o) => !declared.some(([name]) => name === o));
  if (rest.length || !declared.length) {
    parts.push((declared.length ? "other outputs: " : "") + `cosine ≥ ${fmt(cfg.min_cosine, 3)}, ` +
      `top-1 ≥ ${fmt(cfg.min_top1, 3)}, ${slices}`);
  }
  if (cfg.outputs) parts.push(`only ${cfg.outputs.join(", ")} gate${cfg.outputs.length > 1 ? "" : "s"}`);
  return parts.join("; ");
}

// {what, value, limit, ok} for every criterion that gated this output; `ok` is false for the one(s) it failed on.
function criteria(o, cfg) {
  const metric = o.metric || "default";
  if (o.checked === false) return [];
  const atLeast = (what, x, min, show) => ({ what, value: show(x), limit: "≥ " + show(min), ok: !(x < min) });
  const percent = (x) => pct(x);
  if (metric.startsWith("mask:")) {
    const t = metric.slice(5);
    return [o.mask_iou != null
      ? atLeast(`${metric}: worst sample's IoU of x > ${t}`, o.mask_iou, cfg.min_top1, percent)
      : atLeast(`${metric}: positions agreeing on x > ${t}`, o.mask_agreement, cfg.min_top1, percent)];
  }
  // The agreement as measured, then its 95% lower bound, which must reach the limit too (accuracy._unproven).
  // Was: the bound showed only for the default metric, and not for a string output (no relative error), so an
  // "unproven" verdict stood beside nothing but ✓.
  const agreement = (what) => {
    const out = [atLeast(what, o.top1, cfg.min_top1, percent)];
    const rounding = o.relative_error != null && o.relative_error <= FLOAT_ROUNDING;  // a fused FP32: nothing to prove
    if (o.top1 != null && o.top1_lower_95 != null && !rounding) {
      const bound = atLeast(what + ", 95% lower bound", o.top1_lower_95, cfg.min_top1, percent);
      if (!bound.ok && o.passed) {  // "exact" asks no proof when the variant's numeric outputs reproduce the original's
        bound.ok = true;
        bound.limit += ", not needed: the numeric outputs reproduce the original's";
      }
      out.push(bound);
    }
    return out;
  };
  if (metric === "top1") return agreement("top-1 agreement");
  if (metric === "exact") return agreement("values equal to the original's");
  const out = [];
  if (o.cosine != null) out.push(atLeast("cosine", o.cosine, cfg.min_cosine, (x) => fmt(x, 4)));
  if (o.top1 != null) out.push(...agreement("top-1 agreement"));
  const s = o.slices;
  if (s && s.worst_cosine != null) {
    out.push(atLeast(`worst channel slice cosine (axis ${s.axis})`, s.worst_cosine, SLICE_COSINE, (x) => fmt(x, 4)));
  }
  if (s && s.worst_error != null) {
    out.push({ what: `worst channel slice error (axis ${s.axis}, of its range)`, value: pct(s.worst_error, 1),
      limit: "≤ " + pct(SLICE_ERROR, 0), ok: !(s.worst_error > SLICE_ERROR) });
  }
  return out;
}

// What was measured but did not gate the output.
function reported(o) {
  const metric = o.metric || "default";
  const parts = [];
  if (metric !== "default" || o.checked === false) {
    if ((metric !== "cosine" || o.checked === false) && o.cosine != null) parts.push(`cosine ${fmt(o.cosine, 4)}`);
    if (!["top1", "exact"].includes(metric) && o.top1 != null) parts.push(`top-1 ${pct(o.top1)}`);
  }
  if (metric.startsWith("mask:") && o.mask_iou != null && o.mask_agreement != null) {
    parts.push(`positions agreeing ${pct(o.mask_agreement)}`);
  }
  if (o.max_abs != null) parts.push(`max abs ${Number(o.max_abs).toPrecision(3)}`);
  return parts.join(", ");
}

function accuracyRows(variants, r) {
  const cfg = r.config || {};
  const rows = [];
  for (const x of variants) {
    const acc = x.accuracy;
    if (!acc || !acc.outputs) continue;
    for (const [name, o] of Object.entries(acc.outputs)) {
      const verdict = el("span", { class: o.passed ? "pass" : "fail", title: o.reason || "" },
        o.checked === false ? "not gated (reported only)" : o.passed ? "within tolerance"
          : o.unproven ? "unproven (see the rejected list)" : "outside tolerance");
      const list = el("ul", { class: "gates" });
      for (const c of criteria(o, cfg)) {
        list.appendChild(el("li", { class: c.ok ? "" : "fail", "data-value": c.value, "data-limit": c.limit },
          `${c.ok ? "✓" : "✗"} ${c.what} ${c.value} (${c.limit})`));
      }
      const tr = row([x.name, name, list, verdict, reported(o) || "—"]);
      tr.dataset.variant = x.name;
      tr.dataset.output = name;
      tr.dataset.metric = o.metric || "default";
      if (x.name === r.selected) tr.classList.add("served");
      rows.push(tr);
    }
  }
  if (!rows.length) rows.push(row(["—", "no variant needed an accuracy check", "", "", ""]));
  return rows;
}

// -- graph: before = the uploaded model, after = the served variant (report.graph), and the steps between -------

function graphView(r) {
  const before = (r.graph && r.graph.before) || {}, after = (r.graph && r.graph.after) || {};
  const variants = r.variants || [];
  const served = variants.find((x) => x.name === r.selected) || {};
  const wrap = el("div", { class: "graph-cols" });
  const hist = el("div");
  const what = r.selected === r.baseline ? "the uploaded model itself serves"
    : `after: ${r.selected}, the served variant (${served.precision || "?"})`;
  hist.appendChild(el("p", { id: "graph-nodes" },
    `Nodes: ${before.node_count ?? "—"} before, ${after.node_count ?? "—"} after (before: the uploaded model; ${what}).`));
  const table = el("table", { id: "op-histogram" });
  table.appendChild(row(["Op", "Uploaded", "Served"]));
  const ops = new Set([...Object.keys(before.op_histogram || {}), ...Object.keys(after.op_histogram || {})]);
  for (const op of [...ops].sort()) {
    const b = (before.op_histogram || {})[op] || 0, a = (after.op_histogram || {})[op] || 0;
    const tr = row([op, b, a]);
    if (a !== b) tr.style.fontWeight = "600";
    table.appendChild(tr);
  }
  hist.appendChild(table);
  wrap.appendChild(hist);

  // Every candidate but the original is built on the cleaned and fused graph (variant "fused"), so the served one
  // went through both steps: fusion's changes are on "fused", the precision change on the served variant.
  const changesBox = el("div");
  const changed = (x) => x && x.changes && x.changes.nodes_before != null;  // the original's `changes` is {}
  const fused = variants.find((x) => x.name === "fused");
  const steps = r.selected === r.baseline ? [fused] : r.selected === "fused" ? [fused] : [fused, served];
  const base = changed(fused) ? "fused" : "the original";
  const list = el("ol", { id: "changes" });
  for (const x of steps.filter(changed)) {
    const c = x.changes;
    const notServed = r.selected === r.baseline ? " (not served)" : "";
    const step = el("li", { "data-variant": x.name },
      `Changes in ${x.name}${notServed}: ${c.nodes_before} → ${c.nodes_after} nodes` +
      (x.name === "fused" ? " (cleanup and fusion, the graph every other variant is built on)"
        : ` (${x.precision}, built on ${base})`));
    const items = el("ul");
    const add = (label, obj) => {
      const entries = Object.entries(obj || {});
      if (entries.length) items.appendChild(el("li", {}, label + ": " + entries.map(([k, n]) => `${k} ×${n}`).join(", ")));
    };
    add("Fusions applied", c.fusions);
    add("Redundant nodes removed", c.redundant_removed);
    add("Nodes removed", c.removed);
    add("Quantized ops", c.quantized_ops);
    if (c.transformer_fusion) {
      items.appendChild(el("li", {}, "Transformer fusion: " +
        (c.transformer_fusion.used ? "used" : "not used (" + (c.transformer_fusion.reason || "") + ")")));
    }
    const kept = (x.settings || {}).exclude_nodes;
    if (kept && kept.length) items.appendChild(el("li", {}, "Left in float: " + kept.join(", ")));
    if (!items.children.length) items.appendChild(el("li", { class: "muted" }, "no fusion or removal recorded"));
    step.appendChild(items);
    list.appendChild(step);
  }
  if (list.children.length) changesBox.appendChild(list);
  else changesBox.appendChild(el("p", { class: "muted" }, "No graph changes recorded."));
  const inServed = Object.entries(after.fused || {}).map(([op, n]) => `${op} ×${n}`);
  if (inServed.length) changesBox.appendChild(el("p", { id: "served-fused" }, "Fused ops in the served graph: " + inServed.join(", ")));
  const left = (after.fusable || []).map((f) => `${f.pattern} ×${f.count} → ${f.fuses_to}`);
  if (left.length) changesBox.appendChild(el("p", { class: "muted" }, "Left to ONNX Runtime at load: " + left.join("; ")));
  wrap.appendChild(changesBox);
  return wrap;
}

async function download(event) {
  // A plain link cannot carry the API key: fetch the file and hand the browser a blob.
  event.preventDefault();
  const link = event.currentTarget;
  const response = await fetch(link.href, { headers: headers() });
  if (!response.ok) { alert("Download failed: " + (await response.text())); return; }
  const url = URL.createObjectURL(await response.blob());
  const a = el("a", { href: url, download: link.dataset.filename });
  document.body.appendChild(a); a.click(); a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

// -- try it ---------------------------------------------------------------------------------------

function example(spec) {
  // Dynamic dimensions (a name or null) become 1; values are small and valid for the dtype.
  const shape = (spec.shape || []).map((d) => (typeof d === "number" && d > 0 ? d : 1));
  const dtype = spec.dtype || "float32";
  const value = (i) => dtype.startsWith("float") ? Number((Math.sin(i + 1) * 0.5).toFixed(3))
    : dtype === "bool" ? i % 2 === 0 : dtype === "string" ? "example" : i % 5;
  let i = 0;
  const build = (dims) => (dims.length === 0 ? value(i++) : Array.from({ length: dims[0] }, () => build(dims.slice(1))));
  return build(shape);
}

function fillTryIt(inputs) {
  const feed = {};
  for (const spec of inputs) feed[spec.name] = example(spec);
  $("#try-input").value = JSON.stringify({ inputs: feed });
  $("#try-output").textContent = "";
  $("#try-latency").textContent = "";
}

async function tryIt() {
  const out = $("#try-output");
  let body;
  try { body = JSON.parse($("#try-input").value); } catch (e) { out.textContent = "Not JSON: " + e.message; return; }
  const started = performance.now();
  try {
    const answer = await api(`/v1/models/${enc(state.model)}/predict`, {
      method: "POST", body: JSON.stringify(body), headers: { "Content-Type": "application/json" },
    });
    const ms = performance.now() - started;
    $("#try-latency").textContent = `v${answer.version} (${answer.variant}) answered in ${ms.toFixed(1)} ms ` +
      "(round trip from this browser)";
    $("#try-latency").dataset.ms = ms.toFixed(3);
    out.textContent = JSON.stringify(answer.outputs);
  } catch (e) {
    $("#try-latency").textContent = "";
    out.textContent = "Refused: " + e.message;
  }
}

// -- start ----------------------------------------------------------------------------------------

function start() {
  const keyInput = $("#api-key");
  keyInput.value = sessionStorage.getItem(KEY) || "";
  keyInput.addEventListener("change", () => {
    if (keyInput.value) sessionStorage.setItem(KEY, keyInput.value); else sessionStorage.removeItem(KEY);
    loadModels();
  });
  $("#refresh").addEventListener("click", loadModels);
  $("#upload").addEventListener("submit", upload);
  $("#report-version").addEventListener("change", async (e) => {
    const described = await api("/v1/models/" + enc(state.model));
    state.described = described;
    $("#pin-error").hidden = true;
    $("#delete-error").hidden = true;
    showVersion(described.versions.find((v) => v.version === Number(e.target.value)));
  });
  $("#download").addEventListener("click", download);
  $("#try-send").addEventListener("click", tryIt);
  $("#pin").addEventListener("click", () => setPin(state.version));
  $("#unpin").addEventListener("click", () => setPin(null));
  $("#delete-version").addEventListener("click", () => remove(false));
  $("#delete-model").addEventListener("click", () => remove(true));
  loadModels();
}

start();
