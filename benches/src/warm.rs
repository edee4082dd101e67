//! `make bench-warm`: a transfer through a daemon with warm streams to its peer against a cold
//! `dwcp send`, on the WAN rig (`hw-tests/wan`, 1 Gbit/s) at 150 ms / 1% loss and 50 ms / 0.1%.
//! The daemon (in `dwcp-a`) has the receiver (in `dwcp-b`, discarding) as a configured peer, so
//! it keeps streams parked there (as many as a cold send opens on that path) (`ctlplane::warm`); each round sends the same objects both
//! ways, in turns: `dwcp send gen:SIZE` (probe, key exchanges, slow start: what a person or a
//! script gets today) and `dwcp send gen:SIZE --via-daemon` (a job on the warm streams). A
//! transfer's time is its command's, start to exit. Figures: the warm speedup on a 16 MiB
//! object (cold time over warm time, per round) and the warm 256 MiB transfer's time over its
//! floor (its bytes at the link's payload rate).
//!
//!   bench-warm [--rounds 3] [--profiles 150ms,50ms]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use benches::{Figure, Proc, Wan, die, in_ns};

const ADDR_B: &str = "10.77.0.2";
const MIB: u64 = 1 << 20;
const RATE_BPS: f64 = 1e9;
/// The share of the link TCP payload gets (headers, 1500-byte MTU), as measured on the rig.
const PAYLOAD: f64 = 0.956;
const API: &str = "127.0.0.1:7491";
/// How long the idle pool is watched (two keepalive rounds).
const IDLE: Duration = Duration::from_secs(45);

/// Runs `c` to its end: its wall time, or what it printed on failure.
fn timed(mut c: Command) -> Result<f64, String> {
    let t = Instant::now();
    let o = c.stdout(Stdio::null()).stderr(Stdio::piped()).output().map_err(|e| e.to_string())?;
    let s = t.elapsed().as_secs_f64();
    if o.status.success() { Ok(s) } else { Err(String::from_utf8_lossy(&o.stderr).into_owned()) }
}

/// Bytes the rig carried in both directions so far.
fn wire_bytes(root: &Path) -> u64 {
    let o = Command::new(root.join("hw-tests/wan")).arg("stats").output().expect("hw-tests/wan stats");
    let v: Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
    v["a_to_b"]["bytes"].as_u64().unwrap_or(0) + v["b_to_a"]["bytes"].as_u64().unwrap_or(0)
}

/// Kernel memory of the daemon's connections to the receiver (`ss -tm`: receive and send
/// buffers allocated and queued, forward allocation, options), bytes, and how many there are.
fn socket_memory(dwcp_a_dst: &str) -> (u64, usize) {
    let o = in_ns("dwcp-a", "ss").args(["-Htmn", "state", "established", "dst", dwcp_a_dst]).output().expect("ss");
    let text = String::from_utf8_lossy(&o.stdout);
    let mut total = 0;
    let mut n = 0;
    for sk in text.split("skmem:(").skip(1) {
        n += 1;
        let body = sk.split(')').next().unwrap_or("");
        for f in body.split(',') {
            let (k, v) = f.split_at(f.find(|c: char| c.is_ascii_digit()).unwrap_or(f.len()));
            if matches!(k, "r" | "t" | "f" | "w" | "o") {
                total += v.parse::<u64>().unwrap_or(0);
            }
        }
    }
    (total, n)
}

struct Profile {
    name: &'static str,
    rtt: &'static str,
    loss: &'static str,
}

const PROFILES: [Profile; 2] = [Profile { name: "150ms", rtt: "150ms", loss: "1%" }, Profile { name: "50ms", rtt: "50ms", loss: "0.1%" }];
const SIZES: [u64; 2] = [16 * MIB, 256 * MIB];

fn main() {
    let mut rounds = 3usize;
    let mut only: Option<Vec<String>> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--rounds" => rounds = args.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| die("--rounds N")),
            "--profiles" => only = Some(args.next().unwrap_or_else(|| die("--profiles 150ms,50ms")).split(',').map(str::to_owned).collect()),
            _ => die(&format!("unknown argument {a}; usage: bench-warm [--rounds N] [--profiles 150ms,50ms]")),
        }
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace").to_path_buf();
    let dwcp = root.join("target/release/dwcp");
    let dir = root.join("target/bench/warm");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| die(&format!("{}: {e}", dir.display())));
    let key = dir.join("key");
    if !Command::new(&dwcp).args(["keygen", "--force"]).arg(&key).stderr(Stdio::null()).status().is_ok_and(|s| s.success()) {
        die("dwcp keygen failed (build first: make build)");
    }
    // times[profile][size][cold=0 / warm=1] = per-round seconds
    let mut times = vec![vec![[Vec::new(), Vec::new()]; SIZES.len()]; PROFILES.len()];
    let mut pools = Vec::new();
    let mut idle = Vec::new();
    for (pi, p) in PROFILES.iter().enumerate() {
        if only.as_ref().is_some_and(|o| !o.iter().any(|n| n == p.name)) {
            continue;
        }
        let _wan = Wan::up(&root, &["--rtt", p.rtt, "--rate", "1gbit", "--loss", p.loss]);
        let _rx = Proc(
            in_ns("dwcp-b", &dwcp)
                .args(["recv", "--listen", &format!("{ADDR_B}:7470"), "--discard", "--key-file"])
                .arg(&key)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("dwcp recv"),
        );
        let sock = dir.join("api.sock");
        let cfg = dir.join("dwcp.toml");
        let toml = format!(
            "[node]\nname = \"warm-a\"\nlisten = \"10.77.0.1:7490\"\nout = \"{}\"\nkey_file = \"{}\"\n[api]\nlisten = \"{API}\"\nsocket = \"{}\"\n[mode]\nprobe_interval_s = 3600\n[[peers]]\nname = \"b\"\naddr = \"{ADDR_B}:7470\"\n",
            dir.join("out").display(),
            key.display(),
            sock.display()
        );
        std::fs::write(&cfg, toml).unwrap_or_else(|e| die(&format!("{}: {e}", cfg.display())));
        let daemon = Proc(in_ns("dwcp-a", &dwcp).args(["daemon", "--config"]).arg(&cfg).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("dwcp daemon"));
        let pool = benches::warm_pool_ready(&dwcp, API);
        eprintln!("{}: warm pool {pool}", p.name);
        pools.push(pool);
        for r in 0..rounds {
            for (si, &size) in SIZES.iter().enumerate() {
                for warm in [false, true] {
                    let name = format!("{}-{}-{r}", if warm { "warm" } else { "cold" }, size / MIB);
                    let mut c = if warm { Command::new(&dwcp) } else { in_ns("dwcp-a", &dwcp) };
                    c.args(["send", &format!("gen:{size}:{r}"), "--name", &name, "--to", &format!("{ADDR_B}:7470"), "--json"]);
                    if warm {
                        benches::warm_pool_ready(&dwcp, API);
                        c.arg("--via-daemon").arg(&sock);
                    } else {
                        c.arg("--key-file").arg(&key);
                    }
                    let s = timed(c).unwrap_or_else(|e| die(&format!("{} {name}: {e}", p.name)));
                    eprintln!("{} round {} {name}: {s:.2} s", p.name, r + 1);
                    times[pi][si][usize::from(warm)].push(s);
                }
            }
        }
        // Idle: what the pool costs on the wire and in kernel memory (the daemon's periodic
        // mode probes are off here; the pool's pings are all that should move).
        benches::warm_pool_ready(&dwcp, API);
        // The rig rewrites its counters every second: let the last transfer's bytes land first.
        std::thread::sleep(Duration::from_secs(2));
        let (mem, socks) = socket_memory(&format!("{ADDR_B}:7470"));
        let rss_kib = std::fs::read_to_string(format!("/proc/{}/status", daemon.0.id()))
            .ok()
            .and_then(|st| st.lines().find_map(|l| l.strip_prefix("VmRSS:").and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())))
            .unwrap_or(0);
        let b0 = wire_bytes(&root);
        std::thread::sleep(IDLE);
        let bps = (wire_bytes(&root) - b0) as f64 * 8.0 / IDLE.as_secs_f64();
        eprintln!("{}: idle {} s: {bps:.0} bit/s on the wire, {socks} connections holding {mem} bytes of kernel memory; daemon RSS {rss_kib} KiB", p.name, IDLE.as_secs());
        idle.push(json!({"profile": p.name, "wire_bps": bps, "connections": socks, "socket_memory_bytes": mem, "daemon_rss_kib": rss_kib}));
        drop(daemon);
    }
    report(&times, &pools, &idle, rounds);
}

fn report(times: &[Vec<[Vec<f64>; 2]>], pools: &[Value], idle: &[Value], rounds: usize) {
    println!("bench-warm: 1 Gbit/s WAN rig; cold `dwcp send` against a job on the daemon's warm streams; {rounds} rounds, medians");
    println!("{:<16} {:>9} {:>9} {:>9} {:>8} {:>12}", "link", "size", "cold s", "warm s", "speedup", "warm/floor");
    let mut figures = serde_json::Map::new();
    for (pi, p) in PROFILES.iter().enumerate() {
        for (si, &size) in SIZES.iter().enumerate() {
            let [cold, warm] = &times[pi][si];
            if cold.is_empty() {
                continue;
            }
            let speed = Figure::new(cold.iter().zip(warm).map(|(c, w)| c / w).collect());
            let floor = size as f64 * 8.0 / (RATE_BPS * PAYLOAD);
            let vs_floor = Figure::new(warm.iter().map(|w| w / floor).collect());
            let (c, w) = (Figure::new(cold.clone()), Figure::new(warm.clone()));
            println!(
                "{:<16} {:>5} MiB {:>9.2} {:>9.2} {:>7.2}x {:>12.2}",
                format!("{} / {}", p.rtt, p.loss),
                size / MIB,
                c.median(),
                w.median(),
                speed.median(),
                vs_floor.median()
            );
            let tag = format!("{}m_{}", size / MIB, p.name);
            figures.insert(format!("cold_s_{tag}"), c.json());
            figures.insert(format!("warm_s_{tag}"), w.json());
            figures.insert(format!("warm_speedup_{tag}"), speed.json());
            figures.insert(format!("warm_vs_floor_{tag}"), vs_floor.json());
        }
    }
    println!("(floor: the object's bytes at the link's payload rate, {:.0} Mbit/s; speedup per round, cold over warm)", RATE_BPS * PAYLOAD / 1e6);
    for i in idle {
        println!(
            "idle pool at {}: {} connections, {:.0} bit/s on the wire over {} s, {:.0} KiB of socket buffers, daemon RSS {} KiB",
            i["profile"].as_str().unwrap_or(""),
            i["connections"],
            i["wire_bps"].as_f64().unwrap_or(0.0),
            IDLE.as_secs(),
            i["socket_memory_bytes"].as_f64().unwrap_or(0.0) / 1024.0,
            i["daemon_rss_kib"]
        );
    }
    figures.insert("idle".into(), json!(idle));
    figures.insert("pools".into(), json!(pools));
    figures.insert("rounds".into(), json!(rounds));
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace").to_path_buf();
    benches::emit(&root.join("target/bench/warm.json"), Value::Object(figures));
}
