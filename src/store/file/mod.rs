//! The single node's store: an append-only log file is the record, and a
//! SQLite copy applied from it serves every read.
//!
//! **Writes.** A leader ([`writer::Log`]: the worker that queued a lone
//! batch, or the log's thread once several wait) takes every batch queued
//! while the last append was in flight (group commit), encodes them as
//! one [entry](super::entry), appends it as one record to the current
//! [segment](segment), syncs the file once (`fdatasync`: the blocks were
//! written with zeros ahead of time, so the sync flushes data, not file
//! metadata), and runs the batches' callbacks on its thread. Nothing else
//! is on the acknowledgement path.
//!
//! **The copy.** An applier thread reads durable records back from the log
//! and applies many at once to `agenthub.db` (the cluster's followers use
//! the same [`SqliteStore`] copy, applied from JetStream), recording the
//! last record index it holds. Its commits are not synced: on start the
//! copy is opened and the log replayed past that index. A read waits until
//! the copy holds every record that was durable when the read began, so it
//! never misses an acknowledged change.
//!
//! **Segments.** A segment grows to [`writer::SEGMENT_BYTES`], then the writer
//! starts the next. One whose records the copy holds is removed after a
//! checkpoint has made the copy durable (watch resumption and history are
//! served by the copy, so the log keeps nothing else).
//!
//! **Recovery.** A record that is cut short at the end of the log (a crash
//! during its write: it was never acknowledged) is zeroed and the log goes
//! on from the record before. A damaged record anywhere else stops the
//! start with the segment and offset; `agenthub check` names it too.

mod applier;
pub mod offline;
mod overlay;
pub mod segment;
mod writer;

pub use offline::{backup, check, Report};

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::sqlite::SqliteStore;
use super::{Batch, CommitStats, Faults, ListFilter, Loaded, Purged, Store, TaskListing};
use crate::error::{Error, Result, StorageFault};
use crate::event::EncodedEvent;
use crate::model::{Seq, Task, TokenRecord};
use applier::applier_loop;
use segment::Tail;
use writer::{Log, Writer};

/// How long a read waits for the copy to reach the log before it fails.
const READ_WAIT: Duration = Duration::from_secs(10);

/// Log directory inside the data directory.
pub fn log_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("log")
}

/// What the writer, the applier and readers share.
pub(super) struct Shared {
    pub(super) state: Mutex<State>,
    /// Signalled when `durable_index` or `applied` move, or on close.
    pub(super) applied_cv: Condvar,
    /// Signalled for the applier: records to apply, a reader waiting, close.
    pub(super) durable_cv: Condvar,
    /// Highest event seq durable in the log.
    pub(super) durable_seq: AtomicU64,
    pub(super) commits: Mutex<CommitStats>,
    pub(super) faults: Option<Arc<Faults>>,
    pub(super) log_id: String,
    pub(super) dir: PathBuf,
    /// Task ids that may be stored (see [`crate::store::ids`]).
    pub(super) ids: crate::store::ids::Ids,
}

pub(super) struct State {
    /// Index of the last durable record.
    pub(super) durable_index: u64,
    /// Index of the last record the copy holds.
    pub(super) applied: u64,
    /// The segments, by base: `(base, path)`.
    pub(super) segments: Vec<(u64, PathBuf)>,
    /// Why the copy could not apply lately (cleared when it does).
    pub(super) copy_error: Option<Error>,
    /// Applies of the copy that failed since the store opened.
    pub(super) copy_failures: u64,
    /// The writer has stopped: the applier finishes and stops too.
    pub(super) closing: bool,
    /// Reads waiting for the copy (it applies at once while there are).
    pub(super) readers: usize,
    /// The applier waits for a record to be durable.
    pub(super) applier_idle: bool,
    /// Durable records the copy does not hold yet, as the writer had them
    /// in memory: the applier takes them from here instead of reading the
    /// log back and decoding it (a record not here is read from the log).
    fresh: applier::FreshRecords,
}

/// The embedded store: log file plus SQLite copy.
pub struct FileStore {
    copy: Arc<SqliteStore>,
    shared: Arc<Shared>,
    log: Arc<Log>,
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
        Self::open_with_segments(dir, retention, faults, writer::SEGMENT_BYTES)
    }

    /// [`FileStore::open_with_faults`] with segments closed at
    /// `segment_bytes` instead of [`SEGMENT_BYTES`] (tests of rolling).
    #[doc(hidden)]
    pub fn open_with_segments(
        dir: &Path,
        retention: Option<u64>,
        faults: Option<Arc<Faults>>,
        segment_bytes: u64,
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
            if !db.exists() && (first.header.base > 0 || first.header.base_seq > 0) {
                return Err(Error::Storage {
                    fault: StorageFault::Corrupt,
                    detail: format!(
                        "{} is missing and the log starts after record {} (event seq {}): the \
                         copy cannot be rebuilt; restore agenthub.db from a backup",
                        db.display(),
                        first.header.base,
                        first.header.base_seq
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
        let mut writer = match scans.last() {
            Some(s) => Writer::resume(&ldir, &log_id, s, last_seq)?,
            None => Writer::create(&ldir, &log_id, position, last_seq)?,
        };
        writer.segment_bytes = segment_bytes;
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
                copy_failures: 0,
                closing: false,
                readers: 0,
                applier_idle: false,
                fresh: Default::default(),
            }),
            applied_cv: Condvar::new(),
            durable_cv: Condvar::new(),
            durable_seq: AtomicU64::new(last_seq),
            commits: Mutex::new(CommitStats::default()),
            faults,
            log_id,
            dir: ldir.clone(),
            ids: Default::default(),
        });
        let (log, log_thread) = Log::start(writer, shared.clone())?;
        let mut threads = vec![log_thread];
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
            log,
            threads: Mutex::new(threads),
        })
    }

    /// Keep at most `bytes` of durable records in memory for the applier
    /// (tests: a small bound makes it read most records back from the log).
    #[doc(hidden)]
    pub fn keep_fresh_bytes(&self, bytes: usize) {
        lock(&self.shared.state).fresh.limit = bytes;
    }

    /// Applies of the copy that failed since the store opened (each is
    /// retried from the log).
    #[doc(hidden)]
    pub fn copy_failures(&self) -> u64 {
        lock(&self.shared.state).copy_failures
    }

    /// Wait until the copy holds every record durable now.
    fn caught_up(&self) -> Result<()> {
        self.wait_for_copy(false)
    }

    /// [`FileStore::caught_up`]; with `stop_on_error`, also give up as
    /// soon as the copy fails to apply (a rebuild lays the log over it
    /// instead of waiting for its retries).
    fn wait_for_copy(&self, stop_on_error: bool) -> Result<()> {
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
            if now >= deadline || (stop_on_error && st.copy_error.is_some()) {
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

pub(super) fn open_rw(path: &Path) -> Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| segment::io_err(&format!("open {}", path.display()), e))
}

impl Store for FileStore {
    fn submit(&self, batch: Batch) {
        self.shared.ids.insert_created(&batch.tasks);
        self.log.submit(batch);
    }

    fn load(&self) -> Result<Loaded> {
        // A copy that fails to apply (a full disk stops it with the log)
        // is not waited for: the records it lacks are laid over it.
        let mut loaded = match self.wait_for_copy(true).is_err() {
            true => overlay::load(&self.shared, &self.copy)?,
            false => self.copy.load()?,
        };
        // The copy holds every record durable now: ids created from here
        // on go into the filter as they are submitted.
        self.shared
            .ids
            .fill_from(loaded.state_counts.iter().sum(), self.copy.clone());
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

    fn check_change(&self, task_id: &str) -> Result<()> {
        match &self.shared.faults {
            Some(faults) => faults.check_change(task_id),
            None => Ok(()),
        }
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
        self.log.probe()
    }

    fn event_count(&self) -> u64 {
        // Durable events the copy has not applied yet count too (seqs are
        // consecutive on one node).
        let pending = self
            .shared
            .durable_seq
            .load(Ordering::Acquire)
            .saturating_sub(self.copy.durable_seq());
        self.copy.event_count() + pending
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
        self.log.close();
        let threads: Vec<_> = lock(&self.threads).drain(..).collect();
        for t in threads {
            let _ = t.join();
        }
        self.copy.close();
    }
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;
    use crate::model::{EventKind, TaskEvent, TaskState};
    use crate::store::{entry, TaskWrite};

    /// The CREATED event of `task_id` at `seq`, with its row.
    fn created(seq: Seq, task_id: &str, description: &str) -> Batch {
        let task: Task = serde_json::from_value(serde_json::json!({
            "task_id": task_id, "agent_id": null, "metadata": {"team": "a"},
            "state": "QUEUED", "generation": 0, "attempts": 0, "max_attempts": 3,
            "priority": "HIGH", "result": null, "error": null,
            "created_at_ms": 7, "updated_at_ms": 7, "last_seq": seq, "created_seq": seq,
        }))
        .expect("task");
        let event = TaskEvent {
            seq,
            task_id: task_id.into(),
            agent_id: String::new(),
            kind: EventKind::Created,
            generation: 0,
            payload: serde_json::from_value(serde_json::json!({ "description": description }))
                .expect("payload"),
            timestamp_ms: 7,
            state: TaskState::Queued,
        };
        Batch {
            tasks: vec![TaskWrite::new(task, None)],
            events: vec![Arc::new(EncodedEvent::new(event))],
            ..Batch::default()
        }
    }

    fn commit(store: &FileStore, mut batch: Batch) {
        let (tx, rx) = std::sync::mpsc::channel();
        batch.then(move |r| {
            let _ = tx.send(r.is_ok());
        });
        store.submit(batch);
        assert!(rx.recv().expect("outcome"), "commit");
    }

    fn check(store: &FileStore, task_id: &str, description: &str) {
        let t = store.get_task(task_id).expect("read").expect(task_id);
        assert_eq!(
            (
                t.description.as_str(),
                t.state,
                t.priority,
                t.metadata.get("team")
            ),
            (
                description,
                TaskState::Queued,
                crate::model::Priority::High,
                Some(&serde_json::json!("a"))
            ),
            "{task_id}"
        );
    }

    /// A log record an earlier version wrote (its entry has a JSON head)
    /// and whose copy never applied it (the hub stopped first) is applied
    /// on the next start, and the log goes on after it.
    #[test]
    fn a_record_with_a_json_head_from_an_earlier_version_is_applied_on_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = FileStore::open(dir.path(), None).expect("open");
        commit(&store, created(1, "t-1", "written by this version"));
        store.close();
        drop(store);

        let (_, path) = segment::list(&log_dir(dir.path()))
            .expect("list")
            .last()
            .cloned()
            .expect("a segment");
        let scan = segment::scan(&path).expect("scan");
        assert_eq!(scan.last_index, 1);
        let old = entry::encode_json(&[created(2, "t-2", "written before")]);
        assert_eq!(old[4], b'{', "a JSON head");
        let record = segment::encode_record(2, 2, &old);
        let f = open_rw(&path).expect("open the segment");
        f.write_all_at(&record, scan.end).expect("append");
        f.sync_all().expect("sync");
        drop(f);

        let store = FileStore::open(dir.path(), None).expect("reopen");
        assert_eq!(store.durable_seq(), 2);
        check(&store, "t-1", "written by this version");
        check(&store, "t-2", "written before");
        commit(&store, created(3, "t-3", "after the old record"));
        store.close();
        drop(store);

        let store = FileStore::open(dir.path(), None).expect("reopen again");
        for (id, d) in [
            ("t-1", "written by this version"),
            ("t-2", "written before"),
            ("t-3", "after the old record"),
        ] {
            check(&store, id, d);
        }
        assert_eq!(store.event_count(), 3);
        store.close();
    }
}
