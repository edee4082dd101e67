//! The real daemon on loopback: endpoints, a transfer showing up in /status, failures at boot
//! named with their causes, and 100 boots in a row.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ctlplane::config::Config;
use ctlplane::daemon;
use dataplane::crypto::Psk;

fn config(dir: &Path, extra: &str) -> Config {
    let key = dir.join("key");
    if !key.exists() {
        Psk::generate().save(&key).unwrap();
    }
    let src = format!(
        "[node]\nname = \"t\"\nlisten = \"127.0.0.1:0\"\nout = \"{}\"\nkey_file = \"{}\"\n[api]\nlisten = \"127.0.0.1:0\"\n{extra}",
        dir.join("out").display(),
        key.display()
    );
    Config::parse(&src, "test.toml").unwrap()
}

fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, out.split_once("\r\n\r\n").map_or("", |x| x.1).to_owned())
}

#[test]
fn endpoints_report_health_readiness_metrics_and_status() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path(), "[mode]\nprobe_interval_s = 0.1\n[[peers]]\nname = \"loop\"\naddr = \"127.0.0.1:9\"\n");
    let dm = daemon::run(cfg, true).expect("boot");
    let api = *dm.state.api.get().unwrap();
    assert!(*dm.state.boot_ms.lock().unwrap() < 1000.0);
    assert_eq!(get(api, "/healthz"), (200, "ok\n".into()));
    let (code, body) = get(api, "/readyz");
    assert_eq!(code, 200);
    assert!(body.starts_with("ready\n"));
    assert!(body.contains("degraded: rdma: no RDMA device") || body.contains("degraded: rdma: RDMA devices"), "{body}");
    // A transfer to the daemon's listener shows in /status and /metrics.
    let psk = Psk::from_file(&d.path().join("key")).unwrap();
    let mut o = dataplane::send::SendOptions::new(dm.state.listener.get().unwrap().to_string(), psk);
    o.streams = Some(2);
    let r = dataplane::send::send(dataplane::source::Source::Generated { size: 4 << 20, seed: 1, name: "vm.img".into() }, &o, Arc::default()).unwrap();
    assert!(r.verified);
    let t = Instant::now();
    let status = loop {
        let (_, body) = get(api, "/status");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        if v["sessions"].as_array().is_some_and(|s| !s.is_empty()) || t.elapsed() > Duration::from_secs(5) {
            break v;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status["ready"], true);
    assert!(status["host"]["cores"].as_u64().unwrap() >= 1);
    assert_eq!(status["sessions"][0]["name"], "vm.img");
    assert!(status["sessions"][0]["result"]["Ok"].is_string());
    assert_eq!(status["peers"][0]["name"], "loop");
    let (code, metrics) = get(api, "/metrics");
    assert_eq!(code, 200);
    assert!(metrics.contains("dwcp_boot_component_seconds{component=\"listener\""));
    assert!(metrics.contains("dwcp_sessions_total{result=\"verified\"} 1"));
    assert!(metrics.contains("dwcp_received_bytes_total 4194304"));
    assert!(metrics.contains("dwcp_degraded{component=\"rdma\"} 1"));
    assert_eq!(get(api, "/nope").0, 404);
    dm.shutdown();
}

#[test]
fn required_failures_end_boot_with_their_cause() {
    let d = tempfile::tempdir().unwrap();
    let mut cfg = config(d.path(), "");
    cfg.node.key_file = Some(d.path().join("missing.key"));
    let t = Instant::now();
    let e = daemon::run(cfg, true).unwrap_err().to_string();
    assert!(t.elapsed() < Duration::from_secs(5));
    assert!(e.starts_with("boot failed: keys: cannot read key file") && e.contains("missing.key"), "{e}");

    // The API's address already taken.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut cfg = config(d.path(), "");
    cfg.api.listen = busy.local_addr().unwrap().to_string();
    let e = daemon::run(cfg, true).unwrap_err().to_string();
    assert!(e.contains("api: api.listen 127.0.0.1:") && e.contains("in use"), "{e}");
}

#[test]
fn a_hundred_boots_in_a_row() {
    let d = tempfile::tempdir().unwrap();
    let mut worst = 0f64;
    for i in 0..100 {
        let dm = daemon::run(config(d.path(), ""), true).unwrap_or_else(|e| panic!("boot {i}: {e}"));
        assert!(dm.state.ready.load(std::sync::atomic::Ordering::Relaxed));
        worst = worst.max(*dm.state.boot_ms.lock().unwrap());
        dm.shutdown();
    }
    eprintln!("100 boots, slowest {worst:.1} ms");
}
