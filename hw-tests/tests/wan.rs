//! WAN emulator validation against physics and against the kernel's real netem (in the
//! soft-RoCE guest, whose Debian kernel has sch_netem): ping RTT within 5% of the setting,
//! `iperf3 -P 8` within 5% of a limited rate, one cubic stream under random loss within 30% of
//! the Mathis bound, and the emulator's CPU cost at 1 Gbit/s. Figures go to `target/rigs/wan.json`.
//!
//! Needs root, iproute2, iputils-ping and iperf3 (`make vm-deps`); the guest part needs the
//! soft-RoCE guest's packages too.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{Value, json};

/// Rig tests share namespaces and the two cores: one at a time.
static RIG: Mutex<()> = Mutex::new(());

const MSS: f64 = 1448.0;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace").to_owned()
}

fn require() {
    let uid = Command::new("id").arg("-u").output().expect("id");
    assert_eq!(String::from_utf8_lossy(&uid.stdout).trim(), "0", "the WAN emulator needs root (namespaces, TUN devices)");
    for tool in ["ip", "ping", "iperf3"] {
        let ok = Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().expect("sh").status.success();
        assert!(ok, "{tool} is missing: run `make vm-deps`");
    }
}

fn record(key: &str, v: Value) {
    let dir = root().join("target/rigs");
    std::fs::create_dir_all(&dir).expect("target/rigs");
    let path = dir.join("wan.json");
    let mut all: serde_json::Map<String, Value> = std::fs::read(&path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
    all.insert(key.into(), v);
    std::fs::write(&path, serde_json::to_string_pretty(&all).expect("json")).expect("write wan.json");
}

struct Wan;

impl Wan {
    fn up(args: &[&str]) -> Wan {
        let out = Command::new(root().join("hw-tests/wan")).arg("up").args(args).output().expect("hw-tests/wan up");
        assert!(out.status.success(), "wan up failed: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "10.77.0.1 10.77.0.2");
        Wan
    }
    fn set(&self, args: &[&str]) {
        let out = Command::new(root().join("hw-tests/wan")).arg("set").args(args).output().expect("hw-tests/wan set");
        assert!(out.status.success(), "wan set failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    fn stats(&self) -> Value {
        let out = Command::new(root().join("hw-tests/wan")).arg("stats").output().expect("wan stats");
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }
}

impl Drop for Wan {
    fn drop(&mut self) {
        let _ = Command::new(root().join("hw-tests/wan")).arg("down").status();
    }
}

fn ns(name: &str, cmd: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", name]).args(cmd);
    c
}

/// Median ping RTT in ms, from the per-reply `time=` fields (a median, so one reply delayed by
/// the emulated guest's scheduling does not move the figure).
fn parse_ping_avg(text: &str) -> f64 {
    let mut t: Vec<f64> = text.split_whitespace().filter_map(|w| w.strip_prefix("time=")).filter_map(|v| v.parse().ok()).collect();
    assert!(t.len() >= 5, "too few ping replies:\n{text}");
    t.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    t[t.len() / 2]
}

/// iperf3 JSON: (received bit/s, sender retransmits).
fn parse_iperf(v: &Value) -> (f64, u64) {
    let e = &v["end"];
    (e["sum_received"]["bits_per_second"].as_f64().unwrap_or(0.0), e["sum_sent"]["retransmits"].as_u64().unwrap_or(0))
}

fn iperf_between(client_ns: &str, server_ns: &str, server_ip: &str, args: &[&str]) -> Value {
    let mut srv = ns(server_ns, &["iperf3", "-s", "-1", "-p", "5301"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("iperf3 -s");
    std::thread::sleep(Duration::from_millis(400));
    let mut a = vec!["iperf3", "-c", server_ip, "-p", "5301", "-J"];
    a.extend_from_slice(args);
    let out = ns(client_ns, &a).output().expect("iperf3 -c");
    let _ = srv.wait();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("iperf3 output: {}", String::from_utf8_lossy(&out.stdout)))
}

/// TCP payload rate a link of `rate` IP bit/s can carry: each 1500-byte packet holds 1448 bytes
/// of payload (20 IP + 32 TCP header bytes with timestamps). netem and real links count the same.
fn payload_ceiling(rate: f64) -> f64 {
    rate * MSS / 1500.0
}

fn mathis_bps(rtt_s: f64, p: f64) -> f64 {
    MSS * 8.0 / rtt_s * 1.22 / p.sqrt()
}

#[test]
fn emulator_matches_physics_on_the_host() {
    let _g = RIG.lock().unwrap_or_else(|e| e.into_inner());
    require();
    // 1. RTT.
    let w = Wan::up(&["--rtt", "50ms", "--rate", "1gbit"]);
    let out = ns("dwcp-a", &["ping", "-c", "20", "-i", "0.05", "10.77.0.2"]).output().expect("ping");
    let avg = parse_ping_avg(&String::from_utf8_lossy(&out.stdout));
    assert!((avg - 50.0).abs() <= 2.5, "ping RTT {avg} ms is not within 5% of 50 ms");
    drop(w);

    // 2. Rate: 8 streams through 1 Gbit/s, 20 ms; goodput within 5% of the rate (IP bytes count on
    // the link, so TCP payload can reach 1448/1500 of it at most).
    let w = Wan::up(&["--rtt", "20ms", "--rate", "1gbit"]);
    let s0 = w.stats();
    let v = iperf_between("dwcp-a", "dwcp-b", "10.77.0.2", &["-P", "8", "-t", "10", "-O", "3"]);
    let s1 = w.stats();
    let (bps, retr) = parse_iperf(&v);
    let cpu = s1["cpu_s"].as_f64().unwrap_or(0.0) - s0["cpu_s"].as_f64().unwrap_or(0.0);
    let secs = s1["uptime_s"].as_f64().unwrap_or(1.0) - s0["uptime_s"].as_f64().unwrap_or(0.0);
    let cpu_share = cpu / secs;
    eprintln!("emulator CPU at 1 Gbit/s: {:.1}% of one core ({cpu:.2} s over {secs:.1} s)", cpu_share * 100.0);
    assert!((bps / payload_ceiling(1e9) - 1.0).abs() <= 0.05, "iperf3 -P 8 moved {:.1} Mbit/s through a 1 Gbit/s link", bps / 1e6);
    drop(w);

    // 3. Mathis: one cubic stream, 40 ms, 0.5% loss each way.
    let (rtt, p) = (0.040, 0.005);
    let w = Wan::up(&["--rtt", "40ms", "--rate", "1gbit", "--loss", "0.5%"]);
    let v2 = iperf_between("dwcp-a", "dwcp-b", "10.77.0.2", &["-C", "cubic", "-t", "20", "-O", "2"]);
    let (one, _) = parse_iperf(&v2);
    let bound = mathis_bps(rtt, p);
    let st = w.stats();
    drop(w);
    let ratio = one / bound;
    let fig = json!({
        "ping_rtt_ms_set": 50, "ping_rtt_ms_median": avg,
        "iperf3_p8_rate_bps": 1e9, "iperf3_p8_goodput_bps": bps, "payload_ceiling_bps": payload_ceiling(1e9), "iperf3_p8_retransmits": retr,
        "mathis_rtt_ms": 40, "mathis_loss": p, "mathis_bound_bps": bound, "cubic_one_stream_bps": one, "cubic_over_mathis": ratio,
        "emulator_cpu_share_at_1gbit": cpu_share, "segments_lost": st["a_to_b"]["lost"],
    });
    eprintln!("WAN emulator on the host: {fig}");
    record("host_emulator", fig);
    assert!((0.7..=1.3).contains(&ratio), "one cubic stream at {:.2} Mbit/s is not within 30% of the Mathis bound {:.2} Mbit/s", one / 1e6, bound / 1e6);
}

/// The same three checks at a low rate, side by side: the emulator on the host, and the real netem
/// on veth in the guest (Debian's kernel).
#[test]
fn emulator_and_real_netem_side_by_side_at_low_rate() {
    let _g = RIG.lock().unwrap_or_else(|e| e.into_inner());
    require();
    let (rate, rtt_ms, p) = ("20mbit", 40.0, 0.005);
    // Host, our emulator. Both sides compare the RTT the link adds: the ping over the same path
    // with no delay configured is subtracted (under software emulation the guest alone adds
    // several milliseconds of its own).
    let w = Wan::up(&["--rtt", "0ms"]);
    let base_host = parse_ping_avg(&String::from_utf8_lossy(&ns("dwcp-a", &["ping", "-c", "20", "-i", "0.05", "10.77.0.2"]).output().expect("ping").stdout));
    drop(w);
    let w = Wan::up(&["--rtt", "40ms", "--rate", rate]);
    let ping_host = parse_ping_avg(&String::from_utf8_lossy(&ns("dwcp-a", &["ping", "-c", "20", "-i", "0.05", "10.77.0.2"]).output().expect("ping").stdout));
    let (rate_host, _) = parse_iperf(&iperf_between("dwcp-a", "dwcp-b", "10.77.0.2", &["-P", "8", "-t", "10", "-O", "3"]));
    drop(w);
    let w = Wan::up(&["--rtt", "40ms", "--rate", "1gbit", "--loss", "0.5%"]);
    let (one_host, _) = parse_iperf(&iperf_between("dwcp-a", "dwcp-b", "10.77.0.2", &["-C", "cubic", "-t", "20", "-O", "2"]));
    drop(w);

    // Guest, real netem on a veth pair between two namespaces (delay split over both ends).
    let script = r#"set -e
ip netns add a; ip netns add b
ip link add va netns a type veth peer name vb netns b
ip -n a addr add 10.88.0.1/24 dev va; ip -n b addr add 10.88.0.2/24 dev vb
ip -n a link set va up; ip -n b link set vb up; ip -n a link set lo up; ip -n b link set lo up
ip netns exec a ethtool -K va tso off gso off gro off >/dev/null 2>&1 || true
ip netns exec b ethtool -K vb tso off gso off gro off >/dev/null 2>&1 || true
modprobe sch_netem
q() { ip netns exec a tc qdisc replace dev va root netem $1; ip netns exec b tc qdisc replace dev vb root netem $1; }
echo ===BASE===; ip netns exec a ping -c 20 -i 0.05 10.88.0.2
q "delay 20ms rate 20mbit limit 200"
echo ===PING===; ip netns exec a ping -c 20 -i 0.05 10.88.0.2
ip netns exec b iperf3 -s -1 -p 5301 >/dev/null 2>&1 & sleep 1
echo ===RATE===; ip netns exec a iperf3 -c 10.88.0.2 -p 5301 -P 8 -t 10 -O 3 -J; wait
q "delay 20ms loss 0.5% limit 10000"
ip netns exec b iperf3 -s -1 -p 5301 >/dev/null 2>&1 & sleep 1
echo ===LOSS===; ip netns exec a iperf3 -c 10.88.0.2 -p 5301 -C cubic -t 20 -O 2 -J; wait
"#;
    let out = Command::new(root().join("hw-tests/vm")).args(["run", "--timeout", "300", "--", "sh", "-c", script]).output().expect("hw-tests/vm");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "netem run in the guest failed:\n{text}\n{}", String::from_utf8_lossy(&out.stderr));
    let part = |a: &str, b: Option<&str>| -> String {
        let s = text.split(a).nth(1).unwrap_or_default();
        b.map_or(s, |b| s.split(b).next().unwrap_or_default()).to_owned()
    };
    let base_guest = parse_ping_avg(&part("===BASE===", Some("===PING===")));
    let ping_guest = parse_ping_avg(&part("===PING===", Some("===RATE===")));
    let (rate_guest, _) = parse_iperf(&serde_json::from_str(&part("===RATE===", Some("===LOSS==="))).expect("iperf3 json (rate)"));
    let (one_guest, _) = parse_iperf(&serde_json::from_str(&part("===LOSS===", None)).expect("iperf3 json (loss)"));
    let bound = mathis_bps(rtt_ms / 1e3, p);
    let fig = json!({
        "rate_bps": 20e6, "rtt_ms": rtt_ms, "loss": p, "mathis_bound_bps": bound,
        "emulator": {"ping_ms": ping_host, "ping_base_ms": base_host, "iperf3_p8_bps": rate_host, "cubic_one_stream_bps": one_host},
        "netem_in_guest": {"ping_ms": ping_guest, "ping_base_ms": base_guest, "iperf3_p8_bps": rate_guest, "cubic_one_stream_bps": one_guest},
    });
    eprintln!("side by side at a low rate: {fig}");
    record("side_by_side_low_rate", fig);
    // Our emulator must pass all three checks. Real netem is the reference: its RTT and rate must
    // pass too; its cubic-versus-Mathis figure is recorded side by side and only bounded loosely,
    // because in this emulated guest it spread from 1.01 to 1.60 of the bound across our runs
    // (timer granularity under TCG; 1.60 in one CI run of the eleventh session), while the
    // emulator stayed at 1.05. For the same reason its RTT gets 10% (one CI run measured 42.2 ms
    // for 40 under TCG); the emulator's stays at 5%. Bounds on cubic / Mathis: (low, high).
    for (who, ping, r, one, (lo, hi), rtt_tol) in
        [("emulator", ping_host - base_host, rate_host, one_host, (0.7, 1.3), 0.05), ("netem", ping_guest - base_guest, rate_guest, one_guest, (0.4, 2.0), 0.10)]
    {
        assert!((ping - rtt_ms).abs() <= rtt_ms * rtt_tol, "{who}: the link adds {ping:.2} ms of RTT, set {rtt_ms} ms");
        assert!((r / payload_ceiling(20e6) - 1.0).abs() <= 0.05, "{who}: iperf3 -P 8 at {:.2} Mbit/s vs 20", r / 1e6);
        assert!((lo..=hi).contains(&(one / bound)), "{who}: cubic {:.2} Mbit/s vs Mathis {:.2}", one / 1e6, bound / 1e6);
    }
}

/// Mode detection end to end: a daemon in `dwcp-a` probing one peer across the emulated WAN
/// (30 ms) and one on its own loopback calls the first internet, the second datacenter, and the
/// cluster hybrid.
#[test]
fn daemon_detects_modes_over_the_wan_rig() {
    let _g = RIG.lock().unwrap_or_else(|e| e.into_inner());
    require();
    let (dwcp, dir, key) = dwcp_dir_and_key();
    let w = Wan::up(&["--rtt", "30ms", "--rate", "1gbit"]);
    let mut kids = Vec::new();
    let d = dwcp.to_str().unwrap();
    let k = key.to_str().unwrap();
    kids.push(ns("dwcp-b", &[d, "recv", "--listen", "10.77.0.2:7470", "--discard", "--key-file", k]).stderr(Stdio::null()).spawn().unwrap());
    kids.push(ns("dwcp-a", &[d, "recv", "--listen", "127.0.0.1:7472", "--discard", "--key-file", k]).stderr(Stdio::null()).spawn().unwrap());
    let cfg = dir.join("d.toml");
    std::fs::write(
        &cfg,
        format!(
            "[node]\nlisten = \"0.0.0.0:7470\"\nout = \"{}\"\nkey_file = \"{k}\"\n[api]\nlisten = \"127.0.0.1:7481\"\n\
             [mode]\nprobe_interval_s = 0.2\nconfirm = 3\nmin_dwell_s = 0\n\
             [[peers]]\nname = \"far\"\naddr = \"10.77.0.2:7470\"\n[[peers]]\nname = \"near\"\naddr = \"127.0.0.1:7472\"\n",
            dir.join("out").display()
        ),
    )
    .unwrap();
    kids.push(ns("dwcp-a", &[d, "daemon", "--config", cfg.to_str().unwrap()]).stderr(Stdio::null()).spawn().unwrap());
    let t = std::time::Instant::now();
    let status = loop {
        std::thread::sleep(Duration::from_millis(300));
        let out = ns("dwcp-a", &[d, "status", "--api", "127.0.0.1:7481", "--json"]).output().unwrap();
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        if v["cluster_mode"] == "hybrid" || t.elapsed() > Duration::from_secs(15) {
            break v;
        }
    };
    // A live transfer from the far peer refreshes its mode with the goodput it reached.
    let sent = ns("dwcp-b", &[d, "send", "gen:24M", "--to", "10.77.0.1:7470", "--key-file", k]).output().unwrap();
    assert!(sent.status.success(), "{}", String::from_utf8_lossy(&sent.stderr));
    std::thread::sleep(Duration::from_millis(700));
    let out = ns("dwcp-a", &[d, "status", "--api", "127.0.0.1:7481", "--json"]).output().unwrap();
    let status: Value = serde_json::from_slice(&out.stdout).unwrap_or(status);
    for mut c in kids {
        let _ = c.kill();
        let _ = c.wait();
    }
    drop(w);
    eprintln!("mode detection over the WAN rig: {}", status["peers"]);
    record("mode_detection", status["peers"].clone());
    let peer = |n: &str| status["peers"].as_array().and_then(|a| a.iter().find(|p| p["name"] == n).cloned()).unwrap_or(Value::Null);
    assert_eq!(peer("far")["mode"], "internet", "{status}");
    assert_eq!(peer("near")["mode"], "datacenter", "{status}");
    let far_rtt = peer("far")["last_rtt_ms"]["Ok"].as_f64().unwrap_or(0.0);
    assert!((28.0..40.0).contains(&far_rtt), "far RTT {far_rtt} ms over a 30 ms link");
    assert_eq!(status["cluster_mode"], "hybrid");
    let far_gbps = peer("far")["last_goodput_gbps"].as_f64().unwrap_or(0.0);
    assert!(far_gbps > 0.0 && far_gbps <= 1.0, "far goodput {far_gbps} Gbit/s through a 1 Gbit/s link");
    // Each peer carries its own mode's defaults (hybrid: per peer).
    assert_eq!(peer("far")["defaults"]["encrypt"], true);
    assert_eq!(peer("near")["defaults"]["encrypt"], false);
    assert!(peer("far")["defaults"]["streams"].as_u64().unwrap() >= 4, "30 ms of RTT adds streams");
}

#[test]
fn send_switches_mode_live_when_the_path_changes() {
    let _g = RIG.lock().unwrap_or_else(|e| e.into_inner());
    require();
    let (dwcp, dir, key) = dwcp_dir_and_key();
    // Bandwidth alone never votes internet here (this shared machine may run the datacenter
    // phase slower than the default 1 Gbit/s threshold); the RTT decides.
    let cfg = dir.join("send.toml");
    std::fs::write(&cfg, "[mode]\ninet_max_bw_gbps = 0.05\ndc_min_bw_gbps = 0.1\n").unwrap();
    // A 1 MB queue: fewer drops in the fast phase (TCP would otherwise leave it with a small
    // ssthresh and climb slowly on the long path), at most 4 ms of queueing (in the dead band).
    let w = Wan::up(&["--rtt", "200us", "--rate", "2gbit", "--queue", "1000000"]);
    let (d, k) = (dwcp.to_str().unwrap(), key.to_str().unwrap());
    let mut rx = ns("dwcp-b", &[d, "recv", "--listen", "10.77.0.2:7470", "--discard", "--key-file", k]).stderr(Stdio::null()).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let tx = ns("dwcp-a", &[d, "send", "gen:512M", "--json", "--to", "10.77.0.2:7470", "--key-file", k, "--config", cfg.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The path turns from a short, fat one into a 40 ms, 500 Mbit/s one mid-transfer.
    std::thread::sleep(Duration::from_millis(1500));
    w.set(&["--rtt", "40ms", "--rate", "500mbit"]);
    let out = tx.wait_with_output().unwrap();
    let _ = rx.kill();
    let _ = rx.wait();
    drop(w);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let j: Value = serde_json::from_slice(&out.stdout).expect("send --json");
    eprintln!("live switch: {}", j["mode"]);
    record("live_switch", j["mode"].clone());
    assert_eq!(j["verified"], true, "the transfer survived the switch: {j}");
    assert_eq!(j["streams_lost"], 0, "{j}");
    let m = &j["mode"];
    assert_eq!(m["initial"], "datacenter", "{m}");
    let sw = m["switches"].as_array().expect("switches");
    assert_eq!(sw.len(), 1, "one switch, no flapping: {m}");
    assert_eq!((sw[0]["from"].as_str(), sw[0]["to"].as_str()), (Some("datacenter"), Some("internet")), "{m}");
    let at = sw[0]["at_s"].as_f64().unwrap();
    assert!((1.5..6.0).contains(&at), "switched {at} s in; the path changed at 1.5 s: {m}");
    assert!(sw[0]["rtt_ms"].as_f64().unwrap() >= 10.0, "{m}");
    assert!(sw[0]["active"].as_u64().unwrap() > m["active"].as_u64().unwrap(), "the long path unparks streams: {m}");
}

/// The built dwcp binary, a fresh directory, and a key in it.
fn dwcp_dir_and_key() -> (PathBuf, PathBuf, PathBuf) {
    let dwcp = root().join("target/release/dwcp");
    assert!(dwcp.exists(), "{} missing: cargo build --release -p dwcp", dwcp.display());
    let dir = tempfile_dir();
    let key = dir.join("key");
    assert!(Command::new(&dwcp).args(["keygen", "--force"]).arg(&key).stderr(Stdio::null()).status().unwrap().success());
    (dwcp, dir, key)
}

fn tempfile_dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("dwcp-wan-mode-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The eBPF probes see a real transfer of dwcp's streams over a lossy link (retransmits arrive
/// as ring-buffer events, bounded by TCP's own count), ACP paces it (the trace records a pace
/// from the first round trips on), and the same transfer with `--monitor poll` reports the
/// fallback by name. Both are verified end to end.
#[test]
fn probes_and_acp_on_a_lossy_link() {
    let _g = RIG.lock().unwrap_or_else(|e| e.into_inner());
    require();
    let (dwcp, dir, key) = dwcp_dir_and_key();
    let _w = Wan::up(&["--rtt", "30ms", "--rate", "200mbit", "--loss", "0.5%", "--queue", "1bdp"]);
    let (d, k) = (dwcp.to_str().unwrap(), key.to_str().unwrap());
    let mut rx = ns("dwcp-b", &[d, "recv", "--listen", "10.77.0.2:7470", "--discard", "--no-encrypt", "--key-file", k]).stderr(Stdio::null()).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let send = |monitor: &str, trace: &Path| {
        let iw = if monitor == "auto" { "auto" } else { "off" };
        let out = ns(
            "dwcp-a",
            &[
                d,
                "send",
                "gen:96M",
                "--name",
                monitor,
                "--json",
                "--to",
                "10.77.0.2:7470",
                "--key-file",
                k,
                "--no-encrypt",
                "--mode",
                "internet",
                "--streams",
                "4",
                "--acp",
                "delay",
                "--monitor",
                monitor,
                "--initial-window",
                iw,
                "--trace-out",
                trace.to_str().unwrap(),
            ],
        )
        .output()
        .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let j: Value = serde_json::from_slice(&out.stdout).expect("send --json");
        assert_eq!(j["verified"], true, "{j}");
        j
    };
    let (ta, tp) = (dir.join("auto.csv"), dir.join("poll.csv"));
    let a = send("auto", &ta);
    let p = send("poll", &tp);
    let _ = rx.kill();
    let _ = rx.wait();
    let (ca, cp) = (&a["control"], &p["control"]);
    eprintln!("probes: {ca}\npolling: {cp}");
    record("probes_acp", serde_json::json!({"auto": ca, "poll": cp}));
    assert_eq!(ca["monitor"], "ebpf", "root loads the probes: {ca}");
    assert_eq!((ca["acp"].as_str(), ca["cc"].as_str()), (Some("delay"), Some("bbr")), "{ca}");
    // 96 MB at 200 Mbit/s take 3.8 s or more; the first of the four streams restarts at 2 s.
    assert!(ca["bbr_restarts"].as_u64().unwrap() >= 1, "BBR restarted under ACP: {ca}");
    let (retrans, events) = (ca["retrans"].as_u64().unwrap(), ca["probe_retransmit_events"].as_u64().unwrap());
    assert!(retrans > 0, "0.5% loss must cost retransmits: {ca}");
    assert!(events > 0 && events <= retrans, "one event per retransmitted skb (a GSO skb may hold several segments): {events} events, {retrans} segments");
    let min = ca["min_rtt_us"].as_f64().unwrap();
    assert!((29_000.0..40_000.0).contains(&min), "the probes' least RTT is the link's 30 ms: {min}");
    // `--initial-window auto` under ACP: the streams start with 64 KiB in segments of the link's
    // MSS, set by the sockops program from inside `ip netns exec` (no cgroup mount there); with
    // `off`, the kernel's.
    let w = &ca["initial_window"];
    assert_eq!((w["bytes"].as_u64(), w["applied"].as_u64(), w["refused"].as_u64()), (Some(65_536), Some(4), Some(0)), "{ca}");
    let segs = w["segments"].as_u64().unwrap();
    assert!((40..=50).contains(&segs), "64 KiB at the link's MSS: {segs} segments");
    // The startup window (ACP on BBR): every stream clamped while ACP was in startup, and
    // released when it paced (or when the send ended, at the latest).
    let sw = &ca["startup_window"];
    assert_eq!((sw["gain"].as_f64(), sw["clamped"].as_u64(), sw["released"].as_u64()), (Some(2.0), Some(4), Some(4)), "{ca}");
    assert!(sw["peak_segments"].as_u64().unwrap() >= segs, "the clamp is never below the first window: {sw}");
    assert!(cp["startup_window"].is_null(), "{cp}");
    assert!(cp["initial_window"].is_null() && cp["initial_window_degraded"].is_null(), "{cp}");
    assert_eq!(cp["monitor"], "tcp_info");
    assert!(cp["monitor_degraded"].as_str().unwrap().contains("polling TCP_INFO (asked for)"), "{cp}");
    assert!(cp["retrans"].as_u64().unwrap() > 0, "polling sees retransmits too: {cp}");
    for t in [&ta, &tp] {
        let text = std::fs::read_to_string(t).unwrap();
        let rows: Vec<Vec<f64>> = text.lines().skip(1).map(|l| l.split(',').map(|v| v.parse().unwrap()).collect()).collect();
        assert!(rows.len() >= 5, "{}: {} intervals", t.display(), rows.len());
        assert!(rows.iter().any(|r| r[8] > 0.0), "ACP set a pace: {}", t.display());
        assert!(rows.iter().all(|r| r[2] >= 0.0 && r[2] < 400e6), "goodput above the 200 Mbit/s link: {}", t.display());
    }
}

/// A link that reorders (1%: a reordered packet skips the 50 ms delay, as netem's do) hands the
/// kernel RTT samples of a fraction of the path's. ACP must find its least RTT implausible, move
/// the streams to the rate congestion control (`ebpf::RateCc`, registered under the sender's own
/// name) and pace them from then on; the object arrives verified. Functional: how fast is
/// `make bench-wan`'s `rough` section.
#[test]
fn acp_hands_the_windows_to_its_pace_on_a_reordering_link() {
    let _g = RIG.lock().unwrap_or_else(|e| e.into_inner());
    require();
    let (dwcp, dir, key) = dwcp_dir_and_key();
    let _w = Wan::up(&["--rtt", "50ms", "--rate", "1000mbit", "--loss", "0.1%", "--reorder", "1%", "--queue", "1bdp"]);
    let (d, k) = (dwcp.to_str().unwrap(), key.to_str().unwrap());
    let mut rx = ns("dwcp-b", &[d, "recv", "--listen", "10.77.0.2:7470", "--discard", "--no-encrypt", "--key-file", k]).stderr(Stdio::null()).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let trace = dir.join("reorder.csv");
    let out = ns(
        "dwcp-a",
        &[
            d,
            "send",
            "gen:400M",
            "--name",
            "reorder",
            "--json",
            "--to",
            "10.77.0.2:7470",
            "--key-file",
            k,
            "--no-encrypt",
            "--hde",
            "off",
            "--mode",
            "internet",
            "--streams",
            "4",
            "--trace-out",
            trace.to_str().unwrap(),
        ],
    )
    .output()
    .unwrap();
    let _ = rx.kill();
    let _ = rx.wait();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let j: Value = serde_json::from_slice(&out.stdout).expect("send --json");
    assert_eq!(j["verified"], true, "{j}");
    let c = &j["control"];
    eprintln!("control: {c}");
    record("acp_reorder", c.clone());
    assert_eq!(c["acp"], "delay", "{c}");
    let rate = c["rate_cc"].as_str().unwrap_or_else(|| panic!("the streams were not moved to the rate congestion control: {c}"));
    assert!(rate.starts_with("dwcp_rate"), "the switch failed: {rate}");
    assert!(c["min_rtt_us"].as_f64().unwrap() < 12_500.0, "the kernel's least RTT was not implausible here: {c}");
    // Paced from the switch on: every interval after it carries a pace.
    let at: f64 = rate.split(" from ").nth(1).and_then(|r| r.split(" s").next()).and_then(|v| v.parse().ok()).expect("switch time");
    let text = std::fs::read_to_string(&trace).unwrap();
    let rows: Vec<Vec<f64>> = text.lines().skip(1).map(|l| l.split(',').map(|v| v.parse().unwrap()).collect()).collect();
    let after: Vec<&Vec<f64>> = rows.iter().filter(|r| r[0] > at + 0.15).collect();
    assert!(!after.is_empty(), "no interval after the switch at {at} s");
    assert!(after.iter().all(|r| r[8] > 0.0), "an interval after the switch went unpaced");
}

/// PBA's stream trials on a path where the sender's buffers, not the link, hold the streams
/// back: 1 Gbit/s and 50 ms with the sender's `tcp_wmem` capped at 512 KiB (per namespace: what a
/// 10 Gbit/s path is to Linux's default 4 MiB, scaled to the rig's rate), so each stream carries
/// at most about 60 Mbit/s. ACP is off, so PBA alone adds streams; the trace must show more
/// active streams than the transfer started with, trials kept, and the transfer verified.
#[test]
fn pba_activates_streams_while_the_send_buffers_limit_them() {
    let _g = RIG.lock().unwrap_or_else(|e| e.into_inner());
    require();
    let (dwcp, dir, key) = dwcp_dir_and_key();
    let _w = Wan::up(&["--rtt", "50ms", "--rate", "1gbit", "--loss", "0%", "--queue", "1bdp"]);
    let st = ns("dwcp-a", &["sysctl", "-w", "net.ipv4.tcp_wmem=4096 16384 524288"]).stdout(Stdio::null()).status().unwrap();
    assert!(st.success(), "sysctl tcp_wmem in dwcp-a");
    let (d, k) = (dwcp.to_str().unwrap(), key.to_str().unwrap());
    let mut rx = ns("dwcp-b", &[d, "recv", "--listen", "10.77.0.2:7470", "--discard", "--no-encrypt", "--key-file", k]).stderr(Stdio::null()).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let trace = dir.join("pba.csv");
    let args = [
        d,
        "send",
        "gen:400M",
        "--name",
        "pba",
        "--json",
        "--to",
        "10.77.0.2:7470",
        "--key-file",
        k,
        "--no-encrypt",
        "--hde",
        "off",
        "--acp",
        "off",
        "--trace-out",
        trace.to_str().unwrap(),
    ];
    let out = ns("dwcp-a", &args).output().unwrap();
    let _ = rx.kill();
    let _ = rx.wait();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let j: Value = serde_json::from_slice(&out.stdout).expect("send --json");
    assert_eq!(j["verified"], true, "{j}");
    let (m, c) = (&j["mode"], &j["control"]);
    eprintln!("mode: {m}\ncontrol: {c}\nwall {} s", j["wall_s"]);
    let (opened, active) = (m["opened"].as_u64().unwrap(), m["active"].as_u64().unwrap());
    assert!(opened > active, "a 50 ms path opens room for PBA's trials: {m}");
    let kept = c["stream_trials"]["kept"].as_u64().unwrap();
    assert!(kept >= 1, "the send buffers held the streams back, and another stream carried more: {c}");
    let text = std::fs::read_to_string(&trace).unwrap();
    let most = text.lines().filter_map(dataplane::send::TraceRow::parse).map(|r| u64::from(r.active)).max().unwrap();
    assert!(most > active, "the trace shows {most} active streams at most, started with {active}");
    record("pba_stream_trials", serde_json::json!({"wall_s": j["wall_s"], "opened": opened, "started": active, "most_active": most, "trials": c["stream_trials"]}));
}
