// A live line chart drawn as inline SVG: series of (x, y) points, redrawn at most once per frame as
// points arrive. The <svg> carries data-points (points drawn, all series) for anyone watching it grow.

import { h, s, fmtNum } from "./dom.js";

const COLORS = ["#2f7bd8", "#d9534f", "#3f9c63", "#8561c8", "#d59334", "#2c9696", "#6b7a8f", "#c2417f"];
const W = 640;
const H = 240;
const PAD = { left: 56, right: 16, top: 12, bottom: 34 };

function niceTicks(min, max, count = 5) {
  if (!Number.isFinite(min) || !Number.isFinite(max)) return [];
  if (min === max) {
    const d = Math.abs(min) > 0 ? Math.abs(min) * 0.1 : 1;
    min -= d;
    max += d;
  }
  const raw = (max - min) / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((v) => v >= raw) || raw;
  const ticks = [];
  for (let v = Math.ceil(min / step) * step; v <= max + step * 1e-9; v += step) ticks.push(Number(v.toPrecision(12)));
  return ticks;
}

export class LineChart {
  /** {title, xLabel, yLabel, yMin, yMax, maxPoints} */
  constructor({ title, xLabel = "step", yLabel = "", yMin = null, yMax = null, maxPoints = 2000, name = "" } = {}) {
    this.opts = { title, xLabel, yLabel, yMin, yMax, maxPoints };
    this.series = new Map();
    this.pending = false;
    this.countEl = h("span", { class: "count" }, "0 points");
    this.svg = s("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title, "data-points": "0", "data-chart": name || title });
    this.legend = h("div", { class: "legend" });
    this.empty = s("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, "waiting for data…");
    this.svg.append(this.empty);
    this.el = h("div", { class: "chart", "data-chart": name || title }, this.countEl, h("h3", {}, title), this.svg, this.legend);
  }

  get points() {
    let n = 0;
    for (const pts of this.series.values()) n += pts.length;
    return n;
  }

  add(name, x, y) {
    if (!Number.isFinite(x) || !Number.isFinite(y)) return;
    let pts = this.series.get(name);
    if (!pts) {
      pts = [];
      this.series.set(name, pts);
    }
    pts.push([x, y]);
    if (pts.length > this.opts.maxPoints) {
      // keep the shape, halve the points (every other one, the last always kept)
      const kept = pts.filter((_, i) => i % 2 === 0 || i === pts.length - 1);
      pts.splice(0, pts.length, ...kept);
    }
    this.schedule();
  }

  schedule() {
    if (this.pending) return;
    this.pending = true;
    const draw = () => {
      this.pending = false;
      this.render();
    };
    if (document.hidden) setTimeout(draw, 250);
    else requestAnimationFrame(draw);
  }

  render() {
    const all = [...this.series.values()].flat();
    this.svg.setAttribute("data-points", String(all.length));
    if (all.length) this.svg.setAttribute("data-max-x", String(Math.max(...all.map((p) => p[0]))));
    this.countEl.textContent = `${all.length} point${all.length === 1 ? "" : "s"}`;
    if (!all.length) return;
    let [xMin, xMax] = [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
    let yMin = this.opts.yMin ?? Math.min(...all.map((p) => p[1]));
    let yMax = this.opts.yMax ?? Math.max(...all.map((p) => p[1]));
    if (xMin === xMax) {
      xMin -= 1;
      xMax += 1;
    }
    if (yMin === yMax) {
      const d = Math.abs(yMin) > 0 ? Math.abs(yMin) * 0.05 : 0.5;
      yMin -= d;
      yMax += d;
    }
    const pw = W - PAD.left - PAD.right;
    const ph = H - PAD.top - PAD.bottom;
    const sx = (x) => PAD.left + ((x - xMin) / (xMax - xMin)) * pw;
    const sy = (y) => PAD.top + (1 - (y - yMin) / (yMax - yMin)) * ph;

    const grid = s("g", { class: "grid" });
    const axis = s("g", { class: "axis" });
    for (const t of niceTicks(yMin, yMax)) {
      if (t < yMin || t > yMax) continue;
      grid.append(s("line", { x1: PAD.left, x2: W - PAD.right, y1: sy(t), y2: sy(t) }));
      axis.append(s("text", { x: PAD.left - 6, y: sy(t) + 4, "text-anchor": "end" }, fmtNum(t, 3)));
    }
    for (const t of niceTicks(xMin, xMax, 6)) {
      if (t < xMin || t > xMax) continue;
      axis.append(s("line", { x1: sx(t), x2: sx(t), y1: H - PAD.bottom, y2: H - PAD.bottom + 4 }));
      axis.append(s("text", { x: sx(t), y: H - PAD.bottom + 16, "text-anchor": "middle" }, fmtNum(t, 4)));
    }
    axis.append(s("line", { x1: PAD.left, x2: PAD.left, y1: PAD.top, y2: H - PAD.bottom }));
    axis.append(s("line", { x1: PAD.left, x2: W - PAD.right, y1: H - PAD.bottom, y2: H - PAD.bottom }));
    axis.append(s("text", { x: PAD.left + pw / 2, y: H - 4, "text-anchor": "middle" }, this.opts.xLabel));
    if (this.opts.yLabel) {
      axis.append(s("text", { x: 12, y: PAD.top + ph / 2, "text-anchor": "middle", transform: `rotate(-90 12 ${PAD.top + ph / 2})` }, this.opts.yLabel));
    }

    const lines = s("g");
    this.legend.replaceChildren();
    let i = 0;
    for (const [name, pts] of this.series) {
      const color = COLORS[i % COLORS.length];
      i += 1;
      const sorted = pts.length > 1 && pts.some((p, k) => k && p[0] < pts[k - 1][0]) ? [...pts].sort((a, b) => a[0] - b[0]) : pts;
      const d = sorted.map((p, k) => `${k ? "L" : "M"}${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join("");
      lines.append(s("path", { class: "series", d, stroke: color, "data-series": name, "data-count": pts.length }));
      if (pts.length === 1) lines.append(s("circle", { cx: sx(pts[0][0]), cy: sy(pts[0][1]), r: 3, fill: color }));
      const last = pts[pts.length - 1];
      const swatch = h("i");
      swatch.style.background = color;
      this.legend.append(h("span", {}, swatch, `${name}: ${fmtNum(last[1])}`));
    }
    this.svg.replaceChildren(grid, axis, lines);
  }
}
