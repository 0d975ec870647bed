// The Freshet web UI: reads the JobManager's JSON API (see /openapi.json) and renders the jobs
// list, a job's graph with live rates, its checkpoints and exceptions, and the TaskManagers.
"use strict";

const main = document.getElementById("main");
const refreshed = document.getElementById("refreshed");
const tokenForm = document.getElementById("token");
let timer = null;
let busy = false; // a savepoint, stop or cancel request is in flight
let generation = 0; // renders started; an older one finishing late is dropped
let selectedVertex = null;
let definitionOpen = false; // kept across refreshes

// ---- API --------------------------------------------------------------------------------

class Unauthorized extends Error {}

async function api(path, options = {}) {
  const headers = Object.assign({ "Accept": "application/json" }, options.headers || {});
  const token = sessionStorage.getItem("freshet-token");
  if (token) headers["Authorization"] = "Bearer " + token;
  const res = await fetch(path, Object.assign({}, options, { headers }));
  if (res.status === 401) throw new Unauthorized("a token is needed");
  const body = await res.json().catch(() => ({ error: res.statusText }));
  if (!res.ok) throw new Error(body.error || res.statusText);
  return body;
}

tokenForm.addEventListener("submit", (e) => {
  e.preventDefault();
  sessionStorage.setItem("freshet-token", tokenForm.elements.token.value);
  tokenForm.hidden = true;
  route();
});

// ---- DOM helpers ------------------------------------------------------------------------

// el("td", {class: "x"}, "text", child, ...): text is always set as text, never as HTML
function el(tag, attrs, ...children) {
  const svg = ["svg", "g", "rect", "path", "text", "defs", "marker", "title", "tspan"].includes(tag);
  const node = svg ? document.createElementNS("http://www.w3.org/2000/svg", tag) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function table(headers, rows, attrs) {
  return el("table", attrs,
    el("thead", null, el("tr", null, headers.map((h) => el("th", null, h)))),
    el("tbody", null, rows));
}

function section(title, ...children) {
  return el("section", null, el("h2", null, title), ...children);
}

// ---- formatting -------------------------------------------------------------------------

const NO_WATERMARK = -9.2e18;
const END_WATERMARK = 9.2e18;

function count(n) {
  if (n === undefined || n === null) return "–";
  const a = Math.abs(n);
  if (a >= 1e9) return (n / 1e9).toFixed(2) + "G";
  if (a >= 1e6) return (n / 1e6).toFixed(2) + "M";
  if (a >= 1e4) return (n / 1e3).toFixed(1) + "k";
  return Number.isInteger(n) ? String(n) : n.toFixed(1);
}

function bytes(n) {
  if (!n) return "0 B";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + units[i];
}

function duration(ms) {
  if (ms === undefined || ms === null) return "–";
  if (ms < 1000) return ms + " ms";
  const s = ms / 1000;
  if (s < 60) return s.toFixed(1) + " s";
  const m = Math.floor(s / 60), h = Math.floor(m / 60);
  if (h) return h + "h " + (m % 60) + "m";
  return m + "m " + Math.floor(s % 60) + "s";
}

function percent(x) {
  return x === undefined || x === null ? "–" : Math.round(x * 100) + "%";
}

function time(ms) {
  return new Date(ms).toISOString().replace("T", " ").replace("Z", "");
}

function watermark(wm) {
  if (wm <= NO_WATERMARK) return "none";
  if (wm >= END_WATERMARK) return "end";
  return time(wm);
}

function watermarkLag(wm, now) {
  if (wm <= NO_WATERMARK || wm >= END_WATERMARK) return "–";
  return duration(Math.max(0, now - wm));
}

function stateBadge(state) {
  return el("span", { class: "state " + state }, state);
}

// ---- pages ------------------------------------------------------------------------------

async function jobsPage() {
  const jobs = await api("/jobs");
  const rows = jobs.slice().reverse().map((j) => el("tr", { "data-job": j.id },
    el("td", null, el("a", { href: "#/jobs/" + encodeURIComponent(j.id) }, j.name)),
    el("td", { class: "mono" }, j.id),
    el("td", null, stateBadge(j.state)),
    el("td", null, duration(j.duration_ms)),
    el("td", null, j.restarts),
    el("td", { class: "message" }, j.message || "")));
  return [section("Jobs", jobs.length
    ? table(["name", "id", "state", "duration", "restarts", "message"], rows, { id: "jobs" })
    : el("p", { class: "muted" }, "No jobs yet."))];
}

async function taskManagersPage() {
  const tms = await api("/taskmanagers");
  const rows = tms.map((t) => el("tr", { "data-taskmanager": t.id },
    el("td", { class: "mono" }, t.id),
    el("td", null, el("span", { class: "slots" },
      Array.from({ length: t.slots }, (_, i) => el("span", { class: i < t.slots_used ? "slot used" : "slot" }))),
      " " + t.slots_used + " / " + t.slots),
    el("td", null, Object.entries(t.jobs).map(([j, n]) => j + " (" + n + ")").join(", ")),
    el("td", { class: "mono" }, t.data_address || "in process"),
    el("td", { class: "message" }, t.lost
      ? [el("span", { class: "state failed" }, "lost"), " " + (t.lost_at_ms ? time(t.lost_at_ms) + ": " : "") + t.lost]
      : el("span", { class: "state running" }, "registered"))));
  return [section("TaskManagers", table(["id", "slots", "jobs", "data address", "status"], rows, { id: "taskmanagers" }))];
}

function vertexBox(v, x, y, w, h, now) {
  const r = v.rates;
  const bp = r ? r.backpressured : 0;
  const load = r ? r.busy : 0;
  const cls = "vertex" + (bp >= 0.5 ? " backpressured" : "") + (selectedVertex === v.index ? " selected" : "");
  const wm = v.metrics.watermark;
  return el("g", { class: cls, "data-vertex": v.index, transform: `translate(${x},${y})`,
    onclick: () => { selectedVertex = selectedVertex === v.index ? null : v.index; route(); } },
    el("title", null, v.operators.join(" → ")),
    el("rect", { width: w, height: h, rx: 6, class: "box" }),
    el("rect", { width: Math.max(0, Math.min(1, load)) * w, height: 4, y: h - 4, class: "load" }),
    el("text", { x: 10, y: 20, class: "name" }, v.name.length > 30 ? v.name.slice(0, 29) + "…" : v.name),
    el("text", { x: 10, y: 40, class: "rates" },
      el("tspan", null, "p=" + v.parallelism + "  in "),
      el("tspan", { class: "rate-in" }, r ? count(r.records_in_per_s) + "/s" : "–"),
      el("tspan", null, "  out "),
      el("tspan", { class: "rate-out" }, r ? count(r.records_out_per_s) + "/s" : "–")),
    el("text", { x: 10, y: 58, class: "times" },
      "busy " + percent(r && r.busy) + "  backpressured " + percent(r && r.backpressured) + "  idle " + percent(r && r.idle)),
    el("text", { x: 10, y: 76, class: "watermark" },
      "watermark " + (wm > NO_WATERMARK && wm < END_WATERMARK
        ? time(wm).slice(11) + "  lag " + watermarkLag(wm, now)
        : watermark(wm))));
}

// Vertices in columns by their longest distance from a source; edges as curves.
function graph(job) {
  const depth = job.vertices.map(() => 0);
  for (let pass = 0; pass < job.vertices.length; pass++) {
    for (const e of job.edges) depth[e.to] = Math.max(depth[e.to], depth[e.from] + 1);
  }
  const W = 290, H = 88, GX = 120, GY = 24, PAD = 12;
  const rows = {};
  const pos = job.vertices.map((v) => {
    const d = depth[v.index];
    const row = rows[d] = (rows[d] || 0) + 1;
    return { x: PAD + d * (W + GX), y: PAD + (row - 1) * (H + GY) };
  });
  const width = PAD * 2 + (Math.max(0, ...depth) + 1) * (W + GX) - GX;
  const height = PAD * 2 + Math.max(1, ...Object.values(rows)) * (H + GY) - GY;
  const edges = job.edges.map((e) => {
    const a = pos[e.from], b = pos[e.to];
    const x1 = a.x + W, y1 = a.y + H / 2, x2 = b.x, y2 = b.y + H / 2, mx = (x1 + x2) / 2;
    return el("g", { class: "edge" },
      el("path", { d: `M${x1},${y1} C${mx},${y1} ${mx},${y2} ${x2 - 6},${y2}`, "marker-end": "url(#arrow)" }),
      el("text", { x: mx, y: (y1 + y2) / 2 - 6, "text-anchor": "middle" }, e.partitioning));
  });
  return el("svg", { id: "graph", width, height, viewBox: `0 0 ${width} ${height}` },
    el("defs", null, el("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 8, refY: 5, markerWidth: 8, markerHeight: 8, orient: "auto" },
      el("path", { d: "M0,0 L10,5 L0,10 z" }))),
    edges,
    job.vertices.map((v) => vertexBox(v, pos[v.index].x, pos[v.index].y, W, H, job.now_ms)));
}

function metricsRow(label, m, r, now, attrs) {
  return el("tr", attrs,
    el("td", null, label),
    el("td", null, count(m.records_in)), el("td", null, count(m.records_out)),
    el("td", { class: "rate-in" }, r ? count(r.records_in_per_s) + "/s" : "–"),
    el("td", { class: "rate-out" }, r ? count(r.records_out_per_s) + "/s" : "–"),
    el("td", null, percent(r && r.busy)), el("td", null, percent(r && r.backpressured)), el("td", null, percent(r && r.idle)),
    el("td", null, watermark(m.watermark)), el("td", null, watermarkLag(m.watermark, now)),
    el("td", null, count(m.late_records)), el("td", null, count(m.dead_letters)));
}

const METRIC_HEADERS = ["", "records in", "records out", "in rate", "out rate", "busy", "backpressured", "idle", "watermark", "watermark lag", "late", "dead letters"];

function vertexTable(job) {
  const rows = [];
  for (const v of job.vertices) {
    rows.push(metricsRow(v.name + " (p=" + v.parallelism + ")", v.metrics, v.rates, job.now_ms, { "data-vertex": v.index, class: "vertex-row" }));
    if (selectedVertex === v.index) {
      for (const s of v.subtasks) {
        rows.push(metricsRow("  #" + s.subtask + (s.taskmanager ? " on " + s.taskmanager : ""), s.metrics, s.rates, job.now_ms, { class: "subtask-row" }));
      }
    }
  }
  return table(METRIC_HEADERS, rows, { id: "vertices" });
}

function checkpointTable(history) {
  const rows = history.history.slice().reverse().map((c) => el("tr", { "data-kind": c.kind, "data-status": c.status },
    el("td", null, c.id), el("td", null, c.kind + (c.stop ? " (stop)" : "")), el("td", null, stateBadge(c.status)),
    el("td", null, time(c.trigger_time_ms)), el("td", null, duration(c.duration_ms)),
    el("td", null, duration(c.alignment_ms)), el("td", null, duration(c.sync_ms)),
    el("td", null, bytes(c.full_bytes)), el("td", null, bytes(c.uploaded_bytes)),
    el("td", null, c.acknowledged + "/" + c.expected),
    el("td", { class: "mono message" }, c.path || c.failure || "")));
  return [
    el("p", { class: "muted" }, history.completed + " completed, " + history.failed + " failed over all attempts"),
    rows.length
      ? table(["id", "kind", "status", "triggered", "duration", "alignment", "sync", "full size", "uploaded", "acks", "path / failure"], rows, { id: "checkpoints" })
      : el("p", { class: "muted", id: "checkpoints" }, "No checkpoints yet."),
  ];
}

function exceptionList(exceptions) {
  if (!exceptions.length) return el("p", { class: "muted", id: "exceptions" }, "No failures.");
  const rows = exceptions.slice().reverse().map((x) => el("tr", null,
    el("td", null, time(x.time_ms)), el("td", null, x.attempt),
    el("td", null, x.restart_delay_ms === null ? "failed for good" : "restarted after " + duration(x.restart_delay_ms)),
    el("td", { class: "mono message" }, x.error)));
  return table(["time", "attempt", "outcome", "error"], rows, { id: "exceptions" });
}

// what the last savepoint, stop or cancel request did; kept across refreshes of the page
let actionStatus = "";
let cancelArmed = false;

function actionButtons(job) {
  const running = job.state === "running";
  const act = async (what, path) => {
    busy = true;
    actionStatus = what + "…";
    route();
    try {
      const r = await api(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: "{}" });
      actionStatus = what + " done" + (r.path ? ": " + r.path : "");
    } catch (e) {
      actionStatus = what + " failed: " + e.message;
    }
    busy = false;
    cancelArmed = false;
    route();
  };
  const base = "/jobs/" + encodeURIComponent(job.id);
  const ended = ["finished", "failed", "cancelled"].includes(job.state);
  return el("div", { id: "actions" },
    el("button", { id: "savepoint", disabled: busy || !running, onclick: () => act("savepoint", base + "/savepoints") }, "Trigger savepoint"),
    el("button", { id: "stop", disabled: busy || !running, onclick: () => act("stop with savepoint", base + "/stop") }, "Stop with savepoint"),
    el("button", { id: "cancel", class: "danger", disabled: busy || ended,
      onclick: () => {
        if (cancelArmed) return act("cancel", base + "/cancel");
        cancelArmed = true;
        route();
      } }, cancelArmed ? "Confirm cancel" : "Cancel job"),
    el("span", { id: "action-status", class: "muted" }, actionStatus));
}

async function jobPage(id) {
  const base = "/jobs/" + encodeURIComponent(id);
  const [job, checkpoints, exceptions, definition] = await Promise.all(
    [api(base), api(base + "/checkpoints"), api(base + "/exceptions"), api(base + "/definition")]);
  const facts = el("dl", { class: "facts" },
    el("dt", null, "id"), el("dd", { class: "mono" }, job.id),
    el("dt", null, "state"), el("dd", { id: "job-state" }, stateBadge(job.state)),
    el("dt", null, "duration"), el("dd", null, duration(job.duration_ms)),
    el("dt", null, "attempt"), el("dd", null, job.attempt + " (" + job.restarts + " restarts)"),
    el("dt", null, "restored from"), el("dd", { class: "mono" }, job.restored_from || "nothing"),
    el("dt", null, "trace"), el("dd", { class: "mono" }, job.trace_id || "–"),
    job.message ? [el("dt", null, "message"), el("dd", { class: "message" }, job.message)] : []);
  const window_ms = Math.max(0, ...job.vertices.map((v) => v.rates ? v.rates.window_ms : 0));
  return [
    el("h1", null, job.name, " ", stateBadge(job.state)),
    actionButtons(job),
    facts,
    section("Graph", el("p", { class: "muted", id: "rates-window", "data-ms": window_ms },
      "Rates over the last " + duration(window_ms) + "; click a vertex for its subtasks."),
      el("div", { class: "graph" }, graph(job))),
    section("Vertices", vertexTable(job)),
    section("Checkpoints", checkpointTable(checkpoints)),
    section("Exceptions", exceptionList(exceptions)),
    section("Definition", el("details", { id: "definition", open: definitionOpen || null,
      ontoggle: (e) => { definitionOpen = e.target.open; } },
      el("summary", null, "the job as submitted"),
      el("pre", { class: "mono" }, JSON.stringify(definition, null, 2)))),
  ];
}

// ---- routing and refresh ----------------------------------------------------------------

async function route() {
  clearTimeout(timer);
  const mine = ++generation;
  const hash = location.hash.replace(/^#/, "") || "/";
  let page;
  if (hash.startsWith("/jobs/")) page = () => jobPage(decodeURIComponent(hash.slice("/jobs/".length)));
  else if (hash === "/taskmanagers") page = taskManagersPage;
  else page = jobsPage;
  try {
    const content = await page();
    if (mine !== generation) return;
    main.replaceChildren(...content);
    refreshed.textContent = "updated " + new Date().toLocaleTimeString();
  } catch (e) {
    if (mine !== generation) return;
    if (e instanceof Unauthorized) {
      tokenForm.hidden = false;
      main.replaceChildren(el("p", { class: "error" }, "This JobManager wants a bearer token."));
      return;
    }
    main.replaceChildren(el("p", { class: "error", id: "error" }, e.message));
  }
  timer = setTimeout(route, 1000);
}

window.addEventListener("hashchange", () => {
  selectedVertex = null;
  actionStatus = "";
  cancelArmed = false;
  route();
});
route();
