// The chat playground: the browser calls the gateway's own OpenAI API (/v1/models, /v1/chat/completions
// with stream=true) with a bearer key, exactly as any client does. The key is the API key this tab signed
// in with (sessionStorage), or for an admin session one the console mints for the session.

import { api, ApiError, openai, sseData } from "../lib/api.js";
import { h, errorBox, fmtNum, link, notice } from "../lib/dom.js";

export const CHAT_KEY = "yard.console.chatKey";
const MINTED = "yard.console.chatKeyMinted";

async function chatKey(ctx, { fresh = false } = {}) {
  const stored = sessionStorage.getItem(CHAT_KEY);
  if (stored && !fresh) return stored;
  if (ctx.me.user.kind !== "admin") {
    if (stored) return stored;
    throw new ApiError(400, "The playground uses the API key you signed in with, which only the tab you signed in from keeps. Sign out and sign in again in this tab to chat.");
  }
  const minted = await api("/playground-key", { method: "POST", signal: ctx.signal });
  sessionStorage.setItem(CHAT_KEY, minted.key);
  sessionStorage.setItem(MINTED, "1");
  return minted.key;
}

export async function page(ctx) {
  document.title = "Playground · ModelYard console";
  let key = await chatKey(ctx);
  let models;
  try {
    models = await (await openai("/models", key, { signal: ctx.signal })).json();
  } catch (err) {
    if (!(err instanceof ApiError) || err.status !== 401 || ctx.me.user.kind !== "admin") throw err;
    key = await chatKey(ctx, { fresh: true }); // a minted key of an earlier session, revoked since
    models = await (await openai("/models", key, { signal: ctx.signal })).json();
  }
  const ids = (models.data || []).map((m) => m.id);
  const wanted = ctx.query.get("model");
  const modelSel = h("select", { id: "chat-model", name: "model" }, ids.map((id) => h("option", { value: id, selected: id === wanted }, id)));
  const system = h("textarea", { id: "chat-system", rows: 3, placeholder: "You are a helpful assistant." });
  const maxTokens = h("input", { id: "chat-max-tokens", type: "number", min: 1, value: "128" });
  const temperature = h("input", { id: "chat-temperature", type: "number", min: 0, max: 2, step: 0.1, value: "0.7" });
  const seed = h("input", { id: "chat-seed", type: "number", min: 0, step: 1, placeholder: "random" });
  const input = h("textarea", { id: "chat-input", rows: 3, placeholder: "Say something… (Ctrl+Enter sends)" });
  const send = h("button", { type: "submit", id: "chat-send" }, "Send");
  const stop = h("button", { type: "button", id: "chat-stop", class: "secondary", disabled: true }, "Stop");
  const clearBtn = h("button", { type: "button", class: "secondary" }, "Clear");
  const transcript = h("div", { class: "transcript", id: "transcript" });
  const problem = h("div", { id: "chat-error" });
  const turns = [];
  let controller = null;
  ctx.onCleanup(() => controller && controller.abort());

  const usingKey = ctx.me.user.kind === "admin" ? "a key minted for this admin session (console-admin)" : `your key ${ctx.me.user.key_prefix}…`;
  if (!ids.length) {
    ctx.view.replaceChildren(
      h("h1", {}, "Playground"),
      notice("No model is ready to chat with: the gateway lists no READY deployment. "),
      link("/console/deployments", "See the deployments"),
    );
    return;
  }

  const bubble = (role, text) => {
    const body = h("span", { class: "text" }, text);
    const el = h("div", { class: `msg ${role}` }, h("span", { class: "role" }, role), body);
    transcript.append(el);
    transcript.scrollTop = transcript.scrollHeight;
    return { el, body };
  };

  const run = async () => {
    const content = input.value.trim();
    if (!content) return;
    problem.replaceChildren();
    input.value = "";
    bubble("user", content);
    turns.push({ role: "user", content });
    const { el, body } = bubble("assistant", "");
    el.classList.add("streaming");
    el.id = "chat-reply";
    transcript.querySelectorAll(".msg.assistant").forEach((m) => m !== el && m.removeAttribute("id"));
    const stats = h("div", { class: "stats", id: "chat-stats" }, "waiting for the first token…");
    el.append(stats);
    const messages = [...(system.value.trim() ? [{ role: "system", content: system.value.trim() }] : []), ...turns];
    controller = new AbortController();
    send.disabled = true;
    stop.disabled = false;
    const started = performance.now();
    let first = null;
    let chunks = 0;
    let text = "";
    let usage = null;
    let finish = null;
    try {
      const res = await openai("/chat/completions", key, {
        method: "POST",
        signal: controller.signal,
        body: {
          model: modelSel.value,
          messages,
          stream: true,
          stream_options: { include_usage: true },
          max_tokens: Number(maxTokens.value) || 128,
          temperature: Number(temperature.value),
          ...(seed.value.trim() ? { seed: Number(seed.value) } : {}),
        },
      });
      for await (const data of sseData(res)) {
        if (data === "[DONE]") break;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(500, chunk.error.message || JSON.stringify(chunk.error), chunk.error.code);
        const choice = (chunk.choices || [])[0];
        const delta = choice && choice.delta && choice.delta.content;
        if (choice && choice.finish_reason) finish = choice.finish_reason;
        if (chunk.usage) usage = chunk.usage;
        if (delta) {
          if (first === null) first = performance.now();
          chunks += 1;
          text += delta;
          body.textContent = text;
          el.dataset.chunks = String(chunks);
          stats.textContent = `${chunks} chunks · streaming…`;
          transcript.scrollTop = transcript.scrollHeight;
        }
      }
      turns.push({ role: "assistant", content: text });
    } catch (err) {
      if (err.name === "AbortError") {
        turns.push({ role: "assistant", content: text });
        finish = "stopped";
      } else {
        turns.pop();
        problem.replaceChildren(errorBox(err, { title: "The chat request failed" }));
      }
    } finally {
      el.classList.remove("streaming");
      el.dataset.done = "true";
      const secs = (performance.now() - started) / 1000;
      const ttft = first === null ? "" : ` · first token ${((first - started) / 1000).toFixed(2)} s`;
      const toks = usage ? ` · ${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion tokens (${fmtNum(usage.completion_tokens / Math.max(secs, 1e-3), 3)} tok/s)` : "";
      stats.textContent = `${chunks} chunks${ttft}${toks}${finish ? ` · ${finish}` : ""} · ${secs.toFixed(2)} s`;
      send.disabled = false;
      stop.disabled = true;
      controller = null;
    }
  };

  stop.addEventListener("click", () => controller && controller.abort());
  clearBtn.addEventListener("click", () => {
    turns.splice(0);
    transcript.replaceChildren();
    problem.replaceChildren();
  });
  input.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) {
      ev.preventDefault();
      run();
    }
  });
  const form = h("form", { class: "composer", onsubmit: (ev) => {
    ev.preventDefault();
    run();
  } }, input, h("div", { class: "settings" }, send, stop, clearBtn));

  ctx.view.replaceChildren(
    h("h1", {}, "Playground"),
    h("p", { class: "sub" }, `Streams through the gateway's /v1/chat/completions with ${usingKey}.`),
    h("div", { class: "playground" },
      h("div", { class: "panel settings" },
        h("label", { class: "field" }, "Model (deployment or deployment:adapter)", modelSel),
        h("label", { class: "field" }, "System prompt", system),
        h("label", { class: "field" }, "Max tokens", maxTokens),
        h("label", { class: "field" }, "Temperature", temperature),
        h("label", { class: "field" }, "Seed (optional)", seed)),
      h("div", { class: "panel" }, transcript, problem, form)),
  );
  input.focus();
}
