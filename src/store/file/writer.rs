//! The log's writer: group commit, led where the load puts it, one record
//! and one sync per group, segments extended with zeros ahead of their
//! records and rolled at [`SEGMENT_BYTES`]; the failure rule of
//! [`crate::store`] (a failed append poisons its write epoch).

use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use super::applier::{Fresh, APPLY_RECORDS};
use super::segment::{self, Header, HEADER_LEN, RECORD_HEAD};
use super::{lock, open_rw, Shared};
use crate::error::{Error, Result, StorageFault};
use crate::model::Seq;
use crate::store::{entry, Batch, Faults, Poison};

/// A segment is closed once it holds this many bytes (a larger record
/// goes alone into a segment of its own).
pub const SEGMENT_BYTES: u64 = 64 << 20;
/// The first zeros written ahead in a new segment; each extension doubles
/// what the segment holds, up to [`MAX_EXTEND`] at a time.
const FIRST_EXTEND: u64 = 256 << 10;
const MAX_EXTEND: u64 = 8 << 20;
/// Most batches folded into one record.
const MAX_GROUP: usize = 4096;
/// A group stops growing once its events hold this many bytes: records
/// stay far below what a record's length field and a scan take (one
/// change is checked against [`crate::store::MAX_CHANGE_BYTES`] before
/// it is built).
const MAX_GROUP_BYTES: usize = crate::store::MAX_CHANGE_BYTES;

/// The writer's end of the log.
pub(super) struct Writer {
    pub(super) dir: PathBuf,
    pub(super) log_id: String,
    pub(super) file: File,
    pub(super) path: PathBuf,
    pub(super) base: u64,
    /// Offset right after the last durable record.
    pub(super) end: u64,
    /// Bytes of the file written (records or zeros).
    pub(super) filled: u64,
    /// Bytes past `end` up to here may hold a write that failed: zeroed
    /// before anything else is written.
    pub(super) dirty: u64,
    pub(super) next_index: u64,
    /// Highest event seq durable.
    pub(super) last_seq: Seq,
    /// A segment is closed once it holds this many bytes.
    pub(super) segment_bytes: u64,
}

impl Writer {
    pub(super) fn create(dir: &Path, log_id: &str, base: u64, last_seq: Seq) -> Result<Writer> {
        let header = Header {
            base,
            base_seq: last_seq,
            log_id: log_id.to_string(),
        };
        let (file, path) = segment::create(dir, &header, FIRST_EXTEND)
            .map_err(|e| segment::io_err("create a log segment", e))?;
        Ok(Writer {
            dir: dir.to_path_buf(),
            log_id: log_id.to_string(),
            file,
            path,
            base,
            end: HEADER_LEN,
            filled: FIRST_EXTEND.max(HEADER_LEN),
            dirty: HEADER_LEN,
            next_index: base + 1,
            last_seq,
            segment_bytes: SEGMENT_BYTES,
        })
    }

    pub(super) fn resume(
        dir: &Path,
        log_id: &str,
        s: &segment::Scan,
        last_seq: Seq,
    ) -> Result<Writer> {
        let file = open_rw(&s.path)?;
        Ok(Writer {
            dir: dir.to_path_buf(),
            log_id: log_id.to_string(),
            file,
            path: s.path.clone(),
            base: s.header.base,
            end: s.end,
            filled: s.file_len,
            dirty: s.end,
            next_index: s.last_index + 1,
            last_seq,
            segment_bytes: SEGMENT_BYTES,
        })
    }

    /// Append one record and sync it: the record is durable on `Ok`.
    /// `record`: the entry after [`RECORD_HEAD`] bytes of room for the
    /// record's head.
    fn append(&mut self, record: &mut [u8], last_seq: Seq, shared: &Shared) -> Result<()> {
        let entry_len = record.len() - RECORD_HEAD;
        if entry_len > segment::MAX_ENTRY {
            // Never write a record the log could not read back.
            return Err(Error::Storage {
                fault: StorageFault::TooLarge,
                detail: format!("a group of {entry_len} bytes is more than one record holds"),
            });
        }
        segment::seal_record(record, self.next_index, last_seq);
        let len = record.len() as u64;
        if self.end > HEADER_LEN && self.end + len > self.segment_bytes {
            self.roll(shared)?;
        }
        let end = self.end + len;
        let written = self.write(record, end);
        if let Err(e) = written {
            self.dirty = self.dirty.max(end);
            return Err(segment::io_err("append to the log", e));
        }
        self.end = end;
        self.dirty = end;
        self.next_index += 1;
        self.last_seq = last_seq;
        Ok(())
    }

    fn write(&mut self, record: &[u8], end: u64) -> std::io::Result<()> {
        if end > self.filled {
            let grow = self.filled.clamp(FIRST_EXTEND, MAX_EXTEND);
            let to = end.max(self.filled + grow);
            match segment::write_zeros(&self.file, self.filled, to) {
                Ok(()) => self.filled = to,
                // A nearly full disk may still hold this record: extend by
                // what it needs alone.
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                    let to = end.next_multiple_of(4096);
                    segment::write_zeros(&self.file, self.filled, to)?;
                    self.filled = to;
                }
                Err(e) => return Err(e),
            }
        }
        self.file.write_all_at(record, self.end)?;
        if self.dirty > end {
            segment::write_zeros(&self.file, end, self.dirty)?;
        }
        self.file.sync_data()
    }

    /// Close the current segment and start the next.
    fn roll(&mut self, shared: &Shared) -> Result<()> {
        if self.dirty > self.end {
            segment::write_zeros(&self.file, self.end, self.dirty)
                .and_then(|_| self.file.sync_data())
                .map_err(|e| segment::io_err("clear a failed write", e))?;
            self.dirty = self.end;
        }
        let mut next = Writer::create(&self.dir, &self.log_id, self.next_index - 1, self.last_seq)?;
        next.segment_bytes = self.segment_bytes;
        lock(&shared.state)
            .segments
            .push((next.base, next.path.clone()));
        *self = next;
        Ok(())
    }

    /// Clear what a failed write may have left and sync: `Ok` once the log
    /// takes writes again.
    fn probe(&mut self) -> Result<()> {
        let to = self.dirty.max(self.end);
        segment::write_zeros(&self.file, self.end, to)
            .and_then(|_| self.file.sync_data())
            .map_err(|e| segment::io_err("probe the log", e))?;
        self.dirty = self.end;
        Ok(())
    }
}

/// The log's queue and its leaders. A batch is queued; whoever finds no
/// leader scheduled schedules one. The leader takes every batch queued so
/// far as one group, appends and syncs it, runs the group's callbacks, and
/// goes on until the queue is empty. Batches queued during a sync form
/// the next group.
///
/// Who leads depends on the load. On the runtime the store was opened in,
/// the first leader is a task, on the worker that queued the batch: while
/// it finds one batch at a time (a quiet hub: one request's round trip),
/// it commits in place, and the request's reply is sent from where it is
/// awaited, with no hand-off to a thread and no wake-up back (each costs
/// a context switch, on a virtual machine often an interrupt to another
/// CPU). Once it finds several batches waiting (a busy hub), it hands the
/// lead to the log's thread, which then leads until the queue is empty:
/// the workers go on parsing and building the next group instead of one
/// of them waiting for the disk, at one wake-up per group. The offline
/// tools (no runtime) always lead on the thread.
pub(super) struct Log {
    queue: Mutex<Queue>,
    /// Wakes the log's thread when it is handed the lead.
    queued: Condvar,
    /// The writer, held by the leader for a whole run of groups.
    lead: Mutex<Lead>,
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Handle>,
}

struct Queue {
    batches: VecDeque<Batch>,
    /// Who will take what is queued.
    leader: Leader,
    closed: bool,
}

/// The leader scheduled or running, if any.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Leader {
    None,
    /// A task on the runtime.
    Task,
    /// The log's thread.
    Thread,
}

/// What a leader takes next.
enum Next {
    Group(Vec<Batch>),
    /// Several batches wait: the lead goes to the log's thread.
    Busy,
    /// Nothing is queued: no leader is scheduled any more.
    Empty,
}

/// A leader that panicked (a bug in a callback: the group it held is lost,
/// its waiters see the store shut) hands what is still queued to the
/// log's thread, or leaves no leader scheduled, so the next change is
/// committed instead of waiting forever for a leader that is gone.
struct Stopped<'a>(&'a Log);

impl Drop for Stopped<'_> {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let mut q = lock(&self.0.queue);
        q.leader = if q.batches.is_empty() {
            Leader::None
        } else {
            Leader::Thread
        };
        drop(q);
        self.0.queued.notify_one();
    }
}

struct Lead {
    w: Writer,
    /// Batches of this epoch or older fail unwritten (the failure rule of
    /// `store`), with the error that poisoned it.
    poisoned: Poison,
}

impl Log {
    /// The log for `w` and its thread.
    pub(super) fn start(
        w: Writer,
        shared: Arc<Shared>,
    ) -> Result<(Arc<Log>, std::thread::JoinHandle<()>)> {
        let log = Arc::new(Log {
            queue: Mutex::new(Queue {
                batches: VecDeque::new(),
                leader: Leader::None,
                closed: false,
            }),
            queued: Condvar::new(),
            lead: Mutex::new(Lead {
                w,
                poisoned: Poison::default(),
            }),
            shared,
            runtime: tokio::runtime::Handle::try_current().ok(),
        });
        let thread = {
            let log = log.clone();
            std::thread::Builder::new()
                .name("agenthub-log".into())
                .spawn(move || log.thread())
                .map_err(|e| Error::storage(e.to_string()))?
        };
        Ok((log, thread))
    }

    /// Queue a batch; it commits after every batch queued before it.
    pub(super) fn submit(self: &Arc<Self>, batch: Batch) {
        let mut q = lock(&self.queue);
        if q.leader != Leader::None {
            // The batch waits for the group being appended: encode its
            // events meanwhile, on the thread that built them (their
            // payloads are in its cache, and their sources are freed where
            // they were allocated), not on the one that appends the next
            // group. A batch that starts a group is encoded by its leader.
            drop(q);
            for ev in &batch.events {
                ev.proto();
            }
            q = lock(&self.queue);
        }
        if q.closed {
            drop(q);
            batch.complete(&Err(Error::ShuttingDown));
            return;
        }
        q.batches.push_back(batch);
        if q.leader != Leader::None {
            return;
        }
        match &self.runtime {
            Some(rt) => {
                q.leader = Leader::Task;
                drop(q);
                let log = self.clone();
                drop(rt.spawn(async move { log.lead(false) }));
            }
            None => {
                q.leader = Leader::Thread;
                drop(q);
                self.queued.notify_one();
            }
        }
    }

    /// Commit groups until the queue is empty, or (`!on_thread`) until
    /// several batches wait: then the log's thread is handed the lead.
    fn lead(&self, on_thread: bool) {
        let _stopped = Stopped(self);
        let mut lead = lock(&self.lead);
        loop {
            match self.next(on_thread) {
                Next::Group(group) => lead.commit_group(group, &self.shared),
                Next::Busy => {
                    drop(lead);
                    self.queued.notify_one();
                    return;
                }
                Next::Empty => return,
            }
        }
    }

    /// The batches queued so far, up to a group's bounds.
    fn next(&self, on_thread: bool) -> Next {
        let mut q = lock(&self.queue);
        if q.batches.is_empty() {
            q.leader = Leader::None;
            return Next::Empty;
        }
        if !on_thread && q.batches.len() > 1 {
            q.leader = Leader::Thread;
            return Next::Busy;
        }
        let mut group = Vec::with_capacity(q.batches.len().min(MAX_GROUP));
        let mut bytes = 0;
        while group.len() < MAX_GROUP && (group.is_empty() || bytes < MAX_GROUP_BYTES) {
            let Some(b) = q.batches.pop_front() else {
                break;
            };
            bytes += segment::batch_bytes(&b);
            group.push(b);
        }
        Next::Group(group)
    }

    /// The log's thread: leads when handed the lead, until closed.
    fn thread(&self) {
        loop {
            {
                let mut q = lock(&self.queue);
                while q.leader != Leader::Thread && !q.closed {
                    q = self.queued.wait(q).unwrap_or_else(|e| e.into_inner());
                }
                if q.leader != Leader::Thread {
                    return; // Closed, and nothing handed to it.
                }
            }
            // A leader that panics (a callback's bug) is replaced, not
            // waited for: see `Stopped`.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.lead(true)));
        }
    }

    /// Make sure the log takes writes again (see [`crate::store::Store::probe`]).
    pub(super) fn probe(&self) -> Result<()> {
        if lock(&self.queue).closed {
            return Err(Error::ShuttingDown);
        }
        if let Some(Err(e)) = self.shared.faults.as_deref().map(Faults::before_probe) {
            return Err(e);
        }
        lock(&self.lead).w.probe()
    }

    /// Take no more batches, commit every queued one, and tell the applier
    /// the writer has stopped.
    pub(super) fn close(&self) {
        lock(&self.queue).closed = true;
        self.queued.notify_all();
        // A leader scheduled on a runtime that no longer runs it leaves
        // its batches here: they commit now.
        self.lead(true);
        lock(&self.shared.state).closing = true;
        self.shared.durable_cv.notify_all();
    }
}

impl Lead {
    /// Commit one group and run its callbacks, in order.
    fn commit_group(&mut self, group: Vec<Batch>, shared: &Shared) {
        let w = &mut self.w;
        let (stale, live) = self.poisoned.split(&group);
        let writes = live.iter().any(|b| b.has_writes());
        let started = Instant::now();
        let before = w.next_index;
        let result = if writes {
            commit(w, &live, shared)
        } else {
            Ok(())
        };
        let (live_count, live_epoch) = (live.len(), live.iter().map(|b| b.epoch).max());
        drop(live);
        let mut group = group;
        match &result {
            Ok(()) if writes => {
                shared.durable_seq.store(w.last_seq, Ordering::Release);
                // What the record holds, for the applier: the callbacks
                // need neither the events nor the rows.
                let fresh = (w.next_index > before).then(|| {
                    let live = group.iter_mut().zip(&stale).filter(|(_, s)| !**s);
                    Fresh::take(before, (w.base, w.end), live.map(|(b, _)| b))
                });
                let mut st = lock(&shared.state);
                st.durable_index = w.next_index - 1;
                if let Some(fresh) = fresh {
                    st.fresh.push(fresh);
                }
                // Wake the applier only when it waits for any record or
                // enough have gathered (it also wakes by itself).
                let wake = st.applier_idle || st.durable_index - st.applied == APPLY_RECORDS;
                drop(st);
                if wake {
                    shared.durable_cv.notify_all();
                }
            }
            Ok(()) => {}
            Err(e) => {
                tracing::error!(error = %e, "append to the log failed; queued changes of this epoch are dropped");
                self.poisoned.record(live_epoch.unwrap_or(0), e.clone());
            }
        }
        if writes {
            lock(&shared.commits).record(started.elapsed(), live_count, result.is_ok());
        }
        let poison = self.poisoned.outcome();
        for (batch, stale) in group.into_iter().zip(stale) {
            batch.complete(if stale { &poison } else { &result });
        }
    }
}

/// Append the live batches of a group as one record. The log takes events
/// only in order: the first must follow the last durable one and each the
/// one before (a writer that is behind, or that skipped, conflicts instead
/// of leaving a hole).
fn commit(w: &mut Writer, live: &[&Batch], shared: &Shared) -> Result<()> {
    if let Some(f) = &shared.faults {
        f.before_commit()?;
    }
    let mut prev = w.last_seq;
    for ev in live.iter().flat_map(|b| &b.events) {
        if ev.seq != prev + 1 {
            return Err(Error::Storage {
                fault: StorageFault::Conflict,
                detail: format!("event seq {} where the log expects {}", ev.seq, prev + 1),
            });
        }
        prev = ev.seq;
    }
    if shared.faults.as_deref().is_some_and(Faults::discards) {
        w.last_seq = prev;
        return Ok(());
    }
    let mut record = entry::encode_after(live.iter().copied(), RECORD_HEAD);
    w.append(&mut record, prev, shared)
}
