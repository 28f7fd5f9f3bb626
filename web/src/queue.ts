// Queue: what waits, by priority, and why (computed here from the agents the
// hub lists and the queued tasks: the scheduler's own rules, SPEC §4).

import { ago, fill, h } from "./dom";
import { card } from "./fleet";
import { Priority, Task_State } from "./gen/agenthub/v1/hub_pb";
import { priorityName, type AgentRow, type Model, type TaskRow } from "./model";

export type WaitReason =
  | "waiting on a dependency"
  | "no capable agent"
  | "all capable agents busy"
  | "pinned agent offline"
  | "pinned agent busy"
  | "being assigned";

/** The dependencies of a queued task that have not completed (those the page holds; a finished one it no longer holds completed, or this task would have failed). */
export function unfinishedDeps(t: TaskRow, tasks: Map<string, TaskRow>): TaskRow[] {
  return t.deps.map((d) => tasks.get(d)).filter((d): d is TaskRow => !!d && d.state !== Task_State.COMPLETED);
}

export function whyWaiting(t: TaskRow, agents: Map<string, AgentRow>, tasks: Map<string, TaskRow>): WaitReason {
  if (unfinishedDeps(t, tasks).length) return "waiting on a dependency";
  const free = (a: AgentRow) => a.active.size < a.max;
  if (t.pinned) {
    const a = agents.get(t.agent);
    if (!a || !a.connected) return "pinned agent offline";
    return free(a) ? "being assigned" : "pinned agent busy";
  }
  const capable = [...agents.values()].filter((a) => a.connected && a.status !== "draining" && t.caps.every((c) => a.caps.includes(c)));
  if (capable.length === 0) return "no capable agent";
  return capable.some(free) ? "being assigned" : "all capable agents busy";
}

const PRIORITIES = [Priority.URGENT, Priority.HIGH, Priority.NORMAL, Priority.LOW];
const SHOWN = 200;

export function renderQueue(el: HTMLElement, model: Model, openTask: (id: string) => void): void {
  const queued = model.queued();
  const now = Date.now();
  const byPriority = new Map<Priority, number>();
  const reasons = new Map<WaitReason, number>();
  const why = new Map<string, WaitReason>();
  let oldest: TaskRow | undefined;
  for (const t of queued) {
    const p = t.priority || Priority.NORMAL;
    byPriority.set(p, (byPriority.get(p) ?? 0) + 1);
    const r = whyWaiting(t, model.agents, model.tasks);
    why.set(t.id, r);
    reasons.set(r, (reasons.get(r) ?? 0) + 1);
    if (!oldest || (t.queuedSince || t.createdAt) < (oldest.queuedSince || oldest.createdAt)) oldest = t;
  }
  const waitingSince = (t: TaskRow) => t.queuedSince || t.createdAt;
  const list = [...queued].sort((a, b) => b.priority - a.priority || waitingSince(a) - waitingSince(b)).slice(0, SHOWN);
  fill(
    el,
    h(
      "div",
      { class: "cards" },
      card("queued", queued.length, "queue-depth"),
      ...PRIORITIES.map((p) => card(priorityName(p), byPriority.get(p) ?? 0)),
      card("oldest waiting", oldest ? ago(waitingSince(oldest), now) : "—"),
    ),
    h(
      "div",
      { class: "reasons" },
      h("h3", {}, "Why tasks wait"),
      reasons.size === 0
        ? h("p", { class: "empty" }, "Nothing is waiting.")
        : h("ul", {}, ...[...reasons].map(([r, n]) => h("li", {}, h("strong", {}, String(n)), ` ${r}`))),
    ),
    queued.length
      ? h(
          "table",
          { class: "grid" },
          h("thead", {}, h("tr", {}, ...["Task", "Description", "Priority", "Needs", "Pinned to", "Waiting", "Why"].map((t) => h("th", {}, t)))),
          h(
            "tbody",
            {},
            ...list.map((t) =>
              h(
                "tr",
                {},
                h("td", {}, h("a", { href: "#", class: "task-link", onclick: (e: Event) => (e.preventDefault(), openTask(t.id)) }, t.id)),
                h("td", { class: "cut", title: t.description }, t.description),
                h("td", {}, priorityName(t.priority)),
                h("td", {}, t.caps.join(", ") || "—"),
                h("td", {}, t.pinned ? t.agent : "—"),
                h("td", {}, ago(waitingSince(t), now)),
                h("td", { class: "why" }, why.get(t.id) ?? "", ...dependencyNote(t, model)),
              ),
            ),
          ),
        )
      : null,
    queued.length > SHOWN ? h("p", { class: "muted" }, `The ${SHOWN} first in line of ${queued.length}.`) : null,
  );
}

function dependencyNote(t: TaskRow, model: Model): (string | HTMLElement)[] {
  const deps = unfinishedDeps(t, model.tasks);
  return deps.length ? [" ", h("span", { class: "muted" }, `(${deps.map((d) => d.id).join(", ")})`)] : [];
}
