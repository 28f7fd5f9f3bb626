//! The sidecar WebSocket protocol (AgentCom protocol_version 1) as plain data.
//!
//! Every frame is one JSON object with a `"type"`. Unknown extra fields are
//! ignored. Times are Unix milliseconds. See `docs/protocol.md`.

use serde_json::{json, Map, Value};

use crate::model::{Generation, JsonObject, Task};

/// Sidecar → hub.
#[derive(Debug, Clone, PartialEq)]
pub enum Inbound {
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

/// Largest `max_concurrency` a sidecar may announce.
pub const MAX_CONCURRENCY: u32 = 10_000;

/// Why a frame was refused (the socket stays open).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError {
    /// `invalid_json`, `unknown_message_type` or `invalid_message`.
    pub code: &'static str,
    pub detail: String,
}

impl ProtocolError {
    fn invalid(detail: impl Into<String>) -> ProtocolError {
        ProtocolError {
            code: "invalid_message",
            detail: detail.into(),
        }
    }
}

/// Parse one text frame.
pub fn parse(text: &str) -> Result<Inbound, ProtocolError> {
    let value: Value = serde_json::from_str(text).map_err(|e| ProtocolError {
        code: "invalid_json",
        detail: e.to_string(),
    })?;
    let Value::Object(mut obj) = value else {
        return Err(ProtocolError::invalid("a message must be a JSON object"));
    };
    let kind = match obj.remove("type") {
        Some(Value::String(s)) => s,
        Some(_) => return Err(ProtocolError::invalid("`type` must be a string")),
        None => return Err(ProtocolError::invalid("missing field `type`")),
    };
    let report = |obj: Map<String, Value>| parse_report(obj);
    Ok(match kind.as_str() {
        "identify" => Inbound::Identify(parse_identify(&obj)?),
        "task_accepted" => Inbound::Accepted(report(obj)?),
        "task_progress" => Inbound::Progress(report(obj)?),
        "task_complete" => Inbound::Complete(report(obj)?),
        "task_failed" => Inbound::Failed(report(obj)?),
        "task_rejected" => Inbound::Rejected(report(obj)?),
        "task_recovering" => Inbound::Recovering(report(obj)?),
        "ping" => Inbound::Ping,
        "status" => Inbound::Status(required_str(&obj, "status")?),
        other => {
            return Err(ProtocolError {
                code: "unknown_message_type",
                detail: format!("unknown message type `{other}`"),
            })
        }
    })
}

fn required_str(obj: &JsonObject, field: &str) -> Result<String, ProtocolError> {
    match obj.get(field) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        Some(Value::String(_)) => Err(ProtocolError::invalid(format!("`{field}` is empty"))),
        Some(_) => Err(ProtocolError::invalid(format!(
            "`{field}` must be a string"
        ))),
        None => Err(ProtocolError::invalid(format!("missing field `{field}`"))),
    }
}

fn optional_str(obj: &JsonObject, field: &str) -> Result<Option<String>, ProtocolError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(ProtocolError::invalid(format!(
            "`{field}` must be a string"
        ))),
    }
}

fn parse_identify(obj: &JsonObject) -> Result<Identify, ProtocolError> {
    let capabilities = match obj.get("capabilities") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                _ => Err(ProtocolError::invalid("`capabilities` must be strings")),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(ProtocolError::invalid("`capabilities` must be an array")),
    };
    let max_concurrency = match obj.get("max_concurrency") {
        None | Some(Value::Null) => 1,
        Some(v) => match v.as_u64() {
            Some(n @ 1..) if n <= MAX_CONCURRENCY as u64 => n as u32,
            _ => {
                return Err(ProtocolError::invalid(format!(
                    "`max_concurrency` must be an integer from 1 to {MAX_CONCURRENCY}"
                )))
            }
        },
    };
    Ok(Identify {
        agent_id: required_str(obj, "agent_id")?,
        token: required_str(obj, "token")?,
        name: optional_str(obj, "name")?,
        status: optional_str(obj, "status")?,
        capabilities,
        max_concurrency,
    })
}

fn parse_report(mut obj: JsonObject) -> Result<Report, ProtocolError> {
    let task_id = required_str(&obj, "task_id")?;
    let generation = match obj.get("generation") {
        None | Some(Value::Null) => None,
        Some(v) => Some(v.as_u64().ok_or_else(|| {
            ProtocolError::invalid("`generation` must be a non-negative integer")
        })?),
    };
    obj.remove("token");
    Ok(Report {
        task_id,
        generation,
        payload: obj,
    })
}

// ---- hub → sidecar -------------------------------------------------------

/// `{"type":"identified","agent_id":..}`
pub fn identified(agent_id: &str) -> String {
    json!({"type": "identified", "agent_id": agent_id}).to_string()
}

/// `{"type":"task_assign",...}`: a task for the sidecar to run.
pub fn task_assign(task: &Task, assigned_at: i64) -> String {
    json!({
        "type": "task_assign",
        "task_id": task.task_id,
        "description": task.description,
        "metadata": task.metadata,
        "generation": task.generation,
        "assigned_at": assigned_at,
    })
    .to_string()
}

/// `{"type":"task_ack","task_id":..,"status":..}`: the report is durably stored.
pub fn task_ack(task_id: &str, status: &str) -> String {
    json!({"type": "task_ack", "task_id": task_id, "status": status}).to_string()
}

/// `{"type":"task_cancelled","task_id":..,"reason":..}`: stop working on it.
pub fn task_cancelled(task_id: &str, reason: &str) -> String {
    json!({"type": "task_cancelled", "task_id": task_id, "reason": reason}).to_string()
}

/// `{"type":"task_continue","task_id":..,"generation":N}`: keep the task.
pub fn task_continue(task_id: &str, generation: Generation) -> String {
    json!({"type": "task_continue", "task_id": task_id, "generation": generation}).to_string()
}

/// `{"type":"task_reassign","task_id":..}`: drop the task, it is not yours.
pub fn task_reassign(task_id: &str) -> String {
    json!({"type": "task_reassign", "task_id": task_id}).to_string()
}

/// `{"type":"pong","timestamp":ms}`
pub fn pong(timestamp: i64) -> String {
    json!({"type": "pong", "timestamp": timestamp}).to_string()
}

/// `{"type":"error","error":CODE,...}` with optional `task_id` and `detail`.
pub fn error(code: &str, task_id: Option<&str>, detail: Option<&str>) -> String {
    let mut obj = Map::new();
    obj.insert("type".into(), "error".into());
    obj.insert("error".into(), code.into());
    if let Some(t) = task_id {
        obj.insert("task_id".into(), t.into());
    }
    if let Some(d) = detail {
        obj.insert("detail".into(), d.into());
    }
    Value::Object(obj).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_agentcom_identify_with_extra_fields() {
        let m = parse(r#"{"type":"identify","agent_id":"a1","token":"t","protocol_version":1,"client_type":"sidecar","capabilities":["gpu"]}"#).unwrap();
        let Inbound::Identify(id) = m else { panic!() };
        assert_eq!(id.agent_id, "a1");
        assert_eq!(id.capabilities, vec!["gpu"]);
        assert_eq!(id.max_concurrency, 1);
    }

    #[test]
    fn report_payload_drops_type_and_token() {
        let m =
            parse(r#"{"type":"task_progress","task_id":"t1","token":"x","progress":50}"#).unwrap();
        let Inbound::Progress(r) = m else { panic!() };
        assert_eq!(r.payload.get("progress"), Some(&json!(50)));
        assert!(!r.payload.contains_key("token") && !r.payload.contains_key("type"));
    }

    #[test]
    fn error_codes_for_bad_frames() {
        assert_eq!(parse("{nope").unwrap_err().code, "invalid_json");
        assert_eq!(
            parse(r#"{"type":"x"}"#).unwrap_err().code,
            "unknown_message_type"
        );
        assert_eq!(
            parse(r#"{"type":"task_complete"}"#).unwrap_err().code,
            "invalid_message"
        );
        assert_eq!(parse("[1]").unwrap_err().code, "invalid_message");
        assert_eq!(
            parse(r#"{"type":"task_accepted","task_id":"t","generation":-1}"#)
                .unwrap_err()
                .code,
            "invalid_message"
        );
    }
}
