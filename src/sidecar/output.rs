//! What a command prints: its lines read as they are written (streamed to
//! the hub as `task_output`; `::progress` lines also become progress), and
//! the tail of stdout / stderr for the final report.

use std::io::SeekFrom;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

/// Longest progress line kept; longer lines are skipped.
const MAX_LINE_BYTES: usize = 64 * 1024;

/// A `::progress <number or JSON>` line's value. Anything after
/// `::progress ` that is not a number or a JSON object is sent as
/// `{"message": text}`.
pub fn parse_progress(line: &str) -> Option<Value> {
    let rest = line.strip_prefix("::progress")?;
    if !rest.starts_with([' ', '\t']) {
        return None;
    }
    let rest = rest.trim();
    if rest.is_empty() {
        return None;
    }
    Some(match serde_json::from_str::<Value>(rest) {
        Ok(v @ (Value::Number(_) | Value::Object(_))) => v,
        _ => json!({ "message": rest }),
    })
}

/// Reads new complete lines from a file another process appends to.
pub(super) struct LineTail {
    path: PathBuf,
    file: Option<tokio::fs::File>,
    /// Start at the current end (an adopted run: older lines were handled).
    from_end: bool,
    partial: Vec<u8>,
    /// The current line is over `MAX_LINE_BYTES`: drop it up to its newline.
    skipping: bool,
}

impl LineTail {
    pub(super) fn new(path: PathBuf, from_end: bool) -> LineTail {
        LineTail {
            path,
            file: None,
            from_end,
            partial: Vec::new(),
            skipping: false,
        }
    }

    /// Read what was appended since the last call; call `on_line` for
    /// every complete line (without its line ending).
    pub(super) async fn poll(&mut self, mut on_line: impl FnMut(&str)) {
        if self.file.is_none() {
            let Ok(mut f) = tokio::fs::File::open(&self.path).await else {
                return;
            };
            if self.from_end && f.seek(SeekFrom::End(0)).await.is_err() {
                return;
            }
            self.file = Some(f);
        }
        let Some(file) = self.file.as_mut() else {
            return;
        };
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match file.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            for &b in &buf[..n] {
                if b == b'\n' {
                    if !self.skipping {
                        let line = String::from_utf8_lossy(&self.partial);
                        on_line(line.trim_end_matches('\r'));
                    }
                    self.partial.clear();
                    self.skipping = false;
                } else if !self.skipping {
                    self.partial.push(b);
                    if self.partial.len() > MAX_LINE_BYTES {
                        self.partial.clear();
                        self.skipping = true;
                    }
                }
            }
        }
    }
}

/// The last `cap` bytes of a file as text, and whether it was cut.
pub(super) async fn read_tail(path: &Path, cap: usize) -> (String, bool) {
    let Ok(mut f) = tokio::fs::File::open(path).await else {
        return (String::new(), false);
    };
    let len = f.metadata().await.map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(cap as u64);
    if f.seek(SeekFrom::Start(start)).await.is_err() {
        return (String::new(), false);
    }
    let mut bytes = Vec::with_capacity(cap.min(len as usize));
    let _ = f.take(cap as u64).read_to_end(&mut bytes).await;
    let truncated = start > 0;
    // Do not start in the middle of a UTF-8 character.
    let skip = if truncated {
        bytes
            .iter()
            .take(3)
            .take_while(|b| (**b & 0xC0) == 0x80)
            .count()
    } else {
        0
    };
    (
        String::from_utf8_lossy(&bytes[skip..]).into_owned(),
        truncated,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn progress_lines() {
        assert_eq!(parse_progress("::progress 50"), Some(json!(50)));
        assert_eq!(parse_progress("::progress 0.5 "), Some(json!(0.5)));
        assert_eq!(
            parse_progress(r#"::progress {"step":"build","pct":10}"#),
            Some(json!({"step": "build", "pct": 10}))
        );
        assert_eq!(
            parse_progress("::progress halfway there"),
            Some(json!({"message": "halfway there"}))
        );
        assert_eq!(parse_progress("::progress"), None);
        assert_eq!(parse_progress("::progressive 5"), None);
        assert_eq!(parse_progress("progress 5"), None);
    }

    #[tokio::test]
    async fn tail_is_capped_and_flagged() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out");
        std::fs::write(&p, "0123456789").unwrap();
        assert_eq!(read_tail(&p, 4).await, ("6789".to_string(), true));
        assert_eq!(read_tail(&p, 100).await, ("0123456789".to_string(), false));
        assert_eq!(
            read_tail(&dir.path().join("none"), 4).await,
            (String::new(), false)
        );
    }

    #[tokio::test]
    async fn line_tail_sees_only_complete_new_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out");
        std::fs::write(&p, "::progress 1\n").unwrap();
        let mut tail = LineTail::new(p.clone(), true);
        let mut seen = Vec::new();
        tail.poll(|l| seen.extend(parse_progress(l))).await;
        assert!(seen.is_empty(), "lines before adoption are skipped");
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"hello\n::progress 2\n::progress 3").unwrap();
        tail.poll(|l| seen.extend(parse_progress(l))).await;
        assert_eq!(seen, vec![json!(2)]);
        f.write_all(b"\n").unwrap();
        tail.poll(|l| seen.extend(parse_progress(l))).await;
        assert_eq!(seen, vec![json!(2), json!(3)]);
    }
}
