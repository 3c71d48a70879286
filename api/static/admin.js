// The admins' page: signs in with an admin API key (kept in sessionStorage, sent as the `apikey`
// header), reads /api/v2/admin/ledger/{summary,totals} and draws the charts as inline SVG.
// No libraries: nothing here is fetched from anywhere but this horde.
"use strict";

const KEY = "horde.admin.apikey";
const SVG = "http://www.w3.org/2000/svg";
const DAY_MS = 86400000;
const $ = (id) => document.getElementById(id);

// --- helpers -------------------------------------------------------------------------------------

function kudos(value) {
  return Number(value).toLocaleString("en-US", { minimumFractionDigits: 2, maximumFractionDigits: 2 });
}

function el(name, attrs = {}, parent = null, text = null) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== null) node.textContent = text;
  if (parent) parent.appendChild(node);
  return node;
}

function svg(width, height, label) {
  return el("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": label });
}

function niceStep(max, ticks) {
  const raw = Math.max(max, 0.01) / ticks;
  const power = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * power).find((s) => s >= raw);
  return step || 10 * power;
}

function dayString(ms) {
  return new Date(ms).toISOString().slice(0, 10);
}

// --- API -----------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(message, status, rc) {
    super(message);
    this.status = status;
    this.rc = rc;
  }
}

async function api(path) {
  const response = await fetch(path, { headers: { apikey: sessionStorage.getItem(KEY) || "" } });
  let body = null;
  try {
    body = await response.json();
  } catch (_) {
    body = { message: response.statusText, rc: "Unknown" };
  }
  if (!response.ok) throw new ApiError(body.message || response.statusText, response.status, body.rc);
  return body;
}

// --- charts --------------------------------------------------------------------------------------

function flowChart(container, groups, days, endMs) {
  const byDay = new Map(groups.map((g) => [g.group, g]));
  const series = [];
  for (let i = days; i >= 1; i--) {
    const day = dayString(endMs - i * DAY_MS);
    const g = byDay.get(day) || { earned: 0, spent: 0, jobs: 0 };
    series.push({ day, earned: g.earned, spent: g.spent, jobs: g.jobs });
  }
  const W = 1100, H = 320, left = 78, right = 16, top = 30, bottom = 46;
  const plotW = W - left - right, plotH = H - top - bottom;
  const max = Math.max(0, ...series.map((d) => Math.max(d.earned, d.spent)));
  const step = niceStep(Math.max(max, 5), 5); // an empty period still gets a readable axis
  const yMax = Math.max(step, Math.ceil(max / step) * step);
  const y = (v) => top + plotH - (v / yMax) * plotH;
  const root = svg(W, H, "Kudos earned and spent per day");
  root.id = "flow-svg";

  const grid = el("g", { class: "grid axis" }, root);
  for (let v = 0; v <= yMax + step / 2; v += step) {
    el("line", { x1: left, x2: W - right, y1: y(v), y2: y(v) }, grid);
    el("text", { x: left - 8, y: y(v) + 4, "text-anchor": "end" }, grid, kudos(v));
  }
  const slot = plotW / series.length;
  const barW = Math.max(1, Math.min(18, slot * 0.38));
  const labelEvery = Math.ceil(series.length / 12);
  const bars = el("g", { class: "bars" }, root);
  series.forEach((d, i) => {
    const x = left + i * slot + slot / 2;
    for (const [name, offset] of [["earned", -barW], ["spent", 0]]) {
      const value = d[name];
      const rect = el("rect", {
        class: name, x: x + offset, y: y(value), width: barW, height: Math.max(0, top + plotH - y(value)),
        "data-day": d.day, "data-value": value.toFixed(2),
      }, bars);
      el("title", {}, rect, `${d.day}: ${name} ${kudos(value)} kudos (${d.jobs} jobs)`);
    }
    if (i % labelEvery === 0 || i === series.length - 1) {
      el("text", { class: "day", x, y: H - bottom + 18, "text-anchor": "middle" }, root, d.day.slice(5));
    }
  });
  el("line", { x1: left, x2: W - right, y1: top + plotH, y2: top + plotH, stroke: "#9aa3b2" }, root);

  const legend = el("g", { class: "legend", transform: `translate(${W - right - 250}, 8)` }, root);
  [["earned", "earned"], ["spent", "spent"]].forEach(([cls, label], i) => {
    el("rect", { class: cls, x: i * 120, y: 0, width: 12, height: 12 }, legend);
    el("text", { x: i * 120 + 18, y: 11 }, legend, `kudos ${label}`);
  });
  if (max === 0) {
    el("text", { class: "empty", x: left + plotW / 2, y: top + plotH / 2, "text-anchor": "middle" }, root,
      "No kudos earned or spent in this period");
  }
  const totalEarned = series.reduce((s, d) => s + d.earned, 0);
  const totalSpent = series.reduce((s, d) => s + d.spent, 0);
  el("text", { class: "totals", x: left, y: 18 }, root,
    `${series.length} days: ${kudos(totalEarned)} earned, ${kudos(totalSpent)} spent`);
  container.replaceChildren(root);
}

function rankingChart(container, groups, metric, label) {
  const rows = groups.filter((g) => g[metric] > 0);
  const W = 540, rowH = 30, left = 170, right = 96, top = 6;
  const H = Math.max(60, top * 2 + rows.length * rowH);
  const root = svg(W, H, label);
  root.id = `${metric}-svg`;
  if (!rows.length) {
    el("text", { class: "empty", x: W / 2, y: H / 2, "text-anchor": "middle" }, root, "Nobody in this period");
    container.replaceChildren(root);
    return;
  }
  const max = Math.max(...rows.map((r) => r[metric]));
  const scale = (W - left - right) / max;
  rows.forEach((r, i) => {
    const yTop = top + i * rowH;
    const name = r.group.length > 22 ? `${r.group.slice(0, 21)}…` : r.group;
    const row = el("g", { class: `row ${metric}`, "data-user": r.group, "data-value": r[metric].toFixed(2) }, root);
    el("title", {}, row, `${r.group}: ${kudos(r[metric])} kudos ${metric}, ${r.jobs} jobs`);
    el("text", { class: "name", x: left - 10, y: yTop + rowH / 2 + 4, "text-anchor": "end" }, row, name);
    const width = Math.max(2, r[metric] * scale);
    el("rect", { x: left, y: yTop + 5, width, height: rowH - 10, rx: 3 }, row);
    el("text", { class: "amount", x: left + width + 6, y: yTop + rowH / 2 + 4 }, row, kudos(r[metric]));
  });
  container.replaceChildren(root);
}

function totalsCards(container, totals) {
  const cards = [
    ["Minted", kudos(totals.minted), ""],
    ["Burned", kudos(totals.burned), ""],
    ["Held by users", kudos(totals.users), ""],
    ["Books", totals.balanced ? "balanced" : "DRIFT", totals.balanced ? "ok" : "drift"],
  ];
  container.replaceChildren(...cards.map(([label, value, cls]) => {
    const card = document.createElement("div");
    card.className = `card ${cls}`;
    const l = document.createElement("div");
    l.className = "label";
    l.textContent = label;
    const v = document.createElement("div");
    v.className = "value";
    v.textContent = value;
    card.append(l, v);
    return card;
  }));
}

// --- the page ------------------------------------------------------------------------------------

function show(state, message = "") {
  document.body.dataset.state = state;
  $("login").hidden = state === "ready" || state === "loading";
  $("dashboard").hidden = !(state === "ready" || state === "loading");
  $("logout").hidden = !sessionStorage.getItem(KEY);
  $("error").hidden = !message;
  $("error").textContent = message;
}

async function load() {
  if (!sessionStorage.getItem(KEY)) return show("login");
  show("loading");
  $("status").textContent = "loading…";
  const days = Number($("days").value);
  const endMs = Math.floor(Date.now() / DAY_MS) * DAY_MS + DAY_MS; // the end of today, UTC
  const range = `since=${dayString(endMs - days * DAY_MS)}T00:00:00Z&until=${dayString(endMs)}T00:00:00Z`;
  const summary = "/api/v2/admin/ledger/summary?";
  try {
    const [flow, earners, spenders, totals] = await Promise.all([
      api(`${summary}group_by=day&${range}`),
      api(`${summary}group_by=user&sort=earned&limit=10&${range}`),
      api(`${summary}group_by=user&sort=spent&limit=10&${range}`),
      api("/api/v2/admin/ledger/totals"),
    ]);
    totalsCards($("totals"), totals);
    flowChart($("flow-chart"), flow.groups, days, endMs);
    rankingChart($("earners-chart"), earners.groups, "earned", "Top earners");
    rankingChart($("spenders-chart"), spenders.groups, "spent", "Top spenders");
    $("status").textContent = `updated ${new Date().toISOString().slice(11, 19)} UTC`;
    show("ready");
  } catch (error) {
    if (error instanceof ApiError && (error.status === 401 || error.status === 403)) {
      sessionStorage.removeItem(KEY);
      show("denied", `${error.message} (${error.rc})`);
    } else {
      show("error", `Could not load the reports: ${error.message}`);
    }
  }
}

function signIn(event) {
  event.preventDefault();
  const key = $("apikey").value.trim();
  if (!key) return;
  sessionStorage.setItem(KEY, key);
  $("apikey").value = "";
  load();
}

function signOut() {
  sessionStorage.removeItem(KEY);
  show("login");
}

function keyFromFragment() {
  // /admin#apikey=KEY signs in (handy for scripts); the key is taken out of the address at once.
  const match = /(?:^#|&)apikey=([^&]+)/.exec(location.hash);
  if (match) {
    sessionStorage.setItem(KEY, decodeURIComponent(match[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", signIn);
  $("logout").addEventListener("click", signOut);
  $("days").addEventListener("change", load);
  $("refresh").addEventListener("click", load);
  keyFromFragment();
  load();
});
