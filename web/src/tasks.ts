// Tasks: a virtualized table (only the rows in view exist in the DOM) over
// the tasks the page holds, filtered by state and agent and searched by id
// or description. Live tasks are all held (snapshot + events); finished ones
// are paged in from ListTasks on demand, so a hub with a million tasks is
// browsed a page at a time.

import { type Hub, type Role, explain } from "./api";
import { dateTime, h, setText } from "./dom";
import { percentOf } from "./detail";
import { Task_State } from "./gen/agenthub/v1/hub_pb";
import { FINAL_STATES, isFinal, LIVE_STATES, priorityName, stateName, type Model, type TaskRow } from "./model";

const ROW_HEIGHT = 28;
const OVERSCAN = 8;
const PAGE_SIZE = 500;
const COLUMNS = ["Task", "State", "Agent", "Priority", "Attempts", "Progress", "Description", "Created"];
/** Concurrent calls of a bulk cancel or retry. */
const BULK_CALLS = 4;

type StateFilter = "live" | "all" | Task_State;

/** What each column sorts by. */
const SORT_KEYS: ((r: TaskRow) => string | number)[] = [
  (r) => r.id,
  (r) => r.state,
  (r) => r.agent,
  (r) => r.priority,
  (r) => r.attempts,
  (r) => percentOf(r.progress ? safeJson(r.progress) : undefined) ?? -1,
  (r) => r.description.toLowerCase(),
  (r) => r.createdAt,
];

function safeJson(s: string): unknown {
  try {
    return JSON.parse(s);
  } catch {
    return s;
  }
}

export class TasksView {
  readonly el: HTMLElement;
  private state: StateFilter = "live";
  private agent = "";
  private search = "";
  private rows: TaskRow[] = [];
  private seenVersion = -1;
  private viewport: HTMLElement;
  private spacer: HTMLElement;
  private body: HTMLElement;
  private count: HTMLElement;
  private more: HTMLButtonElement;
  private note: HTMLElement;
  private pool: HTMLElement[] = [];
  /** ListTasks cursor for the current filter ("" = no more pages). */
  private nextPage = "";
  private loading = false;
  /** Sorted by this column; newest first by default. */
  private sortColumn = COLUMNS.length - 1;
  private sortDescending = true;
  private head: HTMLElement;
  private bulk: HTMLElement;
  /** A bulk action waiting for its confirmation. */
  private pendingBulk: "cancel" | "retry" | undefined;
  private bulkMessage = "";

  constructor(
    private model: Model,
    private hub: Hub,
    private openTask: (id: string) => void,
    private changed: () => void,
    private role: Role = "viewer",
  ) {
    const stateSelect = h(
      "select",
      { id: "filter-state", "aria-label": "State" },
      h("option", { value: "live" }, "Live (queued, assigned, running)"),
      h("option", { value: "all" }, "All states"),
      ...[...LIVE_STATES, ...FINAL_STATES].map((s) => h("option", { value: String(s) }, stateName(s))),
    );
    stateSelect.addEventListener("change", () => {
      const v = stateSelect.value;
      this.state = v === "live" || v === "all" ? v : (Number(v) as Task_State);
      this.reload();
    });
    const agentInput = h("input", { id: "filter-agent", list: "agent-ids", placeholder: "agent id", "aria-label": "Agent" });
    agentInput.addEventListener("change", () => {
      this.agent = agentInput.value.trim();
      this.reload();
    });
    const searchInput = h("input", { id: "filter-search", type: "search", placeholder: "search id or description", "aria-label": "Search" });
    searchInput.addEventListener("input", () => {
      this.search = searchInput.value.trim().toLowerCase();
      this.seenVersion = -1;
      this.changed();
    });
    searchInput.addEventListener("keydown", (e) => {
      // An exact id opens it, even if it is not among the rows held here.
      if (e.key === "Enter" && searchInput.value.trim().startsWith("task-")) this.openTask(searchInput.value.trim());
    });
    this.count = h("span", { class: "muted", id: "tasks-count" });
    this.more = h("button", { id: "tasks-more", type: "button", onclick: () => void this.loadPage() }, "Load more from the hub");
    this.note = h("span", { class: "muted" });
    this.spacer = h("div", { class: "spacer" });
    this.body = h("div", { class: "vrows" });
    this.viewport = h("div", { class: "viewport", id: "tasks-viewport" }, this.spacer, this.body);
    this.viewport.addEventListener("scroll", () => this.paint(), { passive: true });
    this.head = h(
      "div",
      { class: "vhead" },
      ...COLUMNS.map((c, i) =>
        h("div", { class: `c-${c.toLowerCase()} sortable`, role: "button", title: `Sort by ${c.toLowerCase()}`, onclick: () => this.sortBy(i) }, c),
      ),
    );
    this.bulk = h("div", { class: "bulk", id: "tasks-bulk" });
    this.el = h(
      "div",
      { class: "tasks" },
      h("div", { class: "filters" }, stateSelect, agentInput, searchInput, this.count, this.more, this.note),
      this.bulk,
      this.head,
      this.viewport,
    );
  }

  private sortBy(column: number): void {
    if (this.sortColumn === column) this.sortDescending = !this.sortDescending;
    else {
      this.sortColumn = column;
      this.sortDescending = column === COLUMNS.length - 1;
    }
    this.seenVersion = -1;
    this.changed();
  }

  private sorted(rows: TaskRow[]): TaskRow[] {
    // The model holds rows in creation order: newest first is that, reversed.
    if (this.sortColumn === COLUMNS.length - 1) return this.sortDescending ? rows.reverse() : rows;
    const key = SORT_KEYS[this.sortColumn];
    const dir = this.sortDescending ? -1 : 1;
    return rows
      .map((r) => [key(r), r] as const)
      .sort(([a, ra], [b, rb]) => (a < b ? -dir : a > b ? dir : ra.createdAt < rb.createdAt ? dir : ra.createdAt > rb.createdAt ? -dir : ra.id < rb.id ? -dir : 1))
      .map(([, r]) => r);
  }

  /** Cancel or retry every task the filter shows (that it applies to), after a confirmation. */
  private renderBulk(): void {
    if (this.role !== "writer") return;
    const cancellable = this.rows.filter((r) => !isFinal(r.state));
    const retryable = this.rows.filter((r) => r.state === Task_State.FAILED || r.state === Task_State.CANCELLED);
    const pending = this.pendingBulk;
    const n = pending === "cancel" ? cancellable.length : retryable.length;
    const children =
      pending && n
        ? [
            h("span", {}, `${pending === "cancel" ? "Cancel" : "Retry"} ${n} task${n === 1 ? "" : "s"}? `),
            h("button", { type: "button", id: "bulk-yes", class: pending === "cancel" ? "danger" : "primary", onclick: () => void this.runBulk(pending, pending === "cancel" ? cancellable : retryable) }, `Yes, ${pending} ${n}`),
            h("button", { type: "button", id: "bulk-no", onclick: () => ((this.pendingBulk = undefined), this.renderBulk()) }, "No"),
          ]
        : [
            h("button", { type: "button", id: "bulk-cancel", disabled: cancellable.length === 0, onclick: () => ((this.pendingBulk = "cancel"), this.renderBulk()) }, `Cancel ${cancellable.length} shown`),
            h("button", { type: "button", id: "bulk-retry", disabled: retryable.length === 0, onclick: () => ((this.pendingBulk = "retry"), this.renderBulk()) }, `Retry ${retryable.length} shown`),
          ];
    this.bulk.replaceChildren(...children, this.bulkMessage ? h("span", { class: "muted", id: "bulk-message" }, this.bulkMessage) : "");
  }

  private async runBulk(what: "cancel" | "retry", rows: TaskRow[]): Promise<void> {
    this.pendingBulk = undefined;
    const ids = rows.map((r) => r.id);
    let done = 0;
    const failed: string[] = [];
    this.bulkMessage = `${what === "cancel" ? "Cancelling" : "Retrying"} ${ids.length}…`;
    this.renderBulk();
    const work = async () => {
      for (let id = ids.shift(); id !== undefined; id = ids.shift()) {
        try {
          await (what === "cancel" ? this.hub.cancelTask({ taskId: id }) : this.hub.retryTask({ taskId: id }));
          done++;
        } catch (e) {
          failed.push(`${id}: ${explain(e)}`);
        }
      }
    };
    await Promise.all(Array.from({ length: BULK_CALLS }, work));
    this.bulkMessage = `${what === "cancel" ? "Cancelled" : "Retried"} ${done}${failed.length ? `; ${failed.length} refused (${failed.slice(0, 3).join("; ")}${failed.length > 3 ? "; …" : ""})` : ""}.`;
    this.renderBulk();
  }

  private live(): boolean {
    return this.state === "live" || (typeof this.state === "number" && LIVE_STATES.includes(this.state));
  }

  /** Filter changed: held rows re-filter at once; history loads its first page. */
  private reload(): void {
    this.nextPage = "";
    this.seenVersion = -1;
    if (!this.live()) void this.loadPage(true);
    this.changed();
  }

  private async loadPage(first = false): Promise<void> {
    if (this.loading || (!first && !this.nextPage)) return;
    this.loading = true;
    setText(this.note, "loading…");
    try {
      const state = typeof this.state === "number" ? this.state : Task_State.STATE_UNSPECIFIED;
      const page = await this.hub.listTasks({ state, agentId: this.agent, pageSize: PAGE_SIZE, pageToken: first ? "" : this.nextPage });
      this.model.addTasks(page.tasks);
      this.nextPage = page.nextPageToken;
      setText(this.note, "");
    } catch (e) {
      setText(this.note, explain(e));
    } finally {
      this.loading = false;
      this.changed();
    }
  }

  private matches(r: TaskRow): boolean {
    if (this.state === "live") {
      if (!LIVE_STATES.includes(r.state)) return false;
    } else if (this.state !== "all" && r.state !== this.state) return false;
    if (this.agent && r.agent !== this.agent) return false;
    if (this.search && !r.id.toLowerCase().includes(this.search) && !r.description.toLowerCase().includes(this.search)) return false;
    return true;
  }

  render(): void {
    if (this.seenVersion !== this.model.version) {
      this.seenVersion = this.model.version;
      this.rows = this.sorted(this.model.order.filter((r) => this.matches(r)));
      [...this.head.children].forEach((c, i) => c.setAttribute("aria-sort", i === this.sortColumn ? (this.sortDescending ? "descending" : "ascending") : "none"));
      this.renderBulk();
      this.spacer.style.height = `${this.rows.length * ROW_HEIGHT}px`;
      setText(this.count, `${this.rows.length} task${this.rows.length === 1 ? "" : "s"}`);
      this.more.hidden = this.live() || !this.nextPage;
    }
    this.paint();
  }

  /** Draw the rows in view, reusing row elements. */
  private paint(): void {
    const top = this.viewport.scrollTop;
    const height = this.viewport.clientHeight || 600;
    const first = Math.max(0, Math.floor(top / ROW_HEIGHT) - OVERSCAN);
    const last = Math.min(this.rows.length, Math.ceil((top + height) / ROW_HEIGHT) + OVERSCAN);
    const n = Math.max(0, last - first);
    while (this.pool.length < n) {
      const row = h("div", { class: "vrow" }, ...COLUMNS.map((c) => h("div", { class: `c-${c.toLowerCase()}` })));
      row.addEventListener("click", () => {
        const id = row.dataset.task;
        if (id) this.openTask(id);
      });
      this.pool.push(row);
      this.body.appendChild(row);
    }
    for (let i = 0; i < this.pool.length; i++) {
      const el = this.pool[i];
      const r = i < n ? this.rows[first + i] : undefined;
      if (!r) {
        el.hidden = true;
        continue;
      }
      el.hidden = false;
      el.style.transform = `translateY(${(first + i) * ROW_HEIGHT}px)`;
      el.dataset.task = r.id;
      const cells = el.children;
      setText(cells[0], r.id);
      cells[0].setAttribute("title", r.id);
      setText(cells[1], stateName(r.state));
      cells[1].className = `c-state st-${stateName(r.state).toLowerCase()}`;
      setText(cells[2], r.agent);
      setText(cells[3], priorityName(r.priority));
      setText(cells[4], r.maxAttempts ? `${r.attempts}/${r.maxAttempts}` : String(r.attempts));
      progressCell(cells[5] as HTMLElement, r.progress);
      setText(cells[6], r.description);
      cells[6].setAttribute("title", r.description);
      setText(cells[7], dateTime(r.createdAt));
      cells[7].setAttribute("title", `created ${dateTime(r.createdAt)}, updated ${dateTime(r.updatedAt)}`);
    }
  }
}

/** The latest progress as a bar with its percentage, or as text when it is not a number. */
function progressCell(cell: HTMLElement, progress: string): void {
  if (cell.dataset.progress === progress) return;
  cell.dataset.progress = progress;
  cell.title = progress;
  const pct = progress ? percentOf(safeJson(progress)) : undefined;
  if (pct === undefined) {
    cell.textContent = progress;
    return;
  }
  const inner = h("div", {});
  inner.style.width = `${pct}%`;
  cell.replaceChildren(h("span", { class: "pbar" }, h("div", { class: "bar" }, inner), h("span", {}, `${Math.round(pct)}%`)));
}
