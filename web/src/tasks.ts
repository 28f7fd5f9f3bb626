// Tasks: a virtualized table (only the rows in view exist in the DOM) over
// the tasks the page holds, filtered by state and agent and searched by id
// or description. Live tasks are all held (snapshot + events); finished ones
// are paged in from ListTasks on demand, so a hub with a million tasks is
// browsed a page at a time.

import { type Hub, explain } from "./api";
import { clock, h, setText } from "./dom";
import { Task_State } from "./gen/agenthub/v1/hub_pb";
import { FINAL_STATES, LIVE_STATES, priorityName, stateName, type Model, type TaskRow } from "./model";

const ROW_HEIGHT = 28;
const OVERSCAN = 8;
const PAGE_SIZE = 500;
const COLUMNS = ["Task", "State", "Agent", "Priority", "Attempts", "Progress", "Description", "Updated"];

type StateFilter = "live" | "all" | Task_State;

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

  constructor(
    private model: Model,
    private hub: Hub,
    private openTask: (id: string) => void,
    private changed: () => void,
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
    this.el = h(
      "div",
      { class: "tasks" },
      h("div", { class: "filters" }, stateSelect, agentInput, searchInput, this.count, this.more, this.note),
      h("div", { class: "vhead" }, ...COLUMNS.map((c) => h("div", { class: `c-${c.toLowerCase()}` }, c))),
      this.viewport,
    );
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
      this.rows = this.model.order.filter((r) => this.matches(r));
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
      setText(cells[1], stateName(r.state));
      cells[1].className = `c-state st-${stateName(r.state).toLowerCase()}`;
      setText(cells[2], r.agent);
      setText(cells[3], priorityName(r.priority));
      setText(cells[4], r.maxAttempts ? `${r.attempts}/${r.maxAttempts}` : String(r.attempts));
      setText(cells[5], r.progress);
      setText(cells[6], r.description);
      setText(cells[7], clock(r.updatedAt));
    }
  }
}
