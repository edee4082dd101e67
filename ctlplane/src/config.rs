//! Configuration: a TOML file, then `DWCP_*` environment variables, then flags, each overriding
//! the one before; validated at load. A bad file names the key, the line, and what was expected.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::mode::Thresholds;

/// A configuration problem, in the operator's terms.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// Path.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The file is not valid TOML of the expected shape.
    #[error("{path}:{line}: {message}")]
    Parse {
        /// Path.
        path: String,
        /// 1-based line.
        line: usize,
        /// What was wrong and what was expected.
        message: String,
    },
    /// A value that parses but cannot be used.
    #[error("{origin}: `{key}` {problem}")]
    Invalid {
        /// Where it came from (file:line, environment variable, flag).
        origin: String,
        /// The key.
        key: String,
        /// What is wrong, and what is expected.
        problem: String,
    },
}

/// `[node]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Node {
    /// Name of this node, reported on /status.
    #[serde(default = "default_name")]
    pub name: String,
    /// Transfer listener.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Directory where received objects land.
    #[serde(default = "default_out")]
    pub out: PathBuf,
    /// Pre-shared key file.
    pub key_file: Option<PathBuf>,
    /// Accept plaintext senders.
    #[serde(default)]
    pub allow_plaintext: bool,
}

/// `[api]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Api {
    /// HTTP endpoint for /healthz, /readyz, /metrics, /status.
    #[serde(default = "default_api")]
    pub listen: String,
    /// Unix socket for transfers the daemon runs (`POST /transfers`), created mode 0600 (who
    /// may open it may make this host send). Unset: the daemon runs no transfers.
    #[serde(default)]
    pub socket: Option<PathBuf>,
    /// Where the daemon records each transfer in flight (mode 0700), so that a daemon restarted
    /// mid-transfer takes it up again: a resumable one resumes, the others end failed with the
    /// reason (default: `jobs` beside the socket; under systemd, somewhere that outlives the
    /// runtime directory, such as `/var/lib/dwcp/jobs`).
    #[serde(default)]
    pub jobs_dir: Option<PathBuf>,
}

impl Api {
    /// The directory of job records (see [`Api::jobs_dir`]); `None` without a jobs socket.
    pub fn jobs_dir(&self) -> Option<PathBuf> {
        let sock = self.socket.as_ref()?;
        Some(self.jobs_dir.clone().unwrap_or_else(|| sock.parent().unwrap_or(std::path::Path::new(".")).join("jobs")))
    }
}

/// `[mode]` thresholds.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModeCfg {
    /// Datacenter at or below this RTT (ms)...
    #[serde(default = "d_dc_rtt")]
    pub dc_max_rtt_ms: f64,
    /// ...and at or above this bandwidth (Gbit/s).
    #[serde(default = "d_dc_bw")]
    pub dc_min_bw_gbps: f64,
    /// Internet at or above this RTT (ms)...
    #[serde(default = "d_in_rtt")]
    pub inet_min_rtt_ms: f64,
    /// ...or at or below this bandwidth (Gbit/s).
    #[serde(default = "d_in_bw")]
    pub inet_max_bw_gbps: f64,
    /// Consecutive samples to confirm a switch.
    #[serde(default = "d_confirm")]
    pub confirm: u32,
    /// Least seconds between switches.
    #[serde(default = "d_dwell")]
    pub min_dwell_s: f64,
    /// Seconds between probes of each peer.
    #[serde(default = "d_probe")]
    pub probe_interval_s: f64,
}

/// `[log]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Log {
    /// Filter in `RUST_LOG` syntax (e.g. `info` or `warn,dataplane=debug`).
    #[serde(default = "d_log_level")]
    pub level: String,
    /// `text` for a person, `json` for a log collector (one object per line).
    #[serde(default = "d_log_format")]
    pub format: String,
}

/// `[transfer]`: this host's defaults for every send (`dwcp send --config`, the daemon's jobs),
/// under what the caller sets itself; unset, the plan decides. `dwcp tune` writes this section
/// from measurements.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TransferDefaults {
    /// Streams the daemon keeps parked to each configured peer for its jobs (`crate::warm`;
    /// default: as many as a cold send would open on the path measured; 0: none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warm_streams: Option<u16>,
    /// Streams.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub streams: Option<u16>,
    /// Chunk size, bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chunk_size: Option<u32>,
    /// Unacknowledged chunks per stream.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window: Option<usize>,
    /// Zero-copy sends: `auto`, `on` or `off`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zerocopy: Option<crate::engine::plan::Choice>,
    /// ACP: `auto`, `off`, `delay` or `bbr-model`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acp: Option<crate::engine::plan::AcpChoice>,
    /// Compression effort of HDE and page-aware mode: `"auto"`, `"off"` or a zstd level.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compress: Option<crate::engine::plan::Effort>,
    /// Cores for the shard threads.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cores: Option<Vec<usize>>,
    /// RDMA queue pairs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rdma_qps: Option<u16>,
    /// RDMA completions: `busy` polling or `event`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rdma_poll: Option<String>,
}

impl TransferDefaults {
    /// Every value in its range: the key (within `[transfer]`) and what is wrong otherwise. The
    /// config's validation and `dwcp tune`'s knobs both check with this.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        for (key, v, lo, hi) in [
            ("streams", self.streams.map(u64::from), 1, 256),
            ("chunk_size", self.chunk_size.map(u64::from), 4096, 64 << 20),
            ("window", self.window.map(|w| w as u64), 1, 4096),
            ("rdma_qps", self.rdma_qps.map(u64::from), 1, 64),
        ] {
            if let Some(v) = v.filter(|v| !(lo..=hi).contains(v)) {
                return Err((key, format!("is {v}; expected {lo} to {hi}")));
            }
        }
        if let Some(p) = self.rdma_poll.as_deref().filter(|p| !matches!(*p, "busy" | "event")) {
            return Err(("rdma_poll", format!("is {p:?}; expected \"busy\" or \"event\"")));
        }
        if self.cores.as_ref().is_some_and(Vec::is_empty) {
            return Err(("cores", "is empty; expected a list of core numbers, or leave it out".into()));
        }
        Ok(())
    }
}

/// `[[peers]]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    /// Name.
    pub name: String,
    /// Address of its transfer listener.
    pub addr: String,
}

/// `[fleet]`: this daemon as a member of its site's Raft group (ASS). Absent: no fleet.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FleetCfg {
    /// This node's id in the group: unique, from 1, never reused for another host.
    pub id: u64,
    /// Where it listens for the other members (Noise-authenticated with `node.key_file`).
    #[serde(default = "d_fleet_listen")]
    pub listen: String,
    /// Where its Raft log and snapshots are kept (default: `fleet` beside `api.socket`; under
    /// systemd, somewhere that outlives the runtime directory, such as `/var/lib/dwcp/fleet`).
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// The group's first members, the same list on each (`{ id = 1, addr = "10.0.0.1:7472" }`);
    /// empty on a node that joins a running group with `dwcp fleet add`.
    #[serde(default)]
    pub members: Vec<crate::fleet::Member>,
    /// Raft heartbeat (ms); a leader is presumed gone after 5 to 10 of them. Raise it on long
    /// paths: a few round trips at least.
    #[serde(default = "d_fleet_hb")]
    pub heartbeat_ms: u64,
    /// How long a change (a VM handoff, a job record) may wait for a quorum (s).
    #[serde(default = "d_fleet_commit")]
    pub commit_timeout_s: f64,
    /// How long a member's log may stop following the leader's before it is presumed gone and
    /// its jobs are taken over by another member (s).
    #[serde(default = "d_fleet_takeover")]
    pub takeover_after_s: f64,
}

impl FleetCfg {
    /// The directory of the Raft store (see [`FleetCfg::dir`]), or why there is none.
    pub fn dir(&self, api: &Api) -> Result<PathBuf, String> {
        match (&self.dir, &api.socket) {
            (Some(d), _) => Ok(d.clone()),
            (None, Some(sock)) => Ok(sock.parent().unwrap_or(Path::new(".")).join("fleet")),
            (None, None) => Err("set fleet.dir (or api.socket, beside which it defaults)".into()),
        }
    }

    /// How the fleet node runs.
    pub fn options(&self, api: &Api) -> Result<crate::fleet::Options, String> {
        Ok(crate::fleet::Options {
            id: self.id,
            listen: self.listen.clone(),
            dir: self.dir(api)?,
            members: self.members.clone(),
            heartbeat: Duration::from_millis(self.heartbeat_ms),
            commit_timeout: Duration::from_secs_f64(self.commit_timeout_s),
            snapshot_every: 1000,
        })
    }
}

/// `[gossip]`: this daemon as a member of the fleet's SWIM gossip (between sites, over the
/// internet). Absent: no gossip.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GossipCfg {
    /// This node's id (default: `fleet.id`; one of the two must be set).
    #[serde(default)]
    pub node: Option<u64>,
    /// Where it listens (UDP; packets sealed with a key derived from `node.key_file`).
    #[serde(default = "d_gossip_listen")]
    pub listen: String,
    /// Members to join through (`HOST:PORT`), the same few on every node.
    #[serde(default)]
    pub seeds: Vec<String>,
    /// This node's site, on its card.
    #[serde(default)]
    pub site: String,
    /// Probe period (ms): foca's WAN profile (memberlist's) is 5000; a dead node is declared
    /// down after a few periods.
    #[serde(default = "d_gossip_period")]
    pub period_ms: u64,
    /// About how many nodes the fleet has (sets how often updates are repeated).
    #[serde(default = "d_gossip_size")]
    pub size: u32,
}

fn d_gossip_listen() -> String {
    "0.0.0.0:7473".into()
}
fn d_gossip_period() -> u64 {
    5000
}
fn d_gossip_size() -> u32 {
    16
}

fn d_fleet_listen() -> String {
    "0.0.0.0:7472".into()
}
fn d_fleet_hb() -> u64 {
    200
}
fn d_fleet_commit() -> f64 {
    5.0
}
fn d_fleet_takeover() -> f64 {
    30.0
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This node.
    #[serde(default = "default_node")]
    pub node: Node,
    /// The HTTP endpoint.
    #[serde(default = "default_api_table")]
    pub api: Api,
    /// Mode thresholds.
    #[serde(default = "default_mode")]
    pub mode: ModeCfg,
    /// Logging.
    #[serde(default = "default_log")]
    pub log: Log,
    /// Peers to measure.
    #[serde(default)]
    pub peers: Vec<Peer>,
    /// Defaults for every send.
    #[serde(default)]
    pub transfer: TransferDefaults,
    /// Membership of the site's Raft group.
    #[serde(default)]
    pub fleet: Option<FleetCfg>,
    /// Membership of the fleet's gossip.
    #[serde(default)]
    pub gossip: Option<GossipCfg>,
}

fn default_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_owned()).unwrap_or_else(|_| "dwcp".into())
}
fn default_listen() -> String {
    "0.0.0.0:7470".into()
}
fn default_out() -> PathBuf {
    "/var/lib/dwcp/incoming".into()
}
fn default_api() -> String {
    "127.0.0.1:7471".into()
}
fn d_dc_rtt() -> f64 {
    2.0
}
fn d_dc_bw() -> f64 {
    5.0
}
fn d_in_rtt() -> f64 {
    10.0
}
fn d_in_bw() -> f64 {
    1.0
}
fn d_confirm() -> u32 {
    3
}
fn d_dwell() -> f64 {
    30.0
}
fn d_probe() -> f64 {
    5.0
}
fn d_log_level() -> String {
    "info".into()
}
fn d_log_format() -> String {
    "text".into()
}
fn default_log() -> Log {
    Log { level: d_log_level(), format: d_log_format() }
}
fn default_node() -> Node {
    Node { name: default_name(), listen: default_listen(), out: default_out(), key_file: None, allow_plaintext: false }
}
fn default_api_table() -> Api {
    Api { listen: default_api(), socket: None, jobs_dir: None }
}
fn default_mode() -> ModeCfg {
    ModeCfg {
        dc_max_rtt_ms: d_dc_rtt(),
        dc_min_bw_gbps: d_dc_bw(),
        inet_min_rtt_ms: d_in_rtt(),
        inet_max_bw_gbps: d_in_bw(),
        confirm: d_confirm(),
        min_dwell_s: d_dwell(),
        probe_interval_s: d_probe(),
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            node: default_node(),
            api: default_api_table(),
            mode: default_mode(),
            log: default_log(),
            peers: Vec::new(),
            transfer: TransferDefaults::default(),
            fleet: None,
            gossip: None,
        }
    }
}

fn line_of(src: &str, offset: usize) -> usize {
    src[..offset.min(src.len())].matches('\n').count() + 1
}

/// Where each overridable key can come from, for error messages.
const ENV_KEYS: &[(&str, &str)] = &[
    ("DWCP_NODE_NAME", "node.name"),
    ("DWCP_NODE_LISTEN", "node.listen"),
    ("DWCP_NODE_OUT", "node.out"),
    ("DWCP_KEY_FILE", "node.key_file"),
    ("DWCP_API_LISTEN", "api.listen"),
    ("DWCP_LOG_LEVEL", "log.level"),
    ("DWCP_LOG_FORMAT", "log.format"),
];

impl Config {
    /// Parses TOML text (`path` only names it in errors).
    pub fn parse(src: &str, path: &str) -> Result<Self, ConfigError> {
        let cfg: Config = toml::from_str(src).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            line: e.span().map_or(1, |s| line_of(src, s.start)),
            message: e.message().trim().to_owned(),
        })?;
        cfg.validate(&|key| {
            // The line of the key's first appearance, for the message.
            let leaf = key.rsplit('.').next().unwrap_or(key);
            let line = src.lines().position(|l| l.trim_start().starts_with(leaf)).map_or(0, |i| i + 1);
            if line > 0 { format!("{path}:{line}") } else { path.to_owned() }
        })?;
        Ok(cfg)
    }

    /// Loads a file (or the defaults when `path` is None), then applies `env` (name, value pairs,
    /// normally `std::env::vars()`) and `flags` (key, value pairs), in that order.
    pub fn load(path: Option<&Path>, env: impl IntoIterator<Item = (String, String)>, flags: &[(&str, String)]) -> Result<Self, ConfigError> {
        let mut cfg = match path {
            Some(p) => {
                let src = std::fs::read_to_string(p).map_err(|source| ConfigError::Read { path: p.display().to_string(), source })?;
                Self::parse(&src, &p.display().to_string())?
            }
            None => Self::default(),
        };
        for (k, v) in env {
            if let Some((_, key)) = ENV_KEYS.iter().find(|(e, _)| *e == k) {
                cfg.set(key, &v);
                cfg.validate(&|_| format!("environment variable {k}"))?;
            }
        }
        for (key, v) in flags {
            cfg.set(key, v);
            cfg.validate(&|_| format!("flag for {key}"))?;
        }
        Ok(cfg)
    }

    fn set(&mut self, key: &str, v: &str) {
        match key {
            "node.name" => self.node.name = v.into(),
            "node.listen" => self.node.listen = v.into(),
            "node.out" => self.node.out = v.into(),
            "node.key_file" => self.node.key_file = Some(v.into()),
            "api.listen" => self.api.listen = v.into(),
            "log.level" => self.log.level = v.into(),
            "log.format" => self.log.format = v.into(),
            _ => {}
        }
    }

    fn validate(&self, origin: &dyn Fn(&str) -> String) -> Result<(), ConfigError> {
        let bad = |key: &str, problem: String| Err(ConfigError::Invalid { origin: origin(key), key: key.into(), problem });
        for (key, v) in [("node.listen", &self.node.listen), ("api.listen", &self.api.listen)] {
            if v.parse::<SocketAddr>().is_err() {
                return bad(key, format!("is {v:?}; expected an address like 0.0.0.0:7470"));
            }
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return bad("log.format", format!("is {:?}; expected \"text\" or \"json\"", self.log.format));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return bad("log.level", format!("is {:?} ({e}); expected a filter like \"info\" or \"warn,dataplane=debug\"", self.log.level));
        }
        for (i, p) in self.peers.iter().enumerate() {
            if p.addr.rsplit_once(':').and_then(|(_, port)| port.parse::<u16>().ok()).is_none() {
                return bad(&format!("peers[{i}].addr"), format!("is {:?}; expected HOST:PORT", p.addr));
            }
        }
        if let Some(f) = &self.fleet {
            if f.id == 0 {
                return bad("fleet.id", "is 0; expected a number from 1, unique in the group".into());
            }
            if f.listen.parse::<SocketAddr>().is_err() {
                return bad("fleet.listen", format!("is {:?}; expected an address like 0.0.0.0:7472", f.listen));
            }
            let mut ids = std::collections::BTreeSet::new();
            for (i, m) in f.members.iter().enumerate() {
                if m.addr.rsplit_once(':').and_then(|(_, port)| port.parse::<u16>().ok()).is_none() {
                    return bad(&format!("fleet.members[{i}].addr"), format!("is {:?}; expected HOST:PORT", m.addr));
                }
                if m.id == 0 || !ids.insert(m.id) {
                    return bad(&format!("fleet.members[{i}].id"), format!("is {}; expected a number from 1 that no other member has", m.id));
                }
            }
            if !f.members.is_empty() && !ids.contains(&f.id) {
                return bad("fleet.members", format!("does not list this node (fleet.id {}); list it, or leave members empty on a node to be added with `dwcp fleet add`", f.id));
            }
            if !(10..=60_000).contains(&f.heartbeat_ms) {
                return bad("fleet.heartbeat_ms", format!("is {}; expected 10 to 60000", f.heartbeat_ms));
            }
            if !(f.commit_timeout_s.is_finite() && (0.1..=600.0).contains(&f.commit_timeout_s)) {
                return bad("fleet.commit_timeout_s", format!("is {}; expected seconds from 0.1 to 600", f.commit_timeout_s));
            }
            if let Err(w) = f.dir(&self.api) {
                return bad("fleet.dir", w);
            }
            if !(f.takeover_after_s.is_finite() && (0.5..=86_400.0).contains(&f.takeover_after_s)) {
                return bad("fleet.takeover_after_s", format!("is {}; expected seconds from 0.5 to 86400", f.takeover_after_s));
            }
        }
        if let Some(g) = &self.gossip {
            if g.node.or(self.fleet.as_ref().map(|f| f.id)).is_none_or(|n| n == 0) {
                return bad("gossip.node", "is unset and there is no fleet.id; expected a number from 1, unique in the fleet".into());
            }
            if g.listen.parse::<SocketAddr>().is_err() {
                return bad("gossip.listen", format!("is {:?}; expected an address like 0.0.0.0:7473", g.listen));
            }
            for (i, sd) in g.seeds.iter().enumerate() {
                if sd.rsplit_once(':').and_then(|(_, port)| port.parse::<u16>().ok()).is_none() {
                    return bad(&format!("gossip.seeds[{i}]"), format!("is {sd:?}; expected HOST:PORT"));
                }
            }
            if g.site.len() > crate::gossip::MAX_NAME || self.node.name.len() > crate::gossip::MAX_NAME {
                return bad("gossip.site", format!("gossip.site and node.name must be at most {} bytes", crate::gossip::MAX_NAME));
            }
            if !(100..=600_000).contains(&g.period_ms) {
                return bad("gossip.period_ms", format!("is {}; expected 100 to 600000", g.period_ms));
            }
            if !(2..=100_000).contains(&g.size) {
                return bad("gossip.size", format!("is {}; expected 2 to 100000", g.size));
            }
        }
        if let Err((key, problem)) = self.transfer.check() {
            return bad(&format!("transfer.{key}"), problem);
        }
        let m = &self.mode;
        // Every duration and rate must be a finite number in a sane range before it is turned
        // into a `Duration` (which panics on infinity, NaN or a negative value).
        for (key, v, lo, hi, unit) in [
            ("mode.dc_max_rtt_ms", m.dc_max_rtt_ms, 0.0, 3.6e6, "milliseconds"),
            ("mode.inet_min_rtt_ms", m.inet_min_rtt_ms, 0.0, 3.6e6, "milliseconds"),
            ("mode.min_dwell_s", m.min_dwell_s, 0.0, 86_400.0, "seconds"),
            ("mode.probe_interval_s", m.probe_interval_s, 0.0, 86_400.0, "seconds"),
            ("mode.dc_min_bw_gbps", m.dc_min_bw_gbps, 0.0, 1e6, "Gbit/s"),
            ("mode.inet_max_bw_gbps", m.inet_max_bw_gbps, 0.0, 1e6, "Gbit/s"),
        ] {
            if !(v.is_finite() && (lo..=hi).contains(&v)) {
                return bad(key, format!("is {v}; expected {unit} from {lo} to {hi}"));
            }
        }
        if !(m.dc_max_rtt_ms > 0.0 && m.dc_max_rtt_ms < m.inet_min_rtt_ms) {
            return bad("mode.dc_max_rtt_ms", format!("is {}; expected a positive value below mode.inet_min_rtt_ms ({})", m.dc_max_rtt_ms, m.inet_min_rtt_ms));
        }
        if !(m.inet_max_bw_gbps > 0.0 && m.inet_max_bw_gbps < m.dc_min_bw_gbps) {
            return bad("mode.inet_max_bw_gbps", format!("is {}; expected a positive value below mode.dc_min_bw_gbps ({})", m.inet_max_bw_gbps, m.dc_min_bw_gbps));
        }
        if m.confirm == 0 {
            return bad("mode.confirm", "is 0; expected at least 1 sample".into());
        }
        if m.probe_interval_s.is_nan() || m.probe_interval_s <= 0.0 {
            return bad("mode.probe_interval_s", format!("is {}; expected seconds above 0", m.probe_interval_s));
        }
        Ok(())
    }

    /// The mode thresholds as the detector takes them.
    pub fn thresholds(&self) -> Thresholds {
        let m = &self.mode;
        Thresholds {
            dc_max_rtt: Duration::from_secs_f64(m.dc_max_rtt_ms / 1e3),
            dc_min_bw_bps: m.dc_min_bw_gbps * 1e9,
            inet_min_rtt: Duration::from_secs_f64(m.inet_min_rtt_ms / 1e3),
            inet_max_bw_bps: m.inet_max_bw_gbps * 1e9,
            confirm: m.confirm,
            min_dwell: Duration::from_secs_f64(m.min_dwell_s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[node]
name = "rack1-a"
listen = "0.0.0.0:7470"
out = "/srv/images"

[mode]
dc_max_rtt_ms = 1.5

[[peers]]
name = "dr-site"
addr = "dr.example.net:7470"
"#;

    #[test]
    fn good_file_with_defaults() {
        let c = Config::parse(GOOD, "dwcp.toml").unwrap();
        assert_eq!(c.node.name, "rack1-a");
        assert_eq!(c.mode.inet_min_rtt_ms, 10.0);
        assert_eq!(c.peers.len(), 1);
        assert_eq!(c.api.listen, "127.0.0.1:7471");
    }

    #[test]
    fn errors_name_key_line_and_expectation() {
        let e = Config::parse("[node]\nname = \"a\"\nlistn = \"0.0.0.0:1\"\n", "x.toml").unwrap_err().to_string();
        assert!(e.starts_with("x.toml:3:") && e.contains("listn") && e.contains("expected"), "{e}");
        let e = Config::parse("[node]\nlisten = 7470\n", "x.toml").unwrap_err().to_string();
        assert!(e.starts_with("x.toml:2:") && e.contains("string"), "{e}");
        let e = Config::parse("[node]\n\nlisten = \"nowhere\"\n", "x.toml").unwrap_err().to_string();
        assert_eq!(e, "x.toml:3: `node.listen` is \"nowhere\"; expected an address like 0.0.0.0:7470");
        let e = Config::parse("[mode]\ndc_max_rtt_ms = 50\n", "x.toml").unwrap_err().to_string();
        assert!(e.contains("mode.dc_max_rtt_ms") && e.contains("below mode.inet_min_rtt_ms"), "{e}");
        let e = Config::parse("[[peers]]\nname = \"p\"\naddr = \"nohost\"\n", "x.toml").unwrap_err().to_string();
        assert!(e.contains("peers[0].addr") && e.contains("HOST:PORT"), "{e}");
        let e = Config::parse("[log]\n\nformat = \"xml\"\n", "x.toml").unwrap_err().to_string();
        assert_eq!(e, "x.toml:3: `log.format` is \"xml\"; expected \"text\" or \"json\"");
        let e = Config::parse("[log]\nlevel = \"info,[=\"\n", "x.toml").unwrap_err().to_string();
        assert!(e.starts_with("x.toml:2: `log.level`") && e.contains("expected a filter"), "{e}");
    }

    #[test]
    fn a_fleet_section_is_checked_before_a_node_joins_anything() {
        let ok = "[api]\nsocket = \"/run/dwcp/api.sock\"\n[fleet]\nid = 2\nmembers = [{ id = 1, addr = \"10.0.0.1:7472\" }, { id = 2, addr = \"10.0.0.2:7472\" }]\n";
        let c = Config::parse(ok, "x.toml").unwrap();
        let o = c.fleet.as_ref().unwrap().options(&c.api).unwrap();
        assert_eq!((o.id, o.dir.clone(), o.heartbeat, o.members.len()), (2, PathBuf::from("/run/dwcp/fleet"), Duration::from_millis(200), 2));
        for (bad, key, says) in [
            ("[fleet]\nid = 0\ndir = \"/x\"\n", "fleet.id", "from 1"),
            ("[fleet]\nid = 3\ndir = \"/x\"\nmembers = [{ id = 1, addr = \"a:1\" }]\n", "fleet.members", "does not list this node"),
            ("[fleet]\nid = 1\ndir = \"/x\"\nmembers = [{ id = 1, addr = \"a:1\" }, { id = 1, addr = \"b:1\" }]\n", "fleet.members[1].id", "no other member"),
            ("[fleet]\nid = 1\ndir = \"/x\"\nmembers = [{ id = 1, addr = \"nohost\" }]\n", "fleet.members[0].addr", "HOST:PORT"),
            ("[fleet]\nid = 1\n", "fleet.dir", "api.socket"),
            ("[fleet]\nid = 1\ndir = \"/x\"\nheartbeat_ms = 1\n", "fleet.heartbeat_ms", "10 to 60000"),
            ("[fleet]\nid = 1\ndir = \"/x\"\ncommit_timeout_s = nan\n", "fleet.commit_timeout_s", "0.1 to 600"),
        ] {
            let e = Config::parse(bad, "x.toml").unwrap_err().to_string();
            assert!(e.contains(&format!("`{key}`")) && e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn a_gossip_section_is_checked() {
        let c = Config::parse("[gossip]\nnode = 4\nseeds = [\"eu.example.net:7473\"]\nsite = \"eu1\"\n", "x.toml").unwrap();
        assert_eq!(c.gossip.as_ref().unwrap().period_ms, 5000);
        for (bad, key, says) in [
            ("[gossip]\nsite = \"a\"\n", "gossip.node", "fleet.id"),
            ("[gossip]\nnode = 1\nseeds = [\"nohost\"]\n", "gossip.seeds[0]", "HOST:PORT"),
            ("[gossip]\nnode = 1\nlisten = \"x\"\n", "gossip.listen", "0.0.0.0:7473"),
            ("[gossip]\nnode = 1\nperiod_ms = 5\n", "gossip.period_ms", "100 to 600000"),
        ] {
            let e = Config::parse(bad, "x.toml").unwrap_err().to_string();
            assert!(e.contains(&format!("`{key}`")) && e.contains(says), "{bad}: {e}");
        }
        // The fleet's id serves as the gossip node when it has none of its own.
        let c = Config::parse("[fleet]\nid = 3\ndir = \"/x\"\n[gossip]\n", "x.toml").unwrap();
        assert!(c.gossip.is_some());
    }

    #[test]
    fn precedence_file_then_env_then_flags() {
        let dir = std::env::temp_dir().join(format!("dwcp-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("c.toml");
        std::fs::write(&f, GOOD).unwrap();
        let env = vec![("DWCP_NODE_LISTEN".to_string(), "0.0.0.0:9000".to_string()), ("DWCP_API_LISTEN".into(), "127.0.0.1:9001".into())];
        let c = Config::load(Some(&f), env.clone(), &[("api.listen", "127.0.0.1:9100".into())]).unwrap();
        assert_eq!(c.node.name, "rack1-a", "file");
        assert_eq!(c.node.listen, "0.0.0.0:9000", "env over file");
        assert_eq!(c.api.listen, "127.0.0.1:9100", "flag over env");
        let e = Config::load(Some(&f), vec![("DWCP_NODE_LISTEN".to_string(), "bad".to_string())], &[]).unwrap_err().to_string();
        assert!(e.starts_with("environment variable DWCP_NODE_LISTEN:"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn infinite_nan_and_negative_durations_are_named_not_panicked_on() {
        for (key, v) in [("probe_interval_s", "inf"), ("min_dwell_s", "-1.0"), ("min_dwell_s", "nan"), ("inet_min_rtt_ms", "inf"), ("dc_min_bw_gbps", "inf")] {
            let e = Config::parse(&format!("[mode]\n{key} = {v}\n"), "test.toml").map(|c| c.thresholds()).expect_err(&format!("{key} = {v}"));
            assert!(e.to_string().contains(&format!("mode.{key}")), "{e}");
        }
    }

    #[test]
    fn transfer_defaults_fill_only_what_the_caller_left_unset() {
        let c = Config::parse("[transfer]\nstreams = 4\nchunk_size = 262144\nzerocopy = \"off\"\nacp = \"delay\"\ncompress = \"3\"\n", "t.toml").unwrap();
        let mut mine = crate::engine::Request { streams: Some(2), ..Default::default() };
        mine.apply_defaults(&c.transfer);
        assert_eq!(mine.streams, Some(2), "the caller's own choice stays");
        assert_eq!(mine.chunk_size, Some(256 << 10));
        assert_eq!(mine.zerocopy, crate::engine::plan::Choice::Off);
        assert_eq!(mine.acp, crate::engine::plan::AcpChoice::Delay);
        assert_eq!(mine.compress, crate::engine::plan::Effort::Level(3));
        // What `dwcp tune` writes reads back the same.
        let back = Config::parse(&format!("[transfer]\n{}", toml::to_string(&c.transfer).unwrap()), "t.toml").unwrap();
        assert_eq!(back.transfer, c.transfer);
    }

    #[test]
    fn transfer_defaults_out_of_range_are_named() {
        for (line, key) in [("streams = 0", "transfer.streams"), ("chunk_size = 12", "transfer.chunk_size"), ("window = 0", "transfer.window"), ("cores = []", "transfer.cores")] {
            let e = Config::parse(&format!("[transfer]\n{line}\n"), "t.toml").map(|_| ()).expect_err(line).to_string();
            assert!(e.contains(key), "{line}: {e}");
        }
        let e = Config::parse("[transfer]\nstreamz = 4\n", "t.toml").map(|_| ()).unwrap_err().to_string();
        assert!(e.contains("streamz"), "{e}");
    }
}
