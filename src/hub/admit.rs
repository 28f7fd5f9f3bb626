//! One change is checked before it joins a group commit: what it adds to
//! the log must fit in one entry, so a change can never fail a group commit
//! for a reason of its own (its size), and one request's fault stays with
//! that request.
//!
//! A request's own content (a push's description and metadata, a report's
//! payload) may take at most half of what the store takes in one change:
//! the other half is room for what the hub adds to it (the task's row,
//! events of tasks scheduled with it). The limit is the store's
//! ([`Store::max_change_bytes`](crate::store::Store::max_change_bytes)):
//! one NATS message in cluster mode; far above any frame on one node.

use super::{Hub, PushRequest};
use crate::error::{Error, Result, StorageFault};
use crate::event::payload_len;
use crate::link::FromAgent;

/// What the hub adds to any change besides the request's content: event
/// heads, ids, counters, timestamps.
const FIXED: usize = 2048;
/// Per string in a list (capabilities, dependencies), in each place it
/// is stored.
const PER_ITEM: usize = 16;

impl Hub {
    /// Refuse a change of `task_id` whose own content takes `bytes` in the
    /// log, if the log could not take it in one entry (or the store's fault
    /// injection refuses it). Nothing was changed: the caller alone gets
    /// the error.
    pub(super) fn admit(&self, task_id: &str, bytes: usize) -> Result<()> {
        self.store.check_change(task_id)?;
        let room = self.store.max_change_bytes() / 2;
        if bytes <= room {
            return Ok(());
        }
        Err(Error::Storage {
            fault: StorageFault::TooLarge,
            detail: format!(
                "the change is too large for the log: about {bytes} bytes, more than the \
                 {room} one request may take (half of one log entry)"
            ),
        })
    }
}

/// Bytes a push's own content takes in the log: the CREATED event (its
/// description, capabilities, dependencies) and the task's row (metadata,
/// capabilities, dependencies).
pub(super) fn push_bytes(req: &PushRequest) -> usize {
    let list = |l: &[String]| l.iter().map(|s| s.len() + PER_ITEM).sum::<usize>();
    FIXED
        + 2 * req.task_id.as_ref().map_or(0, String::len)
        + req.description.len()
        + json_len(&req.metadata)
        + 2 * list(&req.needed_capabilities)
        + 3 * list(&req.depends_on)
}

/// Bytes a report's own content takes in the log: its payload in the
/// event, and a failure's error again in the task's row.
pub(super) fn report_bytes(msg: &FromAgent) -> usize {
    let Some(r) = msg.report() else {
        return 0;
    };
    let row = match msg {
        FromAgent::Failed(_) => r
            .payload
            .get("error")
            .or_else(|| r.payload.get("reason"))
            .map_or(0, json_len),
        _ => 0,
    };
    FIXED + r.task_id.len() + payload_len(&r.payload) + row
}

/// Bytes `v` takes as JSON (how a task's row is stored in an entry).
fn json_len(v: &impl serde::Serialize) -> usize {
    let mut n = Count(0);
    let _ = serde_json::to_writer(&mut n, v);
    n.0
}

/// An `io::Write` that only counts.
struct Count(usize);

impl std::io::Write for Count {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
