//! `make bench-rdma`: dwcp's RDMA transport against perftest in the soft-RoCE guest, same run:
//! `ib_write_bw` with dwcp's message size (the 1 MiB chunk) and queue-pair count against
//! `dwcp send --transport rdma` of a generated image to a discarding receiver (checksummed,
//! credited and verified end to end), alternated three times (medians); small-message latency
//! p50/p99 of dwcp's verbs layer (`rdma-lat`, SEND/RECV ping-pong, busy polling) against
//! `ib_send_lat`. Emulated rxe speeds are low: the ratios are what count.
//!
//!   bench-rdma [--qps 2] [--size-mib 512] [--reps 3]

use std::path::PathBuf;
use std::process::Command;

use serde_json::json;

use benches::die;

/// Numbers on perftest's result row (the line after the one starting with `#bytes`).
fn result_row(text: &str) -> Vec<f64> {
    let mut lines = text.lines().skip_while(|l| !l.trim_start().starts_with("#bytes"));
    lines.next();
    lines.next().unwrap_or("").split_whitespace().filter_map(|w| w.parse().ok()).collect()
}

/// Sections of the guest's output, each after a `#NAME` line, up to the next `#` line.
fn sections(out: &str, name: &str) -> Vec<String> {
    let mut v = Vec::new();
    let mut cur: Option<String> = None;
    for l in out.lines() {
        if l.starts_with('#') && !l.trim_start().starts_with("#bytes") {
            if let Some(c) = cur.take() {
                v.push(c);
            }
            if l == format!("#{name}") {
                cur = Some(String::new());
            }
            continue;
        }
        if let Some(c) = &mut cur {
            c.push_str(l);
            c.push('\n');
        }
    }
    v.extend(cur);
    v
}

fn main() {
    let (mut qps, mut size_mib, mut reps) = (2u32, 512u32, 3u32);
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(k) = it.next() {
        let v = it.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| die(&format!("{k} needs a number")));
        match k.as_str() {
            "--qps" => qps = v,
            "--size-mib" => size_mib = v,
            "--reps" => reps = v,
            _ => die("usage: bench-rdma [--qps N] [--size-mib N] [--reps N]"),
        }
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace").to_owned();
    let bin = |n: &str| root.join("target/release").join(n);
    for b in ["dwcp", "rdma-lat"] {
        if !bin(b).exists() {
            die(&format!("{} missing: cargo build --release", bin(b).display()));
        }
    }
    let msg = 1 << 20;
    let script = format!(
        "D={dwcp}; K=/tmp/k; A=10.0.2.15:7470; $D keygen --force $K 2>/dev/null; \
         $D recv --listen $A --discard --no-encrypt --key-file $K > /dev/null 2>&1 & sleep 0.5; \
         for r in $(seq {reps}); do \
           ib_write_bw -d rxe0 -F -s {msg} -q {qps} -n {size_mib} --report_gbits > /dev/null 2>&1 & sleep 1; \
           echo '#IBW'; ib_write_bw -d rxe0 -F -s {msg} -q {qps} -n {size_mib} --report_gbits 10.0.2.15; wait %2 2>/dev/null; \
           echo '#DWCP'; $D send gen:{size_mib}MiB --to $A --key-file $K --transport rdma --rdma-qps {qps} --chunk-size {msg} --json 2>/dev/null; \
         done; \
         ib_send_lat -d rxe0 -F -s 64 -n 1000 > /dev/null 2>&1 & sleep 1; \
         echo '#LAT'; ib_send_lat -d rxe0 -F -s 64 -n 1000 10.0.2.15; wait %2 2>/dev/null; \
         echo '#OURLAT'; {lat} rxe0 1000 64; echo '#END'",
        dwcp = bin("dwcp").display(),
        lat = bin("rdma-lat").display(),
    );
    let out = Command::new(root.join("hw-tests/vm"))
        .args(["run", "--mem", "2048", "--timeout", "600", "--", "sh", "-c", &script])
        .current_dir(&root)
        .output()
        .unwrap_or_else(|e| die(&format!("hw-tests/vm: {e} (run `make vm-deps`)")));
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    std::fs::create_dir_all(root.join("target/bench")).expect("target/bench");
    let _ = std::fs::write(root.join("target/bench/rdma.log"), &text);
    if !out.status.success() {
        die(&format!("the guest failed:\n{text}"));
    }
    // ib_write_bw: BW average (Gbit/s) is the 4th number of the result row.
    let ibw: Vec<f64> = sections(&text, "IBW").iter().map(|s| result_row(s)).filter(|r| r.len() >= 4).map(|r| r[3] * 1000.0 / 8.0).collect();
    let ours: Vec<f64> = sections(&text, "DWCP")
        .iter()
        .filter_map(|s| s.lines().find(|l| l.starts_with('{')).and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok()))
        .filter(|j| j["verified"] == true && j["transport"] == "rdma")
        .map(|j| j["goodput_gbps"].as_f64().unwrap_or(0.0) * 1000.0 / 8.0)
        .collect();
    if ibw.len() != reps as usize || ours.len() != reps as usize {
        die(&format!("expected {reps} runs of each, got ib_write_bw {ibw:?}, dwcp {ours:?}:\n{text}"));
    }
    let lat = result_row(sections(&text, "LAT").first().map_or("", String::as_str));
    if lat.len() < 8 {
        die(&format!("no ib_send_lat result:\n{text}"));
    }
    let our_lat: serde_json::Value = sections(&text, "OURLAT")
        .first()
        .and_then(|s| s.lines().find(|l| l.starts_with('{')).and_then(|l| serde_json::from_str(l).ok()))
        .unwrap_or_else(|| die(&format!("no rdma-lat result:\n{text}")));
    let (ib_mbps, dwcp_mbps) = (benches::median(&ibw), benches::median(&ours));
    let (ib_p50, ib_p99) = (lat[4], lat[7]);
    let (p50, p99) = (our_lat["p50_us"].as_f64().unwrap_or(f64::NAN), our_lat["p99_us"].as_f64().unwrap_or(f64::NAN));
    println!("soft-RoCE guest (rxe0, TCG), {qps} queue pairs, {} KiB messages, {size_mib} MiB per run, {reps} runs each", msg >> 10);
    println!("{:<44} {:>10} {:>10}", "", "MB/s", "runs");
    println!("{:<44} {:>10.1} {:>10}", "ib_write_bw", ib_mbps, format!("{ibw:.1?}"));
    println!("{:<44} {:>10.1} {:>10}", "dwcp send --transport rdma (verified)", dwcp_mbps, format!("{ours:.1?}"));
    println!("ratio (dwcp / ib_write_bw)                    {:.2}  (target >= 0.9)", dwcp_mbps / ib_mbps);
    println!("64 B latency, one way: ib_send_lat typical {ib_p50:.2} us, p99 {ib_p99:.2} us; dwcp verbs layer p50 {p50:.2} us, p99 {p99:.2} us");
    let j = json!({
        "dwcp_mbps": dwcp_mbps, "ib_write_bw_mbps": ib_mbps, "ratio": dwcp_mbps / ib_mbps,
        "p50_us": p50, "p99_us": p99, "ib_send_lat_p50_us": ib_p50, "ib_send_lat_p99_us": ib_p99,
        "qps": qps, "msg_bytes": msg, "size_mib": size_mib, "dwcp_runs_mbps": ours, "ib_write_bw_runs_mbps": ibw,
    });
    benches::emit(&root.join("target/bench/rdma.json"), j);
}
