//! A send's outcome as JSON (`dwcp send --json`, a daemon job's result): one shape for every
//! caller.

use std::time::Duration;

use dataplane::recv::hex;
use dataplane::send::{QemuOutcome, SendReport};
use serde_json::json;

fn gbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 * 8.0 / d.as_secs_f64().max(1e-9) / 1e9
}

fn control_json(c: &dataplane::send::ControlReport) -> serde_json::Value {
    json!({
        "monitor": c.backend, "monitor_degraded": c.degraded, "acp": c.acp, "cc": c.cc, "cc_error": c.cc_error,
        "retrans": c.retrans, "min_rtt_us": c.min_rtt_us, "mean_srtt_us": c.mean_srtt_us,
        "initial_window": c.initial_window.map(|w| json!({"bytes": w.bytes, "segments": w.segments, "applied": w.applied, "refused": w.refused})),
        "startup_window": c.initial_window.and_then(|w| Some(json!({"gain": w.startup_gain()?, "clamped": w.clamped, "released": w.released, "peak_segments": w.peak_clamp_segments, "lifted_at_s": c.startup_lifted_s}))),
        "initial_window_degraded": c.initial_window_degraded,
        "probe_retransmit_events": c.probe_events.0, "probe_cong_state_events": c.probe_events.1,
        "bbr_restarts": c.bbr_restarts,
        "rate_cc": c.rate_cc,
        "stream_trials": {"kept": c.stream_trials.0, "given_back": c.stream_trials.1},
        "probe_cost": c.probe_cost.iter().map(|p| json!({"program": p.name, "runs": p.runs, "run_ns": p.run_ns})).collect::<Vec<_>>(),
    })
}

/// The version of the JSON shapes `dwcp` prints (`send --json`, `recv --json` lines, job
/// results): raised when a field changes meaning or goes away; new fields do not raise it.
pub const SCHEMA: u32 = 1;

/// The send summary as JSON.
pub fn json(r: &SendReport, mode: Option<serde_json::Value>) -> serde_json::Value {
    let moved = r.size - r.skipped;
    json!({
        "schema": SCHEMA,
        "mode": mode,
        "name": r.name, "size": r.size, "skipped": r.skipped, "sent_bytes": r.sent,
        "wall_s": r.wall.as_secs_f64(), "goodput_gbps": gbps(moved, r.wall),
        "streams": r.streams, "streams_auto": r.streams_auto, "chunk_size": r.chunk_size.0, "chunk_cut": r.chunk_size.1, "rtt_us": r.rtt.as_micros() as u64,
        "shards": r.shards, "resent_chunks": r.resent_chunks, "streams_lost": r.streams_lost,
        "encrypted": r.encrypted, "send_zc": r.send_zc, "cpu_s": r.cpu.as_secs_f64(),
        "transport": r.transport, "rdma_fallback": r.rdma_fallback, "rdma_qps": r.rdma_qps,
        "hde": r.hde.as_ref().map(|h| json!({"input": h.input, "output": h.output, "encode_s": h.encode_s, "pages": h.pages, "refs": h.refs, "levels": h.levels})),
        "hde_fallback": r.hde_fallback,
        "qemu": match &r.qemu {
            Some(QemuOutcome::Encoded(q)) => json!({
                "mode": "pages", "input": q.input, "output": q.output, "pages": q.pages, "zero_pages": q.zero_pages,
                "resent_pages": q.resent_pages, "cache_hits": q.cache_hits, "batches": q.batches, "levels": q.levels, "passthrough": q.passthrough,
                "fallback": q.fallback, "kinds": q.hde.pages.iter().map(|(k, v)| (format!("{k:?}"), *v)).collect::<std::collections::BTreeMap<_, _>>(),
            }),
            Some(QemuOutcome::Tunnel(why)) => json!({"mode": "tunnel", "why": why}),
            None => serde_json::Value::Null,
        },
        "control": r.control.as_ref().map(control_json),
        "digest": hex(&r.digest), "verified": r.verified,
    })
}
