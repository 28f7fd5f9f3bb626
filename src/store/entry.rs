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

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use super::{Batch, TaskWrite};
use crate::error::{Error, Result};
use crate::event::EncodedEvent;
use crate::model::{EventKind, Seq, Task};

/// The entry's head. Borrowed when it is written (the writer clones no task
/// and no id to encode a group), owned when it is read back.
#[derive(Serialize, Deserialize)]
struct Head<'a> {
    events: Vec<EventHead<'a>>,
    /// Every task row the entry changes, each once, with its final content.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    rows: Vec<Row<'a>>,
}

#[derive(Serialize, Deserialize)]
struct EventHead<'a> {
    seq: Seq,
    task_id: Cow<'a, str>,
    agent_id: Cow<'a, str>,
    kind: EventKind,
    /// Length of the encoded event in the entry's tail.
    len: u32,
}

#[derive(Serialize, Deserialize)]
struct Row<'a> {
    task: Cow<'a, Task>,
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
    encode_after(group, 0).freeze()
}

/// [`encode`]'s entry after `room` zero bytes (the log file's record head
/// goes there).
pub fn encode_after<'a, I>(group: I, room: usize) -> BytesMut
where
    I: IntoIterator<Item = &'a Batch>,
    I::IntoIter: Clone,
{
    let group = group.into_iter();
    let mut rows: Vec<Row<'a>> = Vec::new();
    let mut at: HashMap<&str, usize> = HashMap::new();
    for w in group.clone().flat_map(|b| &b.tasks) {
        match at.get(w.task.task_id.as_str()) {
            Some(&i) => rows[i].task = Cow::Borrowed(&w.task),
            None => {
                at.insert(w.task.task_id.as_str(), rows.len());
                rows.push(Row {
                    task: Cow::Borrowed(&w.task),
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
                task_id: Cow::Borrowed(&ev.task_id),
                agent_id: Cow::Borrowed(&ev.agent_id),
                kind: ev.kind,
                len: ev.proto().len() as u32,
            })
            .collect(),
        rows,
    };
    let tail: usize = events.iter().map(|ev| ev.proto().len()).sum();
    let capacity = room + 4 + 256 * (head.events.len() + head.rows.len()) + tail;
    let mut buf = BytesMut::with_capacity(capacity);
    buf.put_bytes(0, room + 4);
    let mut buf = buf.writer();
    serde_json::to_writer(&mut buf, &head).expect("entry head serializes");
    let mut buf = buf.into_inner();
    let n = (buf.len() - room - 4) as u32;
    buf[room..room + 4].copy_from_slice(&n.to_be_bytes());
    for ev in events {
        buf.put_slice(ev.proto());
    }
    buf
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
            ev.task_id.into_owned(),
            ev.agent_id.into_owned(),
            ev.kind,
            proto,
        )));
    }
    let rows = head
        .rows
        .into_iter()
        .map(|r| TaskWrite {
            task: r.task.into_owned(),
            expected_last_seq: r.expected,
        })
        .collect();
    Ok((events, rows))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(id: &str, last_seq: Seq) -> Task {
        serde_json::from_value(serde_json::json!({
            "task_id": id, "agent_id": "a-1", "metadata": {"k": [1, 2]},
            "state": "RUNNING", "generation": 2, "attempts": 1, "max_attempts": 3,
            "priority": "NORMAL", "result": null, "error": null,
            "created_at_ms": 1, "updated_at_ms": 2, "last_seq": last_seq,
        }))
        .unwrap()
    }

    fn batch(seqs: std::ops::Range<Seq>, tasks: usize, expected: Option<Seq>) -> Batch {
        let mut b = Batch::default();
        for seq in seqs {
            let id = format!("t-{}", seq as usize % tasks);
            b.tasks.push(TaskWrite {
                task: task(&id, seq),
                expected_last_seq: expected,
            });
            b.events.push(Arc::new(EncodedEvent::stored(
                seq,
                id,
                "a-1".into(),
                EventKind::Progress,
                Bytes::from(vec![seq as u8; 3]),
            )));
        }
        b
    }

    /// Rows are kept once per task with their last content and the first
    /// write's expectation.
    #[test]
    fn a_group_round_trips_with_one_row_per_task() {
        for tasks in [3, 16, 21] {
            let group = [batch(1..41, tasks, Some(7)), batch(41..61, tasks, None)];
            let (events, rows) = decode("t", &encode(&group)).unwrap();
            assert_eq!(events.len(), 60);
            for (i, ev) in events.iter().enumerate() {
                assert_eq!(ev.seq, i as Seq + 1);
                assert_eq!(ev.task_id, format!("t-{}", (i + 1) % tasks));
                assert_eq!(ev.proto().as_ref(), &[(i + 1) as u8; 3]);
            }
            assert_eq!(rows.len(), tasks);
            for (k, row) in rows.iter().enumerate() {
                let id = format!("t-{}", (k + 1) % tasks);
                let last = (1..61)
                    .rev()
                    .find(|s| s % tasks as Seq == (k + 1) as Seq % tasks as Seq);
                assert_eq!(row.task, task(&id, last.unwrap()));
                assert_eq!(row.expected_last_seq, Some(7), "{id}");
            }
        }
    }
}
