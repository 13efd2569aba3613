// Evaluations: the list (pick two or more to compare) and the comparison side by side: each metric of
// each evaluation, paired deltas against the first with their 95% intervals, and the samples whose score
// changed (the evaluation service's CompareEvaluations).

import { api, qs } from "../lib/api.js";
import { h, badge, fmtNum, fmtTime, link, notice, resource, table } from "../lib/dom.js";

const short = (name) => String(name || "").replace(/^evaluations\//, "");
const bench = (name) => String(name || "").replace(/^benchmarks\//, "");

function primary(ev) {
  const parts = [];
  for (const r of ev.outputs?.results || []) {
    const [metric, value] = Object.entries(r.metrics || {})[0] || [];
    if (metric) parts.push(`${bench(r.benchmark)} ${metric} ${fmtNum(value)}`);
  }
  return parts.join("; ");
}

export async function list(ctx) {
  document.title = "Evaluations · ModelYard console";
  const data = await api("/evaluations", { signal: ctx.signal });
  const chosen = new Set();
  const button = h("button", { type: "button", id: "compare-selected", disabled: true }, "Compare selected");
  const hint = h("span", { class: "sub" }, "Pick two or more evaluations to compare them side by side.");
  const update = () => {
    button.disabled = chosen.size < 2;
    button.textContent = chosen.size >= 2 ? `Compare ${chosen.size} evaluations` : "Compare selected";
  };
  button.addEventListener("click", () => {
    const names = data.evaluations.map((e) => short(e.name)).filter((n) => chosen.has(n));
    ctx.navigate(`/console/evaluations/compare${qs({ names: names.join(",") })}`);
  });
  const rows = data.evaluations.map((ev) => {
    const id = short(ev.name);
    const box = h("input", { type: "checkbox", "aria-label": `select ${id}`, "data-evaluation": id, onchange: (e) => {
      if (e.target.checked) chosen.add(id);
      else chosen.delete(id);
      update();
    } });
    const sm = ev.summary;
    return h("tr", { "data-name": ev.name },
      h("td", {}, box),
      h("td", {}, link(`/console/jobs/evaluations/${id}`, id, { class: "mono" }), ev.display_name ? h("div", { class: "sub" }, ev.display_name) : ""),
      h("td", {}, badge(sm.state)),
      h("td", {}, sm.detail),
      h("td", {}, primary(ev)),
      h("td", {}, fmtTime(ev.create_time)));
  });
  ctx.view.replaceChildren(
    h("h1", {}, "Evaluations"),
    h("div", { class: "toolbar" }, button, hint),
    table(["", "Evaluation", "State", "What", "Scores", "Created"], rows, { empty: "No evaluations yet: run one with `yard eval run`." }),
  );
}

export async function compare(ctx) {
  document.title = "Compare evaluations · ModelYard console";
  const names = (ctx.query.get("names") || "").split(",").map((n) => n.trim()).filter(Boolean);
  const data = await api(`/evaluations/compare${qs({ names })}`, { signal: ctx.signal });
  const cmp = data.comparison;
  const evs = cmp.evaluations || [];
  const byName = new Map(data.evaluations.map((e) => [e.name, e]));
  const head = [
    "Benchmark",
    "Metric",
    ...evs.map((name, i) => ({
      text: h("div", {},
        link(`/console/jobs/evaluations/${short(name)}`, short(name), { class: "mono" }),
        byName.get(name)?.display_name ? h("div", {}, byName.get(name).display_name) : "",
        h("div", { class: "sub" }, byName.get(name)?.detail || ""),
        i === 0 ? h("div", { class: "sub" }, "baseline") : ""),
      attrs: { class: "num" },
    })),
  ];
  const rows = (cmp.rows || []).map((row) => {
    const deltas = new Map((row.deltas || []).map((d) => [d.evaluation, d]));
    const cells = evs.map((name, i) => {
      const v = (row.values || [])[i] || {};
      const value = v.value === undefined ? "—" : fmtNum(v.value);
      const err = v.stderr ? ` ±${fmtNum(v.stderr, 2)}` : "";
      const d = deltas.get(name);
      const delta = i > 0 && d ? h("div", { class: "sub" }, `Δ ${d.delta >= 0 ? "+" : ""}${fmtNum(d.delta)} [${fmtNum(d.ci_low)}, ${fmtNum(d.ci_high)}] n=${d.paired_samples}`) : "";
      return h("td", { class: "num", "data-evaluation": short(name) }, `${value}${err}`, delta);
    });
    return h("tr", { "data-benchmark": bench(row.benchmark), "data-metric": row.metric }, h("td", { class: "mono" }, bench(row.benchmark)), h("td", {}, row.metric), cells);
  });
  const changed = (cmp.changed_samples || []).map((c) =>
    h("tr", {},
      h("td", { class: "mono" }, bench(c.benchmark)),
      h("td", { class: "mono" }, c.doc_id),
      h("td", {}, resource(c.evaluation, short(c.evaluation))),
      h("td", { class: "num" }, `${fmtNum(c.baseline_score)} → ${fmtNum(c.score)}`),
      h("td", {}, c.baseline_prediction),
      h("td", {}, c.prediction),
      h("td", {}, c.reference)));
  ctx.view.replaceChildren(
    h("p", { class: "sub" }, link("/console/evaluations", "Evaluations"), " / compare"),
    h("h1", {}, `Comparing ${evs.length} evaluations`),
    notice("Deltas are paired over the samples both evaluations scored, against the first evaluation, with 95% intervals."),
    h("div", { id: "comparison" }, table(head, rows, { empty: "These evaluations share no benchmark." })),
    h("h2", {}, "Changed samples"),
    table(["Benchmark", "Sample", "Evaluation", { text: "Score", attrs: { class: "num" } }, "Baseline prediction", "Prediction", "Reference"], changed, { empty: "No sample changed its score." }),
  );
}
