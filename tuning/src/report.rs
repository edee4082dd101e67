//! `dwcp report`: the benches' JSON (`target/bench/*.json`), the microbenchmarks' estimates
//! (criterion's `target/criterion`) and a tuning sweep (`target/tune/summary.json`) rendered as
//! one Markdown page with plots, so a reader sees each comparison at a glance.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use plotters::prelude::*;
use serde_json::{Value, json};

/// A figure found in a bench's JSON: its runs' median, least and greatest.
#[derive(Debug, Clone, PartialEq)]
pub struct Figure {
    /// Where in the JSON (`cases.dwcp_mem_8_streams`).
    pub case: String,
    /// What it measures (`gbps`).
    pub metric: String,
    /// Median.
    pub median: f64,
    /// Least.
    pub min: f64,
    /// Greatest.
    pub max: f64,
    /// Runs.
    pub runs: usize,
}

/// Every object with `median`, `min` and `max` in `v` (the benches' shared figure shape).
pub fn figures(v: &Value) -> Vec<Figure> {
    fn walk(v: &Value, path: &mut Vec<String>, out: &mut Vec<Figure>) {
        let Some(o) = v.as_object() else { return };
        if let (Some(median), Some(min), Some(max)) = (o.get("median").and_then(Value::as_f64), o.get("min").and_then(Value::as_f64), o.get("max").and_then(Value::as_f64)) {
            let metric = path.last().cloned().unwrap_or_default();
            let case = path[..path.len().saturating_sub(1)].join(".");
            out.push(Figure { case, metric, median, min, max, runs: o.get("runs").and_then(Value::as_array).map_or(0, Vec::len) });
            return;
        }
        for (k, x) in o {
            if k == "machine" {
                continue;
            }
            path.push(k.clone());
            walk(x, path, out);
            path.pop();
        }
    }
    let mut out = Vec::new();
    walk(v, &mut Vec::new(), &mut out);
    out
}

/// The top-level numbers of a bench's JSON (its headline figures and ratios).
fn headline(v: &Value) -> Vec<(String, f64)> {
    v.as_object().map(|o| o.iter().filter_map(|(k, x)| Some((k.clone(), x.as_f64()?))).collect()).unwrap_or_default()
}

/// One microbenchmark's estimate.
#[derive(Debug, Clone, PartialEq)]
pub struct Micro {
    /// `group/function[/input]`.
    pub name: String,
    /// Mean time per iteration, ns, and its 95% interval.
    pub mean_ns: f64,
    /// Lower end.
    pub lo_ns: f64,
    /// Upper end.
    pub hi_ns: f64,
    /// GiB/s at the mean, when the bench declares bytes per iteration.
    pub gib_s: Option<f64>,
}

impl Micro {
    /// Read back from a `micro.json`'s cases.
    fn from_json(v: &Value) -> Vec<Micro> {
        let Some(cases) = v["cases"].as_object() else { return Vec::new() };
        cases
            .iter()
            .filter_map(|(name, c)| {
                Some(Micro { name: name.clone(), mean_ns: c["mean_ns"].as_f64()?, lo_ns: c["ci95_ns"][0].as_f64()?, hi_ns: c["ci95_ns"][1].as_f64()?, gib_s: c["gib_s"].as_f64() })
            })
            .collect()
    }
}

/// Criterion's latest estimates under `dir` (`target/criterion`).
pub fn criterion(dir: &Path) -> Vec<Micro> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                if p.file_name().is_some_and(|n| n == "new") {
                    let read = |f: &str| std::fs::read_to_string(p.join(f)).ok().and_then(|s| serde_json::from_str::<Value>(&s).ok());
                    if let (Some(est), Some(b)) = (read("estimates.json"), read("benchmark.json")) {
                        let m = &est["mean"];
                        if let (Some(mean), Some(lo), Some(hi)) =
                            (m["point_estimate"].as_f64(), m["confidence_interval"]["lower_bound"].as_f64(), m["confidence_interval"]["upper_bound"].as_f64())
                        {
                            let gib_s = b["throughput"]["Bytes"].as_u64().map(|n| n as f64 / (mean * 1e-9) / (1u64 << 30) as f64);
                            out.push(Micro { name: b["full_id"].as_str().unwrap_or("?").to_string(), mean_ns: mean, lo_ns: lo, hi_ns: hi, gib_s });
                        }
                    }
                } else if p.file_name().is_none_or(|n| n != "report" && n != "base" && n != "change") {
                    stack.push(p);
                }
            }
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// The microbenchmarks as a bench JSON (`target/bench/micro.json`): per case the mean, its
/// interval, and GiB/s where a throughput is declared.
pub fn micro_json(ms: &[Micro]) -> Value {
    let cases: serde_json::Map<String, Value> = ms
        .iter()
        .map(|m| {
            // GiB/s scales as 1/time: the interval's ends swap.
            let gib = |ns: f64| m.gib_s.map(|g| g * m.mean_ns / ns);
            (m.name.clone(), json!({"mean_ns": m.mean_ns, "ci95_ns": [m.lo_ns, m.hi_ns], "gib_s": m.gib_s, "gib_s_ci95": [gib(m.hi_ns), gib(m.lo_ns)]}))
        })
        .collect();
    json!({"bench": "micro", "cases": cases, "machine": crate::machine::machine()})
}

fn fmt_ns(ns: f64) -> String {
    match ns {
        n if n < 1e3 => format!("{n:.1} ns"),
        n if n < 1e6 => format!("{:.1} µs", n / 1e3),
        n => format!("{:.2} ms", n / 1e6),
    }
}

/// A readable table of the microbenchmarks.
pub fn micro_table(ms: &[Micro]) -> String {
    let mut t = format!("{:<36} {:>12} {:>24} {:>10}\n", "case", "mean", "95% interval", "GiB/s");
    for m in ms {
        let gib = m.gib_s.map_or(String::new(), |g| format!("{g:.2}"));
        let _ = writeln!(t, "{:<36} {:>12} {:>24} {:>10}", m.name, fmt_ns(m.mean_ns), format!("{} - {}", fmt_ns(m.lo_ns), fmt_ns(m.hi_ns)), gib);
    }
    t
}

/// A horizontal bar chart of one metric's medians with min-max whiskers, as SVG and PNG.
fn bars(title: &str, figs: &[&Figure], path: &Path) -> Result<(), String> {
    crate::plot::font()?;
    let h = 80 + 28 * figs.len() as u32;
    draw_bars(&SVGBackend::new(&path.with_extension("svg"), (900, h)).into_drawing_area(), title, figs)?;
    draw_bars(&BitMapBackend::new(&path.with_extension("png"), (900, h)).into_drawing_area(), title, figs)
}

fn draw_bars<DB: DrawingBackend>(area: &DrawingArea<DB, plotters::coord::Shift>, title: &str, figs: &[&Figure]) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| format!("drawing {title}: {e}");
    area.fill(&WHITE).map_err(e)?;
    let hi = figs.iter().map(|f| f.max).fold(0.0f64, f64::max).max(1e-12) * 1.1;
    let n = figs.len();
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(260)
        .build_cartesian_2d(0f64..hi, -0.5f64..(n as f64 - 0.5))
        .map_err(e)?;
    let labels: Vec<String> = figs.iter().map(|f| f.case.trim_start_matches("cases.").to_string()).collect();
    chart
        .configure_mesh()
        .y_labels(n)
        .y_label_formatter(&|y| {
            let i = y.round();
            if (y - i).abs() < 1e-6 && i >= 0.0 { labels.get(n - 1 - i as usize).cloned().unwrap_or_default() } else { String::new() }
        })
        .disable_y_mesh()
        .draw()
        .map_err(e)?;
    let color = Palette99::pick(1).to_rgba();
    chart
        .draw_series(figs.iter().enumerate().map(|(i, f)| {
            let y = (n - 1 - i) as f64;
            Rectangle::new([(0.0, y - 0.35), (f.median, y + 0.35)], color.mix(0.7).filled())
        }))
        .map_err(e)?;
    chart
        .draw_series(figs.iter().enumerate().map(|(i, f)| ErrorBar::new_horizontal((n - 1 - i) as f64, f.min, f.median, f.max, BLACK.stroke_width(1), 8)))
        .map_err(e)?;
    area.present().map_err(e)?;
    Ok(())
}

fn machine_line(m: &Value) -> String {
    if m.is_null() {
        return "machine not recorded (a bench JSON from before the machine field)".into();
    }
    format!(
        "commit {}{}, kernel {}, {} ({} CPUs), {}",
        m["commit"].as_str().unwrap_or("?"),
        if m["dirty"] == true { " (with changes)" } else { "" },
        m["kernel"].as_str().unwrap_or("?"),
        m["cpu"].as_str().unwrap_or("?"),
        m["cpus"],
        m["date"].as_str().unwrap_or("?")
    )
}

/// Writes `out/report.md` and its plots from the bench JSON files in `bench_dir`, criterion's
/// estimates in `criterion_dir` and the sweep in `tune_dir` (any of them may be missing);
/// returns the page's path.
pub fn render(bench_dir: &Path, criterion_dir: &Path, tune_dir: &Path, out: &Path) -> Result<PathBuf, String> {
    std::fs::create_dir_all(out).map_err(|e| format!("creating {}: {e}", out.display()))?;
    let mut md = String::from("# dwcp benchmark report\n\n");
    let _ = writeln!(md, "Rendered by `dwcp report` on {}.\n", machine_line(&crate::machine::machine()));
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(bench_dir).map(|rd| rd.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "json")).collect()).unwrap_or_default();
    files.sort();
    let mut benches = 0;
    let (mut micro_from_json, mut micro_machine) = (Vec::new(), Value::Null);
    for f in &files {
        let Some(v) = std::fs::read_to_string(f).ok().and_then(|s| s.lines().rfind(|l| !l.trim().is_empty()).and_then(|l| serde_json::from_str::<Value>(l).ok())) else {
            let _ = writeln!(md, "- `{}`: not a bench's JSON line, left out\n", f.display());
            continue;
        };
        let name = v["bench"].as_str().map(String::from).unwrap_or_else(|| f.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default());
        benches += 1;
        if name == "micro" {
            micro_from_json = Micro::from_json(&v);
            micro_machine = v["machine"].clone();
            continue;
        }
        let _ = writeln!(md, "## {name}\n\n{}\n", machine_line(&v["machine"]));
        let head = headline(&v);
        if !head.is_empty() {
            md.push_str("| figure | value |\n|---|---:|\n");
            for (k, x) in &head {
                let _ = writeln!(md, "| `{k}` | {x:.4} |");
            }
            md.push('\n');
        }
        let figs = figures(&v);
        let mut by_metric: BTreeMap<&str, Vec<&Figure>> = BTreeMap::new();
        for fig in &figs {
            by_metric.entry(fig.metric.as_str()).or_default().push(fig);
        }
        for (metric, fs) in by_metric {
            let file = format!("{name}-{metric}");
            match bars(&format!("{name}: {metric} (median, min-max over runs)"), &fs, &out.join(&file)) {
                Ok(()) => {
                    let _ = writeln!(md, "![{name} {metric}]({file}.png)\n");
                }
                Err(e) => {
                    let _ = writeln!(md, "(no plot of {metric}: {e})\n");
                }
            }
            md.push_str("| case | median | min | max | runs |\n|---|---:|---:|---:|---:|\n");
            for f in fs {
                let _ = writeln!(md, "| {} | {:.4} | {:.4} | {:.4} | {} |", f.case.trim_start_matches("cases."), f.median, f.min, f.max, f.runs);
            }
            md.push('\n');
        }
    }
    if benches == 0 {
        let _ = writeln!(md, "No bench JSON in `{}`: run `make bench-NAME` first.\n", bench_dir.display());
    }
    // Criterion's own estimates when they are here, else the micro.json a bench run left.
    let mut micro = criterion(criterion_dir);
    if micro.is_empty() {
        micro = micro_from_json;
    } else {
        micro_machine = crate::machine::machine();
    }
    if !micro.is_empty() {
        let _ = writeln!(md, "## Microbenchmarks (criterion, `make bench-micro`)\n\n{}\n", machine_line(&micro_machine));
        md.push_str("```\n");
        md.push_str(&micro_table(&micro));
        md.push_str("```\n\n");
    }
    if let Some(s) = std::fs::read_to_string(tune_dir.join("summary.json")).ok().and_then(|s| serde_json::from_str::<Value>(&s).ok()) {
        let o = &s["outcome"];
        let _ = writeln!(md, "## Tuning sweep (`dwcp tune`, target {})\n\n{}\n", s["target"].as_str().unwrap_or("?"), machine_line(&s["machine"]));
        let _ = writeln!(md, "Recommended: `{}`", o["recommended"].as_str().unwrap_or("?"));
        if let (Some(g), Some(lo), Some(hi)) = (o["gain"]["value"].as_f64(), o["gain"]["lo"].as_f64(), o["gain"]["hi"].as_f64()) {
            let _ = writeln!(md, ", {g:.2}x the defaults' {} (95% interval {lo:.2}-{hi:.2}).\n", s["objective"].as_str().unwrap_or("objective"));
        }
        for p in s["plots"].as_array().into_iter().flatten().filter_map(Value::as_str) {
            let src = Path::new(p);
            if let Some(name) = src.file_name() {
                let dst = out.join(format!("tune-{}", name.to_string_lossy()));
                if std::fs::copy(src, &dst).is_ok() {
                    let _ = writeln!(md, "![{}]({})\n", name.to_string_lossy(), dst.file_name().unwrap_or_default().to_string_lossy());
                }
            }
        }
    }
    let page = out.join("report.md");
    std::fs::write(&page, md).map_err(|e| format!("writing {}: {e}", page.display()))?;
    Ok(page)
}
