//! The single node's store: an append-only log file is the record, and a
//! SQLite copy applied from it serves every read.
//!
//! **Writes.** One writer thread takes every batch queued while the last
//! append was in flight (group commit), encodes them as one
//! [entry](super::entry), appends it as one record to the current
//! [segment](segment) and syncs the file once (`fdatasync`: the blocks
//! were written with zeros ahead of time, so the sync flushes data, not
//! file metadata). Then the batches' callbacks run. Nothing else is on
//! the acknowledgement path.
//!
//! **The copy.** An applier thread reads durable records back from the log
//! and applies many at once to `agenthub.db` (the cluster's followers use
//! the same [`SqliteStore`] copy, applied from JetStream), recording the
//! last record index it holds. Its commits are not synced: on start the
//! copy is opened and the log replayed past that index. A read waits until
//! the copy holds every record that was durable when the read began, so it
//! never misses an acknowledged change.
//!
//! **Segments.** A segment grows to [`SEGMENT_BYTES`], then the writer
//! starts the next. One whose records the copy holds is removed after a
//! checkpoint has made the copy durable (watch resumption and history are
//! served by the copy, so the log keeps nothing else).
//!
//! **Recovery.** A record that is cut short at the end of the log (a crash
//! during its write: it was never acknowledged) is zeroed and the log goes
//! on from the record before. A damaged record anywhere else stops the
//! start with the segment and offset; `agenthub check` names it too.

pub mod filter;
pub mod offline;
pub mod segment;

pub use offline::{backup, check, Report};

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::sqlite::SqliteStore;
use super::{entry, Batch, CommitStats, Faults, ListFilter, Loaded, Purged, Store, TaskListing};
use crate::error::{Error, Result, StorageFault};
use crate::model::{Seq, Task, TokenRecord};
use crate::pb::wire::EncodedEvent;
use segment::{Header, Parsed, Tail, HEADER_LEN, RECORD_HEAD};

/// A segment is closed once it holds this many bytes (a larger record
/// goes alone into a segment of its own).
pub const SEGMENT_BYTES: u64 = 64 << 20;
/// The first zeros written ahead in a new segment; each extension doubles
/// what the segment holds, up to [`MAX_EXTEND`] at a time.
const FIRST_EXTEND: u64 = 256 << 10;
const MAX_EXTEND: u64 = 8 << 20;
/// Most batches folded into one record.
const MAX_GROUP: usize = 4096;
/// Most bytes of records the copy applies in one transaction.
const MAX_APPLY_BYTES: usize = 8 << 20;
/// The copy applies once this many records wait, or once the oldest has
/// waited [`APPLY_DELAY`], or at once when a read waits for it: few large
/// transactions instead of one per record (a sequential workload would
/// otherwise pay a SQLite commit per acknowledgement, off its path but
/// not off the CPU).
const APPLY_RECORDS: u64 = 256;
const APPLY_DELAY: Duration = Duration::from_millis(10);
/// How long a read waits for the copy to reach the log before it fails.
const READ_WAIT: Duration = Duration::from_secs(10);
/// The longest pause between two tries of a copy that failed to apply.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Log directory inside the data directory.
pub fn log_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("log")
}

/// What the writer, the applier and readers share.
struct Shared {
    state: Mutex<State>,
    /// Signalled when `durable_index` or `applied` move, or on close.
    applied_cv: Condvar,
    /// Signalled for the applier: records to apply, a reader waiting, close.
    durable_cv: Condvar,
    /// Highest event seq durable in the log.
    durable_seq: AtomicU64,
    commits: Mutex<CommitStats>,
    faults: Option<Arc<Faults>>,
    log_id: String,
    dir: PathBuf,
    /// Task ids that may be stored (see [`filter`]).
    ids: filter::Ids,
}

struct State {
    /// Index of the last durable record.
    durable_index: u64,
    /// Index of the last record the copy holds.
    applied: u64,
    /// The segments, by base: `(base, path)`.
    segments: Vec<(u64, PathBuf)>,
    /// Why the copy could not apply lately (cleared when it does).
    copy_error: Option<Error>,
    /// The writer has stopped: the applier finishes and stops too.
    closing: bool,
    /// Reads waiting for the copy (it applies at once while there are).
    readers: usize,
    /// The applier waits for a record to be durable.
    applier_idle: bool,
}

enum Msg {
    Batch(Batch),
    /// Make sure the log takes writes again (see [`Store::probe`]).
    Probe(mpsc::Sender<Result<()>>),
}

/// The embedded store: log file plus SQLite copy.
pub struct FileStore {
    copy: Arc<SqliteStore>,
    shared: Arc<Shared>,
    tx: Mutex<Option<mpsc::Sender<Msg>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl FileStore {
    /// Open (or create) the store in `dir`: `log/` and `agenthub.db`.
    pub fn open(dir: &Path, retention: Option<u64>) -> Result<FileStore> {
        Self::open_with_faults(dir, retention, None)
    }

    /// [`FileStore::open`] with fault injection on the log's appends (tests,
    /// fault drills, the `hub-bound` benchmark).
    pub fn open_with_faults(
        dir: &Path,
        retention: Option<u64>,
        faults: Option<Arc<Faults>>,
    ) -> Result<FileStore> {
        let ldir = log_dir(dir);
        std::fs::create_dir_all(&ldir)
            .map_err(|e| segment::io_err(&format!("create {}", ldir.display()), e))?;
        let mut scans = scan_log(&ldir)?;
        // A record cut short at the very end was never acknowledged: drop it.
        if let Some(last) = scans.last_mut() {
            if let Tail::Torn { at, why } = &last.tail {
                tracing::warn!(segment = %last.path.display(), offset = at, reason = %why,
                    "the log's last record was cut short (a crash during its write); dropping it");
                let f = open_rw(&last.path)?;
                segment::zero_from(&f, *at)
                    .map_err(|e| segment::io_err("truncate the log's torn tail", e))?;
                last.tail = Tail::Clean;
            }
        }
        let db = dir.join("agenthub.db");
        if let Some(first) = scans.first() {
            if !db.exists() && first.header.base > 0 {
                return Err(Error::Storage {
                    fault: StorageFault::Corrupt,
                    detail: format!(
                        "{} is missing and the log starts after record {}: the copy cannot be \
                         rebuilt; restore agenthub.db from a backup",
                        db.display(),
                        first.header.base
                    ),
                });
            }
        }
        let log_id = scans.first().map(|s| s.header.log_id.clone());
        let copy = Arc::new(SqliteStore::open_copy(dir, log_id.as_deref(), retention)?);
        let log_id = copy.log_id();
        let position = copy.log_position()?;
        let log_last = scans.last().map(|s| s.last_index);
        match (scans.first(), log_last) {
            (Some(first), _) if first.header.base > position => {
                return Err(Error::Storage {
                    fault: StorageFault::Corrupt,
                    detail: format!(
                        "the log starts after record {} but the copy holds records up to {position} \
                         only: records are missing",
                        first.header.base
                    ),
                });
            }
            (Some(_), Some(last)) if last < position => {
                // The copy is ahead (restored from a backup, or the log's
                // tail was dropped after the copy had it): every record
                // here is in the copy; the log goes on after the copy.
                tracing::warn!(
                    log = last,
                    copy = position,
                    "the copy is ahead of the log; starting the log after the copy"
                );
                for s in scans.drain(..) {
                    let _ = std::fs::remove_file(&s.path);
                }
            }
            _ => {}
        }
        let last_seq = scans
            .iter()
            .rev()
            .find_map(|s| s.last_seq)
            .unwrap_or(0)
            .max(copy.durable_seq());
        let writer = match scans.last() {
            Some(s) => Writer::resume(&ldir, &log_id, s, last_seq)?,
            None => Writer::create(&ldir, &log_id, position, last_seq)?,
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                durable_index: writer.next_index - 1,
                applied: position,
                segments: if scans.is_empty() {
                    vec![(writer.base, writer.path.clone())]
                } else {
                    scans
                        .iter()
                        .map(|s| (s.header.base, s.path.clone()))
                        .collect()
                },
                copy_error: None,
                closing: false,
                readers: 0,
                applier_idle: false,
            }),
            applied_cv: Condvar::new(),
            durable_cv: Condvar::new(),
            durable_seq: AtomicU64::new(last_seq),
            commits: Mutex::new(CommitStats::default()),
            faults,
            log_id,
            dir: ldir.clone(),
            ids: filter::Ids::default(),
        });
        let (tx, rx) = mpsc::channel();
        let mut threads = Vec::new();
        {
            let shared = shared.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("agenthub-log".into())
                    .spawn(move || writer_loop(writer, rx, shared))
                    .map_err(|e| Error::storage(e.to_string()))?,
            );
        }
        {
            let (shared, copy) = (shared.clone(), copy.clone());
            threads.push(
                std::thread::Builder::new()
                    .name("agenthub-copy".into())
                    .spawn(move || applier_loop(shared, copy))
                    .map_err(|e| Error::storage(e.to_string()))?,
            );
        }
        Ok(FileStore {
            copy,
            shared,
            tx: Mutex::new(Some(tx)),
            threads: Mutex::new(threads),
        })
    }

    /// Wait until the copy holds every record durable now.
    fn caught_up(&self) -> Result<()> {
        let mut st = lock(&self.shared.state);
        let target = st.durable_index;
        if st.applied >= target {
            return Ok(());
        }
        st.readers += 1;
        self.shared.durable_cv.notify_all();
        let deadline = Instant::now() + READ_WAIT;
        let out = loop {
            if st.applied >= target {
                break Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                let why = st
                    .copy_error
                    .as_ref()
                    .map_or("it is slow".to_string(), |e| e.to_string());
                break Err(Error::storage(format!(
                    "the query copy holds records up to {} of {target} ({why})",
                    st.applied
                )));
            }
            st = self
                .shared
                .applied_cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        };
        st.readers -= 1;
        out
    }

    /// Load every stored task id into the id filter (sized for `stored`),
    /// off the caller's thread; once, at the first load.
    fn fill_filter(&self, stored: u64) {
        let Some(filter) = self.shared.ids.install(stored) else {
            return;
        };
        let copy = self.copy.clone();
        let _ = std::thread::Builder::new()
            .name("agenthub-ids".into())
            .spawn(move || match copy.for_each_task_id(|id| filter.insert(id)) {
                Ok(()) => filter.set_ready(),
                Err(e) => tracing::warn!(error = %e, "could not read the stored task ids; every unknown id is looked up"),
            });
    }

    /// Bytes of the log's segments.
    fn log_bytes(&self) -> u64 {
        lock(&self.shared.state)
            .segments
            .iter()
            .filter_map(|(_, p)| std::fs::metadata(p).ok().map(|m| m.len()))
            .sum()
    }
}

/// Every segment of the log, checked: each one before the last must end
/// cleanly and the next must start where it ends.
pub fn scan_log(ldir: &Path) -> Result<Vec<segment::Scan>> {
    let mut scans: Vec<segment::Scan> = Vec::new();
    let list = segment::list(ldir)?;
    let n = list.len();
    for (i, (base, path)) in list.into_iter().enumerate() {
        let s = segment::scan(&path)?;
        if s.header.base != base {
            return Err(segment::corrupt(
                &path,
                0,
                &format!("its header says base {}", s.header.base),
            ));
        }
        if let Some(prev) = scans.last() {
            if prev.last_index != base {
                return Err(segment::corrupt(
                    &path,
                    0,
                    &format!(
                        "it starts after record {base} but the segment before ends at record {}",
                        prev.last_index
                    ),
                ));
            }
            if prev.header.log_id != s.header.log_id {
                return Err(segment::corrupt(&path, 0, "it belongs to another log"));
            }
        }
        match &s.tail {
            Tail::Corrupt { at, why } => return Err(segment::corrupt(&path, *at, why)),
            Tail::Torn { at, why } if i + 1 < n => {
                return Err(segment::corrupt(&path, *at, why));
            }
            _ => {}
        }
        scans.push(s);
    }
    Ok(scans)
}

fn open_rw(path: &Path) -> Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| segment::io_err(&format!("open {}", path.display()), e))
}

/// The writer's end of the log.
struct Writer {
    dir: PathBuf,
    log_id: String,
    file: File,
    path: PathBuf,
    base: u64,
    /// Offset right after the last durable record.
    end: u64,
    /// Bytes of the file written (records or zeros).
    filled: u64,
    /// Bytes past `end` up to here may hold a write that failed: zeroed
    /// before anything else is written.
    dirty: u64,
    next_index: u64,
    /// Highest event seq durable.
    last_seq: Seq,
}

impl Writer {
    fn create(dir: &Path, log_id: &str, base: u64, last_seq: Seq) -> Result<Writer> {
        let header = Header {
            base,
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
        })
    }

    fn resume(dir: &Path, log_id: &str, s: &segment::Scan, last_seq: Seq) -> Result<Writer> {
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
        })
    }

    /// Append one record and sync it: the record is durable on `Ok`.
    fn append(&mut self, entry: &[u8], last_seq: Seq, shared: &Shared) -> Result<()> {
        let record = segment::encode_record(self.next_index, last_seq, entry);
        let len = record.len() as u64;
        if self.end > HEADER_LEN && self.end + len > SEGMENT_BYTES {
            self.roll(shared)?;
        }
        let end = self.end + len;
        let written = self.write(&record, end);
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
            segment::write_zeros(&self.file, self.filled, to)?;
            self.filled = to;
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
        let next = Writer::create(&self.dir, &self.log_id, self.next_index - 1, self.last_seq)?;
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

fn writer_loop(mut w: Writer, rx: mpsc::Receiver<Msg>, shared: Arc<Shared>) {
    // Batches of this epoch or older fail unwritten (the failure rule of
    // `store`), with the error that poisoned it.
    let mut poisoned: (u64, Option<Error>) = (0, None);
    let mut carry: Option<Msg> = None;
    loop {
        let first = match carry.take() {
            Some(m) => m,
            None => match rx.recv() {
                Ok(m) => m,
                Err(_) => break,
            },
        };
        let mut group = match first {
            Msg::Probe(reply) => {
                let r = match shared.faults.as_deref().map(Faults::before_probe) {
                    Some(Err(e)) => Err(e),
                    _ => w.probe(),
                };
                let _ = reply.send(r);
                continue;
            }
            Msg::Batch(b) => vec![b],
        };
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(Msg::Batch(b)) => group.push(b),
                Ok(m) => {
                    carry = Some(m);
                    break;
                }
                Err(_) => break,
            }
        }
        let stale: Vec<bool> = group
            .iter()
            .map(|b| poisoned.1.is_some() && b.epoch <= poisoned.0)
            .collect();
        let live: Vec<&Batch> = group
            .iter()
            .zip(&stale)
            .filter(|(_, s)| !**s)
            .map(|(b, _)| b)
            .collect();
        let writes = live.iter().any(|b| b.has_writes());
        let started = Instant::now();
        let result = if writes {
            commit(&mut w, &live, &shared)
        } else {
            Ok(())
        };
        match &result {
            Ok(()) if writes => {
                shared.durable_seq.store(w.last_seq, Ordering::Release);
                let mut st = lock(&shared.state);
                st.durable_index = w.next_index - 1;
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
                let epoch = live.iter().map(|b| b.epoch).max().unwrap_or(0);
                poisoned = (poisoned.0.max(epoch), Some(e.clone()));
            }
        }
        if writes {
            lock(&shared.commits).record(started.elapsed(), live.len(), result.is_ok());
        }
        drop(live);
        let poison = Err(poisoned.1.clone().unwrap_or(Error::ShuttingDown));
        for (batch, stale) in group.into_iter().zip(stale) {
            batch.complete(if stale { &poison } else { &result });
        }
    }
    lock(&shared.state).closing = true;
    shared.durable_cv.notify_all();
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
    let entry = entry::encode(live.iter().copied());
    w.append(&entry, prev, shared)
}

/// Reads durable records back from the log, in order.
struct Reader {
    /// The open segment: its base and file, and the offset of the next record.
    at: Option<(u64, File, u64)>,
    /// Index of the next record to read.
    next: u64,
}

impl Reader {
    /// Records from `self.next` up to `upto`, at most about `max_bytes`.
    fn read(&mut self, shared: &Shared, upto: u64, max_bytes: usize) -> Result<Vec<(u64, Bytes)>> {
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
                    self.at.insert((base, f, HEADER_LEN))
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

fn applier_loop(shared: Arc<Shared>, copy: Arc<SqliteStore>) {
    let applied = lock(&shared.state).applied;
    let mut reader = Reader {
        at: None,
        next: applied + 1,
    };
    let mut epoch: u64 = 1;
    let mut backoff = Duration::from_millis(20);
    loop {
        let upto = {
            let mut st = lock(&shared.state);
            while st.applied >= st.durable_index && !st.closing {
                st.applier_idle = true;
                st = shared.durable_cv.wait(st).unwrap_or_else(|e| e.into_inner());
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
        match apply(&shared, &copy, &mut reader, upto, epoch) {
            Ok(last) => {
                backoff = Duration::from_millis(20);
                let mut st = lock(&shared.state);
                st.applied = last;
                st.copy_error = None;
                let drop_first = st.segments.len() > 1 && st.segments[1].0 <= last;
                drop(st);
                shared.applied_cv.notify_all();
                if drop_first {
                    remove_applied_segments(&shared, &copy, last);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, retry_in = ?backoff, "applying the log to the query copy failed");
                let closing = {
                    let mut st = lock(&shared.state);
                    st.copy_error = Some(e);
                    reader = Reader {
                        at: None,
                        next: st.applied + 1,
                    };
                    st.closing
                };
                shared.applied_cv.notify_all();
                if closing && backoff >= MAX_BACKOFF {
                    tracing::error!(
                        "giving up on the query copy at shutdown; the next start replays the log"
                    );
                    break;
                }
                epoch += 1;
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// Apply records up to `upto` (at most [`MAX_APPLY_BYTES`] of them) to the
/// copy in one commit: the index of the last one applied.
fn apply(
    shared: &Shared,
    copy: &SqliteStore,
    reader: &mut Reader,
    upto: u64,
    epoch: u64,
) -> Result<u64> {
    let records = reader.read(shared, upto, MAX_APPLY_BYTES)?;
    let Some(last) = records.last().map(|r| r.0) else {
        return Err(Error::storage("no record read"));
    };
    let mut batch = Batch {
        epoch,
        position: Some(last),
        ..Batch::default()
    };
    for (index, entry) in &records {
        let (events, rows) = entry::decode(&index.to_string(), entry)?;
        batch.events.extend(events);
        batch.tasks.extend(rows);
    }
    let (done_tx, done_rx) = mpsc::channel();
    batch.then(move |r| {
        let _ = done_tx.send(r.clone());
    });
    copy.submit(batch);
    done_rx
        .recv()
        .map_err(|_| Error::storage("the query copy closed"))??;
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

impl Store for FileStore {
    fn submit(&self, batch: Batch) {
        for w in &batch.tasks {
            if w.expected_last_seq.is_none() {
                self.shared.ids.insert(&w.task.task_id);
            }
        }
        let tx = lock(&self.tx);
        let unsent = match tx.as_ref() {
            Some(tx) => tx.send(Msg::Batch(batch)).err().map(|e| e.0),
            None => Some(Msg::Batch(batch)),
        };
        if let Some(Msg::Batch(batch)) = unsent {
            batch.complete(&Err(Error::ShuttingDown));
        }
    }

    fn load(&self) -> Result<Loaded> {
        self.caught_up()?;
        let mut loaded = self.copy.load()?;
        // The copy holds every record durable now: ids created from here
        // on go into the filter as they are submitted.
        self.fill_filter(loaded.state_counts.iter().sum());
        loaded.last_seq = loaded
            .last_seq
            .max(self.shared.durable_seq.load(Ordering::Acquire));
        Ok(loaded)
    }

    fn get_task(&self, task_id: &str) -> Result<Option<Task>> {
        self.caught_up()?;
        self.copy.get_task(task_id)
    }

    fn may_hold_task(&self, task_id: &str) -> bool {
        self.shared.ids.may_contain(task_id)
    }

    fn list_tasks(&self, filter: &ListFilter) -> Result<TaskListing> {
        self.caught_up()?;
        self.copy.list_tasks(filter)
    }

    fn purge_finished(&self, cutoff_ms: i64, limit: usize) -> Result<Purged> {
        self.caught_up()?;
        self.copy.purge_finished(cutoff_ms, limit)
    }

    fn disk_bytes(&self) -> u64 {
        self.copy.disk_bytes() + self.log_bytes()
    }

    fn read_events(&self, after: Seq, limit: usize) -> Result<Vec<EncodedEvent>> {
        self.caught_up()?;
        self.copy.read_events(after, limit)
    }

    fn first_retained_seq(&self) -> Seq {
        self.copy.first_retained_seq()
    }

    fn durable_seq(&self) -> Seq {
        self.shared.durable_seq.load(Ordering::Acquire)
    }

    fn log_id(&self) -> String {
        self.shared.log_id.clone()
    }

    fn probe(&self) -> Result<()> {
        let (reply, answer) = mpsc::channel();
        match lock(&self.tx).as_ref() {
            Some(tx) => tx
                .send(Msg::Probe(reply))
                .map_err(|_| Error::ShuttingDown)?,
            None => return Err(Error::ShuttingDown),
        }
        answer.recv().map_err(|_| Error::ShuttingDown)?
    }

    fn event_count(&self) -> u64 {
        self.copy.event_count()
    }

    fn commit_stats(&self) -> CommitStats {
        lock(&self.shared.commits).clone()
    }

    fn insert_token(&self, token: &TokenRecord) -> Result<()> {
        self.copy.insert_token(token)
    }

    fn find_token(&self, hash: &str) -> Result<Option<TokenRecord>> {
        self.copy.find_token(hash)
    }

    fn list_tokens(&self) -> Result<Vec<TokenRecord>> {
        self.copy.list_tokens()
    }

    fn revoke_token(&self, id: &str) -> Result<bool> {
        self.copy.revoke_token(id)
    }

    fn close(&self) {
        drop(lock(&self.tx).take());
        let threads: Vec<_> = lock(&self.threads).drain(..).collect();
        for t in threads {
            let _ = t.join();
        }
        self.copy.close();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
