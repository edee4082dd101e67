//! Path measurement on the control channel: a probe connection (`Hello::Probe`) authenticates like
//! any stream, then exchanges Probe frames. Pings give the RTT (the least of several, so a busy
//! host's scheduling delay does not count); a burst of bulk frames gives the delivery rate, timed
//! by the responder from the first bulk frame's arrival to the last's, so it excludes the round
//! trip. A short burst on a long path ends inside TCP slow start: the rate is then a lower bound,
//! and live transfers refine it (the daemon feeds their goodput to mode detection).

use std::time::{Duration, Instant};

use crate::crypto::Psk;
use crate::handshake::{self, Conn, HandshakeError};
use crate::wire::{self, FrameType, Hello, ProbeMsg, WireError};

/// What to measure.
#[derive(Debug, Clone, Copy)]
pub struct ProbeOptions {
    /// RTT samples: the key exchange, the Hello's Welcome (which also says whether the
    /// receiver allows plaintext), and pings for the rest (none on a long path, below).
    pub rtt_samples: u32,
    /// Bulk bytes for the delivery rate (0: RTT only).
    pub bulk_bytes: u64,
    /// Bytes per bulk frame.
    pub frame_bytes: usize,
    /// A long path: when the key exchange and the Welcome both took at least this, no ping
    /// and no bulk burst follow (the RTT alone classifies such a path; there each round trip
    /// delays the transfer, and a burst still in slow start measures little). The handshake's
    /// samples carry the two ends' CPU time (a busy host measured 2.4 ms on loopback), so a
    /// short path takes its pings.
    pub long_path_rtt: Option<Duration>,
    /// Up to this many more pings while the least sample is still above `recheck_above` (a
    /// datacenter threshold) on a short path: a host busy on both cores delayed every one of
    /// three loopback samples past 3 ms (CI), which classified loopback as an internet path.
    /// A real path that slow pays a few of its short round trips.
    pub extra_pings: u32,
    /// See `extra_pings` (None: no extra pings).
    pub recheck_above: Option<Duration>,
    /// Connect and read timeout.
    pub timeout: Duration,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        Self { rtt_samples: 5, bulk_bytes: 8 << 20, frame_bytes: 256 << 10, long_path_rtt: None, extra_pings: 0, recheck_above: None, timeout: Duration::from_secs(5) }
    }
}

/// A path's measurement.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PathEstimate {
    /// Least ping round trip.
    pub rtt_min: Duration,
    /// Median ping round trip.
    pub rtt_median: Duration,
    /// Delivery rate in bit/s; NaN when no bulk was sent or it was too short to time.
    pub bw_bps: f64,
    /// The responder accepts plaintext streams.
    pub plaintext_ok: bool,
    /// RTT samples taken (the handshake's two and the pings).
    pub samples: usize,
}

fn unexpected(during: &'static str, m: ProbeMsg) -> HandshakeError {
    HandshakeError::Wire { during, source: WireError::Malformed { what: "probe", why: format!("unexpected {m:?}") } }
}

fn read_msg(conn: &mut Conn, during: &'static str) -> Result<ProbeMsg, HandshakeError> {
    let (_, p) = conn.expect(FrameType::Probe, during)?;
    ProbeMsg::decode(&p).map_err(|source| HandshakeError::Wire { during, source })
}

/// Measures the path to the receiver at `addr`.
pub fn measure(addr: &str, psk: &Psk, o: ProbeOptions) -> Result<PathEstimate, HandshakeError> {
    // The key exchange and the Hello's Welcome are round trips too: they count as samples.
    let (mut conn, kx) = handshake::connect(addr, psk, true, 0, o.timeout)?;
    let t = Instant::now();
    conn.write_frame(FrameType::Hello, 0, &Hello::Probe.encode())?;
    let (_, w) = conn.expect(FrameType::Welcome, "opening a probe")?;
    let rtts = vec![kx, t.elapsed()];
    // The Welcome says whether the receiver takes plaintext (each Reply says it again).
    let welcome = wire::Welcome::decode(&w).map_err(|source| HandshakeError::Wire { during: "reading the probe's welcome", source })?;
    let plaintext_ok = welcome.caps.transports & wire::TRANSPORT_PLAINTEXT != 0;
    let est = measure_on(&mut conn, rtts, plaintext_ok, o)?;
    let _ = conn.sock.shutdown(std::net::Shutdown::Both);
    Ok(est)
}

/// Measures the path on `conn`, a probe connection past its Welcome (a warm sender's parked
/// stream, say), which stays open; `rtts`: round trips already timed on it.
pub fn measure_on(conn: &mut Conn, mut rtts: Vec<Duration>, mut plaintext_ok: bool, o: ProbeOptions) -> Result<PathEstimate, HandshakeError> {
    let long = o.long_path_rtt.is_some_and(|r| !rtts.is_empty() && rtts.iter().all(|&t| t >= r));
    let pings = if long { 0 } else { o.rtt_samples.saturating_sub(2) };
    let least = |r: &[Duration]| r.iter().copied().min().unwrap_or_default();
    let recheck = |r: &[Duration]| o.recheck_above.is_some_and(|above| least(r) > above);
    for seq in 0..pings + if long { 0 } else { o.extra_pings } {
        if seq >= pings && !recheck(&rtts) {
            break;
        }
        let t = Instant::now();
        conn.write_frame(FrameType::Probe, 0, &ProbeMsg::Ping { seq }.encode(0))?;
        match read_msg(conn, "waiting for a probe reply")? {
            ProbeMsg::Reply { seq: s, plaintext_ok: p, .. } if s == seq => plaintext_ok = p,
            m => return Err(unexpected("waiting for a probe reply", m)),
        }
        rtts.push(t.elapsed());
    }
    rtts.sort();
    let mut bw_bps = f64::NAN;
    let bulk = o.long_path_rtt.is_none_or(|r| rtts[0] < r);
    let frames = if bulk { o.bulk_bytes.min(wire::MAX_PROBE_BULK).div_ceil(o.frame_bytes.max(1) as u64) } else { 0 };
    if frames >= 2 {
        let pad = o.frame_bytes.min(wire::MAX_CONTROL_PAYLOAD as usize - ProbeMsg::LEN);
        for seq in 0..frames as u32 {
            let last = u64::from(seq) + 1 == frames;
            conn.write_frame(FrameType::Probe, 0, &ProbeMsg::Bulk { seq, last }.encode(pad))?;
        }
        match read_msg(conn, "waiting for the bulk probe's reply")? {
            ProbeMsg::Reply { bytes, span_ns, .. } if span_ns > 0 => bw_bps = bytes as f64 * 8.0 / (span_ns as f64 / 1e9),
            ProbeMsg::Reply { .. } => {}
            m => return Err(unexpected("waiting for the bulk probe's reply", m)),
        }
    }
    Ok(PathEstimate { rtt_min: rtts[0], rtt_median: rtts[rtts.len() / 2], bw_bps, plaintext_ok, samples: rtts.len() })
}

/// Serves a probe connection after its Welcome until the prober closes it (`None`) or sends a
/// Hello on it, which is returned: a parked stream being taken into a session.
pub fn serve(conn: &mut Conn, plaintext_ok: bool) -> Result<Option<(wire::FrameHeader, Vec<u8>)>, HandshakeError> {
    const DURING: &str = "serving a probe";
    let (mut first, mut bytes, mut total) = (None::<Instant>, 0u64, 0u64);
    loop {
        let (h, p) = match conn.read_frame(DURING) {
            Err(HandshakeError::Closed { .. }) => return Ok(None),
            r => r?,
        };
        match h.kind {
            FrameType::Probe => {}
            FrameType::Hello => return Ok(Some((h, p))),
            got => return Err(HandshakeError::Unexpected { during: DURING, expected: FrameType::Probe, got }),
        }
        let now = Instant::now();
        match ProbeMsg::decode(&p).map_err(|source| HandshakeError::Wire { during: DURING, source })? {
            ProbeMsg::Ping { seq } => {
                conn.write_frame(FrameType::Probe, 0, &ProbeMsg::Reply { seq, bytes: 0, span_ns: 0, plaintext_ok }.encode(0))?;
            }
            ProbeMsg::Bulk { seq, last } => {
                total += p.len() as u64;
                if total > wire::MAX_PROBE_BULK {
                    let why = format!("probe bulk beyond {} bytes", wire::MAX_PROBE_BULK);
                    conn.write_error(wire::ErrorCode::Protocol, &why);
                    return Err(HandshakeError::Wire { during: DURING, source: WireError::Malformed { what: "probe", why } });
                }
                match first {
                    None => first = Some(now),
                    Some(_) => bytes += p.len() as u64,
                }
                if last {
                    let span_ns = first.map_or(0, |f| now.duration_since(f).as_nanos() as u64);
                    conn.write_frame(FrameType::Probe, 0, &ProbeMsg::Reply { seq, bytes, span_ns, plaintext_ok }.encode(0))?;
                    (first, bytes) = (None, 0);
                }
            }
            m @ ProbeMsg::Reply { .. } => return Err(unexpected(DURING, m)),
        }
    }
}
