//! `make bench-boot`: boot to ready of the real daemon (in process: `ctlplane::daemon::run`, and
//! as a process: spawn `dwcp daemon` until `/readyz` answers 200), median and max of 20 runs; the
//! same graph run sequentially against level-parallel, with the speedup the graph allows (total
//! component time over the critical path); and a synthetic wide graph where the bound is 6, to
//! show what the executor achieves when the graph allows it. Prints a table, then one JSON line,
//! also written to `target/bench/boot.json`.

#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ctlplane::boot::{Component, Ctx, Graph, Phase, Spec};
use ctlplane::config::Config;
use serde_json::json;

const RUNS: usize = 20;

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(0.0, f64::max)
}

fn config(dir: &std::path::Path) -> Config {
    let key = dir.join("key");
    dataplane::crypto::Psk::generate().save(&key).expect("key");
    let src = format!(
        "[node]\nlisten = \"127.0.0.1:0\"\nout = \"{}\"\nkey_file = \"{}\"\n[api]\nlisten = \"127.0.0.1:0\"\n[log]\nlevel = \"warn\"\n",
        dir.join("out").display(),
        key.display()
    );
    Config::parse(&src, "bench").expect("config")
}

struct Sleep(String, u64, Vec<String>);
impl Component for Sleep {
    fn spec(&self) -> Spec {
        let deps: Vec<&str> = self.2.iter().map(String::as_str).collect();
        Spec::new(&self.0, Phase::Core).after(&deps)
    }
    fn start(&self, _: &Ctx) -> Result<(), String> {
        std::thread::sleep(Duration::from_millis(self.1));
        Ok(())
    }
}

fn get_status(addr: &str) -> Option<u16> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    write!(s, "GET /readyz HTTP/1.0\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_whitespace().nth(1)?.parse().ok()
}

fn main() {
    let dir = PathBuf::from("target/bench/boot");
    std::fs::create_dir_all(&dir).expect("dir");
    let (mut par, mut seq, mut bound) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..RUNS {
        let d = ctlplane::daemon::run(config(&dir), true).expect("boot");
        par.push(*d.state.boot_ms.lock().expect("lock"));
        let recs = d.state.boot.lock().expect("lock").clone();
        let total: f64 = recs.iter().map(|r| r.took.as_secs_f64()).sum();
        let mut levels = std::collections::BTreeMap::new();
        for r in &recs {
            let e = levels.entry((r.phase, r.level)).or_insert(0f64);
            *e = e.max(r.took.as_secs_f64());
        }
        bound.push(total / levels.values().sum::<f64>().max(1e-9));
        d.shutdown();
        let d = ctlplane::daemon::run(config(&dir), false).expect("boot sequential");
        seq.push(*d.state.boot_ms.lock().expect("lock"));
        d.shutdown();
    }
    // The process: spawn to /readyz 200.
    let exe = std::env::current_exe().expect("exe").parent().expect("dir").join("dwcp");
    let mut proc_ms = Vec::new();
    for i in 0..RUNS {
        let api = format!("127.0.0.1:{}", 7700 + i);
        let cfgf = dir.join("daemon.toml");
        std::fs::write(&cfgf, format!("[node]\nlisten = \"127.0.0.1:0\"\nout = \"{}\"\nkey_file = \"{}\"\n", dir.join("out").display(), dir.join("key").display())).expect("cfg");
        let t = Instant::now();
        let mut child = Command::new(&exe).args(["daemon", "--config"]).arg(&cfgf).args(["--api", &api]).stderr(Stdio::null()).spawn().expect("dwcp daemon");
        while get_status(&api) != Some(200) {
            assert!(t.elapsed() < Duration::from_secs(10), "daemon never ready");
            std::thread::sleep(Duration::from_micros(500));
        }
        proc_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let _ = child.kill();
        let _ = child.wait();
    }
    // A wide synthetic graph: one root, six 20 ms components on one level (bound 6).
    let mut comps: Vec<Arc<dyn Component>> = vec![Arc::new(Sleep("root".into(), 0, vec![]))];
    for i in 0..6 {
        comps.push(Arc::new(Sleep(format!("w{i}"), 20, vec!["root".into()])));
    }
    let g = Graph::new(comps).expect("graph");
    let (mut sp, mut ss) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        sp.push(g.boot(true).expect("boot").took.as_secs_f64());
        ss.push(g.boot(false).expect("boot").took.as_secs_f64());
    }
    let synth = benches::median(&ss) / benches::median(&sp);

    let (pm, sm) = (benches::median(&par), benches::median(&seq));
    println!("| measure | median ms | max ms |");
    println!("|---|---:|---:|");
    println!("| daemon boot to ready, level-parallel | {pm:.2} | {:.2} |", max(&par));
    println!("| daemon boot to ready, sequential | {sm:.2} | {:.2} |", max(&seq));
    println!("| `dwcp daemon` spawn to /readyz 200 | {:.2} | {:.2} |", benches::median(&proc_ms), max(&proc_ms));
    println!();
    println!("parallel_speedup (real graph)      {:.2}  (the graph allows at most {:.2})", sm / pm, benches::median(&bound));
    println!("synthetic wide graph speedup       {synth:.2}  (bound 6.00)");
    let j = json!({
        "bench": "boot", "runs": RUNS,
        "boot_ready_ms_median": pm, "boot_ready_ms_max": max(&par),
        "boot_sequential_ms_median": sm,
        "parallel_speedup": sm / pm, "parallel_speedup_bound": benches::median(&bound),
        "process_ready_ms_median": benches::median(&proc_ms), "process_ready_ms_max": max(&proc_ms),
        "synthetic_parallel_speedup": synth, "synthetic_bound": 6.0,
    });
    benches::emit(std::path::Path::new("target/bench/boot.json"), j);
}
