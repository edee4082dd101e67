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

/// One HTTP/1.0 request on a Unix socket: status code and JSON body.
fn unix_http(sock: &Path, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    write!(s, "{method} {path} HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, serde_json::from_str(out.split_once("\r\n\r\n").map_or("", |x| x.1)).unwrap())
}

/// Polls transfer `id` until `until` holds of it (30 s at most).
fn watch(sock: &Path, id: u64, until: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let t = Instant::now();
    loop {
        let (code, j) = unix_http(sock, "GET", &format!("/transfers/{id}"), "");
        assert_eq!(code, 200, "{j}");
        if until(&j) {
            return j;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "transfer {id} never got there: {j}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The daemon starts a transfer through the same engine as `dwcp send` (here to its own
/// listener): planned, watched while it runs, verified and published byte-exact; a cancelled
/// one publishes nothing; a request with a misspelt field is refused by name; the socket is
/// the owner's only.
#[test]
fn the_daemon_runs_transfers_through_the_engine() {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::tempdir().unwrap();
    let sock = d.path().join("dwcp.sock");
    let cfg = config(d.path(), "");
    let mut cfg = cfg;
    cfg.api.socket = Some(sock.clone());
    let dm = daemon::run(cfg, true).expect("boot");
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the jobs socket is the owner's only");
    let to = dm.state.listener.get().unwrap().to_string();

    let (code, j) = unix_http(&sock, "POST", "/transfers", &format!(r#"{{"to":"{to}","source":"gen:8MiB:7","name":"job.img","streams":2}}"#));
    assert_eq!(code, 202, "{j}");
    let id = j["id"].as_u64().unwrap();
    let j = watch(&sock, id, |j| j["state"] != "starting" && j["state"] != "running");
    assert_eq!(j["state"], "verified", "{j}");
    assert_eq!(j["result"]["plan"]["streams"], 2, "the plan the engine made: {j}");
    assert_eq!(j["result"]["mode"]["initial"], "datacenter", "{j}");
    // ITP placed it: loopback has no NUMA node, so the least loaded node, every core of it.
    let host = dm.state.host.get().unwrap();
    let p = &j["placement"];
    assert!(p["why"].as_str().unwrap().contains("lo has no NUMA node"), "{j}");
    assert_eq!(p["node"].as_u64(), host.numa.first().map(|n| n.os_index as u64), "{j}");
    let placed: Vec<u64> = p["cores"].as_array().unwrap().iter().map(|c| c.as_u64().unwrap()).collect();
    assert_eq!(placed.len(), host.numa.first().map_or(0, |n| n.cpus.len()), "{j}");
    let mut want = vec![0u8; 8 << 20];
    dataplane::source::generate(7, 0, &mut want);
    assert!(std::fs::read(d.path().join("out/job.img")).unwrap() == want, "published byte-exact");
    let api = *dm.state.api.get().unwrap();
    let metric = |name: &str, id: u64| -> Option<(String, f64)> {
        let (_, m) = get(api, "/metrics");
        m.lines().filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(&format!("id=\"{id}\""))).find_map(|l| {
            let (labels, v) = l.rsplit_once(' ')?;
            Some((labels.to_owned(), v.parse().ok()?))
        })
    };
    let (labels, acked) = metric("dwcp_transfer_acked_bytes", id).expect("a metric for the transfer");
    assert!(labels.contains("name=\"job.img\"") && labels.contains("state=\"verified\""), "{labels}");
    assert_eq!(acked, f64::from(8u32 << 20), "{labels}");
    assert_eq!(metric("dwcp_transfer_total_bytes", id).map(|m| m.1), Some(f64::from(8u32 << 20)));

    // Cancelled while it runs: nothing published, and the job says so.
    let (code, j) = unix_http(&sock, "POST", "/transfers", &format!(r#"{{"to":"{to}","source":"gen:4GiB","name":"big.img","streams":1}}"#));
    assert_eq!(code, 202, "{j}");
    let id = j["id"].as_u64().unwrap();
    let running = watch(&sock, id, |j| j["state"] == "running" && j["acked_bytes"].as_u64().unwrap_or(0) > 0);
    // Its one stream holds one core; a transfer placed meanwhile starts on another one.
    let jobs = dm.state.jobs.get().unwrap();
    let first_core = running["placement"]["cores"][0].as_u64().unwrap() as usize;
    assert_eq!(jobs.load(), [(first_core, 1)].into_iter().collect(), "{running}");
    let (_, j) = unix_http(&sock, "POST", "/transfers", &format!(r#"{{"to":"{to}","source":"gen:1MiB","name":"beside.img","streams":1}}"#));
    let beside = watch(&sock, j["id"].as_u64().unwrap(), |j| j["state"] != "starting" && j["state"] != "running");
    assert_eq!(beside["state"], "verified", "{beside}");
    if placed.len() > 1 {
        assert_ne!(beside["placement"]["cores"][0].as_u64().unwrap() as usize, first_core, "{beside}");
    }
    // Its metric moves with the bytes, not only at the end.
    let (labels, first) = metric("dwcp_transfer_acked_bytes", id).expect("a metric for the running transfer");
    assert!(labels.contains("state=\"running\"") && first > 0.0, "{labels} {first}");
    let t = Instant::now();
    while metric("dwcp_transfer_acked_bytes", id).is_some_and(|m| m.1 <= first) {
        assert!(t.elapsed() < Duration::from_secs(10), "the metric stayed at {first}");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(unix_http(&sock, "DELETE", &format!("/transfers/{id}"), "").0, 202);
    let j = watch(&sock, id, |j| j["state"] != "running");
    assert_eq!(j["state"], "cancelled", "{j}");
    assert!(j["result"]["error"].as_str().unwrap().contains("nothing was published"), "{j}");
    std::thread::sleep(Duration::from_millis(300));
    assert!(!d.path().join("out/big.img").exists(), "a cancelled transfer publishes nothing");

    // Bad requests are named.
    let (code, j) = unix_http(&sock, "POST", "/transfers", r#"{"to":"x:1","source":"gen:1MiB","stream":2}"#);
    assert_eq!(code, 400);
    assert!(j["error"].as_str().unwrap().contains("unknown field `stream`"), "{j}");
    let (code, j) = unix_http(&sock, "POST", "/transfers", &format!(r#"{{"to":"{to}","source":"gen:1MiB","deadline_s":-1}}"#));
    assert_eq!(code, 400);
    assert!(j["error"].as_str().unwrap().contains("deadline_s is a number of seconds above 0"), "{j}");
    let (code, j) = unix_http(&sock, "POST", "/transfers", &format!(r#"{{"to":"{to}","source":"-"}}"#));
    assert_eq!(code, 400);
    assert!(j["error"].as_str().unwrap().contains("no standard input"), "{j}");
    let (_, list) = unix_http(&sock, "GET", "/transfers", "");
    assert_eq!(list.as_array().unwrap().len(), 3, "{list}");
    let (_, status) = get(*dm.state.api.get().unwrap(), "/status");
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["transfers"].as_array().map(Vec::len), Some(3), "/status lists the daemon's transfers: {status}");
    let (_, m) = get(api, "/metrics");
    assert!(m.contains("dwcp_transfers{state=\"verified\"} 2") && m.contains("dwcp_transfers{state=\"cancelled\"} 1"), "{m}");
    assert!(dm.state.jobs.get().unwrap().load().is_empty(), "every ended transfer gave its cores back");
    dm.shutdown();
    assert!(!sock.exists(), "the socket goes with the daemon");
}

/// An HTTP/1.0 `GET /transfers/ID/events` on the jobs socket: the status code, and the stream
/// positioned at the first event line.
fn events(sock: &Path, id: u64) -> (u16, std::io::BufReader<std::os::unix::net::UnixStream>) {
    use std::io::BufRead;
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(s, "GET /transfers/{id}/events HTTP/1.0\r\n\r\n").unwrap();
    let mut r = std::io::BufReader::new(s);
    let mut l = String::new();
    r.read_line(&mut l).unwrap();
    let code = l.split_whitespace().nth(1).unwrap().parse().unwrap();
    while {
        l.clear();
        r.read_line(&mut l).unwrap() > 0 && l != "\r\n"
    } {}
    (code, r)
}

fn next_event(r: &mut impl std::io::BufRead) -> serde_json::Value {
    let mut l = String::new();
    assert!(r.read_line(&mut l).unwrap() > 0, "the event stream ended early");
    serde_json::from_str(&l).unwrap()
}

/// A transfer followed as a stream of events: its state, then its progress as it moves (read
/// while it still runs, not gathered until the end), then its end; at most `MAX_WATCHERS`
/// streams are open at once, the next is refused with the reason; an unknown transfer is named.
#[test]
fn a_transfer_is_followed_as_a_stream_of_events_and_watchers_are_bounded() {
    let d = tempfile::tempdir().unwrap();
    let sock = d.path().join("dwcp.sock");
    let mut cfg = config(d.path(), "");
    cfg.api.socket = Some(sock.clone());
    let psk = Psk::from_file(&d.path().join("key")).unwrap();
    let rx = dataplane::recv::start(dataplane::recv::RecvOptions::new("127.0.0.1:0", dataplane::recv::Sink::Discard, psk)).unwrap();
    let dm = daemon::run(cfg, true).expect("boot");
    let (code, j) = unix_http(&sock, "POST", "/transfers", &format!(r#"{{"to":"{}","source":"gen:64GiB","name":"ev.img","streams":1}}"#, rx.local_addr));
    assert_eq!(code, 202, "{j}");
    let id = j["id"].as_u64().unwrap();
    let (code, mut r) = events(&sock, id);
    assert_eq!(code, 200);
    let first = next_event(&mut r);
    assert_eq!(first["event"], "state", "{first}");
    let mut progress = Vec::new();
    while progress.len() < 3 {
        let e = next_event(&mut r);
        if e["event"] == "progress" && e["acked_bytes"].as_u64().unwrap() > 0 {
            // Streamed as it happens: the transfer still runs when its progress arrives.
            assert_eq!(unix_http(&sock, "GET", &format!("/transfers/{id}"), "").1["state"], "running");
            progress.push(e);
        }
    }
    let acked: Vec<u64> = progress.iter().map(|e| e["acked_bytes"].as_u64().unwrap()).collect();
    assert!(acked.windows(2).all(|w| w[0] < w[1]), "bytes move between events: {acked:?}");
    assert!(progress[2]["bps"].as_f64().unwrap() > 0.0 && progress[2]["total_bytes"] == 64u64 << 30, "{}", progress[2]);

    let mut open: Vec<_> = (1..ctlplane::jobs::MAX_WATCHERS).map(|_| events(&sock, id)).collect();
    assert!(open.iter().all(|(c, _)| *c == 200));
    let (code, mut over) = events(&sock, id);
    assert_eq!(code, 503, "one event stream more than allowed");
    let mut body = String::new();
    over.read_to_string(&mut body).unwrap();
    assert!(body.contains("event streams are open"), "{body}");
    // The cancel ends every stream with the transfer's end.
    assert_eq!(unix_http(&sock, "DELETE", &format!("/transfers/{id}"), "").0, 202);
    let end = loop {
        let e = next_event(&mut r);
        if e["event"] != "progress" {
            break e;
        }
    };
    assert_eq!(end["event"], "ended", "{end}");
    assert_eq!(end["job"]["state"], "cancelled", "{end}");
    for (_, o) in &mut open {
        let mut rest = String::new();
        o.read_to_string(&mut rest).unwrap();
        assert!(rest.lines().last().is_some_and(|l| l.contains(r#""event":"ended""#)), "{rest}");
    }
    open.clear();
    // The streams' threads are given back: a new one opens, and an ended transfer's ends at once.
    let t = Instant::now();
    let (code, mut again) = loop {
        let (code, r) = events(&sock, id);
        if code == 200 || t.elapsed() > Duration::from_secs(5) {
            break (code, r);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(code, 200);
    assert_eq!(next_event(&mut again)["event"], "ended");
    let (code, _) = events(&sock, 999);
    assert_eq!(code, 404, "an unknown transfer is named");
    dm.shutdown();
}
