// cutover dashboard: polls the JSON API (every second for traffic and status) and draws the
// fleet, the running deployment, the queue, the history and a live SVG chart. No library.
"use strict";

const PALETTE = ["#2563eb", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#db2777"];
const ERROR = "#dc2626";
const WINDOW_MS = 5 * 60 * 1000;

const state = {
  token: null,
  rates: [],          // {at_ms, rps: {release: n}, errors_per_s, error_rate}
  lastAt: 0,
  colours: {},        // release -> colour, in order of first appearance
  fleetAt: 0,         // when the fleet was last read (ms)
  running: null,      // the current deployment row (or null)
  interrupted: null,  // the interrupted deployment row (or null): resolved from a terminal
  timers: [],
};

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") e.className = v; else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(c === null || c === undefined ? "" : String(c)));
  return e;
}

function svg(tag, attrs, ...children) {
  const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function colour(release) {
  if (!(release in state.colours)) {
    state.colours[release] = PALETTE[Object.keys(state.colours).length % PALETTE.length];
  }
  return state.colours[release];
}

// --- the token -------------------------------------------------------------------------------

function takeToken() {
  const url = new URL(window.location.href);
  const fromUrl = url.searchParams.get("token");
  if (fromUrl) {
    sessionStorage.setItem("cutover-token", fromUrl);
    url.searchParams.delete("token");
    history.replaceState(null, "", url.pathname + (url.search === "?" ? "" : url.search) + url.hash);
  }
  return sessionStorage.getItem("cutover-token");
}

function askToken(message) {
  stop();
  $("main").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  $("token-input").focus();
}

async function api(method, path, body) {
  const opts = { method, headers: { Authorization: "Bearer " + state.token } };
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const resp = await fetch("/api" + path, opts);
  if (resp.status === 401) {
    sessionStorage.removeItem("cutover-token");
    askToken("The token was refused.");
    throw new Error("unauthorized");
  }
  const type = resp.headers.get("content-type") || "";
  const data = type.includes("json") ? await resp.json() : await resp.text();
  if (!resp.ok) throw new Error((data && data.error) || resp.status + " " + resp.statusText);
  return data;
}

// --- polling ---------------------------------------------------------------------------------

function stop() {
  state.timers.forEach(clearInterval);
  state.timers = [];
}

function every(ms, fn) {
  let busy = false;
  const tick = async () => {
    if (busy) return;
    busy = true;
    try { await fn(); } catch (e) { if (e.message !== "unauthorized") setConn(false, e.message); }
    finally { busy = false; }
  };
  tick();
  state.timers.push(setInterval(tick, ms));
}

function setConn(ok, why) {
  const c = $("conn");
  c.className = "pill " + (ok ? "live" : "down");
  c.textContent = ok ? "live" : "disconnected";
  c.title = why || "";
  if (ok) $("updated").textContent = "updated " + new Date().toLocaleTimeString();
}

function start() {
  $("login").hidden = true;
  $("main").hidden = false;
  every(1000, pollMetrics);
  every(1000, pollStatus);
  every(2000, pollFleet);
  every(5000, pollHistory);
}

async function pollMetrics() {
  const since = state.lastAt || (Date.now() - WINDOW_MS);
  const m = await api("GET", "/metrics?since=" + since);
  for (const r of m.rates) {
    if (r.at_ms > state.lastAt) { state.rates.push(r); state.lastAt = r.at_ms; }
  }
  const cut = m.now_ms - WINDOW_MS;
  while (state.rates.length && state.rates[0].at_ms < cut) state.rates.shift();
  drawChart(m.now_ms);
  setConn(true);
}

async function pollStatus() {
  const s = await api("GET", "/status");
  $("app-name").textContent = s.app;
  const wasRunning = state.running && state.running.id;
  state.running = s.deployment && s.deployment.state === "running" ? s.deployment : null;
  state.interrupted = s.deployment && s.deployment.state === "interrupted" ? s.deployment : null;
  renderDeployment(s.deployment);
  renderQueue(s.queue);
  renderFleetLock(s);
  $("log").textContent = (s.log || []).join("\n");
  $("log").scrollTop = $("log").scrollHeight;
  if (wasRunning && !state.running) pollHistory();
}

// The fleet as last read. Without the balancer /api/fleet still shows what runs on the hosts
// (its side "unknown", as `cutover status` shows it); when the fleet cannot be read at all, the
// rows shown are marked stale with the time they are from, never left as if current.
async function pollFleet() {
  const table = $("fleet");
  try {
    const f = await api("GET", "/fleet");
    renderFleet(f.rows);
    table.classList.remove("stale");
    state.fleetAt = Date.now();
    const errors = f.hosts.filter((h) => h.error).map((h) => h.host + ": " + h.error);
    if (f.balancer_error) errors.unshift("balancer unreachable (its state, health and counters are unknown; the hosts were read): " + f.balancer_error);
    $("fleet-error").textContent = errors.join("; ");
  } catch (e) {
    if (e.message !== "unauthorized") {
      table.classList.add("stale");
      const since = state.fleetAt ? "not updated since " + new Date(state.fleetAt).toLocaleTimeString() : "not read yet";
      $("fleet-error").textContent = "fleet " + since + " (rows shown are stale): " + e.message;
    }
    throw e;
  }
}

async function pollHistory() {
  const h = await api("GET", "/deployments?limit=20");
  renderHistory(h.deployments);
}

// --- rendering -------------------------------------------------------------------------------

function renderFleet(rows) {
  const body = $("fleet").tBodies[0];
  body.replaceChildren(...rows.map((r) => el("tr", { class: [r.state, r.health].join(" "), "data-release": r.release },
    el("td", {}, r.host),
    el("td", {}, el("span", { class: "swatch", "data-colour": colour(r.release) }), r.release),
    el("td", {}, r.instance),
    el("td", {}, r.pid === null ? "-" : (r.alive ? r.pid : r.pid + " (dead)")),
    el("td", {}, r.state),
    el("td", {}, r.health),
    el("td", { class: "num" }, r.weight === null ? "-" : r.weight),
    el("td", { class: "num" }, r.in_flight === null ? "?" : r.in_flight),
    el("td", { class: "num" }, r.requests === null ? "?" : r.requests),
    el("td", { class: "num" }, r.errors === null ? "?" : r.errors))));
  paintSwatches(body);
}

// Colours are set through the CSSOM (the page's CSP allows no inline style attributes).
function paintSwatches(root) {
  root.querySelectorAll(".swatch[data-colour]").forEach((s) => { s.style.background = s.dataset.colour; });
}

function verdictClass(v) {
  return typeof v === "string" ? "verdict-" + v.toLowerCase().replace(/[^a-z]/g, "") : "";
}

function renderDeployment(d) {
  const box = $("running");
  const buttons = ["promote", "promote-full", "pause", "resume", "abort"];
  for (const b of buttons) $("btn-" + b).disabled = !(d && d.state === "running");
  // An interrupted deployment is resumed or undone from a terminal (serve does not guess
  // which, and refuses a rollback meanwhile): the button says so instead of asking.
  const back = $("btn-rollback");
  const stuck = !!(d && d.state === "interrupted");
  back.disabled = stuck;
  back.textContent = stuck ? "Roll back: from a terminal" : "Roll back";
  back.title = stuck ? d.resolve || "" : "";
  if (!d) {
    box.replaceChildren(el("p", { class: "muted" }, "No deployment is running."));
    return;
  }
  const dl = el("dl", {});
  const add = (k, v, cls) => dl.append(el("dt", {}, k), el("dd", { class: cls || "" }, v));
  add("deployment", d.id + " (" + d.state + ")", d.state === "interrupted" ? "bad" : "");
  add("what", d.kind + " " + (d.from || "(nothing)") + " → " + d.to);
  add("strategy", d.strategy);
  if (d.resolve) add("resolve", d.resolve, "bad");
  add("started", new Date(d.started_ms).toLocaleTimeString() + " (" + Math.round((Date.now() - d.started_ms) / 1000) + " s ago)");
  const st = d.status || {};
  for (const [k, v] of Object.entries(st)) {
    if (v !== null && typeof v === "object") {
      add(k, Object.entries(v).map(([a, b]) => a + ": " + (typeof b === "object" ? JSON.stringify(b) : b)).join(", "),
        verdictClass(v.verdict || v.result));
    } else {
      add(k, v, /verdict|analysis|gate/.test(k) ? verdictClass(v) : "");
    }
  }
  box.replaceChildren(dl);
  box.dataset.deployment = d.id;
}

function describeJob(j) {
  if (j.kind === "deploy") return "deploy " + j.version;
  // Queued by serve itself: why is the job's trigger ("HAProxy restarted or reloaded: ...").
  if (j.kind === "readmit") return "readmit (servers back into the balancer)";
  return "rollback" + (j.to ? " to " + j.to : "");
}

// An outcome as people read it ("rolled back"); the API keeps the value scripts match
// ("rolled_back"), and so do the rows' classes.
function words(outcome) {
  return outcome.replace(/_/g, " ");
}

// A deployment run from another machine (or terminal) shows only in the deploy lock on the
// fleet: said while this server runs none itself.
function renderFleetLock(s) {
  const held = [].concat(s.fleet_lock && s.fleet_lock.holder ? [s.fleet_lock] : [],
    s.fleet_lock_others || []);
  $("fleet-lock").textContent = state.running ? "" : held.map((l) =>
    "Deploy lock on the fleet held by " + l.holder.what + " by " + l.holder.user + " on " +
    l.holder.machine + " (pid " + l.holder.pid + ", host " + l.host + ")" +
    (l.stale ? ", stale: " + l.stale : ": queued jobs wait for it")).join("\n");
}

function renderQueue(q) {
  // Why queued jobs do not start (an interrupted deployment) and what to run: said by the API.
  $("queue-blocked").textContent = q.blocked || "";
  const jobs = [].concat(q.running ? [q.running] : [], q.queued, q.finished.slice(0, 10));
  $("queue").tBodies[0].replaceChildren(...jobs.map((j) => {
    const cancel = j.state === "queued"
      ? el("button", { "data-job": j.id, class: "cancel" }, "Cancel") : "";
    return el("tr", { class: j.state },
      el("td", {}, j.id), el("td", {}, describeJob(j)), el("td", {}, j.trigger),
      el("td", { class: j.state === "failed" ? "bad" : "" }, j.state + (j.outcome ? ": " + words(j.outcome) : "") + (j.error ? ": " + j.error : "")),
      el("td", {}, j.deployment || ""), el("td", {}, cancel));
  }));
}

function renderHistory(rows) {
  $("history").tBodies[0].replaceChildren(...rows.map((r) => {
    const rep = r.report || {};
    const link = el("a", { href: "#", "data-report": r.id }, "open");
    return el("tr", { class: r.outcome || r.state || "" },
      el("td", {}, r.id), el("td", {}, r.kind), el("td", {}, r.strategy), el("td", {}, r.from || "-"), el("td", {}, r.to),
      el("td", { class: r.outcome === "succeeded" ? "ok" : (r.outcome || r.state === "interrupted" ? "bad" : "") },
        r.outcome ? words(r.outcome) : (r.state === "interrupted" ? "interrupted" : "running")),
      el("td", { class: "num" }, r.ended_ms ? ((r.ended_ms - r.started_ms) / 1000).toFixed(1) : "-"),
      el("td", { class: "num" }, rep.served === undefined ? "-" : rep.served),
      el("td", { class: "num" }, rep.failed_requests === undefined ? "-" : rep.failed_requests),
      el("td", {}, link));
  }));
}

// --- the chart -------------------------------------------------------------------------------

function drawChart(nowMs) {
  const W = 900, H = 240, L = 40, R = 44, T = 10, B = 20;
  const chart = $("chart");
  const rates = state.rates;
  // The window: what was seen, at least a minute, at most five.
  const first = rates.length ? rates[0].at_ms : nowMs;
  const t0 = Math.max(nowMs - WINDOW_MS, Math.min(first, nowMs - 60000)), t1 = nowMs;
  const x = (t) => L + (t - t0) / (t1 - t0) * (W - L - R);
  const releases = [];
  for (const r of rates) for (const [k, v] of Object.entries(r.rps)) if (v > 0 && !releases.includes(k)) releases.push(k);
  releases.forEach(colour);
  let max = 1;
  for (const r of rates) max = Math.max(max, Object.values(r.rps).reduce((a, b) => a + b, 0));
  max = niceCeil(max);
  let emax = 0.05;
  for (const r of rates) emax = Math.max(emax, r.error_rate);
  emax = Math.min(1, niceCeil(emax * 100) / 100);
  const y = (v) => T + (1 - v / max) * (H - T - B);
  const ye = (v) => T + (1 - v / emax) * (H - T - B);
  const nodes = [];
  for (let i = 0; i <= 4; i++) {
    const v = max * i / 4, yy = y(v);
    nodes.push(svg("line", { class: "grid", x1: L, x2: W - R, y1: yy, y2: yy }));
    nodes.push(svg("text", { class: "ax", x: L - 4, y: yy + 3, "text-anchor": "end" }, fmt(v)));
    nodes.push(svg("text", { class: "ax", x: W - R + 4, y: yy + 3 }, (emax * i / 4 * 100).toFixed(emax < 0.1 ? 1 : 0) + "%"));
  }
  const span = (t1 - t0) / 1000;
  for (let i = 0; i <= 5; i++) {
    const s = Math.round(span * i / 5);
    const label = s === 0 ? "now" : (span > 120 ? "-" + (s / 60).toFixed(1).replace(/\.0$/, "") + "m" : "-" + s + "s");
    nodes.push(svg("text", { class: "ax", x: x(t1 - s * 1000), y: H - 5, "text-anchor": i === 5 ? "start" : "middle" }, label));
  }
  // Stacked areas: requests/s of each release on top of the ones before.
  let lower = rates.map(() => 0);
  for (const rel of releases) {
    const upper = rates.map((r, i) => lower[i] + (r.rps[rel] || 0));
    if (rates.length > 0) {
      let d = "M" + rates.map((r, i) => x(r.at_ms).toFixed(1) + "," + y(upper[i]).toFixed(1)).join(" L");
      for (let i = rates.length - 1; i >= 0; i--) d += " L" + x(rates[i].at_ms).toFixed(1) + "," + y(lower[i]).toFixed(1);
      d += " Z";
      nodes.push(svg("path", { class: "area", "data-release": rel, d, fill: colour(rel), "fill-opacity": "0.7", stroke: colour(rel), "stroke-width": "1" },
        svg("title", {}, rel)));
    }
    lower = upper;
  }
  if (rates.length > 1) {
    const d = "M" + rates.map((r) => x(r.at_ms).toFixed(1) + "," + ye(r.error_rate).toFixed(1)).join(" L");
    nodes.push(svg("path", { class: "error-rate", d, fill: "none", stroke: ERROR, "stroke-width": "1.5", "stroke-dasharray": "4 2" }));
  }
  chart.replaceChildren(...nodes);
  chart.dataset.releases = releases.join(",");
  const last = rates[rates.length - 1];
  $("legend").replaceChildren(...releases.map((rel) => el("span", { "data-release": rel },
    el("span", { class: "swatch", "data-colour": colour(rel) }), rel + (last ? ": " + fmt(last.rps[rel] || 0) + " req/s" : ""))),
    el("span", {}, el("span", { class: "swatch", "data-colour": ERROR }), "failed " + (last ? (last.error_rate * 100).toFixed(2) : "0") + " %"));
  paintSwatches($("legend"));
}

function niceCeil(v) {
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (v <= m * p) return m * p;
  return 10 * p;
}

function fmt(v) {
  return v >= 100 ? Math.round(v).toString() : v.toFixed(v >= 10 ? 0 : 1);
}

// --- actions ---------------------------------------------------------------------------------

function confirmAction(text) {
  return new Promise((resolve) => {
    const dlg = $("confirm");
    $("confirm-text").textContent = text;
    dlg.returnValue = "";
    dlg.addEventListener("close", () => resolve(dlg.returnValue === "yes"), { once: true });
    dlg.showModal();
  });
}

function toast(text, bad) {
  const t = $("toast");
  t.textContent = text;
  t.className = bad ? "bad" : "ok";
}

async function onCommand(command) {
  const d = state.running;
  let question, call;
  if (command === "rollback" && state.interrupted) return;
  if (command === "rollback" && !d) {
    question = "Roll the whole fleet back to the previous release?";
    call = () => api("POST", "/rollback", {});
  } else {
    if (!d) return;
    question = command.replace("-", " ") + " deployment " + d.id + " (" + (d.from || "-") + " → " + d.to + ")?";
    call = () => api("POST", "/deployments/" + encodeURIComponent(d.id) + "/" + command);
  }
  if (!(await confirmAction(question.charAt(0).toUpperCase() + question.slice(1)))) return;
  try {
    const r = await call();
    toast(r.job ? "queued job " + r.job.id + ": " + describeJob(r.job) : command + " sent to deployment " + r.deployment);
  } catch (e) {
    toast(command + " failed: " + e.message, true);
  }
  pollStatus().catch(() => {});
}

async function openReport(id) {
  const w = window.open("", "_blank");
  try {
    const html = await api("GET", "/deployments/" + encodeURIComponent(id) + "/report");
    const url = URL.createObjectURL(new Blob([html], { type: "text/html" }));
    if (w) w.location = url; else window.location = url;
  } catch (e) {
    if (w) w.close();
    toast("report: " + e.message, true);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("button[data-command]").forEach((b) =>
    b.addEventListener("click", () => onCommand(b.dataset.command)));
  $("deploy-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const version = $("deploy-version").value.trim();
    if (!version || !(await confirmAction("Deploy " + version + " to the fleet?"))) return;
    try {
      const r = await api("POST", "/deployments", { version });
      const waits = r.blocked ? "; it waits until the interrupted deployment is resolved (see the queue)" : "";
      toast((r.queued === false ? r.ignored : "queued job " + r.job.id + ": deploy " + version) + waits);
      $("deploy-version").value = "";
    } catch (e) { toast("deploy failed: " + e.message, true); }
  });
  $("queue").addEventListener("click", async (ev) => {
    const id = ev.target.dataset && ev.target.dataset.job;
    if (!id || !(await confirmAction("Remove job " + id + " from the queue?"))) return;
    try { await api("DELETE", "/queue/" + id); toast("job " + id + " cancelled"); }
    catch (e) { toast("cancel failed: " + e.message, true); }
  });
  $("history").addEventListener("click", (ev) => {
    const id = ev.target.dataset && ev.target.dataset.report;
    if (id) { ev.preventDefault(); openReport(id); }
  });
  $("login").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const t = $("token-input").value.trim();
    if (!t) return;
    sessionStorage.setItem("cutover-token", t);
    state.token = t;
    start();
  });
  state.token = takeToken();
  if (state.token) start(); else askToken();
});
