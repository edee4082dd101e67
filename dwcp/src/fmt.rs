//! What a person (or a script) reads: sizes, durations, progress, summaries.

use std::fmt::Write as _;
use std::time::Duration;

use dataplane::recv::{SessionOutcome, hex};
use dataplane::send::{QemuOutcome, SendReport};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

pub use dataplane::source::parse_size;

/// Parses `30s`, `500ms`, `2m`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let bad = || format!("{s:?} is not a duration (examples: 500ms, 30s, 2m)");
    let (num, mult) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = t.strip_suffix('h') {
        (n, 3600.0)
    } else if let Some(n) = t.strip_suffix('d') {
        (n, 86_400.0)
    } else {
        (t, 1.0)
    };
    let v: f64 = num.parse().map_err(|_| bad())?;
    if !(v.is_finite() && v > 0.0) {
        return Err(bad());
    }
    // At most a year: longer is a typo, and a `Duration` of 1e300 s does not exist.
    match Duration::try_from_secs_f64(v * mult) {
        Ok(d) if d <= Duration::from_secs(366 * 86_400) => Ok(d),
        _ => Err(format!("{s:?} is longer than a year; give a duration like 30s, 10m or 24h")),
    }
}

/// `1.50 GiB`.
pub fn bytes(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 { format!("{n} B") } else { format!("{v:.2} {}", U[i]) }
}

fn gbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 * 8.0 / d.as_secs_f64().max(1e-9) / 1e9
}

/// A progress bar on stderr.
pub fn progress_bar(size: Option<u64>) -> ProgressBar {
    let pb = ProgressBar::with_draw_target(size, indicatif::ProgressDrawTarget::stderr());
    pb.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] [{wide_bar}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}").expect("template").progress_chars("=> "),
    );
    pb
}

/// The send summary as a table.
pub fn send_table(r: &SendReport, extra: &[(&str, String)]) -> String {
    let mut s = String::new();
    let row = |s: &mut String, k: &str, v: String| {
        let _ = writeln!(s, "  {k:<13} {v}");
    };
    let moved = r.size - r.skipped;
    let _ = writeln!(s, "dwcp send: {}", if r.verified { "done, digest verified by the receiver" } else { "FAILED verification" });
    row(&mut s, "object", format!("{} ({})", r.name, bytes(r.size)));
    if r.skipped > 0 {
        row(&mut s, "resumed", format!("{} already at the receiver, {} sent now", bytes(r.skipped), bytes(moved)));
    }
    row(&mut s, "wall time", format!("{:.3} s", r.wall.as_secs_f64()));
    row(&mut s, "goodput", format!("{:.2} Gbit/s", gbps(moved, r.wall)));
    let auto = if r.streams_auto { format!(" (auto: rtt {:.2} ms)", r.rtt.as_secs_f64() * 1e3) } else { String::new() };
    if r.transport == "rdma" {
        row(&mut s, "streams", format!("{} RDMA queue pair(s) and 1 control stream", r.rdma_qps));
    } else {
        row(&mut s, "streams", format!("{}{auto} on {} pinned shard(s)", r.streams, r.shards));
    }
    if r.chunk_size.1 {
        row(&mut s, "chunks", format!("{} (PBA: a startup-bound object, cut to reach every stream)", bytes(u64::from(r.chunk_size.0))));
    }
    row(&mut s, "on the wire", format!("{} payload and framing", bytes(r.sent)));
    row(&mut s, "re-sent", format!("{} chunks ({} streams lost)", r.resent_chunks, r.streams_lost));
    row(&mut s, "encryption", if r.encrypted { "AES-256-GCM, Noise NNpsk0 keys".into() } else { "off (authenticated only)".into() });
    row(
        &mut s,
        "transport",
        match (&r.rdma_fallback, r.transport) {
            (_, "rdma") => "RDMA verbs (WRITE WITH IMMEDIATE into the receiver's region)".into(),
            (Some(why), _) => format!("io_uring TCP (RDMA not used: {why})"),
            (None, t) => format!("io_uring {}", t.to_uppercase()),
        },
    );
    row(&mut s, "zero-copy", if r.send_zc { "IORING_OP_SEND_ZC".into() } else { "off".into() });
    row(&mut s, "cpu", format!("{:.2} s ({:.2} s per GB)", r.cpu.as_secs_f64(), r.cpu.as_secs_f64() / (moved.max(1) as f64 / 1e9)));
    match (&r.hde, &r.hde_fallback) {
        (Some(h), _) => {
            let ratio = h.input as f64 / h.output.max(1) as f64;
            let levels: Vec<String> = h.levels.iter().map(|(k, v)| format!("{k} x{v}")).collect();
            let pages: Vec<String> = h.pages.iter().map(|(k, v)| format!("{k} {v}")).collect();
            row(
                &mut s,
                "hde",
                format!("{} of pages -> {} ({ratio:.2}x), {:.0} MB/s encode; {}", bytes(h.input), bytes(h.output), h.input as f64 / h.encode_s.max(1e-9) / 1e6, levels.join(", ")),
            );
            row(&mut s, "hde pages", if h.refs > 0 { format!("{}; {} reference pages", pages.join(", "), h.refs) } else { pages.join(", ") });
        }
        (None, Some(why)) => row(&mut s, "hde", format!("off ({why})")),
        (None, None) => {}
    }
    match &r.qemu {
        Some(QemuOutcome::Encoded(q)) => {
            let ratio = q.input as f64 / q.output.max(1) as f64;
            row(
                &mut s,
                "page-aware",
                format!("QEMU stream {} -> {} ({ratio:.2}x) in {} batches; {} of device state passed through", bytes(q.input), bytes(q.output), q.batches, bytes(q.passthrough)),
            );
            let mut kinds: Vec<String> = q.hde.pages.iter().map(|(k, v)| format!("{k:?} {v}")).collect();
            kinds.sort();
            row(
                &mut s,
                "qemu pages",
                format!("{} with data, {} zero; re-sent {} ({} with an old copy for a delta): {}", q.pages, q.zero_pages, q.resent_pages, q.cache_hits, kinds.join(", ")),
            );
            if !q.levels.is_empty() {
                row(&mut s, "qemu effort", q.levels.iter().map(|(l, n)| format!("{l} {n} batches")).collect::<Vec<_>>().join(", "));
            }
            if let Some(why) = &q.fallback {
                row(&mut s, "fell back", format!("to tunnel mode mid-stream: {why}"));
            }
        }
        Some(QemuOutcome::Tunnel(why)) => row(&mut s, "page-aware", format!("off, tunnel mode ({why})")),
        None => {}
    }
    if let Some(c) = &r.control {
        let monitor = match &c.degraded {
            None => "eBPF probes (tcp_probe, tcp_retransmit_skb, tcp_cong_state_set)".to_string(),
            // The reason says that it polls: "polling TCP_INFO (asked for)", "...; polling TCP_INFO instead".
            Some(why) => why.clone(),
        };
        row(&mut s, "path monitor", monitor);
        let cc = match (&c.cc, &c.cc_error) {
            (_, Some(e)) => format!("system default ({e})"),
            (Some(cc), None) => cc.clone(),
            (None, None) => "system default".into(),
        };
        let restarts = if c.bbr_restarts > 0 { format!(" ({} BBR restarts)", c.bbr_restarts) } else { String::new() };
        row(&mut s, "congestion", format!("ACP {}, streams on {cc}{restarts}", c.acp));
        if let Some(r) = &c.rate_cc {
            row(&mut s, "rate control", r.clone());
        }
        match (&c.initial_window, &c.initial_window_degraded) {
            (Some(w), _) => row(
                &mut s,
                "first window",
                format!(
                    "{} segments ({} bytes asked) on {} streams{}",
                    w.segments,
                    w.bytes,
                    w.applied,
                    if w.refused > 0 { format!(", refused on {}", w.refused) } else { String::new() }
                ),
            ),
            (None, Some(why)) => row(&mut s, "first window", format!("the kernel's ({why})")),
            (None, None) => {}
        }
        if let Some((w, gain)) = c.initial_window.and_then(|w| Some((w, w.startup_gain()?))) {
            let lifted = c.startup_lifted_s.map_or("held until the send ended".to_string(), |t| format!("lifted at {t:.1} s, when ACP paced"));
            row(&mut s, "startup", format!("window held to {gain:.2} x delivered per least RTT on {} streams (at most {} segments), {lifted}", w.clamped, w.peak_clamp_segments));
        }
        row(&mut s, "path", format!("{}, {} segments retransmitted", rtt_line(c.mean_srtt_us, c.min_rtt_us), c.retrans));
        if c.stream_trials != (0, 0) {
            let (kept, back) = c.stream_trials;
            row(&mut s, "stream trials", format!("{kept} kept, {back} given back (PBA: the streams' buffers held them back)"));
        }
    }
    for (k, v) in extra {
        row(&mut s, k, v.clone());
    }
    row(&mut s, "digest", format!("blake3-manifest:{}", &hex(&r.digest)[..32]));
    s
}

/// "srtt A over min B (Nx)": the ratio only where the least RTT is a path's (1 ms or more); on
/// loopback a least RTT of a few microseconds against milliseconds of host scheduling gave
/// "1007.97x", which says nothing of a queue.
fn rtt_line(srtt_us: f64, min_us: f64) -> String {
    let ms = |us: f64| if us < 100.0 { format!("{:.3} ms", us / 1e3) } else { format!("{:.2} ms", us / 1e3) };
    if min_us >= 1000.0 { format!("srtt {} over min {} ({:.2}x)", ms(srtt_us), ms(min_us), srtt_us / min_us) } else { format!("srtt {}, min {}", ms(srtt_us), ms(min_us)) }
}

/// The path control's report as JSON (`control` of the send summary).
/// One receiver session result for a person.
pub fn outcome_line(o: &SessionOutcome) -> String {
    match &o.result {
        Ok(d) => format!(
            "dwcp recv: {} ({}) verified in {:.3} s, {:.2} Gbit/s, {} received{}, digest {} -> {}",
            o.name,
            bytes(o.size),
            o.wall.as_secs_f64(),
            gbps(o.received, o.wall),
            bytes(o.received),
            if o.resumed > 0 { format!(" + {} resumed", bytes(o.resumed)) } else { String::new() },
            &hex(d)[..16],
            o.path.as_ref().map_or("(discarded)".into(), |p| p.display().to_string()),
        ),
        Err(e) => format!("dwcp recv: {} FAILED: {e}", o.name),
    }
}

/// One receiver session result as JSON.
pub fn outcome_json(o: &SessionOutcome) -> String {
    json!({
        "schema": ctlplane::engine::report::SCHEMA,
        "name": o.name, "size": o.size, "received": o.received, "resumed": o.resumed,
        "wall_s": o.wall.as_secs_f64(), "verified": o.result.is_ok(),
        "digest": o.result.as_ref().ok().map(|d| hex(d)), "error": o.result.as_ref().err(),
        "path": o.path.as_ref().map(|p| p.display().to_string()),
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("64k").unwrap(), 65536);
        assert_eq!(parse_size("100").unwrap(), 100);
        assert!(parse_size("12 parsecs").unwrap_err().contains("unknown size unit"));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("soon").is_err());
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86_400));
        for bad in ["1e300s", "inf", "nan", "-1s", "400d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_rtt_ratio_is_shown_only_for_a_path_of_a_millisecond_or_more() {
        assert_eq!(rtt_line(55_000.0, 50_000.0), "srtt 55.00 ms over min 50.00 ms (1.10x)");
        assert_eq!(rtt_line(4_030.0, 4.0), "srtt 4.03 ms, min 0.004 ms");
    }
}
