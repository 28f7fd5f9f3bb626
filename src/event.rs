//! Events as the hub, the store and every watcher carry them: the fields
//! watchers filter on, and the event's wire form as bytes, made once. The
//! store and the hub's core name this type only; what the bytes are
//! (protobuf, `agenthub.v1.TaskEvent`) is this module's business.

/// An event as stored and fanned out: the fields watchers filter on, and its
/// wire form (an encoded `agenthub.v1.TaskEvent`). The wire form is made once,
/// outside the hub lock (by the store's writer, on first use), and the same
/// bytes go to the store and to every watcher.
#[derive(Debug)]
pub struct EncodedEvent {
    pub seq: crate::model::Seq,
    pub task_id: String,
    pub agent_id: String,
    pub kind: crate::model::EventKind,
    /// The event itself until it is encoded (new events only): taken
    /// when it is, so an event is held once, as bytes.
    source: std::sync::Mutex<Option<crate::model::TaskEvent>>,
    proto: std::sync::OnceLock<bytes::Bytes>,
}

impl EncodedEvent {
    /// A new event, encoded on first use of [`EncodedEvent::proto`].
    pub fn new(event: crate::model::TaskEvent) -> EncodedEvent {
        EncodedEvent {
            seq: event.seq,
            task_id: event.task_id.clone(),
            agent_id: event.agent_id.clone(),
            kind: event.kind,
            source: std::sync::Mutex::new(Some(event)),
            proto: std::sync::OnceLock::new(),
        }
    }

    /// An event read back from the store, already encoded.
    pub fn stored(
        seq: crate::model::Seq,
        task_id: String,
        agent_id: String,
        kind: crate::model::EventKind,
        proto: bytes::Bytes,
    ) -> EncodedEvent {
        EncodedEvent {
            seq,
            task_id,
            agent_id,
            kind,
            source: std::sync::Mutex::new(None),
            proto: std::sync::OnceLock::from(proto),
        }
    }

    /// The encoded `agenthub.v1.TaskEvent`.
    pub fn proto(&self) -> &bytes::Bytes {
        self.proto.get_or_init(|| {
            let source = self.source.lock().unwrap_or_else(|e| e.into_inner()).take();
            match source {
                Some(e) => crate::pb::encode_event(&e),
                None => bytes::Bytes::new(),
            }
        })
    }
}

/// One field of an encoded event's payload, as JSON (`None` without
/// it). What a store reads from stored events: the description of a
/// CREATED event, the result of a COMPLETED one.
pub fn payload_field(
    proto: &[u8],
    field: &str,
) -> Result<Option<serde_json::Value>, prost::DecodeError> {
    use prost::Message;
    let ev = crate::pb::TaskEvent::decode(proto)?;
    Ok(ev
        .payload
        .as_ref()
        .and_then(|p| p.fields.get(field))
        .map(crate::pb::value_to_json))
}

/// Bytes a JSON payload takes in an encoded event (its
/// `google.protobuf.Struct`), computed without encoding it.
pub fn payload_len(payload: &crate::model::JsonObject) -> usize {
    crate::pb::payload_struct_len(payload)
}
