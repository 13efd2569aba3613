// DOM helpers: elements built with h() (text always as text nodes, never parsed as HTML), formatting,
// links to the console's own pages, and the error box every page shows instead of going blank.

const PROPS = new Set(["value", "checked", "disabled", "selected", "multiple", "readOnly", "required"]);
const SVG_NS = "http://www.w3.org/2000/svg";

function appendAll(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

function setAttrs(el, attrs) {
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") el.setAttribute("class", value);
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key === "text") el.textContent = value;
    else if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2), value);
    else if (PROPS.has(key)) el[key] = value;
    else el.setAttribute(key, value === true ? "" : String(value));
  }
}

/** An HTML element: h("a", {href: "/x", class: "y"}, "text", child, [more]). */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  setAttrs(el, attrs);
  return appendAll(el, children);
}

/** An SVG element. */
export function s(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  setAttrs(el, attrs);
  return appendAll(el, children);
}

export function clear(el) {
  el.replaceChildren();
  return el;
}

// ---------------------------------------------------------------------------- formatting

export function fmtTime(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return String(iso);
  const pad = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

export function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined || Number.isNaN(seconds)) return "";
  if (seconds < 60) return `${seconds.toFixed(seconds < 10 ? 1 : 0)} s`;
  const m = Math.floor(seconds / 60);
  if (m < 60) return `${m} min ${Math.round(seconds % 60)} s`;
  return `${Math.floor(m / 60)} h ${m % 60} min`;
}

/** "12.5s" (a protobuf Duration as JSON) -> 12.5 */
export function durationSeconds(value) {
  if (value === null || value === undefined || value === "") return null;
  const n = parseFloat(String(value));
  return Number.isNaN(n) ? null : n;
}

export function fmtBytes(n) {
  n = Number(n);
  if (!n) return n === 0 ? "0 B" : "";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i += 1;
  }
  return `${n.toFixed(i === 0 ? 0 : 1)} ${units[i]}`;
}

export function fmtNum(x, digits = 4) {
  if (x === null || x === undefined || x === "") return "";
  const n = Number(x);
  if (Number.isNaN(n)) return String(x);
  if (Number.isInteger(n) && Math.abs(n) < 1e15) return n.toLocaleString("en-US");
  if (Math.abs(n) >= 1e5 || (Math.abs(n) < 1e-3 && n !== 0)) return n.toExponential(2);
  return Number(n.toPrecision(digits)).toString();
}

export function fmtCount(x) {
  const n = Number(x);
  if (!n) return "0";
  if (n >= 1e9) return `${(n / 1e9).toFixed(2)} B`;
  if (n >= 1e6) return `${(n / 1e6).toFixed(2)} M`;
  if (n >= 1e3) return `${(n / 1e3).toFixed(1)} k`;
  return String(n);
}

/** "JOB_STATE_RUNNING" / "DEPLOYMENT_STATE_READY" / "RUNNING" -> "RUNNING" */
export function shortEnum(value) {
  return String(value || "").replace(/^(JOB_STATE|DEPLOYMENT_STATE|MODEL_VERSION_STATE|MODEL_KIND|MODEL_FORMAT|STEP_STATE|TRAINING_METHOD|QUANTIZATION_METHOD|ENGINE|LINEAGE_RELATION|TRAINING_JOB_KIND|BENCHMARK_KIND)_/, "");
}

export function badge(state, extra = "") {
  const text = shortEnum(state) || "UNKNOWN";
  return h("span", { class: `badge state-${text.toLowerCase()} ${extra}`.trim(), "data-state": text }, text);
}

export function progressBar(fraction, wide = false) {
  const pct = Math.max(0, Math.min(1, Number(fraction) || 0)) * 100;
  const inner = h("span");
  inner.style.width = `${pct.toFixed(1)}%`;
  return h("span", { class: wide ? "progress wide" : "progress", title: `${pct.toFixed(0)}%` }, inner);
}

// ---------------------------------------------------------------------------- links

/** The console page of a resource name (models/x/versions/y, trainingJobs/j, ...), or null. */
export function pageOf(name) {
  if (!name || String(name).includes("*")) return null; // a pattern (evaluations/run-eval-*), not one resource
  const p = String(name).split("/");
  if (p[0] === "models" && p.length === 2) return `/console/models/${p[1]}`;
  if (p[0] === "models" && p.length === 4) return `/console/models/${p[1]}/versions/${p[3]}`;
  if (p[0] === "datasets" && p.length === 2) return `/console/datasets/${p[1]}`;
  if (p[0] === "datasets" && p.length === 4) return `/console/datasets/${p[1]}/versions/${p[3]}`;
  if (["trainingJobs", "quantizationJobs", "evaluations", "imports", "pipelineRuns"].includes(p[0]) && p.length === 2) {
    return `/console/jobs/${p[0]}/${p[1]}`;
  }
  if (p[0] === "deployments" && p.length === 2) return `/console/deployments#${p[1]}`;
  return null;
}

export function link(href, text, attrs = {}) {
  return h("a", { href, ...attrs }, text);
}

/** A link to the resource's page when it has one, else its name as text. */
export function resource(name, text) {
  if (!name) return "";
  const href = pageOf(name);
  return href ? link(href, text || name, { class: "mono" }) : h("span", { class: "mono" }, text || name);
}

// ---------------------------------------------------------------------------- messages

const TITLES = {
  0: "The gateway could not be reached",
  400: "Bad request",
  401: "Not signed in",
  403: "Not allowed",
  404: "Not found",
  409: "Conflict",
  429: "Too many requests",
  500: "The gateway had an error",
  503: "Service unavailable",
  504: "A service did not answer in time",
};

/** The error box pages show instead of their content: what failed, the server's message, a retry button. */
export function errorBox(err, { retry = null, title = null } = {}) {
  const status = err && typeof err.status === "number" ? err.status : null;
  const heading = title || TITLES[status] || (status ? `Error ${status}` : "Something went wrong");
  const box = h(
    "div",
    { class: "error", role: "alert", "data-status": status ?? "" },
    h("strong", {}, status ? `${heading} (${status})` : heading),
    h("div", { class: "detail" }, (err && err.message) || String(err)),
  );
  if (retry) box.append(h("button", { class: "secondary", type: "button", onclick: retry }, "Retry"));
  return box;
}

export function notice(text, cls = "notice") {
  return h("div", { class: cls }, text);
}

export function table(headers, rows, { empty = "Nothing here yet." } = {}) {
  if (!rows.length) return h("div", { class: "table-wrap" }, h("div", { class: "empty" }, empty));
  const head = h("tr", {}, headers.map((c) => (typeof c === "string" ? h("th", {}, c) : h("th", c.attrs || {}, c.text))));
  return h("div", { class: "table-wrap" }, h("table", {}, h("thead", {}, head), h("tbody", {}, rows)));
}

export function props(pairs, { empty = "Nothing yet." } = {}) {
  const dl = h("dl", { class: "props" });
  for (const [key, value] of pairs) {
    if (value === null || value === undefined || value === "" || (Array.isArray(value) && !value.length)) continue;
    dl.append(h("dt", {}, key), h("dd", {}, value));
  }
  return dl.childElementCount ? dl : h("div", { class: "empty" }, empty);
}
