//! The commands that run or talk to the appliance: `dwcp daemon`, `dwcp status`, `dwcp config
//! check`, `dwcp job`, `dwcp send --via-daemon`.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ctlplane::config::Config;

/// Boots the daemon and serves until killed.
pub fn run(config: Option<PathBuf>, listen: Option<String>, api: Option<String>, log_level: Option<&str>) -> Result<()> {
    let mut flags = Vec::new();
    if let Some(l) = log_level {
        flags.push(("log.level", l.to_owned()));
    }
    if let Some(l) = listen {
        flags.push(("node.listen", l));
    }
    if let Some(a) = api {
        flags.push(("api.listen", a));
    }
    let cfg = Config::load(config.as_deref(), std::env::vars(), &flags)?;
    let d = ctlplane::daemon::run(cfg, true).map_err(|e| anyhow::anyhow!("{e}"))?;
    let st = &d.state;
    eprintln!(
        "dwcp daemon ready in {:.1} ms: transfers on {}, http on {}",
        *st.boot_ms.lock().expect("boot lock"),
        st.listener.get().map_or("?".into(), |a| a.to_string()),
        st.api.get().map_or("?".into(), |a| a.to_string()),
    );
    for (c, why) in st.degraded() {
        eprintln!("  degraded: {c}: {why}");
    }
    loop {
        std::thread::park_timeout(Duration::from_secs(3600));
    }
}

/// One HTTP/1.0 exchange on a connected stream: the request's head and body out, the status
/// code and body back.
fn exchange(mut s: impl Read + Write, head: &str, body: &str) -> Result<(u16, String)> {
    write!(s, "{head}\r\n\r\n{body}")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let code = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
    Ok((code, body))
}

fn http_get(addr: &str, path: &str) -> Result<(u16, String)> {
    let s = std::net::TcpStream::connect(addr).with_context(|| format!("no dwcp daemon answers on {addr} (is it running? is api.listen there?)"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    exchange(s, &format!("GET {path} HTTP/1.0\r\nHost: {addr}"), "")
}

/// Prints the daemon's status.
/// Exits non-zero (1) when the daemon is not ready, so a script or a health check can use it.
pub fn status(api: &str, json: bool) -> Result<()> {
    let (code, body) = http_get(api, "/status")?;
    if code != 200 {
        bail!("{api}/status answered {code}");
    }
    let ready = serde_json::from_str::<serde_json::Value>(&body).is_ok_and(|v| v["ready"] == true);
    if json {
        println!("{body}");
        if !ready {
            bail!("the daemon on {api} is not ready");
        }
        return Ok(());
    }
    let v: serde_json::Value = serde_json::from_str(&body).context("reading /status")?;
    println!("dwcp daemon {} — {}", v["node"].as_str().unwrap_or("?"), if v["ready"] == true { "ready" } else { "NOT READY" });
    println!("  boot          {:.1} ms", v["boot_ms"].as_f64().unwrap_or(0.0));
    println!("  transfers on  {}", v["listener"].as_str().unwrap_or("-"));
    let h = &v["host"];
    println!(
        "  host          kernel {}, {} cores / {} threads, {} NUMA node(s), SEND_ZC {}, RDMA {}",
        h["kernel"].as_str().unwrap_or("?"),
        h["cores"],
        h["pus"],
        h["numa"].as_array().map_or(0, Vec::len),
        if h["send_zc"] == true { "yes" } else { "no" },
        h["rdma_devices"].as_array().filter(|a| !a.is_empty()).map_or("none".to_string(), |a| a.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(",")),
    );
    for d in v["degraded"].as_array().into_iter().flatten() {
        println!("  degraded      {}: {}", d["component"].as_str().unwrap_or("?"), d["why"].as_str().unwrap_or(""));
    }
    println!("  cluster mode  {}", v["cluster_mode"].as_str().unwrap_or("no peers"));
    for p in v["peers"].as_array().into_iter().flatten() {
        let rtt = p["last_rtt_ms"]["Ok"].as_f64().map_or_else(|| p["last_rtt_ms"]["Err"].as_str().unwrap_or("?").to_string(), |r| format!("rtt {r:.2} ms"));
        println!("  peer          {} ({}): {}, {}", p["name"].as_str().unwrap_or("?"), p["addr"].as_str().unwrap_or("?"), p["mode"].as_str().unwrap_or("?"), rtt);
    }
    if let Some(t) = v["transfers"].as_array() {
        let running = t.iter().filter(|j| j["state"] == "running" || j["state"] == "starting").count();
        println!("  transfers     {} remembered, {running} running (dwcp job list)", t.len());
    }
    let sessions = v["sessions"].as_array().cloned().unwrap_or_default();
    println!("  sessions      {} finished", sessions.len());
    for s in sessions.iter().rev().take(10) {
        let ok = if s["result"]["Ok"].is_string() { "verified".to_string() } else { format!("FAILED: {}", s["result"]["Err"].as_str().unwrap_or("")) };
        println!("    {} {} bytes in {:.2} s: {ok}", s["name"].as_str().unwrap_or("?"), s["size"], s["wall_s"].as_f64().unwrap_or(0.0));
    }
    if !ready {
        bail!("the daemon on {api} is not ready (see degraded and boot above)");
    }
    Ok(())
}

/// Validates a config file.
pub fn check(file: &std::path::Path) -> Result<()> {
    Config::load(Some(file), std::env::vars(), &[])?;
    println!("{}: ok", file.display());
    Ok(())
}

/// One HTTP/1.0 request on the daemon's jobs socket: status and JSON body.
pub(crate) fn job_http(sock: &std::path::Path, method: &str, path: &str, body: &str) -> Result<(u16, serde_json::Value)> {
    let s = std::os::unix::net::UnixStream::connect(sock)
        .with_context(|| format!("no dwcp daemon answers on {} (is it running with api.socket set? may you open the socket?)", sock.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let (code, out) = exchange(s, &format!("{method} {path} HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {}", body.len()), body)?;
    let v = serde_json::from_str(&out).with_context(|| format!("{method} {path}: not JSON"))?;
    Ok((code, v))
}

pub(crate) fn job_ok(code: u16, v: &serde_json::Value, what: &str) -> Result<()> {
    if (200..300).contains(&code) {
        return Ok(());
    }
    bail!("{what}: the daemon answered {code}: {}", v["error"].as_str().unwrap_or("(no reason given)"))
}

/// A transfer's line for a person.
fn job_line(j: &serde_json::Value) -> String {
    let done = j["acked_bytes"].as_u64().or_else(|| j["result"]["size"].as_u64()).unwrap_or(0);
    let total = j["total_bytes"].as_u64().or_else(|| j["result"]["size"].as_u64()).unwrap_or(0);
    let mut l = format!(
        "{:>4}  {:<10} {:<24} -> {:<21} {:>10} of {:<10} {:>7.1} s",
        j["id"],
        j["state"].as_str().unwrap_or("?"),
        j["name"].as_str().unwrap_or(""),
        j["to"].as_str().unwrap_or(""),
        crate::fmt::bytes(done),
        crate::fmt::bytes(total),
        j["elapsed_s"].as_f64().unwrap_or(0.0)
    );
    if let (Some(cores), Some(why)) = (j["placement"]["cores"].as_array(), j["placement"]["why"].as_str()) {
        let cores: Vec<String> = cores.iter().map(ToString::to_string).collect();
        let node = j["placement"]["node"].as_u64().map(|n| format!(" of node {n}")).unwrap_or_default();
        l.push_str(&format!("\n      cores {}{node}: {why}", cores.join(",")));
    }
    if let (Some(cap), Some(why)) = (j["share"]["cap_bps"].as_f64(), j["share"]["why"].as_str()) {
        l.push_str(&format!("\n      paced at {:.0} Mbit/s: {why}", cap / 1e6));
    }
    let d = &j["deadline"];
    if let Some(verdict) = d["verdict"].as_str() {
        let left = d["due_in_s"].as_f64().unwrap_or(0.0);
        let when = if left >= 0.0 { format!("due in {left:.1} s") } else { format!("{:.1} s overdue", -left) };
        let finish = d["finish_s"].as_array().and_then(|f| Some((f.first()?.as_f64()?, f.get(1)?.as_f64()?)));
        let finish = finish.map(|(a, b)| format!(", done in {a:.1}-{b:.1} s at PBA's 80% interval")).unwrap_or_default();
        l.push_str(&format!("\n      deadline: {verdict} ({when}{finish})"));
    }
    if let Some(w) = j["warm"].as_str() {
        l.push_str(&format!("\n      warm: {w}"));
    }
    if j["kind"] == "migration" {
        let q = &j["qemu"];
        let vm = q["vm"].as_str().map(|v| format!(" of {v}")).unwrap_or_default();
        l.push_str(&format!("\n      migration{vm} (QEMU at {}): {}", q["qmp"].as_str().unwrap_or("?"), q["line"].as_str().or(q["status"].as_str()).unwrap_or("?")));
        if let Some(h) = j["result"]["handoff"].as_object() {
            let to = &h["to_node"];
            l.push_str(&match h["committed"].as_bool() {
                Some(true) => format!("\n      ownership committed to node {to} at epoch {}", h["epoch"]),
                _ => format!("\n      ownership NOT handed to node {to}: {}", h["error"].as_str().unwrap_or("?")),
            });
        }
    }
    if let Some(n) = j["restarts"].as_u64() {
        l.push_str(&format!("\n      taken up again after {n} daemon restart{}: resumed from what the receiver held", if n == 1 { "" } else { "s" }));
    }
    if let Some(e) = j["result"]["error"].as_str() {
        l.push_str(&format!("\n      {e}"));
    }
    l
}

/// `dwcp fleet status`: this daemon's view of its Raft group for a person.
pub fn fleet_status(sock: &std::path::Path, json: bool) -> Result<()> {
    let (code, v) = job_http(sock, "GET", "/fleet", "")?;
    job_ok(code, &v, "reading the fleet")?;
    if json {
        println!("{v}");
        return Ok(());
    }
    let s = &v["status"];
    if s.is_object() {
        let leader = s["leader"].as_u64().map_or("none known (an election is under way, or no quorum is reachable)".into(), |l| format!("node {l}"));
        println!("raft: node {} ({}), term {}, leader {leader}", s["id"], s["role"].as_str().unwrap_or("?").to_lowercase(), s["term"]);
        println!(
            "log: last index {}, applied {}, {} behind; snapshot at {}",
            s["last_log_index"],
            s["applied_index"],
            s["apply_lag"],
            s["snapshot_index"].as_u64().map_or("none".into(), |i| i.to_string())
        );
        if let Some(ms) = s["ms_since_quorum_ack"].as_u64() {
            println!("a quorum acknowledged this leader {ms} ms ago");
        }
        println!("{:>6}  {:<8} {:<22} {:>12}", "node", "role", "fleet address", "behind");
        let lag = |id: &str| s["replication_lag"][id].as_u64().map_or("-".into(), |l| l.to_string());
        for (role, key) in [("voter", "voters"), ("learner", "learners")] {
            for (id, addr) in s[key].as_object().into_iter().flatten() {
                println!("{id:>6}  {role:<8} {:<22} {:>12}", addr.as_str().unwrap_or(""), lag(id));
            }
        }
        let vms = v["vms"].as_object().cloned().unwrap_or_default();
        println!("{} VM{} owned, {} job{} recorded", vms.len(), if vms.len() == 1 { "" } else { "s" }, v["jobs"], if v["jobs"] == 1 { "" } else { "s" });
        for (vm, o) in &vms {
            println!("  {vm:<24} node {} (epoch {})", o["node"], o["epoch"]);
        }
    }
    let g = &v["gossip"];
    if g.is_object() {
        let members = g["members"].as_array().cloned().unwrap_or_default();
        println!(
            "gossip: node {}, {} alive of {} known, stalest card {:.1} s old, {} packets dropped",
            g["me"],
            g["alive"],
            members.len() + 1,
            g["stalest_s"].as_f64().unwrap_or(0.0),
            g["dropped"]
        );
        println!("{:>6}  {:<22} {:<8} {:<10} {:<12} {:>9}  links", "node", "gossip address", "state", "name", "site", "heard");
        let cards: std::collections::HashMap<u64, &serde_json::Value> =
            g["cards"].as_array().into_iter().flatten().filter_map(|c| Some((c["card"]["node"].as_u64()?, c))).collect();
        let me = g["me"].as_u64().unwrap_or(0);
        let rows = members
            .iter()
            .map(|m| (m["node"].as_u64().unwrap_or(0), m["addr"].as_str().unwrap_or("").to_string(), m["state"].as_str().unwrap_or("?").to_string()))
            .chain([(me, "(this node)".to_string(), "alive".to_string())]);
        for (node, addr, state) in rows {
            let c = cards.get(&node);
            let links: Vec<String> = c
                .and_then(|c| c["card"]["links"].as_array())
                .into_iter()
                .flatten()
                .map(|l| format!("{} {} {:.1} ms", l["peer"].as_str().unwrap_or("?"), l["mode"].as_str().unwrap_or("?"), l["rtt_ms"].as_f64().unwrap_or(0.0)))
                .collect();
            println!(
                "{node:>6}  {addr:<22} {state:<8} {:<10} {:<12} {:>8}  {}",
                c.and_then(|c| c["card"]["name"].as_str()).unwrap_or("-"),
                c.and_then(|c| c["card"]["site"].as_str()).unwrap_or("-"),
                c.and_then(|c| c["heard_s"].as_f64()).map_or("-".into(), |h| format!("{h:.1} s")),
                links.join(", ")
            );
        }
    }
    Ok(())
}

/// A `dwcp fleet` request that changes or reads one thing: prints the daemon's answer.
pub fn fleet_call(sock: &std::path::Path, method: &str, path: &str, body: &str, json: bool) -> Result<()> {
    let (code, v) = job_http(sock, method, path, body)?;
    if json {
        println!("{v}");
    }
    if code == 503 {
        bail!("{} (the change may still commit once a quorum answers: `dwcp fleet owner` tells)", v["error"].as_str().unwrap_or("no quorum"));
    }
    job_ok(code, &v, &format!("{method} {path}"))?;
    if !json {
        match (&v["vm"], &v["owner"]) {
            (serde_json::Value::String(vm), serde_json::Value::Null) => println!("{vm}: no owner"),
            (serde_json::Value::String(vm), o) if o.is_object() => println!("{vm}: node {} (epoch {})", o["node"], o["epoch"]),
            (serde_json::Value::String(vm), o) => println!("{vm}: node {o} (epoch {})", v["epoch"]),
            _ => println!("done: {} voters", v["status"]["voters"].as_object().map_or(0, |m| m.len())),
        }
    }
    Ok(())
}

/// `dwcp job list`.
pub fn job_list(sock: &std::path::Path, json: bool) -> Result<()> {
    let (code, v) = job_http(sock, "GET", "/transfers", "")?;
    job_ok(code, &v, "listing transfers")?;
    if json {
        println!("{v}");
        return Ok(());
    }
    let list = v.as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        println!("no transfers");
    }
    for j in &list {
        println!("{}", job_line(j));
    }
    Ok(())
}

/// `dwcp job cancel ID`.
pub fn job_cancel(sock: &std::path::Path, id: u64, json: bool) -> Result<()> {
    let (code, v) = job_http(sock, "DELETE", &format!("/transfers/{id}"), "")?;
    job_ok(code, &v, &format!("cancelling transfer {id}"))?;
    if json {
        println!("{v}");
    } else {
        println!("transfer {id}: cancel asked; `dwcp job watch {id}` shows when it has ended");
    }
    Ok(())
}

/// `dwcp send --via-daemon SOCK ...`: submits, then watches.
pub fn job_submit(sock: &std::path::Path, req: &ctlplane::engine::Request, json: bool) -> Result<()> {
    let (code, v) = job_http(sock, "POST", "/transfers", &serde_json::to_string(req)?)?;
    job_ok(code, &v, "submitting the transfer")?;
    let id = v["id"].as_u64().context("the daemon gave no transfer id")?;
    if !json {
        eprintln!("transfer {id} submitted to the daemon on {}; `dwcp job cancel {id}` cancels it", sock.display());
    }
    job_watch(sock, id, json)
}

/// Follows job `id`'s event stream (`GET /transfers/ID/events`) until it ends, telling
/// `progress` each progress event; the job's JSON at its end.
pub fn follow(sock: &std::path::Path, id: u64, mut progress: impl FnMut(&serde_json::Value)) -> Result<serde_json::Value> {
    use std::io::BufRead;
    let mut s = std::os::unix::net::UnixStream::connect(sock)
        .with_context(|| format!("no dwcp daemon answers on {} (is it running with api.socket set? may you open the socket?)", sock.display()))?;
    write!(s, "GET /transfers/{id}/events HTTP/1.0\r\n\r\n")?;
    let mut r = std::io::BufReader::new(s);
    let mut status = String::new();
    r.read_line(&mut status)?;
    let code: u16 = status.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    // The head, up to its blank line.
    let mut l = String::new();
    while r.read_line(&mut l)? > 0 && l != "\r\n" {
        l.clear();
    }
    if code != 200 {
        let mut body = String::new();
        r.read_to_string(&mut body)?;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        job_ok(code, &v, &format!("watching job {id}"))?;
    }
    for line in r.lines() {
        let e: serde_json::Value = serde_json::from_str(&line?).context("the daemon's event stream: not JSON")?;
        match e["event"].as_str() {
            Some("progress") => progress(&e),
            Some("ended") => return Ok(e["job"].clone()),
            Some("gone") => bail!("watching job {id}: {}", e["error"].as_str().unwrap_or("it is gone")),
            _ => {}
        }
    }
    bail!("the daemon closed job {id}'s event stream before it ended (did the daemon stop? a restarted daemon takes a transfer up again: `dwcp job watch {id}`)")
}

/// `dwcp job watch ID`: follows the job's event stream with a progress bar until it ends, then
/// the summary; fails unless verified.
pub fn job_watch(sock: &std::path::Path, id: u64, json: bool) -> Result<()> {
    use std::io::IsTerminal;
    let bar = (!json && std::io::stderr().is_terminal()).then(|| crate::fmt::progress_bar(None));
    let end = follow(sock, id, |e| {
        if let Some(b) = &bar {
            if let Some(t) = e["total_bytes"].as_u64().filter(|&t| t > 0) {
                b.set_length(t);
            }
            b.set_position(e["acked_bytes"].as_u64().unwrap_or(0));
        }
    })?;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    if json {
        println!("{end}");
    } else {
        let r = &end["result"];
        if end["state"] == "verified" {
            println!("{}", job_line(&end));
        }
        if end["state"] == "verified" {
            println!(
                "      {:.2} Gbit/s, {} streams, {} mode, digest {} verified by the receiver",
                r["goodput_gbps"].as_f64().unwrap_or(0.0),
                r["streams"],
                r["mode"]["initial"].as_str().unwrap_or("?"),
                r["digest"].as_str().unwrap_or("?")
            );
        }
    }
    if end["state"] != "verified" {
        bail!("transfer {id} {}: {}", end["state"].as_str().unwrap_or("ended"), end["result"]["error"].as_str().unwrap_or("the receiver's digest did not match ours"));
    }
    Ok(())
}
