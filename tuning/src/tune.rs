//! `dwcp tune`: runs a sweep on a target, writes every run to `OUT/runs.csv` as it ends (a sweep
//! resumes from it), then the plots (`OUT/KNOB.svg`, `.png`), the recommended config
//! (`OUT/recommended.toml`, the daemon's TOML, which `dwcp config check` accepts), the summary
//! (`OUT/summary.json`), a table, and one JSON line last.

use std::io::Write;
use std::path::{Path, PathBuf};

use ctlplane::engine::Request;
use dataplane::crypto::Psk;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::runner::{EngineRunner, Target};
use crate::stats::Stopping;
use crate::sweep::{Event, Knob, Objective, Outcome, Point, Record, Strategy, Sweep};

/// `dwcp tune`'s flags.
#[derive(Debug, clap::Args)]
pub struct TuneArgs {
    /// A peer's receiver, HOST:PORT (`dwcp recv --discard` there); default: a receiver on
    /// loopback in this process.
    #[arg(long)]
    pub to: Option<String>,
    /// Pre-shared key file (required with --to; a random key on loopback).
    #[arg(long, env = "DWCP_KEY_FILE")]
    pub key_file: Option<PathBuf>,
    /// What each run sends: gen:SIZE or a file.
    #[arg(long, default_value = "gen:256MiB")]
    pub source: String,
    /// A knob and its values, KNOB=V1,V2,... (repeat the flag): streams, chunk_size, window,
    /// zerocopy (on, off), acp (off, delay, bbr-model), compress (off, a level; with --hde),
    /// cores (0, 0-3, 0+2), rdma_qps (1-64) and rdma_poll (busy, event) over RDMA. Default:
    /// streams=1,2,4,8 chunk_size=256KiB,1MiB,4MiB window=8,32 zerocopy=off,on.
    #[arg(long = "knob", value_name = "KNOB=V,...")]
    pub knobs: Vec<String>,
    /// Every combination of the knobs' values, instead of one knob at a time from the defaults.
    #[arg(long)]
    pub grid: bool,
    /// What to optimise.
    #[arg(long, default_value = "goodput", value_parser = ["goodput", "cpu"])]
    pub objective: String,
    /// Runs every point gets.
    #[arg(long, default_value_t = 3)]
    pub min_runs: usize,
    /// Runs no point gets more than.
    #[arg(long, default_value_t = 8)]
    pub max_runs: usize,
    /// A point is done once its 95% interval is within this fraction of its mean.
    #[arg(long, default_value_t = 0.05)]
    pub rel_ci: f64,
    /// Time the runs may take in all (prior runs of a resumed sweep included): 90s, 20m, 2h.
    #[arg(long, default_value = "20m")]
    pub budget: String,
    /// HDE on for every run (for sweeps of compress on a memory image; on loopback the receiver
    /// then writes into a temporary directory, as HDE decodes into a file). Off otherwise.
    #[arg(long)]
    pub hde: bool,
    /// Configuration file whose [mode] thresholds the runs use.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Where the CSV, plots, config and summary go.
    #[arg(long, default_value = "target/tune")]
    pub out: PathBuf,
    /// Continue the sweep in OUT (its runs.csv) instead of refusing to overwrite it.
    #[arg(long)]
    pub resume: bool,
    /// No table, no progress bar: only the JSON line.
    #[arg(long)]
    pub json: bool,
}

/// Parses `90`, `90s`, `20m`, `2h` into seconds.
pub fn parse_budget(s: &str) -> Result<f64, String> {
    let (num, mult) = match s.trim().char_indices().last() {
        Some((i, 's')) => (&s[..i], 1.0),
        Some((i, 'm')) => (&s[..i], 60.0),
        Some((i, 'h')) => (&s[..i], 3600.0),
        _ => (s, 1.0),
    };
    num.trim().parse::<f64>().ok().filter(|v| v.is_finite() && *v > 0.0).map(|v| v * mult).ok_or_else(|| format!("--budget {s:?}: expected a duration like 90s, 20m or 2h"))
}

fn knobs(specs: &[String]) -> Result<Vec<(Knob, Vec<String>)>, String> {
    let specs: Vec<String> = if specs.is_empty() {
        ["streams=1,2,4,8", "chunk_size=256KiB,1MiB,4MiB", "window=8,32", "zerocopy=off,on"].map(String::from).to_vec()
    } else {
        specs.to_vec()
    };
    let mut out: Vec<(Knob, Vec<String>)> = Vec::new();
    for s in &specs {
        let (k, vs) = s.split_once('=').ok_or_else(|| format!("--knob {s:?}: expected KNOB=V1,V2"))?;
        let k = Knob::parse(k)?;
        let vs: Vec<String> = vs.split(',').map(str::trim).filter(|v| !v.is_empty()).map(String::from).collect();
        if vs.is_empty() {
            return Err(format!("--knob {s:?}: no values"));
        }
        // Each value is checked now, not an hour into the sweep.
        for v in &vs {
            Point::defaults().with(k, v).apply(&mut Request::default())?;
        }
        if out.iter().any(|(o, _)| *o == k) {
            return Err(format!("--knob {}: given twice", k.name()));
        }
        out.push((k, vs));
    }
    Ok(out)
}

fn read_runs(path: &Path) -> Result<Vec<Record>, String> {
    let mut rd = csv::Reader::from_path(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    rd.deserialize().collect::<Result<Vec<Record>, _>>().map_err(|e| format!("{}: {e} (not a runs.csv of dwcp tune?)", path.display()))
}

/// Runs `dwcp tune`.
pub fn run(a: &TuneArgs) -> Result<(), String> {
    let sweep = Sweep {
        knobs: knobs(&a.knobs)?,
        strategy: if a.grid { Strategy::Grid } else { Strategy::Search },
        stopping: Stopping { min_runs: a.min_runs.max(2), max_runs: a.max_runs.max(a.min_runs.max(2)), rel_ci: a.rel_ci },
        budget_s: parse_budget(&a.budget)?,
        objective: if a.objective == "cpu" { Objective::Cpu } else { Objective::Goodput },
    };
    if !(a.rel_ci > 0.0 && a.rel_ci < 1.0) {
        return Err(format!("--rel-ci {}: expected a fraction between 0 and 1", a.rel_ci));
    }
    std::fs::create_dir_all(&a.out).map_err(|e| format!("creating {}: {e}", a.out.display()))?;
    let csv_path = a.out.join("runs.csv");
    let prior = match (csv_path.exists(), a.resume) {
        (true, true) => read_runs(&csv_path)?,
        (true, false) => return Err(format!("{} exists: pass --resume to continue that sweep, or --out another directory", csv_path.display())),
        (false, _) => Vec::new(),
    };
    let (target, psk) = match &a.to {
        Some(to) => {
            let k = a.key_file.as_ref().ok_or("--to needs --key-file (the key the peer's receiver has)")?;
            (Target::Peer(to.clone()), Psk::from_file(k).map_err(|e| format!("{}: {e}", k.display()))?)
        }
        None => (Target::Loopback, Psk::generate()),
    };
    let thresholds = match &a.config {
        Some(p) => ctlplane::config::Config::load(Some(p), std::env::vars(), &[]).map_err(|e| e.to_string())?.thresholds(),
        None => ctlplane::mode::Thresholds::default(),
    };
    let base = Request {
        source: a.source.clone(),
        name: Some("dwcp-tune.img".into()),
        // Without --hde the runs measure the transport (a discarding receiver cannot take HDE).
        hde: if a.hde { ctlplane::engine::plan::Choice::On } else { ctlplane::engine::plan::Choice::Off },
        ..Default::default()
    };
    let target_name = match &target {
        Target::Loopback => "loopback".to_string(),
        Target::Peer(p) => p.clone(),
    };
    let mut runner = EngineRunner::new(target, base, psk, thresholds)?;

    let new_file = !csv_path.exists();
    let f = std::fs::OpenOptions::new().create(true).append(true).open(&csv_path).map_err(|e| format!("opening {}: {e}", csv_path.display()))?;
    let mut w = csv::WriterBuilder::new().has_headers(new_file).from_writer(f);
    let bar = (!a.json).then(|| {
        let b = ProgressBar::new(0);
        b.set_style(ProgressStyle::with_template("{spinner} [{elapsed_precise}] point {pos}/{len} {wide_msg}").expect("template"));
        b
    });
    let mut write_err = None;
    let outcome = sweep.run(&mut runner, &prior, |e| match e {
        Event::Point(p, i, n) => {
            if let Some(b) = &bar {
                b.set_length(n as u64);
                b.set_position(i as u64 + 1);
                b.set_message(format!("{p}"));
            }
        }
        Event::Run(r) => {
            if let Err(e) = w.serialize(r).and_then(|()| w.flush().map_err(csv::Error::from)) {
                write_err.get_or_insert(format!("writing {}: {e}", csv_path.display()));
            }
            if let Some(b) = &bar {
                b.set_message(format!("{} run {}: {:.2} Gbit/s", r.point, r.run, r.goodput_gbps));
            }
        }
        Event::Failed(p, why) => {
            let line = format!("{p}: failed, skipped: {why}");
            match &bar {
                Some(b) => b.println(line),
                None => eprintln!("dwcp tune: {line}"),
            }
        }
    })?;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    if let Some(e) = write_err {
        return Err(e);
    }
    drop(runner);

    let mut plots = Vec::new();
    for s in &outcome.slices {
        let base = a.out.join(s.knob.name());
        match crate::plot::knob(s, &outcome.points, &base) {
            Ok(()) => plots.push(base.with_extension("png")),
            Err(e) => eprintln!("dwcp tune: no plot of {}: {e}", s.knob.name()),
        }
    }
    let machine = crate::machine::machine();
    let toml_path = a.out.join("recommended.toml");
    std::fs::write(&toml_path, recommended_toml(&outcome, &sweep, &target_name, &machine)?).map_err(|e| format!("writing {}: {e}", toml_path.display()))?;
    let summary = json!({
        "schema": 1,
        "target": target_name,
        "source": a.source,
        "strategy": sweep.strategy,
        "objective": sweep.objective,
        "stopping": sweep.stopping,
        "budget_s": sweep.budget_s,
        "outcome": outcome,
        "csv": csv_path,
        "plots": plots,
        "recommended_toml": toml_path,
        "machine": machine,
    });
    std::fs::write(a.out.join("summary.json"), format!("{summary:#}\n")).map_err(|e| format!("writing summary.json: {e}"))?;
    if !a.json {
        print_table(&outcome, &sweep, &toml_path);
    }
    println!("{summary}");
    Ok(())
}

fn print_table(o: &Outcome, s: &Sweep, toml: &Path) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{:<44} {:>4} {:>18} {:>16} {:>14}", "point", "runs", "goodput Gbit/s", "CPU s/GB", "RTT ms");
    for p in &o.points {
        let mark = if p.point == o.recommended { "*" } else { " " };
        let _ = writeln!(
            out,
            "{mark}{:<43} {:>3}{} {:>9.2} ± {:<6.2} {:>7.3} ± {:<6.3} {:>6.2} ± {:<5.2}",
            p.point,
            p.goodput.n,
            if p.complete { " " } else { "!" },
            p.goodput.mean,
            p.goodput.ci95,
            p.cpu.mean,
            p.cpu.ci95,
            p.rtt.mean,
            p.rtt.ci95
        );
    }
    let _ = writeln!(out, "(± is the 95% interval of the mean; ! the point did not meet its rule before the budget ran out)");
    match &o.gain {
        Some(g) if o.recommended != "defaults" => {
            let _ = writeln!(out, "recommended: {} — {:?} {:.2}x the defaults' (95% interval {:.2}-{:.2}); written to {}", o.recommended, s.objective, g.value, g.lo, g.hi, toml.display());
        }
        _ => {
            let _ = writeln!(out, "recommended: the defaults — no point beat them beyond the noise; written to {}", toml.display());
        }
    }
    if o.budget_exhausted {
        let _ = writeln!(out, "the budget ran out: continue with --resume and a larger --budget");
    }
}

/// The daemon's TOML: the recommended point's `[transfer]`, with how it was measured.
fn recommended_toml(o: &Outcome, s: &Sweep, target: &str, m: &serde_json::Value) -> Result<String, String> {
    let p = Point::parse(&o.recommended)?;
    let d = p.apply(&mut Request::default())?;
    let mut t = String::new();
    t.push_str(&format!(
        "# Written by dwcp tune ({} sweep, objective {:?}) against {target}\n# on {} ({} CPUs, kernel {}), commit {}, {}.\n",
        if s.strategy == Strategy::Grid { "grid" } else { "search" },
        s.objective,
        m["cpu"].as_str().unwrap_or("?"),
        m["cpus"],
        m["kernel"].as_str().unwrap_or("?"),
        m["commit"].as_str().unwrap_or("?"),
        m["date"].as_str().unwrap_or("?")
    ));
    let find = |k: &str| o.points.iter().find(|m| m.point == k);
    if let (Some(r), Some(d0)) = (find(&o.recommended), find("defaults")) {
        t.push_str(&format!(
            "# goodput {:.2} ± {:.2} Gbit/s over {} runs against the defaults' {:.2} ± {:.2} over {} (95% intervals);\n# CPU {:.3} s/GB against {:.3}.\n",
            r.goodput.mean, r.goodput.ci95, r.goodput.n, d0.goodput.mean, d0.goodput.ci95, d0.goodput.n, r.cpu.mean, d0.cpu.mean
        ));
    }
    match (&o.gain, o.recommended.as_str()) {
        (_, "defaults") => t.push_str("# No setting beat the defaults beyond the noise: the plan's own choices stand.\n"),
        (Some(g), _) => t.push_str(&format!("# Gain over the defaults: {:.2}x (95% interval {:.2}-{:.2}).\n", g.value, g.lo, g.hi)),
        _ => {}
    }
    t.push_str("# Use it: dwcp send --config FILE ..., or the daemon's config file.\n\n[transfer]\n");
    t.push_str(&toml::to_string(&d).map_err(|e| format!("writing the TOML: {e}"))?);
    // What is written must load.
    ctlplane::config::Config::parse(&t, "recommended.toml").map_err(|e| format!("the recommended config does not load: {e}"))?;
    Ok(t)
}
