//! What the benchmark binaries share: the failure exit, a child process killed when dropped, and
//! commands run inside the WAN rig's network namespaces.

use std::process::{Child, Command};

/// Prints `BENCH: msg` (the binary's name) and exits with status 2.
pub fn die(msg: &str) -> ! {
    let name = std::env::args().next().and_then(|a| std::path::Path::new(&a).file_name().map(|n| n.to_string_lossy().into_owned())).unwrap_or_else(|| "bench".into());
    eprintln!("{name}: {msg}");
    std::process::exit(2);
}

/// A child process, killed and reaped when dropped.
#[derive(Debug)]
pub struct Proc(pub Child);

impl Proc {
    /// Spawns `c` as the leader of a new process group, so dropping it also ends what it
    /// started (QEMU's `exec:` migration helpers outlive QEMU otherwise).
    pub fn group(c: &mut Command) -> std::io::Result<Proc> {
        use std::os::unix::process::CommandExt;
        c.process_group(0).spawn().map(Proc)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // The group first (fails harmlessly when this is not a group leader).
        let _ = Command::new("kill").args(["-KILL", "--", &format!("-{}", self.0.id())]).stderr(std::process::Stdio::null()).status();
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `ip netns exec NS PROG`: add the program's arguments to the result.
pub fn in_ns(ns: &str, prog: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).arg(prog);
    c
}

/// The warm pool of the `dwcp daemon` in `dwcp-a` whose HTTP endpoint is `api` (its first
/// `[[peers]]` entry), once full, measured and back from any job (60 s at most): its `/status`
/// entry.
pub fn warm_pool_ready(dwcp: &std::path::Path, api: &str) -> serde_json::Value {
    let t = std::time::Instant::now();
    loop {
        let o = in_ns("dwcp-a", dwcp).args(["status", "--api", api, "--json"]).output().unwrap_or_else(|e| die(&format!("dwcp status: {e}")));
        let st: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        let p = &st["warm_peers"][0];
        if p["want"].as_u64().unwrap_or(0) > 0 && p["parked"] == p["want"] && !p["rtt_ms"].is_null() && p["lent"] == false {
            return p.clone();
        }
        if t.elapsed() > std::time::Duration::from_secs(60) {
            die(&format!("the daemon's warm pool did not fill in 60 s: {st}"));
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// The median of `v` (the upper one of an even count; NaN when empty).
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// One figure measured over several runs: its median, least and most, and every run, so a
/// reader sees the spread behind a median.
#[derive(Debug, Clone, Default)]
pub struct Figure {
    /// Every run's value, in order.
    pub runs: Vec<f64>,
}

impl Figure {
    /// A figure of `runs`.
    pub fn new(runs: Vec<f64>) -> Self {
        Self { runs }
    }
    /// Median.
    pub fn median(&self) -> f64 {
        median(&self.runs)
    }
    /// Least run.
    pub fn min(&self) -> f64 {
        self.runs.iter().copied().fold(f64::NAN, f64::min)
    }
    /// Most run.
    pub fn max(&self) -> f64 {
        self.runs.iter().copied().fold(f64::NAN, f64::max)
    }
    /// (max - min) / median: how far apart the runs were.
    pub fn spread(&self) -> f64 {
        (self.max() - self.min()) / self.median()
    }
    /// `{"median", "min", "max", "spread", "runs"}`.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({"median": self.median(), "min": self.min(), "max": self.max(), "spread": self.spread(), "runs": self.runs})
    }
}

pub use tuning::machine::machine;

/// Ends a bench: adds [`machine`] to its figures `j`, writes them as one line to `path`
/// (`target/bench/NAME.json`) and prints that line last.
pub fn emit(path: &std::path::Path, mut j: serde_json::Value) {
    if let Some(o) = j.as_object_mut() {
        o.insert("machine".into(), machine());
    }
    let line = j.to_string();
    if let Some(d) = path.parent() {
        let _ = std::fs::create_dir_all(d);
    }
    std::fs::write(path, format!("{line}\n")).unwrap_or_else(|e| die(&format!("writing {}: {e}", path.display())));
    println!("{line}");
}

/// The WAN rig (`hw-tests/wan`), taken down when dropped. `.0` is the workspace root.
#[derive(Debug)]
pub struct Wan(pub std::path::PathBuf);

impl Wan {
    /// Brings the rig up with `args` (`--rtt 50ms --rate 1gbit ...`), or dies with its error.
    pub fn up(root: &std::path::Path, args: &[&str]) -> Wan {
        let up = Command::new(root.join("hw-tests/wan")).arg("up").args(args).output().expect("hw-tests/wan up");
        if !up.status.success() {
            die(&format!("hw-tests/wan up: {}", String::from_utf8_lossy(&up.stderr)));
        }
        Wan(root.to_owned())
    }
}

impl Drop for Wan {
    fn drop(&mut self) {
        let _ = Command::new(self.0.join("hw-tests/wan")).arg("down").status();
    }
}
