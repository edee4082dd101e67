//! `make bench-wan`: WAN utilization of dwcp with and without ACP against real TCP peers, same
//! run, on the WAN rig (`hw-tests/wan`, queue of one BDP):
//!   1g_50ms:    1 Gbit/s, 50 ms RTT, 0.1% loss
//!   200m_150ms: 200 Mbit/s, 150 ms RTT, 1% loss
//!   clean_1g_50ms: 1 Gbit/s, 50 ms RTT, no loss (where a competing cubic flow can use its share)
//! each alone and against one competing `iperf3` cubic flow started at the same time. Cases, all
//! with the same stream count: dwcp with ACP (`delay`, `bbr-model`; streams on BBR; `delay` also
//! with the kernel's first window of ten segments instead of ACP's 64 KiB, and without the
//! startup window, `dwcp-acp-delay-nosw`), dwcp without
//! ACP (cubic, Linux's default), dwcp on kernel BBR without pacing, `iperf3 -P N` with cubic and with bbr, one cubic
//! TCP stream. Figures: goodput / link rate, retransmits, srtt inflation over the least RTT
//! (dwcp: its monitor; iperf3: its mean_rtt / min_rtt), Jain fairness against the competitor.
//! Issue 30's keys: `util_min_lossy` (ACP's worst utilization on the lossy links),
//! `retrans_per_gb_vs_floor_max` (ACP's retransmits per GB delivered over the loss floor, which is
//! what `iperf3 -P N -C cubic` retransmits per GB on the same link in the same run: it sends a
//! fraction of what ACP does and overflows nothing there), `retrans_vs_cubic_clean` (the same
//! ratio on the clean link, where every retransmit is the sender's own) and `fair_share_clean`
//! (ACP's share against one cubic flow on the clean link).
//!
//! dwcp's goodput is taken over its data phase (its `--trace-out` intervals), as iperf3's is
//! over its `-t` seconds: neither counts connection setup. Every link runs the same number of
//! round trips (`--secs` per 50 ms of RTT: 15 s at 50 ms, 45 s at 150 ms), so startup weighs
//! the same on each.
//!
//! A fourth section, `pba`, measures what PBA sizes, each against the fixed choice in the same
//! run: the active stream count on 1 Gbit/s, 50 ms, no loss with the sender's `tcp_wmem` capped
//! at 512 KiB (what a 10 Gbit/s path is to Linux's default 4 MiB, at the rig's rate), where each
//! stream carries at most about 60 Mbit/s: `dwcp` with PBA's stream trials (auto stream count,
//! ACP off, and with ACP) against `--streams 7` (the count auto starts with) and `iperf3 -P 7`
//! with bbr; and the chunk size of small objects (4 and 16 MiB) at 200 Mbit/s, 150 ms, 1% loss:
//! PBA's cut against `--chunk-size 1MiB`, five runs each, median wall time.
//!
//! A fifth section, `rough`, runs links that are not smooth, at 1 Gbit/s, 50 ms, 0.1% loss: with
//! 5 ms of jitter (`jitter`), and with 5 ms of jitter and 1% of packets reordered (`reorder`: a
//! reordered packet skips the delay, as netem's do, and hands TCP RTT samples of a fraction of
//! the path's). In rounds (`--rounds`, 3 by default), each round in turns: dwcp with ACP (its
//! defaults), dwcp without ACP on kernel BBR (`--acp off --cc bbr`) and `iperf3 -P N -C bbr`;
//! `util_jitter_vs_best` and `util_reorder_vs_best` are the median over rounds of ACP's
//! utilization over the better of the other two in that round.
//!
//!   bench-wan [--secs 15] [--streams 8] [--rounds 3] [--profiles 1g_50ms,200m_150ms,clean_1g_50ms,pba,rough]
//!             [--cases dwcp-acp-delay,iperf3-cubic,...] [--alone-only]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use benches::{Proc, Wan, die, in_ns};

const A: &str = "dwcp-a";
const B: &str = "dwcp-b";
const ADDR_B: &str = "10.77.0.2";

struct Profile {
    name: &'static str,
    rate_bps: f64,
    rtt: &'static str,
    loss: &'static str,
}

impl Profile {
    /// A run's length: `base` seconds per 50 ms of RTT (at least `base`), so that every profile
    /// runs the same number of round trips (300 at the default 15 s) and startup, which lasts a
    /// number of round trips, weighs the same in each: 15 s on the 50 ms links, 45 s on the
    /// 150 ms one, where 15 s gave startup three times the weight.
    fn secs(&self, base: u64) -> u64 {
        let ms: u64 = self.rtt.trim_end_matches("ms").parse().unwrap_or(50);
        base * ms.div_ceil(50).max(1)
    }
}

const PROFILES: [Profile; 3] = [
    Profile { name: "1g_50ms", rate_bps: 1e9, rtt: "50ms", loss: "0.1%" },
    Profile { name: "200m_150ms", rate_bps: 2e8, rtt: "150ms", loss: "1%" },
    // No random loss: a competing cubic flow can take its half here, so fairness means something.
    Profile { name: "clean_1g_50ms", rate_bps: 1e9, rtt: "50ms", loss: "0%" },
];

/// One measured run.
#[derive(Debug, Clone, Default)]
struct Run {
    goodput_bps: f64,
    retrans: u64,
    inflation: f64,
    competitor_bps: Option<f64>,
    note: String,
}

struct Env {
    root: PathBuf,
    dwcp: PathBuf,
    /// `DWCP_BASE`: another dwcp binary (an older commit's), run as the `dwcp-acp-delay-base`
    /// case, so that a change is measured against it in the same run.
    base: Option<PathBuf>,
    key: PathBuf,
    tmp: PathBuf,
    secs: u64,
    streams: u16,
}

fn iperf3_client(env: &Env, port: u16, streams: u16, cc: &str, secs: u64) -> Command {
    let mut c = in_ns(A, Path::new("iperf3"));
    c.args(["-c", ADDR_B, "-p", &port.to_string(), "-P", &streams.to_string(), "-t", &secs.to_string(), "-C", cc, "-J"]);
    let _ = env;
    c
}

fn parse_iperf3(out: &std::process::Output) -> Result<(f64, u64, f64), String> {
    let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| format!("iperf3 output: {e}: {}", String::from_utf8_lossy(&out.stderr)))?;
    if let Some(e) = v.get("error") {
        return Err(format!("iperf3: {e}"));
    }
    let end = &v["end"];
    let bps = end["sum_received"]["bits_per_second"].as_f64().ok_or("iperf3: no sum_received")?;
    let retrans = end["sum_sent"]["retransmits"].as_u64().unwrap_or(0);
    let streams = end["streams"].as_array().cloned().unwrap_or_default();
    let mean: Vec<f64> = streams.iter().filter_map(|s| s["sender"]["mean_rtt"].as_f64()).collect();
    let min = streams.iter().filter_map(|s| s["sender"]["min_rtt"].as_f64()).filter(|&m| m > 0.0).fold(f64::INFINITY, f64::min);
    let infl = if mean.is_empty() || !min.is_finite() { 0.0 } else { mean.iter().sum::<f64>() / mean.len() as f64 / min };
    Ok((bps, retrans, infl))
}

/// Runs a case, with the competing flow if `compete`.
fn run_case(env: &Env, p: &Profile, case: &str, compete: bool) -> Run {
    let secs = p.secs(env.secs);
    let competitor = compete.then(|| {
        let mut c = iperf3_client(env, 5202, 1, "cubic", secs);
        c.stdout(Stdio::piped()).stderr(Stdio::piped());
        c.spawn().unwrap_or_else(|e| die(&format!("iperf3: {e}")))
    });
    let mut run = match case {
        "iperf3-cubic" | "iperf3-bbr" | "tcp-1" => {
            let (n, cc) = match case {
                "iperf3-cubic" => (env.streams, "cubic"),
                "iperf3-bbr" => (env.streams, "bbr"),
                _ => (1, "cubic"),
            };
            let out = iperf3_client(env, 5201, n, cc, secs).output().expect("iperf3");
            match parse_iperf3(&out) {
                Ok((bps, retrans, inflation)) => Run { goodput_bps: bps, retrans, inflation, ..Default::default() },
                Err(e) => Run { note: e, ..Default::default() },
            }
        }
        _ => {
            let (acp, cc) = match case {
                "dwcp-acp-delay" | "dwcp-acp-delay-iw10" | "dwcp-acp-delay-nosw" | "dwcp-acp-delay-base" => ("delay", None),
                "dwcp-acp-bbr-model" => ("bbr-model", None),
                "dwcp-kernel-bbr" => ("off", Some("bbr")),
                // Without ACP: Linux's default congestion control, cubic (this host may default to another).
                _ => ("off", Some("cubic")),
            };
            // Enough bytes for the run at link rate; the run ends at `secs` either way.
            let size = (p.rate_bps / 8.0 * secs as f64) as u64;
            let trace = env.tmp.join(format!("{}-{case}-{compete}.csv", p.name));
            let bin = match (case, &env.base) {
                ("dwcp-acp-delay-base", Some(b)) => b,
                ("dwcp-acp-delay-base", None) => die("the dwcp-acp-delay-base case needs DWCP_BASE=PATH (another dwcp binary)"),
                _ => &env.dwcp,
            };
            let mut c = in_ns(A, bin);
            // Each run its own name: a stopped run's session lingers at the receiver until it times out.
            let name = format!("{}-{case}-{compete}.img", p.name);
            c.args(["send", &format!("gen:{size}"), "--name", &name, "--to", &format!("{ADDR_B}:7470"), "--key-file"]).arg(&env.key);
            c.args(["--mode", "internet", "--no-encrypt", "--hde", "off", "--streams", &env.streams.to_string(), "--acp", acp, "--json", "--trace-out"]).arg(&trace);
            let _ = std::fs::remove_file(&trace);
            if let Some(cc) = cc {
                c.args(["--cc", cc]);
            }
            // ACP's first window (64 KiB per stream) against the kernel's ten segments.
            if case == "dwcp-acp-delay-iw10" {
                c.args(["--initial-window", "off"]);
            }
            // ACP without the startup window that keeps BBR's startup from overflowing the queue.
            if case == "dwcp-acp-delay-nosw" {
                c.args(["--startup-window", "off"]);
            }
            c.stdout(Stdio::piped()).stderr(Stdio::piped());
            let child = Proc(c.spawn().expect("dwcp send"));
            let pid = child.0.id();
            // Stop it at `secs` of data (plus setup); a transfer that finishes earlier just ends.
            let limit = Duration::from_secs(secs + 3);
            let t = std::time::Instant::now();
            let mut child = child;
            let status = loop {
                if let Some(s) = child.0.try_wait().expect("wait") {
                    break Some(s);
                }
                if t.elapsed() > limit {
                    // The trace is written as intervals end: a stopped run is measured up to here.
                    let _ = Command::new("kill").arg(pid.to_string()).status();
                    break None;
                }
                std::thread::sleep(Duration::from_millis(50));
            };
            let mut out = String::new();
            if let Some(mut so) = child.0.stdout.take() {
                use std::io::Read;
                let _ = so.read_to_string(&mut out);
            }
            let mut err = String::new();
            if let Some(mut se) = child.0.stderr.take() {
                use std::io::Read;
                let _ = se.read_to_string(&mut err);
            }
            let t = Trace::read(&trace);
            if t.rows == 0 {
                let why = if status.is_some_and(|s| !s.success()) { err.lines().last().unwrap_or("").to_string() } else { "no trace".into() };
                Run { note: format!("dwcp failed: {why}"), ..Default::default() }
            } else {
                let _ = out;
                Run {
                    goodput_bps: t.goodput_bps,
                    retrans: t.retrans,
                    inflation: t.inflation,
                    note: if status.is_none() { format!("stopped at {}s", limit.as_secs()) } else { String::new() },
                    ..Default::default()
                }
            }
        }
    };
    if let Some(c) = competitor {
        let out = c.wait_with_output().expect("iperf3 competitor");
        match parse_iperf3(&out) {
            Ok((bps, _, _)) => run.competitor_bps = Some(bps),
            Err(e) => run.note = format!("{} competitor: {e}", run.note),
        }
    }
    run
}

/// Brings the rig up with `args`, and a discarding receiver; both go with the guard.
fn rig(env: &Env, args: &[&str]) -> (Proc, Wan) {
    let wan = Wan::up(&env.root, args);
    let rx = Proc(
        in_ns(B, &env.dwcp)
            .args(["recv", "--listen", &format!("{ADDR_B}:7470"), "--discard", "--no-encrypt", "--key-file"])
            .arg(&env.key)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dwcp recv"),
    );
    std::thread::sleep(Duration::from_millis(500));
    (rx, wan)
}

/// One `dwcp send` to the rig's receiver with `extra` arguments, run to its end: its `--json`.
fn dwcp_send(env: &Env, object: &str, name: &str, extra: &[&str], trace: Option<&Path>) -> Value {
    let mut c = in_ns(A, &env.dwcp);
    c.args(["send", object, "--name", name, "--to", &format!("{ADDR_B}:7470"), "--key-file"]).arg(&env.key);
    c.args(["--no-encrypt", "--hde", "off", "--json"]).args(extra);
    if let Some(t) = trace {
        let _ = std::fs::remove_file(t);
        c.arg("--trace-out").arg(t);
    }
    let out = c.output().expect("dwcp send");
    if !out.status.success() {
        die(&format!("dwcp send {name}: {}", String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("")));
    }
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| die(&format!("dwcp send {name} --json: {e}")));
    if v["verified"] != true {
        die(&format!("dwcp send {name}: not verified"));
    }
    v
}

/// The `pba` section (see the top of this file): its figures go into `figures`, its table is returned.
fn pba_sizing(env: &Env, figures: &mut serde_json::Map<String, Value>) -> Vec<String> {
    let mut lines = vec!["".to_string(), "PBA sizing, each against the fixed choice in the same run:".to_string()];
    // Streams: the sender's buffers limit each stream.
    {
        let (_rx, _down) = rig(env, &["--rtt", "50ms", "--rate", "1000mbit", "--loss", "0%", "--queue", "1bdp"]);
        let st = in_ns(A, Path::new("sysctl")).args(["-w", "net.ipv4.tcp_wmem=4096 16384 524288"]).stdout(Stdio::null()).status().expect("sysctl");
        if !st.success() {
            die("sysctl net.ipv4.tcp_wmem in dwcp-a");
        }
        let size = format!("gen:{}", (1e9 / 8.0 * env.secs as f64 * 0.6) as u64);
        let mut utils = serde_json::Map::new();
        lines.push("  streams, 1 Gbit/s, 50 ms, no loss, sender's tcp_wmem max 512 KiB:".into());
        let cases: [(&str, &[&str]); 3] =
            [("fixed 7 streams, ACP off", &["--streams", "7", "--acp", "off"]), ("PBA trials, ACP off", &["--acp", "off"]), ("PBA trials with ACP", &[])];
        for (k, (label, extra)) in cases.iter().enumerate() {
            let trace = env.tmp.join(format!("pba-streams-{k}.csv"));
            let v = dwcp_send(env, &size, &format!("pba-streams-{k}"), extra, Some(&trace));
            let t = Trace::read(&trace);
            let most = t.most_active;
            let util = t.goodput_bps / 1e9;
            let trials = &v["control"]["stream_trials"];
            lines.push(format!(
                "    {label:<26} util {util:.3}  wall {:>6.2} s  streams at most {most:>2}  trials kept {} given back {}",
                v["wall_s"].as_f64().unwrap_or(0.0),
                trials["kept"],
                trials["given_back"]
            ));
            utils.insert(["fixed", "trials", "trials_acp"][k].into(), json!({"util": util, "wall_s": v["wall_s"], "most_active": most, "trials": trials}));
        }
        let server = Proc(in_ns(B, Path::new("iperf3")).args(["-s", "-p", "5201"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("iperf3 -s"));
        std::thread::sleep(Duration::from_millis(300));
        let r = parse_iperf3(&iperf3_client(env, 5201, 7, "bbr", env.secs).output().expect("iperf3"));
        drop(server);
        let peer = r.as_ref().map(|r| r.0 / 1e9).unwrap_or(0.0);
        lines.push(format!("    {:<26} util {peer:.3}", "iperf3 -P 7 -C bbr"));
        utils.insert("iperf3_bbr_7".into(), json!(peer));
        let u = |k: &str| utils.get(k).and_then(|v| v["util"].as_f64()).unwrap_or(0.0);
        figures.insert("pba_streams_speedup".into(), json!(u("trials") / u("fixed").max(1e-9)));
        figures.insert("pba_streams_util_trials".into(), json!(u("trials")));
        figures.insert("pba_streams_util_fixed".into(), json!(u("fixed")));
        figures.insert("pba_streams_util_iperf3_bbr_7".into(), json!(peer));
        figures.insert("pba_streams".into(), Value::Object(utils));
    }
    // Chunks: small objects on a long lossy path.
    {
        let (_rx, _down) = rig(env, &["--rtt", "150ms", "--rate", "200mbit", "--loss", "1%", "--queue", "1bdp"]);
        lines.push("  chunks, 200 Mbit/s, 150 ms, 1% loss, 8 streams, median of 5 wall times:".into());
        for size in ["4MiB", "16MiB"] {
            let (mut cut, mut fixed, mut chunk) = (Vec::new(), Vec::new(), 0);
            for k in 0..5 {
                let v = dwcp_send(env, &format!("gen:{size}"), &format!("pba-chunk-{size}-{k}"), &["--mode", "internet", "--streams", "8"], None);
                cut.push(v["wall_s"].as_f64().unwrap_or(0.0));
                chunk = v["chunk_size"].as_u64().unwrap_or(0);
                let v = dwcp_send(env, &format!("gen:{size}"), &format!("pba-chunk-{size}-{k}-1m"), &["--mode", "internet", "--streams", "8", "--chunk-size", "1MiB"], None);
                fixed.push(v["wall_s"].as_f64().unwrap_or(0.0));
            }
            let (c, f) = (benches::median(&cut), benches::median(&fixed));
            lines.push(format!("    {size:<6} PBA's {} KiB chunks {c:.3} s, 1 MiB chunks {f:.3} s: {:.2}x", chunk >> 10, f / c.max(1e-9)));
            let key = size.to_lowercase().replace("mib", "m");
            figures.insert(format!("pba_chunk_speedup_{key}"), json!(f / c.max(1e-9)));
            figures.insert(format!("pba_chunk_{key}"), json!({"chunk": chunk, "cut_s": cut, "fixed_1mib_s": fixed}));
        }
    }
    lines
}

/// The `rough` section (see the top of this file): its figures go into `figures`, its table is
/// returned.
fn rough_links(env: &Env, rounds: usize, figures: &mut serde_json::Map<String, Value>) -> Vec<String> {
    const CASES: [&str; 3] = ["dwcp-acp-delay", "dwcp-kernel-bbr", "iperf3-bbr"];
    let mut lines = vec!["".to_string(), format!("Rough links, 1 Gbit/s, 50 ms, 0.1% loss, {rounds} rounds; util per run, and ACP over the better of the others in its round:")];
    for (name, extra) in [("jitter", &["--jitter", "5ms"][..]), ("reorder", &["--jitter", "5ms", "--reorder", "1%"][..])] {
        let p = Profile { name, rate_bps: 1e9, rtt: "50ms", loss: "0.1%" };
        let mut args = vec!["--rtt", "50ms", "--rate", "1000mbit", "--loss", "0.1%", "--queue", "1bdp"];
        args.extend_from_slice(extra);
        let (_rx, _down) = rig(env, &args);
        let _server = Proc(in_ns(B, Path::new("iperf3")).args(["-s", "-p", "5201"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("iperf3 -s"));
        std::thread::sleep(Duration::from_millis(500));
        let mut utils: Vec<Vec<f64>> = vec![Vec::new(); CASES.len()];
        let mut notes = Vec::new();
        let mut ratios = Vec::new();
        for round in 0..rounds {
            let mut u = [0.0; 3];
            for (k, case) in CASES.iter().enumerate() {
                let r = run_case(env, &p, case, false);
                u[k] = r.goodput_bps / p.rate_bps;
                eprintln!("  {name:<8} round {round} {case:<17} util {:.3}  retrans {:>7}  {}", u[k], r.retrans, r.note);
                if !r.note.is_empty() && !r.note.starts_with("stopped") {
                    notes.push(format!("{case}: {}", r.note));
                }
                utils[k].push(u[k]);
            }
            ratios.push(u[0] / u[1].max(u[2]).max(1e-9));
        }
        let ratio = benches::Figure::new(ratios);
        for (k, case) in CASES.iter().enumerate() {
            let f = benches::Figure::new(utils[k].clone());
            lines.push(format!("  {name:<8} {case:<17} util median {:.3}  runs {}", f.median(), f.runs.iter().map(|v| format!("{v:.3}")).collect::<Vec<_>>().join(" ")));
            figures.insert(format!("util_{name}_{}", case.replace('-', "_")), f.json());
        }
        lines.push(format!("  {name:<8} ACP / best other       {:.2} (runs {})", ratio.median(), ratio.runs.iter().map(|v| format!("{v:.2}")).collect::<Vec<_>>().join(" ")));
        for n in notes {
            lines.push(format!("  {name:<8} note: {n}"));
        }
        figures.insert(format!("util_{name}_vs_best"), json!(ratio.median()));
        figures.insert(format!("util_{name}_vs_best_runs"), ratio.json());
    }
    lines
}

/// What a `--trace-out` file says about a run.
struct Trace {
    rows: usize,
    /// Over the data phase (first interval with data to the last), bit/s.
    goodput_bps: f64,
    retrans: u64,
    /// Mean srtt of the intervals with data over the least RTT seen.
    inflation: f64,
    /// The most streams active in any interval.
    most_active: u16,
}

impl Trace {
    fn read(path: &Path) -> Trace {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let rows: Vec<dataplane::send::TraceRow> = text.lines().filter_map(dataplane::send::TraceRow::parse).collect();
        let first = rows.iter().position(|r| r.goodput_bps > 0.0).unwrap_or(rows.len());
        let data = &rows[first..];
        let (bits, secs) = data.iter().fold((0.0, 0.0), |(b, s), r| (b + r.goodput_bps * r.dt, s + r.dt));
        let srtts: Vec<f64> = data.iter().filter(|r| r.srtt_us > 0.0).map(|r| r.srtt_us).collect();
        let min = rows.iter().map(|r| r.min_rtt_us).filter(|&m| m > 0.0).fold(f64::INFINITY, f64::min);
        Trace {
            rows: rows.len(),
            goodput_bps: if secs > 0.0 { bits / secs } else { 0.0 },
            retrans: rows.iter().map(|r| r.retrans).sum(),
            inflation: if srtts.is_empty() || !min.is_finite() { 0.0 } else { srtts.iter().sum::<f64>() / srtts.len() as f64 / min },
            most_active: rows.iter().map(|r| r.active).max().unwrap_or(0),
        }
    }
}

/// One table row: link, against a competitor, case, util, retrans, inflation, Jain, share.
type Row = (&'static str, bool, &'static str, f64, u64, f64, Option<f64>, Option<f64>);

fn jain(a: f64, b: f64) -> f64 {
    if a + b <= 0.0 { 0.0 } else { (a + b).powi(2) / (2.0 * (a * a + b * b)) }
}

const CASES: [&str; 10] = [
    "dwcp-acp-delay",
    "dwcp-acp-delay-base",
    "dwcp-acp-delay-iw10",
    "dwcp-acp-delay-nosw",
    "dwcp-acp-bbr-model",
    "dwcp-no-acp",
    "dwcp-kernel-bbr",
    "iperf3-cubic",
    "iperf3-bbr",
    "tcp-1",
];

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut secs, mut streams, mut profiles, mut alone_only, mut rounds) = (15u64, 8u16, "1g_50ms,200m_150ms,clean_1g_50ms,pba,rough".to_string(), false, 3usize);
    let base = std::env::var_os("DWCP_BASE").map(PathBuf::from);
    // Without a base binary its case is left out.
    let mut cases: Vec<&str> = CASES.iter().copied().filter(|c| *c != "dwcp-acp-delay-base" || base.is_some()).collect();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--secs" => secs = args.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| die("--secs N")),
            "--streams" => streams = args.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| die("--streams N")),
            "--profiles" => profiles = args.next().unwrap_or_else(|| die("--profiles LIST")),
            "--alone-only" => alone_only = true,
            "--cases" => {
                let list = args.next().unwrap_or_else(|| die("--cases LIST"));
                cases = CASES.iter().copied().filter(|c| list.split(',').any(|n| n == *c)).collect();
                if cases.is_empty() {
                    die(&format!("--cases: none of {list} is one of {}", CASES.join(",")));
                }
            }
            "--rounds" => rounds = args.next().and_then(|v| v.parse().ok()).filter(|&r| r > 0).unwrap_or_else(|| die("--rounds N (at least 1)")),
            _ => die(&format!(
                "unknown argument {a}; usage: bench-wan [--secs 15] [--streams 8] [--rounds 3] [--profiles 1g_50ms,200m_150ms,clean_1g_50ms,pba,rough] [--cases LIST] [--alone-only]"
            )),
        }
    }
    if !ebpf::sys::is_root() {
        die("needs root (network namespaces, TUN devices, BPF)");
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace").to_path_buf();
    let tmp = root.join("target/bench/wan");
    std::fs::create_dir_all(&tmp).expect("target/bench/wan");
    let dwcp = root.join("target/release/dwcp");
    let key = tmp.join("key");
    let st = Command::new(&dwcp).args(["keygen", "--force"]).arg(&key).stderr(Stdio::null()).status().expect("dwcp keygen");
    assert!(st.success(), "dwcp keygen failed");
    let env = Env { root, dwcp, base, key, tmp, secs, streams };

    let mut figures = serde_json::Map::new();
    let mut table: Vec<Row> = Vec::new();
    for p in PROFILES.iter().filter(|p| profiles.split(',').any(|n| n == p.name)) {
        let rate = format!("{}mbit", p.rate_bps / 1e6);
        let (_rx, down) = rig(&env, &["--rtt", p.rtt, "--rate", &rate, "--loss", p.loss, "--queue", "1bdp"]);
        let _servers = [5201u16, 5202]
            .map(|port| Proc(in_ns(B, Path::new("iperf3")).args(["-s", "-p", &port.to_string()]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("iperf3 -s")));
        std::thread::sleep(Duration::from_millis(500));
        let mut results = serde_json::Map::new();
        for compete in [false, true] {
            if compete && alone_only {
                continue;
            }
            for &case in &cases {
                let r = run_case(&env, p, case, compete);
                let util = r.goodput_bps / p.rate_bps;
                let fair = r.competitor_bps.map(|c| jain(r.goodput_bps, c));
                let share = r.competitor_bps.map(|c| r.goodput_bps / (r.goodput_bps + c).max(1.0));
                eprintln!(
                    "  {:<11} {:<9} {:<19} util {util:.3}  retrans {:>7}  srtt/min {:.2}{}  {}",
                    p.name,
                    if compete { "vs cubic" } else { "alone" },
                    case,
                    r.retrans,
                    r.inflation,
                    fair.map_or(String::new(), |f| format!("  jain {f:.3} share {:.2}", share.unwrap_or(0.0))),
                    r.note
                );
                table.push((p.name, compete, case, util, r.retrans, r.inflation, fair, share));
                results.insert(
                    format!("{case}{}", if compete { "_vs_cubic" } else { "" }),
                    json!({"util": util, "goodput_bps": r.goodput_bps, "retrans": r.retrans, "srtt_inflation": r.inflation, "competitor_bps": r.competitor_bps, "jain": fair, "share": share, "note": r.note}),
                );
            }
        }
        drop(down);
        // Jain's index cannot be fair to a flow that could not use its half alone (one cubic
        // stream under random loss): what the competitor got, against what it gets alone, says
        // whether a sender harmed it.
        let alone_bps = results.get("tcp-1").and_then(|v| v["goodput_bps"].as_f64()).unwrap_or(0.0);
        for case in CASES {
            if let Some(v) = results.get_mut(&format!("{case}_vs_cubic"))
                && let Some(c) = v["competitor_bps"].as_f64()
                && alone_bps > 0.0
            {
                v["competitor_vs_alone"] = json!(c / alone_bps);
            }
        }
        if let Some(h) = results.get("dwcp-acp-delay_vs_cubic").and_then(|v| v["competitor_vs_alone"].as_f64()) {
            figures.insert(format!("competitor_vs_alone_{}", p.name), json!(h));
        }
        let util = |k: &str| results.get(k).and_then(|v| v["util"].as_f64()).unwrap_or(0.0);
        let best_peer = ["iperf3-cubic", "iperf3-bbr", "tcp-1"].iter().map(|k| util(k)).fold(0.0, f64::max);
        figures.insert(format!("util_{}", p.name), json!(util("dwcp-acp-delay")));
        if results.contains_key("dwcp-acp-delay-base") {
            figures.insert(format!("util_base_{}", p.name), json!(util("dwcp-acp-delay-base")));
        }
        figures.insert(format!("util_iw10_{}", p.name), json!(util("dwcp-acp-delay-iw10")));
        figures.insert(format!("util_nosw_{}", p.name), json!(util("dwcp-acp-delay-nosw")));
        figures.insert(format!("util_bbr_model_{}", p.name), json!(util("dwcp-acp-bbr-model")));
        figures.insert(format!("util_no_acp_{}", p.name), json!(util("dwcp-no-acp")));
        figures.insert(format!("best_peer_util_{}", p.name), json!(best_peer));
        figures.insert(format!("iperf3_cubic_util_{}", p.name), json!(util("iperf3-cubic")));
        figures.insert(format!("iperf3_bbr_util_{}", p.name), json!(util("iperf3-bbr")));
        figures.insert(format!("cases_{}", p.name), Value::Object(results));
    }
    // Headline ratios (worst profile).
    let pick = |f: &dyn Fn(&Row) -> bool| table.iter().filter(|r| f(r)).cloned().collect::<Vec<_>>();
    let mut retrans_ratio: f64 = 0.0;
    let mut inflation: f64 = 0.0;
    let mut share_dev: f64 = 0.0;
    let mut shares = Vec::new();
    let (mut floor_max, mut util_lossy): (f64, f64) = (0.0, f64::INFINITY);
    for p in PROFILES.iter().filter(|p| profiles.split(',').any(|n| n == p.name)) {
        let acp = pick(&|r| r.0 == p.name && !r.1 && r.2 == "dwcp-acp-delay");
        let cubic = pick(&|r| r.0 == p.name && !r.1 && r.2 == "iperf3-cubic");
        if let (Some(a), Some(c)) = (acp.first(), cubic.first()) {
            retrans_ratio = retrans_ratio.max(a.4 as f64 / (c.4 as f64).max(1.0));
            inflation = inflation.max(a.5);
            // Per link, and per byte delivered: under random loss every sender retransmits about
            // the link's loss rate of what it sends, so the raw count follows the goodput; only
            // on the clean link is every retransmit the sender's own doing.
            figures.insert(format!("retrans_ratio_vs_iperf3_{}", p.name), json!(a.4 as f64 / (c.4 as f64).max(1.0)));
            let per_gb = |util: f64, retrans: u64| retrans as f64 / (util * p.rate_bps / 8.0 * p.secs(secs) as f64 / 1e9).max(1e-9);
            figures.insert(format!("retrans_per_gb_acp_{}", p.name), json!(per_gb(a.3, a.4)));
            figures.insert(format!("retrans_per_gb_iperf3_cubic_{}", p.name), json!(per_gb(c.3, c.4)));
            // The loss floor: what cubic, which sends a fraction of what ACP does and overflows
            // nothing on a lossy link, retransmits per GB delivered there, same run.
            let vs_floor = per_gb(a.3, a.4) / per_gb(c.3, c.4).max(1e-9);
            if p.loss != "0%" {
                figures.insert(format!("retrans_per_gb_vs_floor_{}", p.name), json!(vs_floor));
                floor_max = floor_max.max(vs_floor);
                util_lossy = util_lossy.min(a.3);
            } else {
                figures.insert("retrans_vs_cubic_clean".into(), json!(vs_floor));
            }
            if let Some(n) = pick(&|r| r.0 == p.name && !r.1 && r.2 == "dwcp-acp-delay-nosw").first() {
                figures.insert(format!("retrans_per_gb_nosw_{}", p.name), json!(per_gb(n.3, n.4)));
            }
        }
        if let Some(v) = pick(&|r| r.0 == p.name && r.1 && r.2 == "dwcp-acp-delay").first().and_then(|r| r.7) {
            share_dev = share_dev.max((v / 0.5 - 1.0).abs());
            shares.push((p.name, v));
            if p.loss == "0%" {
                figures.insert("fair_share_clean".into(), json!(v));
            }
        }
    }
    if floor_max > 0.0 {
        figures.insert("retrans_per_gb_vs_floor_max".into(), json!(floor_max));
    }
    if util_lossy.is_finite() {
        figures.insert("util_min_lossy".into(), json!(util_lossy));
    }
    figures.insert("retrans_ratio_vs_iperf3".into(), json!(retrans_ratio));
    // Against iperf3 with bbr, the peer that fills these lossy links (worst profile).
    let mut vs_bbr: f64 = 0.0;
    for p in PROFILES.iter().filter(|p| profiles.split(',').any(|n| n == p.name)) {
        let acp = pick(&|r| r.0 == p.name && !r.1 && r.2 == "dwcp-acp-delay");
        let bbr = pick(&|r| r.0 == p.name && !r.1 && r.2 == "iperf3-bbr");
        if let (Some(a), Some(b)) = (acp.first(), bbr.first()) {
            vs_bbr = vs_bbr.max(a.4 as f64 / (b.4 as f64).max(1.0));
        }
    }
    figures.insert("retrans_ratio_vs_iperf3_bbr".into(), json!(vs_bbr));
    figures.insert("srtt_inflation".into(), json!(inflation));
    if !alone_only {
        figures.insert("fair_share_deviation".into(), json!(share_dev));
        for (name, v) in shares {
            figures.insert(format!("acp_share_vs_cubic_{name}"), json!(v));
        }
    }
    let pba_lines = if profiles.split(',').any(|n| n == "pba") { pba_sizing(&env, &mut figures) } else { Vec::new() };
    let rough_lines = if profiles.split(',').any(|n| n == "rough") { rough_links(&env, rounds, &mut figures) } else { Vec::new() };
    figures.insert("secs".into(), json!(secs));
    for p in PROFILES.iter().filter(|p| profiles.split(',').any(|n| n == p.name)) {
        figures.insert(format!("secs_{}", p.name), json!(p.secs(secs)));
    }
    figures.insert("streams".into(), json!(streams));

    println!(
        "bench-wan: {} streams each, {} s per run per 50 ms of RTT (the same round trips on every link), queue of one BDP; util = goodput / link rate (payload ceiling about 0.956)",
        streams, secs
    );
    println!("{:<11} {:<9} {:<19} {:>6} {:>9} {:>9} {:>6} {:>6}", "link", "case", "sender", "util", "retrans", "srtt/min", "jain", "share");
    for (p, c, case, u, rt, inf, j, sh) in &table {
        println!(
            "{p:<11} {:<9} {case:<19} {u:>6.3} {rt:>9} {inf:>9.2} {:>6} {:>6}",
            if *c { "vs cubic" } else { "alone" },
            j.map_or("-".into(), |v| format!("{v:.3}")),
            sh.map_or("-".into(), |v| format!("{v:.2}"))
        );
    }
    for l in pba_lines.iter().chain(&rough_lines) {
        println!("{l}");
    }
    benches::emit(&env.root.join("target/bench/wan.json"), Value::Object(figures));
}
