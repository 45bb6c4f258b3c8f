// dispynb web monitor: long-polls GET /api/cluster and renders nodes and jobs.
// Text from the cluster (names, job ids, arguments) is only ever set with
// textContent, never parsed as HTML.
"use strict";

const CSRF_HEADER = "X-CSRF-Token";
const MIN_GAP_MS = 250;     // at most four renders a second
const RETRY_MS = 2000;      // after a network error

const state = {
  version: -1, csrf: null, snapshot: null, cancelAllArmed: null,
  cluster: null,  // key of the cluster shown (null: the server's first)
};

const $ = (id) => document.getElementById(id);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// --- formatting -------------------------------------------------------------

function fmtTime(t) {
  if (t === null || t === undefined) return "";
  return new Date(t * 1000).toLocaleTimeString([], { hour12: false });
}

function fmtSeconds(s) {
  if (s === null || s === undefined || !isFinite(s)) return "";
  if (s < 60) return s.toFixed(s < 10 ? 2 : 1) + " s";
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${Math.floor(s % 60)} s`;
  return `${Math.floor(m / 60)} h ${m % 60} min`;
}

function fmtBytes(n) {
  if (n === null || n === undefined) return "";
  const units = ["B", "kB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i += 1; }
  return `${n.toFixed(i === 0 ? 0 : 1)} ${units[i]}`;
}

function fmtPercent(p) {
  return p === null || p === undefined ? "" : `${Number(p).toFixed(0)} %`;
}

// --- DOM helpers ------------------------------------------------------------

function el(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined) e.textContent = text;
  return e;
}

function setText(e, text) {
  const s = String(text);
  if (e.textContent !== s) e.textContent = s;
}

// Keep one <tr> per key; rows are updated in place so inputs keep focus and value.
function syncRows(tbody, items, keyOf, create, update) {
  const existing = new Map();
  for (const row of tbody.rows) existing.set(row.dataset.key, row);
  let previous = null;
  for (const item of items) {
    const key = String(keyOf(item));
    let row = existing.get(key);
    if (row) existing.delete(key);
    else { row = create(item); row.dataset.key = key; }
    update(row, item);
    const next = previous ? previous.nextSibling : tbody.firstChild;
    if (next !== row) tbody.insertBefore(row, next);
    previous = row;
  }
  for (const row of existing.values()) row.remove();
}

// --- actions ----------------------------------------------------------------

function say(text, isError) {
  const m = $("message");
  m.textContent = text;
  m.className = isError ? "error" : "ok";
}

// Every API path names the cluster shown, once the server told us its key.
function api(path) {
  if (state.cluster === null) return path;
  const sep = path.includes("?") ? "&" : "?";
  return `${path}${sep}cluster=${encodeURIComponent(state.cluster)}`;
}

async function post(path, body) {
  path = api(path);
  const headers = { ...authHeaders(), [CSRF_HEADER]: state.csrf || "" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  try {
    const r = await fetch(path, {
      method: "POST", headers, cache: "no-store",
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const data = await r.json().catch(() => ({}));
    if (!r.ok) { say(data.reason || `${r.status} ${r.statusText}`, true); return null; }
    return data;
  } catch (err) {
    say(`request failed: ${err.message}`, true);
    return null;
  }
}

async function cancelJob(key) {
  const data = await post(`/api/jobs/${encodeURIComponent(key)}/cancel`);
  if (data) say(`job ${key} cancelled`);
}

async function cancelAll(button) {
  // Two clicks within three seconds, so a stray click cannot cancel everything.
  if (!state.cancelAllArmed) {
    button.textContent = "Click again to cancel all";
    state.cancelAllArmed = setTimeout(() => {
      state.cancelAllArmed = null;
      button.textContent = "Cancel all jobs";
    }, 3000);
    return;
  }
  clearTimeout(state.cancelAllArmed);
  state.cancelAllArmed = null;
  button.textContent = "Cancel all jobs";
  const data = await post("/api/cancel-all");
  if (data) say(`${data.cancelled} job(s) cancelled`);
}

async function setCpus(nodeId, input) {
  const cpus = Number(input.value);
  if (!Number.isInteger(cpus)) { say("CPUs must be a whole number", true); return; }
  const data = await post(`/api/nodes/${encodeURIComponent(nodeId)}/cpus`, { cpus });
  if (data) say(`node ${nodeId} now uses ${data.cpus} CPU(s)`);
}

// --- rendering --------------------------------------------------------------

const NODE_CELLS = ["name", "address", "cpus", "busy", "done", "cputime", "perjob",
  "cpu", "memory", "disk", "swap", "traffic", "update"];
const NUMERIC = new Set(["cpus", "busy", "done", "cputime", "perjob", "cpu", "memory",
  "disk", "swap", "traffic"]);

function createNodeRow(node) {
  const row = el("tr");
  for (const name of NODE_CELLS) {
    row.appendChild(el("td", NUMERIC.has(name) ? `num c-${name}` : `c-${name}`));
  }
  const form = el("form", "cpus-form");
  const input = el("input");
  input.type = "number";
  input.step = "1";
  input.value = String(node.cpus);
  input.setAttribute("aria-label", `CPUs to use on ${node.id}`);
  const button = el("button", "", "Set");
  button.type = "submit";
  form.append(input, button);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    setCpus(row.dataset.key, input);
  });
  const cell = el("td", "c-set");
  cell.appendChild(form);
  row.appendChild(cell);
  return row;
}

function updateNodeRow(row, node) {
  const avail = node.avail || {};
  const cell = (name) => row.querySelector(`.c-${name}`);
  setText(cell("name"), node.name || node.ip_addr);
  setText(cell("address"), node.id);
  setText(cell("cpus"), node.cpus);
  setText(cell("busy"), node.busy);
  setText(cell("done"), node.jobs_done);
  setText(cell("cputime"), fmtSeconds(node.cpu_time));
  setText(cell("perjob"), node.jobs_done ? fmtSeconds(node.cpu_time / node.jobs_done) : "");
  setText(cell("cpu"), fmtPercent(avail.cpu));
  setText(cell("memory"), fmtBytes(avail.memory));
  setText(cell("disk"), fmtBytes(avail.disk));
  setText(cell("swap"), fmtPercent(avail.swap));
  setText(cell("traffic"), `${fmtBytes(node.tx)} / ${fmtBytes(node.rx)}`);
  setText(cell("update"), fmtTime(node.update_time));
  row.classList.toggle("busy", node.busy > 0);
}

const JOB_CELLS = ["key", "id", "status", "node", "submit", "start", "runtime", "args", "action"];
const NOT_DONE = new Set(["Created", "Running", "ProvisionalResult"]);

function createJobRow(job) {
  const row = el("tr");
  for (const name of JOB_CELLS) {
    const td = el("td", `c-${name}`);
    if (name === "key" || name === "runtime") td.classList.add("num");
    if (name === "args") td.classList.add("args-col");
    row.appendChild(td);
  }
  const button = el("button", "cancel", "Cancel");
  button.type = "button";
  button.addEventListener("click", () => cancelJob(row.dataset.key));
  row.querySelector(".c-action").appendChild(button);
  row.querySelector(".c-status").appendChild(el("span", "status"));
  return row;
}

function updateJobRow(row, job, now) {
  const cell = (name) => row.querySelector(`.c-${name}`);
  setText(cell("key"), job.key);
  setText(cell("id"), job.id);
  const status = row.querySelector(".status");
  setText(status, job.status);
  status.className = `status s-${job.status}`;
  setText(cell("node"), job.node || "");
  setText(cell("submit"), fmtTime(job.submit_time));
  setText(cell("start"), fmtTime(job.start_time));
  const end = job.end_time || (job.start_time ? now : null);
  setText(cell("runtime"), job.start_time && end ? fmtSeconds(end - job.start_time) : "");
  setText(cell("args"), job.args || "");
  row.querySelector("button.cancel").hidden = !NOT_DONE.has(job.status);
  row.dataset.status = job.status;
}

// A choice of cluster when the monitor shows more than one (add_cluster).
function renderClusters(snap) {
  const select = $("cluster-select");
  const clusters = snap.clusters || [];
  select.hidden = clusters.length < 2;
  const keys = clusters.map((c) => c.key).join("\n");
  if (select.dataset.keys !== keys) {
    select.replaceChildren(...clusters.map((c) => {
      const option = el("option", "", c.key === c.name ? c.name : `${c.name} (${c.key})`);
      option.value = c.key;
      return option;
    }));
    select.dataset.keys = keys;
  }
  select.value = snap.key;
}

function chooseCluster(key) {
  if (key === state.cluster) return;
  state.cluster = key;
  state.version = -1;
  for (const id of ["nodes", "jobs"]) $(id).tBodies[0].replaceChildren();
  if (state.poll) state.poll.abort();  // ask for the new cluster now
}

function render(snap) {
  state.snapshot = snap;
  state.cluster = snap.key;
  renderClusters(snap);
  setText($("cluster-name"), snap.name);
  document.title = `${snap.name} · dispynb monitor`;
  setText($("uptime"), `up ${fmtSeconds(snap.now - snap.start_time)}`);
  const counts = snap.counts;
  for (const box of document.querySelectorAll("[data-count]")) {
    setText(box.querySelector("b"), counts[box.dataset.count] ?? 0);
  }
  const done = counts.finished + counts.terminated + counts.cancelled + counts.abandoned;
  $("progress-bar").style.width = counts.total ? `${(100 * done) / counts.total}%` : "0%";

  syncRows($("nodes").tBodies[0], snap.nodes, (n) => n.id, createNodeRow, updateNodeRow);
  $("no-nodes").hidden = snap.nodes.length > 0;
  setText($("no-nodes"), snap.closed
    ? "The cluster is closed: it uses no node now."
    : "No node has joined yet.");
  setText($("node-count"), `(${snap.nodes.length})`);

  const showArgs = snap.jobs.some((job) => job.args !== null && job.args !== undefined);
  document.body.classList.toggle("show-args", showArgs);
  syncRows($("jobs").tBodies[0], snap.jobs, (j) => j.key, createJobRow,
    (row, job) => updateJobRow(row, job, snap.now));
  $("no-jobs").hidden = snap.jobs.length > 0;
  // Jobs that ended before the monitor was made are counted, not listed.
  setText($("no-jobs"), counts.total
    ? "The jobs ended before this monitor started; the counts above include them."
    : "No job submitted yet.");
  const listed = snap.jobs.length < counts.total ? `, latest ${snap.jobs.length} shown` : "";
  setText($("job-count"), `(${counts.total}${listed})`);
}

function setConnection(text, kind) {
  const badge = $("connection");
  setText(badge, text);
  badge.className = `badge badge-${kind}`;
}

// --- long-poll loop -----------------------------------------------------------

async function pollForever() {
  for (;;) {
    const started = Date.now();
    state.poll = new AbortController();
    try {
      const r = await fetch(api(`/api/cluster?since=${state.version}`),
        { headers: authHeaders(), cache: "no-store", signal: state.poll.signal });
      const data = await r.json();
      if (r.status === 404 && state.cluster !== null) {
        chooseCluster(null);  // that cluster is no longer shown: show the first
        continue;
      }
      if (!r.ok) {
        setConnection(r.status === 403 ? "access refused" : `error ${r.status}`, "error");
        say(data.reason || r.statusText, true);
        await sleep(5 * RETRY_MS);
        continue;
      }
      state.csrf = r.headers.get(CSRF_HEADER);
      state.version = data.version;
      render(data);
      setConnection(data.closed ? "cluster closed" : "live", data.closed ? "closed" : "live");
    } catch (err) {
      if (err.name === "AbortError") continue;  // another cluster was chosen
      setConnection("disconnected", "error");
      await sleep(RETRY_MS);
      continue;
    }
    await sleep(Math.max(0, MIN_GAP_MS - (Date.now() - started)));
  }
}

document.addEventListener("DOMContentLoaded", () => {
  const button = $("cancel-all");
  button.addEventListener("click", () => cancelAll(button));
  const select = $("cluster-select");
  select.addEventListener("change", () => chooseCluster(select.value));
  pollForever();
});
