//! `make bench-transport`: dwcp against iperf3 on loopback, same machine, same run, same sizes.
//!
//! Cases: dwcp memory-to-memory (generated source, discarding sink) with 1, 4 and 8 streams,
//! plaintext and encrypted; dwcp file-to-file with 1, 4 and 8 streams; `iperf3 -P N -n SIZE` with
//! the same counts. Each case runs `BENCH_REPS` times (default 3) and the median is reported.
//! CPU seconds per GB add up both ends of each tool (from getrusage-backed figures: dwcp's own
//! report and /proc for its receiver, iperf3's `cpu_utilization_percent` for both of its ends).
//! With `BENCH_BASE=PATH` (`make bench-transport BASE=REV` builds REV for it) the plaintext
//! 8-stream cases also run with that build's dwcp at both ends, in the same run: what a change
//! between the two costs (the per-frame MAC of plaintext sessions, measured so).
//! Prints a table, then one JSON line, also written to `target/bench/transport.json`.

#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

struct Case {
    label: String,
    /// Medians.
    gbps: f64,
    cpu_s_per_gb: f64,
    /// Every run.
    runs: (benches::Figure, benches::Figure),
}

fn dwcp_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("exe");
    exe.parent().expect("dir").join("dwcp")
}

fn port(base: u16, i: u16) -> u16 {
    base + i
}

fn proc_cpu_s(pid: u32) -> f64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    let after = &s[s.rfind(')').map_or(0, |i| i + 2)..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime) are at 11 and 12 after the command name; clock ticks of 1/100 s.
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (t(11) + t(12)) / 100.0
}

struct Receiver {
    child: Child,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

fn start_receiver(bin: &Path, key: &Path, port: u16, sink: &[&str]) -> Receiver {
    let mut child = Command::new(bin)
        .args(["recv", "--listen", &format!("127.0.0.1:{port}"), "--no-encrypt", "--json", "--key-file"])
        .arg(key)
        .args(sink)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start dwcp recv");
    let lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    std::thread::sleep(Duration::from_millis(300));
    Receiver { child, lines }
}

fn dwcp_run(key: &Path, port: u16, src: &str, streams: u16, encrypt: bool, sink: &[&str], size: u64) -> (f64, f64) {
    dwcp_run_with(&dwcp_bin(), key, port, src, streams, encrypt, sink, size)
}

#[allow(clippy::too_many_arguments)]
fn dwcp_run_with(bin: &Path, key: &Path, port: u16, src: &str, streams: u16, encrypt: bool, sink: &[&str], size: u64) -> (f64, f64) {
    let mut rx = start_receiver(bin, key, port, sink);
    let mut cmd = Command::new(bin);
    cmd.args(["send", src, "--to", &format!("127.0.0.1:{port}"), "--json", "--streams", &streams.to_string(), "--key-file"]).arg(key);
    // Explicit both ways: `--mode auto` would pick plaintext on loopback (datacenter) anyway.
    cmd.arg(if encrypt { "--encrypt" } else { "--no-encrypt" });
    let out = cmd.stderr(Stdio::inherit()).output().expect("run dwcp send");
    assert!(out.status.success(), "dwcp send failed: {}", String::from_utf8_lossy(&out.stdout));
    let rep: Value = serde_json::from_slice(&out.stdout).expect("send json");
    let line = rx.lines.next().expect("receiver outcome").expect("read");
    let o: Value = serde_json::from_str(&line).expect("outcome json");
    assert_eq!(o["verified"], true, "receiver verified");
    let rx_cpu = proc_cpu_s(rx.child.id());
    let _ = rx.child.kill();
    let _ = rx.child.wait();
    let wall = rep["wall_s"].as_f64().expect("wall");
    let cpu = rep["cpu_s"].as_f64().expect("cpu") + rx_cpu;
    let gb = size as f64 / 1e9;
    (size as f64 * 8.0 / wall / 1e9, cpu / gb)
}

fn iperf3_run(port: u16, streams: u16, size: u64) -> (f64, f64) {
    let mut server =
        Command::new("iperf3").args(["-s", "-1", "-p", &port.to_string()]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("iperf3 -s (install it with `make deps`)");
    std::thread::sleep(Duration::from_millis(300));
    let out = Command::new("iperf3").args(["-c", "127.0.0.1", "-p", &port.to_string(), "-P", &streams.to_string(), "-n", &size.to_string(), "-J"]).output().expect("iperf3 -c");
    let _ = server.wait();
    let v: Value = serde_json::from_slice(&out.stdout).expect("iperf3 json");
    let end = &v["end"];
    let secs = end["sum_received"]["seconds"].as_f64().expect("seconds");
    let bps = end["sum_received"]["bits_per_second"].as_f64().expect("bps");
    let bytes = end["sum_received"]["bytes"].as_f64().expect("bytes");
    let cpu = &end["cpu_utilization_percent"];
    let cpu_s = (cpu["host_total"].as_f64().unwrap_or(0.0) + cpu["remote_total"].as_f64().unwrap_or(0.0)) / 100.0 * secs;
    (bps / 1e9, cpu_s / (bytes / 1e9))
}

fn main() {
    let size: u64 = std::env::var("BENCH_SIZE").ok().and_then(|s| s.parse().ok()).unwrap_or(2 << 30);
    let reps: usize = std::env::var("BENCH_REPS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    let dir = PathBuf::from("target/bench");
    std::fs::create_dir_all(&dir).expect("target/bench");
    let key = dir.join("bench.key");
    let st = Command::new(dwcp_bin()).args(["keygen", "--force"]).arg(&key).stderr(Stdio::null()).status().expect("keygen");
    assert!(st.success());
    // File source: the generated image written once.
    let src_file = dir.join("transport-src.img");
    if std::fs::metadata(&src_file).map(|m| m.len()).ok() != Some(size) {
        write_generated(&key, &src_file, size);
    }
    let out_dir = dir.join("transport-out");
    let gen_src = format!("gen:{size}");
    eprintln!("bench-transport: {size} bytes per run, {reps} rounds of every case in turn, medians and run-by-run ratios");
    // Every case, run in turns: each round runs each case once, so a peer and dwcp see the same
    // moment of this shared host, and the ratios are taken run by run (round r's dwcp over round
    // r's iperf3) as well as of the medians.
    let src = src_file.to_string_lossy().into_owned();
    let out = out_dir.to_string_lossy().into_owned();
    let fresh = |f: &dyn Fn() -> (f64, f64)| {
        let _ = std::fs::remove_dir_all(&out_dir);
        f()
    };
    type Run<'a> = Box<dyn Fn(u16) -> (f64, f64) + 'a>;
    let base = std::env::var_os("BENCH_BASE").map(PathBuf::from);
    let mut plan: Vec<(String, Run<'_>)> = Vec::new();
    for n in [1u16, 4, 8] {
        plan.push((format!("iperf3 -P {n}"), Box::new(move |port| iperf3_run(port, n, size))));
        let (key, gen_src) = (&key, &gen_src);
        plan.push((format!("dwcp mem->mem {n} streams"), Box::new(move |port| dwcp_run(key, port, gen_src, n, false, &["--discard"], size))));
    }
    plan.push(("dwcp mem->mem 8 streams encrypted".into(), Box::new(|port| dwcp_run(&key, port, &gen_src, 8, true, &["--discard"], size))));
    plan.push(("dwcp mem->mem 1 stream encrypted".into(), Box::new(|port| dwcp_run(&key, port, &gen_src, 1, true, &["--discard"], size))));
    for n in [1u16, 4, 8] {
        let (key, src, out, fresh) = (&key, &src, &out, &fresh);
        plan.push((format!("dwcp file->file {n} streams"), Box::new(move |port| fresh(&|| dwcp_run(key, port, src, n, false, &["--out", out], size)))));
    }
    if let Some(b) = &base {
        plan.push(("base mem->mem 8 streams".into(), Box::new(|port| dwcp_run_with(b, &key, port, &gen_src, 8, false, &["--discard"], size))));
        plan.push(("base file->file 8 streams".into(), Box::new(|port| fresh(&|| dwcp_run_with(b, &key, port, &src, 8, false, &["--out", &out], size)))));
    }
    let labels: Vec<String> = plan.iter().map(|(l, _)| l.clone()).collect();
    let mut runs: Vec<(Vec<f64>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); plan.len()];
    let mut p = 0u16;
    for round in 0..reps {
        eprintln!("  round {} of {reps}", round + 1);
        for ((label, f), (g, c)) in plan.iter().zip(runs.iter_mut()) {
            p += 1;
            let (gbps, cpu) = f(port(7600, p));
            eprintln!("    {label:<34} {gbps:>7.2} Gbit/s  {cpu:>5.2} CPU s/GB");
            g.push(gbps);
            c.push(cpu);
        }
    }
    drop(plan);
    let cases: Vec<Case> = runs
        .into_iter()
        .zip(labels)
        .map(|((g, c), label)| {
            let (g, c) = (benches::Figure::new(g), benches::Figure::new(c));
            Case { label, gbps: g.median(), cpu_s_per_gb: c.median(), runs: (g, c) }
        })
        .collect();
    let _ = std::fs::remove_dir_all(&out_dir);
    let get = |l: &str| cases.iter().find(|c| c.label == l).unwrap_or_else(|| panic!("case {l}"));
    let d8 = get("dwcp mem->mem 8 streams");
    let i8 = get("iperf3 -P 8");
    let d1 = get("dwcp mem->mem 1 streams");
    let i1 = get("iperf3 -P 1");
    let e8 = get("dwcp mem->mem 8 streams encrypted");
    let f8 = get("dwcp file->file 8 streams");

    println!();
    println!("| case | Gbit/s (median) | least-most of {reps} | CPU s/GB (both ends) |");
    println!("|---|---:|---:|---:|");
    for c in &cases {
        println!("| {} | {:.2} | {:.2}-{:.2} | {:.2} |", c.label, c.gbps, c.runs.0.min(), c.runs.0.max(), c.cpu_s_per_gb);
    }
    // Run-by-run ratios: round r of one case over round r of the other.
    let paired = |a: &benches::Figure, b: &benches::Figure| benches::Figure::new(a.runs.iter().zip(&b.runs).map(|(x, y)| x / y).collect());
    let r8 = paired(&d8.runs.0, &i8.runs.0);
    let r1 = paired(&d1.runs.0, &i1.runs.0);
    let re8 = paired(&e8.runs.0, &i8.runs.0);
    let rc8 = paired(&d8.runs.1, &i8.runs.1);
    println!();
    println!("{:<52} {:>6} {:>14}", "ratio (run by run: median, least-most)", "median", "range");
    for (name, f, target) in [
        ("ratio_8 (dwcp mem / iperf3, 8 streams)", &r8, "target >= 1.0"),
        ("ratio_8_encrypted_vs_plain_iperf3", &re8, "target >= 0.9"),
        ("cpu_per_gb_vs_iperf3_8 (CPU s/GB, both ends)", &rc8, "target <= 1.0"),
        ("ratio_1 (1 stream)", &r1, ""),
    ] {
        println!("{name:<52} {:>6.2} {:>6.2}-{:<6.2} {target}", f.median(), f.min(), f.max());
    }
    let against_base = base.as_ref().map(|b| {
        let (bm, bf) = (get("base mem->mem 8 streams"), get("base file->file 8 streams"));
        println!("against {}: plaintext mem 8 streams {:.2}, file 8 streams {:.2} (this build / base)", b.display(), d8.gbps / bm.gbps, f8.gbps / bf.gbps);
        json!({"base": b.display().to_string(), "mem_8_ratio": d8.gbps / bm.gbps, "file_8_ratio": f8.gbps / bf.gbps, "base_mem_8_gbps": bm.gbps, "base_file_8_gbps": bf.gbps,
               "cpu_s_per_gb_mem_8": d8.cpu_s_per_gb, "base_cpu_s_per_gb_mem_8": bm.cpu_s_per_gb})
    });
    let mut all = serde_json::Map::new();
    for c in &cases {
        let k = c.label.replace([' ', '-', '>'], "_").replace("__", "_");
        all.insert(format!("{k}_gbps"), json!(c.gbps));
        all.insert(k, json!({"gbps": c.runs.0.json(), "cpu_s_per_gb": c.runs.1.json()}));
    }
    let j = json!({
        "bench": "transport",
        "size_bytes": size,
        "reps": reps,
        "dwcp_gbps_8": d8.gbps,
        "iperf3_gbps_8": i8.gbps,
        "ratio_8": d8.gbps / i8.gbps,
        "ratio_8_runs": r8.json(),
        "ratio_8_encrypted_vs_plain_iperf3": re8.median(),
        "ratio_8_encrypted_vs_plain_iperf3_runs": re8.json(),
        "cpu_per_gb_vs_iperf3_8": rc8.median(),
        "cpu_per_gb_vs_iperf3_8_runs": rc8.json(),
        "ratio_1_runs": r1.json(),
        "dwcp_gbps_8_encrypted": e8.gbps,
        "ratio_8_encrypted": e8.gbps / i8.gbps,
        "dwcp_gbps_1": d1.gbps,
        "iperf3_gbps_1": i1.gbps,
        "ratio_1": d1.gbps / i1.gbps,
        "dwcp_file_gbps_8": f8.gbps,
        "dwcp_cpu_s_per_gb_8": d8.cpu_s_per_gb,
        "iperf3_cpu_s_per_gb_8": i8.cpu_s_per_gb,
        "dwcp_cpu_s_per_gb_8_encrypted": e8.cpu_s_per_gb,
        "cases": all,
        "against_base": against_base,
    });
    benches::emit(&dir.join("transport.json"), j);
}

/// Writes the generated image to `path` by receiving it from dwcp itself (verified on the way).
fn write_generated(key: &Path, path: &Path, size: u64) {
    let dir = path.parent().expect("parent").join("transport-gen");
    let _ = std::fs::remove_dir_all(&dir);
    let mut rx = start_receiver(&dwcp_bin(), key, 7599, &["--out", &dir.to_string_lossy()]);
    let st = Command::new(dwcp_bin())
        .args(["send", &format!("gen:{size}"), "--to", "127.0.0.1:7599", "--no-encrypt", "--json", "--name", "img", "--key-file"])
        .arg(key)
        .stdout(Stdio::null())
        .status()
        .expect("dwcp send");
    assert!(st.success(), "writing the source image");
    let _ = rx.lines.next();
    let _ = rx.child.kill();
    let _ = rx.child.wait();
    std::fs::rename(dir.join("img"), path).expect("move source image");
    let _ = std::fs::remove_dir_all(&dir);
}
