//! Readings from `/proc`: a process's resident memory (`VmRSS`) and CPU time, the open-file limit,
//! and a monotonic clock shared by every task and every worker process of the load generator.

use anyhow::{Context, anyhow};
use rustix::time::{ClockId, clock_gettime};

/// Clock ticks per second of `/proc/*/stat` times (`USER_HZ`, 100 on Linux for every architecture
/// that this tool targets).
const CLOCK_TICKS_PER_SEC: f64 = 100.0;

/// `CLOCK_MONOTONIC` in nanoseconds (time since boot, without suspend). It is one clock for every
/// process on the machine, so a timestamp written by one load-generator process (a publisher's
/// `sent_ns`) can be subtracted from a reading in another (a subscriber in a worker process).
pub fn now_ns() -> u64 {
    let now = clock_gettime(ClockId::Monotonic);
    let secs = u64::try_from(now.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(now.tv_nsec).unwrap_or(0);
    secs.saturating_mul(1_000_000_000).saturating_add(nanos)
}

/// Resident set size of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    status_field_kib(&format!("/proc/{pid}/status"), "VmRSS:")
}

/// Resident set size of this process, in KiB.
pub fn own_rss_kib() -> anyhow::Result<u64> {
    status_field_kib("/proc/self/status", "VmRSS:")
}

fn status_field_kib(path: &str, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .ok_or_else(|| anyhow!("no {field} in {path}"))
}

/// User plus system CPU time of process `pid`, in seconds.
pub fn cpu_secs(pid: u32) -> anyhow::Result<f64> {
    stat_cpu_secs(&format!("/proc/{pid}/stat"))
}

/// User plus system CPU time of this process (all threads), in seconds.
pub fn own_cpu_secs() -> anyhow::Result<f64> {
    stat_cpu_secs("/proc/self/stat")
}

fn stat_cpu_secs(path: &str) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?;
    // The command name (field 2) may contain spaces; fields after it start at field 3 (`state`).
    let after_name = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| anyhow!("unexpected format of {path}"))?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |index: usize| -> anyhow::Result<f64> {
        fields
            .get(index)
            .and_then(|v| v.parse::<u64>().ok())
            .map(|v| v as f64)
            .ok_or_else(|| anyhow!("unexpected format of {path}"))
    };
    // utime is field 14 and stime field 15, i.e. indexes 11 and 12 after the name.
    Ok((ticks(11)? + ticks(12)?) / CLOCK_TICKS_PER_SEC)
}

/// This process's soft limit on open files.
pub fn open_files_limit() -> anyhow::Result<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").context("cannot read /proc/self/limits")?;
    limits
        .lines()
        .find_map(|line| line.strip_prefix("Max open files"))
        .and_then(|rest| rest.split_whitespace().next())
        .map(|soft| soft.parse().unwrap_or(u64::MAX))
        .ok_or_else(|| anyhow!("no `Max open files` in /proc/self/limits"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_process() {
        assert!(own_rss_kib().unwrap() > 0);
        assert!(own_cpu_secs().unwrap() >= 0.0);
        assert!(open_files_limit().unwrap() > 0);
        assert!(rss_kib(std::process::id()).unwrap() > 0);
        let a = now_ns();
        assert!(now_ns() >= a);
    }
}
