//! What the kernel says about a process: CPU time (ns, summed over its
//! threads from `/proc/<pid>/task/*/schedstat`), resident memory (VmRSS,
//! VmHWM), children, and a description of the machine. Linux only.

use std::fs;

/// CPU time a process has used so far, in nanoseconds: the sum of
/// `/proc/<pid>/task/<tid>/schedstat` (first field: time on a CPU) over its
/// live threads. Nanosecond precision, unlike utime+stime (10 ms ticks), which
/// matters for a sidecar that spends milliseconds per second. A thread that
/// exited takes its time with it; the processes measured here keep theirs.
pub fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Established TCP connections of process `pid` to `port` on this host
/// (its socket descriptors, matched against `/proc/net/tcp` and `tcp6`).
pub fn connections_to(pid: u32, port: u16) -> usize {
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return 0;
    };
    let inodes: std::collections::HashSet<String> = fds
        .filter_map(|fd| fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|target| {
            let text = target.to_string_lossy().into_owned();
            Some(text.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect();
    let port = format!("{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|table| fs::read_to_string(table).ok())
        .map(|text| {
            text.lines()
                .skip(1)
                .filter(|line| {
                    let f: Vec<&str> = line.split_whitespace().collect();
                    f.len() > 9
                        && f[3] == "01"
                        && f[2].rsplit(':').next() == Some(port.as_str())
                        && inodes.contains(f[9])
                })
                .count()
        })
        .sum()
}

/// CPU time of several processes together.
pub fn cpu_ns_all(pids: &[u32]) -> u64 {
    pids.iter().map(|&p| cpu_ns(p)).sum()
}

/// A field of `/proc/<pid>/status` in kB (`VmRSS`, `VmHWM`).
pub fn status_kb(pid: u32, field: &str) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        rest.trim().trim_end_matches("kB").trim().parse().ok()
    })
}

/// Direct children of `pid` (scans `/proc/*/stat`).
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| parent(p) == Some(pid))
        .collect()
}

fn parent(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces.
    let after = &stat[stat.rfind(')')? + 2..];
    after.split_whitespace().nth(1)?.parse().ok()
}

/// One line about the machine: cores, CPU model, kernel, load average.
pub fn machine() -> Machine {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split_once(':').map(|x| x.1))
        .unwrap_or("unknown")
        .trim()
        .to_owned();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let load = fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");
    let mem_gib = fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0 / 1024.0)
        .unwrap_or(0.0);
    Machine {
        cores,
        model,
        kernel,
        load,
        mem_gib,
    }
}

#[derive(Debug, Clone)]
pub struct Machine {
    pub cores: usize,
    pub model: String,
    pub kernel: String,
    /// `/proc/loadavg`'s 1, 5 and 15 minute figures when the run started.
    pub load: String,
    pub mem_gib: f64,
}

/// CPU time and a count, read together at the start and end of a window.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub at: std::time::Instant,
    pub cpu_ns: u64,
    pub count: u64,
}

impl Sample {
    /// Events per second between two samples.
    pub fn rate_since(&self, earlier: &Sample) -> f64 {
        let secs = self.at.duration_since(earlier.at).as_secs_f64();
        (self.count - earlier.count) as f64 / secs.max(1e-9)
    }

    /// CPU nanoseconds per event between two samples.
    pub fn cpu_per_event_ns(&self, earlier: &Sample) -> f64 {
        (self.cpu_ns - earlier.cpu_ns) as f64 / ((self.count - earlier.count) as f64).max(1.0)
    }
}
