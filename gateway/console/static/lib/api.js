// Calls of the console API (/console/api, the session cookie) and of the gateway's OpenAI API (/v1, a
// bearer key). Every failure is an ApiError carrying the HTTP status and the server's message: the
// pages show it; nothing fails silently.

export class ApiError extends Error {
  constructor(status, message, code = null, body = null) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.body = body;
  }
}

async function readError(res) {
  const text = await res.text().catch(() => "");
  let body = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch {
    body = null;
  }
  const err = body && body.error;
  const message = err && err.message ? err.message : `${res.status} ${res.statusText || ""}: ${text.slice(0, 300) || "no response body"}`;
  return new ApiError(res.status, message, (err && err.code) || null, body);
}

function networkError(e, what) {
  return new ApiError(0, `Could not reach ${what}: ${e && e.message ? e.message : e}. Is the gateway running?`, "network_error");
}

/** GET/POST/DELETE /console/api{path}; the parsed JSON. */
export async function api(path, { method = "GET", body = undefined, signal = undefined } = {}) {
  let res;
  try {
    res = await fetch(`/console/api${path}`, {
      method,
      signal,
      credentials: "same-origin",
      cache: "no-store",
      headers: body === undefined ? { accept: "application/json" } : { accept: "application/json", "content-type": "application/json" },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (e) {
    if (e && e.name === "AbortError") throw e;
    throw networkError(e, "the gateway");
  }
  if (!res.ok) {
    const err = await readError(res);
    if (res.status === 401 && path !== "/session") {
      document.dispatchEvent(new CustomEvent("console:session-ended", { detail: err }));
    }
    throw err;
  }
  const text = await res.text();
  try {
    return text ? JSON.parse(text) : null;
  } catch {
    throw new ApiError(res.status, `The gateway answered with something that is not JSON: ${text.slice(0, 200)}`);
  }
}

/** A call of the gateway's OpenAI API with a bearer key (the Response, checked). */
export async function openai(path, key, { method = "GET", body = undefined, signal = undefined } = {}) {
  let res;
  try {
    res = await fetch(`/v1${path}`, {
      method,
      signal,
      cache: "no-store",
      credentials: "omit",
      headers: {
        authorization: `Bearer ${key}`,
        ...(body === undefined ? {} : { "content-type": "application/json" }),
      },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (e) {
    if (e && e.name === "AbortError") throw e;
    throw networkError(e, "the gateway's /v1 API");
  }
  if (!res.ok) throw await readError(res);
  return res;
}

/** The data: payloads of a text/event-stream Response, as they arrive. */
export async function* sseData(res) {
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value.replace(/\r\n/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = block
          .split("\n")
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, ""))
          .join("\n");
        if (data) yield data;
      }
    }
  } finally {
    reader.releaseLock();
  }
}

export function qs(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v === undefined || v === null || v === "") continue;
    if (Array.isArray(v)) v.forEach((x) => q.append(k, x));
    else q.set(k, v);
  }
  const text = q.toString();
  return text ? `?${text}` : "";
}
