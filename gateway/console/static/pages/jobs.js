// Jobs of every service (training, quantization, evaluation, registry imports, pipeline runs): the list,
// and one job live: its events arrive over SSE (/console/api/jobs/.../events) and draw the loss and
// progress charts as they come.

import { api, qs } from "../lib/api.js";
import { LineChart } from "../lib/chart.js";
import {
  h, badge, durationSeconds, errorBox, fmtBytes, fmtDuration, fmtNum, fmtTime, link, notice, progressBar, props,
  resource, shortEnum, table,
} from "../lib/dom.js";

const KINDS = [
  ["", "All"],
  ["training", "Training"],
  ["quantization", "Quantization"],
  ["evaluation", "Evaluations"],
  ["import", "Imports"],
  ["pipeline", "Pipeline runs"],
];
const LOSS = /(^|\.)(loss|eval_loss|train_loss)$/;
const PROGRESS = /(^|\.)progress_fraction$/;
const MAX_LOG_LINES = 400;

export function serviceErrors(errors) {
  return (errors || []).map((e) =>
    h("div", { class: "error", role: "alert", "data-service": e.service },
      h("strong", {}, `${e.service} service: ${e.status === 503 ? "unavailable" : `error ${e.status}`}`),
      h("div", { class: "detail" }, e.message)));
}

export async function list(ctx) {
  document.title = "Jobs · ModelYard console";
  const kind = ctx.query.get("kind") || "";
  const state = ctx.query.get("state") || "";
  const chips = h("div", { class: "chips" }, KINDS.map(([k, label]) =>
    link(`/console/jobs${qs({ kind: k, state })}`, label, { class: k === kind ? "active" : "" })));
  const body = h("div", {}, h("p", { class: "loading" }, "Loading…"));
  const stamp = h("span", { class: "live" });
  ctx.view.replaceChildren(h("h1", {}, "Jobs"), h("p", { class: "sub" }, "Training, quantization, evaluation, import and pipeline jobs, newest first. ", stamp), chips, body);

  const load = async () => {
    const data = await api(`/jobs${qs({ kind, state })}`, { signal: ctx.signal });
    const rows = data.jobs.map((j) => {
      const [collection, id] = j.name.split("/");
      return h("tr", { "data-name": j.name, "data-kind": j.kind },
        h("td", {}, h("span", { class: "badge kind" }, j.kind)),
        h("td", {}, link(`/console/jobs/${collection}/${id}`, id, { class: "mono" }), j.display_name ? h("div", { class: "sub" }, j.display_name) : ""),
        h("td", {}, badge(j.state)),
        h("td", {}, progressBar(j.fraction), " ", j.fraction ? `${Math.round(j.fraction * 100)}%` : ""),
        h("td", {}, j.detail, j.error ? h("div", { class: "error detail" }, j.error) : ""),
        h("td", {}, resource(j.output)),
        h("td", {}, fmtTime(j.create_time)));
    });
    body.replaceChildren(
      ...serviceErrors(data.errors),
      table(["Kind", "Job", "State", "Progress", "What", "Output", "Created"], rows, { empty: "No jobs." }),
    );
    stamp.textContent = `Refreshed ${fmtTime(new Date().toISOString()).slice(11)}.`;
  };
  await load();
  const problem = h("div");
  body.before(problem);
  const timer = setInterval(() => {
    load().then(
      () => problem.replaceChildren(),
      (err) => {
        if (err.name !== "AbortError" && ctx.alive()) problem.replaceChildren(errorBox(err, { title: "Refreshing failed" }));
      },
    );
  }, 5000);
  ctx.onCleanup(() => clearInterval(timer));
}

// ---------------------------------------------------------------------------- one job

function kindPanel(kind, job, live) {
  if (kind === "training") {
    const spec = job.spec || {};
    const out = job.outputs || {};
    const hp = Object.entries(spec.hyperparameters || {}).filter(([, v]) => v !== "" && v !== null && !(Array.isArray(v) && !v.length));
    return h("div", { class: "grid" },
      h("div", { class: "panel" }, h("h3", {}, "Spec"), props([
        ["Method", shortEnum(spec.method).toLowerCase()],
        ["Base model", resource(spec.base_model_version)],
        ["Datasets", (spec.dataset_versions || []).map((d) => h("div", {}, resource(d)))],
        ["Output model", spec.output_model],
        ["Hyperparameters", hp.length ? h("code", {}, hp.map(([k, v]) => `${k}=${typeof v === "object" ? JSON.stringify(v) : v}`).join("  ")) : ""],
      ])),
      h("div", { class: "panel" }, h("h3", {}, "Outputs"), props([
        ["Model version", resource(out.model_version)],
        ["Merged version", resource(out.merged_model_version)],
        ["Checkpoints", out.checkpoint_count ? String(out.checkpoint_count) : ""],
        ["Final metrics", Object.keys(out.final_metrics || {}).length ? h("code", {}, Object.entries(out.final_metrics).map(([k, v]) => `${k}=${fmtNum(v)}`).join("  ")) : ""],
        ["Evaluation", resource(out.evaluation)],
        ["Base evaluation", resource(out.base_evaluation)],
      ])));
  }
  if (kind === "quantization") {
    const spec = job.spec || {};
    const out = job.outputs || {};
    const q = out.quality || {};
    return h("div", { class: "grid" },
      h("div", { class: "panel" }, h("h3", {}, "Spec"), props([
        ["Method", shortEnum(spec.method).toLowerCase()],
        ["Source", resource(spec.source_model_version)],
        ["Bits", spec.bits ? String(spec.bits) : ""],
        ["Group size", spec.group_size ? String(spec.group_size) : ""],
      ])),
      h("div", { class: "panel" }, h("h3", {}, "Outputs"), props([
        ["Model version", resource(out.model_version)],
        ["Size", out.size_bytes ? `${fmtBytes(out.size_bytes)} (source ${fmtBytes(out.source_size_bytes)})` : ""],
        ["Quality", Object.keys(q).length ? h("code", {}, Object.entries(q).map(([k, v]) => `${k}=${fmtNum(v)}`).join("  ")) : ""],
        ["Format", out.format],
      ])));
  }
  if (kind === "evaluation") {
    const spec = job.spec || {};
    const results = (job.outputs?.results || []).map((r) =>
      h("tr", {},
        h("td", { class: "mono" }, String(r.benchmark).replace(/^benchmarks\//, "")),
        h("td", {}, Object.entries(r.metrics || {}).map(([k, v]) => h("div", {}, `${k} ${fmtNum(v)}${r.stderr && r.stderr[k] ? ` ±${fmtNum(r.stderr[k], 2)}` : ""}`))),
        h("td", { class: "num" }, String(r.num_samples || "")),
        h("td", { class: "num" }, fmtDuration(durationSeconds(r.duration))),
        h("td", {}, r.error ? r.error.message : "")));
    const target = spec.model_version || spec.deployment || (spec.endpoint ? `${spec.endpoint.base_url} (${spec.endpoint.model})` : "");
    return h("div", {},
      h("div", { class: "panel" }, h("h3", {}, "Spec"), props([
        ["Target", resource(target)],
        ["Adapter", spec.adapter],
        ["Benchmarks", (spec.benchmarks || []).map((b) => String(b.benchmark).replace(/^benchmarks\//, "")).join(", ")],
        ["Limit", spec.limit ? String(spec.limit) : ""],
      ])),
      h("h2", {}, "Results"),
      table(["Benchmark", "Metrics", { text: "Samples", attrs: { class: "num" } }, { text: "Time", attrs: { class: "num" } }, "Error"], results, { empty: "No results yet." }));
  }
  if (kind === "import") {
    return h("div", { class: "panel" }, h("h3", {}, "Import"), props([
      ["Source", job.source_uri],
      ["Stage", job.stage],
      ["Model version", resource(job.model_version)],
    ]));
  }
  if (kind === "pipeline") return pipelinePanel(job, live);
  return "";
}

/** "+0.25" / "-0.1" / "0" */
function fmtSigned(x, digits = 4) {
  const n = Number(x);
  if (x === null || x === undefined || Number.isNaN(n)) return "";
  return n > 0 ? `+${fmtNum(n, digits)}` : fmtNum(n, digits);
}

function stepWallTime(st) {
  if (!st.start_time) return "";
  const end = st.end_time ? Date.parse(st.end_time) : Date.now();
  return fmtDuration(Math.max(0, (end - Date.parse(st.start_time)) / 1000));
}

/** The progress cell of a step (data-fraction: what it shows). */
function stepProgress(fraction) {
  const f = Math.max(0, Math.min(1, Number(fraction) || 0));
  return h("td", { class: "step-progress", "data-fraction": String(f) }, progressBar(f), " ", f ? `${Math.round(f * 100)}%` : "");
}

// A pipeline run: its steps (state, progress, the job or resource each created, outputs, wall time) and the
// report of its eval step (a row per evaluated version, the deltas against the first, the step times).
// `live` is the running step's fraction as the run's progress events say it ({index, fraction}): the
// service stores a step's own fraction only when the step changes state.
function pipelinePanel(run, live) {
  const steps = (run.steps || []).map((st, i) => {
    const state = shortEnum(st.state);
    const fraction = state === "RUNNING" && live && live.index === i ? Math.max(Number(st.fraction) || 0, live.fraction) : st.fraction;
    return h("tr", { "data-step": st.id, "data-state": state },
      h("td", { class: "mono" }, st.id),
      h("td", {}, st.type),
      h("td", {}, badge(st.state), st.attempt_count > 1 ? h("span", { class: "sub" }, ` attempt ${st.attempt_count}`) : ""),
      stepProgress(fraction),
      h("td", {}, resource(st.resource)),
      h("td", {}, Object.entries(st.outputs || {}).sort().map(([k, v]) =>
        h("div", {}, `${k}: `, String(v).split(",").map((one, j) => [j ? ", " : "", resource(one.trim())])))),
      h("td", { class: "num" }, stepWallTime(st)),
      h("td", {}, st.error ? h("div", { class: "error detail" }, st.error.message) : ""));
  });
  const report = run.outputs?.report || {};
  const rows = (report.rows || []).map((r) =>
    h("tr", { "data-label": r.label },
      h("td", {}, h("strong", {}, r.label)),
      h("td", {}, resource(r.model_version)),
      h("td", {}, resource(r.evaluation)),
      h("td", { class: "num score" }, `${fmtNum(r.score)}${typeof r.score_ci95 === "number" ? ` ±${fmtNum(r.score_ci95, 2)}` : ""}`),
      h("td", { class: "num" }, String(r.num_samples || "")),
      h("td", { class: "num size" }, r.size_bytes ? fmtBytes(r.size_bytes) : ""),
      h("td", { class: "num decode" }, r.decode_tokens_per_second ? Number(r.decode_tokens_per_second).toFixed(1) : "")));
  const deltas = (report.deltas || []).map((d) =>
    h("tr", { "data-label": d.label },
      h("td", {}, h("strong", {}, d.label)),
      h("td", {}, d.baseline),
      h("td", { class: "num delta" }, fmtSigned(d.delta)),
      h("td", { class: "num interval" }, `[${fmtSigned(d.ci95_low, 3)}, ${fmtSigned(d.ci95_high, 3)}]`),
      h("td", {}, d.ci95_low > 0 || d.ci95_high < 0 ? "excludes zero" : "includes zero")));
  const times = (report.step_times || []).map((t) =>
    h("tr", { "data-step": t.step }, h("td", { class: "mono" }, t.step), h("td", { class: "num" }, fmtDuration(durationSeconds(t.duration)))));
  const num = (text) => ({ text, attrs: { class: "num" } });
  const benchmark = report.benchmark ? String(report.benchmark).replace(/^benchmarks\//, "") : "";
  return h("div", {},
    h("h2", {}, "Steps"),
    h("div", { id: "pipeline-steps" },
      table(["Step", "Type", "State", "Progress", "Resource", "Outputs", num("Wall time"), "Error"], steps, { empty: "No steps." })),
    h("h2", { id: "report-title" }, "Report", benchmark ? ` · ${benchmark} (${report.metric || "score"})` : ""),
    h("div", { id: "report-notes" }, (report.notes || []).map((n) => notice(n, /loses/.test(n) ? "warn" : "notice"))),
    h("div", { id: "pipeline-report" },
      table(["Label", "Model version", "Evaluation", num(`${report.metric || "Score"} ±95%`), num("Samples"), num("Size"), num("Decode tok/s")], rows,
        { empty: "No report yet (filled when the eval step ends)." })),
    deltas.length
      ? h("div", {}, h("h2", {}, "Against the baseline"),
        h("div", { id: "pipeline-deltas" }, table(["Label", "Baseline", num("Δ"), num("95% interval"), "Paired difference"], deltas)))
      : "",
    times.length ? h("div", {}, h("h2", {}, "Step times"), h("div", { id: "pipeline-times" }, table(["Step", num("Wall time")], times))) : "");
}

export async function detail(ctx, collection, id) {
  document.title = `${id} · Jobs · ModelYard console`;
  const path = `/jobs/${encodeURIComponent(collection)}/${encodeURIComponent(id)}`;
  let data = await api(path, { signal: ctx.signal });
  const kind = data.kind;

  const header = h("div");
  const panel = h("div");
  const live = h("span", { class: "live", id: "live-status" }, "connecting…");
  const streamError = h("div");
  const bar = h("div");
  const lossChart = new LineChart({ title: "Loss", xLabel: "step", yLabel: "loss", name: "loss" });
  const progressChart = new LineChart({ title: "Progress", xLabel: "seconds since start", yLabel: "fraction done", yMin: 0, yMax: 1, name: "progress" });
  const latest = h("div", { class: "panel" }, h("h3", {}, "Latest metrics"), h("div", { class: "empty" }, "No metrics yet."));
  const logBox = h("div", { class: "log", id: "job-log" });
  const metrics = new Map();
  let t0 = null;
  let liveStep = null; // a pipeline run's running step: {index, fraction}, from the run's progress events

  const drawHeader = () => {
    const sm = data.summary;
    const job = data.job;
    header.replaceChildren(
      h("p", { class: "sub" }, link("/console/jobs", "Jobs"), " / ", collection, " / ", id),
      h("h1", {}, `${id} `, h("span", { id: "job-state" }, badge(sm.state)), " ", live),
      h("p", { class: "sub" }, h("span", { class: "badge kind" }, kind), " ", sm.display_name || "", sm.detail ? ` · ${sm.detail}` : ""),
      sm.error ? errorBox({ message: sm.error }, { title: "The job failed" }) : "",
      props([
        ["Created", fmtTime(sm.create_time)],
        ["Started", fmtTime(sm.start_time)],
        ["Ended", fmtTime(sm.end_time)],
        ["Attempts", job.attempt_count ? String(job.attempt_count) : ""],
        ["Step", sm.total_steps ? `${sm.step} / ${sm.total_steps}` : sm.step ? String(sm.step) : ""],
      ]),
    );
    bar.replaceChildren(progressBar(sm.fraction, true));
    panel.replaceChildren(kindPanel(kind, job, liveStep));
    t0 = t0 ?? (sm.start_time ? Date.parse(sm.start_time) : null);
  };
  drawHeader();

  ctx.view.replaceChildren(
    header, bar, streamError,
    h("div", { class: "grid", id: "charts" }, lossChart.el, progressChart.el),
    latest,
    panel,
    h("h2", {}, "Events"),
    logBox,
  );

  let refreshTimer = null;
  const refresh = (delay = 300) => {
    clearTimeout(refreshTimer);
    refreshTimer = setTimeout(async () => {
      try {
        data = await api(path, { signal: ctx.signal });
        if (ctx.alive()) drawHeader();
      } catch (err) {
        if (err.name !== "AbortError" && ctx.alive()) streamError.replaceChildren(errorBox(err));
      }
    }, delay);
  };
  ctx.onCleanup(() => clearTimeout(refreshTimer));

  const logLine = (text, cls = "") => {
    const stick = logBox.scrollTop + logBox.clientHeight >= logBox.scrollHeight - 4;
    logBox.append(h("div", { class: cls }, text));
    while (logBox.childElementCount > MAX_LOG_LINES) logBox.firstElementChild.remove();
    if (stick) logBox.scrollTop = logBox.scrollHeight;
  };

  const drawLatest = () => {
    const rows = [...metrics.entries()].sort().map(([k, [step, v]]) => h("tr", {}, h("td", { class: "mono" }, k), h("td", { class: "num" }, fmtNum(v)), h("td", { class: "num" }, String(step))));
    latest.replaceChildren(h("h3", {}, "Latest metrics"), table(["Metric", { text: "Value", attrs: { class: "num" } }, { text: "Step", attrs: { class: "num" } }], rows));
  };
  let latestPending = false;

  // A run's progress is (steps done + the running step's fraction) / steps, at step = steps done: the running
  // step's own fraction, shown in its row as it moves.
  const pipelineProgress = ({ step, values }) => {
    const total = Number(values.total_steps);
    if (!("progress_fraction" in values) || !total) return;
    const index = Number(step) || 0;
    const fraction = Math.max(0, Math.min(1, values.progress_fraction * total - index));
    liveStep = { index, fraction };
    const st = (data.job.steps || [])[index];
    if (!st || shortEnum(st.state) !== "RUNNING") return;
    const row = panel.querySelector(`#pipeline-steps tr[data-step="${CSS.escape(st.id)}"]`);
    const cell = row?.querySelector("td.step-progress");
    if (cell && fraction > Number(cell.dataset.fraction)) cell.replaceWith(stepProgress(fraction));
  };

  const onEvent = (ev) => {
    const when = ev.time ? Date.parse(ev.time) : Date.now();
    if (ev.metrics) {
      const { step, values } = ev.metrics;
      for (const [key, value] of Object.entries(values)) {
        if (value === null) continue;
        metrics.set(key, [step, value]);
        if (LOSS.test(key)) lossChart.add(key, Number(step), value);
        if (PROGRESS.test(key)) {
          if (t0 === null) t0 = when;
          progressChart.add(key === "progress_fraction" ? "progress" : key.replace(/\.progress_fraction$/, ""), (when - t0) / 1000, value);
          if (key === "progress_fraction") bar.replaceChildren(progressBar(value, true));
        }
      }
      if (kind === "pipeline") pipelineProgress(ev.metrics);
      if (!latestPending) {
        latestPending = true;
        setTimeout(() => {
          latestPending = false;
          if (ctx.alive()) drawLatest();
        }, 250);
      }
    } else if (ev.state_change) {
      const sc = ev.state_change;
      if (sc.state === "RUNNING" && t0 === null) t0 = when;
      logLine(`${fmtTime(ev.time)}  state ${sc.previous} → ${sc.state}${sc.error ? `: ${sc.error}` : ""}`, "state");
      document.getElementById("job-state")?.replaceChildren(badge(sc.state));
      refresh();
    } else if (ev.log !== undefined) {
      logLine(`${fmtTime(ev.time)}  ${ev.log}`, /warn|error/i.test(ev.log) ? "warn-line" : "");
      if (kind === "pipeline") refresh(1000);
    }
  };

  const source = new EventSource(`/console/api${path}/events`);
  ctx.onCleanup(() => source.close());
  source.onopen = () => {
    live.textContent = "live";
    live.classList.add("on");
  };
  source.onmessage = (m) => {
    try {
      onEvent(JSON.parse(m.data));
    } catch (err) {
      console.error(err);
    }
  };
  source.addEventListener("end", (m) => {
    source.close();
    live.classList.remove("on");
    live.textContent = `finished (${JSON.parse(m.data).state})`;
    refresh(0);
  });
  source.addEventListener("problem", (m) => {
    source.close();
    live.classList.remove("on");
    live.textContent = "stream stopped";
    let message = m.data;
    try {
      message = JSON.parse(m.data).error.message;
    } catch {
      /* the raw text */
    }
    streamError.replaceChildren(errorBox({ message, status: null }, { title: "The live event stream stopped", retry: () => ctx.navigate(location.pathname) }));
  });
  source.onerror = () => {
    live.classList.remove("on");
    if (source.readyState === EventSource.CLOSED) {
      live.textContent = "stream closed";
      streamError.replaceChildren(errorBox({ message: "The gateway closed the event stream (signed out, or the gateway stopped)." }, { title: "The live event stream stopped", retry: () => ctx.navigate(location.pathname) }));
    } else {
      live.textContent = "reconnecting…";
    }
  };
}
