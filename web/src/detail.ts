// Task detail: the task (GetTask) and its whole event timeline
// (WatchTaskEvents for this task from seq 0: the stored history, then live),
// grouped by generation; its dependencies and deadlines; its output
// (WatchTaskOutput: stored, then live); Cancel and Retry for tokens that may.

import { explain, valueText, type Hub, type Role } from "./api";
import { clock, dateTime, fill, h } from "./dom";
import { Task_State, TaskEvent_Kind, type Task } from "./gen/agenthub/v1/hub_pb";
import { feedEvent, isFinal, kindName, priorityName, stateName, type FeedEvent } from "./model";

/** Events drawn in the timeline (the latest). */
const MAX_TIMELINE = 500;
/** Output characters kept for display (the latest). */
const MAX_OUTPUT = 64 * 1024;
const REFRESH_MS = 150;

export class TaskDetail {
  readonly el: HTMLElement;
  private abort = new AbortController();
  private task: Task | undefined;
  private events: FeedEvent[] = [];
  private lastSeq = 0;
  private message = "";
  private dirty = true;
  private refreshing = false;
  /** The task's output shown so far (the latest MAX_OUTPUT characters). */
  private output = "";
  private outputCut = false;
  private outputOffset = 0n;

  constructor(
    readonly taskId: string,
    private hub: Hub,
    private role: Role,
    private close: () => void,
    private changed: () => void,
  ) {
    this.el = h("aside", { class: "detail", id: "task-detail", "data-task": taskId });
    void this.load();
  }

  stop(): void {
    this.abort.abort();
  }

  private async load(): Promise<void> {
    try {
      this.task = await this.hub.getTask({ taskId: this.taskId }, { signal: this.abort.signal });
      this.mark();
    } catch (e) {
      if (this.abort.signal.aborted) return;
      this.message = explain(e);
      this.mark();
      return;
    }
    void this.followOutput();
    // The timeline: every stored event of this task, then live ones. A
    // broken stream resumes after the last seq shown.
    while (!this.abort.signal.aborted) {
      try {
        const stream = this.hub.watchTaskEvents({ taskId: this.taskId, afterSeq: BigInt(this.lastSeq) }, { signal: this.abort.signal });
        for await (const e of stream) {
          const ev = feedEvent(e);
          if (ev.seq <= this.lastSeq) continue;
          this.lastSeq = ev.seq;
          this.events.push(ev);
          if (this.task && ev.seq > Number(this.task.lastSeq)) this.refreshSoon();
          this.mark();
        }
      } catch {
        if (this.abort.signal.aborted) return;
      }
      await new Promise((r) => setTimeout(r, 1000));
    }
  }

  /** The task's output: what is stored, then live until the task ends. A
   *  broken stream resumes at the offset reached. */
  private async followOutput(): Promise<void> {
    while (!this.abort.signal.aborted) {
      try {
        const stream = this.hub.watchTaskOutput({ taskId: this.taskId, afterOffset: this.outputOffset }, { signal: this.abort.signal });
        for await (const c of stream) {
          this.outputOffset = c.offset + BigInt(new TextEncoder().encode(c.data).length);
          this.output += c.data;
          if (this.output.length > MAX_OUTPUT) {
            this.output = this.output.slice(-MAX_OUTPUT);
            this.outputCut = true;
          }
          this.mark();
        }
        // Ended: the task is finished and all its output was sent.
        return;
      } catch {
        if (this.abort.signal.aborted) return;
      }
      await new Promise((r) => setTimeout(r, 1000));
    }
  }

  /** Re-read the task after events, at most every REFRESH_MS (a busy task sends many). */
  private refreshSoon(): void {
    if (this.refreshing) return;
    this.refreshing = true;
    setTimeout(async () => {
      try {
        this.task = await this.hub.getTask({ taskId: this.taskId }, { signal: this.abort.signal });
        this.mark();
      } catch {
        // Shown as it was until the next event.
      } finally {
        this.refreshing = false;
      }
    }, REFRESH_MS);
  }

  private mark(): void {
    this.dirty = true;
    this.changed();
  }

  private async act(what: "cancel" | "retry"): Promise<void> {
    this.message = "";
    try {
      this.task = what === "cancel" ? await this.hub.cancelTask({ taskId: this.taskId }) : await this.hub.retryTask({ taskId: this.taskId });
      this.message = what === "cancel" ? "Cancelled." : "Queued again.";
    } catch (e) {
      this.message = explain(e);
    }
    this.mark();
  }

  render(): void {
    if (!this.dirty) return;
    this.dirty = false;
    const t = this.task;
    const header = h("div", { class: "detail-head" }, h("h2", {}, this.taskId), h("button", { type: "button", class: "close", onclick: () => this.close(), "aria-label": "Close" }, "×"));
    if (!t) {
      fill(this.el, header, h("p", { class: this.message ? "error" : "muted" }, this.message || "loading…"));
      return;
    }
    const writer = this.role === "writer";
    const canCancel = writer && !isFinal(t.state);
    const canRetry = writer && (t.state === Task_State.FAILED || t.state === Task_State.CANCELLED);
    const lastProgress = [...this.events].reverse().find((e) => e.kind === TaskEvent_Kind.PROGRESS);
    const generations = new Map<number, FeedEvent[]>();
    const hidden = Math.max(0, this.events.length - MAX_TIMELINE);
    for (const e of this.events.slice(hidden)) {
      const g = generations.get(e.generation) ?? [];
      g.push(e);
      generations.set(e.generation, g);
    }
    fill(
      this.el,
      header,
      h(
        "div",
        { class: "actions" },
        canCancel ? h("button", { type: "button", id: "cancel-task", class: "danger", onclick: () => void this.act("cancel") }, "Cancel task") : null,
        canRetry ? h("button", { type: "button", id: "retry-task", onclick: () => void this.act("retry") }, "Retry task") : null,
        this.message ? h("span", { class: "message" }, this.message) : null,
      ),
      h(
        "dl",
        { class: "facts" },
        ...fact("State", h("span", { class: `st-${stateName(t.state).toLowerCase()}`, id: "detail-state" }, stateName(t.state))),
        ...fact("Agent", `${t.agentId || "—"}${t.pinned ? " (pinned)" : ""}`),
        ...fact("Priority", priorityName(t.priority)),
        ...fact("Generation", String(t.generation)),
        ...fact("Attempts", `${t.attempts} of ${t.maxAttempts}`),
        ...fact("Needs", t.neededCapabilities.join(", ") || "—"),
        ...fact("Created", dateTime(Number(t.createdAtMs))),
        ...fact("Updated", dateTime(Number(t.updatedAtMs))),
        ...fact("Description", t.description || "—"),
        ...(t.dependsOn.length
          ? fact("Depends on", h("span", { id: "detail-depends-on" }, ...t.dependsOn.flatMap((d, i) => [i ? ", " : "", h("code", {}, d)])))
          : []),
        ...(t.queueTtlMs ? fact("Queue TTL", `${Number(t.queueTtlMs) / 1000} s (until ${dateTime(Number(t.createdAtMs) + Number(t.queueTtlMs))})`) : []),
        ...(t.deadlineMs ? fact("Deadline", dateTime(Number(t.deadlineMs))) : []),
        ...(t.metadata && Object.keys(t.metadata).length ? fact("Metadata", h("pre", {}, JSON.stringify(t.metadata, null, 1))) : []),
        ...(lastProgress ? fact("Progress", h("pre", {}, JSON.stringify(lastProgress.payload.progress ?? lastProgress.payload))) : []),
        ...(t.result ? fact("Result", h("pre", { id: "detail-result" }, valueText(t.result))) : []),
        ...(t.error ? fact("Error", h("pre", { class: "error", id: "detail-error" }, valueText(t.error))) : []),
      ),
      ...(this.output
        ? [
            h("h3", {}, "Output"),
            this.outputCut ? h("p", { class: "muted" }, `Earlier output not shown (the latest ${MAX_OUTPUT / 1024} KiB is).`) : null,
            h("pre", { class: "output", id: "detail-output" }, this.output),
          ]
        : []),
      h("h3", {}, "Timeline"),
      hidden ? h("p", { class: "muted" }, `${hidden} earlier events not shown (the latest ${MAX_TIMELINE} are).`) : null,
      h(
        "div",
        { class: "timeline", id: "timeline" },
        ...[...generations].map(([g, evs]) =>
          h(
            "section",
            { class: "generation" },
            h("h4", {}, g === 0 ? "Before assignment" : `Generation ${g}`),
            h(
              "ol",
              {},
              ...evs.map((e) =>
                h(
                  "li",
                  { "data-seq": e.seq, "data-kind": kindName(e.kind) },
                  h("span", { class: "seq" }, `#${e.seq}`),
                  h("span", { class: "time" }, clock(e.ts)),
                  h("span", { class: `kind k-${kindName(e.kind).toLowerCase()}` }, kindName(e.kind)),
                  e.agentId ? h("span", { class: "agent" }, e.agentId) : null,
                  shownPayload(e) ? h("code", {}, shownPayload(e)) : null,
                ),
              ),
            ),
          ),
        ),
      ),
    );
  }
}

/** The payload without what the row already shows (task id, generation). */
function shownPayload(e: FeedEvent): string {
  const { task_id: _t, generation: _g, ...rest } = e.payload;
  return Object.keys(rest).length ? JSON.stringify(rest) : "";
}

function fact(label: string, value: string | Node): Node[] {
  return [h("dt", {}, label), h("dd", {}, value)];
}
