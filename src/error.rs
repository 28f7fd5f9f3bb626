//! One error type for the whole hub, and the only place that maps it to the wire:
//! gRPC status codes, WebSocket `error` codes and HTTP statuses.

/// Why the store cannot take writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StorageFault {
    /// The disk (or quota) is full.
    Full,
    /// The operating system reported an I/O error.
    Io,
    /// The database or its directory is read-only.
    ReadOnly,
    /// Another process held the database lock longer than the store waits.
    Busy,
    /// The database file is damaged.
    Corrupt,
    /// The log rejected the write (another writer got there first).
    Conflict,
    /// Cluster mode: this node does not hold the leader lease (it follows
    /// the log and forwards writes to the leader).
    NotLeader,
    /// Cluster mode: one change is larger than the log takes in one entry
    /// (NATS's `max_payload`). Only that change is refused; the store is fine.
    TooLarge,
    /// Anything else.
    Other,
}

impl StorageFault {
    /// Short, stable name (used in `/health` and error details).
    pub fn as_str(self) -> &'static str {
        match self {
            StorageFault::Full => "disk_full",
            StorageFault::Io => "io_error",
            StorageFault::ReadOnly => "read_only",
            StorageFault::Busy => "busy",
            StorageFault::Corrupt => "corrupt",
            StorageFault::Conflict => "conflict",
            StorageFault::NotLeader => "not_leader",
            StorageFault::TooLarge => "entry_too_large",
            StorageFault::Other => "storage_error",
        }
    }
}

impl std::fmt::Display for StorageFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything that can go wrong in a hub operation.
#[derive(Clone, Debug, thiserror::Error)]
pub enum Error {
    #[error("missing or invalid token")]
    Unauthenticated,
    #[error("permission denied: {0}")]
    PermissionDenied(&'static str),
    #[error("invalid_token")]
    InvalidToken,
    #[error("token_agent_mismatch")]
    TokenAgentMismatch,
    #[error("agent_not_connected: {0}")]
    AgentNotConnected(String),
    #[error("task not found: {0}")]
    UnknownTask(String),
    #[error("task {0} already exists with different content")]
    AlreadyExists(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("not_task_owner: task {0} is not assigned to this agent")]
    NotTaskOwner(String),
    #[error("stale_generation: task {task_id} is at generation {current}")]
    StaleGeneration { task_id: String, current: u64 },
    #[error("task_finished: task {0} is already final")]
    TaskFinished(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("cursor {after_seq} is older than the retained history (first retained seq {first})")]
    OutOfRange { after_seq: u64, first: u64 },
    #[error("cursor {after_seq} is ahead of the log (last seq {head})")]
    CursorAhead { after_seq: u64, head: u64 },
    #[error("cursor belongs to log {given}, this hub's log is {current}")]
    LogMismatch { given: String, current: String },
    #[error("the hub is shutting down")]
    ShuttingDown,
    /// The store cannot take writes (or failed one). Nothing of the failed
    /// change is visible or acknowledged.
    #[error("storage unavailable ({fault}): {detail}")]
    Storage { fault: StorageFault, detail: String },
}

impl Error {
    /// A storage error of no particular kind.
    pub fn storage(detail: impl Into<String>) -> Error {
        Error::Storage {
            fault: StorageFault::Other,
            detail: detail.into(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        use rusqlite::ErrorCode as C;
        let fault = match &e {
            rusqlite::Error::SqliteFailure(f, _) => match f.code {
                C::DiskFull => StorageFault::Full,
                C::ReadOnly => StorageFault::ReadOnly,
                C::DatabaseBusy | C::DatabaseLocked => StorageFault::Busy,
                C::SystemIoFailure | C::CannotOpen => StorageFault::Io,
                C::DatabaseCorrupt | C::NotADatabase => StorageFault::Corrupt,
                _ => StorageFault::Other,
            },
            _ => StorageFault::Other,
        };
        Error::Storage {
            fault,
            detail: e.to_string(),
        }
    }
}

impl Error {
    /// The `error` code sent to a sidecar in `{"type":"error","error":CODE}`.
    pub fn ws_code(&self) -> &'static str {
        match self {
            Error::InvalidToken | Error::Unauthenticated => "invalid_token",
            Error::TokenAgentMismatch => "token_agent_mismatch",
            Error::NotTaskOwner(_) => "not_task_owner",
            Error::StaleGeneration { .. } => "stale_generation",
            Error::UnknownTask(_) => "unknown_task",
            Error::TaskFinished(_) => "task_finished",
            Error::InvalidArgument(_)
            | Error::Storage {
                fault: StorageFault::TooLarge,
                ..
            } => "invalid_message",
            Error::ShuttingDown => "shutting_down",
            Error::Storage { .. } => "storage_unavailable",
            _ => "internal_error",
        }
    }

    /// The task a WebSocket error is about, if any.
    pub fn task_id(&self) -> Option<&str> {
        match self {
            Error::NotTaskOwner(t)
            | Error::UnknownTask(t)
            | Error::TaskFinished(t)
            | Error::StaleGeneration { task_id: t, .. } => Some(t),
            _ => None,
        }
    }

    /// HTTP status and the short `error` string for the JSON body.
    pub fn http(&self) -> (u16, String) {
        match self {
            Error::Unauthenticated | Error::InvalidToken => (401, "unauthorized".into()),
            Error::PermissionDenied(_) => (403, "forbidden".into()),
            Error::AgentNotConnected(_) => (404, "agent_not_connected".into()),
            Error::UnknownTask(_) => (404, "unknown_task".into()),
            Error::AlreadyExists(_) => (409, "already_exists".into()),
            Error::InvalidArgument(m) => (400, m.clone()),
            Error::ShuttingDown => (503, "shutting_down".into()),
            Error::Storage {
                fault: StorageFault::TooLarge,
                detail,
            } => (413, detail.clone()),
            Error::Storage { fault, .. } => (503, format!("storage_unavailable: {fault}")),
            other => (409, other.to_string()),
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        use tonic::Status;
        match &e {
            Error::Unauthenticated | Error::InvalidToken | Error::TokenAgentMismatch => {
                Status::unauthenticated(e.to_string())
            }
            Error::PermissionDenied(_) => Status::permission_denied(e.to_string()),
            Error::AgentNotConnected(a) => {
                Status::not_found(format!("agent_not_connected: agent {a} is not connected"))
            }
            Error::UnknownTask(_) => Status::not_found(e.to_string()),
            Error::AlreadyExists(_) => Status::already_exists(e.to_string()),
            Error::InvalidArgument(_) => Status::invalid_argument(e.to_string()),
            Error::OutOfRange { .. } | Error::CursorAhead { .. } => {
                Status::out_of_range(e.to_string())
            }
            Error::LogMismatch { .. } => Status::failed_precondition(e.to_string()),
            Error::NotTaskOwner(_)
            | Error::StaleGeneration { .. }
            | Error::TaskFinished(_)
            | Error::FailedPrecondition(_) => Status::failed_precondition(e.to_string()),
            Error::ShuttingDown => Status::unavailable(e.to_string()),
            Error::Storage {
                fault: StorageFault::TooLarge,
                detail,
            } => Status::resource_exhausted(detail.clone()),
            Error::Storage { fault, detail } => {
                tracing::warn!(%fault, %detail, "write refused: storage unavailable");
                let msg = format!(
                    "storage unavailable ({}): the hub refuses writes until it recovers; reads go on",
                    fault_text(*fault)
                );
                if *fault == StorageFault::Full {
                    Status::resource_exhausted(msg)
                } else {
                    Status::unavailable(msg)
                }
            }
        }
    }
}

/// The cause as an operator reads it.
pub fn fault_text(fault: StorageFault) -> &'static str {
    match fault {
        StorageFault::Full => "disk full",
        StorageFault::Io => "I/O error",
        StorageFault::ReadOnly => "read-only storage",
        StorageFault::Busy => "database locked by another process",
        StorageFault::Corrupt => "database corrupt",
        StorageFault::Conflict => "write conflict in the log",
        StorageFault::NotLeader => "this node is not the cluster leader",
        StorageFault::TooLarge => "the change is larger than the cluster log takes in one entry",
        StorageFault::Other => "storage error",
    }
}
