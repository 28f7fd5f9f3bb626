// What the page knows, kept current from one event stream: tasks that are
// live (plus recently finished ones), agents, the recent feed, chart buckets.
// Every event goes through `applyEvent`, which drops any seq already seen.

import type { JsonObject, JsonValue } from "@bufbuild/protobuf";
import { Agent_Presence, Priority, Task_State, TaskEvent_Kind, type Agent, type Task, type TaskEvent } from "./gen/agenthub/v1/hub_pb";
import { valueText } from "./api";

export interface TaskRow {
  id: string;
  agent: string;
  description: string;
  state: Task_State;
  priority: Priority;
  caps: string[];
  generation: number;
  attempts: number;
  maxAttempts: number;
  pinned: boolean;
  createdAt: number;
  updatedAt: number;
  /** Seq of the last event reflected in this row. */
  lastSeq: number;
  /** When the task last entered QUEUED (Unix ms). */
  queuedSince: number;
  progress: string;
  /** Tasks it waits for (PushTask depends_on). */
  deps: string[];
  result: string;
  error: string;
  /** Only what an event told us so far; details come from GetTask. */
  partial: boolean;
}

export interface AgentRow {
  id: string;
  name: string;
  caps: string[];
  status: string;
  connected: boolean;
  /** As the hub lists it; "unknown" while the hub is unreachable. */
  presence: Presence;
  awaySince: number;
  connectedAt: number;
  active: Set<string>;
  max: number;
}

export type Presence = "connected" | "away" | "gone" | "unknown";

export interface FeedEvent {
  seq: number;
  taskId: string;
  agentId: string;
  kind: TaskEvent_Kind;
  generation: number;
  state: Task_State;
  ts: number;
  payload: JsonObject;
}

/** One minute of chart data. */
export interface Bucket {
  minute: number;
  completed: number;
  failed: number;
  waits: number[];
  depth: number;
}

export const LIVE_STATES = [Task_State.QUEUED, Task_State.ASSIGNED, Task_State.RUNNING];
export const FINAL_STATES = [Task_State.COMPLETED, Task_State.FAILED, Task_State.CANCELLED];
export const isFinal = (s: Task_State) => FINAL_STATES.includes(s);
export const stateName = (s: Task_State) => Task_State[s] ?? "?";
export const kindName = (k: TaskEvent_Kind) => TaskEvent_Kind[k] ?? "?";
export const priorityName = (p: Priority) => (p === Priority.PRIORITY_UNSPECIFIED ? "NORMAL" : Priority[p]);

/** Finished tasks kept in memory for the table; older ones come from ListTasks. */
const MAX_FINISHED = 20_000;
const FEED_SIZE = 500;
const CHART_MINUTES = 60;
/** Bounded test/diagnostic records (window.agenthubStats). */
const MAX_RECORDED = 200_000;

const num = (v: bigint | number | undefined) => Number(v ?? 0);

function text(v: JsonValue | undefined): string {
  if (v === undefined || v === null) return "";
  return typeof v === "string" ? v : JSON.stringify(v);
}

export function rowFromTask(t: Task): TaskRow {
  return {
    id: t.taskId,
    agent: t.agentId,
    description: t.description,
    state: t.state,
    priority: t.priority,
    caps: t.neededCapabilities,
    generation: num(t.generation),
    attempts: t.attempts,
    maxAttempts: t.maxAttempts,
    pinned: t.pinned,
    createdAt: num(t.createdAtMs),
    updatedAt: num(t.updatedAtMs),
    lastSeq: num(t.lastSeq),
    queuedSince: t.state === Task_State.QUEUED ? num(t.updatedAtMs) : 0,
    progress: "",
    deps: t.dependsOn,
    result: valueText(t.result),
    error: valueText(t.error),
    partial: false,
  };
}

export function feedEvent(e: TaskEvent): FeedEvent {
  return {
    seq: num(e.seq),
    taskId: e.taskId,
    agentId: e.agentId,
    kind: e.kind,
    generation: num(e.generation),
    state: e.state,
    ts: num(e.timestampMs),
    payload: e.payload ?? {},
  };
}

function presenceOf(a: Agent): Presence {
  switch (a.presence) {
    case Agent_Presence.CONNECTED:
      return "connected";
    case Agent_Presence.AWAY:
      return "away";
    case Agent_Presence.GONE:
      return "gone";
    default:
      // A hub from before presence was listed.
      return a.connected ? "connected" : "away";
  }
}

/** Counters a test (or a curious operator, from the console) can read. */
export interface Stats {
  lastSeq: number;
  applied: number;
  duplicates: number;
  gaps: number;
  reconnects: number;
  connection: string;
  /** Applied seqs, in order (bounded). */
  seqs: number[];
  /** Event timestamp → the frame that showed it, ms (bounded). */
  latencies: number[];
  /** Event timestamp → its arrival in the page, ms (bounded): the hub's and the network's share. */
  arrivals: number[];
}

export class Model {
  tasks = new Map<string, TaskRow>();
  /** Creation order. */
  order: TaskRow[] = [];
  agents = new Map<string, AgentRow>();
  /** Newest first. */
  feed: FeedEvent[] = [];
  buckets = new Map<number, Bucket>();
  /** Events applied since the last render (the feed shows them). */
  fresh: FeedEvent[] = [];
  /** Bumped when the page starts over on another event log. */
  epoch = 0;
  /** Seq the task snapshot was taken at. */
  snapshotSeq = 0;
  /** Bumped on every change; views re-filter only when it moved. */
  version = 0;
  /** Tasks referenced by events but not yet known in detail. */
  missing = new Set<string>();
  stats: Stats = { lastSeq: 0, applied: 0, duplicates: 0, gaps: 0, reconnects: 0, connection: "idle", seqs: [], latencies: [], arrivals: [] };

  /** A different event log: forget every task, event and seq. */
  reset(): void {
    this.clearTasks();
    this.feed = [];
    this.fresh = [];
    this.buckets.clear();
    this.snapshotSeq = 0;
    this.stats.lastSeq = 0;
    this.epoch++;
  }

  clearTasks(): void {
    this.tasks.clear();
    this.order = [];
    this.missing.clear();
    for (const a of this.agents.values()) a.active.clear();
    this.version++;
  }

  /** Add tasks from a snapshot or a page (creation order kept). */
  addTasks(list: Task[]): void {
    let appended = false;
    for (const t of list) {
      const known = this.tasks.get(t.taskId);
      const row = rowFromTask(t);
      if (known) {
        if (known.partial || row.lastSeq >= known.lastSeq) {
          const progress = known.progress;
          Object.assign(known, row, { progress: progress || row.progress });
        }
        continue;
      }
      this.tasks.set(row.id, row);
      this.order.push(row);
      appended = true;
      // Events that arrived while this page was in flight.
      for (let i = this.feed.length - 1; i >= 0; i--) {
        const ev = this.feed[i];
        if (ev.taskId === row.id && ev.seq > row.lastSeq) this.update(row, ev);
      }
      this.trackAgentTask(row);
    }
    if (appended) this.order.sort((a, b) => a.createdAt - b.createdAt || (a.id < b.id ? -1 : 1));
    this.version++;
  }

  setAgents(list: Agent[]): void {
    const next = new Map<string, AgentRow>();
    for (const a of list) {
      next.set(a.agentId, {
        id: a.agentId,
        name: a.name,
        caps: a.capabilities,
        status: a.status,
        connected: a.connected,
        presence: presenceOf(a),
        awaySince: num(a.awaySinceMs),
        connectedAt: num(a.connectedAt),
        active: new Set(a.activeTaskIds),
        max: a.maxConcurrency || 1,
      });
    }
    this.agents = next;
    this.hubReachable = true;
    this.version++;
  }

  /** The hub stopped answering: what it last said about agents may be stale. */
  lostHub(): void {
    if (!this.hubReachable) return;
    this.hubReachable = false;
    this.version++;
  }

  /** False from a broken stream until the hub lists agents again. */
  hubReachable = true;

  /** How an agent is shown: what the hub listed, or unknown while it cannot be asked. */
  presence(a: AgentRow): Presence {
    return this.hubReachable ? a.presence : "unknown";
  }

  private trackAgentTask(row: TaskRow): void {
    if (row.agent && (row.state === Task_State.ASSIGNED || row.state === Task_State.RUNNING)) {
      this.agents.get(row.agent)?.active.add(row.id);
    }
  }

  /** Apply one event; false if its seq was already applied. */
  applyEvent(ev: FeedEvent): boolean {
    const s = this.stats;
    if (ev.seq <= s.lastSeq) {
      s.duplicates++;
      return false;
    }
    if (s.lastSeq !== 0 && ev.seq !== s.lastSeq + 1) s.gaps++;
    s.lastSeq = ev.seq;
    s.applied++;
    if (s.seqs.length < MAX_RECORDED) s.seqs.push(ev.seq);
    if (s.arrivals.length < MAX_RECORDED) s.arrivals.push(Date.now() - ev.ts);

    this.feed.unshift(ev);
    if (this.feed.length > FEED_SIZE) this.feed.length = FEED_SIZE;
    this.fresh.push(ev);
    this.chart(ev);

    let row = this.tasks.get(ev.taskId);
    if (!row) {
      if (ev.kind === TaskEvent_Kind.CREATED) {
        row = this.rowFromCreated(ev);
        this.tasks.set(row.id, row);
        this.insertRow(row);
      } else if (!isFinal(ev.state) && ev.seq > this.snapshotSeq) {
        // Live and not in the snapshot (e.g. re-queued between snapshot pages).
        row = this.rowFromCreated(ev);
        row.partial = true;
        this.tasks.set(row.id, row);
        this.insertRow(row);
        this.missing.add(row.id);
      } else {
        this.version++;
        return true;
      }
    } else if (ev.seq <= row.lastSeq) {
      this.version++;
      return true;
    }
    this.update(row, ev);
    this.version++;
    return true;
  }

  /** Into `order`, which stays in creation order (events replayed from before the snapshot are older than its rows). */
  private insertRow(row: TaskRow): void {
    const o = this.order;
    const before = (a: TaskRow, b: TaskRow) => a.createdAt < b.createdAt || (a.createdAt === b.createdAt && a.id < b.id);
    if (o.length === 0 || !before(row, o[o.length - 1])) {
      o.push(row);
      return;
    }
    let lo = 0;
    let hi = o.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (before(o[mid], row)) lo = mid + 1;
      else hi = mid;
    }
    o.splice(lo, 0, row);
  }

  private rowFromCreated(ev: FeedEvent): TaskRow {
    const p = ev.payload;
    const prio = typeof p.priority === "string" ? (Priority as unknown as Record<string, Priority>)[p.priority] : undefined;
    return {
      id: ev.taskId,
      agent: ev.agentId,
      description: typeof p.description === "string" ? p.description : "",
      state: ev.state,
      priority: prio ?? Priority.NORMAL,
      caps: Array.isArray(p.needed_capabilities) ? p.needed_capabilities.map(String) : [],
      generation: ev.generation,
      attempts: 0,
      maxAttempts: typeof p.max_attempts === "number" ? p.max_attempts : 0,
      pinned: p.pinned === true,
      createdAt: ev.ts,
      updatedAt: ev.ts,
      lastSeq: 0,
      queuedSince: ev.ts,
      progress: "",
      deps: Array.isArray(p.depends_on) ? p.depends_on.map(String) : [],
      result: "",
      error: "",
      partial: false,
    };
  }

  private update(row: TaskRow, ev: FeedEvent): void {
    const before = row.state;
    const beforeAgent = row.agent;
    row.state = ev.state;
    row.lastSeq = ev.seq;
    row.updatedAt = ev.ts;
    if (ev.generation) row.generation = ev.generation;
    switch (ev.kind) {
      case TaskEvent_Kind.ASSIGNED:
        row.attempts++;
        row.agent = ev.agentId;
        row.progress = "";
        break;
      case TaskEvent_Kind.PROGRESS:
        row.progress = text(ev.payload.progress);
        break;
      case TaskEvent_Kind.COMPLETED:
        row.result = text(ev.payload.result);
        break;
      case TaskEvent_Kind.FAILED:
        row.error = text(ev.payload.error ?? ev.payload.reason);
        break;
      case TaskEvent_Kind.RETRIED:
        row.attempts = 0;
        row.error = "";
        break;
      case TaskEvent_Kind.RECLAIMED:
      case TaskEvent_Kind.REJECTED:
        row.error = text(ev.payload.reason ?? ev.payload.error);
        break;
    }
    if (row.state === Task_State.QUEUED && before !== Task_State.QUEUED) row.queuedSince = ev.ts;
    const busy = (s: Task_State) => s === Task_State.ASSIGNED || s === Task_State.RUNNING;
    if (busy(before) && beforeAgent && (!busy(row.state) || beforeAgent !== row.agent)) {
      this.agents.get(beforeAgent)?.active.delete(row.id);
    }
    if (busy(row.state) && row.agent) this.agents.get(row.agent)?.active.add(row.id);
    if (isFinal(row.state) && !isFinal(before)) this.finished++;
    if (this.finished > MAX_FINISHED) this.dropOldFinished();
  }

  private finished = 0;

  private dropOldFinished(): void {
    const keep = MAX_FINISHED / 2;
    let finished = this.order.filter((r) => isFinal(r.state)).length;
    this.order = this.order.filter((r) => {
      if (finished > keep && isFinal(r.state)) {
        finished--;
        this.tasks.delete(r.id);
        return false;
      }
      return true;
    });
    this.finished = finished;
  }

  private bucket(ts: number): Bucket | undefined {
    const minute = Math.floor(ts / 60_000);
    if (minute <= Math.floor(Date.now() / 60_000) - CHART_MINUTES) return undefined;
    let b = this.buckets.get(minute);
    if (!b) {
      b = { minute, completed: 0, failed: 0, waits: [], depth: -1 };
      this.buckets.set(minute, b);
      for (const m of this.buckets.keys()) if (m <= minute - CHART_MINUTES) this.buckets.delete(m);
    }
    return b;
  }

  private chart(ev: FeedEvent): void {
    const b = this.bucket(ev.ts);
    if (!b) return;
    if (ev.kind === TaskEvent_Kind.COMPLETED) b.completed++;
    if (ev.state === Task_State.FAILED && ev.kind !== TaskEvent_Kind.RETRIED) b.failed++;
    if (ev.kind === TaskEvent_Kind.ASSIGNED) {
      const row = this.tasks.get(ev.taskId);
      if (row && row.queuedSince && ev.seq > row.lastSeq) b.waits.push(Math.max(0, ev.ts - row.queuedSince));
    }
  }

  /** Record the current queue depth in this minute's bucket. */
  sampleDepth(now: number): void {
    const b = this.bucket(now);
    if (b) b.depth = this.queued().length;
  }

  queued(): TaskRow[] {
    return this.order.filter((r) => r.state === Task_State.QUEUED);
  }

  /** Called after a frame showed `fresh` events. */
  shown(now: number, events: FeedEvent[]): void {
    const l = this.stats.latencies;
    for (const ev of events) if (l.length < MAX_RECORDED) l.push(now - ev.ts);
  }
}
