// The ModelYard console: sign-in, the page shell and the router. Each page is a module of ./pages that
// fills the view; a page that fails shows the error (with a retry button), never a blank page.

import { api, ApiError } from "./lib/api.js";
import { h, clear, errorBox, notice } from "./lib/dom.js";
import * as datasets from "./pages/datasets.js";
import * as deployments from "./pages/deployments.js";
import * as evaluations from "./pages/evaluations.js";
import * as jobs from "./pages/jobs.js";
import * as models from "./pages/models.js";
import * as playground from "./pages/playground.js";
import { CHAT_KEY } from "./pages/playground.js";

const root = document.getElementById("app");
const NAV = [
  ["Models", "/console/models", /^\/console\/?$|^\/console\/models/],
  ["Datasets", "/console/datasets", /^\/console\/datasets/],
  ["Jobs", "/console/jobs", /^\/console\/jobs/],
  ["Deployments", "/console/deployments", /^\/console\/deployments/],
  ["Evaluations", "/console/evaluations", /^\/console\/evaluations/],
  ["Playground", "/console/playground", /^\/console\/playground/],
];
const ROUTES = [
  [/^\/console\/?$/, models.list],
  [/^\/console\/models\/?$/, models.list],
  [/^\/console\/models\/([^/]+)\/?$/, models.detail],
  [/^\/console\/models\/([^/]+)\/versions\/([^/]+)\/?$/, models.version],
  [/^\/console\/datasets\/?$/, datasets.list],
  [/^\/console\/datasets\/([^/]+)\/?$/, datasets.detail],
  [/^\/console\/datasets\/([^/]+)\/versions\/([^/]+)\/?$/, datasets.version],
  [/^\/console\/jobs\/?$/, jobs.list],
  [/^\/console\/jobs\/([^/]+)\/([^/]+)\/?$/, jobs.detail],
  [/^\/console\/deployments\/?$/, deployments.list],
  [/^\/console\/evaluations\/?$/, evaluations.list],
  [/^\/console\/evaluations\/compare\/?$/, evaluations.compare],
  [/^\/console\/playground\/?$/, playground.page],
];

let me = null; // the signed-in session: {user: {kind, name, key_prefix}, expires_at}
let current = null; // the page on screen: {controller, cleanups}
let shell = null; // {view, nav, who}

function teardown() {
  if (!current) return;
  current.controller.abort();
  for (const fn of current.cleanups.splice(0)) {
    try {
      fn();
    } catch (e) {
      console.error(e);
    }
  }
  current = null;
}

export function navigate(path, { replace = false } = {}) {
  if (replace) history.replaceState({}, "", path);
  else history.pushState({}, "", path);
  render();
}

function buildShell() {
  const nav = h("nav", {}, NAV.map(([label, href]) => h("a", { href }, label)));
  const who = h("div", { class: "who" });
  const view = h("main", { id: "view" });
  root.replaceChildren(h("header", { class: "top" }, h("a", { class: "brand", href: "/console/models" }, "ModelYard"), nav, who), view);
  shell = { view, nav, who };
}

function updateShell() {
  const path = location.pathname;
  shell.nav.querySelectorAll("a").forEach((a, i) => a.classList.toggle("active", NAV[i][2].test(path)));
  const user = me.user;
  const label = user.kind === "admin" ? "admin (admin token)" : `${user.name} (${user.key_prefix}…)`;
  shell.who.replaceChildren(
    h("span", { id: "signed-in-as", title: `session until ${me.expires_at}` }, `Signed in as ${label}`),
    h("button", { type: "button", id: "sign-out", onclick: signOut }, "Sign out"),
  );
}

async function render() {
  teardown();
  if (!me) return showSignIn();
  if (!shell || !root.contains(shell.view)) buildShell();
  updateShell();
  const path = location.pathname.replace(/\/+$/, "") || "/console";
  const controller = new AbortController();
  current = { controller, cleanups: [] };
  const page = current;
  const view = clear(shell.view);
  const route = ROUTES.find(([re]) => re.test(path) || re.test(path + "/"));
  if (!route) {
    view.append(errorBox(new ApiError(404, `There is no console page at ${location.pathname}.`), {}));
    return;
  }
  const params = (path.match(route[0]) || []).slice(1).map(decodeURIComponent);
  const ctx = {
    view,
    params,
    query: new URLSearchParams(location.search),
    signal: controller.signal,
    me,
    navigate,
    onCleanup: (fn) => page.cleanups.push(fn),
    alive: () => current === page && !controller.signal.aborted,
  };
  view.append(h("p", { class: "loading" }, "Loading…"));
  try {
    await route[1](ctx, ...params);
  } catch (err) {
    if (err && err.name === "AbortError") return;
    if (current !== page) return;
    console.error(err);
    if (err instanceof ApiError && err.status === 401) return; // the sign-in page takes over
    view.replaceChildren(errorBox(err, { retry: () => render() }));
  }
}

function showSignIn(message = "") {
  teardown();
  shell = null;
  document.title = "Sign in · ModelYard console";
  const input = h("input", { type: "password", id: "signin-key", name: "key", placeholder: "sk-yard-… or the admin token", autocomplete: "off", required: true });
  const errorArea = h("div", { id: "signin-error", "aria-live": "polite" });
  const button = h("button", { type: "submit", id: "signin-submit" }, "Sign in");
  if (message) errorArea.append(notice(message, "warn"));
  const form = h("form", {
    onsubmit: async (ev) => {
      ev.preventDefault();
      errorArea.replaceChildren();
      button.disabled = true;
      try {
        const key = input.value.trim();
        me = await api("/session", { method: "POST", body: { key } });
        sessionStorage.clear();
        if (me.user.kind === "key") sessionStorage.setItem(CHAT_KEY, key);
        if (/^\/console\/?$/.test(location.pathname)) history.replaceState({}, "", "/console/models");
        render();
      } catch (err) {
        errorArea.replaceChildren(errorBox(err, { title: err.status === 401 ? "Sign-in failed" : null }));
        button.disabled = false;
        input.select();
      }
    },
  },
    h("label", { class: "field", for: "signin-key" }, "API key or admin token", input),
    button);
  root.replaceChildren(
    h("div", { class: "signin" },
      h("div", { class: "panel" },
        h("h1", {}, "ModelYard console"),
        h("p", { class: "sub" }, "Sign in with an API key (sk-yard-…) or the gateway's admin token."),
        errorArea,
        form)),
  );
  input.focus();
}

async function signOut() {
  try {
    await api("/session", { method: "DELETE" });
  } catch (err) {
    console.error(err);
  }
  me = null;
  sessionStorage.clear();
  history.pushState({}, "", "/console");
  showSignIn("Signed out.");
}

async function start() {
  document.addEventListener("click", (ev) => {
    const a = ev.target.closest && ev.target.closest("a[href]");
    if (!a || a.target || a.hasAttribute("download") || ev.defaultPrevented) return;
    if (ev.button !== 0 || ev.metaKey || ev.ctrlKey || ev.shiftKey || ev.altKey) return;
    const url = new URL(a.href, location.href);
    if (url.origin !== location.origin || !url.pathname.startsWith("/console") || url.pathname.startsWith("/console/api")) return;
    ev.preventDefault();
    if (url.pathname === location.pathname && url.search === location.search && url.hash) {
      history.replaceState({}, "", url.pathname + url.search + url.hash);
      return;
    }
    navigate(url.pathname + url.search + url.hash);
  });
  window.addEventListener("popstate", () => render());
  document.addEventListener("console:session-ended", (ev) => {
    if (!me) return;
    me = null;
    showSignIn(`Your console session ended: ${ev.detail.message}`);
  });
  window.addEventListener("unhandledrejection", (ev) => {
    const err = ev.reason;
    if (err && err.name === "AbortError") return;
    console.error(err);
    const view = shell && shell.view;
    if (view && !view.querySelector(".error")) view.prepend(errorBox(err || new Error("unknown error")));
  });
  root.dataset.state = "ready";
  await checkSession();
}

async function checkSession() {
  root.replaceChildren(h("p", { class: "boot-loading" }, "Checking your session…"));
  try {
    me = await api("/session");
  } catch (err) {
    me = null;
    if (!(err instanceof ApiError) || err.status !== 401) {
      root.replaceChildren(h("div", { class: "signin" }, errorBox(err, { retry: () => checkSession() })));
      return;
    }
  }
  render();
}

start();
