//! `dwcp migrate`: live migration of a QEMU VM through dwcp, page-aware (the default: RAM pages
//! delta-encoded across rounds, see `dataplane::qemu`) or tunnel mode. dwcp drives the
//! source QEMU over QMP: it starts `migrate` with an `exec:` URI that runs `dwcp send -` (QEMU
//! writes its migration stream into it), watches `query-migrate` (rounds, dirty rate, remaining,
//! downtime) and reports. The destination QEMU runs with
//! `-incoming "exec:dwcp recv --listen ADDR --out - --once --key-file K"`, so its stream arrives
//! in order, each chunk verified, the whole stream digest-checked. If the transfer fails, QEMU's
//! migration fails and the source VM keeps running; the destination never gets a complete
//! stream, so it never starts.
//!
//! `dwcp migrate --via-daemon SOCK` hands the same migration to the daemon as a job instead
//! (`ctlplane::engine::migrate`: QEMU writes into a descriptor the daemon passes it over QMP,
//! and the stream goes out on the daemon's warm streams to the destination), then follows it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ctlplane::engine::migrate::{Qmp, Watch, is_final};
use serde_json::{Value, json};

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
    /// Move the VM's ownership in the fleet once the destination has it all.
    pub handoff: Option<Handoff>,
}

/// A migration's ownership handoff through the source host's daemon (its `[fleet]`).
#[derive(Debug, Clone)]
pub struct Handoff {
    /// The source daemon's jobs socket.
    pub socket: PathBuf,
    /// The VM's name in the fleet.
    pub vm: String,
    /// The destination host's fleet node id.
    pub to_node: u64,
}

/// This daemon's fleet node id and the VM's owner (confirmed by the leader).
fn fleet_owner(sock: &Path, vm: &str) -> Result<(u64, Option<(u64, u64)>)> {
    let (code, v) = crate::appliance::job_http(sock, "GET", "/fleet", "")?;
    crate::appliance::job_ok(code, &v, "reading the fleet")?;
    let me = v["status"]["id"].as_u64().context("the daemon gave no fleet node id")?;
    let (code, o) = crate::appliance::job_http(sock, "GET", &format!("/fleet/vms/{vm}"), "")?;
    crate::appliance::job_ok(code, &o, &format!("asking the fleet who owns {vm}"))?;
    let owner = o["owner"]["node"].as_u64().zip(o["owner"]["epoch"].as_u64());
    Ok((me, owner))
}

/// `dwcp fleet resume VM --qmp PATH`: resumes the paused VM behind PATH only if the fleet's
/// leader confirms this host's daemon owns it, so that a VM runs only where the fleet says: after
/// a migration, the destination once the handoff committed; after a handoff that did not, the
/// source.
pub fn resume_if_owned(sock: &Path, vm: &str, qmp: &Path, json: bool) -> Result<()> {
    let (me, owner) = fleet_owner(sock, vm)?;
    match owner {
        Some((n, e)) if n == me => {
            let mut q = Qmp::connect(qmp)?;
            let st = q.cmd("query-status", None)?;
            if st["status"] != "running" {
                // Reading the owner is not enough: a handoff already in the log (proposed while
                // its node was cut off) may commit after the read. The resume is a committed
                // compare-and-set on the epoch read, ordered after any such handoff.
                let (code, v) = crate::appliance::job_http(sock, "POST", &format!("/fleet/vms/{vm}/resume"), &json!({ "epoch": e }).to_string())?;
                if code == 503 {
                    bail!(
                        "{vm}: the fleet did not commit this node's resume ({}): not resuming it; `dwcp fleet owner {vm}` once a quorum answers",
                        v["error"].as_str().unwrap_or("no quorum")
                    );
                }
                crate::appliance::job_ok(code, &v, &format!("resuming {vm}"))?;
                q.cmd("cont", None)?;
            }
            let st = q.cmd("query-status", None)?;
            if json {
                println!("{}", json!({ "vm": vm, "owner": n, "epoch": e, "status": st["status"] }));
            } else {
                println!("{vm}: owned by this node ({n}, epoch {e}); the VM is {}", st["status"].as_str().unwrap_or("?"));
            }
            Ok(())
        }
        Some((n, e)) => bail!("{vm} is owned by node {n} (epoch {e}), not this node ({me}): not resuming it here"),
        None => bail!("{vm} has no owner in the fleet: claim it first (`dwcp fleet claim {vm}`)"),
    }
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
    // With a fleet, this host must own the VM before it may send it away (a VM nobody owns yet
    // is claimed for this host: it runs here).
    let epoch = match &a.handoff {
        None => None,
        Some(h) => {
            let (me, owner) = fleet_owner(&h.socket, &h.vm)?;
            let (node, epoch) = match owner {
                Some(o) => o,
                None => {
                    let (code, v) = crate::appliance::job_http(&h.socket, "POST", &format!("/fleet/vms/{}/claim", h.vm), "{}")?;
                    crate::appliance::job_ok(code, &v, &format!("claiming {} for this node", h.vm))?;
                    (me, v["epoch"].as_u64().context("the claim gave no epoch")?)
                }
            };
            if node != me {
                bail!("{} is owned by node {node} (epoch {epoch}), not this node ({me}): migrate it from its owner", h.vm);
            }
            if h.to_node == me {
                bail!("--to-node {me} is this node: the destination is another node of the fleet");
            }
            Some((me, epoch))
        }
    };
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
    // VM while most of the stream still waits in dwcp's queues. Small chunks and a window that
    // `dwcp send --qemu` plans from its probe (about two bandwidth-delay products) keep the
    // read-ahead small, unless the user's flags (after `--`) set them; one chunk is read ahead
    // of the windows, and each stream queues at most 32 KiB unsent in the kernel.
    // Tunnel mode keeps the fixed window it had (4 chunks per stream).
    use ctlplane::engine::migrate::tunnel;
    let fixed: Vec<(&str, String)> = match a.pages {
        true => Vec::new(),
        false => vec![
            ("--chunk-size", tunnel::CHUNK_SIZE.to_string()),
            ("--window", tunnel::WINDOW.to_string()),
            ("--read-ahead", tunnel::READ_AHEAD.to_string()),
            ("--notsent-lowat", tunnel::NOTSENT_LOWAT.to_string()),
        ],
    };
    for (flag, v) in fixed {
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
    let mut watch = Watch::new(&mut q)?;
    let t0 = Instant::now();
    q.cmd("migrate", Some(json!({ "uri": format!("exec:{cmd}") })))?;
    let mut last_print = Instant::now();
    let status = loop {
        let r = watch.step(&mut q)?.clone();
        if last_print.elapsed() > Duration::from_millis(500) {
            last_print = Instant::now();
            if a.json {
                tracing::info!("{}", watch.line());
            } else {
                eprintln!("dwcp migrate: {}", watch.line());
            }
        }
        if is_final(&r) {
            break r;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let wall = t0.elapsed();
    watch.restore(&mut q);
    let pushed = watch.pushed;
    let rc = log.with_extension("log.rc");
    let waited = Instant::now();
    while status["status"] != "failed" && !rc.exists() && waited.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = std::fs::remove_file(&rc);
    // QEMU fills in its total and downtime figures only once it has closed the channel, which
    // waits for dwcp's sender: ask again now that it is through.
    let status = match q.cmd("query-migrate", None) {
        Ok(r) if r["status"] == status["status"] && r["total-time"].as_u64().unwrap_or(0) > 0 => r,
        _ => status,
    };
    let send_err = std::fs::read_to_string(&log).unwrap_or_default();
    // The sender's last error line, if it logged one.
    let send_error = send_err.lines().rfind(|l| l.contains("error"));
    let send_json: Value = std::fs::read_to_string(log.with_extension("log.json")).ok().and_then(|s| serde_json::from_str(s.trim()).ok()).unwrap_or(Value::Null);
    let _ = std::fs::remove_file(&log);
    let _ = std::fs::remove_file(log.with_extension("log.json"));
    let vm = q.cmd("query-status", None)?;
    // Only a completed migration whose stream the destination verified hands the VM over.
    let moved = match (&a.handoff, epoch) {
        (Some(h), Some((me, epoch))) if status["status"] == "completed" && send_json["verified"] == true => Some(handoff(h, me, epoch)),
        _ => None,
    };
    let ram = &status["ram"];
    let summary = json!({
        "status": status["status"], "wall_s": wall.as_secs_f64(),
        "downtime_ms": status["downtime"], "total_time_ms": status["total-time"],
        "rounds": ram["dirty-sync-count"], "ram_transferred": ram["transferred"],
        "source_vm": vm["status"], "transfer": send_json,
        "completion": pushed.map(|(round, e)| json!({"round": round, "expected_downtime_ms": e.as_secs_f64() * 1e3})),
        "error": status.get("error-desc"),
        "handoff": moved.as_ref().zip(a.handoff.as_ref()).map(|(r, h)| match r {
            Ok(e) => json!({ "vm": h.vm, "to_node": h.to_node, "committed": true, "epoch": e }),
            Err(w) => json!({ "vm": h.vm, "to_node": h.to_node, "committed": false, "error": w.to_string() }),
        }),
    });
    if a.json {
        println!("{summary}");
    } else {
        print_summary(&summary);
    }
    if status["status"] == "completed" && send_json["verified"] != true {
        // QEMU counts a migration complete once it has written its stream into dwcp; if dwcp
        // could not confirm the destination verified it, the source stays paused: resuming it
        // could leave two running copies if the destination did start.
        bail!(
            "QEMU finished writing its stream but dwcp could not confirm the destination verified it ({}); the source VM is left {}: check the destination before resuming the source with `cont`",
            send_error.unwrap_or("no error logged"),
            vm["status"].as_str().unwrap_or("?")
        );
    }
    if status["status"] != "completed" {
        let why = status["error-desc"].as_str().unwrap_or("no reason given").to_string();
        bail!(
            "the migration {}: {why}{}; the source VM is {}",
            status["status"].as_str().unwrap_or("?"),
            send_error.map_or(String::new(), |l| format!(" ({l})")),
            vm["status"].as_str().unwrap_or("?")
        );
    }
    if let Some(Err(e)) = moved {
        return Err(e);
    }
    Ok(())
}

/// A migration's summary (`dwcp migrate --json`'s object, or a daemon job's result) for a person.
fn print_summary(m: &Value) {
    println!("dwcp migrate: {}", m["status"].as_str().unwrap_or("?"));
    println!("  wall time     {:.2} s", m["wall_s"].as_f64().unwrap_or(0.0));
    // QEMU stops counting once its stream is in dwcp; the guest resumes on the destination after
    // the rest has crossed the link.
    println!("  downtime      {} ms (QEMU's count, until its stream was in dwcp; the destination resumes after the rest crossed)", m["downtime_ms"]);
    println!("  rounds        {}", m["rounds"]);
    if let Some(c) = m["completion"].as_object() {
        println!("  completion    told QEMU to complete in round {}: the rest fit in {:.0} ms at the link's pace", c["round"], c["expected_downtime_ms"].as_f64().unwrap_or(0.0));
    }
    println!("  RAM sent      {} MiB", m["ram_transferred"].as_u64().unwrap_or(0) >> 20);
    println!("  source VM     {}", m["source_vm"].as_str().unwrap_or("?"));
    let h = &m["handoff"];
    if h["committed"] == true {
        let vm = h["vm"].as_str().unwrap_or("?");
        println!("  ownership     {vm} committed to node {} at epoch {}: resume it there with `dwcp fleet resume {vm} --qmp ...`", h["to_node"], h["epoch"]);
    }
    let t = &m["transfer"];
    if let Some(w) = m["warm"].as_str() {
        println!("  warm          {w}");
    }
    if let Some(g) = t["goodput_gbps"].as_f64() {
        println!("  stream        {} MiB over {} streams, {g:.2} Gbit/s, digest verified: {}", t["size"].as_u64().unwrap_or(0) >> 20, t["streams"], t["verified"]);
    }
    let q = &t["qemu"];
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

/// `dwcp migrate --via-daemon SOCK`: submits the migration as a job of the daemon (which drives
/// QEMU and, with `fleet`, hands the VM over once the destination verified the stream), follows
/// it, then prints the same summary as a direct migration. The job runs on if this command is
/// stopped (`dwcp job watch ID`, `dwcp job cancel ID`).
#[allow(clippy::too_many_arguments)]
pub fn via_daemon(sock: &Path, qmp: &Path, to: &str, name: &str, pages: bool, fleet: Option<(String, u64)>, deadline: Option<Duration>, json: bool) -> Result<()> {
    let qmp = std::path::absolute(qmp).with_context(|| format!("cannot name {} absolutely", qmp.display()))?;
    let (vm, to_node) = fleet.map_or((None, None), |(v, n)| (Some(v), Some(n)));
    let req = ctlplane::engine::Request {
        to: to.into(),
        name: Some(name.into()),
        qemu: pages,
        deadline_s: deadline.map(|d| d.as_secs_f64()),
        migrate: Some(ctlplane::engine::MigrateSpec { qmp, vm, to_node }),
        ..Default::default()
    };
    let (code, v) = crate::appliance::job_http(sock, "POST", "/transfers", &serde_json::to_string(&req)?)?;
    crate::appliance::job_ok(code, &v, "submitting the migration")?;
    let id = v["id"].as_u64().context("the daemon gave no job id")?;
    if !json {
        eprintln!("migration {id} submitted to the daemon on {}; `dwcp job cancel {id}` cancels it (the source VM keeps running)", sock.display());
    }
    let mut last = Instant::now();
    let followed = crate::appliance::follow(sock, id, |e| {
        if last.elapsed() >= Duration::from_millis(500)
            && let Some(l) = e["qemu"]["line"].as_str()
        {
            last = Instant::now();
            if json {
                tracing::info!("{l}");
            } else {
                eprintln!("dwcp migrate: {l}");
            }
        }
    });
    let end =
        followed.map_err(|e| anyhow::anyhow!("{e:#}. A migration is not taken up by a restarted daemon: QEMU's migration fails with its stream, and the source VM runs on"))?;
    let mut summary = end["result"].clone();
    summary["job"] = id.into();
    if json {
        println!("{summary}");
    } else if summary["status"].is_string() {
        print_summary(&summary);
    }
    if end["state"] != "verified" {
        bail!("migration job {id} {}: {}", end["state"].as_str().unwrap_or("ended"), summary["error"].as_str().unwrap_or("no reason given"));
    }
    Ok(())
}

/// The destination holds the whole verified stream and the source is paused: the ownership
/// moves in the fleet, and only then may the destination resume (`dwcp fleet resume`). Without
/// a committed handoff neither side may: the source stays paused.
fn handoff(h: &Handoff, me: u64, epoch: u64) -> Result<u64> {
    let body = json!({ "from": me, "to": h.to_node, "epoch": epoch }).to_string();
    let (code, v) = match crate::appliance::job_http(&h.socket, "POST", &format!("/fleet/vms/{}/handoff", h.vm), &body) {
        Ok(r) => r,
        // The daemon went away while it was asked: whether the handoff committed is unknown.
        Err(e) => (503, json!({ "error": format!("{e:#}") })),
    };
    if (200..300).contains(&code) {
        return v["epoch"].as_u64().context("the handoff gave no epoch");
    }
    let why = v["error"].as_str().unwrap_or("no reason given");
    let unknown = if code == 503 { " (it may still commit once a quorum answers)" } else { "" };
    bail!("{}", ctlplane::engine::migrate::handoff_not_committed(&h.vm, h.to_node, &format!("{why}{unknown}")))
}
