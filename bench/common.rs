//! What the Rust benchmarks share: `--name value` flags and the process's peak resident memory.

/// The value after `--name`, parsed, or `default`.
pub fn flag(args: &[String], name: &str, default: usize) -> usize {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Peak resident memory of this process in MB (VmHWM), read here because a parent's RUSAGE_CHILDREN
/// also counts whatever else it forked.
pub fn peak_rss_mb() -> Option<f64> {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(str::to_string))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
        .map(|kb| kb as f64 / 1024.0)
}
