// The status page. Everything on it comes from the admin API with the key the operator typed,
// kept in sessionStorage (this tab only) and sent as a bearer header: no cookie, so no CSRF.
// Data is only ever written with textContent, never parsed as HTML.
"use strict";

const KEY = "mcp-pool-admin-key";
const POLL_MS = 2000;
const MAX_EVENTS = 200;

let feed = null; // AbortController of the event stream
let poll = null;

const $ = (id) => document.getElementById(id);
const key = () => sessionStorage.getItem(KEY);

async function api(path, options = {}) {
  const response = await fetch(path, {
    ...options,
    headers: { Authorization: `Bearer ${key()}`, ...(options.headers || {}) },
  });
  if (response.status === 401 || response.status === 403) {
    signOut("The admin key was refused.");
    throw new Error("unauthorized");
  }
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response;
}

function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = text == null ? "—" : String(text);
  if (className) td.className = className;
  return td;
}

function bytes(n) {
  if (n == null) return null;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(0)} KiB`;
  return `${(n / 1024 / 1024).toFixed(1)} MiB`;
}

function seconds(s) {
  return s == null ? null : `${s.toFixed(2)} s`;
}

function ago(iso) {
  if (!iso) return null;
  const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (s < 60) return `${s.toFixed(0)} s`;
  if (s < 3600) return `${(s / 60).toFixed(0)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

function ms(n) {
  return n == null ? null : `${n} ms`;
}

function renderStats(stats) {
  const users = Object.keys(stats.user_breakdown).length;
  $("totals").textContent =
    `${stats.total_connections} live sessions, ${stats.active_connections} ready, ${users} users`;

  const servers = $("servers").tBodies[0];
  servers.replaceChildren();
  for (const [name, s] of Object.entries(stats.servers)) {
    const row = servers.insertRow();
    row.dataset.server = name;
    cell(row, name);
    cell(row, s.live, "num");
    cell(row, s.ready, "num");
    cell(row, s.failures, "num");
    cell(row, s.circuits_open, "num");
    cell(row, ms(s.cold_start_p50_ms), "num");
    cell(row, ms(s.cold_start_p99_ms), "num");
    cell(row, bytes(s.memory_bytes), "num");
    cell(row, seconds(s.cpu_seconds), "num");
  }

  const sessions = $("sessions").tBodies[0];
  sessions.replaceChildren();
  for (const s of stats.connections) {
    const row = sessions.insertRow();
    row.dataset.user = s.user_id;
    row.dataset.server = s.server;
    row.dataset.state = s.state;
    row.dataset.restarts = s.restarts;
    cell(row, s.user_id);
    cell(row, s.server);
    const state = cell(row, "");
    const badge = document.createElement("span");
    badge.className = `state ${s.state}`;
    badge.textContent = s.state;
    state.append(badge);
    cell(row, s.pid, "num pid");
    cell(row, ago(s.started_at), "num");
    cell(row, ago(s.last_used), "num");
    cell(row, s.in_flight, "num");
    cell(row, s.restarts, "num restarts");
    cell(row, s.sandbox);
    cell(row, bytes(s.memory_bytes), "num");
    cell(row, seconds(s.cpu_seconds), "num");
    const actions = cell(row, "");
    actions.append(
      button("Close", `Close ${s.user_id}'s ${s.server} session`, () =>
        closeSessions(`/v1/admin/users/${encodeURIComponent(s.user_id)}/connections/${encodeURIComponent(s.server)}`)),
      " ",
      button("Close user", `Close every session of ${s.user_id}`, () =>
        closeSessions(`/v1/admin/users/${encodeURIComponent(s.user_id)}/connections`)),
    );
  }
  $("no-sessions").hidden = stats.connections.length > 0;
}

function button(text, title, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = text;
  b.title = title;
  b.addEventListener("click", onClick);
  return b;
}

async function closeSessions(path) {
  await api(path, { method: "DELETE" });
  await refresh();
}

async function refresh() {
  const response = await api("/v1/stats");
  renderStats(await response.json());
}

function describe(event) {
  switch (event.event) {
    case "started":
      return `started (pid ${event.pid ?? "?"}, cold start ${event.cold_start_ms} ms${event.restart ? ", restart" : ""})`;
    case "start_failed": return `start failed: ${event.code}`;
    case "crashed": return `crashed: ${event.cause}`;
    case "restart_scheduled": return `restart ${event.attempt} in ${event.backoff_ms} ms`;
    case "circuit_opened": return `circuit opened for ${event.cooldown_secs} s`;
    case "closed": return `closed (${event.reason})`;
    case "tools_changed": return "tool list changed";
    case "prompts_changed": return "prompt list changed";
    case "resources_changed": return "resource list changed";
    case "token_refreshed": return "token refreshed";
    case "token_refresh_failed": return `token refresh failed: ${event.code}`;
    case "credentials_changed": return "credentials changed";
    case "prefork_fallback": return `spawned instead of forked: ${event.cause}`;
    default: return event.event;
  }
}

function addEvent(event) {
  const item = document.createElement("li");
  item.className = event.event;
  const time = document.createElement("time");
  time.dateTime = event.at;
  time.textContent = new Date(event.at).toLocaleTimeString();
  item.append(time, `${event.user_id} · ${event.server} · ${describe(event)}`);
  const list = $("events");
  list.prepend(item);
  while (list.children.length > MAX_EVENTS) list.lastChild.remove();
}

// EventSource cannot send a bearer header, so the stream is read with fetch.
async function follow() {
  feed = new AbortController();
  const response = await api("/v1/admin/events", { signal: feed.signal });
  $("live").className = "dot on";
  $("live").textContent = "live";
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let refreshQueued = false;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message";
      let data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trim();
      }
      if (name === "pool" && data) {
        addEvent(JSON.parse(data));
        if (!refreshQueued) {
          refreshQueued = true;
          setTimeout(() => { refreshQueued = false; refresh().catch(() => {}); }, 150);
        }
      }
    }
  }
}

function followForever() {
  follow().catch(() => {}).finally(() => {
    $("live").className = "dot off";
    $("live").textContent = "feed offline";
    if (key()) setTimeout(followForever, 2000);
  });
}

function signOut(message) {
  sessionStorage.removeItem(KEY);
  if (feed) feed.abort();
  clearInterval(poll);
  $("dashboard").hidden = true;
  $("sign-out").hidden = true;
  $("login").hidden = false;
  $("events").replaceChildren();
  const error = $("login-error");
  error.hidden = !message;
  error.textContent = message || "";
}

async function open() {
  $("login-error").hidden = true;
  try {
    await refresh();
  } catch {
    return;
  }
  $("login").hidden = true;
  $("dashboard").hidden = false;
  $("sign-out").hidden = false;
  poll = setInterval(() => refresh().catch(() => {}), POLL_MS);
  followForever();
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem(KEY, $("admin-key").value.trim());
    $("admin-key").value = "";
    open();
  });
  $("sign-out").addEventListener("click", () => signOut());
  if (key()) open();
});
