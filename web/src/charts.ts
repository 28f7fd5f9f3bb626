// Charts over the last hour, from the event stream: tasks completed and
// failed per minute, queue depth, and assignment wait (queued → assigned)
// p50 / p99 per minute. Drawn as inline SVG.

import { fill, h } from "./dom";
import type { Bucket, Model } from "./model";

const MINUTES = 60;
const W = 600;
const H = 140;
const SVG = "http://www.w3.org/2000/svg";

export function percentile(sorted: number[], p: number): number {
  if (sorted.length === 0) return 0;
  const i = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return sorted[i];
}

interface Series {
  name: string;
  cls: string;
  values: (number | null)[];
}

export function renderCharts(el: HTMLElement, model: Model): void {
  const now = Math.floor(Date.now() / 60_000);
  const minutes: (Bucket | undefined)[] = [];
  for (let m = now - MINUTES + 1; m <= now; m++) minutes.push(model.buckets.get(m));
  const waits = minutes.map((b) => (b ? [...b.waits].sort((x, y) => x - y) : []));
  let depth: number | null = null;
  const depths = minutes.map((b) => {
    if (b && b.depth >= 0) depth = b.depth;
    return b ? depth : null;
  });
  const all = waits.flat().sort((x, y) => x - y);
  fill(
    el,
    h("p", { class: "muted" }, "The last hour, per minute, from the event stream (the events stored before the page opened are read back, up to 5,000)."),
    chart("Tasks per minute", (v) => `${Math.round(v)}`, [
      { name: "completed", cls: "s-ok", values: minutes.map((b) => b?.completed ?? 0) },
      { name: "failed", cls: "s-bad", values: minutes.map((b) => b?.failed ?? 0) },
    ], "bars"),
    chart("Queue depth", (v) => `${Math.round(v)}`, [{ name: "queued", cls: "s-queue", values: depths }], "line"),
    chart(
      all.length ? `Assignment wait (last hour: p50 ${fmtMs(percentile(all, 50))}, p99 ${fmtMs(percentile(all, 99))})` : "Assignment wait (no task assigned in the last hour)",
      fmtMs,
      [
        { name: "p50", cls: "s-p50", values: waits.map((w) => (w.length ? percentile(w, 50) : null)) },
        { name: "p99", cls: "s-p99", values: waits.map((w) => (w.length ? percentile(w, 99) : null)) },
      ],
      "line",
    ),
  );
}

export function fmtMs(ms: number): string {
  return ms >= 10_000 ? `${(ms / 1000).toFixed(0)} s` : ms >= 1000 ? `${(ms / 1000).toFixed(1)} s` : `${Math.round(ms)} ms`;
}

function svg(tag: string, attrs: Record<string, string | number>): SVGElement {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  return el;
}

/** Axis labels in the same unit as the title (`fmt`). */
function chart(title: string, fmt: (v: number) => string, series: Series[], kind: "bars" | "line"): HTMLElement {
  const max = Math.max(1, ...series.flatMap((s) => s.values.map((v) => v ?? 0)));
  const root = svg("svg", { viewBox: `0 0 ${W} ${H + 20}`, class: "chart", role: "img", "aria-label": title });
  for (const f of [0, 0.5, 1]) {
    const y = H - f * H;
    root.appendChild(svg("line", { x1: 0, x2: W, y1: y, y2: y, class: "gridline" }));
    const t = svg("text", { x: 2, y: Math.max(11, y - 2), class: "axis" });
    t.textContent = fmt(f * max);
    root.appendChild(t);
  }
  const step = W / MINUTES;
  series.forEach((s, si) => {
    if (kind === "bars") {
      const bw = step / series.length - 1;
      s.values.forEach((v, i) => {
        if (!v) return;
        const hgt = (v / max) * H;
        root.appendChild(svg("rect", { x: i * step + si * (bw + 1), y: H - hgt, width: bw, height: hgt, class: s.cls }));
      });
    } else {
      let d = "";
      s.values.forEach((v, i) => {
        if (v === null) return;
        const x = (i + 0.5) * step;
        const y = H - (v / max) * H;
        d += `${d ? "L" : "M"}${x},${y} `;
        root.appendChild(svg("circle", { cx: x, cy: y, r: 2.5, class: `${s.cls} dot` }));
      });
      if (d) root.appendChild(svg("path", { d, class: `${s.cls} line` }));
    }
  });
  const label = svg("text", { x: 2, y: H + 16, class: "axis" });
  label.textContent = "60 min ago";
  root.appendChild(label);
  const nowLabel = svg("text", { x: W - 24, y: H + 16, class: "axis" });
  nowLabel.textContent = "now";
  root.appendChild(nowLabel);
  return h(
    "figure",
    { class: "chart-box" },
    h("figcaption", {}, title, " ", ...series.map((s) => h("span", { class: `legend ${s.cls}` }, s.name))),
    root as unknown as HTMLElement,
  );
}
