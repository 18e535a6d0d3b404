// The evhost dashboard: one page, routed by the URL's hash, reading the host's HTTP API.
// Every value shown is escaped; nothing is loaded from anywhere but this host.
"use strict";

const view = document.getElementById("view");
const errorBox = document.getElementById("error");
let timers = [];
let stopTail = null;
// Bumped at each navigation: work a page started before it is dropped, errors and all.
let routeGen = 0;

function esc(v) {
  return String(v ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

function token() {
  return localStorage.getItem("evhost-token") || "";
}

document.getElementById("token-form").addEventListener("submit", (e) => {
  e.preventDefault();
  localStorage.setItem("evhost-token", document.getElementById("token").value);
  route();
});

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (token()) h["Authorization"] = "Bearer " + token();
  return h;
}

async function api(path, opts) {
  const o = Object.assign({}, opts || {});
  o.headers = headers(o.headers);
  const r = await fetch(path, o);
  const text = await r.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch (_) { body = text; }
  // /health answers 503 with its body when the log is read-only: that is what to show.
  if (!r.ok && !(o.accept || []).includes(r.status)) {
    const msg = body && body.error ? body.error.message : r.status + " " + r.statusText;
    throw new Error(msg);
  }
  return body;
}

function showError(e) {
  errorBox.textContent = e ? String(e.message || e) : "";
  errorBox.hidden = !e;
}

function every(ms, fn) {
  const gen = routeGen;
  const tick = async () => {
    try {
      await fn();
      if (gen === routeGen) showError(null);
    } catch (e) {
      if (gen === routeGen) showError(e);
    }
  };
  tick();
  timers.push(setInterval(tick, ms));
}

function num(v) {
  return v === null || v === undefined ? "-" : Number(v).toLocaleString("en");
}

function progress(percent) {
  const p = Math.max(0, Math.min(100, percent || 0));
  return `<div class="progress" title="${p}%"><div data-width="${p}"></div></div>`;
}

// Widths and offsets are set through the DOM, not in markup: the page's content security
// policy allows no inline styles.
function sized(root) {
  root.querySelectorAll("[data-width]").forEach((el) => (el.style.width = el.dataset.width + "%"));
  root.querySelectorAll("[data-left]").forEach((el) => (el.style.left = el.dataset.left + "%"));
  return root;
}

function render(el, html) {
  el.innerHTML = html;
  sized(el);
}

function percentOf(position, head) {
  return head ? Math.floor((Math.min(position, head) * 1000) / head) / 10 : 100;
}

// Overview: head, append rate, plugins, alerts.
const rate = { samples: [] };

function chart(points) {
  if (points.length < 2) return `<svg class="chart" viewBox="0 0 600 120"></svg>`;
  const max = Math.max(1, ...points);
  const step = 600 / (points.length - 1);
  const line = points.map((v, i) => `${(i * step).toFixed(1)},${(115 - (v / max) * 105).toFixed(1)}`).join(" ");
  return `<svg class="chart" viewBox="0 0 600 120" preserveAspectRatio="none"><polyline points="${line}"/></svg>`;
}

function pluginRow(p) {
  const c = p.candidate;
  const building = c ? `${esc(c.role)} ${esc(c.version)}: ${progress(c.percent)} ${esc(c.percent)}%${c.eta_s ? ", about " + esc(c.eta_s) + " s" : ""}` : "";
  return `<tr data-plugin="${esc(p.name)}">
    <td><a href="#/plugin/${encodeURIComponent(p.name)}">${esc(p.name)}</a></td>
    <td>${esc(p.kind)}</td><td>${esc(p.version)}</td>
    <td class="state-${esc(p.state)}" data-field="state">${esc(p.state)}</td>
    <td class="num" data-field="position">${num(p.position)}</td>
    <td class="num" data-field="lag">${num(p.lag)}</td>
    <td class="num" data-field="events">${num(p.events_processed)}</td>
    <td class="num" data-field="dead_letters">${num(p.dead_letters)}</td>
    <td>${building}</td></tr>`;
}

async function overview() {
  view.innerHTML = `<h1>Overview</h1>
    <div class="cards">
      <div class="card"><div class="value" id="head">-</div><div class="label">head (events in the log)</div></div>
      <div class="card"><div class="value" id="rate">-</div><div class="label">appended per second</div></div>
      <div class="card"><div class="value" id="alert-count">-</div><div class="label">alerts raised</div></div>
    </div>
    <h2>Append rate, last two minutes</h2><div id="chart">${chart([])}</div>
    <h2>Plugins</h2>
    <table id="plugins"><thead><tr><th>name</th><th>kind</th><th>version</th><th>state</th>
      <th class="num">position</th><th class="num">lag</th><th class="num">events</th><th class="num">dead letters</th><th>upgrade</th></tr></thead><tbody></tbody></table>
    <div id="alerts"></div>`;
  every(1000, async () => {
    const [health, list, alerts] = await Promise.all([api("/health", { accept: [503] }), api("/v1/plugins"), api("/v1/alerts")]);
    const now = Date.now();
    const last = rate.samples[rate.samples.length - 1];
    rate.samples.push({ at: now, head: health.head });
    if (rate.samples.length > 121) rate.samples.shift();
    const rates = rate.samples.slice(1).map((s, i) => Math.max(0, ((s.head - rate.samples[i].head) * 1000) / Math.max(1, s.at - rate.samples[i].at)));
    document.getElementById("head").textContent = num(health.head) + (health.status === "ok" ? "" : " (" + health.status + ")");
    document.getElementById("rate").textContent = last ? num(Math.round(rates[rates.length - 1] || 0)) : "-";
    document.getElementById("chart").innerHTML = chart(rates);
    render(document.querySelector("#plugins tbody"), list.plugins.map(pluginRow).join("") ||
      `<tr><td colspan="9" class="muted">no plugins loaded</td></tr>`);
    document.getElementById("alert-count").textContent = num(alerts.alerts.length);
    document.getElementById("alerts").innerHTML = alerts.alerts.length
      ? `<h2>Alerts</h2>` + alertTable(alerts.alerts) : "";
  });
}

function alertTable(list) {
  return `<table><thead><tr><th>alert</th><th>subject</th><th class="num">value</th><th class="num">threshold</th><th>since</th></tr></thead><tbody>` +
    list.map((a) => `<tr><td>${esc(a.alert)}</td><td>${esc(a.subject)}</td><td class="num">${esc(a.value)}</td><td class="num">${esc(a.threshold)}</td><td>${esc(a.since)}</td></tr>`).join("") +
    `</tbody></table>`;
}

// One plugin: status, progress, usage, logs, dead letters.
async function plugin(name) {
  view.innerHTML = `<h1>${esc(name)}</h1><div id="status"></div>
    <h2>Dead letters</h2><div id="dlq"></div>
    <h2>Logs</h2><pre id="logs" class="muted">(none)</pre>`;
  const path = "/v1/plugins/" + encodeURIComponent(name);
  const kept = [];
  let after = 0;
  every(1000, async () => {
    const [p, dlq, logs] = await Promise.all([
      api(path), api("/v1/dlq?plugin=" + encodeURIComponent(name)), api(path + "/logs?limit=500&after=" + after),
    ]);
    after = logs.next ?? after;
    for (const l of logs.lines || []) kept.push(`${l.seq} ${l.source} ${l.line}`);
    kept.splice(0, Math.max(0, kept.length - 500));
    const u = p.usage || {};
    const c = p.candidate;
    const quarantined = p.quarantine
      ? `<p class="state-quarantined">Quarantined since ${esc(p.quarantine.since)}: ${esc(p.quarantine.reason)}
          <button id="resume">Resume</button></p>` : "";
    render(document.getElementById("status"), `
      <div class="cards">
        <div class="card"><div class="value state-${esc(p.state)}" data-field="state">${esc(p.state)}</div><div class="label">${esc(p.kind)} ${esc(p.version)}, contract ${esc(p.wit)}</div></div>
        <div class="card"><div class="value" data-field="lag">${num(p.lag)}</div><div class="label">lag (position ${num(p.position)} of ${num(p.head)})</div></div>
        <div class="card"><div class="value">${num(p.events_processed)}</div><div class="label">events handled, ${num(p.errors)} errors</div></div>
        <div class="card"><div class="value">${u.ns_per_event ? num(Math.round(u.ns_per_event)) : "-"}</div><div class="label">ns per event</div></div>
      </div>
      ${quarantined}
      <h2>Progress</h2>
      <p>${progress(percentOf(p.position, p.head))} ${esc(percentOf(p.position, p.head))}% of the head</p>
      ${c ? `<p>${esc(c.role)} ${esc(c.version)} (${esc(c.state)}): ${progress(c.percent)} ${esc(c.percent)}%, ${num(c.events_per_s)} events/s${c.eta_s ? ", about " + esc(c.eta_s) + " s to go" : ""}</p>` : ""}
      <h2>Usage against limits</h2>
      <table><tbody>
        <tr><th>calls</th><td class="num">${num(u.calls)} (${num(u.failed_calls)} failed)</td></tr>
        <tr><th>longest call</th><td class="num">${num(u.max_call_ms)} ms of ${num(u.time_limit_ms)} ms</td></tr>
        <tr><th>peak memory</th><td class="num">${num(u.peak_memory_bytes)} of ${num(u.memory_limit_bytes)} bytes</td></tr>
        <tr><th>fuel</th><td class="num">${u.fuel_per_event ? num(u.fuel_used_per_event) + " per event of " + num(u.fuel_per_event) : "no budget"}</td></tr>
      </tbody></table>
      ${p.last_error ? `<h2>Last error</h2><pre>${esc(p.last_error)}</pre>` : ""}`);
    const resume = document.getElementById("resume");
    if (resume) resume.onclick = () => act(path + "/resume", "POST");
    document.getElementById("dlq").innerHTML = dlq.dead_letters.length
      ? `<table id="dead-letters"><thead><tr><th>id</th><th>type</th><th>error</th><th class="num">attempts</th><th></th></tr></thead><tbody>` +
        dlq.dead_letters.map((d) => `<tr data-dead-letter="${esc(d.id)}"><td>${esc(d.id)}</td><td>${esc(d.event_type)}</td><td>${esc(d.error)}</td>
          <td class="num" data-field="attempts">${num(d.attempts)}</td>
          <td><button data-retry="${esc(d.id)}">Retry</button> <button class="danger" data-delete="${esc(d.id)}">Delete</button></td></tr>`).join("") +
        `</tbody></table>`
      : `<p class="muted">none</p>`;
    document.querySelectorAll("[data-retry]").forEach((b) => (b.onclick = () => act("/v1/dlq/" + encodeURIComponent(b.dataset.retry) + "/retry", "POST")));
    document.querySelectorAll("[data-delete]").forEach((b) => (b.onclick = () => act("/v1/dlq/" + encodeURIComponent(b.dataset.delete), "DELETE")));
    document.getElementById("logs").textContent = kept.length ? kept.join("\n") : "(none)";
  });
}

async function act(path, method) {
  try {
    const r = await api(path, { method });
    if (r && r.handled === false) showError(new Error("the retry failed again: " + (r.error || "")));
    else showError(null);
  } catch (e) {
    showError(e);
  }
}

// State browser: a key or a prefix, now or at a past position.
async function state() {
  const list = await api("/v1/plugins");
  const names = list.plugins.filter((p) => p.kind === "projection").map((p) => p.name);
  view.innerHTML = `<h1>State</h1>
    <form class="inline" id="state-form">
      <select id="s-name">${names.map((n) => `<option>${esc(n)}</option>`).join("")}</select>
      <select id="s-mode"><option value="key">key</option><option value="prefix">prefix</option></select>
      <input id="s-key" placeholder="key or prefix">
      <input id="s-at" placeholder="at position (empty: now)" size="22">
      <button type="submit">Read</button>
    </form><pre id="s-out" class="muted">(nothing read yet)</pre>`;
  document.getElementById("state-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const q = new URLSearchParams();
    q.set(document.getElementById("s-mode").value, document.getElementById("s-key").value);
    const at = document.getElementById("s-at").value.trim();
    if (at) q.set("at", at);
    try {
      const r = await api("/v1/projections/" + encodeURIComponent(document.getElementById("s-name").value) + "/state?" + q);
      document.getElementById("s-out").textContent = JSON.stringify(r, null, 2);
      showError(null);
    } catch (err) {
      showError(err);
    }
  });
}

// Live tail over Server-Sent Events, read with fetch so the token can be sent.
async function tail() {
  view.innerHTML = `<h1>Live tail</h1>
    <form class="inline" id="tail-form"><input id="t-pattern" value=">" size="30"> <button type="submit">Follow</button>
    <span class="muted" id="t-status">stopped</span></form>
    <table id="tail"><thead><tr><th class="num">position</th><th>type</th><th>stream</th><th>payload</th></tr></thead><tbody></tbody></table>`;
  document.getElementById("tail-form").addEventListener("submit", (e) => {
    e.preventDefault();
    follow(document.getElementById("t-pattern").value);
  });
}

async function follow(pattern) {
  if (stopTail) stopTail();
  const ctl = new AbortController();
  stopTail = () => ctl.abort();
  const status = document.getElementById("t-status");
  try {
    const r = await fetch("/v1/subscribe?pattern=" + encodeURIComponent(pattern), { headers: headers(), signal: ctl.signal });
    if (!r.ok) throw new Error((await r.json()).error.message);
    status.textContent = "following " + pattern;
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const frame = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        const lines = frame.split("\n");
        const kind = (lines.find((l) => l.startsWith("event:")) || "event: message").slice(6).trim();
        const data = lines.filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
        if (!data) continue;
        if (kind !== "message") {
          status.textContent = kind + ": " + data;
          continue;
        }
        let ev;
        try { ev = JSON.parse(data); } catch (_) { continue; }
        const body = document.querySelector("#tail tbody");
        if (!body) return;
        body.insertAdjacentHTML("afterbegin", `<tr data-event-type="${esc(ev.type)}"><td class="num">${esc(ev.position)}</td><td>${esc(ev.type)}</td><td>${esc(ev.stream)}</td><td><code>${esc(JSON.stringify(ev.payload))}</code></td></tr>`);
        while (body.rows.length > 500) body.deleteRow(body.rows.length - 1);
      }
    }
    status.textContent = "ended";
  } catch (e) {
    if (e.name !== "AbortError") { status.textContent = "failed"; showError(e); }
  }
}

// A flow: its events in order and a waterfall of its tool calls.
async function flow(id) {
  view.innerHTML = `<h1>Flow</h1>
    <form class="inline" id="flow-form"><input id="f-id" placeholder="correlation id" value="${esc(id || "")}"> <button type="submit">Show</button></form>
    <div id="flow"></div>`;
  document.getElementById("flow-form").addEventListener("submit", (e) => {
    e.preventDefault();
    location.hash = "#/flow/" + encodeURIComponent(document.getElementById("f-id").value);
  });
  if (!id) return;
  const f = await api("/v1/flows/" + encodeURIComponent(id));
  const events = f.events || [];
  const start = events.length ? Date.parse(events[0].timestamp) : 0;
  const calls = f.tools || [];
  const span = Math.max(1, ...calls.map((c) => (Date.parse(c.requested_at || events[0].timestamp) - start) + (c.latency_ms || 0)), f.latency_ms || 0);
  const bars = calls.map((c) => {
    const offset = c.requested_at ? Date.parse(c.requested_at) - start : 0;
    return `<div class="row"><div class="bar ${c.outcome === "failed" ? "failed" : ""}" data-left="${(offset / span) * 100}" data-width="${Math.max(0.5, ((c.latency_ms || 0) / span) * 100)}"></div>
      <span class="label">${esc(c.tool)} ${esc(c.outcome)} ${esc(c.latency_ms)} ms</span></div>`;
  }).join("");
  render(document.getElementById("flow"), `
    <p>${events.length} events${f.latency_ms !== null && f.latency_ms !== undefined ? ", answered in " + esc(f.latency_ms) + " ms" : ""}</p>
    <h2>Tool calls</h2><div class="waterfall">${bars || '<span class="muted">none</span>'}</div>
    <h2>Events</h2><table><thead><tr><th class="num">position</th><th>type</th><th>stream</th><th>time</th></tr></thead><tbody>` +
    events.map((e) => `<tr><td class="num">${esc(e.position)}</td><td>${esc(e.type)}</td><td>${esc(e.stream)}</td><td>${esc(e.timestamp)}</td></tr>`).join("") +
    `</tbody></table>`);
}

// Schemas and alerts.
async function schemas() {
  view.innerHTML = `<h1>Schemas &amp; alerts</h1><h2>Alerts raised now</h2><div id="a-list"></div><h2>Schemas</h2><div id="s-list"></div>`;
  every(2000, async () => {
    const [s, a] = await Promise.all([api("/v1/schemas"), api("/v1/alerts")]);
    const list = s.schemas || [];
    document.getElementById("s-list").innerHTML = list.length
      ? `<table><thead><tr><th>pattern</th><th>schema</th></tr></thead><tbody>` +
        list.map((x) => `<tr><td>${esc(x.pattern)}</td><td><code>${esc(JSON.stringify(x.schema))}</code></td></tr>`).join("") + `</tbody></table>`
      : `<p class="muted">none registered</p>`;
    document.getElementById("a-list").innerHTML = a.alerts.length ? alertTable(a.alerts)
      : `<p class="muted">${a.configured ? "none" : "no thresholds configured (evhost serve --alert-*)"}</p>`;
  });
}

function route() {
  routeGen += 1;
  timers.forEach(clearInterval);
  timers = [];
  if (stopTail) { stopTail(); stopTail = null; }
  showError(null);
  const parts = location.hash.replace(/^#\/?/, "").split("/");
  let arg = "";
  try { arg = parts[1] ? decodeURIComponent(parts[1]) : ""; } catch (_) { arg = parts[1]; }
  const page = { "": overview, plugin: () => plugin(arg), state, tail, flow: () => flow(arg), schemas }[parts[0]] || overview;
  const gen = routeGen;
  Promise.resolve(page()).catch((e) => { if (gen === routeGen) showError(e); });
}

document.getElementById("token").value = token();
window.addEventListener("hashchange", route);
route();
