//! The live mode controller of one send: every [`EVERY`] it reads the transfer's counters into
//! [`crate::mode::Live`] (I/O-free) and applies its decisions to the running transfer (the
//! streams kept active). Its switches are reported with the plan.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dataplane::send::Progress;
use serde::Serialize;
use serde_json::json;

use super::plan::Plan;
use crate::mode::{Live, Mode, Reading};

/// How often the live controller samples the transfer.
pub const EVERY: Duration = Duration::from_millis(500);

/// One live switch.
#[derive(Debug, Clone, Serialize)]
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
    /// The sample's goodput, Gbit/s (NaN: the interval measured no bandwidth).
    pub gbps: f64,
}

/// Runs `live` over the transfer's `progress` until `stop` is set; returns the switches.
pub fn spawn(mut live: Live, progress: Arc<Progress>, stop: Arc<AtomicBool>, fixed_streams: bool) -> JoinHandle<Vec<SwitchRecord>> {
    std::thread::spawn(move || {
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
                tracing::info!(from = r.from.name(), to = r.to.name(), active = r.active, rtt_ms = r.rtt_ms, gbps = r.gbps, "mode switch during the transfer");
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
    })
}

/// Summary rows for a person: the mode, the probe, the streams, why encryption is what it is,
/// and the switches.
pub fn rows(p: &Plan, switches: &[SwitchRecord]) -> Vec<(&'static str, String)> {
    let bw = p.probe_gbps.map_or("bandwidth not measured".to_string(), |g| format!("{g:.2} Gbit/s"));
    let mut v = vec![
        ("mode", format!("{} ({})", p.mode.name(), if p.forced { "--mode" } else if p.live { "auto" } else { "auto, loopback" })),
        ("probe", format!("rtt {:.3} ms, {bw}", p.probe_rtt_us as f64 / 1e3)),
        ("active", format!("{} of {} streams at the start (the rest parked for a switch)", p.active, p.streams)),
        ("why enc.", p.why.get("encrypt").cloned().unwrap_or_default()),
    ];
    for s in switches {
        v.push(("switched", format!("{} -> {} at {:.1} s (rtt {:.2} ms, {:.2} Gbit/s): {} streams active", s.from.name(), s.to.name(), s.at_s, s.rtt_ms, s.gbps, s.active)));
    }
    v
}

/// The `mode` object of a send's JSON.
pub fn json(p: &Plan, switches: &[SwitchRecord]) -> serde_json::Value {
    json!({
        "how": if p.forced { format!("{} (--mode)", p.mode.name()) } else { "auto".to_string() },
        "live": p.live,
        "initial": p.mode.name(),
        "probe_rtt_us": p.probe_rtt_us,
        "probe_gbps": p.probe_gbps,
        "opened": p.streams, "active": p.active,
        "encryption": p.why.get("encrypt"),
        "switches": switches.iter().map(|s| json!({"at_s": s.at_s, "from": s.from.name(), "to": s.to.name(), "active": s.active, "rtt_ms": s.rtt_ms, "gbps": s.gbps.is_finite().then_some(s.gbps)})).collect::<Vec<_>>(),
    })
}
