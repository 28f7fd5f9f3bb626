//! One error type for the whole hub, and the only place that maps it to the wire:
//! gRPC status codes, WebSocket `error` codes and HTTP statuses.

/// Everything that can go wrong in a hub operation.
#[derive(Debug, thiserror::Error)]
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
    #[error("the hub is shutting down")]
    ShuttingDown,
    #[error("storage error: {0}")]
    Store(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        Error::Store(e.to_string())
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
            Error::InvalidArgument(_) => "invalid_message",
            Error::ShuttingDown => "shutting_down",
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
            Error::Store(_) => (500, "internal_error".into()),
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
            Error::OutOfRange { .. } => Status::out_of_range(e.to_string()),
            Error::NotTaskOwner(_)
            | Error::StaleGeneration { .. }
            | Error::TaskFinished(_)
            | Error::FailedPrecondition(_) => Status::failed_precondition(e.to_string()),
            Error::ShuttingDown => Status::unavailable(e.to_string()),
            Error::Store(detail) => {
                tracing::error!(%detail, "storage error");
                Status::internal("internal storage error")
            }
        }
    }
}
