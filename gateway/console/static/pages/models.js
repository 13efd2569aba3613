// Models: the list, one model with its versions and their scores, one version with its lineage graph.

import { api } from "../lib/api.js";
import { h, badge, fmtBytes, fmtCount, fmtNum, fmtTime, link, props, resource, shortEnum, table } from "../lib/dom.js";
import { lineageGraph } from "../lib/graph.js";

function labels(map) {
  const entries = Object.entries(map || {});
  return entries.length ? entries.map(([k, v]) => h("span", { class: "badge" }, `${k}=${v}`)) : "";
}

function scoreText(score) {
  const bench = String(score.benchmark || "").replace(/^benchmarks\//, "");
  const err = score.stderr ? ` ±${fmtNum(score.stderr, 2)}` : "";
  return `${bench} ${score.metric} ${fmtNum(score.value)}${err}`;
}

function scoreList(scores) {
  if (!scores || !scores.length) return "";
  return h("div", {}, scores.slice(0, 4).map((sc) => h("div", { class: "mono" }, scoreText(sc))), scores.length > 4 ? h("div", { class: "sub" }, `+${scores.length - 4} more`) : "");
}

export async function list(ctx) {
  document.title = "Models · ModelYard console";
  const data = await api("/models", { signal: ctx.signal });
  const rows = data.models.map((m) => {
    const id = m.name.split("/")[1];
    return h("tr", { "data-name": m.name },
      h("td", {}, link(`/console/models/${id}`, id, { class: "mono" })),
      h("td", {}, m.description || ""),
      h("td", { class: "num" }, String(m.version_count || 0)),
      h("td", {}, labels(m.labels)),
      h("td", {}, fmtTime(m.update_time || m.create_time)));
  });
  ctx.view.replaceChildren(
    h("h1", {}, "Models"),
    h("p", { class: "sub" }, "Model families in the registry; open one for its versions, scores and lineage."),
    table(["Model", "Description", { text: "Versions", attrs: { class: "num" } }, "Labels", "Updated"], rows, { empty: "No models yet: import one with `yard models import`." }),
    data.next_page_token ? h("p", { class: "sub" }, `Showing the first ${rows.length} models.`) : "",
  );
}

export async function detail(ctx, model) {
  document.title = `${model} · Models · ModelYard console`;
  const data = await api(`/models/${encodeURIComponent(model)}`, { signal: ctx.signal });
  const rows = data.versions.map((v) => {
    const vid = v.name.split("/")[3];
    return h("tr", { "data-name": v.name },
      h("td", {}, link(`/console/models/${model}/versions/${vid}`, vid, { class: "mono" })),
      h("td", {}, h("span", { class: "badge kind" }, shortEnum(v.kind).toLowerCase())),
      h("td", {}, badge(v.state)),
      h("td", {}, shortEnum(v.format).toLowerCase()),
      h("td", { class: "num" }, fmtBytes(v.metadata?.total_size_bytes)),
      h("td", { class: "num" }, fmtCount(v.metadata?.parameter_count)),
      h("td", {}, v.lineage?.base_model_version ? resource(v.lineage.base_model_version) : ""),
      h("td", {}, (v.deployed_by || []).map((d) => h("div", {}, resource(d)))),
      h("td", {}, scoreList(v.scores)),
      h("td", {}, fmtTime(v.create_time)));
  });
  ctx.view.replaceChildren(
    h("p", { class: "sub" }, link("/console/models", "Models"), " / ", model),
    h("h1", {}, model),
    h("p", { class: "sub" }, data.model.description || ""),
    h("h2", {}, "Versions"),
    table(["Version", "Kind", "State", "Format", { text: "Size", attrs: { class: "num" } }, { text: "Parameters", attrs: { class: "num" } }, "Base", "Deployed by", "Scores", "Created"], rows, { empty: "No versions." }),
  );
}

export async function version(ctx, model, vid) {
  document.title = `${model}/${vid} · Models · ModelYard console`;
  const data = await api(`/models/${encodeURIComponent(model)}/versions/${encodeURIComponent(vid)}`, { signal: ctx.signal });
  const v = data.version;
  const lin = v.lineage || {};
  const meta = v.metadata || {};
  const params = lin.parameters && Object.keys(lin.parameters).length ? h("code", {}, JSON.stringify(lin.parameters)) : "";
  const scores = (v.scores || []).map((sc) =>
    h("tr", {},
      h("td", {}, resource(sc.evaluation)),
      h("td", { class: "mono" }, String(sc.benchmark || "").replace(/^benchmarks\//, "")),
      h("td", {}, sc.metric),
      h("td", { class: "num" }, fmtNum(sc.value)),
      h("td", { class: "num" }, sc.stderr ? `±${fmtNum(sc.stderr, 3)}` : ""),
      h("td", { class: "num" }, String(sc.num_samples || "")),
      h("td", {}, fmtTime(sc.create_time))));
  const files = (v.files || []).map((f) => h("tr", {}, h("td", { class: "mono" }, f.path), h("td", { class: "num" }, fmtBytes(f.size_bytes)), h("td", { class: "mono" }, String(f.sha256 || "").slice(0, 16))));
  ctx.view.replaceChildren(
    h("p", { class: "sub" }, link("/console/models", "Models"), " / ", link(`/console/models/${model}`, model), " / ", vid),
    h("h1", {}, `${model}/${vid} `, badge(v.state)),
    h("div", { class: "grid" },
      h("div", { class: "panel" }, h("h3", {}, "Version"), props([
        ["Kind", shortEnum(v.kind).toLowerCase()],
        ["Format", shortEnum(v.format).toLowerCase()],
        ["Description", v.description],
        ["Created", fmtTime(v.create_time)],
        ["Deployed by", (v.deployed_by || []).map((d) => h("div", {}, resource(d)))],
        ["Architecture", meta.architecture],
        ["Parameters", meta.parameter_count ? fmtCount(meta.parameter_count) : ""],
        ["Size", fmtBytes(meta.total_size_bytes)],
        ["Context length", meta.context_length ? String(meta.context_length) : ""],
        ["dtype", meta.dtype],
      ])),
      h("div", { class: "panel" }, h("h3", {}, "Made from"), props([
        ["Base model", resource(lin.base_model_version)],
        ["Datasets", (lin.dataset_versions || []).map((d) => h("div", {}, resource(d)))],
        ["Job", resource(lin.job)],
        ["Source", lin.source_uri],
        ["Parameters", params],
      ]))),
    h("h2", {}, "Lineage"),
    h("div", { id: "lineage" }, lineageGraph(data.lineage, ctx.navigate)),
    h("h2", {}, "Scores"),
    table(["Evaluation", "Benchmark", "Metric", { text: "Value", attrs: { class: "num" } }, { text: "Stderr", attrs: { class: "num" } }, { text: "Samples", attrs: { class: "num" } }, "Recorded"], scores, { empty: "No evaluation scores recorded on this version." }),
    h("h2", {}, "Files"),
    table(["Path", { text: "Size", attrs: { class: "num" } }, "sha256"], files, { empty: "No files." }),
  );
}
