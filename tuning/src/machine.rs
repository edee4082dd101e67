//! Where and when a measurement was taken, for every bench's and sweep's JSON.

use std::process::Command;

fn command_line(prog: &str, args: &[&str]) -> Option<String> {
    let o = Command::new(prog).args(args).output().ok().filter(|o| o.status.success())?;
    Some(String::from_utf8_lossy(&o.stdout).trim().to_owned())
}

/// The commit (and whether the tree had changes), the kernel, the CPU model and count, and the
/// date (UTC).
pub fn machine() -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|s| s.lines().find_map(|l| l.strip_prefix("model name").map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())));
    serde_json::json!({
        "commit": command_line("git", &["rev-parse", "--short", "HEAD"]),
        "dirty": command_line("git", &["status", "--porcelain", "--untracked-files=no"]).map(|s| !s.is_empty()),
        "kernel": command_line("uname", &["-r"]),
        "cpu": cpu,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).ok(),
        "date": command_line("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
    })
}
