//! Mode detection, free of I/O: per peer, datacenter or internet from measured RTT and
//! bandwidth, with hysteresis; the cluster is hybrid when its peers disagree. Measurements and
//! time are passed in, so recorded sequences replay deterministically in tests.
//!
//! Hysteresis has three parts: a dead band (a sample between the datacenter and internet
//! thresholds votes for neither), confirmation (a switch needs `confirm` consecutive votes for
//! the other mode), and a minimum dwell (no switch sooner than `min_dwell` after the last one).

use std::collections::BTreeMap;
use std::time::Duration;

/// A peer's mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Short, fat path: RDMA when present, many streams, no encryption.
    Datacenter,
    /// Long or thin path: multi-stream TCP, encryption, adaptive compression.
    Internet,
}

impl Mode {
    /// Its name in output and metrics: `datacenter` or `internet`.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Datacenter => "datacenter",
            Mode::Internet => "internet",
        }
    }
}

/// The cluster's mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterMode {
    /// Every peer is datacenter.
    Datacenter,
    /// Every peer is internet.
    Internet,
    /// Peers disagree: each gets its own mode's defaults.
    Hybrid,
}

/// Thresholds, from the config.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    /// At or below this RTT (and at or above `dc_min_bw_bps`) a sample votes datacenter.
    pub dc_max_rtt: Duration,
    /// See `dc_max_rtt`.
    pub dc_min_bw_bps: f64,
    /// At or above this RTT, or at or below `inet_max_bw_bps`, a sample votes internet.
    pub inet_min_rtt: Duration,
    /// See `inet_min_rtt`.
    pub inet_max_bw_bps: f64,
    /// Consecutive votes needed to switch.
    pub confirm: u32,
    /// Least time between two switches.
    pub min_dwell: Duration,
}

impl Thresholds {
    /// The mode one sample votes for; `None` inside the dead band.
    pub fn vote(&self, s: &Sample) -> Option<Mode> {
        if s.rtt >= self.inet_min_rtt || s.bw_bps <= self.inet_max_bw_bps {
            Some(Mode::Internet)
        } else if s.rtt <= self.dc_max_rtt && (s.bw_bps.is_nan() || s.bw_bps >= self.dc_min_bw_bps) {
            Some(Mode::Datacenter)
        } else {
            None
        }
    }

    /// A one-shot decision from a single measurement (a transfer's opening probe): the sample's
    /// vote, or inside the dead band the RTT alone (a short path whose probe burst ran below
    /// the datacenter bandwidth is still a datacenter path until live goodput says otherwise).
    pub fn classify(&self, rtt: Duration, bw_bps: f64) -> Mode {
        self.vote(&Sample { at: Duration::ZERO, rtt, bw_bps }).unwrap_or(if rtt <= self.dc_max_rtt { Mode::Datacenter } else { Mode::Internet })
    }
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            dc_max_rtt: Duration::from_micros(2000),
            dc_min_bw_bps: 5e9,
            inet_min_rtt: Duration::from_millis(10),
            inet_max_bw_bps: 1e9,
            confirm: 3,
            min_dwell: Duration::from_secs(30),
        }
    }
}

/// One measurement of a path.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// When it was taken (time since the detector's epoch).
    pub at: Duration,
    /// Round-trip time.
    pub rtt: Duration,
    /// Bandwidth in bit/s (a live transfer's goodput); NaN when only the RTT was probed, and
    /// the sample then votes by RTT alone.
    pub bw_bps: f64,
}

/// What changes when a peer switches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Switch {
    /// From.
    pub from: Mode,
    /// To.
    pub to: Mode,
    /// When.
    pub at: Duration,
}

/// A peer's detector.
#[derive(Debug, Clone)]
pub struct Detector {
    t: Thresholds,
    mode: Mode,
    votes: u32,
    last_switch: Option<Duration>,
}

impl Detector {
    /// A detector starting in `initial` (the first decisive samples confirm or change it).
    pub fn new(t: Thresholds, initial: Mode) -> Self {
        Self { t, mode: initial, votes: 0, last_switch: None }
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Feeds a sample; returns the switch it caused, if any.
    pub fn observe(&mut self, s: Sample) -> Option<Switch> {
        match self.t.vote(&s) {
            Some(m) if m != self.mode => self.votes += 1,
            Some(_) => self.votes = 0,
            None => {}
        }
        let dwelt = self.last_switch.is_none_or(|t| s.at.saturating_sub(t) >= self.t.min_dwell);
        if self.votes >= self.t.confirm && dwelt {
            let from = self.mode;
            self.mode = match from {
                Mode::Datacenter => Mode::Internet,
                Mode::Internet => Mode::Datacenter,
            };
            self.votes = 0;
            self.last_switch = Some(s.at);
            return Some(Switch { from, to: self.mode, at: s.at });
        }
        None
    }
}

/// Every configured peer's detector.
#[derive(Debug, Clone, Default)]
pub struct Peers {
    peers: BTreeMap<String, Detector>,
}

impl Peers {
    /// Adds a peer.
    pub fn add(&mut self, name: &str, t: Thresholds, initial: Mode) {
        self.peers.insert(name.to_owned(), Detector::new(t, initial));
    }
    /// Feeds a sample for `name`.
    pub fn observe(&mut self, name: &str, s: Sample) -> Option<Switch> {
        self.peers.get_mut(name)?.observe(s)
    }
    /// Each peer's mode.
    pub fn modes(&self) -> Vec<(String, Mode)> {
        self.peers.iter().map(|(n, d)| (n.clone(), d.mode())).collect()
    }
    /// The cluster's mode.
    pub fn cluster(&self) -> Option<ClusterMode> {
        let mut it = self.peers.values().map(Detector::mode);
        let first = it.next()?;
        Some(if it.all(|m| m == first) {
            match first {
                Mode::Datacenter => ClusterMode::Datacenter,
                Mode::Internet => ClusterMode::Internet,
            }
        } else {
            ClusterMode::Hybrid
        })
    }
}

/// Transport a mode prefers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// RDMA RC queue pairs.
    Rdma,
    /// io_uring multi-stream TCP.
    Tcp,
}

/// What a mode sets for transfers to a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct TransferDefaults {
    /// Transport.
    pub transport: Transport,
    /// Parallel streams (or queue pairs).
    pub streams: u16,
    /// Encrypt the streams.
    pub encrypt: bool,
    /// Adaptive compression (HDE) on.
    pub adaptive_compression: bool,
    /// Adaptive congestion prevention (pacing by the delay controller, streams on BBR).
    pub acp: bool,
}

/// The defaults a mode sets: datacenter takes RDMA when the host has a device, many streams, no
/// encryption and no compression (the link outruns both); internet takes multi-stream TCP sized
/// by the RTT, encryption, adaptive compression and ACP pacing. In a hybrid cluster each peer gets its own.
pub fn defaults(mode: Mode, rdma_present: bool, cores: usize, rtt: Option<Duration>) -> TransferDefaults {
    match mode {
        Mode::Datacenter => TransferDefaults {
            transport: if rdma_present { Transport::Rdma } else { Transport::Tcp },
            streams: (2 * cores).clamp(4, 32) as u16,
            encrypt: false,
            adaptive_compression: false,
            acp: false,
        },
        Mode::Internet => TransferDefaults {
            transport: Transport::Tcp,
            streams: dataplane::session::default_streams(cores, rtt.unwrap_or(Duration::from_millis(50))),
            encrypt: true,
            adaptive_compression: true,
            acp: true,
        },
    }
}

/// Streams a transfer opens when its mode may change while it runs: enough for either mode's
/// defaults (the internet count taken at 50 ms or the measured RTT, whichever is longer), so a
/// switch only parks or unparks streams and never reconnects.
///
/// With `trials`, on a long path it also opens room for PBA's stream trials (`dataplane::control::
/// pba::StreamTrials`): twice the internet count at the measured RTT, up to 32. A stream holds at most
/// its send buffer in flight, so on a fat long path the RTT's count can be too few, and what
/// carries more then is another stream already connected (on a 150 ms path connecting one costs
/// two round trips). Not for a producer-paced stream (standard input, a QEMU migration), whose
/// pace the stream count does not set.
pub fn streams_to_open(rdma_present: bool, cores: usize, rtt: Duration, trials: bool) -> u16 {
    let dc = defaults(Mode::Datacenter, rdma_present, cores, Some(rtt)).streams;
    let inet = defaults(Mode::Internet, rdma_present, cores, Some(rtt.max(Duration::from_millis(50)))).streams;
    let room = if trials { defaults(Mode::Internet, rdma_present, cores, Some(rtt)).streams.saturating_mul(2).min(32) } else { 0 };
    dc.max(inet).max(room)
}

/// What the live controller decided.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    /// The switch.
    pub switch: Switch,
    /// The new mode's defaults.
    pub defaults: TransferDefaults,
    /// Streams to keep active (the new defaults' count, at most the streams opened).
    pub active: u16,
    /// The sample that completed the switch.
    pub sample: Sample,
}

/// Mode control of one running transfer (hybrid mode's live switching), free of I/O: fed the
/// transfer's [`Reading`] at a fixed cadence, it turns them into samples (goodput over the
/// interval) for a [`Detector`] and, on a switch, says how many of the opened streams the new
/// mode keeps active.
///
/// An interval's goodput measures the path only if the path limited the streams: one held back
/// by the receiver (a disk slower than the link) or by a sender with nothing to send measures
/// those instead, and would turn a datacenter path "internet". Such an interval's sample votes by
/// its RTT alone.
#[derive(Debug, Clone)]
pub struct Live {
    detector: Detector,
    rdma_present: bool,
    cores: usize,
    opened: u16,
    last: Option<(Duration, Reading)>,
}

/// A running transfer's counters, read at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reading {
    /// Bytes acknowledged so far.
    pub acked: u64,
    /// Bytes the transfer sends (zero: not known yet). Once all are acknowledged, the wait for
    /// the receiver's commit measures nothing of the path.
    pub total: u64,
    /// Smoothed RTT (zero: not measured).
    pub srtt: Duration,
    /// Time the active streams were watched so far, summed over them (µs); zero where it cannot
    /// be known (no `TCP_INFO`), and then every interval's goodput counts until the last byte.
    pub watched_us: u64,
    /// Of `watched_us`, the time the path limited them (their congestion windows or pace).
    pub path_limited_us: u64,
}

/// The least share of an interval's watched stream time the path must have limited for its
/// goodput to be a bandwidth sample.
pub const PATH_LIMITED_MIN: f64 = 0.5;

impl Live {
    /// A controller for a transfer that opened `opened` streams in mode `initial`.
    pub fn new(t: Thresholds, initial: Mode, rdma_present: bool, cores: usize, opened: u16) -> Self {
        Self { detector: Detector::new(t, initial), rdma_present, cores, opened, last: None }
    }

    /// The mode in force.
    pub fn mode(&self) -> Mode {
        self.detector.mode()
    }

    /// Streams `mode` keeps active at `rtt`.
    pub fn active_for(&self, mode: Mode, rtt: Duration) -> u16 {
        defaults(mode, self.rdma_present, self.cores, Some(rtt)).streams.clamp(1, self.opened.max(1))
    }

    /// Feeds the transfer's state at `at`. The first call only sets the baseline. An interval
    /// measures nothing, and is skipped, without an RTT, once every byte was acknowledged
    /// before it began (the RTT is then the last one read, stale), when no stream was
    /// watched in it, or when the path limited the watched streams less than
    /// [`PATH_LIMITED_MIN`] of the time.
    pub fn observe(&mut self, at: Duration, r: Reading) -> Option<Decision> {
        let (t0, r0) = self.last.replace((at, r))?;
        let dt = at.checked_sub(t0).filter(|d| !d.is_zero())?;
        let srtt = r.srtt;
        let watched = r.watched_us.saturating_sub(r0.watched_us);
        let done = r0.total > 0 && r0.acked >= r0.total;
        if srtt.is_zero() || done || (r.watched_us > 0 && watched == 0) {
            return None;
        }
        // An interval in which the path did not hold the streams back measures the receiver
        // (its window) or the sender, not the path: neither its goodput nor its RTT votes. A
        // receiver writing 2 GiB to disk on loopback shows a smoothed RTT of 12 ms while its
        // window is shut (delayed ACKs, a busy host), which is no long path.
        let path = r.path_limited_us.saturating_sub(r0.path_limited_us);
        if r.watched_us > 0 && (path as f64) < PATH_LIMITED_MIN * watched as f64 {
            return None;
        }
        let bw_bps = r.acked.saturating_sub(r0.acked) as f64 * 8.0 / dt.as_secs_f64();
        let sample = Sample { at, rtt: srtt, bw_bps };
        let switch = self.detector.observe(sample)?;
        let defaults = defaults(switch.to, self.rdma_present, self.cores, Some(srtt));
        Some(Decision { switch, defaults, active: self.active_for(switch.to, srtt), sample })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(at_s: f64, rtt_ms: f64, gbps: f64) -> Sample {
        Sample { at: Duration::from_secs_f64(at_s), rtt: Duration::from_secs_f64(rtt_ms / 1e3), bw_bps: gbps * 1e9 }
    }

    fn replay(d: &mut Detector, seq: &[Sample]) -> Vec<Switch> {
        seq.iter().filter_map(|x| d.observe(*x)).collect()
    }

    #[test]
    fn steady_links_never_switch() {
        let mut dc = Detector::new(Thresholds::default(), Mode::Internet);
        let seq: Vec<_> = (0..100).map(|i| s(i as f64, 0.1 + (i % 3) as f64 * 0.05, 25.0)).collect();
        let sw = replay(&mut dc, &seq);
        assert_eq!(sw.len(), 1, "one switch to datacenter, then steady");
        assert_eq!(sw[0].to, Mode::Datacenter);
        let mut wan = Detector::new(Thresholds::default(), Mode::Internet);
        let seq: Vec<_> = (0..100).map(|i| s(i as f64, 50.0 + (i % 5) as f64, 0.9)).collect();
        assert!(replay(&mut wan, &seq).is_empty());
    }

    #[test]
    fn flapping_link_is_held_by_the_hysteresis() {
        // Alternating good and bad samples never reach `confirm` consecutive votes.
        let mut d = Detector::new(Thresholds::default(), Mode::Datacenter);
        let seq: Vec<_> = (0..200).map(|i| if i % 2 == 0 { s(i as f64, 0.2, 20.0) } else { s(i as f64, 40.0, 0.5) }).collect();
        assert!(replay(&mut d, &seq).is_empty());
        // Bursts of three bad samples every 10 s could switch, but dwell limits the switches.
        let mut d = Detector::new(Thresholds::default(), Mode::Datacenter);
        let seq: Vec<_> = (0..300).map(|i| if i % 10 < 3 { s(i as f64, 40.0, 0.5) } else { s(i as f64, 0.2, 20.0) }).collect();
        let sw = replay(&mut d, &seq);
        for w in sw.windows(2) {
            assert!(w[1].at - w[0].at >= Duration::from_secs(30), "{sw:?}");
        }
        assert!(sw.len() <= 300 / 30 + 1);
        // Samples inside the dead band vote for neither.
        let mut d = Detector::new(Thresholds::default(), Mode::Datacenter);
        let seq: Vec<_> = (0..50).map(|i| s(i as f64, 5.0, 3.0)).collect();
        assert!(replay(&mut d, &seq).is_empty());
    }

    #[test]
    fn degrading_link_switches_once() {
        let mut d = Detector::new(Thresholds::default(), Mode::Datacenter);
        // RTT climbs from 0.2 ms to 60 ms over a minute while bandwidth falls.
        let seq: Vec<_> = (0..60).map(|i| s(i as f64, 0.2 + i as f64, 25.0 - i as f64 * 0.4)).collect();
        let sw = replay(&mut d, &seq);
        assert_eq!(sw.len(), 1, "{sw:?}");
        assert_eq!(sw[0], Switch { from: Mode::Datacenter, to: Mode::Internet, at: Duration::from_secs(12) });
    }

    #[test]
    fn modes_set_their_defaults() {
        let dc = defaults(Mode::Datacenter, true, 8, Some(Duration::from_micros(50)));
        assert_eq!(dc, TransferDefaults { transport: Transport::Rdma, streams: 16, encrypt: false, adaptive_compression: false, acp: false });
        assert_eq!(defaults(Mode::Datacenter, false, 2, None).transport, Transport::Tcp);
        let wan = defaults(Mode::Internet, true, 2, Some(Duration::from_millis(80)));
        assert_eq!(wan, TransferDefaults { transport: Transport::Tcp, streams: 10, encrypt: true, adaptive_compression: true, acp: true });
    }

    #[test]
    fn one_shot_classification_falls_back_to_rtt_in_the_dead_band() {
        let t = Thresholds::default();
        assert_eq!(t.classify(Duration::from_micros(60), 20e9), Mode::Datacenter);
        assert_eq!(t.classify(Duration::from_micros(60), 3e9), Mode::Datacenter, "dead band, short RTT");
        assert_eq!(t.classify(Duration::from_millis(5), 3e9), Mode::Internet, "dead band, longer RTT");
        assert_eq!(t.classify(Duration::from_micros(60), 0.5e9), Mode::Internet, "thin path");
        assert_eq!(t.classify(Duration::from_millis(40), f64::NAN), Mode::Internet);
    }

    #[test]
    fn live_controller_switches_a_running_transfer_once() {
        // A transfer opens 7 streams on 2 cores at 0.1 ms in datacenter mode (4 active); after
        // 5 s the path turns into a 40 ms, 400 Mbit/s one.
        let opened = streams_to_open(false, 2, Duration::from_micros(100), true);
        assert_eq!(opened, 7);
        // Room for PBA's trials on long paths: 2 x 7 at 50 ms, and at most 32.
        assert_eq!(streams_to_open(false, 2, Duration::from_millis(50), true), 14);
        assert_eq!(streams_to_open(false, 2, Duration::from_millis(150), true), 32);
        // Without trials (a producer-paced stream), either mode's count only.
        assert_eq!(streams_to_open(false, 2, Duration::from_millis(50), false), 7);
        assert_eq!(streams_to_open(false, 2, Duration::from_millis(150), false), 17);
        let mut live = Live::new(Thresholds::default(), Mode::Datacenter, false, 2, opened);
        assert_eq!(live.active_for(Mode::Datacenter, Duration::from_micros(100)), 4);
        let (mut acked, mut decisions) = (0u64, Vec::new());
        for i in 0..40 {
            let at = Duration::from_millis(500 * i);
            let (rate, rtt) = if i < 10 { (3e9, Duration::from_micros(300)) } else { (0.4e9, Duration::from_millis(40)) };
            acked += (rate / 8.0 * 0.5) as u64;
            decisions.extend(live.observe(at, Reading { acked, srtt: rtt, ..Reading::default() }));
        }
        assert_eq!(decisions.len(), 1, "{decisions:?}");
        let d = decisions[0];
        assert_eq!((d.switch.from, d.switch.to), (Mode::Datacenter, Mode::Internet));
        assert_eq!(d.switch.at, Duration::from_millis(500 * 12), "the third internet sample confirms it");
        assert_eq!(d.active, 6, "internet at 40 ms on 2 cores: 2 + 4 streams");
        assert!(d.defaults.encrypt && d.defaults.adaptive_compression);
        // The baseline call and RTT-less intervals decide nothing.
        let mut l = Live::new(Thresholds::default(), Mode::Internet, false, 2, 7);
        assert!(l.observe(Duration::ZERO, Reading { srtt: Duration::from_millis(40), ..Reading::default() }).is_none());
        assert!(l.observe(Duration::from_secs(1), Reading { acked: 1 << 20, ..Reading::default() }).is_none());
    }

    #[test]
    fn a_receiver_stall_is_not_a_thin_path() {
        // A datacenter path (0.1 ms) whose receiver writes to a disk slower than the link: for
        // 3 s the streams mostly wait on its window (a tenth of their time limited by the
        // path) and goodput falls to 0.2 Gbit/s, then they run at 6 Gbit/s again.
        let run = |receiver_window_counts: bool, stall_share: f64| {
            let mut live = Live::new(Thresholds::default(), Mode::Datacenter, false, 2, 7);
            let (mut r, mut decisions) = (Reading::default(), Vec::new());
            for i in 0..20u64 {
                let stalled = (4..10).contains(&i);
                let (rate, share) = if stalled { (0.2e9, stall_share) } else { (6e9, 0.9) };
                r.acked += (rate / 8.0 * 0.5) as u64;
                // In a stall the smoothed RTT climbs (delayed ACKs on a shut window): 12.5 ms
                // was read on loopback in the demo's transfer.
                r.srtt = Duration::from_micros(if stalled { 12_500 } else { 100 });
                if receiver_window_counts {
                    r.watched_us += 4 * 500_000;
                    r.path_limited_us += (share * 4.0 * 500_000.0) as u64;
                }
                decisions.extend(live.observe(Duration::from_millis(500 * i), r));
            }
            decisions
        };
        assert!(run(true, 0.1).is_empty(), "{:?}", run(true, 0.1));
        // Nor is the wait for the receiver's commit once every byte is acknowledged, with or
        // without the streams' time, even when the last RTT read was a long one (a busy host's;
        // the monitor has stopped, so it stays).
        for watched in [false, true] {
            let mut live = Live::new(Thresholds::default(), Mode::Datacenter, false, 2, 7);
            let mut r = Reading { total: 1 << 30, srtt: Duration::from_micros(100), ..Reading::default() };
            for i in 0..10 {
                if i <= 2 {
                    r.acked = r.total / 2 * i;
                    r.watched_us = if watched { 2_000_000 * i } else { 0 };
                    r.path_limited_us = r.watched_us;
                }
                if i == 2 {
                    r.srtt = Duration::from_millis(16);
                }
                assert_eq!(live.observe(Duration::from_millis(500 * i), r), None, "at {i}");
            }
        }
        // Without the streams' time (no TCP_INFO) the stall reads as a thin path, as it did;
        // and so it does when the path held the streams back (a thin stretch of the path).
        for d in [run(false, 0.1), run(true, 0.9)] {
            assert_eq!(d.len(), 1, "{d:?}");
            assert_eq!(d[0].switch.to, Mode::Internet);
        }
    }

    #[test]
    fn cluster_is_hybrid_when_peers_disagree() {
        let mut p = Peers::default();
        p.add("rack-2", Thresholds::default(), Mode::Datacenter);
        p.add("dr-site", Thresholds::default(), Mode::Datacenter);
        assert_eq!(p.cluster(), Some(ClusterMode::Datacenter));
        for i in 0..3 {
            p.observe("dr-site", s(i as f64, 80.0, 0.2));
        }
        assert_eq!(p.cluster(), Some(ClusterMode::Hybrid));
    }
}
