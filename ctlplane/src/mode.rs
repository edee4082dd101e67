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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Short, fat path: RDMA when present, many streams, no encryption.
    Datacenter,
    /// Long or thin path: multi-stream TCP, encryption, adaptive compression.
    Internet,
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

    fn vote(&self, s: &Sample) -> Option<Mode> {
        if s.rtt >= self.t.inet_min_rtt || s.bw_bps <= self.t.inet_max_bw_bps {
            Some(Mode::Internet)
        } else if s.rtt <= self.t.dc_max_rtt && (s.bw_bps.is_nan() || s.bw_bps >= self.t.dc_min_bw_bps) {
            Some(Mode::Datacenter)
        } else {
            None
        }
    }

    /// Feeds a sample; returns the switch it caused, if any.
    pub fn observe(&mut self, s: Sample) -> Option<Switch> {
        match self.vote(&s) {
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
}

/// The defaults a mode sets: datacenter takes RDMA when the host has a device, many streams, no
/// encryption and no compression (the link outruns both); internet takes multi-stream TCP sized
/// by the RTT, encryption, and adaptive compression. In a hybrid cluster each peer gets its own.
pub fn defaults(mode: Mode, rdma_present: bool, cores: usize, rtt: Option<Duration>) -> TransferDefaults {
    match mode {
        Mode::Datacenter => TransferDefaults {
            transport: if rdma_present { Transport::Rdma } else { Transport::Tcp },
            streams: (2 * cores).clamp(4, 32) as u16,
            encrypt: false,
            adaptive_compression: false,
        },
        Mode::Internet => TransferDefaults {
            transport: Transport::Tcp,
            streams: dataplane::session::default_streams(cores, rtt.unwrap_or(Duration::from_millis(50))),
            encrypt: true,
            adaptive_compression: true,
        },
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
        assert_eq!(dc, TransferDefaults { transport: Transport::Rdma, streams: 16, encrypt: false, adaptive_compression: false });
        assert_eq!(defaults(Mode::Datacenter, false, 2, None).transport, Transport::Tcp);
        let wan = defaults(Mode::Internet, true, 2, Some(Duration::from_millis(80)));
        assert_eq!(wan, TransferDefaults { transport: Transport::Tcp, streams: 10, encrypt: true, adaptive_compression: true });
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
