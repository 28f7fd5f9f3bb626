//! The log's entry: what one group commit appends, in both modes (the
//! single node's log file and the cluster's JetStream stream), and what a
//! [copy](super::sqlite::SqliteStore) applies.
//!
//! An entry is `[u32 head length, big-endian][head JSON][each event's
//! encoded `TaskEvent`, in order]`. The head lists the events (seq, task,
//! agent, kind, length) and the final row of every task the group changes,
//! each once, with the `last_seq` it replaces: a node that replays the log
//! rebuilds the same task records, and the copy checks each row against
//! the one it holds.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use super::{Batch, TaskWrite};
use crate::error::{Error, Result};
use crate::event::EncodedEvent;
use crate::model::{EventKind, Seq, Task};

#[derive(Serialize, Deserialize)]
struct Head {
    events: Vec<EventHead>,
    /// Every task row the entry changes, each once, with its final content.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    rows: Vec<Row>,
}

#[derive(Serialize, Deserialize)]
struct EventHead {
    seq: Seq,
    task_id: String,
    agent_id: String,
    kind: EventKind,
    /// Length of the encoded event in the entry's tail.
    len: u32,
}

#[derive(Serialize, Deserialize)]
struct Row {
    task: Task,
    expected: Option<Seq>,
}

/// The entry of a group of batches: their events in order, and the final
/// row of every task they change (checked against the row before the
/// group's first change of it).
pub fn encode<'a, I>(group: I) -> Bytes
where
    I: IntoIterator<Item = &'a Batch>,
    I::IntoIter: Clone,
{
    let group = group.into_iter();
    let mut rows: Vec<Row> = Vec::new();
    let mut at: HashMap<&str, usize> = HashMap::new();
    for w in group.clone().flat_map(|b| &b.tasks) {
        match at.get(w.task.task_id.as_str()) {
            Some(&i) => rows[i].task = w.task.clone(),
            None => {
                at.insert(w.task.task_id.as_str(), rows.len());
                rows.push(Row {
                    task: w.task.clone(),
                    expected: w.expected_last_seq,
                });
            }
        }
    }
    let events: Vec<&Arc<EncodedEvent>> = group.flat_map(|b| &b.events).collect();
    let head = Head {
        events: events
            .iter()
            .map(|ev| EventHead {
                seq: ev.seq,
                task_id: ev.task_id.clone(),
                agent_id: ev.agent_id.clone(),
                kind: ev.kind,
                len: ev.proto().len() as u32,
            })
            .collect(),
        rows,
    };
    let json = serde_json::to_vec(&head).expect("entry head serializes");
    let tail: usize = events.iter().map(|ev| ev.proto().len()).sum();
    let mut buf = BytesMut::with_capacity(4 + json.len() + tail);
    buf.put_u32(json.len() as u32);
    buf.put_slice(&json);
    for ev in events {
        buf.put_slice(ev.proto());
    }
    buf.freeze()
}

/// The events and task rows of an entry; `at` names it in errors.
pub fn decode(at: &str, payload: &Bytes) -> Result<(Vec<Arc<EncodedEvent>>, Vec<TaskWrite>)> {
    let bad = |what: &str| Error::storage(format!("log entry {at}: {what}"));
    if payload.len() < 4 {
        return Err(bad("too short"));
    }
    let n = u32::from_be_bytes(payload[..4].try_into().expect("4 bytes")) as usize;
    if payload.len() < 4 + n {
        return Err(bad("truncated"));
    }
    let head: Head = serde_json::from_slice(&payload[4..4 + n]).map_err(|e| bad(&e.to_string()))?;
    let mut offset = 4 + n;
    let mut events = Vec::with_capacity(head.events.len());
    for ev in head.events {
        let end = offset + ev.len as usize;
        if end > payload.len() {
            return Err(bad("truncated"));
        }
        let proto = payload.slice(offset..end);
        offset = end;
        events.push(Arc::new(EncodedEvent::stored(
            ev.seq,
            ev.task_id,
            ev.agent_id,
            ev.kind,
            proto,
        )));
    }
    let rows = head
        .rows
        .into_iter()
        .map(|r| TaskWrite {
            task: r.task,
            expected_last_seq: r.expected,
        })
        .collect();
    Ok((events, rows))
}
