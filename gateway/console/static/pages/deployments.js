// Deployments of every inference replica the gateway routes to, with their state; refreshed every 3 s.

import { api } from "../lib/api.js";
import { h, badge, errorBox, fmtTime, link, resource, shortEnum, table } from "../lib/dom.js";
import { serviceErrors } from "./jobs.js";

export async function list(ctx) {
  document.title = "Deployments · ModelYard console";
  const body = h("div", {}, h("p", { class: "loading" }, "Loading…"));
  ctx.view.replaceChildren(
    h("h1", {}, "Deployments"),
    h("p", { class: "sub" }, "What the inference service serves; the gateway routes /v1 requests to READY deployments (model = the deployment's name, or name:adapter)."),
    body,
  );
  const load = async () => {
    const data = await api("/deployments", { signal: ctx.signal });
    const rows = data.deployments.map((d) => {
      const id = d.name.split("/")[1];
      const served = d.served_model_name || id;
      return h("tr", { id, "data-name": d.name },
        h("td", {}, h("span", { class: "mono" }, id)),
        h("td", {}, badge(d.state), d.error && d.error.message ? h("div", { class: "error detail" }, d.error.message) : ""),
        h("td", {}, resource(d.model_version)),
        h("td", {}, (d.adapters || []).map((a) => h("div", {}, h("span", { class: "mono" }, `${served}:${a.alias}`), " ← ", resource(a.model_version)))),
        h("td", {}, shortEnum(d.engine).toLowerCase()),
        h("td", { class: "num" }, String(d.replicas || 1)),
        h("td", { class: "mono" }, d.replica),
        h("td", {}, fmtTime(d.create_time)),
        h("td", {}, shortEnum(d.state) === "READY" ? link(`/console/playground?model=${encodeURIComponent(served)}`, "Chat") : ""));
    });
    body.replaceChildren(
      ...serviceErrors(data.errors),
      table(["Deployment", "State", "Model version", "Adapters", "Engine", { text: "Replicas", attrs: { class: "num" } }, "Inference replica", "Created", ""], rows, { empty: "No deployments: deploy a model with `yard deploy`." }),
    );
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
  }, 3000);
  ctx.onCleanup(() => clearInterval(timer));
}
