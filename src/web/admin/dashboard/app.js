// The weirmq dashboard: plain JavaScript over the admin API (api/...),
// routed by the URL's hash. No framework, no build step, no CDN.
"use strict";

const API = "api";
const REFRESH_MS = 2000;
const SPARK_POINTS = 30;
const view = document.getElementById("view");
const statusBox = document.getElementById("status");
let refreshTimer = null;
let readOnly = false;
// Lag per group and totals seen on earlier refreshes (sparklines, rates).
const lagHistory = new Map();
let lastTotals = null;

// ------------------------------------------------------------- helpers

function esc(v) {
  return String(v ?? "").replace(/[&<>"']/g, c =>
    ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}
const enc = encodeURIComponent;
const num = n => (n ?? 0).toLocaleString("en-US");

function bytes(n) {
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + u[i];
}

// Attributes of a button that changes something, when the API is read-only.
function changeAttrs() {
  return readOnly ? "disabled title='read-only: no admin token configured'" : "";
}

function token() { return sessionStorage.getItem("weirmq-token") || ""; }

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  if (token()) headers["Authorization"] = "Bearer " + token();
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(API + path, {
    method: options.method || "GET",
    headers,
    body: options.body === undefined ? undefined : JSON.stringify(options.body),
  });
  let data = null;
  try { data = await r.json(); } catch (_) { /* not JSON */ }
  if (!r.ok) {
    const e = new Error((data && data.message) || r.status + " " + r.statusText);
    e.status = r.status;
    e.kind = data && data.error;
    throw e;
  }
  return data;
}

function say(text, kind = "ok") {
  statusBox.innerHTML = `<div class="${kind}">${esc(text)}</div>`;
  if (kind === "ok") setTimeout(() => { if (statusBox.textContent === text) statusBox.innerHTML = ""; }, 4000);
}
function fail(e) {
  say(e.status === 401 ? "Not allowed: " + e.message + " — enter the admin token above."
                       : e.message, "err");
}

function confirmDialog(text) {
  const d = document.getElementById("confirm");
  document.getElementById("confirm-text").textContent = text;
  return new Promise(resolve => {
    d.addEventListener("close", () => resolve(d.returnValue === "ok"), { once: true });
    d.showModal();
  });
}

function sparkline(values) {
  const w = 90, h = 22;
  if (values.length < 2) return `<svg class="spark" width="${w}" height="${h}"></svg>`;
  const max = Math.max(1, ...values);
  const pts = values.map((v, i) =>
    `${(i * w / (values.length - 1)).toFixed(1)},${(h - 2 - v * (h - 4) / max).toFixed(1)}`).join(" ");
  return `<svg class="spark" width="${w}" height="${h}" aria-label="lag trend"><polyline points="${pts}"/></svg>`;
}

function when(w) { return w ? `<span title="${esc(w.utc)}">${esc(w.utc.replace("T", " ").replace("Z", ""))}</span>` : ""; }

function bodyView(b) {
  const text = b.encoding === "json" ? JSON.stringify(b.value, null, 2) : b.value;
  return `<div class="muted">${esc(b.encoding)}, ${num(b.size)} bytes</div><pre>${esc(text)}</pre>`;
}

function schedule(fn) {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(async () => { if (await fn() !== false) schedule(fn); }, REFRESH_MS);
}

// ------------------------------------------------------------- pages

async function overview() {
  const o = await api("/overview");
  readOnly = o.read_only;
  document.getElementById("backend").textContent =
    o.capabilities.backend + (readOnly ? " · read-only" : "");
  const userTopics = o.topics.filter(t => !t.system);
  const totalLag = o.groups.reduce((s, g) => s + g.lag, 0);
  const dead = new Map();
  for (const g of o.groups) dead.set(g.group, g.dead_letters);
  const deadTotal = [...dead.values()].reduce((a, b) => a + b, 0);
  const now = Date.now();
  const totals = {
    at: now,
    stored: userTopics.reduce((s, t) => s + t.messages, 0),
    delivered: o.groups.reduce((s, g) => s + g.stats.delivered, 0),
  };
  let rates = "–";
  if (lastTotals && now > lastTotals.at) {
    const secs = (now - lastTotals.at) / 1000;
    const inRate = Math.max(0, (totals.stored - lastTotals.stored) / secs);
    const outRate = Math.max(0, (totals.delivered - lastTotals.delivered) / secs);
    rates = `${num(Math.round(inRate))} in · ${num(Math.round(outRate))} out`;
  }
  lastTotals = totals;
  for (const g of o.groups) {
    const k = g.group + "\u0000" + g.topic;
    const h = lagHistory.get(k) || [];
    h.push(g.lag);
    if (h.length > SPARK_POINTS) h.shift();
    lagHistory.set(k, h);
  }
  view.innerHTML = `
    <h1>Overview</h1>
    <div class="cards">
      <div class="card"><div class="n">${num(userTopics.length)}</div><div class="l">topics</div></div>
      <div class="card"><div class="n">${num(o.groups.length)}</div><div class="l">consumer groups</div></div>
      <div class="card"><div class="n" id="total-lag">${num(totalLag)}</div><div class="l">messages behind (lag)</div></div>
      <div class="card"><div class="n ${deadTotal ? "bad" : ""}" id="total-dead">${num(deadTotal)}</div><div class="l">dead letters</div></div>
      <div class="card"><div class="n">${rates}</div><div class="l">messages/s (stored · delivered)</div></div>
    </div>
    <h2>Consumer groups</h2>
    <table id="groups">
      <thead><tr><th>group</th><th>topic</th><th class="num">lag</th><th>lag trend</th>
        <th class="num">in flight</th><th class="num">retries waiting</th><th class="num">retried</th>
        <th class="num">dead letters</th></tr></thead>
      <tbody>${o.groups.map(g => `
        <tr data-group="${esc(g.group)}" data-topic="${esc(g.topic)}">
          <td><a href="#/group/${enc(g.group)}/${enc(g.topic)}">${esc(g.group)}</a>${g.subscribed_here ? "" : ' <span class="muted">(not here)</span>'}</td>
          <td>${esc(g.topic)}</td>
          <td class="num lag ${g.lag ? "warn" : ""}">${num(g.lag)}</td>
          <td>${sparkline(lagHistory.get(g.group + "\u0000" + g.topic))}</td>
          <td class="num">${num(g.stats.in_flight)}</td>
          <td class="num">${num(g.stats.scheduled_retries)}</td>
          <td class="num">${num(g.stats.retried)}</td>
          <td class="num dead">${g.dead_letters ? `<a class="bad" href="#/dlq/${enc(g.group)}">${num(g.dead_letters)}</a>` : "0"}</td>
        </tr>`).join("") || '<tr><td colspan="8" class="muted">no consumer groups yet</td></tr>'}
      </tbody>
    </table>
    <h2>Topics</h2>
    <table id="topics">
      <thead><tr><th>topic</th><th class="num">queues</th><th class="num">messages</th>
        <th class="num">size</th><th>retention</th><th>trace</th></tr></thead>
      <tbody>${o.topics.map(t => `
        <tr data-topic="${esc(t.name)}">
          <td><a href="#/topic/${enc(t.name)}">${esc(t.name)}</a>${t.system ? ' <span class="muted">system</span>' : ""}</td>
          <td class="num">${t.queue_count}</td><td class="num">${num(t.messages)}</td>
          <td class="num">${bytes(t.bytes)}</td>
          <td>${t.retention_max_age_secs ? (t.retention_max_age_secs / 3600).toFixed(0) + " h" : "no age limit"}${t.retention_max_bytes ? " · " + bytes(t.retention_max_bytes) : ""}</td>
          <td>${t.trace ? "on" : "off"}</td>
        </tr>`).join("")}
      </tbody>
    </table>`;
}

async function topicPage(name) {
  const t = await api("/topics/" + enc(name));
  view.innerHTML = `
    <h1>Topic ${esc(t.name)}</h1>
    <p class="muted">${num(t.messages)} messages · ${bytes(t.bytes)} · ${t.queue_count} queues</p>
    <table><thead><tr><th>queue</th><th class="num">first offset</th><th class="num">next offset</th>
      <th class="num">messages</th><th></th></tr></thead>
    <tbody>${t.queues.map(q => `<tr><td>${q.queue}</td><td class="num">${q.first}</td>
      <td class="num">${q.end}</td><td class="num">${num(q.messages)}</td>
      <td><a href="#/browse/${enc(t.name)}/${q.queue}/${q.first}">browse</a></td></tr>`).join("")}</tbody></table>`;
}

async function browsePage(topic, queue, from) {
  const page = await api(`/topics/${enc(topic)}/queues/${queue}/messages?from=${from}&max=50`);
  view.innerHTML = `
    <h1>${esc(topic)} · queue ${esc(queue)} from ${esc(from)}</h1>
    ${messageTable(page.messages)}
    <div class="bar">${page.next != null ? `<a href="#/browse/${enc(topic)}/${queue}/${page.next}">next page →</a>` : '<span class="muted">end of queue</span>'}</div>`;
  return false;
}

function messageTable(msgs) {
  if (!msgs.length) return '<p class="muted">no messages</p>';
  return `<table id="found"><thead><tr><th>id</th><th class="num">queue</th><th class="num">offset</th>
    <th>published</th><th>tag</th><th>keys</th><th>body</th></tr></thead><tbody>
    ${msgs.map(m => `<tr><td><a href="#/message/${enc(m.id)}">${esc(m.id)}</a></td>
      <td class="num">${m.queue}</td><td class="num">${m.offset}</td><td>${when(m.born_at)}</td>
      <td>${esc(m.tag || "")}</td><td>${esc(m.keys.join(", "))}</td>
      <td><code>${esc(JSON.stringify(m.body.value).slice(0, 80))}</code></td></tr>`).join("")}
    </tbody></table>`;
}

async function groupPage(group, topic) {
  const g = await api(`/groups/${enc(group)}/${enc(topic)}`);
  view.innerHTML = `
    <h1>Group ${esc(g.group)} on ${esc(g.topic)}</h1>
    <div class="cards">
      <div class="card"><div class="n" id="group-lag">${num(g.lag)}</div><div class="l">lag</div></div>
      <div class="card"><div class="n">${num(g.stats.in_flight)}</div><div class="l">in flight</div></div>
      <div class="card"><div class="n">${num(g.stats.scheduled_retries)}</div><div class="l">retries waiting</div></div>
      <div class="card"><div class="n">${num(g.stats.delivered)} / ${num(g.stats.acked)}</div><div class="l">delivered / acked (this process)</div></div>
      <div class="card"><div class="n ${g.dead_letters ? "bad" : ""}"><a href="#/dlq/${enc(g.group)}">${num(g.dead_letters)}</a></div><div class="l">dead letters</div></div>
    </div>
    <h2>Queues</h2>
    <table id="queues"><thead><tr><th>queue</th><th class="num">committed</th><th class="num">end</th><th class="num">lag</th></tr></thead>
    <tbody>${g.queues.map(q => `<tr><td>${q.queue}</td><td class="num">${q.committed}</td>
      <td class="num">${q.end}</td><td class="num">${num(q.lag)}</td></tr>`).join("")}</tbody></table>
    <h2>Reset the group's position</h2>
    <form class="bar" id="reset-form">
      <select id="reset-to"><option value="earliest">earliest (replay everything)</option>
        <option value="latest">latest (skip the backlog)</option><option value="time">a time…</option></select>
      <input id="reset-time" placeholder="2026-12-04T10:00:00Z or 2h">
      <button class="danger" id="reset" ${changeAttrs()}>Reset…</button>
    </form>`;
  document.getElementById("reset-form").addEventListener("submit", async ev => {
    ev.preventDefault();
    const sel = document.getElementById("reset-to").value;
    const to = sel === "time" ? document.getElementById("reset-time").value.trim() : sel;
    if (!to) return say("Give a time to reset to.", "err");
    if (!await confirmDialog(`Move group ${group} on ${topic} to ${to}? Messages before it are skipped, after it delivered again.`)) return;
    try {
      await api(`/groups/${enc(group)}/${enc(topic)}/reset`, { method: "POST", body: { to } });
      say(`Group ${group} reset to ${to}.`);
      groupPage(group, topic);
    } catch (e) { fail(e); }
  });
  // Not refreshed on a timer: the reset form keeps what is typed in it.
  return false;
}

async function messagesPage() {
  view.innerHTML = `
    <h1>Find messages</h1>
    <form class="bar" id="by-id"><input id="find-id" size="36" placeholder="message id">
      <button class="primary">Show</button></form>
    <form class="bar" id="by-key"><input id="find-topic" placeholder="topic">
      <input id="find-key" placeholder="key"><input id="find-since" placeholder="since (2h, or a time)">
      <button class="primary">Find by key</button></form>
    <div id="results"></div>`;
  document.getElementById("by-id").addEventListener("submit", ev => {
    ev.preventDefault();
    location.hash = "#/message/" + enc(document.getElementById("find-id").value.trim());
  });
  document.getElementById("by-key").addEventListener("submit", async ev => {
    ev.preventDefault();
    const q = new URLSearchParams({
      topic: document.getElementById("find-topic").value.trim(),
      key: document.getElementById("find-key").value.trim(),
    });
    const since = document.getElementById("find-since").value.trim();
    if (since) q.set("since", since);
    try {
      document.getElementById("results").innerHTML = messageTable(await api("/messages?" + q));
    } catch (e) { fail(e); }
  });
  return false;
}

async function messagePage(id) {
  const m = await api("/messages/" + enc(id));
  let trace = "";
  try {
    const t = await api(`/messages/${enc(id)}/trace`);
    trace = t.events.length ? `<ol class="timeline" id="timeline">${t.events.map(e => `
      <li class="${esc(e.kind)}"><b>${esc(e.kind)}</b> ${when(e.at)}
        ${e.group ? ` · group <a href="#/group/${enc(e.group)}/${enc(t.topic)}">${esc(e.group)}</a>` : ""}
        ${e.attempt ? ` · attempt ${e.attempt}` : ""}
        ${e.detail ? `<div class="muted">${esc(e.detail)}</div>` : ""}</li>`).join("")}</ol>`
      : `<p class="muted">No trace recorded: the topic's message trace is off (TopicConfig::trace).</p>`;
  } catch (e) { trace = `<p class="muted">${esc(e.message)}</p>`; }
  view.innerHTML = `
    <h1>Message ${esc(m.id)}</h1>
    <table><tbody>
      <tr><th>topic / queue / offset</th><td>${esc(m.topic)} / ${m.queue} / ${m.offset}</td></tr>
      <tr><th>published</th><td>${when(m.born_at)}</td></tr>
      <tr><th>tag</th><td>${esc(m.tag || "")}</td></tr>
      <tr><th>keys</th><td>${esc(m.keys.join(", "))}</td></tr>
      <tr><th>message group</th><td>${esc(m.message_group || "")}</td></tr>
      <tr><th>trace id</th><td>${esc(m.trace_id || "")}</td></tr>
      <tr><th>properties</th><td><code>${esc(JSON.stringify(m.properties))}</code></td></tr>
    </tbody></table>
    <h2>Body</h2>${bodyView(m.body)}
    <h2>Trace</h2>${trace}`;
  return false;
}

async function dlqGroups() {
  const groups = await api("/dlq");
  view.innerHTML = `<h1>Dead letters</h1>
    <table id="dlq-groups"><thead><tr><th>group</th><th class="num">dead letters</th></tr></thead><tbody>
    ${groups.map(g => `<tr><td><a href="#/dlq/${enc(g.group)}">${esc(g.group)}</a></td>
      <td class="num ${g.dead_letters ? "bad" : ""}">${num(g.dead_letters)}</td></tr>`).join("")
      || '<tr><td colspan="2" class="muted">no consumer groups</td></tr>'}
    </tbody></table>`;
}

async function dlqPage(group, from = 0) {
  const page = await api(`/dlq/${enc(group)}?from=${from}&max=100`);
  const letters = page.dead_letters;
  const dis = changeAttrs();
  view.innerHTML = `
    <h1>Dead letters of ${esc(group)}</h1>
    <div class="bar">
      <button class="primary" id="resend-selected" ${dis}>Resend selected</button>
      <button id="resend-all" ${dis}>Resend all</button>
      <button class="danger" id="purge" ${dis}>Purge…</button>
      <span class="muted">${num(letters.length)} shown</span>
    </div>
    <div id="results"></div>
    ${letters.length ? `<table id="dead-letters"><thead><tr><th><input type="checkbox" id="pick-all" aria-label="select all"></th>
      <th>original id</th><th>from</th><th>reason</th><th class="num">attempts</th><th>dead-lettered</th><th>state</th><th>body</th></tr></thead><tbody>
      ${letters.map(d => `<tr data-id="${esc(d.origin_id)}">
        <td><input type="checkbox" class="pick" value="${esc(d.origin_id)}" ${d.resent ? "disabled" : ""} aria-label="select"></td>
        <td><code>${esc(d.origin_id)}</code></td>
        <td>${esc(d.origin_topic)} q${esc(d.origin_queue)} @${esc(d.origin_offset)}</td>
        <td class="bad">${esc(d.reason)}</td><td class="num">${esc(d.attempts)}</td>
        <td>${when(d.dead_lettered_at)}</td><td class="state">${d.resent ? "resent" : "dead"}</td>
        <td><code>${esc(JSON.stringify(d.message.body.value).slice(0, 60))}</code></td></tr>`).join("")}
      </tbody></table>` : '<p class="muted" id="dlq-empty">No dead letters.</p>'}
    ${page.next != null && letters.length === 100 ? `<a href="#/dlq/${enc(group)}/${page.next}">next page →</a>` : ""}`;
  const showResults = r => {
    const counts = {};
    for (const x of r.results) counts[x.outcome] = (counts[x.outcome] || 0) + 1;
    document.getElementById("results").innerHTML = `<table id="resend-results"><thead><tr><th>id</th><th>outcome</th><th>reason</th></tr></thead><tbody>
      ${r.results.map(x => `<tr><td><code>${esc(x.id)}</code></td><td class="outcome ${x.outcome === "resent" ? "good" : "bad"}">${esc(x.outcome)}</td><td>${esc(x.reason || "")}</td></tr>`).join("")
        || '<tr><td colspan="3" class="muted">nothing to resend</td></tr>'}</tbody></table>`;
    for (const x of r.results) {
      if (x.outcome !== "resent") continue;
      const row = document.querySelector(`#dead-letters tr[data-id="${CSS.escape(x.id)}"]`);
      if (!row) continue;
      row.querySelector(".state").textContent = "resent";
      const pick = row.querySelector("input.pick");
      pick.checked = false;
      pick.disabled = true;
    }
    say("Resend: " + (Object.entries(counts).map(([k, v]) => `${v} ${k}`).join(", ") || "nothing to resend"));
  };
  const resend = async body => {
    try { showResults(await api(`/dlq/${enc(group)}/resend`, { method: "POST", body })); }
    catch (e) { fail(e); }
  };
  const pickAll = document.getElementById("pick-all");
  if (pickAll) pickAll.addEventListener("change", () =>
    document.querySelectorAll("input.pick:not(:disabled)").forEach(c => { c.checked = pickAll.checked; }));
  document.getElementById("resend-selected").addEventListener("click", () => {
    const ids = [...document.querySelectorAll("input.pick:checked")].map(c => c.value);
    if (!ids.length) return say("Select the dead letters to resend first.", "err");
    resend({ ids });
  });
  document.getElementById("resend-all").addEventListener("click", async () => {
    if (await confirmDialog(`Resend every dead letter of ${group} not resent yet?`)) resend({ all: true });
  });
  document.getElementById("purge").addEventListener("click", async () => {
    if (!await confirmDialog(`Delete every dead letter of ${group}? This cannot be undone.`)) return;
    try {
      const r = await api(`/dlq/${enc(group)}/purge`, { method: "POST", body: {} });
      say(`Purged ${r.purged} dead letters of ${group}.`);
      dlqPage(group);
    } catch (e) { fail(e); }
  });
  return false;
}

// ------------------------------------------------------------- routing

async function route() {
  clearTimeout(refreshTimer);
  const parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  const page = parts[0] || "overview";
  document.querySelectorAll("header nav a").forEach(a =>
    a.classList.toggle("active", a.dataset.nav === page || (page === "group" && a.dataset.nav === "overview")));
  const pages = {
    overview: () => overview(),
    topic: () => topicPage(parts[1]),
    browse: () => browsePage(parts[1], parts[2], parts[3] || 0),
    group: () => groupPage(parts[1], parts[2]),
    messages: () => messagesPage(),
    message: () => messagePage(parts[1]),
    dlq: () => (parts[1] ? dlqPage(parts[1], parts[2] || 0) : dlqGroups()),
  };
  const run = pages[page] || overview;
  try {
    // Pages that return false are not refreshed (forms, selections).
    if (await run() !== false) schedule(async () => {
      try { return await run(); } catch (e) { fail(e); return true; }
    });
  } catch (e) {
    view.innerHTML = `<h1>Cannot show this page</h1><p class="bad">${esc(e.message)}</p>`;
    if (e.status === 401) fail(e);
  }
}

document.getElementById("token").value = token();
document.getElementById("token-form").addEventListener("submit", ev => {
  ev.preventDefault();
  sessionStorage.setItem("weirmq-token", document.getElementById("token").value.trim());
  say(token() ? "Token set for this tab." : "Token cleared.");
  route();
});
window.addEventListener("hashchange", () => { statusBox.innerHTML = ""; route(); });
api("/overview").then(o => { readOnly = o.read_only; }).catch(() => {}).finally(route);
