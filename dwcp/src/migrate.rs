//! `dwcp migrate`: live migration of a QEMU VM through dwcp, page-aware (the default: RAM pages
//! delta-encoded across rounds, see `dataplane::qemu`) or tunnel mode. dwcp drives the
//! source QEMU over QMP: it starts `migrate` with an `exec:` URI that runs `dwcp send -` (QEMU
//! writes its migration stream into it), watches `query-migrate` (rounds, dirty rate, remaining,
//! downtime) and reports. The destination QEMU runs with
//! `-incoming "exec:dwcp recv --listen ADDR --out - --once --key-file K"`, so its stream arrives
//! in order, each chunk verified, the whole stream digest-checked. If the transfer fails, QEMU's
//! migration fails and the source VM keeps running; the destination never gets a complete
//! stream, so it never starts.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

/// A QMP connection.
struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Qmp {
    fn connect(path: &Path) -> Result<Self> {
        let s = UnixStream::connect(path).with_context(|| format!("cannot reach QEMU's QMP socket {} (start QEMU with -qmp unix:PATH,server,nowait)", path.display()))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut q = Self { r: BufReader::new(s.try_clone()?), w: s };
        let greeting = q.line()?;
        if greeting.get("QMP").is_none() {
            bail!("{} is not a QMP socket (greeting {greeting})", path.display());
        }
        q.cmd("qmp_capabilities", None)?;
        Ok(q)
    }
    fn line(&mut self) -> Result<Value> {
        let mut l = String::new();
        if self.r.read_line(&mut l)? == 0 {
            bail!("QEMU closed the QMP socket");
        }
        Ok(serde_json::from_str(&l)?)
    }
    fn cmd(&mut self, name: &str, args: Option<Value>) -> Result<Value> {
        let mut m = json!({ "execute": name });
        if let Some(a) = args {
            m["arguments"] = a;
        }
        writeln!(self.w, "{m}")?;
        loop {
            let v = self.line()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                bail!("QEMU refused {name}: {}", e["desc"].as_str().unwrap_or("?"));
            }
            // Events (MIGRATION, STOP, RESUME...) are skipped.
        }
    }
}

/// Options of `dwcp migrate`.
pub struct MigrateArgs {
    /// Source QEMU's QMP socket.
    pub qmp: PathBuf,
    /// Destination dwcp receiver.
    pub to: String,
    /// Key file.
    pub key_file: PathBuf,
    /// Name of the stream at the receiver.
    pub name: String,
    /// Page-aware (`true`) or tunnel mode.
    pub pages: bool,
    /// Extra `dwcp send` flags.
    pub send_flags: Vec<String>,
    /// JSON summary.
    pub json: bool,
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Runs a migration and reports it.
pub fn run(a: &MigrateArgs) -> Result<()> {
    let mut q = Qmp::connect(&a.qmp)?;
    let st = q.cmd("query-status", None)?;
    if st["status"] != "running" && st["status"] != "paused" {
        bail!("the source VM is {}, not running", st["status"]);
    }
    let exe = std::env::current_exe().context("locating the dwcp binary")?;
    let log = std::env::temp_dir().join(format!("dwcp-migrate-{}.log", std::process::id()));
    let mut cmd = format!(
        "{} send - --name {} --to {} --key-file {} --json",
        shell_quote(&exe.display().to_string()),
        shell_quote(&a.name),
        shell_quote(&a.to),
        shell_quote(&a.key_file.display().to_string())
    );
    // Backpressure: QEMU paces its rounds (and decides when to stop the VM) by how fast the
    // pipe drains, so dwcp must not buffer much more than the link holds, or QEMU stops the
    // VM while most of the stream still waits in dwcp's queues. Small chunks and a short
    // window keep the read-ahead to a few MiB, unless the user's flags (after `--`) set them.
    for (flag, v) in [("--chunk-size", "256KiB"), ("--window", "4")] {
        if !a.send_flags.iter().any(|f| f == flag || f.starts_with(&format!("{flag}="))) {
            cmd.push_str(&format!(" {flag} {v}"));
        }
    }
    if a.pages {
        cmd.push_str(" --qemu");
    }
    for f in &a.send_flags {
        cmd.push(' ');
        cmd.push_str(&shell_quote(f));
    }
    // QEMU may report the migration complete before dwcp has its receiver's verdict: the exit
    // status file says when the sender is through.
    cmd.push_str(&format!(" > {0}.json 2> {0}; echo $? > {0}.rc", shell_quote(&log.display().to_string())));
    let t0 = Instant::now();
    q.cmd("migrate", Some(json!({ "uri": format!("exec:{cmd}") })))?;
    let mut last_print = Instant::now();
    let status = loop {
        let r = q.cmd("query-migrate", None)?;
        let s = r["status"].as_str().unwrap_or("").to_string();
        let ram = &r["ram"];
        if !a.json && last_print.elapsed() > Duration::from_millis(500) {
            last_print = Instant::now();
            eprintln!(
                "dwcp migrate: {s}, round {}, {} MiB sent, {} MiB remaining, dirtying {} pages/s",
                ram["dirty-sync-count"].as_u64().unwrap_or(0),
                ram["transferred"].as_u64().unwrap_or(0) >> 20,
                ram["remaining"].as_u64().unwrap_or(0) >> 20,
                ram["dirty-pages-rate"].as_u64().unwrap_or(0)
            );
        }
        if matches!(s.as_str(), "completed" | "failed" | "cancelled") {
            break r;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let wall = t0.elapsed();
    let rc = log.with_extension("log.rc");
    let waited = Instant::now();
    while status["status"] != "failed" && !rc.exists() && waited.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = std::fs::remove_file(&rc);
    let send_err = std::fs::read_to_string(&log).unwrap_or_default();
    let send_json: Value = std::fs::read_to_string(log.with_extension("log.json")).ok().and_then(|s| serde_json::from_str(s.trim()).ok()).unwrap_or(Value::Null);
    let _ = std::fs::remove_file(&log);
    let _ = std::fs::remove_file(log.with_extension("log.json"));
    let vm = q.cmd("query-status", None)?;
    let ram = &status["ram"];
    let summary = json!({
        "status": status["status"], "wall_s": wall.as_secs_f64(),
        "downtime_ms": status["downtime"], "total_time_ms": status["total-time"],
        "rounds": ram["dirty-sync-count"], "ram_transferred": ram["transferred"],
        "source_vm": vm["status"], "transfer": send_json,
        "error": status.get("error-desc"),
    });
    if a.json {
        println!("{summary}");
    } else {
        println!("dwcp migrate: {}", status["status"].as_str().unwrap_or("?"));
        println!("  wall time     {:.2} s", wall.as_secs_f64());
        println!("  downtime      {} ms", status["downtime"]);
        println!("  rounds        {}", ram["dirty-sync-count"]);
        println!("  RAM sent      {} MiB", ram["transferred"].as_u64().unwrap_or(0) >> 20);
        println!("  source VM     {}", vm["status"].as_str().unwrap_or("?"));
        if let Some(g) = send_json["goodput_gbps"].as_f64() {
            println!("  stream        {} MiB over {} streams, {g:.2} Gbit/s, digest verified: {}", send_json["size"].as_u64().unwrap_or(0) >> 20, send_json["streams"], send_json["verified"]);
        }
        let q = &send_json["qemu"];
        match q["mode"].as_str() {
            Some("pages") => {
                let (i, o) = (q["input"].as_u64().unwrap_or(0), q["output"].as_u64().unwrap_or(0));
                println!("  page-aware    {} MiB of QEMU stream sent as {} MiB ({:.2}x), {} pages re-sent", i >> 20, o >> 20, i as f64 / o.max(1) as f64, q["resent_pages"]);
                if let Some(why) = q["fallback"].as_str() {
                    println!("  fell back     to tunnel mode mid-stream: {why}");
                }
            }
            Some("tunnel") => println!("  page-aware    off, tunnel mode ({})", q["why"].as_str().unwrap_or("?")),
            _ => {}
        }
    }
    if status["status"] == "completed" && send_json["verified"] != true {
        // QEMU counts a migration complete once it has written its stream into dwcp; if dwcp
        // could not confirm the destination verified it, the source stays paused: resuming it
        // could leave two running copies if the destination did start.
        bail!("QEMU finished writing its stream but dwcp could not confirm the destination verified it ({}); the source VM is left {}: check the destination before resuming the source with `cont`", send_err.lines().rfind(|l| l.contains("error")).unwrap_or("no error logged"), vm["status"].as_str().unwrap_or("?"));
    }
    if status["status"] != "completed" {
        let why = status["error-desc"].as_str().unwrap_or("no reason given").to_string();
        let last = send_err.lines().rfind(|l| l.contains("error")).unwrap_or("").to_string();
        bail!("the migration {}: {why}{}; the source VM is {}", status["status"].as_str().unwrap_or("?"), if last.is_empty() { String::new() } else { format!(" ({last})") }, vm["status"].as_str().unwrap_or("?"));
    }
    Ok(())
}
