//! A task's row as the copy stores it and the log carries it: the columns
//! the copy's indexes need (`task_id`, `last_seq`, `created_seq`) and a
//! JSON body with the rest of the task, without its description and result
//! (those live in its CREATED and COMPLETED events) and without empty
//! fields. The log's writer encodes a row's body once; the copy stores
//! those bytes as they are.

use serde::Serialize;

use crate::error::{Error, Result};
use crate::model::{JsonObject, Priority, Seq, Task, TaskState};

/// The row's JSON body.
#[derive(Serialize)]
struct RowBody<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    agent_id: &'a Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pinned: bool,
    #[serde(skip_serializing_if = "JsonObject::is_empty")]
    metadata: &'a JsonObject,
    state: TaskState,
    generation: u64,
    attempts: u32,
    max_attempts: u32,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    needed_capabilities: &'a [String],
    priority: Priority,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: &'a Option<serde_json::Value>,
    created_at_ms: i64,
    updated_at_ms: i64,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    depends_on: &'a [String],
    #[serde(skip_serializing_if = "is_zero_u64")]
    queue_ttl_ms: u64,
    #[serde(skip_serializing_if = "is_zero_i64")]
    deadline_ms: i64,
}

fn is_zero_u64(n: &u64) -> bool {
    *n == 0
}

fn is_zero_i64(n: &i64) -> bool {
    *n == 0
}

/// The JSON body of `t`'s row.
pub fn body(t: &Task) -> String {
    serde_json::to_string(&RowBody {
        agent_id: &t.agent_id,
        pinned: t.pinned,
        metadata: &t.metadata,
        state: t.state,
        generation: t.generation,
        attempts: t.attempts,
        max_attempts: t.max_attempts,
        needed_capabilities: &t.needed_capabilities,
        priority: t.priority,
        error: &t.error,
        created_at_ms: t.created_at_ms,
        updated_at_ms: t.updated_at_ms,
        depends_on: &t.depends_on,
        queue_ttl_ms: t.queue_ttl_ms,
        deadline_ms: t.deadline_ms,
    })
    .expect("a task row serializes")
}

/// The task a row holds (description and result empty: see the module).
pub fn task(task_id: &str, last_seq: Seq, created_seq: Seq, body: &str) -> Result<Task> {
    let mut task: Task = serde_json::from_str(body)
        .map_err(|e| Error::storage(format!("task {task_id}: bad row: {e}")))?;
    task.task_id = task_id.to_owned();
    task.last_seq = last_seq;
    task.created_seq = created_seq;
    Ok(task)
}
