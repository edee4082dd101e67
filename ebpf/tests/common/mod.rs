//! What the probe and first-window tests share.

/// Re-runs the test `name` of the current test binary as nobody, without capabilities (the
/// kernel refuses BPF there), and checks it passed and printed `marker`.
pub fn rerun_unprivileged(name: &str, marker: &str) {
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all", "--"])
        .arg(&exe)
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .output()
        .expect("setpriv (util-linux)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains(marker), "unprivileged run failed:\n{text}");
    eprint!("{text}");
}
