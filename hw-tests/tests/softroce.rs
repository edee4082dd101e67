//! Soft-RoCE guest validation: the guest boots, rxe0 carries real verbs traffic (perftest's
//! `ib_write_bw` and `ib_send_lat`, and our own rdma-sys program), and the figures are recorded
//! in `target/rigs/softroce.json`.
//!
//! Needs the packages of `make vm-deps` and root (QEMU's 9p export of the host root); without
//! them each test fails and says what is missing.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

/// Guests share the two cores: one at a time, so the recorded figures are not halved.
static GUEST: Mutex<()> = Mutex::new(());

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace").to_owned()
}

fn require() {
    let uid = Command::new("id").arg("-u").output().expect("id");
    assert_eq!(String::from_utf8_lossy(&uid.stdout).trim(), "0", "the soft-RoCE guest needs root (QEMU exports the host root over 9p)");
    for tool in ["qemu-system-x86_64", "ib_write_bw", "ib_send_lat", "busybox", "cpio", "depmod"] {
        let found = Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().expect("sh").status.success();
        assert!(found, "{tool} is missing: run `make vm-deps`");
    }
}

/// Runs `sh -c SCRIPT` in a fresh guest; returns (status, output).
fn in_guest(script: &str) -> (i32, String) {
    hw_tests::in_guest(script, 1024, 240)
}

fn record(key: &str, value: serde_json::Value) {
    let dir = root().join("target/rigs");
    std::fs::create_dir_all(&dir).expect("target/rigs");
    let path = dir.join("softroce.json");
    let mut all: serde_json::Map<String, serde_json::Value> = std::fs::read(&path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
    all.insert(key.into(), value);
    std::fs::write(&path, serde_json::to_string_pretty(&all).expect("json")).expect("write softroce.json");
}

/// The numbers on perftest's result line (the line after the one starting with " #bytes").
fn result_row(text: &str) -> Vec<f64> {
    let mut lines = text.lines().skip_while(|l| !l.trim_start().starts_with("#bytes"));
    lines.next();
    lines.next().unwrap_or("").split_whitespace().filter_map(|w| w.parse().ok()).collect()
}

#[test]
fn guest_runs_our_rdma_sys_program() {
    let _g = GUEST.lock().unwrap_or_else(|e| e.into_inner());
    require();
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_rdma-smoke"));
    let (rc, out) = in_guest(&format!("{} rxe0", bin.display()));
    assert_eq!(rc, 0, "rdma-smoke failed in the guest:\n{out}");
    let line = out.lines().find(|l| l.starts_with('{')).unwrap_or_else(|| panic!("no JSON from rdma-smoke:\n{out}"));
    let v: serde_json::Value = serde_json::from_str(line).expect("json");
    assert_eq!(v["ok"], true);
    assert_eq!(v["device"], "rxe0");
    record("rdma_smoke", v);
    // And the same program on the host, which has no RDMA device, names why it cannot run.
    let host = Command::new(&bin).output().expect("rdma-smoke on host");
    assert!(!host.status.success());
    assert!(String::from_utf8_lossy(&host.stderr).contains("rdma-smoke:"));
}

#[test]
fn guest_runs_perftest_write_bandwidth_and_send_latency() {
    let _g = GUEST.lock().unwrap_or_else(|e| e.into_inner());
    require();
    let script = "set -e; \
        ib_write_bw -d rxe0 -F -s 65536 -n 2000 --report_gbits > /tmp/bw_srv.log 2>&1 & sleep 1; \
        ib_write_bw -d rxe0 -F -s 65536 -n 2000 --report_gbits 10.0.2.15; wait; \
        ib_send_lat -d rxe0 -F -s 64 -n 2000 > /tmp/lat_srv.log 2>&1 & sleep 1; \
        echo ===LAT===; ib_send_lat -d rxe0 -F -s 64 -n 2000 10.0.2.15; wait";
    let (rc, out) = in_guest(script);
    assert_eq!(rc, 0, "perftest failed in the guest:\n{out}");
    let (bw_part, lat_part) = out.split_once("===LAT===").unwrap_or_else(|| panic!("no latency run:\n{out}"));
    let bw = result_row(bw_part);
    assert!(bw.len() >= 4, "no ib_write_bw result row:\n{bw_part}");
    let (gbps_avg, gbps_peak) = (bw[3], bw[2]);
    assert!(gbps_avg > 0.0, "ib_write_bw moved nothing");
    let lat = result_row(lat_part);
    assert!(lat.len() >= 8, "no ib_send_lat result row:\n{lat_part}");
    let (t_typical, p99) = (lat[4], lat[7]);
    assert!(t_typical > 0.0 && p99 >= t_typical);
    let v = serde_json::json!({
        "ib_write_bw_msg_bytes": 65536, "ib_write_bw_gbps_avg": gbps_avg, "ib_write_bw_gbps_peak": gbps_peak,
        "ib_write_bw_mbytes_per_s": gbps_avg * 1000.0 / 8.0,
        "ib_send_lat_msg_bytes": 64, "ib_send_lat_typical_us": t_typical, "ib_send_lat_p99_us": p99,
    });
    eprintln!("soft-RoCE guest: {v}");
    record("perftest", v);
}
