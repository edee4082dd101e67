//! What the daemon's components fill and its endpoints report: the state, the finished
//! sessions, the peers' status and the metrics.

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use prometheus::{GaugeVec, IntCounterVec, Opts, Registry};
use serde::Serialize;

use crate::boot::Record;
use crate::config::Config;
use crate::host::HostCaps;
use crate::mode::Peers;

/// A finished session, as `/status` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct SessionSummary {
    /// Object name.
    pub name: String,
    /// Size.
    pub size: u64,
    /// Bytes received.
    pub received: u64,
    /// Wall seconds.
    pub wall_s: f64,
    /// Verified, or the error.
    pub result: Result<String, String>,
}

/// A peer as `/status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct PeerStatus {
    /// Name.
    pub name: String,
    /// Address.
    pub addr: String,
    /// Current mode.
    pub mode: String,
    /// Last measured RTT (ms), or why it could not be measured.
    pub last_rtt_ms: Result<f64, String>,
    /// Delivery rate of the last probe burst (Gbit/s; a lower bound on long paths).
    pub last_probe_gbps: Option<f64>,
    /// Last goodput of a transfer from this peer (Gbit/s).
    pub last_goodput_gbps: Option<f64>,
    /// What the current mode sets for transfers to this peer.
    pub defaults: crate::mode::TransferDefaults,
    #[serde(skip)]
    pub(crate) ips: Vec<std::net::IpAddr>,
}

/// Metrics, in a registry of their own (Prometheus text format on `/metrics`).
pub struct Metrics {
    /// The registry.
    pub registry: Registry,
    /// Component start durations.
    pub component_seconds: GaugeVec,
    /// 1 for each degraded component.
    pub degraded: GaugeVec,
    /// Sessions by result.
    pub sessions: IntCounterVec,
    /// Bytes received.
    pub bytes: IntCounterVec,
    /// Per-peer RTT.
    pub peer_rtt: GaugeVec,
    /// Per-peer mode (1 for the current one).
    pub peer_mode: GaugeVec,
    /// Per-peer probe delivery rate.
    pub peer_probe_bw: GaugeVec,
    /// Per transfer the daemon runs: bytes the receiver acknowledged so far (as they move).
    pub transfer_acked: GaugeVec,
    /// Per transfer: its size (0 while unknown).
    pub transfer_total: GaugeVec,
    /// Transfers remembered, by state.
    pub transfers: GaugeVec,
    /// The fleet's Raft term, leader id, whether this node leads, entries not yet applied,
    /// each member's replication lag (on the leader), and VMs owned.
    pub fleet_term: GaugeVec,
    /// See [`Metrics::fleet_term`].
    pub fleet_leader: GaugeVec,
    /// See [`Metrics::fleet_term`].
    pub fleet_is_leader: GaugeVec,
    /// See [`Metrics::fleet_term`].
    pub fleet_apply_lag: GaugeVec,
    /// See [`Metrics::fleet_term`].
    pub fleet_replication_lag: GaugeVec,
    /// See [`Metrics::fleet_term`].
    pub fleet_vms: GaugeVec,
    /// Gossip members by state (this node counted alive), the stalest card's age, packets dropped.
    pub gossip_members: GaugeVec,
    /// See [`Metrics::gossip_members`].
    pub gossip_stalest: GaugeVec,
    /// See [`Metrics::gossip_members`].
    pub gossip_dropped: GaugeVec,
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let registry = Registry::new();
        let g = |n: &str, h: &str, l: &[&str]| {
            let v = GaugeVec::new(Opts::new(n, h), l).expect("metric");
            registry.register(Box::new(v.clone())).expect("register");
            v
        };
        let c = |n: &str, h: &str, l: &[&str]| {
            let v = IntCounterVec::new(Opts::new(n, h), l).expect("metric");
            registry.register(Box::new(v.clone())).expect("register");
            v
        };
        Self {
            component_seconds: g("dwcp_boot_component_seconds", "Time each boot component took to start", &["component", "phase", "outcome"]),
            degraded: g("dwcp_degraded", "1 for each component running degraded", &["component"]),
            sessions: c("dwcp_sessions_total", "Receive sessions by result", &["result"]),
            bytes: c("dwcp_received_bytes_total", "Bytes received and placed", &[]),
            peer_rtt: g("dwcp_peer_rtt_seconds", "Last measured RTT to each peer", &["peer"]),
            peer_mode: g("dwcp_peer_mode", "1 for each peer's current mode", &["peer", "mode"]),
            peer_probe_bw: g("dwcp_peer_probe_bits_per_second", "Delivery rate of the last probe burst to each peer", &["peer"]),
            transfer_acked: g("dwcp_transfer_acked_bytes", "Bytes of each transfer the daemon runs that the receiver acknowledged so far", &["id", "name", "to", "state"]),
            transfer_total: g("dwcp_transfer_total_bytes", "Size of each transfer the daemon runs (0 while unknown)", &["id", "name", "to", "state"]),
            transfers: g("dwcp_transfers", "Transfers the daemon remembers, by state", &["state"]),
            fleet_term: g("dwcp_fleet_term", "The fleet's current Raft term", &[]),
            fleet_leader: g("dwcp_fleet_leader", "The fleet leader's node id (0: none known)", &[]),
            fleet_is_leader: g("dwcp_fleet_is_leader", "1 when this node leads the fleet", &[]),
            fleet_apply_lag: g("dwcp_fleet_apply_lag_entries", "Entries in this node's Raft log not yet applied", &[]),
            fleet_replication_lag: g("dwcp_fleet_replication_lag_entries", "On the leader: how many entries each member's log is behind (-1: unknown)", &["node"]),
            fleet_vms: g("dwcp_fleet_vms", "VMs with an owner in the fleet's state", &[]),
            gossip_members: g("dwcp_gossip_members", "Gossip members this node knows, by state (itself counted alive)", &["state"]),
            gossip_stalest: g("dwcp_gossip_stalest_card_seconds", "Seconds since the stalest card this node holds was refreshed", &[]),
            gossip_dropped: g("dwcp_gossip_dropped_packets", "Gossip packets dropped: failed authentication, too old, or malformed", &[]),
            registry,
        }
    }
}

impl Metrics {
    /// Sets the fleet's gauges from `s`.
    pub fn export_fleet(&self, s: &crate::fleet::Status) {
        self.fleet_term.with_label_values::<&str>(&[]).set(s.term as f64);
        self.fleet_leader.with_label_values::<&str>(&[]).set(s.leader.unwrap_or(0) as f64);
        self.fleet_is_leader.with_label_values::<&str>(&[]).set(f64::from(u8::from(s.leader == Some(s.id))));
        self.fleet_apply_lag.with_label_values::<&str>(&[]).set(s.apply_lag as f64);
        self.fleet_replication_lag.reset();
        for (n, l) in &s.replication_lag {
            self.fleet_replication_lag.with_label_values(&[&n.to_string()]).set(l.map_or(-1.0, |l| l as f64));
        }
        self.fleet_vms.with_label_values::<&str>(&[]).set(s.vms as f64);
    }
}

impl Metrics {
    /// Sets the gossip gauges from `v`.
    pub fn export_gossip(&self, v: &crate::gossip::View) {
        for st in ["alive", "suspect", "down"] {
            let n = v.members.iter().filter(|m| m.state == st).count() + usize::from(st == "alive");
            self.gossip_members.with_label_values(&[st]).set(n as f64);
        }
        self.gossip_stalest.with_label_values::<&str>(&[]).set(v.stalest_s);
        self.gossip_dropped.with_label_values::<&str>(&[]).set(v.dropped as f64);
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// Everything the API reports.
#[derive(Debug)]
pub struct State {
    /// Configuration in force.
    pub config: Config,
    /// Host capabilities.
    pub host: OnceLock<HostCaps>,
    /// Transfer listener address.
    pub listener: OnceLock<SocketAddr>,
    /// API address.
    pub api: OnceLock<SocketAddr>,
    /// Ready to serve.
    pub ready: AtomicBool,
    /// Boot records.
    pub boot: Mutex<Vec<Record>>,
    /// Boot-to-ready time.
    pub boot_ms: Mutex<f64>,
    /// Finished sessions (latest 100).
    pub sessions: Mutex<Vec<SessionSummary>>,
    /// Mode detectors.
    pub peers: Mutex<Peers>,
    /// Peer status.
    pub peer_status: Mutex<Vec<PeerStatus>>,
    /// Metrics.
    pub metrics: Metrics,
    /// Transfers it runs (with `api.socket`).
    pub jobs: OnceLock<Arc<crate::jobs::Jobs>>,
    /// The configured peers' warm streams (with `api.socket`, peers and `transfer.warm_streams`).
    pub warm: OnceLock<Option<Arc<crate::warm::Pool>>>,
    /// The site's Raft group (with `[fleet]`).
    pub fleet: OnceLock<Arc<crate::fleet::Fleet>>,
    /// The fleet's gossip (with `[gossip]`).
    pub gossip: OnceLock<Arc<crate::gossip::Handle>>,
    pub(crate) fleet_jobs_stop: Arc<AtomicBool>,
    pub(crate) stop: AtomicBool,
    pub(crate) epoch: Instant,
}

impl State {
    /// Components running degraded, with why.
    pub fn degraded(&self) -> Vec<(String, String)> {
        self.boot
            .lock()
            .expect("boot lock")
            .iter()
            .filter_map(|r| match &r.outcome {
                crate::boot::Outcome::Degraded(w) => Some((r.name.clone(), w.clone())),
                _ => None,
            })
            .collect()
    }
}
