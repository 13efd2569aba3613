// Datasets: the list, one dataset's versions, one version with its validation report.

import { api, qs } from "../lib/api.js";
import { h, fmtBytes, fmtNum, fmtTime, link, notice, props, table } from "../lib/dom.js";
import { lineageGraph } from "../lib/graph.js";

export async function list(ctx) {
  document.title = "Datasets · ModelYard console";
  const data = await api("/datasets", { signal: ctx.signal });
  const rows = data.datasets.map((d) => {
    const id = d.name.split("/")[1];
    return h("tr", { "data-name": d.name },
      h("td", {}, link(`/console/datasets/${id}`, id, { class: "mono" })),
      h("td", {}, d.description || ""),
      h("td", { class: "num" }, String(d.version_count || 0)),
      h("td", {}, fmtTime(d.create_time)));
  });
  ctx.view.replaceChildren(
    h("h1", {}, "Datasets"),
    h("p", { class: "sub" }, "Datasets in the registry; open a version for its validation report."),
    table(["Dataset", "Description", { text: "Versions", attrs: { class: "num" } }, "Created"], rows, { empty: "No datasets yet: upload one with `yard datasets upload`." }),
  );
}

export async function detail(ctx, dataset) {
  document.title = `${dataset} · Datasets · ModelYard console`;
  const data = await api(`/datasets/${encodeURIComponent(dataset)}`, { signal: ctx.signal });
  const rows = data.versions.map((v) => {
    const vid = v.name.split("/")[3];
    return h("tr", { "data-name": v.name },
      h("td", {}, link(`/console/datasets/${dataset}/versions/${vid}`, vid, { class: "mono" })),
      h("td", { class: "mono" }, v.filename),
      h("td", {}, v.format),
      h("td", { class: "num" }, fmtNum(v.row_count)),
      h("td", { class: "num" }, fmtNum(v.invalid_row_count)),
      h("td", { class: "num" }, fmtBytes(v.size_bytes)),
      h("td", {}, fmtTime(v.create_time)));
  });
  ctx.view.replaceChildren(
    h("p", { class: "sub" }, link("/console/datasets", "Datasets"), " / ", dataset),
    h("h1", {}, dataset),
    h("p", { class: "sub" }, data.dataset.description || ""),
    h("h2", {}, "Versions"),
    table(["Version", "File", "Format", { text: "Rows", attrs: { class: "num" } }, { text: "Invalid rows", attrs: { class: "num" } }, { text: "Size", attrs: { class: "num" } }, "Created"], rows, { empty: "No versions." }),
  );
}

export async function version(ctx, dataset, vid) {
  document.title = `${dataset}/${vid} · Datasets · ModelYard console`;
  const modelVersion = ctx.query.get("model_version") || "";
  const maxLength = ctx.query.get("max_length") || "";
  const data = await api(`/datasets/${encodeURIComponent(dataset)}/versions/${encodeURIComponent(vid)}${qs({ model_version: modelVersion, max_length: maxLength })}`, { signal: ctx.signal });
  const v = data.version;
  const report = data.validation;
  const stats = report.token_stats;
  const errors = (report.errors || []).slice(0, 500).map((e) => h("tr", {}, h("td", { class: "num" }, String(e.row)), h("td", { class: "mono" }, e.field), h("td", {}, e.reason)));
  const mv = h("input", { name: "model_version", value: modelVersion, placeholder: "models/NAME/versions/V", size: 34 });
  const ml = h("input", { name: "max_length", value: maxLength, type: "number", min: 0, placeholder: "0" });
  const form = h("form", {
    class: "toolbar",
    onsubmit: (ev) => {
      ev.preventDefault();
      ctx.navigate(`/console/datasets/${dataset}/versions/${vid}${qs({ model_version: mv.value.trim(), max_length: ml.value.trim() })}`);
    },
  },
    h("label", { class: "field" }, "Tokenizer of model version", mv),
    h("label", { class: "field" }, "Max length (tokens)", ml),
    h("button", { type: "submit" }, "Measure tokens"));
  const valid = Number(report.valid_row_count || 0);
  const total = Number(report.row_count || 0);
  ctx.view.replaceChildren(
    h("p", { class: "sub" }, link("/console/datasets", "Datasets"), " / ", link(`/console/datasets/${dataset}`, dataset), " / ", vid),
    h("h1", {}, `${dataset}/${vid}`),
    h("div", { class: "grid" },
      h("div", { class: "panel" }, h("h3", {}, "Version"), props([
        ["File", v.filename],
        ["Format", v.format],
        ["Rows", fmtNum(v.row_count)],
        ["Size", fmtBytes(v.size_bytes)],
        ["sha256", h("span", { class: "mono" }, v.sha256)],
        ["Description", v.description],
        ["Created", fmtTime(v.create_time)],
      ])),
      h("div", { class: "panel", id: "validation" }, h("h3", {}, "Validation report"),
        total && valid === total ? notice(`All ${total} rows are valid.`) : notice(`${total - valid} of ${total} rows have errors.`, "warn"),
        props([
          ["Format", report.format || "(not detected)"],
          ["Rows", fmtNum(report.row_count)],
          ["Valid rows", fmtNum(report.valid_row_count)],
          ["Tokens per row", stats && stats.rows ? `min ${fmtNum(stats.min_tokens)} · mean ${fmtNum(stats.mean_tokens, 4)} · max ${fmtNum(stats.max_tokens)}` : ""],
          ["Rows over max length", stats && stats.max_length ? `${fmtNum(stats.rows_over_max_length)} (max ${stats.max_length})` : ""],
        ]))),
    h("h2", {}, "Trained on it"),
    h("div", { id: "lineage" }, data.lineage.edges.length ? lineageGraph(data.lineage, ctx.navigate) : h("div", { class: "panel empty" }, "No model version was trained on this dataset version yet.")),
    h("h2", {}, "Token statistics"),
    form,
    h("h2", {}, "Row errors"),
    table(["Row", "Field", "Reason"], errors, { empty: "No row errors." }),
  );
}
