// A small live line chart as inline SVG: the last `capacity` points, scaled to their own maximum. A null point
// (nothing measured in that interval) holds the previous value.
import { h } from "./dom.js";

const SVG = "http://www.w3.org/2000/svg";
const WIDTH = 300;
const HEIGHT = 80;

export class Sparkline {
  constructor(label, unit, { capacity = 150, digits = 1, spanText = "last 5 min" } = {}) {
    this.points = [];
    this.capacity = capacity;
    this.unit = unit;
    this.digits = digits;
    this.value = h("b", {}, "—");
    this.svg = document.createElementNS(SVG, "svg");
    this.svg.setAttribute("viewBox", `0 0 ${WIDTH} ${HEIGHT}`);
    this.svg.setAttribute("preserveAspectRatio", "none");
    this.svg.setAttribute("class", "chart");
    this.svg.setAttribute("role", "img");
    this.svg.setAttribute("aria-label", `${label} over the last minutes`);
    this.area = document.createElementNS(SVG, "path");
    this.area.setAttribute("class", "area");
    this.line = document.createElementNS(SVG, "path");
    this.line.setAttribute("class", "line");
    this.svg.append(this.area, this.line);
    this.peak = h("span", {});
    this.el = h("figure", { class: "panel", style: "margin:0" },
      h("div", { class: "chart-head" }, h("figcaption", {}, label), h("span", {}, this.value, ` ${unit}`)),
      this.svg, h("div", { class: "chart-foot" }, h("span", {}, spanText), this.peak));
  }

  push(value) {
    const held = value ?? this.points.at(-1) ?? null;
    this.points.push(held);
    if (this.points.length > this.capacity) this.points.shift();
    this.value.textContent = held === null ? "—" : held.toFixed(this.digits);
    this.draw();
  }

  draw() {
    const values = this.points.map((v) => v ?? 0);
    const top = Math.max(...values);
    this.peak.textContent = top > 0 ? `peak ${top.toFixed(this.digits)} ${this.unit}` : "";
    const max = Math.max(top, 1e-9) * 1.15;
    const step = WIDTH / Math.max(this.capacity - 1, 1);
    const offset = WIDTH - (values.length - 1) * step;
    const xy = values.map((v, i) => `${(offset + i * step).toFixed(1)},${(HEIGHT - (v / max) * HEIGHT).toFixed(1)}`);
    if (!xy.length) return;
    this.line.setAttribute("d", `M${xy.join("L")}`);
    this.area.setAttribute("d", `M${offset.toFixed(1)},${HEIGHT}L${xy.join("L")}L${WIDTH},${HEIGHT}Z`);
  }
}
