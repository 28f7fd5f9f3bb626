// Task detail: the task (GetTask) and its whole event timeline
// (WatchTaskEvents for this task from seq 0: the stored history, then live),
// grouped by generation; its dependencies and deadlines; its output
// (WatchTaskOutput: stored, then live), split by the attempt (generation)
// each chunk was written under, without the `::progress` lines; Cancel and Retry for tokens that may.

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
  /** The task's output shown so far (the latest MAX_OUTPUT characters),
   *  one part per run of chunks of one generation. */
  private output: OutputPart[] = [];
  private outputChars = 0;
  private outputCut = false;
  private outputOffset = 0n;
  /** Wakes the output follower after its stream ended (the task was retried). */
  private outputWake: (() => void) | undefined;
  /** Cancel was pressed once: the next press confirms. */
  private confirming = false;

  constructor(
    readonly taskId: string,
    private hub: Hub,
    private role: Role,
    private close: () => void,
    private changed: () => void,
    /** Why a queued task waits, as the Queue view says it. */
    private why: (id: string) => string | undefined = () => undefined,
  ) {
    this.el = h("aside", { class: "detail", id: "task-detail", "data-task": taskId });
    void this.load();
  }

  stop(): void {
    this.abort.abort();
    this.outputWake?.();
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
          // A new attempt: its output follows on from where the last ended.
          if (ev.kind === TaskEvent_Kind.RETRIED) this.outputWake?.();
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
          this.addOutput(Number(c.generation), withoutProgress(c.data));
          this.mark();
        }
        // Ended: the task is finished and all its output was sent. A retry
        // starts another attempt: follow its output from where this ended.
        const last = this.events.at(-1);
        if (!last || isFinal(last.state)) await new Promise<void>((wake) => (this.outputWake = wake));
        this.outputWake = undefined;
        continue;
      } catch {
        if (this.abort.signal.aborted) return;
      }
      await new Promise((r) => setTimeout(r, 1000));
    }
  }

  /** Append output of `generation`, keeping the latest MAX_OUTPUT characters. */
  private addOutput(generation: number, text: string): void {
    if (!text) return;
    const last = this.output.at(-1);
    if (last && last.generation === generation) last.text += text;
    else this.output.push({ generation, text });
    this.outputChars += text.length;
    while (this.outputChars > MAX_OUTPUT && this.output.length) {
      const first = this.output[0];
      const over = this.outputChars - MAX_OUTPUT;
      this.outputCut = true;
      if (first.text.length <= over) {
        this.output.shift();
        this.outputChars -= first.text.length;
      } else {
        first.text = first.text.slice(over);
        this.outputChars -= over;
      }
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
    this.confirming = false;
    try {
      this.task = what === "cancel" ? await this.hub.cancelTask({ taskId: this.taskId }) : await this.hub.retryTask({ taskId: this.taskId });
      this.message = what === "cancel" ? "Cancelled." : "Queued again.";
      if (what === "retry") this.outputWake?.();
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
    // Attempts in order: the generations the task was assigned under.
    const attempts: number[] = [];
    for (const e of this.events) if (e.kind === TaskEvent_Kind.ASSIGNED && !attempts.includes(e.generation)) attempts.push(e.generation);
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
        canCancel && !this.confirming ? h("button", { type: "button", id: "cancel-task", class: "danger", onclick: () => ((this.confirming = true), this.mark()) }, "Cancel task") : null,
        canCancel && this.confirming
          ? h(
              "span",
              { class: "confirm", id: "cancel-confirm" },
              "Cancel this task? ",
              h("button", { type: "button", id: "cancel-task-yes", class: "danger", onclick: () => void this.act("cancel") }, "Yes, cancel it"),
              h("button", { type: "button", id: "cancel-task-no", onclick: () => ((this.confirming = false), this.mark()) }, "Keep it"),
            )
          : null,
        canRetry ? h("button", { type: "button", id: "retry-task", onclick: () => void this.act("retry") }, "Retry task") : null,
        this.message ? h("span", { class: "message" }, this.message) : null,
      ),
      h(
        "dl",
        { class: "facts" },
        ...fact("State", h("span", { class: `st-${stateName(t.state).toLowerCase()}`, id: "detail-state" }, stateName(t.state))),
        ...(t.state === Task_State.QUEUED && this.why(t.taskId) ? fact("Waiting", h("span", { id: "detail-why" }, this.why(t.taskId)!)) : []),
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
        ...(lastProgress && !isFinal(t.state) ? fact("Progress", progressView(lastProgress.payload.progress ?? lastProgress.payload)) : []),
        ...(t.result ? fact("Result", h("pre", { id: "detail-result" }, valueText(t.result))) : []),
        // A retried task's error belongs to an attempt that is over: shown only once the task ended again.
        ...(t.error && isFinal(t.state) ? fact("Error", h("pre", { class: "error", id: "detail-error" }, valueText(t.error))) : []),
      ),
      ...(this.output.length
        ? [
            h("h3", {}, "Output"),
            this.outputCut ? h("p", { class: "muted" }, `Earlier output not shown (the latest ${MAX_OUTPUT / 1024} KiB is).`) : null,
            h(
              "div",
              { id: "detail-output" },
              ...this.output.map((p) =>
                h(
                  "section",
                  { class: "attempt", "data-generation": p.generation },
                  h("h4", {}, attemptTitle(p.generation, attempts)),
                  h("pre", { class: "output" }, p.text),
                ),
              ),
            ),
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
              ...evs.map((e, i) =>
                h(
                  "li",
                  { "data-seq": e.seq, "data-kind": kindName(e.kind) },
                  h("span", { class: "seq" }, `#${e.seq}`),
                  h("span", { class: "time", title: dateTime(e.ts) }, clock(e.ts)),
                  h("span", { class: "delta", title: "since the previous event" }, i ? `+${duration(e.ts - evs[i - 1].ts)}` : ""),
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

/** Output of one generation, in arrival order. */
interface OutputPart {
  generation: number;
  text: string;
}

/** The header of one attempt's output: its ordinal among the task's
 *  assignments (once the timeline has it) and its generation. */
function attemptTitle(generation: number, attempts: number[]): string {
  if (generation === 0) return "Output of an unknown attempt (stored before generations were kept)";
  const n = attempts.indexOf(generation);
  return n < 0 ? `Generation ${generation}` : `Attempt ${n + 1} · generation ${generation}`;
}

/** Output without the `::progress` lines (the sidecar turns them into progress events, shown above). */
function withoutProgress(data: string): string {
  return data.includes("::progress") ? data.replace(/^::progress[^\n]*(\n|$)/gm, "") : data;
}

/** A duration for a person: 850 ms, 4.2 s, 3 min 5 s, 2 h 10 min. */
export function duration(ms: number): string {
  if (ms < 1000) return `${Math.max(0, Math.round(ms))} ms`;
  if (ms < 60_000) return `${(ms / 1000).toFixed(1)} s`;
  const s = Math.round(ms / 1000);
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

/** A number (0–100, or a fraction up to 1) or an object with `percent` as a bar; anything else as text. */
export function progressView(p: unknown): HTMLElement {
  const pct = percentOf(p);
  if (pct === undefined) return h("pre", {}, typeof p === "string" ? p : JSON.stringify(p));
  const inner = h("div", {});
  inner.style.width = `${pct}%`;
  const message = p && typeof p === "object" && "message" in p ? ` ${String((p as { message: unknown }).message)}` : "";
  return h("span", { class: "pbar", title: JSON.stringify(p) }, h("div", { class: "bar" }, inner), h("span", {}, `${Math.round(pct)}%${message}`));
}

export function percentOf(p: unknown): number | undefined {
  let v = p;
  if (v && typeof v === "object" && !Array.isArray(v)) v = (v as Record<string, unknown>).percent ?? (v as Record<string, unknown>).progress;
  if (typeof v === "string" && v.trim() !== "" && !Number.isNaN(Number(v))) v = Number(v);
  if (typeof v !== "number" || !Number.isFinite(v)) return undefined;
  const pct = v > 0 && v < 1 ? v * 100 : v;
  return Math.min(100, Math.max(0, pct));
}
