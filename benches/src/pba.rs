//! `make bench-pba`: one-step-ahead MAPE of PBA's bandwidth predictors, and the calibration of
//! their 80% prediction intervals, on recorded traces of real transfers (dwcp `--trace-out` over the WAN rig while cross traffic comes and goes and
//! the link's rate changes). Each family's parameters are fitted by grid search on the training
//! traces; the figure is its MAPE on the held-out traces, at each prediction period (the 100 ms
//! monitor interval, and 0.5 s and 1 s aggregates of it), from 2 s after each transfer's first
//! data on (slow start is not predicted). Calibration: the interval (`pba::Calibrated`) around
//! the family that fitted the training traces best, its window and step fitted there too; the
//! figure is the share of held-out outcomes inside their interval at the 500 ms and 1 s
//! periods, and the interval's mean width against the last-value predictor's, calibrated the
//! same way.
//!
//!   bench-pba [--traces DIR] [--swap]   evaluate (default benches/traces); --swap trains on
//!                                       the traces held out otherwise and scores the others
//!   bench-pba --record [--traces DIR]   record the traces DIR lacks (root, WAN rig; about 35 s
//!                                       each; delete them to record anew)

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dataplane::control::pba;
use dataplane::send::TraceRow;
use serde_json::{Value, json};

use benches::{Proc, die, in_ns};

/// Traces recorded; the first `TRAIN` train, the rest are held out.
const TRACES: usize = 12;
const TRAIN: usize = 6;
/// The prediction intervals' target coverage.
const COVERAGE: f64 = 0.8;
const SECS: u64 = 30;

/// xorshift64*: the cross-traffic schedule is reproducible from the trace's seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

fn record(root: &Path, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap_or_else(|e| die(&format!("{}: {e}", dir.display())));
    let wan = root.join("hw-tests/wan");
    let dwcp = root.join("target/release/dwcp");
    let key = root.join("target/bench/pba-key");
    let _ = std::fs::create_dir_all(root.join("target/bench"));
    let ok = Command::new(&dwcp).args(["keygen", "--force"]).arg(&key).stderr(Stdio::null()).status().is_ok_and(|s| s.success());
    if !ok {
        die("dwcp keygen failed");
    }
    for k in 0..TRACES {
        let trace = dir.join(format!("pba-{k}.csv"));
        if trace.exists() {
            continue;
        }
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ ((k as u64 + 1) * 0x1000_0001));
        let rtt = [20, 50, 80][k % 3];
        let up = Command::new(&wan).args(["up", "--rtt", &format!("{rtt}ms"), "--rate", "1000mbit", "--loss", "0.01%", "--queue", "1bdp"]).output().expect("hw-tests/wan up");
        if !up.status.success() {
            die(&format!("hw-tests/wan up: {}", String::from_utf8_lossy(&up.stderr)));
        }
        let _servers: Vec<Proc> = (5201..=5204)
            .map(|p| Proc(in_ns("dwcp-b", Path::new("iperf3")).args(["-s", "-p", &p.to_string()]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("iperf3 -s")))
            .collect();
        let _rx = Proc(
            in_ns("dwcp-b", &dwcp)
                .args(["recv", "--listen", "10.77.0.2:7470", "--discard", "--no-encrypt", "--key-file"])
                .arg(&key)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("dwcp recv"),
        );
        std::thread::sleep(Duration::from_millis(500));
        let mut send = in_ns("dwcp-a", &dwcp);
        send.args(["send", &format!("gen:{}", 125_000_000 * SECS), "--name", &format!("pba-{k}.img"), "--to", "10.77.0.2:7470", "--key-file"]).arg(&key);
        send.args(["--mode", "internet", "--no-encrypt", "--hde", "off", "--streams", "8", "--acp", "delay", "--trace-out"]).arg(&trace);
        let mut sender = Proc(send.stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("dwcp send"));
        // Cross traffic: every 1-4 s, one of four iperf3 flows (cubic or bbr, 1-3 streams) starts
        // for 1-6 s; every 5-10 s the link's rate changes.
        let t0 = Instant::now();
        let mut flows: Vec<Proc> = Vec::new();
        let mut next_flow = Duration::from_secs(rng.range(1, 3));
        let mut next_rate = Duration::from_secs(rng.range(5, 10));
        while t0.elapsed() < Duration::from_secs(SECS) && sender.0.try_wait().ok().flatten().is_none() {
            if t0.elapsed() >= next_flow {
                let port = 5201 + rng.range(0, 3);
                let cc = if rng.range(0, 1) == 0 { "cubic" } else { "bbr" };
                let (p, secs) = (rng.range(1, 3), rng.range(1, 6));
                flows.push(Proc(
                    in_ns("dwcp-a", Path::new("iperf3"))
                        .args(["-c", "10.77.0.2", "-p", &port.to_string(), "-P", &p.to_string(), "-t", &secs.to_string(), "-C", cc])
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .spawn()
                        .expect("iperf3"),
                ));
                next_flow = t0.elapsed() + Duration::from_secs(rng.range(1, 4));
            }
            if t0.elapsed() >= next_rate {
                let rate = [400, 600, 800, 1000][rng.range(0, 3) as usize];
                let _ = Command::new(&wan).args(["set", "--rate", &format!("{rate}mbit")]).status();
                next_rate = t0.elapsed() + Duration::from_secs(rng.range(5, 10));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = sender.0.kill();
        drop(flows);
        let _ = Command::new(&wan).arg("down").status();
        let rows = std::fs::read_to_string(&trace).map(|t| t.lines().count()).unwrap_or(0);
        eprintln!("recorded {} ({rows} intervals, {rtt} ms)", trace.display());
    }
}

/// Goodput series of a trace from 2 s after its first data on (startup is not what PBA
/// predicts), aggregated to `per` intervals (bit/s).
fn series(rows: &[TraceRow], per: usize) -> Vec<f64> {
    pba::series(rows, per, pba::SKIP_INTERVALS)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace").to_path_buf();
    let (mut dir, mut rec, mut swap) = (root.join("benches/traces"), false, false);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--record" => rec = true,
            "--swap" => swap = true,
            "--traces" => dir = PathBuf::from(args.next().unwrap_or_else(|| die("--traces DIR"))),
            _ => die(&format!("unknown argument {a}; usage: bench-pba [--record] [--traces DIR] [--swap]")),
        }
    }
    if rec {
        record(&root, &dir);
    }
    let traces: Vec<Vec<TraceRow>> = (0..TRACES)
        .map(|k| {
            let p = dir.join(format!("pba-{k}.csv"));
            let t = std::fs::read_to_string(&p).unwrap_or_else(|e| die(&format!("{}: {e} (record with: make bench-pba RECORD=1)", p.display())));
            t.lines().filter_map(TraceRow::parse).collect()
        })
        .collect::<Vec<_>>();
    // The other half trains: whether the figures depend on which traces are held out.
    let mut traces = traces;
    if swap {
        traces.rotate_left(TRAIN);
    }
    let mut figures = serde_json::Map::new();
    figures.insert("swapped".into(), json!(swap));
    let mut table = Vec::new();
    for (label, per) in [("100ms", 1usize), ("500ms", 5), ("1s", 10)] {
        let all: Vec<Vec<f64>> = traces.iter().map(|t| series(t, per)).collect();
        let (train, held) = all.split_at(TRAIN);
        let fitted = pba::fit(train);
        let mut best = (String::new(), f64::INFINITY);
        for p in &fitted {
            let m = pba::mean_mape(p.as_ref(), held);
            let fam = pba::family(&p.name()).to_string();
            let w = held.iter().map(|h| pba::wape(p.as_ref(), h)).sum::<f64>() / held.len().max(1) as f64;
            table.push((label, p.name(), pba::mean_mape(p.as_ref(), train), m, w));
            figures.insert(format!("wape_{}_{label}", fam.replace('-', "_")), json!(w));
            figures.insert(format!("mape_{}_{label}", fam.replace('-', "_")), json!(m));
            if m < best.1 {
                best = (p.name(), m);
            }
        }
        figures.insert(format!("best_mape_{label}"), json!(best.1));
        figures.insert(format!("best_{label}"), json!(best.0));
    }
    let cal = calibration(&traces, &mut figures);
    let send = send_interval(&traces, swap, &mut figures);
    let intervals: usize = traces.iter().map(Vec::len).sum();
    figures.insert("traces".into(), json!(TRACES));
    figures.insert("held_out".into(), json!(TRACES - TRAIN));
    figures.insert("intervals".into(), json!(intervals));
    println!("bench-pba: {} traces ({} intervals of 100 ms), fitted on {TRAIN}, scored on the {} held out", TRACES, intervals, TRACES - TRAIN);
    println!("{:<7} {:<40} {:>11} {:>14} {:>14}", "period", "predictor (fitted)", "train MAPE", "held-out MAPE", "held-out WAPE");
    for (label, name, tr, m, w) in &table {
        println!("{label:<7} {name:<40} {tr:>10.2}% {m:>13.2}% {w:>13.2}%");
    }
    println!();
    println!("{:.0}% prediction intervals on the held-out traces (coverage per trace in brackets)", COVERAGE * 100.0);
    println!("{:<7} {:<52} {:>9} {:>22} {:>11}", "period", "calibrated predictor (fitted)", "coverage", "per trace", "width Mb/s");
    for c in &cal {
        let per: Vec<String> = c.per_trace.iter().map(|v| format!("{v:.2}")).collect();
        println!("{:<7} {:<52} {:>8.1}% {:>22} {:>11.1}", c.label, c.name, c.coverage * 100.0, per.join(" "), c.width / 1e6);
    }
    println!("{send}");
    benches::emit(&root.join("target/bench/pba.json"), Value::Object(figures));
}

/// The sender's own 1 s interval (`pba::SecondInterval`: EWMA of `SEND_ALPHA`, `SEND_WINDOW`,
/// `SEND_GAMMA`, `SEND_PRIOR`) scored on the held-out traces; and whether those constants are
/// still what the training traces give.
fn send_interval(traces: &[Vec<TraceRow>], swap: bool, figures: &mut serde_json::Map<String, Value>) -> String {
    let all: Vec<Vec<f64>> = traces.iter().map(|t| series(t, pba::SECOND_INTERVALS)).collect();
    let (train, held) = all.split_at(TRAIN);
    let ewma = pba::Ewma::new(pba::SEND_ALPHA);
    let per: Vec<pba::Calibration> = held.iter().map(|h| pba::calibration(&ewma, COVERAGE, pba::SEND_WINDOW, pba::SEND_GAMMA, &pba::SEND_PRIOR, h)).collect();
    let total = per.iter().fold(pba::Calibration::default(), |a, c| a + *c);
    let covs: Vec<f64> = per.iter().map(pba::Calibration::coverage).collect();
    figures.insert("coverage80_1s_send".into(), json!(total.coverage()));
    figures.insert("coverage80_1s_send_per_trace".into(), benches::Figure::new(covs.clone()).json());
    let per_s: Vec<String> = covs.iter().map(|c| format!("{c:.2}")).collect();
    let mut out = format!(
        "the sender's 1 s interval ({}, window {}, step {}): held-out coverage {:.1}% (per trace {}), width {:.1} Mb/s",
        pba::Predictor::name(&ewma),
        pba::SEND_WINDOW,
        pba::SEND_GAMMA,
        total.coverage() * 100.0,
        per_s.join(" "),
        total.mean_width() / 1e6
    );
    let fit = pba::fit_calibration(&ewma, COVERAGE, train);
    let prior = pba::prior_quantiles(&pba::ratios(&ewma, train));
    if !swap && (fit != (pba::SEND_WINDOW, pba::SEND_GAMMA) || prior != pba::SEND_PRIOR) {
        out.push_str(&format!("\nthe training traces now give window {}, step {}, prior {prior:?}: update pba::SEND_*", fit.0, fit.1));
    }
    out
}

/// One calibrated predictor's result on the held-out traces.
struct Cal {
    label: &'static str,
    name: String,
    coverage: f64,
    per_trace: Vec<f64>,
    width: f64,
}

/// The 80% intervals at each period: the best-fitted family (least training MAPE) and the
/// last-value baseline, each with its window and step fitted on the training traces and its
/// prior from them; scored on each held-out trace from a fresh start.
fn calibration(traces: &[Vec<TraceRow>], figures: &mut serde_json::Map<String, Value>) -> Vec<Cal> {
    let mut out = Vec::new();
    for (label, per) in [("100ms", 1usize), ("500ms", 5), ("1s", 10)] {
        let all: Vec<Vec<f64>> = traces.iter().map(|t| series(t, per)).collect();
        let (train, held) = all.split_at(TRAIN);
        let best = pba::fit(train).into_iter().min_by(|a, b| pba::mean_mape(a.as_ref(), train).total_cmp(&pba::mean_mape(b.as_ref(), train))).expect("four families");
        let mut widths = Vec::new();
        for p in [best, Box::new(pba::Last::default()) as Box<dyn pba::Predictor>] {
            let (w, g) = pba::fit_calibration(p.as_ref(), COVERAGE, train);
            let prior = pba::ratios(p.as_ref(), train);
            let per_trace: Vec<pba::Calibration> = held.iter().map(|h| pba::calibration(p.as_ref(), COVERAGE, w, g, &prior, h)).collect();
            let total = per_trace.iter().fold(pba::Calibration::default(), |a, c| a + *c);
            let fam = pba::family(&p.name()).replace('-', "_");
            let covs: Vec<f64> = per_trace.iter().map(pba::Calibration::coverage).collect();
            figures.insert(format!("coverage80_{fam}_{label}"), json!(total.coverage()));
            figures.insert(format!("coverage80_{fam}_{label}_runs"), json!(covs));
            widths.push(total.mean_width());
            if widths.len() == 1 {
                figures.insert(format!("coverage80_{label}"), json!(total.coverage()));
                figures.insert(format!("coverage80_{label}_per_trace"), benches::Figure::new(covs.clone()).json());
                figures.insert(format!("coverage80_{label}_intervals"), json!(total.n));
            }
            out.push(Cal { label, name: pba::Calibrated::new(p.as_ref(), COVERAGE, w, g, &[]).name(), coverage: total.coverage(), per_trace: covs, width: total.mean_width() });
        }
        figures.insert(format!("width80_vs_last_{label}"), json!(widths[0] / widths[1]));
    }
    out
}
