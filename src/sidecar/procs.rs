//! Processes by pid, without `unsafe`: liveness and identity from `/proc`
//! (Linux), process-group signals through the shell's `kill` builtin.

use std::path::Path;
use std::process::Stdio;

use super::state::TaskRecord;

/// Signal a whole process group through the shell's `kill` builtin (no
/// `unsafe`, no extra crate, works wherever `sh` does).
pub(super) async fn signal_group(pgid: u32, signal: &str) {
    if pgid <= 1 {
        return; // Never `kill -- -1` (every process) or `-0` (our own group).
    }
    let status = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(r#"kill -s "$0" -- "-$1" 2>/dev/null"#)
        .arg(signal)
        .arg(pgid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await;
    tracing::debug!(pgid, signal, ?status, "signalled process group");
}

/// Fields of `/proc/PID/stat` from field 3 (state) on. The command name
/// (field 2) may hold spaces and parentheses: skip past the last ')'.
fn stat_fields(pid: &str) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// `(state, start time)` of a process.
pub(super) fn proc_stat(pid: u32) -> Option<(char, u64)> {
    let fields = stat_fields(&pid.to_string())?;
    let state = fields.first()?.chars().next()?;
    // fields[0] is field 3; the start time is field 22.
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

/// Does any live (non-zombie) process belong to process group `pgid`?
pub(super) fn group_alive(pgid: u32) -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return false;
    };
    let pgid = pgid.to_string();
    dir.flatten().any(|entry| {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            return false;
        };
        // fields[0] is the state (field 3), fields[2] the process group (field 5).
        stat_fields(pid).is_some_and(|f| {
            f.get(2) == Some(&pgid)
                && !matches!(f.first().map(String::as_str), Some("Z" | "X" | "x"))
        })
    })
}

/// The still-running wrapper of this task run, if any: the pid from the
/// state file or, if the sidecar died before recording it, from the
/// wrapper's own `pid` file; checked to be alive and to be that wrapper
/// (its command line names the task directory).
pub fn live_process(rec: &TaskRecord, dir: &Path) -> Option<u32> {
    let pid = rec.pid.or_else(|| {
        std::fs::read_to_string(dir.join("pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    })?;
    let is_wrapper = std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
        let dir = dir.as_os_str().as_encoded_bytes();
        cmdline.split(|b| *b == 0).any(|arg| arg == dir)
    });
    (is_wrapper && alive(pid, rec.pid_start)).then_some(pid)
}

/// Is `pid` still the process we started (same start time), and not a zombie?
pub(super) fn alive(pid: u32, start: Option<u64>) -> bool {
    match proc_stat(pid) {
        Some((state, started)) => {
            !matches!(state, 'Z' | 'X' | 'x') && start.is_none_or(|s| s == started)
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn our_own_process_is_alive_and_a_wrong_start_time_is_not() {
        let pid = std::process::id();
        let (_, start) = proc_stat(pid).unwrap();
        assert!(alive(pid, Some(start)));
        assert!(alive(pid, None));
        assert!(!alive(pid, Some(start + 1)));
        let own_group = stat_fields("self").unwrap()[2].parse().unwrap();
        assert!(group_alive(own_group));
        assert!(!group_alive(u32::MAX));
    }
}
