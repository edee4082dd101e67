//! `make bench-fleet`: jobs sharing one link through the daemon, on the WAN rig (`hw-tests/wan`:
//! 200 Mbit/s, 50 ms RTT, queue of one BDP). A mixed workload: two image copies (200 MiB, no
//! deadline) and three deadline transfers (40 MiB each, due 5, 8 and 11 s after submission:
//! what a migration's stream is to the link, a sized transfer that must end by a time; they are
//! not QEMU migrations). Submitted to one `dwcp daemon` (in `dwcp-a`) through `dwcp send
//! --via-daemon`, to a discarding receiver (in `dwcp-b`), under three policies in turns each
//! round:
//!   itp:  all five at once with their deadlines; the daemon shares the link earliest deadline
//!         first (`ctlplane::itp::share`)
//!   fair: all five at once without deadlines: the streams share the link as TCP does
//!   fcfs: one at a time in submission order (copy, deadline, copy, deadline, deadline)
//! Figures: deadlines met per policy (a job's finish is when its `dwcp send` exits, measured
//! from the round's start), makespan (the last finish), and the deadlines feasible on an ideal
//! link at the rig's payload rate (earliest deadline first, bytes over rate).
//!
//! The daemon keeps warm streams to the receiver (`[[peers]]`), as a host's daemon does: jobs
//! submitted together draw for them, the most urgent first (`itp` gives the earliest deadline
//! the warm start; `fair`, without deadlines, the first submitted; `fcfs` each job in turn when
//! they are back). Warm peers alone are measured by `make bench-warm`, migrations through the
//! daemon by `make bench-migrate` (method `daemon`).
//!
//!   bench-fleet [--rounds 3]

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use benches::{Figure, Proc, Wan, die, in_ns};

const ADDR_B: &str = "10.77.0.2";
const MIB: u64 = 1 << 20;
/// The rig's link, bit/s, and the share of it TCP payload gets (headers, 1500-byte MTU).
const RATE_BPS: f64 = 200e6;
const PAYLOAD: f64 = 0.956;

/// One job of the workload: name, size, deadline after submission (s).
struct Job {
    name: &'static str,
    bytes: u64,
    due_s: Option<f64>,
}

const WORKLOAD: [Job; 5] = [
    Job { name: "copy-1.img", bytes: 200 * MIB, due_s: None },
    Job { name: "mig-1", bytes: 40 * MIB, due_s: Some(5.0) },
    Job { name: "copy-2.img", bytes: 200 * MIB, due_s: None },
    Job { name: "mig-2", bytes: 40 * MIB, due_s: Some(8.0) },
    Job { name: "mig-3", bytes: 40 * MIB, due_s: Some(11.0) },
];

/// The deadlines an ideal link at the payload rate meets, earliest deadline first.
fn feasible() -> usize {
    let mut d: Vec<&Job> = WORKLOAD.iter().filter(|j| j.due_s.is_some()).collect();
    d.sort_by(|a, b| a.due_s.unwrap_or(0.0).total_cmp(&b.due_s.unwrap_or(0.0)));
    let mut bits = 0.0;
    d.iter()
        .filter(|j| {
            bits += j.bytes as f64 * 8.0;
            bits <= RATE_BPS * PAYLOAD * j.due_s.unwrap_or(0.0)
        })
        .count()
}

struct Env {
    dwcp: PathBuf,
    sock: PathBuf,
}

/// The daemon's HTTP endpoint, inside `dwcp-a`.
const API: &str = "127.0.0.1:7491";

/// `dwcp send --via-daemon` of one job; `deadline`: pass its deadline to the daemon.
fn submit(env: &Env, j: &Job, deadline: bool) -> Proc {
    let mut c = Command::new(&env.dwcp);
    c.args(["send", &format!("gen:{}", j.bytes), "--name", j.name, "--to", &format!("{ADDR_B}:7470")]);
    // Encrypted: the daemon's warm streams to the receiver carry encrypted TCP plans only.
    c.args(["--mode", "internet", "--hde", "off", "--streams", "4", "--json"]);
    if let (true, Some(d)) = (deadline, j.due_s) {
        c.args(["--deadline", &format!("{d}s")]);
    }
    c.arg("--via-daemon").arg(&env.sock);
    Proc(c.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("dwcp send --via-daemon"))
}

/// Waits for `p`; its finish time after `t0`, or the error it printed.
fn finish(p: &mut Proc, t0: Instant) -> Result<f64, String> {
    let st = p.0.wait().map_err(|e| e.to_string())?;
    let at = t0.elapsed().as_secs_f64();
    if st.success() {
        return Ok(at);
    }
    let mut e = String::new();
    if let Some(mut s) = p.0.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut s, &mut e);
    }
    Err(e)
}

/// One run of a policy: each job's finish (s after the round's start).
fn run(env: &Env, policy: &str) -> Vec<f64> {
    // Every policy starts with the daemon's warm streams parked (a job gives them back once its
    // session is verified).
    benches::warm_pool_ready(&env.dwcp, API);
    let t0 = Instant::now();
    let mut out = vec![0.0; WORKLOAD.len()];
    if policy == "fcfs" {
        for (k, j) in WORKLOAD.iter().enumerate() {
            let mut p = submit(env, j, false);
            out[k] = finish(&mut p, t0).unwrap_or_else(|e| die(&format!("fcfs {}: {e}", j.name)));
        }
        return out;
    }
    let mut procs: Vec<Proc> = WORKLOAD.iter().map(|j| submit(env, j, policy == "itp")).collect();
    // Polled, so that each finish is taken when it happens, not when the ones before it end.
    let mut left: Vec<usize> = (0..procs.len()).collect();
    while !left.is_empty() {
        left.retain(|&k| match procs[k].0.try_wait() {
            Ok(Some(_)) => {
                out[k] = finish(&mut procs[k], t0).unwrap_or_else(|e| die(&format!("{policy} {}: {e}", WORKLOAD[k].name)));
                false
            }
            _ => true,
        });
        std::thread::sleep(Duration::from_millis(20));
        if t0.elapsed() > Duration::from_secs(300) {
            die(&format!("{policy}: not done after 300 s"));
        }
    }
    out
}

fn met(finishes: &[f64]) -> usize {
    WORKLOAD.iter().zip(finishes).filter(|(j, f)| j.due_s.is_some_and(|d| **f <= d)).count()
}

fn makespan(finishes: &[f64]) -> f64 {
    finishes.iter().copied().fold(0.0, f64::max)
}

fn main() {
    let mut rounds = 3usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--rounds" => rounds = args.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| die("--rounds N")),
            _ => die(&format!("unknown argument {a}; usage: bench-fleet [--rounds N]")),
        }
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace").to_path_buf();
    let dwcp = root.join("target/release/dwcp");
    let dir = root.join("target/bench/fleet");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| die(&format!("{}: {e}", dir.display())));
    let key = dir.join("key");
    if !Command::new(&dwcp).args(["keygen", "--force"]).arg(&key).stderr(Stdio::null()).status().is_ok_and(|s| s.success()) {
        die("dwcp keygen failed (build first: make build)");
    }
    let _wan = Wan::up(&root, &["--rtt", "50ms", "--rate", "200mbit", "--loss", "0%", "--queue", "1bdp"]);
    let _rx = Proc(
        in_ns("dwcp-b", &dwcp)
            .args(["recv", "--listen", &format!("{ADDR_B}:7470"), "--discard", "--no-encrypt", "--key-file"])
            .arg(&key)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dwcp recv"),
    );
    let sock = dir.join("api.sock");
    let cfg = dir.join("dwcp.toml");
    let toml = format!(
        "[node]\nname = \"fleet-a\"\nlisten = \"10.77.0.1:7490\"\nout = \"{}\"\nkey_file = \"{}\"\n[api]\nlisten = \"{API}\"\nsocket = \"{}\"\n[mode]\nprobe_interval_s = 3600\n[[peers]]\nname = \"b\"\naddr = \"{ADDR_B}:7470\"\n",
        dir.join("out").display(),
        key.display(),
        sock.display()
    );
    std::fs::write(&cfg, toml).unwrap_or_else(|e| die(&format!("{}: {e}", cfg.display())));
    let _daemon = Proc(in_ns("dwcp-a", &dwcp).args(["daemon", "--config"]).arg(&cfg).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("dwcp daemon"));
    let t = Instant::now();
    while !sock.exists() {
        if t.elapsed() > Duration::from_secs(10) {
            die("the daemon did not open its jobs socket in 10 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let env = Env { dwcp, sock };
    eprintln!("warm pool: {}", benches::warm_pool_ready(&env.dwcp, API));
    let policies = ["itp", "fair", "fcfs"];
    let mut all: Vec<Vec<Vec<f64>>> = vec![Vec::new(); policies.len()];
    for r in 0..rounds {
        for (k, p) in policies.iter().enumerate() {
            let f = run(&env, p);
            eprintln!("round {} {p:<5} met {} makespan {:.1} s  finishes {:?}", r + 1, met(&f), makespan(&f), f.iter().map(|x| format!("{x:.1}")).collect::<Vec<_>>());
            all[k].push(f);
        }
    }
    report(&policies, &all, rounds);
}

fn report(policies: &[&str], all: &[Vec<Vec<f64>>], rounds: usize) {
    let feasible = feasible();
    println!("bench-fleet: 200 Mbit/s, 50 ms; two 200 MiB copies and three 40 MiB transfers due 5, 8 and 11 s; {rounds} rounds, medians");
    println!("{:<6} {:>14} {:>12}   per job, median finish (s): {}", "policy", "deadlines met", "makespan s", WORKLOAD.iter().map(|j| j.name).collect::<Vec<_>>().join(", "));
    let mut figures = serde_json::Map::new();
    let mut spans = Vec::new();
    for (p, runs) in policies.iter().zip(all) {
        let m = Figure::new(runs.iter().map(|f| met(f) as f64).collect());
        let s = Figure::new(runs.iter().map(|f| makespan(f)).collect());
        let per: Vec<String> = (0..WORKLOAD.len()).map(|k| format!("{:.1}", benches::median(&runs.iter().map(|f| f[k]).collect::<Vec<_>>()))).collect();
        println!("{p:<6} {:>10.0} of {feasible} {:>12.1}   {}", m.min(), s.median(), per.join(", "));
        figures.insert(format!("{p}_deadlines_met"), json!(m.min()));
        figures.insert(format!("{p}_deadlines_met_runs"), m.json());
        figures.insert(format!("{p}_makespan_s"), s.json());
        spans.push(s);
    }
    // Per round: ITP's makespan over the better of the other two in that round.
    let ratios = Figure::new((0..rounds).map(|r| all[0][r].iter().copied().fold(0.0, f64::max) / makespan(&all[1][r]).min(makespan(&all[2][r]))).collect());
    println!("ITP's makespan over the better other's, per round: {:?} (median {:.3})", ratios.runs.iter().map(|x| format!("{x:.3}")).collect::<Vec<_>>(), ratios.median());
    println!("(deadlines met: the least over the rounds)");
    figures.insert("deadlines_feasible".into(), json!(feasible));
    figures.insert("itp_makespan_vs_best_other".into(), ratios.json());
    figures.insert("rounds".into(), json!(rounds));
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace").to_path_buf();
    benches::emit(&root.join("target/bench/fleet.json"), Value::Object(figures));
}
