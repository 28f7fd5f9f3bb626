//! `agenthub check` and `agenthub backup` on a data directory: they read
//! the log's files directly and may run while the hub does.

use std::path::Path;

use bytes::Bytes;

use super::segment::{self, Parsed, Tail, HEADER_LEN, RECORD_HEAD};
use super::{log_dir, scan_log};
use crate::error::{Error, Result};
use crate::store::sqlite::SqliteStore;
use crate::store::{entry, Batch, Store};

/// What `check` found.
#[derive(Debug, Default)]
pub struct Report {
    /// Damage: the hub would refuse to start, or data is inconsistent.
    pub problems: Vec<String>,
    /// Worth knowing, not damage (a torn last record the next start drops).
    pub notes: Vec<String>,
}

/// Check the log (every record's checksum, indexes that follow on, how it
/// ends), the copy (SQLite's integrity check, seq continuity, live tasks'
/// events) and that the log continues the copy.
pub fn check(data_dir: &Path) -> Result<Report> {
    let mut report = Report::default();
    let ldir = log_dir(data_dir);
    let list = segment::list(&ldir)?;
    let mut last_index = None;
    let mut first_base = None;
    let mut first_seq = None;
    let n = list.len();
    for (i, (base, path)) in list.iter().enumerate() {
        let s = match segment::scan(path) {
            Ok(s) => s,
            Err(e) => {
                report.problems.push(e.to_string());
                continue;
            }
        };
        first_base.get_or_insert(*base);
        first_seq.get_or_insert(s.header.base_seq);
        if let Some(prev) = last_index {
            if prev != s.header.base {
                report.problems.push(format!(
                    "log segment {} starts after record {} but the segment before ends at record {prev}",
                    path.display(),
                    s.header.base
                ));
            }
        }
        match &s.tail {
            Tail::Clean => {}
            Tail::Torn { at, why } if i + 1 == n => report.notes.push(format!(
                "the log's last record, in {} at offset {at}, is cut short ({why}): it was never \
                 acknowledged; the next start drops it",
                path.display()
            )),
            Tail::Torn { at, why } | Tail::Corrupt { at, why } => report.problems.push(format!(
                "log damaged: {} at offset {at}: {why}",
                path.display()
            )),
        }
        last_index = Some(s.last_index);
    }
    let db = data_dir.join("agenthub.db");
    if !db.exists() {
        if first_base.is_some_and(|b| b > 0) || first_seq.is_some_and(|s| s > 0) {
            report.problems.push(format!(
                "{} is missing and the log starts after record {} (event seq {}): it cannot be \
                 rebuilt",
                db.display(),
                first_base.unwrap_or(0),
                first_seq.unwrap_or(0)
            ));
        } else {
            report.notes.push(format!(
                "{} is missing: the next start rebuilds it from the log",
                db.display()
            ));
        }
        return Ok(report);
    }
    let copy = SqliteStore::open(data_dir, None, false)?;
    report.problems.extend(copy.check()?);
    let position = copy.log_position()?;
    if let Some(base) = first_base {
        if base > position {
            report.problems.push(format!(
                "the log starts after record {base} but the copy holds records up to {position} only"
            ));
        }
    }
    if let Some(last) = last_index {
        if last > position {
            report.notes.push(format!(
                "{} log records are not in the copy yet (the next start applies them)",
                last - position
            ));
        }
    }
    Ok(report)
}

/// Write a self-contained copy of the store to the new file `to`: SQLite's
/// online backup of the copy, then every log record past it applied. The
/// result is an `agenthub.db` to start a hub from (alone in a new data
/// directory). Returns the number of log records applied.
pub fn backup(data_dir: &Path, to: &Path) -> Result<u64> {
    let name = to
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::InvalidArgument(format!("{} is not a file name", to.display())))?;
    let work = to
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .join(format!(".{name}.partial"));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)
        .map_err(|e| segment::io_err(&format!("create {}", work.display()), e))?;
    let result = backup_into(data_dir, &work);
    let out = result.and_then(|n| {
        std::fs::rename(work.join("agenthub.db"), to)
            .map_err(|e| segment::io_err(&format!("write {}", to.display()), e))?;
        Ok(n)
    });
    let _ = std::fs::remove_dir_all(&work);
    out
}

fn backup_into(data_dir: &Path, work: &Path) -> Result<u64> {
    // The hub removes a segment once its copy holds it: should that happen
    // between the two steps, take the copy again.
    for attempt in 0..5 {
        let _ = std::fs::remove_file(work.join("agenthub.db"));
        SqliteStore::open(data_dir, None, false)?.backup_to(&work.join("agenthub.db"))?;
        let copy = SqliteStore::open_copy(work, None, None)?;
        let position = copy.log_position()?;
        let records = match records_after(&log_dir(data_dir), position) {
            Ok(Some(r)) => r,
            Ok(None) => {
                copy.close();
                continue;
            }
            Err(_) if attempt < 4 => {
                copy.close();
                continue;
            }
            Err(e) => return Err(e),
        };
        let n = records.len() as u64;
        let mut batch = Batch {
            epoch: 1,
            ..Batch::default()
        };
        for (index, bytes) in &records {
            let (events, rows) = entry::decode(&index.to_string(), bytes)?;
            batch.events.extend(events);
            batch.tasks.extend(rows);
            batch.position = Some(*index);
        }
        let (tx, rx) = std::sync::mpsc::channel();
        batch.then(move |r| {
            let _ = tx.send(r.clone());
        });
        copy.submit(batch);
        rx.recv().map_err(|_| Error::ShuttingDown)??;
        copy.checkpoint()?;
        copy.close();
        drop(copy);
        return Ok(n);
    }
    Err(Error::storage(
        "the log moved on faster than the backup could follow; try again",
    ))
}

/// Every sound record with an index past `after`, in order; `None` when
/// the log no longer holds the record right after `after`.
fn records_after(ldir: &Path, after: u64) -> Result<Option<Vec<(u64, Bytes)>>> {
    // A live log's last record may be mid-write: it reads as torn, and
    // what is whole before it is read.
    let scans = scan_log(ldir)?;
    let Some(first) = scans.first() else {
        return Ok(Some(Vec::new()));
    };
    if first.header.base > after {
        return Ok(None);
    }
    let mut out = Vec::new();
    for s in scans.iter().filter(|s| s.last_index > after) {
        let bytes = Bytes::from(
            std::fs::read(&s.path)
                .map_err(|e| segment::io_err(&format!("read {}", s.path.display()), e))?,
        );
        let mut at = HEADER_LEN as usize;
        while at < s.end as usize {
            let Parsed::Record(h) = segment::parse(&bytes[at..]) else {
                break;
            };
            if h.index > after && h.index <= s.last_index {
                out.push((
                    h.index,
                    bytes.slice(at + RECORD_HEAD..at + RECORD_HEAD + h.len),
                ));
            }
            at += RECORD_HEAD + h.len;
        }
    }
    Ok(Some(out))
}
