//! The sidecar WebSocket protocol (AgentCom protocol_version 1) as plain data.
//!
//! Every frame is one JSON object with a `"type"`. Unknown extra fields are
//! ignored. Times are Unix milliseconds. See `docs/protocol.md`.

use serde_json::{Map, Value};

use crate::model::JsonObject;

pub use crate::link::{FromAgent, Identify, Output, Report, Resources, ToAgent};
use crate::model::OutputStream;

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
pub fn parse(text: &str) -> Result<FromAgent, ProtocolError> {
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
        "identify" => FromAgent::Identify(parse_identify(&obj)?),
        "task_accepted" => FromAgent::Accepted(report(obj)?),
        "task_progress" => FromAgent::Progress(report(obj)?),
        "task_complete" => FromAgent::Complete(report(obj)?),
        "task_failed" => FromAgent::Failed(report(obj)?),
        "task_rejected" => FromAgent::Rejected(report(obj)?),
        "task_recovering" => FromAgent::Recovering(report(obj)?),
        "ping" => FromAgent::Ping,
        "status" => FromAgent::Status(required_str(&obj, "status")?),
        "state_report" => FromAgent::StateReport(report(obj)?),
        "wake_result" => FromAgent::WakeResult(report(obj)?),
        "resource_report" => FromAgent::ResourceReport(parse_resources(&obj)),
        "agent_restarting" => FromAgent::AgentRestarting(optional_str(&obj, "reason")?),
        "task_output" => FromAgent::Output(parse_output(&obj)?),
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

fn parse_output(obj: &JsonObject) -> Result<Output, ProtocolError> {
    let stream = match optional_str(obj, "stream")? {
        None => OutputStream::Stdout,
        Some(s) => OutputStream::parse(&s)
            .ok_or_else(|| ProtocolError::invalid("`stream` must be \"stdout\" or \"stderr\""))?,
    };
    let data = match obj.get("data") {
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(ProtocolError::invalid("`data` must be a string")),
        None => return Err(ProtocolError::invalid("missing field `data`")),
    };
    let generation = match obj.get("generation") {
        None | Some(Value::Null) => None,
        Some(v) => Some(v.as_u64().ok_or_else(|| {
            ProtocolError::invalid("`generation` must be a non-negative integer")
        })?),
    };
    Ok(Output {
        task_id: required_str(obj, "task_id")?,
        generation,
        stream,
        data,
    })
}

/// Lenient: a metric that is missing, null or not a number is unknown.
fn parse_resources(obj: &JsonObject) -> Resources {
    let bytes = |f: &str| {
        obj.get(f)
            .and_then(Value::as_f64)
            .map(|v| v.max(0.0) as u64)
    };
    Resources {
        cpu_percent: obj.get("cpu_percent").and_then(Value::as_f64),
        ram_used_bytes: bytes("ram_used_bytes"),
        ram_total_bytes: bytes("ram_total_bytes"),
        vram_used_bytes: bytes("vram_used_bytes"),
        vram_total_bytes: bytes("vram_total_bytes"),
    }
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

/// Encode one hub message as its JSON text frame.
pub fn encode(msg: &ToAgent) -> String {
    if let ToAgent::Relayed(text) = msg {
        return text.clone();
    }
    serde_json::to_string(msg).unwrap_or_else(|e| {
        // Every field is plain JSON data: this cannot fail.
        tracing::error!(error = %e, "cannot encode a hub message");
        r#"{"type":"error","error":"internal_error"}"#.to_string()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_agentcom_identify_with_extra_fields() {
        let m = parse(r#"{"type":"identify","agent_id":"a1","token":"t","protocol_version":1,"client_type":"sidecar","capabilities":["gpu"]}"#).unwrap();
        let FromAgent::Identify(id) = m else { panic!() };
        assert_eq!(id.agent_id, "a1");
        assert_eq!(id.capabilities, vec!["gpu"]);
        assert_eq!(id.max_concurrency, 1);
    }

    #[test]
    fn report_payload_drops_type_and_token() {
        let m =
            parse(r#"{"type":"task_progress","task_id":"t1","token":"x","progress":50}"#).unwrap();
        let FromAgent::Progress(r) = m else { panic!() };
        assert_eq!(r.payload.get("progress"), Some(&json!(50)));
        assert!(!r.payload.contains_key("token") && !r.payload.contains_key("type"));
    }

    #[test]
    fn hub_messages_encode_as_agentcom_frames() {
        let v: Value = serde_json::from_str(&encode(&ToAgent::TaskAck {
            task_id: "t1".into(),
            status: crate::link::AckStatus::Complete,
        }))
        .unwrap();
        assert_eq!(
            v,
            json!({"type": "task_ack", "task_id": "t1", "status": "complete"})
        );
        let v: Value =
            serde_json::from_str(&encode(&ToAgent::error("unknown_task", Some("t2"), None)))
                .unwrap();
        assert_eq!(
            v,
            json!({"type": "error", "error": "unknown_task", "task_id": "t2"})
        );
    }

    #[test]
    fn parses_current_agentcom_messages() {
        let m = parse(r#"{"type":"state_report","task_id":"t1","status":"working","generation":2,"assigned_at":5,"protocol_version":1}"#).unwrap();
        let FromAgent::StateReport(r) = m else {
            panic!()
        };
        assert_eq!((r.task_id.as_str(), r.generation), ("t1", Some(2)));
        let m = parse(r#"{"type":"wake_result","task_id":"t1","status":"success","attempt":1}"#)
            .unwrap();
        assert!(matches!(m, FromAgent::WakeResult(r) if r.payload["status"] == "success"));
        let m = parse(r#"{"type":"resource_report","agent_id":"a","cpu_percent":12.5,"ram_used_bytes":1024,"ram_total_bytes":null,"vram_used_bytes":"x","timestamp":1}"#).unwrap();
        let FromAgent::ResourceReport(res) = m else {
            panic!()
        };
        assert_eq!(res.cpu_percent, Some(12.5));
        assert_eq!(res.ram_used_bytes, Some(1024));
        assert_eq!((res.ram_total_bytes, res.vram_used_bytes), (None, None));
        let m = parse(r#"{"type":"agent_restarting","reason":"hub_commanded"}"#).unwrap();
        assert_eq!(m, FromAgent::AgentRestarting(Some("hub_commanded".into())));
    }

    #[test]
    fn parses_task_output() {
        let m = parse(r#"{"type":"task_output","task_id":"t1","generation":2,"stream":"stderr","data":"x\n"}"#).unwrap();
        let FromAgent::Output(o) = m else { panic!() };
        assert_eq!(
            (o.task_id.as_str(), o.generation, o.stream, o.data.as_str()),
            ("t1", Some(2), crate::model::OutputStream::Stderr, "x\n")
        );
        let m = parse(r#"{"type":"task_output","task_id":"t1","data":""}"#).unwrap();
        assert!(
            matches!(m, FromAgent::Output(o) if o.stream == crate::model::OutputStream::Stdout && o.generation.is_none())
        );
        for bad in [
            r#"{"type":"task_output","task_id":"t1"}"#,
            r#"{"type":"task_output","task_id":"t1","data":5}"#,
            r#"{"type":"task_output","task_id":"t1","data":"x","stream":"stdin"}"#,
            r#"{"type":"task_output","data":"x"}"#,
        ] {
            assert_eq!(parse(bad).unwrap_err().code, "invalid_message", "{bad}");
        }
    }

    #[test]
    fn task_assign_carries_enrichment_at_top_level() {
        let mut extra = JsonObject::new();
        extra.insert("routing_decision".into(), json!({"target_type": "shell"}));
        let v: Value = serde_json::from_str(&encode(&ToAgent::TaskAssign {
            task_id: "t1".into(),
            description: "d".into(),
            metadata: Default::default(),
            generation: 1,
            assigned_at: 7,
            traceparent: None,
            extra,
        }))
        .unwrap();
        assert_eq!(v["type"], "task_assign");
        assert!(
            v.get("traceparent").is_none(),
            "absent when the push had none"
        );
        assert_eq!(v["routing_decision"], json!({"target_type": "shell"}));
        assert_eq!(v["generation"], 1);
        let v: Value = serde_json::from_str(&encode(&ToAgent::StateReportAck {
            task_id: "t1".into(),
            action: crate::link::StateAction::Abort,
        }))
        .unwrap();
        assert_eq!(
            v,
            json!({"type": "state_report_ack", "task_id": "t1", "action": "abort"})
        );
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
