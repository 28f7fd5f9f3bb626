// The connection that keeps the model current: a snapshot of live tasks
// (ListTasks, paged, per live state), then WatchTaskEvents from the
// snapshot's seq; agents come from the WatchAgents stream. When the stream breaks it shows
// "reconnecting…" and resumes from the last applied seq: the model drops any
// seq it already has, so there is no duplicate and, since the hub replays
// everything after the cursor, no gap. The cursor names its log (log_id): a
// hub whose store was replaced answers FAILED_PRECONDITION and the page
// starts over from a new snapshot.

import { Code, classify, explain, isCode, type Hub } from "./api";
import { feedEvent, LIVE_STATES, type Model } from "./model";
import { Task_State } from "./gen/agenthub/v1/hub_pb";

const PAGE_SIZE = 1000;
/** Events before the snapshot replayed for the charts (last hour, bounded). */
const CHART_BACKFILL = 5000;
const RETRY_MIN_MS = 250;
const RETRY_MAX_MS = 4000;

export type Connection = "connecting" | "live" | "reconnecting" | "stopped";

export class Live {
  private abort = new AbortController();
  private fetching = new Set<string>();
  /** The hub's event log our seqs belong to (ListTasksResponse.log_id). */
  private logId = "";

  constructor(
    private hub: Hub,
    private model: Model,
    private changed: () => void,
    private status: (c: Connection, message?: string) => void,
    private fatal: (message: string) => void,
  ) {}

  stop(): void {
    this.abort.abort();
    this.status("stopped");
  }

  get stopped(): boolean {
    return this.abort.signal.aborted;
  }

  async start(): Promise<void> {
    this.status("connecting");
    let retry = RETRY_MIN_MS;
    let after: number | undefined;
    let firstWatch = true;
    void this.followAgents();
    while (!this.stopped) {
      try {
        if (after === undefined) {
          await this.snapshot();
          after = Math.max(0, this.model.snapshotSeq - CHART_BACKFILL);
          firstWatch = true;
        }
        this.status("live");
        const stream = this.hub.watchTaskEvents({ afterSeq: BigInt(after), logId: this.logId || undefined }, { signal: this.abort.signal });
        for await (const e of stream) {
          const ev = feedEvent(e);
          if (this.model.applyEvent(ev)) {
            if (this.model.missing.size) this.fetchMissing();
            this.changed();
          }
          retry = RETRY_MIN_MS;
        }
        if (this.stopped) return;
        // The hub ended the stream (shutting down): reconnect.
      } catch (e) {
        if (this.stopped) return;
        if (classify(e) === "token" || classify(e) === "forbidden") {
          this.fatal(explain(e));
          this.stop();
          return;
        }
        if (isCode(e, Code.FailedPrecondition)) {
          // Not the log our cursor belongs to (the hub's store was replaced):
          // everything we hold is from another history. Start over.
          after = undefined;
          this.model.reset();
          continue;
        }
        if (isCode(e, Code.OutOfRange)) {
          if (firstWatch && after !== undefined && after < this.model.snapshotSeq) {
            // History before the snapshot is gone: no backfill for the charts.
            after = this.model.snapshotSeq;
          } else {
            // Our cursor is older than the retained history: start over.
            after = undefined;
            this.model.clearTasks();
          }
          continue;
        }
        this.status("reconnecting", explain(e));
      }
      firstWatch = false;
      this.model.stats.reconnects++;
      this.status("reconnecting");
      await sleep(retry, this.abort.signal);
      retry = Math.min(retry * 2, RETRY_MAX_MS);
      if (after !== undefined) after = Math.max(after, this.model.stats.lastSeq);
    }
  }

  /** Live tasks, page by page; the watch starts at the oldest page's seq. */
  private async snapshot(): Promise<void> {
    this.model.clearTasks();
    let asOf = Number.MAX_SAFE_INTEGER;
    for (const state of LIVE_STATES) {
      let pageToken = "";
      do {
        const page = await this.hub.listTasks({ state, pageSize: PAGE_SIZE, pageToken }, { signal: this.abort.signal });
        asOf = Math.min(asOf, Number(page.asOfSeq));
        this.logId = page.logId;
        this.model.addTasks(page.tasks);
        pageToken = page.nextPageToken;
      } while (pageToken);
    }
    this.model.snapshotSeq = asOf === Number.MAX_SAFE_INTEGER ? 0 : asOf;
    this.changed();
  }

  /**
   * Agents: WatchAgents sends the whole list at once and again whenever an
   * agent connects, leaves, changes status or takes or frees a slot; the
   * stream is followed (and resumed) for as long as the page is open.
   */
  private async followAgents(): Promise<void> {
    let retry = RETRY_MIN_MS;
    while (!this.stopped) {
      try {
        for await (const r of this.hub.watchAgents({}, { signal: this.abort.signal })) {
          this.applyAgents(r.agents);
          retry = RETRY_MIN_MS;
        }
      } catch (e) {
        this.refreshFailed(e);
      }
      if (this.stopped) return;
      // Until the hub lists them again, nobody knows whether they are there.
      this.model.lostHub();
      this.changed();
      await sleep(retry, this.abort.signal);
      retry = Math.min(retry * 2, RETRY_MAX_MS);
    }
  }

  private applyAgents(agents: Parameters<Model["setAgents"]>[0]): void {
    this.model.setAgents(agents);
    // Slots follow the task table between lists.
    for (const row of this.model.order) {
      if (row.agent && (row.state === Task_State.ASSIGNED || row.state === Task_State.RUNNING)) this.model.agents.get(row.agent)?.active.add(row.id);
    }
    this.changed();
  }

  /** A token revoked while the page is open ends the agents stream first when no event flows. */
  private refreshFailed(e: unknown): void {
    if (this.stopped) return;
    if (classify(e) === "token" || classify(e) === "forbidden") {
      this.fatal(explain(e));
      this.stop();
    }
  }

  /** Details of tasks we learned about from an event only. */
  private fetchMissing(): void {
    for (const id of this.model.missing) {
      if (this.fetching.has(id) || this.fetching.size >= 4) continue;
      this.fetching.add(id);
      this.model.missing.delete(id);
      this.hub
        .getTask({ taskId: id }, { signal: this.abort.signal })
        .then((t) => {
          this.model.addTasks([t]);
          this.changed();
        })
        .catch(() => undefined)
        .finally(() => {
          this.fetching.delete(id);
          if (this.model.missing.size) this.fetchMissing();
        });
    }
  }
}

function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const t = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => {
      clearTimeout(t);
      resolve();
    });
  });
}
