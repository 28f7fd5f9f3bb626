//! The sidecar's one owner of mutable state: the task table (mirrored in the
//! state file), the watchers of running commands, and the current
//! connection's outbound queue. The main loop in `mod.rs` feeds it hub frames
//! and watcher events, one at a time.

use std::collections::{HashMap, HashSet};

use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::procs;
use super::runner::{self, Outcome, RunConfig, RunEvent, RunHandle, StopReason};
use super::state::{StateFile, TaskRecord};
use crate::model::now_ms;

/// Hub errors after which a pending report can never be applied.
const REPORT_DEAD_ERRORS: [&str; 4] = [
    "task_finished",
    "not_task_owner",
    "stale_generation",
    "unknown_task",
];

/// Pause before a report the hub could not store is sent again.
const REPORT_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

pub(crate) struct Sidecar {
    run_cfg: RunConfig,
    max_concurrency: u32,
    pub state: StateFile,
    /// Watchers of commands this process follows: task_id → (the generation
    /// the run started under, handle).
    runs: HashMap<String, (u64, RunHandle)>,
    /// Tasks whose final report was sent again under the generation of a
    /// `task_continue`: the `stale_generation` error the hub answers to the
    /// copy sent before is about that copy, not about this one.
    resent: HashSet<String>,
    /// Frames for the hub; `None` while disconnected.
    out: Option<mpsc::Sender<String>>,
    /// Given to every watcher; the main loop owns the receiver.
    run_tx: mpsc::UnboundedSender<RunEvent>,
    /// SIGTERM received: no new tasks.
    pub draining: bool,
}

impl Sidecar {
    pub fn new(
        run_cfg: RunConfig,
        max_concurrency: u32,
        state: StateFile,
        run_tx: mpsc::UnboundedSender<RunEvent>,
    ) -> Sidecar {
        Sidecar {
            run_cfg,
            max_concurrency,
            state,
            runs: HashMap::new(),
            resent: HashSet::new(),
            out: None,
            run_tx,
            draining: false,
        }
    }

    /// Commands this process is following.
    pub fn running(&self) -> usize {
        self.runs.len()
    }

    /// Tasks held at all (running, or waiting for an ack or a recovery answer).
    pub fn held(&self) -> usize {
        self.state.data.tasks.len()
    }

    fn send(&self, msg: Value) {
        match &self.out {
            Some(out) => {
                if out.try_send(msg.to_string()).is_err() {
                    tracing::warn!(msg = %msg["type"], "connection queue full or closed; frame dropped");
                }
            }
            None => tracing::debug!(msg = %msg["type"], "not connected; frame not sent"),
        }
    }

    async fn save(&self) -> bool {
        match self.state.save().await {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(path = %self.state.path().display(), error = %e, "cannot write the state file");
                false
            }
        }
    }

    /// Identified (again): resend final reports the hub has not acked, and
    /// ask about every task still running (`task_recovering`): the hub may
    /// have taken it back while we were away.
    pub fn on_connected(&mut self, out: mpsc::Sender<String>) {
        self.out = Some(out);
        if self.draining {
            self.announce_draining();
        }
        for rec in self.state.data.tasks.values() {
            match &rec.report {
                Some(report) => self.send(report.clone()),
                None => self.send(json!({
                    "type": "task_recovering",
                    "task_id": rec.task_id,
                    "generation": rec.generation,
                    "last_status": "running",
                    "description": short(&rec.description),
                    "process_followed": self.runs.contains_key(&rec.task_id),
                })),
            }
        }
    }

    /// Ask the hub for no new tasks while the running ones finish.
    pub fn announce_draining(&self) {
        self.send(json!({"type": "status", "status": "draining"}));
    }

    pub fn on_disconnected(&mut self) {
        self.out = None;
    }

    /// One frame from the hub.
    pub async fn on_frame(&mut self, v: Value) {
        let task_id = v["task_id"].as_str().unwrap_or_default().to_string();
        match v["type"].as_str().unwrap_or_default() {
            "task_assign" => self.on_assign(&v).await,
            "task_cancelled" => {
                let reason = v["reason"].as_str().unwrap_or("cancelled");
                tracing::info!(task_id = %task_id, reason, "hub cancelled the task");
                self.stop_or_forget(&task_id, StopReason::Cancelled).await;
            }
            "task_continue" => self.on_continue(&task_id, v["generation"].as_u64()).await,
            "task_reassign" => {
                tracing::info!(task_id = %task_id, "hub reassigned the task; dropping it");
                self.stop_or_forget(&task_id, StopReason::Dropped).await;
            }
            "task_ack" => {
                let status = v["status"].as_str().unwrap_or_default();
                let final_ack = matches!(status, "complete" | "failed" | "rejected");
                if final_ack
                    && self
                        .state
                        .data
                        .tasks
                        .get(&task_id)
                        .is_some_and(|r| r.report.is_some())
                {
                    tracing::info!(task_id = %task_id, status, "hub stored the report");
                    self.forget(&task_id).await;
                }
            }
            "error" => {
                let code = v["error"].as_str().unwrap_or_default();
                let pending = self
                    .state
                    .data
                    .tasks
                    .get(&task_id)
                    .is_some_and(|r| r.report.is_some());
                if pending && code == "stale_generation" && self.resent.remove(&task_id) {
                    tracing::debug!(task_id = %task_id, "hub refused the report's copy of the older generation");
                } else if pending && REPORT_DEAD_ERRORS.contains(&code) {
                    tracing::warn!(task_id = %task_id, error = code, "hub will not take this report; dropping it");
                    self.forget(&task_id).await;
                } else if pending && code == "storage_unavailable" {
                    // The hub could not store it: keep it and send it again.
                    tracing::warn!(task_id = %task_id, detail = %v["detail"], "hub storage unavailable; resending the report shortly");
                    self.resend_later(&task_id);
                } else {
                    tracing::warn!(task_id = %task_id, error = code, detail = %v["detail"], "hub error");
                }
            }
            other => tracing::debug!(r#type = other, "frame ignored"),
        }
    }

    /// Send the task's pending report again after [`REPORT_RETRY`], on the
    /// current connection (a reconnect resends every pending report anyway).
    fn resend_later(&self, task_id: &str) {
        let (Some(out), Some(report)) = (
            self.out.clone(),
            self.state
                .data
                .tasks
                .get(task_id)
                .and_then(|r| r.report.clone()),
        ) else {
            return;
        };
        tokio::spawn(async move {
            tokio::time::sleep(REPORT_RETRY).await;
            let _ = out.send(report.to_string()).await;
        });
    }

    async fn on_assign(&mut self, v: &Value) {
        let (Some(task_id), Some(generation)) = (v["task_id"].as_str(), v["generation"].as_u64())
        else {
            tracing::warn!(frame = %v, "task_assign without task_id or generation");
            return;
        };
        let accepted =
            json!({"type": "task_accepted", "task_id": task_id, "generation": generation});
        if let Some(rec) = self.state.data.tasks.get(task_id) {
            if rec.generation == generation {
                // The hub re-sends assignments it has no accept for: answer again.
                match &rec.report {
                    Some(report) => self.send(report.clone()),
                    None => self.send(accepted),
                }
                return;
            }
            if rec.generation > generation {
                tracing::debug!(task_id, generation, "stale task_assign ignored");
                return;
            }
            // A newer generation: our run is stale.
            self.stop_or_forget(task_id, StopReason::Dropped).await;
            self.state.data.tasks.remove(task_id);
        }
        let reject = |reason: &str| json!({"type": "task_rejected", "task_id": task_id, "generation": generation, "reason": reason});
        if self.draining {
            // Not `task_rejected`: the hub would hand it straight back while
            // we still have free slots, burning its attempts. Unanswered, it
            // returns to the queue on the accept timeout or, once we are
            // gone, the reconnect grace.
            tracing::warn!(task_id, generation, "draining: task_assign left unanswered");
            return;
        }
        // The hub enforces `max_concurrency`; it may count differently for a
        // moment (tasks from before a restart, still awaiting its answer to
        // `task_recovering`). Rejecting would cost the task an attempt.
        let running = self.runs.len();
        if running >= self.max_concurrency as usize {
            tracing::warn!(task_id, running, "over max_concurrency; running it anyway");
        }
        let rec = TaskRecord {
            task_id: task_id.to_string(),
            generation,
            run_generation: None,
            description: v["description"].as_str().unwrap_or_default().to_string(),
            metadata: v.get("metadata").cloned().unwrap_or(json!({})),
            assigned_at: v["assigned_at"].as_i64().unwrap_or_default(),
            accepted_at: now_ms(),
            pid: None,
            pid_start: None,
            report: None,
            traceparent: v["traceparent"]
                .as_str()
                .filter(|tp| crate::telemetry::valid_traceparent(tp))
                .map(str::to_string),
        };
        self.state.data.tasks.insert(task_id.to_string(), rec);
        // Durable before the hub hears we took it.
        if !self.save().await {
            self.state.data.tasks.remove(task_id);
            self.send(reject("state_file_error"));
            return;
        }
        self.launch(task_id, accepted).await;
    }

    /// Start the command, then tell the hub (`accepted`) and record the pid.
    /// The record is already durable; a sidecar killed before the pid is
    /// written finds the command again through the wrapper's `pid` file.
    async fn launch(&mut self, task_id: &str, accepted: Value) {
        let Some(rec) = self.state.data.tasks.get(task_id) else {
            return;
        };
        let generation = rec.generation;
        let dir = self.state.run_dir(rec);
        match runner::start(&self.run_cfg, rec, &dir, self.run_tx.clone()) {
            Ok(started) => {
                self.send(accepted);
                tracing::info!(
                    task_id,
                    generation,
                    pid = started.pid,
                    "task accepted; command started"
                );
                self.runs
                    .insert(task_id.to_string(), (generation, started.handle));
                if let Some(rec) = self.state.data.tasks.get_mut(task_id) {
                    rec.pid = Some(started.pid);
                    rec.pid_start = started.pid_start;
                }
                self.save().await;
            }
            Err(e) => {
                tracing::error!(task_id, error = %e, "cannot start the command");
                let error = json!({"reason": "spawn_failed", "detail": e.to_string()});
                self.finish(task_id, Outcome::Failed(error)).await;
            }
        }
    }

    /// `task_continue`: keep the task. A newer generation than ours means
    /// the hub took the task back while we were away and gives it back under
    /// that generation: take it for the record (and the pending report).
    /// After a restart nobody follows its command yet: adopt it (or report
    /// how it ended).
    async fn on_continue(&mut self, task_id: &str, generation: Option<u64>) {
        let Some(rec) = self.state.data.tasks.get(task_id) else {
            return;
        };
        match generation {
            Some(g) if g < rec.generation => {
                tracing::warn!(
                    task_id,
                    generation = g,
                    "task_continue for an older generation ignored"
                );
                return;
            }
            Some(g) if g > rec.generation => self.continue_under(task_id, g).await,
            _ => {}
        }
        let rec = &self.state.data.tasks[task_id];
        if rec.report.is_some() || self.runs.contains_key(task_id) {
            return;
        }
        let dir = self.state.run_dir(rec);
        let pid = procs::live_process(rec, &dir);
        tracing::info!(
            task_id,
            generation = rec.generation,
            ?pid,
            alive = pid.is_some(),
            "hub says continue; following the command"
        );
        let handle = runner::adopt(&self.run_cfg, rec, &dir, self.run_tx.clone());
        self.runs
            .insert(task_id.to_string(), (rec.started_under(), handle));
    }

    /// The hub holds the task at `generation` now: every later report names
    /// it. The run keeps its directory (see [`TaskRecord::run_generation`]).
    /// A final report made meanwhile was sent under the old generation,
    /// which the hub refuses: it goes again under the new one.
    async fn continue_under(&mut self, task_id: &str, generation: u64) {
        let Some(rec) = self.state.data.tasks.get_mut(task_id) else {
            return;
        };
        tracing::info!(
            task_id,
            previous_generation = rec.generation,
            generation,
            "hub continues the task under a new generation"
        );
        rec.run_generation = Some(rec.started_under());
        rec.generation = generation;
        let resend = rec.report.as_mut().map(|report| {
            report["generation"] = json!(generation);
            report.clone()
        });
        // The hub moved already; if this write fails, a restart asks about
        // the old generation and the hub says drop it.
        self.save().await;
        if let Some(report) = resend {
            self.resent.insert(task_id.to_string());
            self.send(report);
        }
    }

    /// The task is no longer ours: stop its command (the watcher reports
    /// back), or forget it at once if nothing runs.
    async fn stop_or_forget(&mut self, task_id: &str, why: StopReason) {
        let Some(rec) = self.state.data.tasks.get(task_id) else {
            return;
        };
        if let Some((_, run)) = self.runs.get_mut(task_id) {
            run.stop(why);
        } else if rec.is_running() && procs::live_process(rec, &self.state.run_dir(rec)).is_some() {
            // A command left by an earlier run of the sidecar: stop it too.
            let dir = self.state.run_dir(rec);
            let mut handle = runner::adopt(&self.run_cfg, rec, &dir, self.run_tx.clone());
            handle.stop(why);
            self.runs
                .insert(task_id.to_string(), (rec.started_under(), handle));
        } else {
            self.forget(task_id).await;
        }
    }

    /// Drop a task: state file, watcher, task directory.
    async fn forget(&mut self, task_id: &str) {
        let Some(rec) = self.state.data.tasks.remove(task_id) else {
            return;
        };
        self.runs.remove(task_id);
        self.resent.remove(task_id);
        self.save().await;
        self.remove_dir(task_id, rec.started_under()).await;
    }

    /// Remove the directory of the run that started under `generation`.
    async fn remove_dir(&self, task_id: &str, generation: u64) {
        let dir = self.state.task_dir(task_id, generation);
        if let Err(e) = tokio::fs::remove_dir_all(&dir).await {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot remove task directory");
            }
        }
    }

    /// An event from a command's watcher.
    pub async fn on_run_event(&mut self, ev: RunEvent) {
        match ev {
            RunEvent::Progress {
                task_id,
                generation,
                progress,
            } => {
                if let Some(generation) = self.reporting_generation(&task_id, generation) {
                    self.send(json!({
                        "type": "task_progress",
                        "task_id": task_id,
                        "generation": generation,
                        "progress": progress,
                    }));
                }
            }
            RunEvent::Output {
                task_id,
                generation,
                stream,
                data,
            } => {
                if let Some(generation) = self.reporting_generation(&task_id, generation) {
                    self.send(json!({
                        "type": "task_output",
                        "task_id": task_id,
                        "generation": generation,
                        "stream": stream,
                        "data": data,
                    }));
                }
            }
            RunEvent::Exited {
                task_id,
                generation,
                outcome,
            } => {
                if self
                    .runs
                    .get(&task_id)
                    .is_some_and(|(g, _)| *g == generation)
                {
                    self.runs.remove(&task_id);
                }
                let current = self
                    .state
                    .data
                    .tasks
                    .get(&task_id)
                    .is_some_and(|r| r.started_under() == generation);
                if current {
                    self.finish(&task_id, outcome).await;
                } else {
                    self.remove_dir(&task_id, generation).await;
                }
            }
        }
    }

    /// The generation to report a running command's news under: the
    /// record's, if the run that started under `started_under` is still the
    /// task's current run.
    fn reporting_generation(&self, task_id: &str, started_under: u64) -> Option<u64> {
        self.state
            .data
            .tasks
            .get(task_id)
            .filter(|r| r.started_under() == started_under && r.is_running())
            .map(|r| r.generation)
    }

    /// Record the final report durably, then send it (resent on every
    /// reconnect until the hub acks it), under the generation the record
    /// holds.
    async fn finish(&mut self, task_id: &str, outcome: Outcome) {
        let Some(generation) = self.state.data.tasks.get(task_id).map(|r| r.generation) else {
            return;
        };
        let report = match outcome {
            Outcome::Completed(result) => {
                tracing::info!(task_id, generation, "command succeeded");
                json!({"type": "task_complete", "task_id": task_id, "generation": generation, "result": result})
            }
            Outcome::Failed(error) => {
                tracing::warn!(task_id, generation, error = %error["reason"], exit_code = %error["exit_code"], "command failed");
                json!({"type": "task_failed", "task_id": task_id, "generation": generation, "error": error})
            }
            Outcome::Stopped(StopReason::Shutdown) => {
                tracing::warn!(
                    task_id,
                    generation,
                    "command stopped: sidecar shutting down"
                );
                let error = json!({"reason": "sidecar_shutdown"});
                json!({"type": "task_failed", "task_id": task_id, "generation": generation, "error": error})
            }
            Outcome::Stopped(why) => {
                // Cancelled or no longer ours: the hub already knows; nothing to report.
                tracing::info!(task_id, generation, reason = ?why, "command stopped");
                self.forget(task_id).await;
                return;
            }
        };
        if let Some(rec) = self.state.data.tasks.get_mut(task_id) {
            rec.report = Some(report.clone());
        }
        self.save().await;
        self.send(report);
    }

    /// Shutdown grace is over: stop every command still running.
    pub fn stop_all(&mut self) {
        for (task_id, (_, run)) in self.runs.iter_mut() {
            tracing::warn!(task_id = %task_id, "shutdown grace over; stopping the command");
            run.stop(StopReason::Shutdown);
        }
    }
}

/// At most the first 1 KiB of a description (for `task_recovering`).
fn short(text: &str) -> &str {
    let mut end = text.len().min(1024);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use super::*;

    type Events = mpsc::UnboundedReceiver<RunEvent>;

    /// A connected sidecar on a state file in `dir`, running `sh -c script`
    /// for every task; the frames it sends, and its watchers' events.
    fn sidecar(dir: &Path, script: &str) -> (Sidecar, mpsc::Receiver<String>, Events) {
        let state = StateFile::load(&dir.join("s.json"), "a1").unwrap();
        let (run_tx, run_rx) = mpsc::unbounded_channel();
        let cfg = RunConfig {
            command: vec!["sh".into(), "-c".into(), script.into()],
            tail_bytes: 1024,
            kill_grace: Duration::from_secs(1),
        };
        let mut sc = Sidecar::new(cfg, 1, state, run_tx);
        let (out_tx, out_rx) = mpsc::channel(64);
        sc.on_connected(out_tx);
        (sc, out_rx, run_rx)
    }

    /// Feed watcher events to the sidecar until it sends a frame of type `ty`;
    /// every frame sent on the way is returned too.
    async fn until_sent(
        sc: &mut Sidecar,
        out: &mut mpsc::Receiver<String>,
        events: &mut Events,
        ty: &str,
    ) -> Vec<Value> {
        let mut sent = Vec::new();
        loop {
            while let Ok(frame) = out.try_recv() {
                let v: Value = serde_json::from_str(&frame).unwrap();
                let done = v["type"] == ty;
                sent.push(v);
                if done {
                    return sent;
                }
            }
            let ev = tokio::time::timeout(Duration::from_secs(10), events.recv())
                .await
                .unwrap_or_else(|_| panic!("no {ty} sent; sent {sent:?}"))
                .unwrap();
            sc.on_run_event(ev).await;
        }
    }

    fn assign(task_id: &str, generation: u64) -> Value {
        json!({"type": "task_assign", "task_id": task_id, "generation": generation, "description": "d"})
    }

    fn on_disk(sc: &Sidecar, task_id: &str) -> Value {
        let data: Value = serde_json::from_slice(&std::fs::read(sc.state.path()).unwrap()).unwrap();
        data["tasks"][task_id].clone()
    }

    /// A run this process follows, given back by the hub under a newer
    /// generation: the record takes it, the run keeps its directory, and
    /// everything it reports from then on names the new generation.
    #[tokio::test]
    async fn a_followed_run_continued_under_a_new_generation_reports_under_it() {
        let tmp = tempfile::tempdir().unwrap();
        let gate = tmp.path().join("go");
        let script = format!(
            "while [ ! -e '{}' ]; do sleep 0.02; done; echo \"ran under $AGENTHUB_TASK_GENERATION\"",
            gate.display()
        );
        let (mut sc, mut out, mut events) = sidecar(tmp.path(), &script);
        sc.on_frame(assign("t1", 1)).await;
        let sent = until_sent(&mut sc, &mut out, &mut events, "task_accepted").await;
        assert_eq!(sent.last().unwrap()["generation"], 1);

        // An older generation changes nothing; the newer one is taken.
        sc.on_frame(json!({"type": "task_continue", "task_id": "t1", "generation": 0}))
            .await;
        assert_eq!(on_disk(&sc, "t1")["generation"], 1);
        sc.on_frame(json!({"type": "task_continue", "task_id": "t1", "generation": 2}))
            .await;
        let rec = on_disk(&sc, "t1");
        assert_eq!(
            (&rec["generation"], &rec["run_generation"]),
            (&json!(2), &json!(1))
        );
        assert_eq!(sc.running(), 1, "the same watcher follows the run");
        let dir = sc.state.task_dir("t1", 1);
        assert!(dir.is_dir());

        std::fs::write(&gate, "").unwrap();
        let sent = until_sent(&mut sc, &mut out, &mut events, "task_complete").await;
        assert!(
            sent.iter().all(|v| v["generation"] == 2),
            "every report names generation 2: {sent:?}"
        );
        let done = sent.last().unwrap();
        assert_eq!(done["result"]["stdout"], "ran under 1\n");
        sc.on_frame(json!({"type": "task_ack", "task_id": "t1", "status": "complete"}))
            .await;
        assert_eq!(sc.held(), 0);
        assert!(!dir.exists(), "the run's directory is removed");
    }

    /// A final report made before `task_continue` arrived went out under the
    /// old generation: it goes again under the new one, and the hub's
    /// `stale_generation` for the old copy does not drop it.
    #[tokio::test]
    async fn a_report_pending_at_task_continue_is_sent_again_under_the_new_generation() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut sc, mut out, mut events) = sidecar(tmp.path(), "echo hi");
        sc.on_frame(assign("t1", 1)).await;
        let sent = until_sent(&mut sc, &mut out, &mut events, "task_complete").await;
        assert_eq!(sent.last().unwrap()["generation"], 1);

        sc.on_frame(json!({"type": "task_continue", "task_id": "t1", "generation": 2}))
            .await;
        let again: Value = serde_json::from_str(&out.try_recv().unwrap()).unwrap();
        assert_eq!(
            (again["type"].as_str(), again["generation"].as_u64()),
            (Some("task_complete"), Some(2))
        );
        assert_eq!(again["result"]["stdout"], "hi\n");
        assert_eq!(on_disk(&sc, "t1")["report"]["generation"], 2);
        sc.on_frame(json!({"type": "error", "task_id": "t1", "error": "stale_generation"}))
            .await;
        assert_eq!(sc.held(), 1, "kept: the error was about the old copy");
        sc.on_frame(json!({"type": "task_ack", "task_id": "t1", "status": "complete"}))
            .await;
        assert_eq!(sc.held(), 0);
    }
}
