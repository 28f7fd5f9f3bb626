// The agenthub dashboard: sign in with a token (kept in sessionStorage for
// this tab, never in a URL), then live views over the hub's gRPC API.

import { classify, explain, forgetToken, hubClient, probeRole, savedToken, saveToken, type Hub, type Role } from "./api";
import { renderCharts } from "./charts";
import { TaskDetail } from "./detail";
import { clock, fill, h, setText } from "./dom";
import { renderFleet } from "./fleet";
import { Live, type Connection } from "./live";
import { kindName, Model, stateName, type FeedEvent } from "./model";
import { pushForm } from "./push";
import { renderQueue, unfinishedDeps, whyWaiting } from "./queue";
import { TasksView } from "./tasks";

type View = "fleet" | "queue" | "tasks" | "charts" | "push";
const VIEWS: [View, string][] = [
  ["fleet", "Fleet"],
  ["queue", "Queue"],
  ["tasks", "Tasks"],
  ["charts", "Charts"],
  ["push", "Push"],
];
/** Views that rebuild wholesale redraw at most this often. */
const SLOW_VIEW_MS = 250;
const FEED_ROWS = 100;
/** A render waits at most this long for an animation frame. */
const RENDER_LATEST_MS = 100;

declare global {
  interface Window {
    /** Counters for tests and diagnostics: seqs applied, duplicates, gaps, latencies. */
    agenthubStats?: Model["stats"];
  }
}

const root = document.getElementById("app")!;

function start(): void {
  const token = savedToken();
  if (token) void signIn(token, "");
  else showLogin("");
}

function showLogin(message: string, token = ""): void {
  const input = h("input", { id: "token", type: "password", autocomplete: "off", placeholder: "paste a viewer, orchestrator or admin token", "aria-label": "Token", required: true });
  input.value = token;
  const error = h("p", { class: "error", id: "login-error", role: "alert" }, message);
  const form = h(
    "form",
    { class: "login", id: "login-form" },
    h("h1", {}, "agenthub"),
    h("p", {}, "Paste a token. It is kept in this tab only (sessionStorage) and sent in the authorization header, never in a URL."),
    input,
    h("button", { type: "submit", id: "sign-in" }, "Open dashboard"),
    error,
  );
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    setText(error, "");
    void signIn(input.value.trim(), "checking…", error);
  });
  fill(root, form);
  input.focus();
}

async function signIn(token: string, pending: string, error?: HTMLElement): Promise<void> {
  if (error) setText(error, pending);
  const hub = hubClient(token);
  let role: Role;
  try {
    await hub.listAgents({});
    role = await probeRole(hub);
  } catch (e) {
    // Keep a token the hub never judged (unreachable hub): Open tries again.
    const judged = classify(e) === "token" || classify(e) === "forbidden";
    if (judged) forgetToken();
    showLogin(explain(e), judged ? "" : token);
    return;
  }
  saveToken(token);
  new Dashboard(hub, role).mount();
}

class Dashboard {
  private model = new Model();
  private live: Live;
  private view: View = "fleet";
  private main = h("section", { class: "view", id: "view" });
  private feedList = h("ol", { class: "feed", id: "feed" });
  private status = h("span", { class: "status", id: "connection" });
  private banner = h("div", { class: "banner", id: "banner", role: "status", hidden: true });
  private tabs = new Map<View, HTMLElement>();
  private tasks: TasksView;
  private push: HTMLElement | undefined;
  private detail: TaskDetail | undefined;
  private detailSlot = h("div", { class: "detail-slot" });
  /** Agent ids for the agent inputs (Tasks filter, Push form). */
  private agentIds = h("datalist", { id: "agent-ids" });
  private agentIdsKey = "";
  private scheduled = false;
  /** Renders a background tab (see `invalidate`). */
  private wake = new MessageChannel();
  /** Bumped per scheduled render: a frame and a timer race to draw it once. */
  private renderEpoch = 0;
  private lastSlow = 0;
  private slowTimer = 0;
  private ticker = 0;
  private feedEpoch = 0;
  private listeners = new AbortController();
  /** A pointer is down: views rebuilt wholesale wait for its release. */
  private pressed = false;

  constructor(
    private hub: Hub,
    private role: Role,
  ) {
    window.agenthubStats = this.model.stats;
    this.live = new Live(hub, this.model, () => this.invalidate(), (c, m) => this.connection(c, m), (m) => this.signOut(m));
    this.tasks = new TasksView(this.model, hub, (id) => this.openTask(id), () => this.invalidate(), role);
  }

  mount(): void {
    const nav = h("nav", {});
    for (const [v, label] of VIEWS) {
      if (v === "push" && this.role !== "writer") continue;
      const tab = h("a", { href: `#${v}`, id: `tab-${v}`, onclick: (e: Event) => (e.preventDefault(), this.show(v)) }, label);
      this.tabs.set(v, tab);
      nav.appendChild(tab);
    }
    fill(
      root,
      h(
        "header",
        {},
        h("h1", {}, "agenthub"),
        nav,
        h("span", { class: "spacer" }),
        this.status,
        h("span", { class: `role role-${this.role}`, id: "role", title: roleHelp(this.role) }, this.role === "writer" ? "read + write" : "read-only"),
        h("button", { type: "button", id: "sign-out", onclick: () => this.signOut("") }, "Sign out"),
      ),
      this.banner,
      h("div", { class: "layout" }, this.main, h("aside", { class: "feed-box" }, h("h2", {}, "Live events"), this.feedList)),
      this.detailSlot,
      this.agentIds,
    );
    this.route();
    // A typed or pasted address: `#tasks`, or `#task/<id>` for a task's detail.
    window.addEventListener("hashchange", () => this.route(), { signal: this.listeners.signal });
    this.wake.port1.onmessage = () => this.render();
    // A frame asked for just before the tab was hidden never comes: ask again.
    document.addEventListener(
      "visibilitychange",
      () => {
        this.scheduled = false;
        this.invalidate();
      },
      { signal: this.listeners.signal },
    );
    this.ticker = window.setInterval(() => {
      this.model.sampleDepth(Date.now());
      this.invalidate();
    }, 1000);
    // A click must not land on a node replaced between press and release.
    const signal = this.listeners.signal;
    document.addEventListener("pointerdown", () => (this.pressed = true), { signal });
    document.addEventListener(
      "pointerup",
      () => {
        this.pressed = false;
        this.invalidate();
      },
      { signal },
    );
    void this.live.start();
  }

  /** Show what the address names. */
  private route(): void {
    const hash = decodeURIComponent(location.hash.slice(1));
    if (hash.startsWith("task/")) {
      const id = hash.slice(5);
      if (!this.tabs.has(this.view) || this.main.childElementCount === 0) this.show(this.view, false);
      if (id && this.detail?.taskId !== id) this.openTask(id);
      return;
    }
    const wanted = hash as View;
    this.show(this.tabs.has(wanted) ? wanted : "fleet");
    if (this.detail) this.closeTask();
  }

  private signOut(message: string): void {
    clearInterval(this.ticker);
    this.listeners.abort();
    this.live.stop();
    this.detail?.stop();
    forgetToken();
    location.hash = "";
    showLogin(message);
  }

  private connection(c: Connection, message?: string): void {
    this.model.stats.connection = c;
    const text = c === "live" ? "live" : c === "reconnecting" ? "reconnecting…" : c;
    setText(this.status, text);
    this.status.className = `status ${c}`;
    if (c === "reconnecting" && (message || this.banner.hidden)) {
      this.banner.hidden = false;
      setText(this.banner, `Connection to the hub lost${message ? ` (${message})` : ""}: reconnecting… The feed resumes where it stopped.`);
    } else if (c === "live") {
      this.banner.hidden = true;
    }
  }

  private show(v: View, address = true): void {
    this.view = v;
    if (address) history.replaceState(null, "", this.detail ? `#task/${encodeURIComponent(this.detail.taskId)}` : `#${v}`);
    for (const [name, tab] of this.tabs) tab.classList.toggle("active", name === v);
    if (v === "tasks") fill(this.main, this.tasks.el);
    else if (v === "push") fill(this.main, (this.push ??= pushForm(this.hub, (id) => this.openTask(id))));
    else this.main.replaceChildren();
    this.lastSlow = 0;
    this.invalidate();
  }

  private openTask(id: string): void {
    this.detail?.stop();
    this.detail = new TaskDetail(id, this.hub, this.role, () => this.closeTask(), () => this.invalidate(), (t) => this.whyWaiting(t));
    fill(this.detailSlot, this.detail.el);
    history.replaceState(null, "", `#task/${encodeURIComponent(id)}`);
    this.invalidate();
  }

  private closeTask(): void {
    this.detail?.stop();
    this.detail = undefined;
    this.detailSlot.replaceChildren();
    history.replaceState(null, "", `#${this.view}`);
  }

  private whyWaiting(id: string): string | undefined {
    const t = this.model.tasks.get(id);
    if (!t) return undefined;
    const deps = unfinishedDeps(t, this.model.tasks);
    const why = whyWaiting(t, this.model.agents, this.model.tasks);
    return deps.length ? `${why}: ${deps.map((d) => `${d.id} (${stateName(d.state)})`).join(", ")}` : why;
  }

  private invalidate(): void {
    if (this.scheduled) return;
    this.scheduled = true;
    // A hidden tab gets no animation frames, and its timers are held back
    // to once a second: it still keeps its views current (they are right
    // the moment it is shown again) through a message to itself, which is
    // neither. A tab that is visible but not in front may get frames
    // seldom: a timer draws if no frame came within RENDER_LATEST_MS.
    if (document.hidden) this.wake.port2.postMessage(null);
    else {
      const epoch = ++this.renderEpoch;
      const run = () => {
        if (this.scheduled && this.renderEpoch === epoch) this.render();
      };
      requestAnimationFrame(run);
      setTimeout(run, RENDER_LATEST_MS);
    }
  }

  private render(): void {
    this.scheduled = false;
    const fresh = this.model.fresh;
    this.model.fresh = [];
    this.renderFeed(fresh);
    if (this.view === "tasks") this.tasks.render();
    else if (this.view !== "push") {
      const now = performance.now();
      if (now - this.lastSlow >= SLOW_VIEW_MS && !this.pressed) {
        this.lastSlow = now;
        if (this.view === "fleet") renderFleet(this.main, this.model, (id) => this.openTask(id));
        if (this.view === "queue") renderQueue(this.main, this.model, (id) => this.openTask(id));
        if (this.view === "charts") renderCharts(this.main, this.model);
      } else if (!this.slowTimer) {
        this.slowTimer = window.setTimeout(() => {
          this.slowTimer = 0;
          this.invalidate();
        }, SLOW_VIEW_MS);
      }
    }
    if (!this.pressed) this.detail?.render();
    const key = [...this.model.agents.keys()].sort().join(" ");
    if (key !== this.agentIdsKey) {
      this.agentIdsKey = key;
      this.agentIds.replaceChildren(...[...this.model.agents.keys()].sort().map((id) => h("option", { value: id })));
    }
    // This runs in an animation frame callback: the frame is painted before
    // any task queued now, so the message marks when these events are on screen.
    if (fresh.length) {
      const channel = new MessageChannel();
      channel.port1.onmessage = () => this.model.shown(Date.now(), fresh);
      channel.port2.postMessage(null);
    }
  }

  private renderFeed(fresh: FeedEvent[]): void {
    if (this.feedEpoch !== this.model.epoch) {
      this.feedEpoch = this.model.epoch;
      this.feedList.replaceChildren();
    }
    if (fresh.length === 0) return;
    const rows = fresh.slice(-FEED_ROWS).reverse().map((e) =>
      h(
        "li",
        { "data-seq": e.seq, onclick: () => this.openTask(e.taskId) },
        h("span", { class: "seq" }, `#${e.seq}`),
        h("span", { class: "time" }, clock(e.ts)),
        h("span", { class: `kind k-${kindName(e.kind).toLowerCase()}` }, kindName(e.kind)),
        h("span", { class: "task", title: this.model.tasks.get(e.taskId)?.description ?? "" }, e.taskId),
        h("span", { class: "desc" }, this.model.tasks.get(e.taskId)?.description ?? ""),
        h("span", { class: "agent" }, e.agentId),
        h("span", { class: "state" }, stateName(e.state)),
      ),
    );
    this.feedList.prepend(...rows);
    while (this.feedList.childElementCount > FEED_ROWS) this.feedList.lastElementChild!.remove();
  }
}

function roleHelp(role: Role): string {
  return role === "writer"
    ? "This token may push, cancel and retry (orchestrator or admin)."
    : "This token may read and watch only (viewer).";
}

start();
