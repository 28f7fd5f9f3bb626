// Fleet: every agent the hub knows, with its state, capabilities, slots and
// current tasks.

import { ago, dateTime, fill, h } from "./dom";
import type { AgentRow, Model } from "./model";

export type AgentState = "online" | "draining" | "away" | "gone" | "unknown";

/**
 * `away`: disconnected, inside its reconnect grace (it keeps its tasks);
 * `gone`: disconnected for longer; `unknown`: the hub cannot be asked.
 */
export function agentState(a: AgentRow, model: Model): AgentState {
  const p = model.presence(a);
  if (p === "connected") return a.status === "draining" ? "draining" : "online";
  return p;
}

const LABELS: Record<AgentState, string> = { online: "online", draining: "draining", away: "away (in grace)", gone: "gone", unknown: "unknown" };

export function renderFleet(el: HTMLElement, model: Model, openTask: (id: string) => void): void {
  const agents = [...model.agents.values()].sort((a, b) => (a.id < b.id ? -1 : 1));
  const counts: Record<AgentState, number> = { online: 0, draining: 0, away: 0, gone: 0, unknown: 0 };
  let used = 0;
  let total = 0;
  for (const a of agents) {
    counts[agentState(a, model)]++;
    if (a.connected) {
      used += a.active.size;
      total += a.max;
    }
  }
  const now = Date.now();
  fill(
    el,
    h(
      "div",
      { class: "cards" },
      ...(model.hubReachable
        ? [card("online", counts.online), card("away (in grace)", counts.away), card("gone", counts.gone), card("draining", counts.draining)]
        : [card("unknown (hub unreachable)", counts.unknown)]),
      card("slots used", `${used} / ${total}`),
    ),
    agents.length === 0
      ? h("p", { class: "empty" }, "No agent is connected. Start a sidecar: agenthub sidecar --hub ws://HOST:PORT/ws …")
      : h(
          "table",
          { class: "grid", id: "fleet-table" },
          h("thead", {}, h("tr", {}, ...["Agent", "State", "Capabilities", "Slots", "Current tasks", "Connected since"].map((t) => h("th", {}, t)))),
          h(
            "tbody",
            {},
            ...agents.map((a) => {
              const state = agentState(a, model);
              const tasks = [...a.active].slice(0, 6);
              return h(
                "tr",
                { "data-agent": a.id, class: `agent-${state}` },
                h("td", {}, h("strong", {}, a.id), a.name && a.name !== a.id ? h("div", { class: "muted" }, a.name) : null),
                h("td", {}, h("span", { class: `badge ${state}`, title: stateHelp(state, a) }, LABELS[state]), a.status && a.status !== state ? h("div", { class: "muted" }, a.status) : null),
                h("td", {}, ...(a.caps.length ? a.caps.map((c) => h("span", { class: "chip" }, c)) : [h("span", { class: "muted" }, "none")])),
                h("td", { class: "slots" }, `${a.active.size} / ${a.max}`, bar(a.active.size / a.max)),
                h(
                  "td",
                  {},
                  ...tasks.map((id) => h("a", { href: "#", class: "task-link", onclick: (e: Event) => (e.preventDefault(), openTask(id)) }, id)),
                  a.active.size > tasks.length ? h("span", { class: "muted" }, ` +${a.active.size - tasks.length}`) : null,
                ),
                h("td", { title: dateTime(a.connectedAt) }, dateTime(a.connectedAt), h("div", { class: "muted" }, `${ago(a.connectedAt, now)} ago`)),
              );
            }),
          ),
        ),
  );
}

function stateHelp(state: AgentState, a: AgentRow): string {
  switch (state) {
    case "away":
      return `Disconnected since ${dateTime(a.awaySince)}; keeps its tasks until the reconnect grace ends.`;
    case "gone":
      return `Disconnected since ${dateTime(a.awaySince)}, longer than the reconnect grace.`;
    case "unknown":
      return "The hub is unreachable: this is what it said last.";
    default:
      return "Connected.";
  }
}

export function card(label: string, value: string | number, id?: string): HTMLElement {
  return h("div", { class: "card", id }, h("div", { class: "value" }, String(value)), h("div", { class: "label" }, label));
}

/** A fill bar (styled through the CSSOM: the page's CSP allows no inline style attributes). */
function bar(fraction: number): HTMLElement {
  const inner = h("div", {});
  inner.style.width = `${Math.min(100, Math.max(0, fraction * 100))}%`;
  return h("div", { class: "bar" }, inner);
}
