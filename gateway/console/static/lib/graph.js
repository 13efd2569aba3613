// The lineage graph as inline SVG: a layered layout, left to right by generation (a node's column is
// the longest path to it from a node without parents), nodes ordered in each column by their parents'
// positions. Model versions, dataset versions and the jobs between them are boxes; a click opens the
// node's page.

import { h, s, pageOf } from "./dom.js";

const NODE_W = 200;
const NODE_H = 46;
const COL_GAP = 90;
const ROW_GAP = 22;
const MARGIN = 16;

function layers(graph) {
  const parents = new Map(graph.nodes.map((n) => [n.id, []]));
  for (const e of graph.edges) {
    if (parents.has(e.to) && parents.has(e.from)) parents.get(e.to).push(e.from);
  }
  const depth = new Map();
  const visiting = new Set();
  const walk = (id) => {
    if (depth.has(id)) return depth.get(id);
    if (visiting.has(id)) return 0; // a cycle (never in a lineage): cut it
    visiting.add(id);
    const d = Math.max(-1, ...parents.get(id).map(walk)) + 1;
    visiting.delete(id);
    depth.set(id, d);
    return d;
  };
  graph.nodes.forEach((n) => walk(n.id));
  return { depth, parents };
}

const TYPE_ORDER = { model: 0, dataset: 1, job: 2 };

function clip(text, max = 28) {
  return text.length > max ? `${text.slice(0, max - 1)}…` : text;
}

/** The graph {nodes, edges} as an <svg> inside a scrollable box; navigate(href) opens a node's page. */
export function lineageGraph(graph, navigate) {
  if (!graph.nodes.length) return h("div", { class: "graph empty" }, "No lineage recorded.");
  const { depth, parents } = layers(graph);
  const columns = [];
  for (const n of graph.nodes) {
    const d = depth.get(n.id);
    (columns[d] = columns[d] || []).push(n);
  }
  const row = new Map();
  columns.forEach((col, c) => {
    const key = (n) => {
      const ps = parents.get(n.id).filter((p) => row.has(p));
      const bary = ps.length ? ps.reduce((a, p) => a + row.get(p), 0) / ps.length : 0;
      return [c === 0 ? TYPE_ORDER[n.type] ?? 3 : bary, n.label];
    };
    col.sort((a, b) => {
      const [ka, kb] = [key(a), key(b)];
      return ka[0] - kb[0] || String(ka[1]).localeCompare(String(kb[1]));
    });
    col.forEach((n, i) => row.set(n.id, i));
  });
  const tallest = Math.max(...columns.map((c) => c.length));
  const width = MARGIN * 2 + columns.length * NODE_W + (columns.length - 1) * COL_GAP;
  const height = MARGIN * 2 + tallest * NODE_H + (tallest - 1) * ROW_GAP;
  const pos = new Map();
  columns.forEach((col, c) => {
    const offset = ((tallest - col.length) * (NODE_H + ROW_GAP)) / 2;
    col.forEach((n, i) => pos.set(n.id, { x: MARGIN + c * (NODE_W + COL_GAP), y: MARGIN + offset + i * (NODE_H + ROW_GAP) }));
  });

  const svg = s("svg", {
    width,
    height,
    viewBox: `0 0 ${width} ${height}`,
    role: "img",
    "aria-label": "lineage graph",
    "data-nodes": graph.nodes.length,
    "data-edges": graph.edges.length,
  });
  svg.append(
    s("defs", {}, s("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" },
      s("path", { d: "M0,0 L10,5 L0,10 z", fill: "#98a4b5" }))),
  );
  for (const e of graph.edges) {
    const a = pos.get(e.from);
    const b = pos.get(e.to);
    if (!a || !b) continue;
    const x1 = a.x + NODE_W;
    const y1 = a.y + NODE_H / 2;
    const x2 = b.x;
    const y2 = b.y + NODE_H / 2;
    const mx = (x1 + x2) / 2;
    svg.append(
      s("path", { class: "edge", d: `M${x1},${y1} C${mx},${y1} ${mx},${y2} ${x2 - 2},${y2}`, "marker-end": "url(#arrow)", "data-from": e.from, "data-to": e.to },
        s("title", {}, `${e.from} → ${e.to} (${e.relation})`)),
    );
  }
  for (const n of graph.nodes) {
    const p = pos.get(n.id);
    const sub = n.type === "job" ? `${n.kind} job` : n.type === "dataset" ? "dataset" : n.kind || "model";
    const cls = `node node-${n.type}${n.kind ? ` kind-${n.kind}` : ""}${n.focus ? " focus" : ""}${n.deleted ? " deleted" : ""}`;
    const href = pageOf(n.id);
    const g = s("g", { class: cls, transform: `translate(${p.x},${p.y})`, "data-id": n.id, "data-type": n.type, tabindex: href ? 0 : null },
      s("title", {}, n.id + (n.deleted ? " (deleted)" : "")),
      s("rect", { width: NODE_W, height: NODE_H, rx: 6, ry: 6 }),
      s("text", { x: 10, y: 19 }, clip(n.label)),
      s("text", { x: 10, y: 36, class: "sub" }, sub + (n.deleted ? " · deleted" : "")));
    if (href) {
      const open = () => navigate(href);
      g.addEventListener("click", open);
      g.addEventListener("keydown", (ev) => {
        if (ev.key === "Enter") open();
      });
    }
    svg.append(g);
  }
  return h("div", { class: "graph" }, svg);
}
