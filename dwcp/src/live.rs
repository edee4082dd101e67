//! `dwcp send`'s mode: a probe of the path on the control channel picks datacenter or internet
//! defaults (streams, encryption), and during the transfer a controller fed by the transfer's own
//! goodput and TCP_INFO RTT switches mode live, parking or unparking streams without dropping
//! any (hybrid mode's per-peer switching, for one transfer).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};

use ctlplane::mode::{self, Live, Mode, Reading, Thresholds};
use dataplane::probe::{self, PathEstimate, ProbeOptions};
use dataplane::send::Progress;
use serde_json::json;

/// How often the live controller samples the transfer.
const EVERY: Duration = Duration::from_millis(500);

/// One live switch.
#[derive(Debug, Clone)]
pub struct SwitchRecord {
    /// Seconds into the transfer.
    pub at_s: f64,
    /// From.
    pub from: Mode,
    /// To.
    pub to: Mode,
    /// Streams active afterwards.
    pub active: u16,
    /// The sample's RTT, ms.
    pub rtt_ms: f64,
    /// The sample's goodput, Gbit/s.
    pub gbps: f64,
}

/// What the mode logic chose and did.
#[derive(Debug, Clone)]
pub struct ModeReport {
    /// `auto` (probed, switches live) or the mode forced by `--mode`.
    pub how: String,
    /// Mode at the start.
    pub initial: Mode,
    /// The opening probe.
    pub probe: PathEstimate,
    /// Streams opened and, at the start, active.
    pub opened: u16,
    /// See `opened`.
    pub active: u16,
    /// Why encryption is what it is.
    pub encryption: String,
    /// Live switches.
    pub switches: Vec<SwitchRecord>,
}

/// What `send` should use.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Streams to open (`SendOptions::streams`).
    pub opened: u16,
    /// Streams active at the start (`Progress::active`).
    pub active: u16,
    /// Encrypt.
    pub encrypt: bool,
    /// The report so far.
    pub report: ModeReport,
    /// The mode's defaults (transport among them).
    pub defaults: mode::TransferDefaults,
    live: Option<Live>,
}

fn name(m: Mode) -> &'static str {
    match m {
        Mode::Datacenter => "datacenter",
        Mode::Internet => "internet",
    }
}

/// Probes the receiver and decides. `forced`: `--mode datacenter|internet` (no live switching);
/// `streams`: `--streams` (fixed, never parked); `encrypt`: `--encrypt`/`--no-encrypt`;
/// `trials`: open room for PBA's stream trials (`mode::streams_to_open`).
#[allow(clippy::too_many_arguments)]
pub fn plan(
    to: &str,
    psk: &dataplane::crypto::Psk,
    t: Thresholds,
    forced: Option<Mode>,
    streams: Option<u16>,
    encrypt: Option<bool>,
    cores: usize,
    rdma_here: bool,
    trials: bool,
) -> anyhow::Result<Plan> {
    // Three RTT samples (the key exchange, the Welcome, which also says whether plaintext is
    // allowed, and one ping), up to five more pings while none was within the datacenter
    // threshold (a busy host delays samples by milliseconds), and on a long path (both handshake
    // samples at or above the internet threshold) neither the ping nor the bulk burst: there
    // each round trip of the probe delays the transfer (a migration's first byte), and live
    // goodput measures the path anyway.
    let o = ProbeOptions {
        rtt_samples: 3,
        extra_pings: 5,
        recheck_above: Some(t.dc_max_rtt),
        bulk_bytes: if forced.is_some() { 0 } else { 4 << 20 },
        long_path_rtt: Some(t.inet_min_rtt),
        ..ProbeOptions::default()
    };
    let est = probe::measure(to, psk, o)?;
    let mode = forced.unwrap_or_else(|| t.classify(est.rtt_min, est.bw_bps));
    let d = mode::defaults(mode, rdma_here, cores, Some(est.rtt_min));
    let (opened, active) = match (streams, forced) {
        (Some(n), _) => (n.max(1), n.max(1)),
        (None, Some(_)) => (d.streams, d.streams),
        (None, None) => (mode::streams_to_open(false, cores, est.rtt_min, trials), d.streams),
    };
    let (enc, why) = match encrypt {
        Some(e) => (e, if e { "on (--encrypt)" } else { "off (--no-encrypt, or --transport rdma)" }.to_string()),
        None if d.encrypt => (true, format!("on ({} mode)", name(mode))),
        None if est.plaintext_ok => (false, format!("off ({} mode; peers still authenticated)", name(mode))),
        None => (true, format!("on ({} mode would send plaintext, but the receiver requires encryption)", name(mode))),
    };
    let live = forced.is_none().then(|| Live::new(t, mode, rdma_here, cores, opened));
    let how = forced.map_or("auto".to_string(), |m| format!("{} (--mode)", name(m)));
    let report = ModeReport { how, initial: mode, probe: est, opened, active, encryption: why, switches: Vec::new() };
    Ok(Plan { opened, active, encrypt: enc, report, defaults: d, live })
}

/// The live controller's thread; returns the switches when `stop` is set.
pub fn spawn(plan: &mut Plan, progress: Arc<Progress>, stop: Arc<AtomicBool>, fixed_streams: bool) -> Option<std::thread::JoinHandle<Vec<SwitchRecord>>> {
    let mut live = plan.live.take()?;
    progress.active.store(plan.active, Relaxed);
    Some(std::thread::spawn(move || {
        let t0 = Instant::now();
        let mut out = Vec::new();
        // The least of the monitor's readings over the interval (it renews `srtt_us` every
        // 100 ms): one late ACK on a busy host is not a long path.
        let mut least_srtt = 0u64;
        while !stop.load(Relaxed) {
            let r = Reading {
                acked: progress.acked.load(Relaxed),
                total: progress.total.load(Relaxed),
                srtt: Duration::from_micros(std::mem::take(&mut least_srtt)),
                watched_us: progress.watched_us.load(Relaxed),
                path_limited_us: progress.path_limited_us.load(Relaxed),
            };
            if let Some(d) = live.observe(t0.elapsed(), r) {
                if !fixed_streams {
                    progress.active.store(d.active, Relaxed);
                }
                let r = SwitchRecord {
                    at_s: d.switch.at.as_secs_f64(),
                    from: d.switch.from,
                    to: d.switch.to,
                    active: progress.active.load(Relaxed),
                    rtt_ms: d.sample.rtt.as_secs_f64() * 1e3,
                    gbps: d.sample.bw_bps / 1e9,
                };
                tracing::info!(from = name(r.from), to = name(r.to), active = r.active, rtt_ms = r.rtt_ms, gbps = r.gbps, "mode switch during the transfer");
                out.push(r);
            }
            let t = Instant::now();
            while t.elapsed() < EVERY && !stop.load(Relaxed) {
                std::thread::sleep(Duration::from_millis(20));
                least_srtt = match (least_srtt, progress.srtt_us.load(Relaxed)) {
                    (0, s) | (s, 0) => s,
                    (a, b) => a.min(b),
                };
            }
        }
        out
    }))
}

fn bw(e: &PathEstimate) -> String {
    if e.bw_bps.is_nan() { "not measured".into() } else { format!("{:.2} Gbit/s", e.bw_bps / 1e9) }
}

/// Summary rows.
pub fn rows(r: &ModeReport) -> Vec<(&'static str, String)> {
    let mut v = vec![
        ("mode", format!("{} {}", name(r.initial), if r.how == "auto" { "(auto)".to_string() } else { format!("({})", r.how) })),
        ("probe", format!("rtt {:.3} ms, {}", r.probe.rtt_min.as_secs_f64() * 1e3, bw(&r.probe))),
        ("active", format!("{} of {} streams at the start (the rest parked for a switch)", r.active, r.opened)),
        ("why enc.", r.encryption.clone()),
    ];
    for s in &r.switches {
        v.push(("switched", format!("{} -> {} at {:.1} s (rtt {:.2} ms, {:.2} Gbit/s): {} streams active", name(s.from), name(s.to), s.at_s, s.rtt_ms, s.gbps, s.active)));
    }
    v
}

/// JSON.
pub fn json(r: &ModeReport) -> serde_json::Value {
    json!({
        "how": r.how, "initial": name(r.initial),
        "probe_rtt_us": r.probe.rtt_min.as_micros() as u64,
        "probe_gbps": if r.probe.bw_bps.is_nan() { None } else { Some(r.probe.bw_bps / 1e9) },
        "opened": r.opened, "active": r.active, "encryption": r.encryption,
        "switches": r.switches.iter().map(|s| json!({"at_s": s.at_s, "from": name(s.from), "to": name(s.to), "active": s.active, "rtt_ms": s.rtt_ms, "gbps": s.gbps})).collect::<Vec<_>>(),
    })
}
