//! The sidecar's state file: every task it holds, written atomically (temp
//! file, fsync, rename, directory fsync) *before* the hub is told anything
//! about the task. After a crash or `kill -9`, the next start reads it back
//! and asks the hub what to do with each task (`task_recovering`).
//!
//! Each task also gets a directory beside the state file
//! (`<state-file>.tasks/<task>-g<generation>/`, named by the generation its
//! command started under) holding the command's `stdout`, `stderr` and
//! `exit` (its exit code, written by the wrapper shell), so a restarted
//! sidecar can still read what a command left.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Version of the state file layout.
pub const STATE_VERSION: u32 = 1;

/// One task the sidecar holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub task_id: String,
    /// The generation the hub has the task at: every report names it.
    pub generation: u64,
    /// The generation the command started under, when the hub has since
    /// given the run a newer one (`task_continue` after it took the task
    /// back while the sidecar was away). It names the run's directory, which
    /// is never renamed: the wrapper shell writes `exit` to its path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_generation: Option<u64>,
    pub description: String,
    #[serde(default)]
    pub metadata: Value,
    /// `assigned_at` from the hub's `task_assign` (Unix ms).
    #[serde(default)]
    pub assigned_at: i64,
    /// When this sidecar accepted the task (Unix ms).
    pub accepted_at: i64,
    /// Process id (and process group id) of the command's wrapper shell,
    /// once it started.
    #[serde(default)]
    pub pid: Option<u32>,
    /// Start time of `pid` (`/proc/PID/stat` field 22): tells our process
    /// from a later one that got the same pid.
    #[serde(default)]
    pub pid_start: Option<u64>,
    /// The final report (`task_complete` / `task_failed` message) until the
    /// hub acknowledges it. `None` while the command runs.
    #[serde(default)]
    pub report: Option<Value>,
    /// The W3C trace context from `task_assign`, given to the command as
    /// `TRACEPARENT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

impl TaskRecord {
    /// The generation the command started under (its directory's name).
    pub fn started_under(&self) -> u64 {
        self.run_generation.unwrap_or(self.generation)
    }

    /// The command still runs (no final report yet).
    pub fn is_running(&self) -> bool {
        self.report.is_none()
    }
}

/// The file's content.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct StateData {
    pub version: u32,
    pub agent_id: String,
    /// task_id → record.
    #[serde(default)]
    pub tasks: BTreeMap<String, TaskRecord>,
}

/// The state file and its in-memory copy; owned by the sidecar's main loop.
pub struct StateFile {
    path: PathBuf,
    pub data: StateData,
}

impl StateFile {
    /// Read `path`, or start empty if it does not exist. A file written for
    /// another agent is refused.
    pub fn load(path: &Path, agent_id: &str) -> anyhow::Result<StateFile> {
        // Absolute, so task directories do not depend on the working directory.
        let path = &std::path::absolute(path)
            .with_context(|| format!("state file path {}", path.display()))?;
        let data = match std::fs::read(path) {
            Ok(bytes) => {
                let data: StateData = serde_json::from_slice(&bytes)
                    .with_context(|| format!("state file {} is not valid", path.display()))?;
                if data.version != STATE_VERSION {
                    bail!(
                        "state file {} has version {}, expected {STATE_VERSION}",
                        path.display(),
                        data.version
                    );
                }
                if data.agent_id != agent_id {
                    bail!(
                        "state file {} belongs to agent `{}`, not `{agent_id}`",
                        path.display(),
                        data.agent_id
                    );
                }
                data
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => StateData {
                version: STATE_VERSION,
                agent_id: agent_id.to_string(),
                tasks: BTreeMap::new(),
            },
            Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
        };
        let state = StateFile {
            path: path.to_path_buf(),
            data,
        };
        std::fs::create_dir_all(state.tasks_root())
            .with_context(|| format!("create {}", state.tasks_root().display()))?;
        Ok(state)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where the task directories live.
    pub fn tasks_root(&self) -> PathBuf {
        let mut name = self.path.file_name().unwrap_or_default().to_os_string();
        name.push(".tasks");
        self.path.with_file_name(name)
    }

    /// The directory of one task run, by the generation it started under.
    pub fn task_dir(&self, task_id: &str, generation: u64) -> PathBuf {
        self.tasks_root()
            .join(format!("{}-g{generation}", path_safe(task_id)))
    }

    /// The directory of the run a record holds.
    pub fn run_dir(&self, rec: &TaskRecord) -> PathBuf {
        self.task_dir(&rec.task_id, rec.started_under())
    }

    /// Write the current state atomically and durably.
    pub async fn save(&self) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(&self.data).map_err(std::io::Error::other)?;
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || write_atomic(&path, &bytes))
            .await
            .map_err(std::io::Error::other)?
    }
}

/// temp file + fsync + rename + fsync of the directory.
fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()
}

/// A task id as a file name: `[A-Za-z0-9_-]` kept, everything else `%XX`.
pub fn path_safe(task_id: &str) -> String {
    let mut out = String::with_capacity(task_id.len());
    for b in task_id.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_safe_escapes_separators_and_dots() {
        assert_eq!(path_safe("task-0a1b"), "task-0a1b");
        assert_eq!(path_safe("a/b:c"), "a%2Fb%3Ac");
        assert_eq!(path_safe(".."), "%2E%2E");
    }

    #[tokio::test]
    async fn state_round_trips_and_refuses_another_agent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.json");
        let mut s = StateFile::load(&path, "a1").unwrap();
        s.data.tasks.insert(
            "t1".into(),
            TaskRecord {
                task_id: "t1".into(),
                generation: 3,
                run_generation: Some(2),
                description: "d".into(),
                metadata: serde_json::json!({"k": 1}),
                assigned_at: 1,
                accepted_at: 2,
                pid: Some(42),
                pid_start: Some(7),
                report: None,
                traceparent: None,
            },
        );
        s.save().await.unwrap();
        let again = StateFile::load(&path, "a1").unwrap();
        assert_eq!(again.data.tasks, s.data.tasks);
        assert!(StateFile::load(&path, "other").is_err());
        assert!(s.task_dir("a/b", 3).ends_with("s.json.tasks/a%2Fb-g3"));
        assert!(s
            .run_dir(&again.data.tasks["t1"])
            .ends_with("s.json.tasks/t1-g2"));
    }
}
