//! Tasks, events and agents as plain data: no I/O here.

use serde::{Deserialize, Serialize};

use serde_json::{Map, Value};

/// Global event sequence number: unique and strictly increasing across the hub.
pub type Seq = u64;
/// Assignment counter of a task; fences stale sidecar reports.
pub type Generation = u64;
/// A JSON object (task metadata, event payloads).
pub type JsonObject = Map<String, Value>;

/// Where a task stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TaskState {
    Queued,
    Assigned,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl TaskState {
    pub const ALL: [TaskState; 6] = [
        TaskState::Queued,
        TaskState::Assigned,
        TaskState::Running,
        TaskState::Completed,
        TaskState::Failed,
        TaskState::Cancelled,
    ];

    /// Completed, failed for good, or cancelled: no report changes it any more.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            TaskState::Completed | TaskState::Failed | TaskState::Cancelled
        )
    }

    /// Held by an agent (counts against its `max_concurrency`).
    pub fn is_active(self) -> bool {
        matches!(self, TaskState::Assigned | TaskState::Running)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Queued => "QUEUED",
            TaskState::Assigned => "ASSIGNED",
            TaskState::Running => "RUNNING",
            TaskState::Completed => "COMPLETED",
            TaskState::Failed => "FAILED",
            TaskState::Cancelled => "CANCELLED",
        }
    }

    pub fn parse(s: &str) -> Option<TaskState> {
        TaskState::ALL
            .into_iter()
            .find(|st| st.as_str().eq_ignore_ascii_case(s))
    }
}

/// What happened to a task.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum EventKind {
    Created,
    Assigned,
    Accepted,
    Progress,
    Completed,
    Failed,
    Rejected,
    Recovering,
    Continued,
    Reclaimed,
    Cancelled,
    /// A FAILED or CANCELLED task was re-queued by `RetryTask`.
    Retried,
}

impl EventKind {
    pub const ALL: [EventKind; 12] = [
        EventKind::Created,
        EventKind::Assigned,
        EventKind::Accepted,
        EventKind::Progress,
        EventKind::Completed,
        EventKind::Failed,
        EventKind::Rejected,
        EventKind::Recovering,
        EventKind::Continued,
        EventKind::Reclaimed,
        EventKind::Cancelled,
        EventKind::Retried,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Created => "CREATED",
            EventKind::Assigned => "ASSIGNED",
            EventKind::Accepted => "ACCEPTED",
            EventKind::Progress => "PROGRESS",
            EventKind::Completed => "COMPLETED",
            EventKind::Failed => "FAILED",
            EventKind::Rejected => "REJECTED",
            EventKind::Recovering => "RECOVERING",
            EventKind::Continued => "CONTINUED",
            EventKind::Reclaimed => "RECLAIMED",
            EventKind::Cancelled => "CANCELLED",
            EventKind::Retried => "RETRIED",
        }
    }

    pub fn parse(s: &str) -> Option<EventKind> {
        EventKind::ALL
            .into_iter()
            .find(|k| k.as_str().eq_ignore_ascii_case(s))
    }
}

/// Scheduling priority: `Urgent > High > Normal > Low`.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Priority {
    Low = 1,
    #[default]
    Normal = 2,
    High = 3,
    Urgent = 4,
}

impl Priority {
    pub const ALL: [Priority; 4] = [
        Priority::Low,
        Priority::Normal,
        Priority::High,
        Priority::Urgent,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Low => "LOW",
            Priority::Normal => "NORMAL",
            Priority::High => "HIGH",
            Priority::Urgent => "URGENT",
        }
    }

    pub fn parse(s: &str) -> Option<Priority> {
        Priority::ALL
            .into_iter()
            .find(|p| p.as_str().eq_ignore_ascii_case(s))
    }
}

/// One task as the hub stores it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Task {
    #[serde(default)]
    pub task_id: String,
    /// Current (or last) assignee; for a queued pinned task, the pinned agent.
    pub agent_id: Option<String>,
    /// The task may only run on `agent_id`.
    #[serde(default)]
    pub pinned: bool,
    /// Stored in the task's CREATED event, not in its row (see `store`).
    #[serde(default)]
    pub description: String,
    /// Shared, not copied, by the task's row snapshots and assignments.
    #[serde(default)]
    pub metadata: std::sync::Arc<JsonObject>,
    pub state: TaskState,
    pub generation: Generation,
    pub attempts: u32,
    pub max_attempts: u32,
    #[serde(default)]
    pub needed_capabilities: Vec<String>,
    pub priority: Priority,
    pub result: Option<serde_json::Value>,
    pub error: Option<serde_json::Value>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    /// Seq of the last event that changed this task.
    #[serde(default)]
    pub last_seq: Seq,
    /// Seq of the CREATED event: the task's place in creation order.
    #[serde(default)]
    pub created_seq: Seq,
    /// Tasks that must be COMPLETED before this one is scheduled.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<String>,
    /// A task still QUEUED this long (ms) after its push FAILS
    /// (`ttl_expired`). 0: no limit.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub queue_ttl_ms: u64,
    /// Unix ms by which the task must be finished, else it is cancelled at
    /// its sidecar and FAILS (`deadline_exceeded`). 0: none.
    #[serde(default, skip_serializing_if = "is_zero_i64")]
    pub deadline_ms: i64,
}

impl Task {
    /// A copy for the task's row: without the description and result,
    /// which are stored in its events (copying them on every change would
    /// cost a large task's payload per commit).
    pub fn row_copy(&self) -> Task {
        Task {
            task_id: self.task_id.clone(),
            agent_id: self.agent_id.clone(),
            pinned: self.pinned,
            description: String::new(),
            metadata: self.metadata.clone(),
            state: self.state,
            generation: self.generation,
            attempts: self.attempts,
            max_attempts: self.max_attempts,
            needed_capabilities: self.needed_capabilities.clone(),
            priority: self.priority,
            result: None,
            error: self.error.clone(),
            created_at_ms: self.created_at_ms,
            updated_at_ms: self.updated_at_ms,
            last_seq: self.last_seq,
            created_seq: self.created_seq,
            depends_on: self.depends_on.clone(),
            queue_ttl_ms: self.queue_ttl_ms,
            deadline_ms: self.deadline_ms,
        }
    }

    /// When the queue TTL runs out (Unix ms), if the task has one.
    pub fn ttl_expires_at(&self) -> Option<i64> {
        (self.queue_ttl_ms > 0).then(|| {
            self.created_at_ms
                .saturating_add(self.queue_ttl_ms.min(i64::MAX as u64) as i64)
        })
    }

    /// The deadline (Unix ms), if the task has one.
    pub fn deadline(&self) -> Option<i64> {
        (self.deadline_ms > 0).then_some(self.deadline_ms)
    }
}

fn is_zero_u64(n: &u64) -> bool {
    *n == 0
}

fn is_zero_i64(n: &i64) -> bool {
    *n == 0
}

/// One durable, sequenced change to a task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskEvent {
    pub seq: Seq,
    pub task_id: String,
    pub agent_id: String,
    pub kind: EventKind,
    pub generation: Generation,
    pub payload: JsonObject,
    pub timestamp_ms: i64,
    /// The task's state right after this event.
    pub state: TaskState,
}

impl EventKind {
    /// The stable numeric code (the `agenthub.v1.TaskEvent.Kind` value).
    pub fn code(self) -> i32 {
        EventKind::ALL.iter().position(|k| *k == self).unwrap_or(0) as i32 + 1
    }

    pub fn from_code(code: i32) -> Option<EventKind> {
        EventKind::ALL.get((code as usize).checked_sub(1)?).copied()
    }
}

/// What a watcher wants to see.
#[derive(Clone, Debug, Default)]
pub struct EventFilter {
    pub task_id: Option<String>,
    pub agent_id: Option<String>,
    pub kinds: Vec<EventKind>,
}

impl EventFilter {
    pub fn matches(&self, task_id: &str, agent_id: &str, kind: EventKind) -> bool {
        self.task_id.as_deref().is_none_or(|t| t == task_id)
            && self.agent_id.as_deref().is_none_or(|a| a == agent_id)
            && (self.kinds.is_empty() || self.kinds.contains(&kind))
    }
}

/// A public view of an agent (ListAgents).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AgentInfo {
    pub agent_id: String,
    pub name: String,
    pub capabilities: Vec<String>,
    pub status: String,
    pub connected: bool,
    #[serde(skip)]
    pub presence: AgentPresence,
    pub connected_at: i64,
    pub active_task_ids: Vec<String>,
    pub max_concurrency: u32,
    /// Its last `resource_report`, and when the hub received it (Unix ms).
    pub resources: Option<(Resources, i64)>,
}

/// Whether an agent is here: connected; away (disconnected, within the
/// reconnect grace, still holding its tasks); or gone (away past the grace).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AgentPresence {
    Connected,
    Away {
        /// When it went away (Unix ms).
        since_ms: i64,
        /// When the grace ends (it becomes gone).
        grace_ends: tokio::time::Instant,
    },
    Gone {
        since_ms: i64,
    },
}

/// Host metrics from a sidecar's `resource_report`. Absent or non-numeric
/// fields are `None`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Resources {
    pub cpu_percent: Option<f64>,
    pub ram_used_bytes: Option<u64>,
    pub ram_total_bytes: Option<u64>,
    pub vram_used_bytes: Option<u64>,
    pub vram_total_bytes: Option<u64>,
}

/// What a token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// One sidecar; WebSocket only.
    Agent,
    /// Push, cancel, retry, read, watch.
    Orchestrator,
    /// Read and watch.
    Viewer,
    /// Everything, including tokens.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Orchestrator => "orchestrator",
            Role::Viewer => "viewer",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        [Role::Agent, Role::Orchestrator, Role::Viewer, Role::Admin]
            .into_iter()
            .find(|r| r.as_str() == s)
    }
}

/// A token as stored (hash only).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TokenRecord {
    /// Public handle for `token list` / `token revoke`.
    pub id: String,
    #[serde(skip)]
    pub hash: String,
    pub role: Role,
    pub agent_id: Option<String>,
    pub created_at_ms: i64,
    pub revoked: bool,
}

/// Current Unix time in milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A fresh task id: `task-` + 16 lowercase hex from the OS CSPRNG.
pub fn new_task_id() -> String {
    let bytes: [u8; 8] = rand::random();
    format!("task-{}", hex::encode(bytes))
}

/// Which of a command's streams a piece of task output came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputStream {
    Stdout,
    Stderr,
}

impl OutputStream {
    pub fn as_str(self) -> &'static str {
        match self {
            OutputStream::Stdout => "stdout",
            OutputStream::Stderr => "stderr",
        }
    }

    pub fn parse(s: &str) -> Option<OutputStream> {
        match s {
            "stdout" => Some(OutputStream::Stdout),
            "stderr" => Some(OutputStream::Stderr),
            _ => None,
        }
    }

    /// The number stored for it.
    pub fn code(self) -> i64 {
        match self {
            OutputStream::Stdout => 1,
            OutputStream::Stderr => 2,
        }
    }

    pub fn from_code(code: i64) -> OutputStream {
        match code {
            2 => OutputStream::Stderr,
            _ => OutputStream::Stdout,
        }
    }
}

/// A stored piece of a task's output. `offset`: the UTF-8 byte offset of
/// `data` in the task's output (both streams share one offset space).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutputChunk {
    pub task_id: String,
    pub offset: u64,
    pub stream: OutputStream,
    pub data: String,
    /// The task's generation (attempt) it was written under; 0 for output
    /// stored before generations were kept.
    pub generation: Generation,
}

impl OutputChunk {
    /// The offset just past this chunk.
    pub fn end(&self) -> u64 {
        self.offset + self.data.len() as u64
    }
}
