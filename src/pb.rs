//! Generated gRPC types (`agenthub.v1`) and their conversions to and from the
//! hub's model. JSON objects travel as `google.protobuf.Struct`.

#![allow(clippy::all, missing_docs)]

tonic::include_proto!("agenthub.v1");

/// The TaskHub server, with the watch stream sending [`wire::EventBytes`].
pub mod server {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/server/agenthub.v1.rs"));
}

/// Events on the wire.
pub mod wire {
    use prost::bytes::{Buf, BufMut, Bytes};
    use prost::encoding::{DecodeContext, WireType};

    /// An `agenthub.v1.TaskEvent` that is already encoded: sending it copies
    /// the bytes into the stream, with no per-watcher conversion or encoding.
    #[derive(Clone, Debug, Default, PartialEq)]
    pub struct EventBytes(pub Bytes);

    impl prost::Message for EventBytes {
        fn encode_raw(&self, buf: &mut impl BufMut) {
            buf.put_slice(&self.0);
        }

        fn merge_field(
            &mut self,
            tag: u32,
            wire_type: WireType,
            buf: &mut impl Buf,
            ctx: DecodeContext,
        ) -> Result<(), prost::DecodeError> {
            // The server never decodes events.
            prost::encoding::skip_field(wire_type, tag, buf, ctx)
        }

        fn encoded_len(&self) -> usize {
            self.0.len()
        }

        fn clear(&mut self) {
            self.0 = Bytes::new();
        }
    }
}

/// Encode a model event as an `agenthub.v1.TaskEvent`.
///
/// Written straight from the model (no intermediate `prost_types::Struct`
/// with its cloned keys and strings): this runs once per event on the
/// log's commit. The bytes decode as the same message.
pub fn encode_event(e: &model::TaskEvent) -> prost::bytes::Bytes {
    direct::encode_event(e).into()
}

/// Bytes a JSON payload takes in an encoded event (see [`crate::event`]).
pub fn payload_struct_len(payload: &crate::model::JsonObject) -> usize {
    direct::struct_len(payload)
}

/// Direct protobuf encoding of events and their JSON payloads.
mod direct {
    use prost::encoding::{encode_key, encode_varint, encoded_len_varint, key_len, WireType};
    use serde_json::{Map, Value as Json};

    use crate::model;

    fn string_field_len(tag: u32, s: &str) -> usize {
        key_len(tag) + encoded_len_varint(s.len() as u64) + s.len()
    }

    fn message_field_len(tag: u32, len: usize) -> usize {
        key_len(tag) + encoded_len_varint(len as u64) + len
    }

    fn put_string(tag: u32, s: &str, buf: &mut Vec<u8>) {
        encode_key(tag, WireType::LengthDelimited, buf);
        encode_varint(s.len() as u64, buf);
        buf.extend_from_slice(s.as_bytes());
    }

    fn put_len(tag: u32, len: usize, buf: &mut Vec<u8>) {
        encode_key(tag, WireType::LengthDelimited, buf);
        encode_varint(len as u64, buf);
    }

    /// Length of a `google.protobuf.Value` body.
    fn value_len(v: &Json) -> usize {
        match v {
            Json::Null | Json::Bool(_) => key_len(1) + 1,
            Json::Number(_) => key_len(2) + 8,
            Json::String(s) => string_field_len(3, s),
            Json::Object(m) => message_field_len(5, struct_len(m)),
            Json::Array(a) => message_field_len(6, list_len(a)),
        }
    }

    fn list_len(a: &[Json]) -> usize {
        a.iter().map(|x| message_field_len(1, value_len(x))).sum()
    }

    fn entry_len(k: &str, v: &Json) -> usize {
        string_field_len(1, k) + message_field_len(2, value_len(v))
    }

    /// Length of a `google.protobuf.Struct` body.
    pub fn struct_len(m: &Map<String, Json>) -> usize {
        m.iter()
            .map(|(k, v)| message_field_len(1, entry_len(k, v)))
            .sum()
    }

    fn put_value(v: &Json, buf: &mut Vec<u8>) {
        match v {
            Json::Null => {
                encode_key(1, WireType::Varint, buf);
                encode_varint(0, buf);
            }
            Json::Bool(b) => {
                encode_key(4, WireType::Varint, buf);
                encode_varint(u64::from(*b), buf);
            }
            Json::Number(n) => {
                encode_key(2, WireType::SixtyFourBit, buf);
                buf.extend_from_slice(&n.as_f64().unwrap_or(0.0).to_le_bytes());
            }
            Json::String(s) => put_string(3, s, buf),
            Json::Object(m) => {
                put_len(5, struct_len(m), buf);
                put_struct(m, buf);
            }
            Json::Array(a) => {
                put_len(6, list_len(a), buf);
                for x in a {
                    put_len(1, value_len(x), buf);
                    put_value(x, buf);
                }
            }
        }
    }

    pub fn put_struct(m: &Map<String, Json>, buf: &mut Vec<u8>) {
        for (k, v) in m {
            put_len(1, entry_len(k, v), buf);
            put_string(1, k, buf);
            put_len(2, value_len(v), buf);
            put_value(v, buf);
        }
    }

    fn put_u64(tag: u32, v: u64, buf: &mut Vec<u8>) {
        if v != 0 {
            encode_key(tag, WireType::Varint, buf);
            encode_varint(v, buf);
        }
    }

    fn put_str_nonempty(tag: u32, s: &str, buf: &mut Vec<u8>) {
        if !s.is_empty() {
            put_string(tag, s, buf);
        }
    }

    /// An `agenthub.v1.TaskEvent`.
    pub fn encode_event(e: &model::TaskEvent) -> Vec<u8> {
        let payload = struct_len(&e.payload);
        let mut buf = Vec::with_capacity(64 + e.task_id.len() + e.agent_id.len() + payload);
        put_u64(1, e.seq, &mut buf);
        put_str_nonempty(2, &e.task_id, &mut buf);
        put_str_nonempty(3, &e.agent_id, &mut buf);
        put_u64(
            4,
            super::task_event::Kind::from(e.kind) as i32 as u64,
            &mut buf,
        );
        put_u64(5, e.generation, &mut buf);
        put_len(6, payload, &mut buf);
        put_struct(&e.payload, &mut buf);
        put_u64(7, e.timestamp_ms as u64, &mut buf);
        put_u64(8, super::task::State::from(e.state) as i32 as u64, &mut buf);
        buf
    }

    #[cfg(test)]
    mod tests {
        use prost::Message;
        use serde_json::json;

        use crate::model::{EventKind, TaskEvent, TaskState};
        use crate::pb;

        #[test]
        fn direct_encoding_decodes_as_the_same_event() {
            let payload = json!({
                "task_id": "t1", "n": 1.5, "big": 9007199254740993u64, "neg": -3, "ok": true,
                "none": null, "list": [1, "a", {"x": [null, false]}], "obj": {"deep": {"s": "é"}},
                "": "empty key", "empty": {}, "nothing": []
            });
            let event = TaskEvent {
                seq: 42,
                task_id: "task-1".into(),
                agent_id: String::new(),
                kind: EventKind::Completed,
                generation: 3,
                payload: payload.as_object().unwrap().clone(),
                timestamp_ms: 1_700_000_000_123,
                state: TaskState::Completed,
            };
            let ours = pb::TaskEvent::decode(&super::encode_event(&event)[..]).unwrap();
            let theirs = pb::TaskEvent::from(&event);
            assert_eq!(ours, theirs);
            assert_eq!(
                pb::struct_to_json(ours.payload.as_ref().unwrap()),
                pb::struct_to_json(theirs.payload.as_ref().unwrap())
            );
        }
    }
}

/// The encoded descriptor set, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/agenthub_descriptor.bin"));

use prost_types::value::Kind;
use serde_json::{Map, Number, Value as Json};

use crate::model::{self, JsonObject};

/// JSON value → protobuf Value. Numbers become doubles (as in any Struct).
pub fn json_to_value(v: &Json) -> prost_types::Value {
    let kind = match v {
        Json::Null => Kind::NullValue(0),
        Json::Bool(b) => Kind::BoolValue(*b),
        Json::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        Json::String(s) => Kind::StringValue(s.clone()),
        Json::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.iter().map(json_to_value).collect(),
        }),
        Json::Object(o) => Kind::StructValue(json_to_struct(o)),
    };
    prost_types::Value { kind: Some(kind) }
}

pub fn json_to_struct(o: &JsonObject) -> prost_types::Struct {
    prost_types::Struct {
        fields: o
            .iter()
            .map(|(k, v)| (k.clone(), json_to_value(v)))
            .collect(),
    }
}

/// protobuf Value → JSON. Whole doubles within ±2^53 become JSON integers.
pub fn value_to_json(v: &prost_types::Value) -> Json {
    match &v.kind {
        None | Some(Kind::NullValue(_)) => Json::Null,
        Some(Kind::BoolValue(b)) => Json::Bool(*b),
        Some(Kind::NumberValue(n)) => number_to_json(*n),
        Some(Kind::StringValue(s)) => Json::String(s.clone()),
        Some(Kind::ListValue(l)) => Json::Array(l.values.iter().map(value_to_json).collect()),
        Some(Kind::StructValue(s)) => Json::Object(struct_to_json(s)),
    }
}

fn number_to_json(n: f64) -> Json {
    const MAX_SAFE: f64 = 9_007_199_254_740_992.0;
    if n.fract() == 0.0 && n.abs() <= MAX_SAFE {
        Json::Number(Number::from(n as i64))
    } else {
        Number::from_f64(n).map(Json::Number).unwrap_or(Json::Null)
    }
}

pub fn struct_to_json(s: &prost_types::Struct) -> JsonObject {
    s.fields
        .iter()
        .map(|(k, v)| (k.clone(), value_to_json(v)))
        .collect::<Map<_, _>>()
}

impl From<model::TaskState> for task::State {
    fn from(s: model::TaskState) -> Self {
        use model::TaskState as S;
        match s {
            S::Queued => task::State::Queued,
            S::Assigned => task::State::Assigned,
            S::Running => task::State::Running,
            S::Completed => task::State::Completed,
            S::Failed => task::State::Failed,
            S::Cancelled => task::State::Cancelled,
        }
    }
}

impl task::State {
    pub fn to_model(self) -> Option<model::TaskState> {
        use model::TaskState as S;
        Some(match self {
            task::State::Unspecified => return None,
            task::State::Queued => S::Queued,
            task::State::Assigned => S::Assigned,
            task::State::Running => S::Running,
            task::State::Completed => S::Completed,
            task::State::Failed => S::Failed,
            task::State::Cancelled => S::Cancelled,
        })
    }
}

impl From<model::EventKind> for task_event::Kind {
    fn from(k: model::EventKind) -> Self {
        task_event::Kind::from_str_name(k.as_str()).unwrap_or(task_event::Kind::Unspecified)
    }
}

impl task_event::Kind {
    pub fn to_model(self) -> Option<model::EventKind> {
        model::EventKind::parse(self.as_str_name())
    }
}

impl From<model::Priority> for Priority {
    fn from(p: model::Priority) -> Self {
        Priority::from_str_name(p.as_str()).unwrap_or(Priority::Normal)
    }
}

impl Priority {
    pub fn to_model(self) -> model::Priority {
        model::Priority::parse(self.as_str_name()).unwrap_or_default()
    }
}

impl From<&model::Task> for Task {
    fn from(t: &model::Task) -> Self {
        Task {
            task_id: t.task_id.clone(),
            agent_id: t.agent_id.clone().unwrap_or_default(),
            description: t.description.clone(),
            metadata: Some(json_to_struct(&t.metadata)),
            state: task::State::from(t.state) as i32,
            generation: t.generation,
            attempts: t.attempts,
            max_attempts: t.max_attempts,
            needed_capabilities: t.needed_capabilities.clone(),
            priority: Priority::from(t.priority) as i32,
            result: t.result.as_ref().map(json_to_value),
            error: t.error.as_ref().map(json_to_value),
            created_at_ms: t.created_at_ms,
            updated_at_ms: t.updated_at_ms,
            last_seq: t.last_seq,
            pinned: t.pinned,
            depends_on: t.depends_on.clone(),
            queue_ttl_ms: t.queue_ttl_ms,
            deadline_ms: t.deadline_ms,
        }
    }
}

impl From<&model::TaskEvent> for TaskEvent {
    fn from(e: &model::TaskEvent) -> Self {
        TaskEvent {
            seq: e.seq,
            task_id: e.task_id.clone(),
            agent_id: e.agent_id.clone(),
            kind: task_event::Kind::from(e.kind) as i32,
            generation: e.generation,
            payload: Some(json_to_struct(&e.payload)),
            timestamp_ms: e.timestamp_ms,
            state: task::State::from(e.state) as i32,
        }
    }
}

impl From<&model::AgentInfo> for Agent {
    fn from(a: &model::AgentInfo) -> Self {
        Agent {
            agent_id: a.agent_id.clone(),
            name: a.name.clone(),
            capabilities: a.capabilities.clone(),
            status: a.status.clone(),
            connected: a.connected,
            presence: match a.presence {
                model::AgentPresence::Connected => agent::Presence::Connected,
                model::AgentPresence::Away { .. } => agent::Presence::Away,
                model::AgentPresence::Gone { .. } => agent::Presence::Gone,
            } as i32,
            away_since_ms: match a.presence {
                model::AgentPresence::Connected => 0,
                model::AgentPresence::Away { since_ms, .. }
                | model::AgentPresence::Gone { since_ms } => since_ms,
            },
            connected_at: a.connected_at,
            active_task_ids: a.active_task_ids.clone(),
            max_concurrency: a.max_concurrency,
            resources: a.resources.as_ref().map(|(r, at)| AgentResources {
                cpu_percent: r.cpu_percent,
                ram_used_bytes: r.ram_used_bytes,
                ram_total_bytes: r.ram_total_bytes,
                vram_used_bytes: r.vram_used_bytes,
                vram_total_bytes: r.vram_total_bytes,
                reported_at_ms: *at,
            }),
        }
    }
}

/// A proto TaskEvent as JSON (for `agenthub watch`).
pub fn event_to_json(e: &TaskEvent) -> Json {
    serde_json::json!({
        "seq": e.seq,
        "task_id": e.task_id,
        "agent_id": e.agent_id,
        "kind": task_event::Kind::try_from(e.kind).map(|k| k.as_str_name()).unwrap_or("UNKNOWN"),
        "generation": e.generation,
        "state": task::State::try_from(e.state).map(|s| s.as_str_name()).unwrap_or("UNKNOWN"),
        "payload": e.payload.as_ref().map(struct_to_json).unwrap_or_default(),
        "timestamp_ms": e.timestamp_ms,
    })
}

/// A proto Task as JSON (for `agenthub tasks`).
pub fn task_to_json(t: &Task) -> Json {
    serde_json::json!({
        "task_id": t.task_id,
        "agent_id": t.agent_id,
        "pinned": t.pinned,
        "description": t.description,
        "metadata": t.metadata.as_ref().map(struct_to_json).unwrap_or_default(),
        "state": task::State::try_from(t.state).map(|s| s.as_str_name()).unwrap_or("UNKNOWN"),
        "generation": t.generation,
        "attempts": t.attempts,
        "max_attempts": t.max_attempts,
        "needed_capabilities": t.needed_capabilities,
        "priority": Priority::try_from(t.priority).map(|p| p.as_str_name()).unwrap_or("NORMAL"),
        "result": t.result.as_ref().map(value_to_json),
        "error": t.error.as_ref().map(value_to_json),
        "created_at_ms": t.created_at_ms,
        "updated_at_ms": t.updated_at_ms,
        "last_seq": t.last_seq,
        "depends_on": t.depends_on,
        "queue_ttl_ms": t.queue_ttl_ms,
        "deadline_ms": t.deadline_ms,
    })
}
