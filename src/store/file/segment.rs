//! The log's files: segments of checksummed records.
//!
//! A segment is `<log dir>/<base, 20 digits>.seg`, where `base` is the index
//! of the record before its first. It starts with a 64-byte header:
//!
//! | bytes | field |
//! |---|---|
//! | 0..8 | magic `AHLOG\0\0\x01` |
//! | 8..16 | base index, little-endian |
//! | 16..24 | the highest event seq before its first record |
//! | 24..25 | length of the log id |
//! | 25..57 | the log id (SPEC §8 `log_id`), zero-padded |
//! | 60..64 | CRC-32 of bytes 0..60 |
//!
//! Records follow back to back, each a 28-byte head and an [entry](super::super::entry):
//!
//! | bytes | field |
//! |---|---|
//! | 0..4 | magic `AHR1` |
//! | 4..8 | entry length |
//! | 8..12 | CRC-32 of bytes 12..28 and the entry |
//! | 12..20 | index (1, 2, 3, … across segments) |
//! | 20..28 | the highest event seq once this record is applied |
//!
//! The rest of a segment is zeros: the writer extends a file by writing
//! zeros ahead of its records (so a sync flushes data only, not the
//! allocation of new blocks), and a scan ends at the first all-zero head.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result, StorageFault};
use crate::model::Seq;

pub const HEADER_LEN: u64 = 64;
pub const RECORD_HEAD: usize = 28;
const SEGMENT_MAGIC: &[u8; 8] = b"AHLOG\0\0\x01";
const RECORD_MAGIC: &[u8; 4] = b"AHR1";
/// Longest log id a header holds.
const MAX_LOG_ID: usize = 32;
/// Largest entry a record may declare (a sanity bound for scans).
pub const MAX_ENTRY: usize = 1 << 30;

/// A segment's header.
#[derive(Clone, Debug, PartialEq)]
pub struct Header {
    pub base: u64,
    /// The highest event seq before the segment's first record (a log
    /// started on an existing copy starts above 0).
    pub base_seq: Seq,
    pub log_id: String,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN as usize] {
        let mut h = [0u8; HEADER_LEN as usize];
        h[0..8].copy_from_slice(SEGMENT_MAGIC);
        h[8..16].copy_from_slice(&self.base.to_le_bytes());
        h[16..24].copy_from_slice(&self.base_seq.to_le_bytes());
        let id = self.log_id.as_bytes();
        let n = id.len().min(MAX_LOG_ID);
        h[24] = n as u8;
        h[25..25 + n].copy_from_slice(&id[..n]);
        let crc = crc32fast::hash(&h[0..60]);
        h[60..64].copy_from_slice(&crc.to_le_bytes());
        h
    }

    pub fn decode(h: &[u8]) -> std::result::Result<Header, String> {
        if h.len() < HEADER_LEN as usize {
            return Err("shorter than a segment header".into());
        }
        if &h[0..8] != SEGMENT_MAGIC {
            return Err("not a segment of this log format".into());
        }
        let crc = u32::from_le_bytes(h[60..64].try_into().expect("4"));
        if crc != crc32fast::hash(&h[0..60]) {
            return Err("segment header checksum mismatch".into());
        }
        let n = (h[24] as usize).min(MAX_LOG_ID);
        Ok(Header {
            base: u64::from_le_bytes(h[8..16].try_into().expect("8")),
            base_seq: u64::from_le_bytes(h[16..24].try_into().expect("8")),
            log_id: String::from_utf8_lossy(&h[25..25 + n]).into_owned(),
        })
    }
}

/// A record's head.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RecordHead {
    pub len: usize,
    pub index: u64,
    pub last_seq: Seq,
}

/// About how many bytes a batch adds to a record (the writer bounds its
/// groups with it, the applier the records it keeps in memory).
pub fn batch_bytes(b: &crate::store::Batch) -> usize {
    b.events.iter().map(|e| e.proto().len() + 64).sum::<usize>() + b.tasks.len() * 512
}

/// The bytes of one record.
pub fn encode_record(index: u64, last_seq: Seq, entry: &[u8]) -> Vec<u8> {
    let mut buf = vec![0; RECORD_HEAD + entry.len()];
    buf[RECORD_HEAD..].copy_from_slice(entry);
    seal_record(&mut buf, index, last_seq);
    buf
}

/// Make `buf` a record: its entry is `buf[RECORD_HEAD..]`, and its first
/// [`RECORD_HEAD`] bytes get the record's head (so an entry encoded after
/// that much room is written without a copy).
pub fn seal_record(buf: &mut [u8], index: u64, last_seq: Seq) {
    let len = (buf.len() - RECORD_HEAD) as u32;
    buf[..4].copy_from_slice(RECORD_MAGIC);
    buf[4..8].copy_from_slice(&len.to_le_bytes());
    buf[12..20].copy_from_slice(&index.to_le_bytes());
    buf[20..28].copy_from_slice(&last_seq.to_le_bytes());
    let crc = crc32fast::hash(&buf[12..]);
    buf[8..12].copy_from_slice(&crc.to_le_bytes());
}

/// What the bytes at one offset hold.
#[derive(Debug, PartialEq)]
pub enum Parsed {
    /// A whole, sound record.
    Record(RecordHead),
    /// Zeros: the end of the records.
    End,
    /// The record runs past the bytes given: `n` bytes in all are needed.
    Short(usize),
    /// Not a sound record.
    Bad(String),
}

/// Parse the record at the start of `buf`.
pub fn parse(buf: &[u8]) -> Parsed {
    if buf.len() < RECORD_HEAD {
        if buf.iter().all(|b| *b == 0) && !buf.is_empty() {
            return Parsed::End;
        }
        return Parsed::Short(RECORD_HEAD);
    }
    if buf[..RECORD_HEAD].iter().all(|b| *b == 0) {
        return Parsed::End;
    }
    if &buf[0..4] != RECORD_MAGIC {
        return Parsed::Bad("no record starts here".into());
    }
    let len = u32::from_le_bytes(buf[4..8].try_into().expect("4")) as usize;
    if len > MAX_ENTRY {
        return Parsed::Bad(format!("record length {len} is out of range"));
    }
    if buf.len() < RECORD_HEAD + len {
        return Parsed::Short(RECORD_HEAD + len);
    }
    let crc = u32::from_le_bytes(buf[8..12].try_into().expect("4"));
    if crc != crc32fast::hash(&buf[12..RECORD_HEAD + len]) {
        return Parsed::Bad("record checksum mismatch".into());
    }
    Parsed::Record(RecordHead {
        len,
        index: u64::from_le_bytes(buf[12..20].try_into().expect("8")),
        last_seq: u64::from_le_bytes(buf[20..28].try_into().expect("8")),
    })
}

/// The file name of the segment after record `base`.
pub fn file_name(base: u64) -> String {
    format!("{base:020}.seg")
}

/// The segments in `dir`, by base: `(base, path)`.
pub fn list(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io_err(&format!("read {}", dir.display()), e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| io_err("read the log directory", e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(stem) = name.strip_suffix(".seg") else {
            continue;
        };
        if let Ok(base) = stem.parse::<u64>() {
            out.push((base, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// How a segment's records end.
#[derive(Clone, Debug, PartialEq)]
pub enum Tail {
    /// At zeros or the end of the file.
    Clean,
    /// A record at `at` that is not whole and that nothing sound follows:
    /// the last write, cut short (never acknowledged: its sync did not
    /// return).
    Torn { at: u64, why: String },
    /// A damaged record at `at` with sound records after it: the log is
    /// damaged, not cut short.
    Corrupt { at: u64, why: String },
}

/// One segment read from start to end.
#[derive(Clone, Debug)]
pub struct Scan {
    pub path: PathBuf,
    pub header: Header,
    /// Offset right after the last sound record.
    pub end: u64,
    /// Index and last event seq of the last sound record (the header's base
    /// and `None` without records).
    pub last_index: u64,
    pub last_seq: Option<Seq>,
    pub records: u64,
    pub tail: Tail,
    pub file_len: u64,
}

/// Read a whole segment, checking every record and that indexes follow on.
pub fn scan(path: &Path) -> Result<Scan> {
    let bytes = std::fs::read(path).map_err(|e| io_err(&format!("read {}", path.display()), e))?;
    let header = Header::decode(&bytes).map_err(|why| corrupt(path, 0, &why))?;
    let mut at = HEADER_LEN as usize;
    let mut expected = header.base + 1;
    let mut last_seq = None;
    let mut records = 0;
    let tail = loop {
        if at >= bytes.len() {
            break Tail::Clean;
        }
        match parse(&bytes[at..]) {
            Parsed::End => break Tail::Clean,
            Parsed::Record(h) if h.index == expected => {
                expected += 1;
                last_seq = Some(h.last_seq);
                records += 1;
                at += RECORD_HEAD + h.len;
            }
            Parsed::Record(h) => {
                break Tail::Corrupt {
                    at: at as u64,
                    why: format!("record {} where the log expects {expected}", h.index),
                }
            }
            Parsed::Short(_) | Parsed::Bad(_) => {
                let why = match parse(&bytes[at..]) {
                    Parsed::Bad(why) => why,
                    _ => "record cut short".into(),
                };
                break match sound_record_after(&bytes, at + 1, expected) {
                    Some(next) => Tail::Corrupt {
                        at: at as u64,
                        why: format!("{why}; a sound record follows at offset {next}"),
                    },
                    None => Tail::Torn { at: at as u64, why },
                };
            }
        }
    };
    Ok(Scan {
        path: path.to_path_buf(),
        end: at as u64,
        last_index: expected - 1,
        last_seq,
        records,
        header,
        tail,
        file_len: bytes.len() as u64,
    })
}

/// The offset of a sound record at or after `from` whose index is at least
/// `min_index`, if any.
fn sound_record_after(bytes: &[u8], from: usize, min_index: u64) -> Option<usize> {
    let mut at = from;
    while at + RECORD_HEAD <= bytes.len() {
        let pos = bytes[at..]
            .windows(RECORD_MAGIC.len())
            .position(|w| w == RECORD_MAGIC)?;
        let start = at + pos;
        if let Parsed::Record(h) = parse(&bytes[start..]) {
            if h.index >= min_index {
                return Some(start);
            }
        }
        at = start + 1;
    }
    None
}

/// Zero `file` from `from` to where its non-zero bytes end, then sync.
pub fn zero_from(file: &File, from: u64) -> std::io::Result<()> {
    let len = file.metadata()?.len();
    let mut at = from;
    let chunk = vec![0u8; 1 << 20];
    let mut buf = vec![0u8; 1 << 20];
    while at < len {
        let n = ((len - at) as usize).min(chunk.len());
        file.read_exact_at(&mut buf[..n], at)?;
        if buf[..n].iter().any(|b| *b != 0) {
            file.write_all_at(&chunk[..n], at)?;
        }
        at += n as u64;
    }
    file.sync_data()
}

/// Create a segment: its header, zeros up to `prealloc` bytes, synced, and
/// the directory synced so the file's name is durable too.
pub fn create(dir: &Path, header: &Header, prealloc: u64) -> std::io::Result<(File, PathBuf)> {
    let path = dir.join(file_name(header.base));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)?;
    file.write_all_at(&header.encode(), 0)?;
    write_zeros(&file, HEADER_LEN, prealloc.max(HEADER_LEN))?;
    file.sync_all()?;
    sync_dir(dir)?;
    Ok((file, path))
}

/// Write zeros over `[from, to)`.
pub fn write_zeros(file: &File, from: u64, to: u64) -> std::io::Result<()> {
    let chunk = vec![0u8; (1 << 20).min((to - from.min(to)) as usize).max(1)];
    let mut at = from;
    while at < to {
        let n = ((to - at) as usize).min(chunk.len());
        file.write_all_at(&chunk[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// A storage error for an I/O failure, classified (a full disk, a read-only
/// file system, anything else).
pub fn io_err(what: &str, e: std::io::Error) -> Error {
    let fault = match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => StorageFault::Full,
        Some(libc::EROFS) | Some(libc::EACCES) | Some(libc::EPERM) => StorageFault::ReadOnly,
        _ => StorageFault::Io,
    };
    Error::Storage {
        fault,
        detail: format!("{what}: {e}"),
    }
}

/// A damaged log: the start refuses it, naming where.
pub fn corrupt(path: &Path, at: u64, why: &str) -> Error {
    Error::Storage {
        fault: StorageFault::Corrupt,
        detail: format!("log damaged: {} at offset {at}: {why}", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(dir: &Path, records: &[(u64, &[u8])]) -> PathBuf {
        let header = Header {
            base: records.first().map_or(0, |r| r.0 - 1),
            base_seq: 0,
            log_id: "log-test".into(),
        };
        let (file, path) = create(dir, &header, 4096).unwrap();
        let mut at = HEADER_LEN;
        for (i, entry) in records {
            let rec = encode_record(*i, *i * 10, entry);
            file.write_all_at(&rec, at).unwrap();
            at += rec.len() as u64;
        }
        path
    }

    #[test]
    fn a_clean_segment_scans_to_its_last_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = segment(dir.path(), &[(1, b"one"), (2, b"two"), (3, b"three")]);
        let s = scan(&path).unwrap();
        assert_eq!(s.tail, Tail::Clean);
        assert_eq!((s.last_index, s.last_seq, s.records), (3, Some(30), 3));
        assert_eq!(s.header.log_id, "log-test");
    }

    #[test]
    fn a_cut_last_record_is_torn_and_a_damaged_middle_one_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = segment(dir.path(), &[(1, b"one"), (2, b"two"), (3, b"three")]);
        let third = HEADER_LEN + 2 * RECORD_HEAD as u64 + 6;
        // Cut the last record: its end is zeros.
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0; 3], third + RECORD_HEAD as u64 + 2)
            .unwrap();
        let s = scan(&path).unwrap();
        assert!(
            matches!(s.tail, Tail::Torn { at, .. } if at == third),
            "{:?}",
            s.tail
        );
        assert_eq!(s.last_index, 2);
        // A bit flipped in the first record, sound ones after it.
        let path = segment(
            &dir.path().join("b").tap_mkdir(),
            &[(1, b"one"), (2, b"two")],
        );
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(b"O", HEADER_LEN + RECORD_HEAD as u64)
            .unwrap();
        let s = scan(&path).unwrap();
        assert!(
            matches!(s.tail, Tail::Corrupt { at, .. } if at == HEADER_LEN),
            "{:?}",
            s.tail
        );
        assert_eq!(s.last_index, 0);
    }

    trait TapMkdir {
        fn tap_mkdir(self) -> PathBuf;
    }
    impl TapMkdir for PathBuf {
        fn tap_mkdir(self) -> PathBuf {
            std::fs::create_dir_all(&self).unwrap();
            self
        }
    }
}
