//! Running one task's command as a child process, watched by its own tokio
//! task.
//!
//! The command runs under a tiny wrapper shell in a new process group (see
//! [`WRAPPER`]). Its stdout and stderr go to files in the task directory; the
//! wrapper writes its own pid to `pid` there before the command starts, and
//! the exit code to `exit` when it ends. So a sidecar restarted after
//! `kill -9`, even one killed before it could record the pid, can still find
//! a command that outlived it, follow it, or read how it ended. Cancelling
//! signals the whole process group: SIGTERM, then SIGKILL after a grace.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::process::Child;
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use super::output::{read_tail, LineTail};
use super::procs::{alive, group_alive, live_process, proc_stat, signal_group};
use super::state::TaskRecord;
use crate::model::now_ms;

/// The wrapper shell script, run as `sh -c WRAPPER agenthub-task DIR CMD
/// ARGS...`: record its pid, run the command, record its exit code.
pub const WRAPPER: &str =
    r#"d=$1; shift; echo $$ > "$d/pid"; "$@"; c=$?; echo "$c" > "$d/exit"; exit "$c""#;
/// How often stdout is scanned for progress lines, and how often a process
/// that is not our child is checked for liveness.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// How the sidecar runs commands.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// `CMD ARGS...` from the command line.
    pub command: Vec<String>,
    /// Bytes of stdout / stderr kept in the report (the last ones).
    pub tail_bytes: usize,
    /// SIGTERM → SIGKILL grace when a run is stopped.
    pub kill_grace: Duration,
}

/// Why a run was stopped from outside.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The hub cancelled or reclaimed the task (`task_cancelled`).
    Cancelled,
    /// The task is no longer ours (`task_reassign`, a newer generation).
    Dropped,
    /// The sidecar is shutting down and its grace ran out.
    Shutdown,
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Exit code 0; the `result` of `task_complete`.
    Completed(Value),
    /// Anything else; the `error` of `task_failed`.
    Failed(Value),
    /// Stopped from outside; nothing to report for Cancelled and Dropped.
    Stopped(StopReason),
}

/// What a watcher tells the sidecar's main loop. `generation` is the one
/// the run started under ([`TaskRecord::started_under`]): the sidecar reports
/// under the generation its record holds now.
#[derive(Debug)]
pub enum RunEvent {
    Progress {
        task_id: String,
        generation: u64,
        progress: Value,
    },
    Exited {
        task_id: String,
        generation: u64,
        outcome: Outcome,
    },
    /// Lines the command printed (sent as `task_output`).
    Output {
        task_id: String,
        generation: u64,
        stream: &'static str,
        data: String,
    },
}

/// Most output bytes in one `task_output` message.
const MAX_OUTPUT_CHUNK: usize = 256 * 1024;

/// The main loop's handle on a watcher; `stop` ends the run.
pub struct RunHandle {
    /// Tells the watcher to terminate the process group.
    stop: Option<oneshot::Sender<StopReason>>,
}

impl RunHandle {
    /// Stop the run; the watcher reports `Outcome::Stopped(why)` when done.
    pub fn stop(&mut self, why: StopReason) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(why);
        }
    }
}

/// A started command.
pub struct Started {
    pub pid: u32,
    pub pid_start: Option<u64>,
    pub handle: RunHandle,
}

/// The process being watched.
enum Proc {
    /// Started by this sidecar.
    Child(Child),
    /// Started by an earlier run of the sidecar and still alive.
    Orphan { pid: u32, start: Option<u64> },
    /// Nothing left to watch.
    Gone,
}

impl Proc {
    fn pgid(&self) -> Option<u32> {
        match self {
            Proc::Child(c) => c.id(),
            Proc::Orphan { pid, .. } => Some(*pid),
            Proc::Gone => None,
        }
    }

    /// Wait for the process to end; the exit status when it is our child.
    async fn exited(&mut self) -> Option<std::process::ExitStatus> {
        match self {
            Proc::Child(c) => c.wait().await.ok(),
            Proc::Orphan { pid, start } => {
                while alive(*pid, *start) {
                    tokio::time::sleep(POLL_INTERVAL).await;
                }
                None
            }
            Proc::Gone => None,
        }
    }
}

/// Start `cfg.command` for this task, its output going to `dir`.
pub fn start(
    cfg: &RunConfig,
    rec: &TaskRecord,
    dir: &Path,
    events: mpsc::UnboundedSender<RunEvent>,
) -> std::io::Result<Started> {
    std::fs::create_dir_all(dir)?;
    for stale in ["exit", "pid"] {
        match std::fs::remove_file(dir.join(stale)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    let stdout = std::fs::File::create(dir.join("stdout"))?;
    let stderr = std::fs::File::create(dir.join("stderr"))?;
    let metadata = match &rec.metadata {
        Value::Null => "{}".to_string(),
        m => m.to_string(),
    };
    let mut command = tokio::process::Command::new("sh");
    command
        .arg("-c")
        .arg(WRAPPER)
        .arg("agenthub-task")
        .arg(dir)
        .args(&cfg.command)
        .env("AGENTHUB_TASK_ID", &rec.task_id)
        .env("AGENTHUB_TASK_DESCRIPTION", &rec.description)
        .env("AGENTHUB_TASK_METADATA", metadata)
        .env("AGENTHUB_TASK_GENERATION", rec.generation.to_string())
        .env_remove("AGENTHUB_TOKEN");
    // The task's trace context, never the sidecar's own.
    match &rec.traceparent {
        Some(tp) => command.env("TRACEPARENT", tp),
        None => command.env_remove("TRACEPARENT"),
    };
    let child = command
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .process_group(0)
        .kill_on_drop(false)
        .spawn()?;
    let pid = child
        .id()
        .ok_or_else(|| std::io::Error::other("child has no pid"))?;
    let pid_start = proc_stat(pid).map(|(_, start)| start);
    let tails = [
        LineTail::new(dir.join("stdout"), false),
        LineTail::new(dir.join("stderr"), false),
    ];
    let handle = spawn_watcher(cfg, rec, dir, Proc::Child(child), tails, events);
    Ok(Started {
        pid,
        pid_start,
        handle,
    })
}

/// Take over a task started by an earlier run of the sidecar: follow its
/// process if it is still alive, else report how it ended (its `exit` file),
/// or a failure (`lost`) when it left nothing.
pub fn adopt(
    cfg: &RunConfig,
    rec: &TaskRecord,
    dir: &Path,
    events: mpsc::UnboundedSender<RunEvent>,
) -> RunHandle {
    let proc = match live_process(rec, dir) {
        Some(pid) => Proc::Orphan {
            pid,
            start: rec.pid_start,
        },
        None => Proc::Gone,
    };
    let tails = [
        LineTail::new(dir.join("stdout"), true),
        LineTail::new(dir.join("stderr"), true),
    ];
    spawn_watcher(cfg, rec, dir, proc, tails, events)
}

fn spawn_watcher(
    cfg: &RunConfig,
    rec: &TaskRecord,
    dir: &Path,
    proc: Proc,
    tails: [LineTail; 2],
    events: mpsc::UnboundedSender<RunEvent>,
) -> RunHandle {
    let (stop_tx, stop_rx) = oneshot::channel();
    let watcher = Watcher {
        task_id: rec.task_id.clone(),
        generation: rec.started_under(),
        accepted_at: rec.accepted_at,
        dir: dir.to_path_buf(),
        cfg: cfg.clone(),
        events,
    };
    let span =
        tracing::info_span!("task", task_id = %rec.task_id, generation = rec.started_under());
    if let Some(tp) = &rec.traceparent {
        crate::telemetry::set_remote_parent(&span, tp);
    }
    tokio::spawn(watcher.run(proc, tails, stop_rx).instrument(span));
    RunHandle {
        stop: Some(stop_tx),
    }
}

/// Follows one run until it ends, then sends `RunEvent::Exited`.
struct Watcher {
    task_id: String,
    generation: u64,
    accepted_at: i64,
    dir: PathBuf,
    cfg: RunConfig,
    events: mpsc::UnboundedSender<RunEvent>,
}

impl Watcher {
    async fn run(
        self,
        mut proc: Proc,
        mut tails: [LineTail; 2],
        mut stop: oneshot::Receiver<StopReason>,
    ) {
        let span =
            tracing::info_span!("task", task_id = %self.task_id, generation = self.generation);
        let _enter = span.enter();
        let mut tick = tokio::time::interval(POLL_INTERVAL);
        let stopped = loop {
            tokio::select! {
                status = proc.exited() => break Err(status),
                why = &mut stop => {
                    let why = why.unwrap_or(StopReason::Dropped);
                    tracing::info!(reason = ?why, "stopping the command");
                    terminate(&mut proc, self.cfg.kill_grace).await;
                    break Ok(why);
                }
                _ = tick.tick() => self.poll(&mut tails).await,
            }
        };
        let outcome = match stopped {
            Ok(why) => Outcome::Stopped(why),
            Err(status) => {
                self.poll(&mut tails).await;
                self.outcome(status).await
            }
        };
        let _ = self.events.send(RunEvent::Exited {
            task_id: self.task_id.clone(),
            generation: self.generation,
            outcome,
        });
    }

    /// Send what the command printed since the last poll, and its
    /// `::progress` lines as progress.
    async fn poll(&self, tails: &mut [LineTail; 2]) {
        for (tail, stream) in tails.iter_mut().zip(["stdout", "stderr"]) {
            let mut buf = String::new();
            tail.poll(|line| {
                if stream == "stdout" {
                    if let Some(p) = super::output::parse_progress(line) {
                        self.progress(p);
                    }
                }
                buf.push_str(line);
                buf.push('\n');
                if buf.len() >= MAX_OUTPUT_CHUNK {
                    self.output(stream, std::mem::take(&mut buf));
                }
            })
            .await;
            if !buf.is_empty() {
                self.output(stream, buf);
            }
        }
    }

    fn output(&self, stream: &'static str, data: String) {
        let _ = self.events.send(RunEvent::Output {
            task_id: self.task_id.clone(),
            generation: self.generation,
            stream,
            data,
        });
    }

    fn progress(&self, progress: Value) {
        let _ = self.events.send(RunEvent::Progress {
            task_id: self.task_id.clone(),
            generation: self.generation,
            progress,
        });
    }

    /// How the command ended, from its `exit` file (or exit status).
    async fn outcome(&self, status: Option<std::process::ExitStatus>) -> Outcome {
        use std::os::unix::process::ExitStatusExt;
        let duration_ms = now_ms().saturating_sub(self.accepted_at).max(0);
        let code = match tokio::fs::read_to_string(self.dir.join("exit")).await {
            Ok(s) => s.trim().parse::<i32>().ok(),
            Err(_) => None,
        };
        let code = code.or_else(|| status.and_then(|s| s.code()));
        let tail = self.cfg.tail_bytes;
        match code {
            Some(0) => {
                let (stdout, truncated) = read_tail(&self.dir.join("stdout"), tail).await;
                Outcome::Completed(json!({
                    "exit_code": 0,
                    "stdout": stdout,
                    "stdout_truncated": truncated,
                    "duration_ms": duration_ms,
                }))
            }
            Some(code) => {
                let (stderr, truncated) = read_tail(&self.dir.join("stderr"), tail).await;
                Outcome::Failed(json!({
                    "reason": "exit_code",
                    "exit_code": code,
                    "stderr": stderr,
                    "stderr_truncated": truncated,
                    "duration_ms": duration_ms,
                }))
            }
            None => {
                let (stderr, truncated) = read_tail(&self.dir.join("stderr"), tail).await;
                let detail = match status.and_then(|s| s.signal()) {
                    Some(sig) => format!("the command was killed by signal {sig}"),
                    None => "the command's process is gone and left no exit code".to_string(),
                };
                Outcome::Failed(json!({
                    "reason": "lost",
                    "detail": detail,
                    "stderr": stderr,
                    "stderr_truncated": truncated,
                    "duration_ms": duration_ms,
                }))
            }
        }
    }
}

/// SIGTERM to the process group, SIGKILL after `grace` if anything in the
/// group is still alive (the wrapper may die first while the command ignores
/// SIGTERM).
async fn terminate(proc: &mut Proc, grace: Duration) {
    let Some(pgid) = proc.pgid() else {
        return;
    };
    signal_group(pgid, "TERM").await;
    let gone = async {
        proc.exited().await;
        while group_alive(pgid) {
            tokio::time::sleep(POLL_INTERVAL / 2).await;
        }
    };
    if tokio::time::timeout(grace, gone).await.is_ok() {
        return;
    }
    tracing::warn!(pgid, ?grace, "command ignored SIGTERM; sending SIGKILL");
    signal_group(pgid, "KILL").await;
    let _ = tokio::time::timeout(Duration::from_secs(5), proc.exited()).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    fn record(task_id: &str) -> TaskRecord {
        TaskRecord {
            task_id: task_id.into(),
            generation: 1,
            run_generation: None,
            description: "d".into(),
            metadata: json!({"k": "v"}),
            assigned_at: 0,
            accepted_at: now_ms(),
            pid: None,
            pid_start: None,
            report: None,
            traceparent: None,
        }
    }

    #[tokio::test]
    async fn a_run_left_behind_is_found_from_its_pid_file_and_reports_its_exit() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("t1-g1");
        let cfg = RunConfig {
            command: vec![
                "sh".into(),
                "-c".into(),
                r#"echo "$AGENTHUB_TASK_ID $AGENTHUB_TASK_METADATA"; sleep 0.3"#.into(),
            ],
            tail_bytes: 1024,
            kill_grace: Duration::from_secs(1),
        };
        let rec = record("t1");
        let (tx, mut rx) = mpsc::unbounded_channel();
        let started = start(&cfg, &rec, &dir, tx.clone()).unwrap();
        // As if the sidecar died before writing the pid to its state file.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while live_process(&rec, &dir).is_none() {
            assert!(
                std::time::Instant::now() < deadline,
                "wrapper never wrote its pid"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(live_process(&rec, &dir), Some(started.pid));
        assert_eq!(
            live_process(&rec, &tmp.path().join("other")),
            None,
            "identity is checked"
        );
        // Its lines are streamed as output before it exits.
        match rx.recv().await.unwrap() {
            RunEvent::Output { stream, data, .. } => {
                assert_eq!((stream, data.as_str()), ("stdout", "t1 {\"k\":\"v\"}\n"));
            }
            other => panic!("{other:?}"),
        }
        match rx.recv().await.unwrap() {
            RunEvent::Exited {
                outcome: Outcome::Completed(result),
                ..
            } => {
                assert_eq!(result["stdout"], "t1 {\"k\":\"v\"}\n");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(live_process(&rec, &dir), None);
        // Adopting the finished run reads its exit file (its output was
        // handled by the run before: nothing is sent again).
        let _handle = adopt(&cfg, &rec, &dir, tx);
        match rx.recv().await.unwrap() {
            RunEvent::Exited {
                outcome: Outcome::Completed(result),
                ..
            } => assert_eq!(result["exit_code"], 0),
            other => panic!("{other:?}"),
        }
    }
}
