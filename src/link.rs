//! What the hub says to an agent connection and hears from it, as types.
//!
//! The hub speaks only these: it never builds a wire frame or picks a close
//! code. The WebSocket side (`ws`) parses frames into [`FromAgent`], encodes
//! [`ToAgent`] in its writer task, and maps [`CloseReason`] to close codes.

use std::sync::Arc;

use serde::Serialize;

pub use crate::model::Resources;
use crate::model::{Generation, JsonObject, OutputStream};

/// Sidecar → hub.
#[derive(Debug, Clone, PartialEq)]
pub enum FromAgent {
    /// First message: who the sidecar is. Answered with `identified` or an error.
    Identify(Identify),
    /// The sidecar took the task (`task_ack` "accepted").
    Accepted(Report),
    /// Fire-and-forget progress; stored as an event, not acked.
    Progress(Report),
    /// The task succeeded (`result`).
    Complete(Report),
    /// The attempt failed (`error` or `reason`).
    Failed(Report),
    /// The sidecar will not run this task; the hub gives it to someone else.
    Rejected(Report),
    /// After a sidecar restart: may I go on with this task?
    Recovering(Report),
    /// Liveness check; answered with `pong`.
    Ping,
    /// The sidecar's status changed. `"draining"`: give it no new tasks
    /// (it finishes the ones it holds); any other status makes it eligible again.
    Status(String),
    /// After a reconnect: "I am still working on this task at this
    /// generation" (`status`, `assigned_at`). Answered with `state_report_ack`.
    StateReport(Report),
    /// How waking the agent for a task went (`status`: `success`, `failed`,
    /// `timeout`). No reply; a success counts as a sign of life of the task.
    WakeResult(Report),
    /// Host metrics, sent periodically. No reply; kept per agent.
    ResourceReport(Resources),
    /// The sidecar is about to restart (`reason`). No reply; it gets no new
    /// tasks until it identifies again.
    AgentRestarting(Option<String>),
    /// A piece of the task's output. No reply; stored (bounded) and served
    /// by `WatchTaskOutput`.
    Output(Output),
}

impl FromAgent {
    /// The report about one task this message is, if it is one.
    pub fn report(&self) -> Option<&Report> {
        match self {
            FromAgent::Accepted(r)
            | FromAgent::Progress(r)
            | FromAgent::Complete(r)
            | FromAgent::Failed(r)
            | FromAgent::Rejected(r)
            | FromAgent::Recovering(r)
            | FromAgent::StateReport(r)
            | FromAgent::WakeResult(r) => Some(r),
            _ => None,
        }
    }
}

/// The `task_output` message.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    pub task_id: String,
    pub generation: Option<Generation>,
    pub stream: OutputStream,
    pub data: String,
}

/// The `identify` message.
#[derive(Debug, Clone, PartialEq)]
pub struct Identify {
    pub agent_id: String,
    pub token: String,
    pub name: Option<String>,
    pub status: Option<String>,
    pub capabilities: Vec<String>,
    pub max_concurrency: u32,
}

/// A lifecycle report about one task.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub task_id: String,
    pub generation: Option<Generation>,
    /// The whole message minus `type` and `token`: stored as the event payload.
    pub payload: JsonObject,
}

/// What a `task_ack` confirms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AckStatus {
    Accepted,
    Complete,
    Failed,
    Rejected,
}

/// The answer to a `state_report`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StateAction {
    /// The task is still this sidecar's, at the generation it reported.
    Continue,
    /// The task is not (or no longer) this sidecar's: stop working on it.
    Abort,
}

/// Metadata keys that `task_assign` also carries at its top level, where
/// AgentCom sidecars look for them (the metadata itself is sent unchanged).
pub const ENRICHMENT_KEYS: [&str; 10] = [
    "routing_decision",
    "repo",
    "branch",
    "complexity",
    "verification_steps",
    "skip_verification",
    "verification_timeout_ms",
    "max_verification_retries",
    "file_hints",
    "success_criteria",
];

/// Hub → sidecar. Serialized by the WebSocket writer as
/// `{"type": <variant in snake_case>, ...fields}`.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToAgent {
    /// The identify succeeded.
    Identified { agent_id: String },
    /// A task to run. `extra`: the AgentCom enrichment fields copied to the
    /// top level from the task's metadata (see [`ENRICHMENT_KEYS`]).
    TaskAssign {
        task_id: String,
        description: String,
        metadata: std::sync::Arc<JsonObject>,
        generation: Generation,
        assigned_at: i64,
        /// The W3C trace context the task was pushed with, if any (the
        /// reference sidecar gives it to its command as `TRACEPARENT`).
        #[serde(skip_serializing_if = "Option::is_none")]
        traceparent: Option<String>,
        #[serde(flatten)]
        extra: JsonObject,
    },
    /// The report is durably stored.
    TaskAck { task_id: String, status: AckStatus },
    /// Stop working on the task.
    TaskCancelled { task_id: String, reason: String },
    /// After `task_recovering`: keep the task.
    TaskContinue {
        task_id: String,
        generation: Generation,
    },
    /// After `task_recovering`: drop the task, it is not yours.
    TaskReassign { task_id: String },
    /// Answer to `ping`.
    Pong { timestamp: i64 },
    /// After `state_report`: go on with the task, or drop it.
    StateReportAck {
        task_id: String,
        action: StateAction,
    },
    /// An administrator asks the sidecar to restart itself.
    RestartSidecar { reason: String },
    /// A message already encoded by the leader of a cluster (the node
    /// holding the socket only forwards it). Never sent by a single hub.
    #[serde(skip)]
    Relayed(String),
    /// A refused message; the socket stays open.
    Error {
        error: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        task_id: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        detail: Option<String>,
    },
}

impl ToAgent {
    /// An `error` frame.
    pub fn error(code: &'static str, task_id: Option<&str>, detail: Option<String>) -> ToAgent {
        ToAgent::Error {
            error: code,
            task_id: task_id.map(str::to_string),
            detail,
        }
    }

    /// The error frame for a hub error.
    pub fn from_error(e: &crate::error::Error) -> ToAgent {
        let detail = match e {
            crate::error::Error::Storage {
                fault: crate::error::StorageFault::TooLarge,
                detail,
            } => Some(detail.clone()),
            crate::error::Error::Storage { fault, .. } => {
                Some(crate::error::fault_text(*fault).to_string())
            }
            _ => None,
        };
        ToAgent::error(e.ws_code(), e.task_id(), detail)
    }
}

/// Why the hub ends a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// The session ended normally.
    Normal,
    /// A newer identify for the same agent took over.
    SessionReplaced,
    /// The peer stopped reading: its outbound queue is full.
    QueueFull,
    /// No identify in time.
    IdentifyTimeout,
    /// A message over the size limit.
    TooBig,
    /// The peer stopped answering pings.
    PingTimeout,
    /// The hub is shutting down.
    ShuttingDown,
    /// The peer broke the WebSocket protocol.
    ProtocolError,
    /// A text frame that is not UTF-8.
    InvalidPayload,
    /// The token the connection identified with was revoked.
    TokenRevoked,
    /// Too many failed identifies from the peer's address.
    TooManyFailedIdentifies,
    /// Cluster mode: another node leads now; identify again (with it).
    LeaderChanged,
}

impl CloseReason {
    const ALL: [CloseReason; 12] = [
        CloseReason::Normal,
        CloseReason::SessionReplaced,
        CloseReason::QueueFull,
        CloseReason::IdentifyTimeout,
        CloseReason::TooBig,
        CloseReason::PingTimeout,
        CloseReason::ShuttingDown,
        CloseReason::ProtocolError,
        CloseReason::InvalidPayload,
        CloseReason::TokenRevoked,
        CloseReason::TooManyFailedIdentifies,
        CloseReason::LeaderChanged,
    ];

    /// A stable name (carried between cluster nodes).
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Normal => "normal",
            CloseReason::SessionReplaced => "session_replaced",
            CloseReason::QueueFull => "queue_full",
            CloseReason::IdentifyTimeout => "identify_timeout",
            CloseReason::TooBig => "too_big",
            CloseReason::PingTimeout => "ping_timeout",
            CloseReason::ShuttingDown => "shutting_down",
            CloseReason::ProtocolError => "protocol_error",
            CloseReason::InvalidPayload => "invalid_payload",
            CloseReason::TokenRevoked => "token_revoked",
            CloseReason::TooManyFailedIdentifies => "too_many_failed_identifies",
            CloseReason::LeaderChanged => "leader_changed",
        }
    }

    /// The reason named by [`CloseReason::as_str`].
    pub fn from_name(name: &str) -> Option<CloseReason> {
        Self::ALL.into_iter().find(|r| r.as_str() == name)
    }
}

/// One agent connection as the hub sees it. Implemented by the WebSocket
/// session; tests may implement it in memory.
pub trait AgentLink: Send + Sync + 'static {
    /// Unique per connection.
    fn id(&self) -> u64;
    /// Queue a message. False if the connection is gone or could not take it
    /// (a connection that stops reading is closed rather than buffered without bound).
    fn send(&self, msg: ToAgent) -> bool;
    /// Ask for the connection to be closed (queued messages go first).
    fn close(&self, why: CloseReason);
}

/// A shared handle on an agent connection.
pub type Link = Arc<dyn AgentLink>;
