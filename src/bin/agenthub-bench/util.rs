//! Shared helpers: the bench clock, latency summaries, payload padding, and
//! readings of a server process from `/proc`.

use std::sync::OnceLock;
use std::time::Instant;

use anyhow::{Context, Result};

/// Size of every benchmark payload (JSON), in bytes.
pub const PAYLOAD_BYTES: usize = 200;

static BASE: OnceLock<Instant> = OnceLock::new();

/// Monotonic nanoseconds since the bench started (comparable across tasks).
pub fn now_ns() -> u64 {
    BASE.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// Wait for every sender task (each returns when it finished, in [`now_ns`])
/// and return the latest finish time.
pub async fn latest_finish(
    tasks: Vec<tokio::task::JoinHandle<Result<u64>>>,
    limit: std::time::Duration,
    what: &str,
) -> Result<u64> {
    let mut last = 0;
    for t in tasks {
        let end = tokio::time::timeout(limit, t)
            .await
            .with_context(|| format!("{what} timed out"))???;
        last = last.max(end);
    }
    Ok(last)
}

/// The figures of a pipelined run: count, in flight, messages/s, server CPU per op.
pub fn pipelined_metrics(m: &mut Metrics, count: usize, inflight: usize, secs: f64, cpu_us: u64) {
    m.put("count", count as f64);
    m.put("inflight", inflight as f64);
    m.put("msgs_per_s", count as f64 / secs);
    m.put("server_cpu_us_per_op", cpu_us as f64 / count as f64);
}

/// Latency samples in nanoseconds.
#[derive(Default)]
pub struct Samples(Vec<u64>);

impl Samples {
    pub fn with_capacity(n: usize) -> Samples {
        Samples(Vec::with_capacity(n))
    }

    pub fn push(&mut self, ns: u64) {
        self.0.push(ns);
    }

    pub fn extend(&mut self, other: Samples) {
        self.0.extend(other.0);
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Sort once; then read percentiles.
    pub fn sorted(mut self) -> Sorted {
        self.0.sort_unstable();
        Sorted(self.0)
    }
}

/// Sorted latency samples.
pub struct Sorted(Vec<u64>);

impl Sorted {
    /// Nearest-rank percentile `q` (0..1) in microseconds; 0 when empty.
    pub fn pct_us(&self, q: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        let rank = (q * self.0.len() as f64).ceil() as usize;
        let idx = rank.clamp(1, self.0.len()) - 1;
        self.0[idx] as f64 / 1000.0
    }

    /// `{prefix}_p50_us`, `{prefix}_p99_us`, `{prefix}_p999_us`.
    pub fn put(&self, m: &mut Metrics, prefix: &str) {
        m.put(&format!("{prefix}_p50_us"), self.pct_us(0.50));
        m.put(&format!("{prefix}_p99_us"), self.pct_us(0.99));
        m.put(&format!("{prefix}_p999_us"), self.pct_us(0.999));
    }
}

/// Named numbers of one phase, in insertion order.
#[derive(Default, Debug, Clone)]
pub struct Metrics(pub Vec<(String, f64)>);

impl Metrics {
    pub fn put(&mut self, name: &str, v: f64) {
        self.0.push((name.to_string(), v));
    }
}

/// Median of `v` (mean of the middle two for an even count); `None` if empty.
pub fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// `prefix` + `"pad":"xxx…"` + `suffix`, with the pad sized so the whole
/// string is [`PAYLOAD_BYTES`] long (or just over, if the rest is longer).
/// `prefix` must end just after a `{` or `,`.
pub fn padded(prefix: &str, suffix: &str) -> String {
    let fixed = prefix.len() + suffix.len() + r#""pad":"""#.len();
    let pad = PAYLOAD_BYTES.saturating_sub(fixed);
    format!("{prefix}\"pad\":\"{}\"{suffix}", "x".repeat(pad))
}

/// A process's user + system CPU time, in microseconds.
pub fn cpu_us(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("read /proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at ") ".
    let rest = stat
        .rsplit_once(") ")
        .map(|(_, r)| r)
        .context("odd /proc stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 here.
    let utime: u64 = fields.get(11).context("utime")?.parse()?;
    let stime: u64 = fields.get(12).context("stime")?.parse()?;
    Ok((utime + stime) * 1_000_000 / clock_ticks())
}

/// A process's resident set size, in KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("VmRSS value")?
        .parse()?)
}

/// This process's soft open-file limit (`Max open files` in
/// `/proc/self/limits`; children such as the hub inherit it). `None`: unlimited.
pub fn open_file_limit() -> Result<Option<u64>> {
    let limits = std::fs::read_to_string("/proc/self/limits").context("read /proc/self/limits")?;
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .context("no `Max open files` in /proc/self/limits")?;
    parse_limit(line)
}

/// The soft limit of a `/proc/*/limits` line.
fn parse_limit(line: &str) -> Result<Option<u64>> {
    // "Max open files            20000                20000                files"
    let soft = line
        .split_whitespace()
        .nth(3)
        .context("odd `Max open files` line")?;
    if soft == "unlimited" {
        return Ok(None);
    }
    Ok(Some(soft.parse().context("open-file limit")?))
}

/// How many local ports `net.ipv4.ip_local_port_range` offers (the ports a
/// source address can connect from, to one server).
pub fn local_port_count() -> Result<u64> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .context("read /proc/sys/net/ipv4/ip_local_port_range")?;
    let ports: Vec<u64> = range
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .context("odd ip_local_port_range")?;
    match ports[..] {
        [low, high] if low <= high => Ok(high - low + 1),
        _ => anyhow::bail!("odd ip_local_port_range `{}`", range.trim()),
    }
}

/// Clock ticks per second (`getconf CLK_TCK`, 100 on Linux).
fn clock_ticks() -> u64 {
    static TICKS: OnceLock<u64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .filter(|&t| t > 0)
            .unwrap_or(100)
    })
}

/// A CPU-time meter on one process, or on several summed (a cluster).
pub struct CpuMeter {
    /// `(pid, CPU µs at start)`.
    start: Vec<(u32, u64)>,
}

impl CpuMeter {
    pub fn start(pid: u32) -> Result<CpuMeter> {
        CpuMeter::start_all(&[pid])
    }

    /// One meter over every process in `pids`.
    pub fn start_all(pids: &[u32]) -> Result<CpuMeter> {
        let start = pids
            .iter()
            .map(|&pid| Ok((pid, cpu_us(pid)?)))
            .collect::<Result<_>>()?;
        Ok(CpuMeter { start })
    }

    /// CPU microseconds used since `start`, summed over the processes.
    pub fn used_us(&self) -> Result<u64> {
        let mut used = 0;
        for &(pid, start_us) in &self.start {
            used += cpu_us(pid)?.saturating_sub(start_us);
        }
        Ok(used)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padded_payload_is_200_bytes_of_json() {
        let s = padded(r#"{"i":1,"#, "}");
        assert_eq!(s.len(), PAYLOAD_BYTES);
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["i"], 1);
    }

    #[test]
    fn percentiles_use_nearest_rank() {
        let mut s = Samples::default();
        for i in 1..=1000 {
            s.push(i * 1000);
        }
        let s = s.sorted();
        assert_eq!(s.pct_us(0.5), 500.0);
        assert_eq!(s.pct_us(0.99), 990.0);
        assert_eq!(s.pct_us(0.999), 999.0);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
    }

    #[test]
    fn open_file_limit_reads_the_soft_column() {
        let line = "Max open files            20000                1048576              files";
        assert_eq!(parse_limit(line).unwrap(), Some(20_000));
        let line = "Max open files            unlimited            unlimited            files";
        assert_eq!(parse_limit(line).unwrap(), None);
        assert!(open_file_limit().is_ok());
        assert!(local_port_count().unwrap() > 0);
    }
}
