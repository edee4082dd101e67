//! `dwcp daemon`, `dwcp status`, `dwcp config check`.

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

fn http_get(addr: &str, path: &str) -> Result<(u16, String)> {
    let mut s = std::net::TcpStream::connect(addr).with_context(|| format!("no dwcp daemon answers on {addr} (is it running? is api.listen there?)"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let code = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
    Ok((code, body))
}

/// Prints the daemon's status.
pub fn status(api: &str, json: bool) -> Result<()> {
    let (code, body) = http_get(api, "/status")?;
    if code != 200 {
        bail!("{api}/status answered {code}");
    }
    if json {
        println!("{body}");
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
    let sessions = v["sessions"].as_array().cloned().unwrap_or_default();
    println!("  sessions      {} finished", sessions.len());
    for s in sessions.iter().rev().take(10) {
        let ok = if s["result"]["Ok"].is_string() { "verified".to_string() } else { format!("FAILED: {}", s["result"]["Err"].as_str().unwrap_or("")) };
        println!("    {} {} bytes in {:.2} s: {ok}", s["name"].as_str().unwrap_or("?"), s["size"], s["wall_s"].as_f64().unwrap_or(0.0));
    }
    Ok(())
}

/// Validates a config file.
pub fn check(file: &std::path::Path) -> Result<()> {
    Config::load(Some(file), std::env::vars(), &[])?;
    println!("{}: ok", file.display());
    Ok(())
}
