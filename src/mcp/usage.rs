//! What processes cost, read from `/proc`: resident memory and CPU time of a session's process
//! group (its server and everything it started that stayed in the group), and of the service
//! itself. For the status page and `/metrics`; never on a request's path.

use std::collections::HashMap;
use std::path::Path;

/// `/proc` reports CPU times in USER_HZ, which Linux fixes at 100 for user space.
const TICKS_PER_SECOND: f64 = 100.0;

/// Memory and CPU time of a set of processes.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    /// Proportional set size: each shared page divided among the processes that share it, so
    /// a session's forks of the service (its shim and init, which share the service's pages)
    /// and a zygote's children are not each charged the whole of what they share.
    pub memory_bytes: u64,
    /// User plus system time, in seconds.
    pub cpu_seconds: f64,
    pub processes: u32,
}

impl std::ops::AddAssign for Usage {
    fn add_assign(&mut self, other: Usage) {
        self.memory_bytes += other.memory_bytes;
        self.cpu_seconds += other.cpu_seconds;
        self.processes += other.processes;
    }
}

/// The fields of `/proc/<pid>/stat` after the command name, which may itself hold spaces.
fn stat_fields(stat: &str) -> Option<Vec<&str>> {
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().collect())
}

/// `VmRSS` of `/proc/<pid>/status`, in bytes.
fn resident_bytes(proc_dir: &Path) -> Option<u64> {
    let status = std::fs::read_to_string(proc_dir.join("status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// `Pss` of `/proc/<pid>/smaps_rollup` (falling back to `VmRSS`), in bytes.
fn proportional_bytes(proc_dir: &Path) -> Option<u64> {
    let Ok(rollup) = std::fs::read_to_string(proc_dir.join("smaps_rollup")) else {
        return resident_bytes(proc_dir);
    };
    let line = rollup.lines().find(|l| l.starts_with("Pss:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// One process: its process group and what it costs (`None` for a zombie or a process gone).
fn process(proc_dir: &Path) -> Option<(u32, Usage)> {
    let stat = std::fs::read_to_string(proc_dir.join("stat")).ok()?;
    let fields = stat_fields(&stat)?;
    // After the name: state, ppid, pgrp, ..., utime (12th), stime (13th).
    if matches!(fields.first(), Some(&"Z" | &"X")) {
        return None;
    }
    let pgrp: u32 = fields.get(2)?.parse().ok()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((
        pgrp,
        Usage {
            memory_bytes: proportional_bytes(proc_dir).unwrap_or(0),
            cpu_seconds: (utime + stime) as f64 / TICKS_PER_SECOND,
            processes: 1,
        },
    ))
}

/// The usage of each of `groups`, summed over the processes in it: one pass over `/proc`.
/// A group with no process left is absent.
pub fn by_process_group(groups: &[u32]) -> HashMap<u32, Usage> {
    let mut usage: HashMap<u32, Usage> = HashMap::new();
    if groups.is_empty() {
        return usage;
    }
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return usage;
    };
    for entry in entries.flatten() {
        let is_pid = entry
            .file_name()
            .to_str()
            .is_some_and(|name| name.bytes().all(|b| b.is_ascii_digit()));
        if !is_pid {
            continue;
        }
        if let Some((pgrp, one)) = process(&entry.path())
            && groups.contains(&pgrp)
        {
            *usage.entry(pgrp).or_default() += one;
        }
    }
    usage
}

/// The service's own process, for the standard `process_*` metrics.
#[derive(Debug, Clone, Copy, Default)]
pub struct SelfUsage {
    pub rss_bytes: u64,
    pub virtual_bytes: u64,
    pub cpu_seconds: f64,
    pub threads: u64,
    pub open_fds: u64,
    /// Seconds since the epoch.
    pub start_time: f64,
}

/// Reads this process's usage; fields that cannot be read are 0.
pub fn of_self() -> SelfUsage {
    let dir = Path::new("/proc/self");
    let mut usage = SelfUsage {
        rss_bytes: resident_bytes(dir).unwrap_or(0),
        open_fds: std::fs::read_dir(dir.join("fd")).map_or(0, |d| d.count() as u64),
        ..SelfUsage::default()
    };
    if let Ok(stat) = std::fs::read_to_string(dir.join("stat"))
        && let Some(fields) = stat_fields(&stat)
    {
        let field = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0)
        };
        usage.cpu_seconds = (field(11) + field(12)) as f64 / TICKS_PER_SECOND;
        usage.threads = field(17);
        usage.virtual_bytes = field(20);
        // `starttime` counts ticks since boot; `btime` of /proc/stat is the boot's epoch time.
        let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime "))
                .and_then(|b| b.trim().parse::<u64>().ok())
        });
        if let Some(boot) = boot {
            usage.start_time = boot as f64 + field(19) as f64 / TICKS_PER_SECOND;
        }
    }
    usage
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_service_sees_itself_and_its_own_group() {
        let me = of_self();
        assert!(me.rss_bytes > 1024 * 1024, "{me:?}");
        assert!(me.open_fds >= 3 && me.threads >= 1, "{me:?}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(me.start_time > 0.0 && me.start_time <= now + 1.0, "{me:?}");

        let group = nix::unistd::getpgrp().as_raw() as u32;
        let usage = by_process_group(&[group, u32::MAX]);
        let mine = usage.get(&group).expect("this test's own group");
        assert!(
            mine.processes >= 1 && mine.memory_bytes > 1024 * 1024,
            "{mine:?}"
        );
        assert!(!usage.contains_key(&u32::MAX));
    }
}
