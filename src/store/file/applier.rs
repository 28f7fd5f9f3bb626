//! The applier thread: applies durable records to the SQLite copy in
//! large batches (retrying with backoff when the copy fails), then removes
//! the segments the copy holds. It takes records as the writer had them in
//! memory ([`Fresh`]: no read back, no decoding) while they are kept, and
//! reads the others back from the log.

use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::segment::{self, Parsed, HEADER_LEN, RECORD_HEAD};
use super::{lock, Shared};
use crate::error::{Error, Result, StorageFault};
use crate::event::EncodedEvent;
use crate::store::copy::Applier;
use crate::store::sqlite::SqliteStore;
use crate::store::{Batch, TaskWrite};

/// Most bytes of records the copy applies in one transaction.
const MAX_APPLY_BYTES: usize = 8 << 20;
/// The copy applies once this many records wait, or once the oldest has
/// waited [`APPLY_DELAY`], or at once when a read waits for it: few large
/// transactions instead of one per record (a sequential workload would
/// otherwise pay a SQLite commit per acknowledgement, off its path but
/// not off the CPU).
pub(super) const APPLY_RECORDS: u64 = 256;
const APPLY_DELAY: Duration = Duration::from_millis(10);
/// The longest pause between two tries of a copy that failed to apply.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Most bytes of fresh records kept for the applier (estimated as the
/// writer sizes a group): a copy that falls further behind reads the log.
const FRESH_BYTES: usize = 32 << 20;

/// A durable record as the writer had it in memory.
pub(super) struct Fresh {
    index: u64,
    events: Vec<Arc<EncodedEvent>>,
    rows: Vec<TaskWrite>,
    /// The record's segment (its base) and the offset right after it.
    at: (u64, u64),
    bytes: usize,
}

impl Fresh {
    /// The events and rows of `batches`, appended as record `index`.
    pub(super) fn take<'a>(
        index: u64,
        at: (u64, u64),
        batches: impl Iterator<Item = &'a mut Batch>,
    ) -> Fresh {
        let mut f = Fresh {
            index,
            events: Vec::new(),
            rows: Vec::new(),
            at,
            bytes: 0,
        };
        for b in batches {
            f.bytes += segment::batch_bytes(b);
            f.events.append(&mut b.events);
            f.rows.append(&mut b.tasks);
        }
        f
    }
}

/// Fresh records in index order, at most `limit` bytes of them
/// ([`FRESH_BYTES`]).
pub(super) struct FreshRecords {
    records: VecDeque<Fresh>,
    bytes: usize,
    pub(super) limit: usize,
}

impl Default for FreshRecords {
    fn default() -> Self {
        FreshRecords {
            records: VecDeque::new(),
            bytes: 0,
            limit: FRESH_BYTES,
        }
    }
}

impl FreshRecords {
    /// Keep `f` unless that would pass the bound (the applier reads it
    /// from the log then).
    pub(super) fn push(&mut self, f: Fresh) {
        if self.bytes + f.bytes <= self.limit {
            self.bytes += f.bytes;
            self.records.push_back(f);
        }
    }

    /// The fresh records from `next` on, consecutive, up to `upto` and
    /// about `max_bytes`; records before `next` are dropped (the copy holds
    /// them). Empty when record `next` is not here.
    fn take(&mut self, next: u64, upto: u64, max_bytes: usize) -> Vec<Fresh> {
        while self.records.front().is_some_and(|f| f.index < next) {
            let f = self.records.pop_front().expect("front");
            self.bytes -= f.bytes;
        }
        let mut out: Vec<Fresh> = Vec::new();
        let mut bytes = 0;
        while let Some(f) = self.records.front() {
            let want = out.last().map_or(next, |l| l.index + 1);
            if f.index != want || f.index > upto || (bytes > 0 && bytes + f.bytes > max_bytes) {
                break;
            }
            let f = self.records.pop_front().expect("front");
            self.bytes -= f.bytes;
            bytes += f.bytes;
            out.push(f);
        }
        out
    }

    /// The index of the first fresh record at or after `next`.
    fn first_from(&self, next: u64) -> Option<u64> {
        self.records.iter().map(|f| f.index).find(|i| *i >= next)
    }
}

/// Reads durable records back from the log, in order.
pub(super) struct Reader {
    /// The open segment: its base and file, and the offset of the next record.
    at: Option<(u64, File, u64)>,
    /// Index of the next record to read.
    next: u64,
    /// Where record `next` starts, when known and its segment is not open.
    hint: Option<(u64, u64)>,
}

impl Reader {
    /// A reader whose first record is `next`.
    pub(super) fn from(next: u64) -> Reader {
        Reader {
            at: None,
            next,
            hint: None,
        }
    }

    /// Record `index`, which ends at `at` (segment base, offset), was
    /// applied without reading it: read on after it.
    fn passed(&mut self, index: u64, at: (u64, u64)) {
        self.next = index + 1;
        match &mut self.at {
            Some((base, _, offset)) if *base == at.0 => *offset = at.1,
            _ => {
                self.at = None;
                self.hint = Some(at);
            }
        }
    }

    /// Records from `self.next` up to `upto`, at most about `max_bytes`.
    pub(super) fn read(
        &mut self,
        shared: &Shared,
        upto: u64,
        max_bytes: usize,
    ) -> Result<Vec<(u64, Bytes)>> {
        let mut out = Vec::new();
        let mut bytes = 0;
        while self.next <= upto && bytes < max_bytes {
            let want = self.next;
            let (base, file, offset) = match &mut self.at {
                Some(at) => at,
                None => {
                    let st = lock(&shared.state);
                    let (base, path) = st
                        .segments
                        .iter()
                        .rev()
                        .find(|(b, _)| *b < want)
                        .cloned()
                        .ok_or_else(|| {
                        Error::storage(format!("no log segment holds record {want}"))
                    })?;
                    drop(st);
                    let f = File::open(&path)
                        .map_err(|e| segment::io_err(&format!("open {}", path.display()), e))?;
                    let start = match self.hint.take() {
                        Some((b, offset)) if b == base => offset,
                        _ => HEADER_LEN,
                    };
                    self.at.insert((base, f, start))
                }
            };
            let mut head = [0u8; RECORD_HEAD];
            let n = read_at_most(file, &mut head, *offset)?;
            let parsed_head = segment::parse(&head[..n]);
            if matches!(parsed_head, Parsed::End) || n < RECORD_HEAD {
                // This segment ends: the record is in the next one.
                let next_base = *base;
                let st = lock(&shared.state);
                let has_next = st.segments.iter().any(|(b, _)| *b > next_base && *b < want);
                drop(st);
                if !has_next {
                    return Err(Error::storage(format!(
                        "the log ends before record {want}, which it reported durable"
                    )));
                }
                self.at = None;
                continue;
            }
            let len = u32::from_le_bytes(head[4..8].try_into().expect("4")) as usize;
            if len > segment::MAX_ENTRY {
                return Err(Error::storage(format!(
                    "log record {want}: bad length {len}"
                )));
            }
            let mut buf = vec![0u8; RECORD_HEAD + len];
            let got = read_at_most(file, &mut buf, *offset)?;
            let h = match segment::parse(&buf[..got]) {
                Parsed::Record(h) => h,
                other => {
                    return Err(Error::Storage {
                        fault: StorageFault::Corrupt,
                        detail: format!("log record {want} at offset {offset}: {other:?}"),
                    })
                }
            };
            *offset += (RECORD_HEAD + len) as u64;
            if h.index < want {
                continue;
            }
            if h.index > want {
                return Err(Error::Storage {
                    fault: StorageFault::Corrupt,
                    detail: format!("log record {} where record {want} was expected", h.index),
                });
            }
            bytes += len;
            out.push((h.index, Bytes::from(buf).slice(RECORD_HEAD..)));
            self.next += 1;
        }
        Ok(out)
    }
}

fn read_at_most(file: &File, buf: &mut [u8], offset: u64) -> Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(segment::io_err("read the log", e)),
        }
    }
    Ok(got)
}

pub(super) fn applier_loop(shared: Arc<Shared>, copy: Arc<SqliteStore>) {
    let copy = Applier::new(copy);
    let applied = lock(&shared.state).applied;
    let mut reader = Reader::from(applied + 1);
    let mut backoff = Duration::from_millis(20);
    loop {
        let upto = {
            let mut st = lock(&shared.state);
            while st.applied >= st.durable_index && !st.closing {
                st.applier_idle = true;
                st = shared
                    .durable_cv
                    .wait(st)
                    .unwrap_or_else(|e| e.into_inner());
            }
            st.applier_idle = false;
            if st.applied >= st.durable_index {
                break;
            }
            // Let records gather, unless someone waits for them.
            let until = Instant::now() + APPLY_DELAY;
            while !st.closing
                && st.readers == 0
                && st.durable_index - st.applied < APPLY_RECORDS
                && st.copy_error.is_none()
            {
                let now = Instant::now();
                if now >= until {
                    break;
                }
                st = shared
                    .durable_cv
                    .wait_timeout(st, until - now)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            st.durable_index
        };
        match apply(&shared, &copy, &mut reader, upto) {
            Ok(last) => {
                backoff = Duration::from_millis(20);
                let mut st = lock(&shared.state);
                st.applied = last;
                st.copy_error = None;
                let drop_first = st.segments.len() > 1 && st.segments[1].0 <= last;
                drop(st);
                shared.applied_cv.notify_all();
                if drop_first {
                    remove_applied_segments(&shared, copy.store(), last);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, retry_in = ?backoff, "applying the log to the query copy failed");
                let closing = {
                    let mut st = lock(&shared.state);
                    st.copy_error = Some(e);
                    st.copy_failures += 1;
                    reader = Reader::from(st.applied + 1);
                    st.closing
                };
                shared.applied_cv.notify_all();
                if closing && backoff >= MAX_BACKOFF {
                    tracing::error!(
                        "giving up on the query copy at shutdown; the next start replays the log"
                    );
                    break;
                }
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// Apply records up to `upto` (at most [`MAX_APPLY_BYTES`] of them) to the
/// copy in one commit: the index of the last one applied.
fn apply(shared: &Shared, copy: &Applier, reader: &mut Reader, upto: u64) -> Result<u64> {
    if let Some(faults) = &shared.faults {
        faults.before_copy()?;
    }
    let mut changes = copy.changes();
    let mut bytes = 0;
    while reader.next <= upto && bytes < MAX_APPLY_BYTES {
        let (fresh, first_fresh) = {
            let mut st = lock(&shared.state);
            let fresh = st.fresh.take(reader.next, upto, MAX_APPLY_BYTES - bytes);
            (fresh, st.fresh.first_from(reader.next))
        };
        if fresh.is_empty() {
            // Read the log up to the next fresh record.
            let until = first_fresh.map_or(upto, |i| (i - 1).min(upto));
            for (index, entry) in reader.read(shared, until, MAX_APPLY_BYTES - bytes)? {
                bytes += entry.len();
                changes.entry(index, &entry)?;
            }
            continue;
        }
        for f in fresh {
            bytes += f.bytes;
            reader.passed(f.index, f.at);
            changes.decoded(f.index, f.events, f.rows);
        }
    }
    let last = changes
        .position()
        .ok_or_else(|| Error::storage("no record read"))?;
    copy.apply(changes).wait()?;
    Ok(last)
}

/// Remove segments whose every record the copy holds, once a checkpoint
/// has made the copy durable.
fn remove_applied_segments(shared: &Shared, copy: &SqliteStore, applied: u64) {
    if let Err(e) = copy.checkpoint() {
        tracing::warn!(error = %e, "checkpoint of the query copy failed; keeping log segments");
        return;
    }
    let mut st = lock(&shared.state);
    while st.segments.len() > 1 && st.segments[1].0 <= applied {
        let (_, path) = st.segments.remove(0);
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::warn!(segment = %path.display(), error = %e, "could not remove an applied log segment");
        }
    }
    drop(st);
    let _ = segment::sync_dir(&shared.dir);
}
