//! The log's entry: what one group commit appends, in both modes (the
//! single node's log file and the cluster's JetStream stream), and what a
//! [copy](super::sqlite::SqliteStore) applies.
//!
//! An entry is `[u32 head length, big-endian][head][each event's encoded
//! `TaskEvent`, in order]`. The head lists the events (seq, task, agent,
//! kind, length) and the final row of every task the group changes, each
//! once, with the `last_seq` it replaces: a node that replays the log
//! rebuilds the same task records, and the copy checks each row against
//! the one it holds.
//!
//! The head is binary: a version byte (1), then
//! `[varint n][n × (varint seq, str task, str agent, u8 kind, varint length)]`
//! `[varint m][m × (str task, varint last_seq, varint created_seq,
//! varint expected + 1 or 0, str row body)]`, where a `str` is a varint
//! length and UTF-8 bytes and a row body is the JSON the copy stores
//! ([`super::row`]), encoded here once. Entries written before this format
//! have a JSON head (its first byte is `{`); they are read as before.

use std::borrow::Cow;
use std::collections::hash_map::Entry;
use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::encoding::{decode_varint, encode_varint};
use serde::{Deserialize, Serialize};

use super::{row, Batch, TaskWrite};
use crate::error::{Error, Result};
use crate::event::EncodedEvent;
use crate::model::{EventKind, Seq, Task};

/// The first byte of a binary head.
const BINARY_HEAD: u8 = 1;

/// The JSON head of entries written before the binary one (read only).
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
/// goes there). Each row's body is encoded once and kept on its write, for
/// the copy.
pub fn encode_after<'a, I>(group: I, room: usize) -> BytesMut
where
    I: IntoIterator<Item = &'a Batch>,
    I::IntoIter: Clone,
{
    let group = group.into_iter();
    // The last write of each task, with the first write's expectation.
    let mut rows: Vec<(&TaskWrite, Option<Seq>)> = Vec::new();
    let mut at: foldhash::HashMap<&str, usize> = Default::default();
    for w in group.clone().flat_map(|b| &b.tasks) {
        match at.entry(w.task.task_id.as_str()) {
            Entry::Occupied(e) => rows[*e.get()].0 = w,
            Entry::Vacant(e) => {
                e.insert(rows.len());
                rows.push((w, w.expected_last_seq));
            }
        }
    }
    let events: Vec<&Arc<EncodedEvent>> = group.flat_map(|b| &b.events).collect();
    let tail: usize = events.iter().map(|ev| ev.proto().len()).sum();
    let heads: usize = events
        .iter()
        .map(|ev| 24 + ev.task_id.len() + ev.agent_id.len())
        .chain(
            rows.iter()
                .map(|(w, _)| 40 + w.task.task_id.len() + w.body().len()),
        )
        .sum();
    let mut buf = BytesMut::with_capacity(room + 4 + 21 + heads + tail);
    buf.put_bytes(0, room + 4);
    buf.put_u8(BINARY_HEAD);
    encode_varint(events.len() as u64, &mut buf);
    for ev in &events {
        encode_varint(ev.seq, &mut buf);
        put_str(&mut buf, &ev.task_id);
        put_str(&mut buf, &ev.agent_id);
        buf.put_u8(ev.kind.code() as u8);
        encode_varint(ev.proto().len() as u64, &mut buf);
    }
    encode_varint(rows.len() as u64, &mut buf);
    for (w, expected) in &rows {
        put_str(&mut buf, &w.task.task_id);
        encode_varint(w.task.last_seq, &mut buf);
        encode_varint(w.task.created_seq, &mut buf);
        encode_varint(expected.map_or(0, |s| s + 1), &mut buf);
        put_str(&mut buf, w.body());
    }
    let n = (buf.len() - room - 4) as u32;
    buf[room..room + 4].copy_from_slice(&n.to_be_bytes());
    for ev in events {
        buf.put_slice(ev.proto());
    }
    buf
}

fn put_str(buf: &mut BytesMut, s: &str) {
    encode_varint(s.len() as u64, buf);
    buf.put_slice(s.as_bytes());
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
    let head = &payload[4..4 + n];
    let (heads, rows) = match head.first() {
        Some(&BINARY_HEAD) => decode_binary(&head[1..]).map_err(|e| bad(&e))?,
        Some(b'{') => decode_json(head).map_err(|e| bad(&e))?,
        _ => return Err(bad("unknown head format")),
    };
    let mut offset = 4 + n;
    let mut events = Vec::with_capacity(heads.len());
    for ev in heads {
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
    Ok((events, rows))
}

fn decode_json(
    head: &[u8],
) -> std::result::Result<(Vec<EventHead<'static>>, Vec<TaskWrite>), String> {
    let head: Head = serde_json::from_slice(head).map_err(|e| e.to_string())?;
    let events = head
        .events
        .into_iter()
        .map(|ev| EventHead {
            seq: ev.seq,
            task_id: Cow::Owned(ev.task_id.into_owned()),
            agent_id: Cow::Owned(ev.agent_id.into_owned()),
            kind: ev.kind,
            len: ev.len,
        })
        .collect();
    let rows = head
        .rows
        .into_iter()
        .map(|r| TaskWrite::new(r.task.into_owned(), r.expected))
        .collect();
    Ok((events, rows))
}

fn decode_binary(
    mut head: &[u8],
) -> std::result::Result<(Vec<EventHead<'static>>, Vec<TaskWrite>), String> {
    let head = &mut head;
    let n = varint(head)?;
    let mut events = Vec::with_capacity(n.min(1 << 16) as usize);
    for _ in 0..n {
        let seq = varint(head)?;
        let task_id = string(head)?;
        let agent_id = string(head)?;
        if !head.has_remaining() {
            return Err("truncated head".into());
        }
        let code = head.get_u8();
        let kind = EventKind::from_code(i32::from(code))
            .ok_or_else(|| format!("unknown event kind {code}"))?;
        let len = u32::try_from(varint(head)?).map_err(|_| "bad event length")?;
        events.push(EventHead {
            seq,
            task_id: Cow::Owned(task_id),
            agent_id: Cow::Owned(agent_id),
            kind,
            len,
        });
    }
    let m = varint(head)?;
    let mut rows = Vec::with_capacity(m.min(1 << 16) as usize);
    for _ in 0..m {
        let task_id = string(head)?;
        let last_seq = varint(head)?;
        let created_seq = varint(head)?;
        let expected = varint(head)?.checked_sub(1);
        let body = string(head)?;
        let task = row::task(&task_id, last_seq, created_seq, &body).map_err(|e| e.to_string())?;
        rows.push(TaskWrite::with_body(task, expected, body));
    }
    if head.has_remaining() {
        return Err("bytes after the head".into());
    }
    Ok((events, rows))
}

fn varint(buf: &mut &[u8]) -> std::result::Result<u64, String> {
    decode_varint(buf).map_err(|_| "truncated head".to_string())
}

fn string(buf: &mut &[u8]) -> std::result::Result<String, String> {
    let len = varint(buf)?;
    if len > buf.remaining() as u64 {
        return Err("truncated head".into());
    }
    let (s, rest) = buf.split_at(len as usize);
    let s = std::str::from_utf8(s).map_err(|_| "a string that is not UTF-8")?;
    *buf = rest;
    Ok(s.to_owned())
}

/// [`encode`] as versions before the binary head wrote it: a JSON head
/// (tests of reading old logs).
#[cfg(test)]
pub(crate) fn encode_json(group: &[Batch]) -> Bytes {
    let mut rows: Vec<Row> = Vec::new();
    for w in group.iter().flat_map(|b| &b.tasks) {
        match rows.iter_mut().find(|r| r.task.task_id == w.task.task_id) {
            Some(r) => r.task = Cow::Borrowed(&w.task),
            None => rows.push(Row {
                task: Cow::Borrowed(&w.task),
                expected: w.expected_last_seq,
            }),
        }
    }
    let events: Vec<&Arc<EncodedEvent>> = group.iter().flat_map(|b| &b.events).collect();
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
    let head = serde_json::to_vec(&head).unwrap();
    let mut buf = BytesMut::new();
    buf.put_u32(head.len() as u32);
    buf.put_slice(&head);
    for ev in events {
        buf.put_slice(ev.proto());
    }
    buf.freeze()
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
            b.tasks.push(TaskWrite::new(task(&id, seq), expected));
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

    /// A log written before the binary head is read as it was, and gives
    /// what the same group gives in the binary head.
    #[test]
    fn an_entry_with_a_json_head_reads_as_the_binary_one() {
        let group = [batch(1..41, 16, Some(7)), batch(41..61, 16, None)];
        let (old_events, old_rows) = decode("old", &encode_json(&group)).unwrap();
        let (events, rows) = decode("new", &encode(&group)).unwrap();
        assert_eq!(old_events.len(), events.len());
        for (a, b) in old_events.iter().zip(&events) {
            assert_eq!(
                (a.seq, &a.task_id, &a.agent_id, a.kind, a.proto()),
                (b.seq, &b.task_id, &b.agent_id, b.kind, b.proto())
            );
        }
        assert_eq!(old_rows.len(), rows.len());
        for (a, b) in old_rows.iter().zip(&rows) {
            assert_eq!(a.task, b.task);
            assert_eq!(a.expected_last_seq, b.expected_last_seq);
            assert_eq!(a.body(), b.body());
        }
    }

    /// The row body the entry carries is the one the copy stores, encoded
    /// once: the writes it was encoded from keep it.
    #[test]
    fn the_row_body_is_encoded_once_and_read_back_as_it_was() {
        let group = [batch(1..5, 2, None)];
        let bytes = encode(&group);
        let last = &group[0].tasks[3];
        assert_eq!(
            last.body.get().map(String::as_str),
            Some(row::body(&last.task).as_str())
        );
        let (_, rows) = decode("t", &bytes).unwrap();
        let back = rows
            .iter()
            .find(|r| r.task.task_id == last.task.task_id)
            .unwrap();
        assert_eq!(back.body.get(), last.body.get());
    }

    /// A damaged head is an error naming the entry, never a panic or a
    /// wrong result read as right: every truncation, and every byte of the
    /// head changed.
    #[test]
    fn a_damaged_head_is_an_error() {
        let bytes = encode(&[batch(1..9, 3, Some(2))]);
        let n = u32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize;
        for cut in 0..bytes.len() {
            let mut b = BytesMut::from(&bytes[..cut]);
            if cut > 4 && cut < 4 + n {
                // A head that ends early, its length saying so.
                b[..4].copy_from_slice(&((cut - 4) as u32).to_be_bytes());
            }
            assert!(decode("cut", &b.freeze()).is_err(), "cut at {cut}");
        }
        for i in 4..4 + n {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut b = BytesMut::from(&bytes[..]);
                b[i] ^= flip;
                // Either refused or decoded to something; never a panic.
                let _ = decode("flip", &b.freeze());
            }
        }
        let mut b = BytesMut::from(&bytes[..]);
        b[4] = 7;
        let e = decode("x-9", &b.freeze()).unwrap_err().to_string();
        assert!(
            e.contains("x-9") && e.contains("unknown head format"),
            "{e}"
        );
    }
}
