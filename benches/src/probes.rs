//! `make bench-probes`: what the eBPF probes cost. The same loopback transfer (plaintext, full
//! speed) twice in one run, with the probes (`--monitor auto`) and with `TCP_INFO` polling
//! (`--monitor poll`), while the kernel's BPF statistics are on. Figures: probe events, ns per
//! event (the kernel's own run-time accounting of each program), the probes' CPU share of one
//! core over the transfer, and the two runs' goodput and CPU per GB.
//!
//!   bench-probes [--size 4GiB] [--runs 3]

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use benches::die;

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut size, mut runs) = ("4GiB".to_string(), 3usize);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--size" => size = args.next().unwrap_or_else(|| die("--size SIZE")),
            "--runs" => runs = args.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| die("--runs N")),
            _ => die(&format!("unknown argument {a}; usage: bench-probes [--size 4GiB] [--runs 3]")),
        }
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace").to_path_buf();
    let dwcp = root.join("target/release/dwcp");
    let dir = root.join("target/bench");
    std::fs::create_dir_all(&dir).expect("target/bench");
    let key = dir.join("probes-key");
    let ok = Command::new(&dwcp).args(["keygen", "--force"]).arg(&key).stderr(Stdio::null()).status().is_ok_and(|s| s.success());
    if !ok {
        die("dwcp keygen failed (make build first)");
    }
    // Run-time statistics for as long as this process holds the descriptor.
    let _stats = ebpf::Probes::enable_stats().unwrap_or_else(|e| die(&format!("{e} (needs root)")));
    let mut rx = Command::new(&dwcp)
        .args(["recv", "--listen", "127.0.0.1:7481", "--discard", "--no-encrypt", "--key-file"])
        .arg(&key)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("dwcp recv");
    std::thread::sleep(Duration::from_millis(400));
    let mut results: Vec<(&str, Vec<Value>)> = vec![("auto", Vec::new()), ("poll", Vec::new())];
    for k in 0..runs {
        for (monitor, out) in &mut results {
            let o = Command::new(&dwcp)
                .args(["send", &format!("gen:{size}"), "--name", &format!("probes-{k}-{monitor}"), "--to", "127.0.0.1:7481", "--key-file"])
                .arg(&key)
                .args(["--mode", "internet", "--no-encrypt", "--hde", "off", "--acp", "off", "--monitor", monitor, "--json"])
                .output()
                .expect("dwcp send");
            let v: Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|_| die(&format!("dwcp send failed: {}", String::from_utf8_lossy(&o.stderr))));
            out.push(v);
        }
    }
    let _ = rx.kill();
    let _ = rx.wait();

    let auto = &results[0].1;
    let poll = &results[1].1;
    if auto.iter().any(|v| v["control"]["monitor"] != "ebpf") {
        die("the probes did not load for --monitor auto (not root?)");
    }
    let cost = |v: &Value| -> (u64, u64) {
        v["control"]["probe_cost"].as_array().map_or((0, 0), |a| a.iter().fold((0, 0), |(r, n), p| (r + p["runs"].as_u64().unwrap_or(0), n + p["run_ns"].as_u64().unwrap_or(0))))
    };
    let ns_per_event = benches::median(&auto.iter().map(&cost).filter(|c| c.0 > 0).map(|(r, n)| n as f64 / r as f64).collect::<Vec<_>>());
    let events = benches::median(&auto.iter().map(|v| cost(v).0 as f64).collect::<Vec<_>>());
    let share = benches::median(&auto.iter().map(|v| cost(v).1 as f64 / 1e9 / v["wall_s"].as_f64().unwrap_or(1.0)).collect::<Vec<_>>());
    let gbps = |vs: &Vec<Value>| benches::median(&vs.iter().map(|v| v["goodput_gbps"].as_f64().unwrap_or(0.0)).collect::<Vec<_>>());
    let cpu_gb = |vs: &Vec<Value>| benches::median(&vs.iter().map(|v| v["cpu_s"].as_f64().unwrap_or(0.0) / (v["size"].as_f64().unwrap_or(1.0) / 1e9)).collect::<Vec<_>>());
    let figures = json!({
        "ns_per_event": ns_per_event,
        "events_per_transfer": events,
        "probe_cpu_share": share,
        "goodput_gbps_probes": gbps(auto),
        "goodput_gbps_poll": gbps(poll),
        "goodput_ratio": gbps(auto) / gbps(poll).max(1e-9),
        "cpu_s_per_gb_probes": cpu_gb(auto),
        "cpu_s_per_gb_poll": cpu_gb(poll),
        "size": size,
        "runs": runs,
    });
    println!("bench-probes: {size} over loopback, plaintext, medians of {runs} runs per monitor, same run");
    println!("  {:<28} {:>12} {:>12}", "", "eBPF probes", "TCP_INFO poll");
    println!("  {:<28} {:>12.2} {:>12.2}", "goodput (Gbit/s)", gbps(auto), gbps(poll));
    println!("  {:<28} {:>12.3} {:>12.3}", "process CPU (s per GB)", cpu_gb(auto), cpu_gb(poll));
    println!("  {:<28} {:>12.0} {:>12}", "probe events per transfer", events, "-");
    println!("  {:<28} {:>12.0} {:>12}", "ns per event (kernel stats)", ns_per_event, "-");
    println!("  {:<28} {:>11.3}% {:>12}", "probe CPU (share of a core)", share * 100.0, "-");
    benches::emit(&dir.join("probes.json"), figures);
}
