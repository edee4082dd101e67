//! The one place a transfer's knobs are decided. [`decide`] turns what the caller asked (a
//! [`Request`]), what the host has ([`Host`], detected once) and what the opening probe measured
//! into a [`Plan`]: plain values, each with the reason it has that value. It does no I/O, so it
//! is tested with made-up probes; the CLI, the daemon and the tuning sweeps all go through it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use dataplane::control::acp::AcpKind;
use dataplane::probe::PathEstimate;
use serde::{Deserialize, Serialize};

use crate::mode::{self, Mode, Thresholds, Transport};

/// `auto`, or a choice the caller forces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Choice {
    /// Decided by the plan.
    #[default]
    Auto,
    /// Forced on.
    On,
    /// Forced off.
    Off,
}

/// The mode a caller asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModeChoice {
    /// Probed, and switched live.
    #[default]
    Auto,
    /// Datacenter, no live switching.
    Datacenter,
    /// Internet, no live switching.
    Internet,
}

/// The transport a caller asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TransportChoice {
    /// The mode's.
    #[default]
    Auto,
    /// TCP streams.
    Tcp,
    /// RDMA queue pairs.
    Rdma,
}

/// Compression effort: `auto`, `off` or a zstd level 1-19, written as a string (`"3"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Effort {
    /// Chosen by the plan (HDE: the level that finishes soonest on the measured link).
    #[default]
    Auto,
    /// No zstd.
    Off,
    /// A fixed zstd level.
    Level(i32),
}

impl TryFrom<String> for Effort {
    type Error = PlanError;
    fn try_from(s: String) -> Result<Self, PlanError> {
        s.parse()
    }
}

impl From<Effort> for String {
    fn from(e: Effort) -> String {
        match e {
            Effort::Auto => "auto".into(),
            Effort::Off => "off".into(),
            Effort::Level(l) => l.to_string(),
        }
    }
}

impl std::str::FromStr for Effort {
    type Err = PlanError;
    fn from_str(s: &str) -> Result<Self, PlanError> {
        match s {
            "auto" => Ok(Self::Auto),
            "off" => Ok(Self::Off),
            l => l.parse().ok().filter(|l| (1..=19).contains(l)).map(Self::Level).ok_or_else(|| PlanError::Invalid("compress takes auto, off or a zstd level 1-19".into())),
        }
    }
}

/// The ACP a caller asks for: `auto` (delay pacing in internet mode, none in datacenter mode),
/// `off`, `delay` or `bbr-model`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AcpChoice {
    /// The mode's.
    #[default]
    Auto,
    /// No pacing.
    Off,
    /// Delay-based pacing.
    Delay,
    /// BBR-model pacing.
    BbrModel,
}

/// What a caller asks of one send: every field optional (`auto`), as `dwcp send`'s flags, a
/// daemon job's JSON or the C ABI's options give it. Unknown fields are refused, so a typo in
/// a job is an error and not a silent default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Request {
    /// Receiver, HOST:PORT.
    pub to: String,
    /// What to send: a file, `gen:SIZE[:SEED]` (a generated VM-like image) or `-` (standard
    /// input; not for the daemon).
    pub source: String,
    /// Name at the receiver (default: the file name; `stdin` or `generated.img` otherwise).
    pub name: Option<String>,
    /// Mode.
    pub mode: ModeChoice,
    /// Streams (fixed, never parked).
    pub streams: Option<u16>,
    /// Chunk size, bytes.
    pub chunk_size: Option<u32>,
    /// Encryption (`None`: the mode's, and plaintext only where the receiver allows it).
    pub encrypt: Option<bool>,
    /// Transport.
    pub transport: TransportChoice,
    /// Send only what the receiver does not already hold.
    pub resume: bool,
    /// Unacknowledged chunks per stream.
    pub window: Option<usize>,
    /// Chunks read from a pipe ahead of the streams.
    pub read_ahead: Option<usize>,
    /// `TCP_NOTSENT_LOWAT`, bytes.
    pub notsent_lowat: Option<u32>,
    /// Zero-copy sends.
    pub zerocopy: Choice,
    /// A stream with no acknowledgement for this long is dead, milliseconds (default 30 s; see
    /// [`Request::idle_timeout`]).
    pub idle_timeout_ms: Option<u64>,
    /// Cores for the shard threads.
    pub cores: Option<Vec<usize>>,
    /// HDE page encoding of a memory image.
    pub hde: Choice,
    /// A later round: the previous round's image, which the receiver holds under the same name.
    pub round_of: Option<PathBuf>,
    /// A later round from a dirty bitmap (one bit per `dirty_unit` bytes).
    pub dirty: Option<PathBuf>,
    /// The unit of `dirty`, bytes (default 4096).
    pub dirty_unit: Option<u64>,
    /// Compression effort of HDE or page-aware mode.
    pub compress: Effort,
    /// The source is QEMU's migration stream on standard input: page-aware.
    pub qemu: bool,
    /// Page-aware mode's cache of old pages, bytes (default 256 MiB).
    pub hde_cache: Option<u64>,
    /// ACP.
    pub acp: AcpChoice,
    /// Congestion control of every stream.
    pub cc: Option<String>,
    /// TCP_INFO polling only, no eBPF probes.
    pub monitor_poll: bool,
    /// The streams' first congestion window: `None` auto, `Some(0)` the kernel's, else bytes.
    pub initial_window: Option<u32>,
    /// The startup window's gain: `None` auto (the default under ACP on BBR), `Some(0.0)` none,
    /// else a gain from 1.25 to 4.
    pub startup_window: Option<f64>,
    /// Each control interval written here as CSV.
    pub trace_out: Option<PathBuf>,
    /// Seconds from its start (a daemon job: from its submission) by which the transfer should
    /// be verified. It changes nothing of how it is sent; the transfer reports, from PBA's
    /// interval, whether it will be ([`crate::itp::deadline`]).
    pub deadline_s: Option<f64>,
    /// RDMA device (default: the first).
    pub rdma_device: Option<String>,
    /// RDMA queue pairs (0: one per shard core).
    pub rdma_qps: u16,
    /// RDMA completions by events instead of busy polling.
    pub rdma_event: bool,
    /// A live migration (the daemon's migration jobs): the source is this QEMU's migration
    /// stream, page-aware with `qemu`, else in tunnel mode; `source` stays empty.
    pub migrate: Option<super::migrate::MigrateSpec>,
}

impl Request {
    /// How long a stream may go without an acknowledgement.
    pub fn idle_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.idle_timeout_ms.unwrap_or(30_000))
    }

    /// Fills what the caller left to the plan with this host's `[transfer]` defaults.
    pub fn apply_defaults(&mut self, d: &crate::config::TransferDefaults) {
        self.streams = self.streams.or(d.streams);
        self.chunk_size = self.chunk_size.or(d.chunk_size);
        self.window = self.window.or(d.window);
        if self.cores.is_none() {
            self.cores.clone_from(&d.cores);
        }
        if let (Choice::Auto, Some(z)) = (self.zerocopy, d.zerocopy) {
            self.zerocopy = z;
        }
        if let (AcpChoice::Auto, Some(a)) = (self.acp, d.acp) {
            self.acp = a;
        }
        if let (Effort::Auto, Some(c)) = (self.compress, d.compress) {
            self.compress = c;
        }
        if let (0, Some(n)) = (self.rdma_qps, d.rdma_qps) {
            self.rdma_qps = n;
        }
        if !self.rdma_event && d.rdma_poll.as_deref() == Some("event") {
            self.rdma_event = true;
        }
    }

    /// Checks a request made for someone with no terminal (`who`: the daemon, libdwcp): a
    /// receiver and a source are given, and the source is not standard input.
    pub fn check_detached(&self, who: &str) -> Result<(), PlanError> {
        if self.source == "-" {
            return Err(PlanError::Invalid(format!("{who} has no standard input: give a file or gen:SIZE as the source")));
        }
        // Waiting for a producer to connect cannot be cancelled yet: it would hold a job's slot
        // for as long as nobody connects.
        if self.source.starts_with("unix:") {
            return Err(PlanError::Invalid(format!("{who} does not take unix: sources yet: run `dwcp send unix:PATH` for a migration endpoint")));
        }
        if let Some(d) = self.deadline_s
            && !(d.is_finite() && d > 0.0)
        {
            return Err(PlanError::Invalid(format!("deadline_s is a number of seconds above 0, not {d}")));
        }
        if let Some(m) = &self.migrate {
            if !self.source.is_empty() {
                return Err(PlanError::Invalid("a migration's source is its QEMU (\"migrate\": {\"qmp\": PATH}): leave \"source\" out".into()));
            }
            if !m.qmp.is_absolute() {
                return Err(PlanError::Invalid(format!("the QMP socket {} is named relative to the caller: name it absolutely", m.qmp.display())));
            }
            if m.vm.is_some() != m.to_node.is_some() {
                return Err(PlanError::Invalid("a migration's \"vm\" (its name in the fleet) and \"to_node\" (the destination's node id) go together".into()));
            }
            if self.resume || self.hde == Choice::On || self.round_of.is_some() || self.dirty.is_some() {
                return Err(PlanError::Invalid("a migration is one stream: resume, HDE rounds and dirty bitmaps do not apply".into()));
            }
            if self.to.is_empty() {
                return Err(PlanError::Invalid("a migration needs \"to\": the destination's dwcp receiver, HOST:PORT".into()));
            }
            return Ok(());
        }
        if self.to.is_empty() || self.source.is_empty() {
            return Err(PlanError::Invalid("a transfer needs \"to\" (HOST:PORT) and \"source\" (a file or gen:SIZE), or \"migrate\"".into()));
        }
        Ok(())
    }
}

/// What the host has, detected once and passed down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Host {
    /// Cores the shards may use.
    pub cores: usize,
    /// An RDMA device opens here (and this build has the transport).
    pub rdma: bool,
    /// AES-GCM sealing measured cheaper here than the keyed tag of authenticated plaintext
    /// ([`dataplane::crypto::ProtectionCost`]): plaintext then saves no CPU for a copied source.
    pub seal_cheaper: bool,
}

/// What is known before sending: whether the source is a pipe, its size, and whether the
/// receiver is on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceFacts {
    /// Read from standard input (a live producer paces itself; no stream trials).
    pub stdin: bool,
    /// Size, when known.
    pub size: Option<u64>,
    /// The receiver's address is a loopback one: a path that is datacenter by definition and
    /// cannot change. Its RTT and bandwidth measure this host's load (a probe beside three
    /// other transfers on two cores read 0.80 Gbit/s; a receiver writing to disk showed a
    /// smoothed RTT of 15 ms), not a network.
    pub loopback: bool,
    /// A mapped file: plaintext payloads go out from the mapping with no copy.
    pub mapped: bool,
}

/// A request that cannot be met.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// Contradictory or out-of-range options, with what to change.
    #[error("{0}")]
    Invalid(String),
}

/// The probe a plan needs, decided before it runs: how hard to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeNeeds {
    /// Bytes of the bulk burst (0: RTT only; a forced mode needs no bandwidth).
    pub bulk_bytes: u64,
}

/// What the probe should measure for `req`.
pub fn probe_needs(req: &Request) -> ProbeNeeds {
    ProbeNeeds { bulk_bytes: if req.mode == ModeChoice::Auto { 4 << 20 } else { 0 } }
}

/// Stream 0 may connect, encrypted, while the probe runs (saving its key exchange on a long
/// path) unless the caller asked for plaintext; the plan may still not use it.
pub fn early_stream_zero(req: &Request) -> bool {
    req.encrypt != Some(false) && req.transport != TransportChoice::Rdma
}

/// HDE's part of a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct HdePlan {
    /// Effort.
    pub compress: Effort,
    /// A later round of an image the receiver holds.
    pub delta_round: bool,
}

/// Page-aware mode's part of a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct QemuPlan {
    /// zstd level of pages (`None`: none).
    pub level: Option<i32>,
    /// Cache of old pages, bytes.
    pub cache_bytes: u64,
}

/// Everything a send does, and why. Serializable: `dwcp send --json` prints it, a daemon job
/// returns it, a sweep records it.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// Mode at the start.
    pub mode: Mode,
    /// The caller forced the mode.
    pub forced: bool,
    /// The mode switches live (probed, not forced, not loopback).
    pub live: bool,
    /// Streams opened.
    pub streams: u16,
    /// Of them, active at the start (the others parked for a mode switch or PBA's trials).
    pub active: u16,
    /// The stream count was fixed by the caller: never parked.
    pub streams_fixed: bool,
    /// Chunk size, bytes.
    pub chunk_size: u32,
    /// PBA may cut the chunk size for a startup-bound object.
    pub cut_chunks: bool,
    /// Unacknowledged chunks per stream.
    pub window: usize,
    /// Chunks read ahead from a pipe (`None`: streams x window).
    pub read_ahead: Option<usize>,
    /// `TCP_NOTSENT_LOWAT`.
    pub notsent_lowat: Option<u32>,
    /// Transport asked for (RDMA falls back to TCP, with the reason, when it cannot be had).
    pub transport: Transport,
    /// Encrypt.
    pub encrypt: bool,
    /// HDE, when on.
    pub hde: Option<HdePlan>,
    /// Page-aware QEMU mode, when on.
    pub qemu: Option<QemuPlan>,
    /// ACP.
    pub acp: &'static str,
    /// The streams' first congestion window (`None`: the kernel's).
    pub initial_window: Option<u32>,
    /// The startup window's gain while ACP is in startup (`None`: none).
    pub startup_window: Option<f64>,
    /// PBA's stream trials.
    pub stream_trials: bool,
    /// Zero-copy sends: `auto`, `on` or `off`.
    pub zerocopy: Choice,
    /// The probe's least RTT, microseconds.
    pub probe_rtt_us: u64,
    /// The probe's bandwidth, Gbit/s (`None`: not measured).
    pub probe_gbps: Option<f64>,
    /// Why each knob has its value.
    pub why: BTreeMap<&'static str, String>,
}

impl Plan {
    /// The ACP controller.
    pub fn acp_kind(&self) -> AcpKind {
        AcpKind::parse(self.acp).unwrap_or(AcpKind::Off)
    }
}

/// Unsent bytes each stream of a QEMU migration may queue in the kernel. Unbounded, the
/// kernel's autotuned socket buffers held what the window let through, still queued when QEMU
/// stopped the VM: on the rig's 50 ms link the downtime was about 510 ms, with 128 KiB 415 ms,
/// with 32 KiB 308 ms, for the same total time.
pub const QEMU_NOTSENT_LOWAT: u32 = 32 << 10;

/// A QEMU stream's chunk, unless the caller sets one.
pub const QEMU_CHUNK: u32 = 256 << 10;

/// The window of a QEMU migration stream: QEMU decides when to stop the VM by how fast its
/// stream drains, and what dwcp holds when it does still has to cross the link during the
/// downtime; about two bandwidth-delay products over the active streams keep the link busy
/// without more: at least 2 chunks per stream, and 4 on paths of 20 ms or more, where a stream
/// recovering a loss holds its chunks a round trip longer (on the rig's 150 ms, 1% loss link,
/// 2 per stream took 13.2-13.3 s, 3 took 11.3-12.0 s, 4 took 11.0-11.2 s; on its 2 ms link, 2
/// per stream cut the downtime from about 800 to 500 ms); 4 when the probe measured no bandwidth.
pub fn qemu_window(probe: &PathEstimate, chunk: u32, active: u16) -> usize {
    if !probe.bw_bps.is_finite() || probe.bw_bps <= 0.0 {
        return 4;
    }
    let bdp = probe.bw_bps / 8.0 * probe.rtt_min.as_secs_f64();
    let least = if probe.rtt_min >= Duration::from_millis(20) { 4 } else { 2 };
    ((2.0 * bdp / (f64::from(active.max(1)) * f64::from(chunk))).ceil() as usize).clamp(least, 32)
}

/// Decides every knob of a send from the request, the host, the source and the probe.
pub fn decide(req: &Request, host: Host, src: SourceFacts, probe: &PathEstimate, t: Thresholds) -> Result<Plan, PlanError> {
    let mut why = BTreeMap::new();
    let later_round = req.round_of.is_some() || req.dirty.is_some();
    if later_round && req.hde == Choice::Off {
        return Err(PlanError::Invalid("--round-of and --dirty send a delta round, which is HDE: drop --hde off".into()));
    }
    if req.qemu && !src.stdin {
        return Err(PlanError::Invalid("--qemu reads QEMU's migration stream from standard input or a Unix socket: pass - or unix:PATH as the source".into()));
    }
    if let Some(g) = req.startup_window
        && g != 0.0
        && !(1.25..=4.0).contains(&g)
    {
        return Err(PlanError::Invalid(format!("the startup window's gain is 1.25 to 4 (or off), not {g}")));
    }
    if req.streams == Some(0) {
        return Err(PlanError::Invalid("streams must be at least 1".into()));
    }
    if req.chunk_size == Some(0) {
        return Err(PlanError::Invalid("the chunk size must be at least 1 byte".into()));
    }
    #[cfg(not(feature = "rdma"))]
    if req.transport == TransportChoice::Rdma {
        return Err(PlanError::Invalid("this dwcp was built without the RDMA transport (the rdma feature, which needs libibverbs); use --transport tcp".into()));
    }

    // Mode.
    let forced = match req.mode {
        ModeChoice::Auto => None,
        ModeChoice::Datacenter => Some(Mode::Datacenter),
        ModeChoice::Internet => Some(Mode::Internet),
    };
    let gbps = (probe.bw_bps.is_finite()).then(|| probe.bw_bps / 1e9);
    let measured = format!("probe: rtt {:.3} ms, {}", probe.rtt_min.as_secs_f64() * 1e3, gbps.map_or("bandwidth not measured".into(), |g| format!("{g:.2} Gbit/s")));
    let (mode, why_mode) = match forced {
        Some(m) => (m, "forced (--mode); no live switching".to_string()),
        None if src.loopback => (Mode::Datacenter, format!("the receiver is on this host (loopback), a path that cannot change; no live switching ({measured})")),
        None => (t.classify(probe.rtt_min, probe.bw_bps), format!("{measured}; switches live")),
    };
    why.insert("mode", why_mode);
    let d = mode::defaults(mode, host.rdma, host.cores, Some(probe.rtt_min));

    // Streams: a fixed count is never parked; otherwise enough are opened for either mode (and
    // PBA's trials), and the mode's count is active.
    // PBA's trials: not for a fixed count, a producer on standard input, or a loopback path
    // (which never switches, and where the trials only gave their streams back).
    let trials = req.streams.is_none() && !src.stdin && !src.loopback;
    let (streams, active) = match (req.streams, forced) {
        (Some(n), _) => (n, n),
        (None, Some(_)) => (d.streams, d.streams),
        (None, None) if src.loopback => (d.streams, d.streams),
        (None, None) => (mode::streams_to_open(false, host.cores, probe.rtt_min, trials), d.streams),
    };
    why.insert(
        "streams",
        match req.streams {
            Some(_) => "fixed (--streams)".into(),
            None if streams > active => format!("{active} active ({} mode, {} cores); {streams} opened so a mode switch or PBA's trials never reconnect", mode.name(), host.cores),
            None => format!("{} mode, {} cores", mode.name(), host.cores),
        },
    );

    // Transport and encryption. Forcing RDMA implies plaintext (the RDMA path does not
    // encrypt) unless encryption is asked for.
    let transport = match req.transport {
        TransportChoice::Rdma => Transport::Rdma,
        TransportChoice::Tcp => Transport::Tcp,
        TransportChoice::Auto => d.transport,
    };
    why.insert(
        "transport",
        match req.transport {
            TransportChoice::Auto if transport == Transport::Rdma => "datacenter mode and an RDMA device here (TCP if the receiver has none)".into(),
            TransportChoice::Auto => format!("{} mode{}", mode.name(), if host.rdma { "" } else { ", no RDMA device here" }),
            _ => "forced (--transport)".into(),
        },
    );
    let encrypt_asked = if req.transport == TransportChoice::Rdma { req.encrypt.or(Some(false)) } else { req.encrypt };
    let (encrypt, why_enc) = match encrypt_asked {
        Some(e) => (e, if e { "on (--encrypt)".to_string() } else { "off (--no-encrypt, or --transport rdma)".to_string() }),
        None if d.encrypt => (true, format!("on ({} mode)", mode.name())),
        // Plaintext is chosen to save CPU; where sealing costs less than the plaintext tag and
        // the payloads are copied anyway (no mapped file to send from), it saves nothing.
        None if probe.plaintext_ok && host.seal_cheaper && !src.mapped && transport == Transport::Tcp => {
            (true, format!("on ({} mode allows plaintext, but AES-GCM measured cheaper here than the plaintext tag, and this source is copied anyway)", mode.name()))
        }
        None if probe.plaintext_ok => (false, format!("off ({} mode; peers still authenticated, frames tagged)", mode.name())),
        None => (true, format!("on ({} mode would send plaintext, but the receiver requires encryption)", mode.name())),
    };
    why.insert("encrypt", why_enc);

    // Chunks and windows.
    let chunk_size = req.chunk_size.unwrap_or(if req.qemu { QEMU_CHUNK } else { 1 << 20 });
    let cut_chunks = req.chunk_size.is_none() && !req.qemu;
    why.insert(
        "chunk_size",
        match (req.chunk_size, req.qemu) {
            (Some(_), _) => "fixed (--chunk-size)".into(),
            // QEMU paces its rounds by how fast its stream drains: small chunks keep what dwcp
            // holds read ahead of the link small.
            (None, true) => "256 KiB for a QEMU stream (small read-ahead: QEMU paces by the drain)".into(),
            (None, false) => "1 MiB, cut by PBA for an object too small for four chunks per active stream".into(),
        },
    );
    let mut window = req.window.unwrap_or(32);
    let mut read_ahead = req.read_ahead;
    let mut notsent_lowat = req.notsent_lowat;
    why.insert("window", if req.window.is_some() { "fixed (--window)".into() } else { "32 chunks per stream".into() });

    // HDE for whole-page images in a mode that compresses (not over RDMA, which carries raw
    // chunks, nor when resuming).
    let image = !src.stdin && src.size.is_some_and(|s| s > 0 && s % 4096 == 0);
    let hde_on = match req.hde {
        Choice::On => true,
        Choice::Off => false,
        Choice::Auto => later_round || (image && d.adaptive_compression && !req.resume && transport != Transport::Rdma),
    };
    why.insert(
        "hde",
        match (req.hde, hde_on) {
            (Choice::Auto, _) if later_round => "on: a delta round".into(),
            (Choice::Auto, true) => format!("on: a whole-page image in {} mode", mode.name()),
            (Choice::Auto, false) if !image => "off: not a whole-page image".into(),
            (Choice::Auto, false) if req.resume => "off: resuming".into(),
            (Choice::Auto, false) if transport == Transport::Rdma => "off: RDMA carries raw chunks".into(),
            (Choice::Auto, false) => format!("off: {} mode does not compress", mode.name()),
            _ => "forced (--hde)".into(),
        },
    );
    let hde = hde_on.then_some(HdePlan { compress: req.compress, delta_round: later_round });

    // Page-aware QEMU: zstd 3 for `auto` (adaptive effort swung between none, 1 and 9 on the
    // rig and every guest and link took longer: docs/operations.md), a window of about two
    // bandwidth-delay products, one chunk read ahead, and a bounded kernel queue.
    let qemu = if req.qemu {
        let level = match req.compress {
            Effort::Auto => Some(3),
            Effort::Off => None,
            Effort::Level(l) => Some(l),
        };
        if req.window.is_none() {
            window = qemu_window(probe, chunk_size, active);
            why.insert("window", "about two bandwidth-delay products over the active streams (QEMU paces by its stream's drain)".into());
        }
        read_ahead = Some(read_ahead.unwrap_or(1));
        notsent_lowat = Some(notsent_lowat.unwrap_or(QEMU_NOTSENT_LOWAT));
        Some(QemuPlan { level, cache_bytes: req.hde_cache.unwrap_or(256 << 20) })
    } else {
        None
    };

    // ACP and the first window.
    let acp = match req.acp {
        AcpChoice::Auto if d.acp => "delay",
        AcpChoice::Auto | AcpChoice::Off => "off",
        AcpChoice::Delay => "delay",
        AcpChoice::BbrModel => "bbr-model",
    };
    why.insert("acp", if req.acp == AcpChoice::Auto { format!("{} mode", mode.name()) } else { "forced (--acp)".into() });
    let initial_window = match req.initial_window {
        None => (acp != "off").then_some(dataplane::send::FIRST_WINDOW),
        Some(0) => None,
        Some(b) => Some(b),
    };
    // The startup window needs a first window's program and ACP to lift it, and BBR: lifting the
    // clamp also lifts ssthresh, which puts a loss-based algorithm back into slow start.
    let on_bbr = req.cc.as_deref().is_none_or(|c| c == "bbr");
    let startup_window = match req.startup_window {
        Some(g) if g == 0.0 => {
            why.insert("startup_window", "off (--startup-window off)".into());
            None
        }
        _ if acp == "off" => None,
        _ if initial_window.is_none() => {
            why.insert("startup_window", "none: it rides on the first window's program, which is off".into());
            None
        }
        _ if !on_bbr => {
            why.insert("startup_window", "none: the streams are not on BBR (--cc)".into());
            None
        }
        Some(g) => {
            why.insert("startup_window", format!("{g} x delivered per least RTT (--startup-window)"));
            Some(g)
        }
        None => {
            why.insert("startup_window", format!("{} x delivered per least RTT while ACP is in startup (ACP on BBR)", dataplane::send::STARTUP_GAIN));
            Some(dataplane::send::STARTUP_GAIN)
        }
    };

    Ok(Plan {
        mode,
        forced: forced.is_some(),
        live: forced.is_none() && !src.loopback,
        streams,
        active,
        streams_fixed: req.streams.is_some(),
        chunk_size,
        cut_chunks,
        window,
        read_ahead,
        notsent_lowat,
        transport,
        encrypt,
        hde,
        qemu,
        acp,
        initial_window,
        startup_window,
        stream_trials: trials,
        zerocopy: req.zerocopy,
        probe_rtt_us: probe.rtt_min.as_micros() as u64,
        probe_gbps: gbps,
        why,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(rtt_us: u64, gbps: f64, plaintext_ok: bool) -> PathEstimate {
        let rtt = Duration::from_micros(rtt_us);
        PathEstimate { rtt_min: rtt, rtt_median: rtt, bw_bps: gbps * 1e9, plaintext_ok, samples: 3 }
    }

    const HOST: Host = Host { cores: 2, rdma: false, seal_cheaper: false };
    const FILE: SourceFacts = SourceFacts { stdin: false, size: Some(64 << 20), loopback: false, mapped: true };
    const PIPE: SourceFacts = SourceFacts { stdin: true, size: None, loopback: false, mapped: false };

    fn req(f: impl FnOnce(&mut Request)) -> Request {
        let mut r = Request { to: "peer:7470".into(), source: "gen:64MiB".into(), ..Request::default() };
        f(&mut r);
        r
    }

    #[test]
    fn plaintext_is_chosen_only_where_it_saves_cpu() {
        let cheap_seal = Host { seal_cheaper: true, ..HOST };
        let copied = SourceFacts { mapped: false, ..FILE };
        // Sealing cheaper and a copied source: plaintext would cost more, so encrypted.
        let p = decide(&req(|_| {}), cheap_seal, copied, &probe(30, 20.0, true), Thresholds::default()).unwrap();
        assert!(p.encrypt && p.why["encrypt"].contains("AES-GCM measured cheaper"), "{:?}", p.why);
        // A mapped file goes out from the mapping with no copy in plaintext: plaintext stays.
        let p = decide(&req(|_| {}), cheap_seal, FILE, &probe(30, 20.0, true), Thresholds::default()).unwrap();
        assert!(!p.encrypt, "{:?}", p.why);
        // The tag cheaper than sealing: plaintext, as before.
        let p = decide(&req(|_| {}), HOST, copied, &probe(30, 20.0, true), Thresholds::default()).unwrap();
        assert!(!p.encrypt, "{:?}", p.why);
        // Asked for, plaintext is plaintext whatever it costs.
        let p = decide(&req(|r| r.encrypt = Some(false)), cheap_seal, copied, &probe(30, 20.0, true), Thresholds::default()).unwrap();
        assert!(!p.encrypt);
    }

    #[test]
    fn a_short_fast_path_is_datacenter_and_plaintext_only_where_the_receiver_allows() {
        let p = decide(&req(|_| {}), HOST, FILE, &probe(30, 20.0, true), Thresholds::default()).unwrap();
        assert_eq!((p.mode, p.encrypt, p.hde, p.acp, p.live), (Mode::Datacenter, false, None, "off", true));
        assert!(p.streams >= p.active, "{p:?}");
        assert!(p.why["encrypt"].contains("off (datacenter mode"), "{}", p.why["encrypt"]);
        let p = decide(&req(|_| {}), HOST, FILE, &probe(30, 20.0, false), Thresholds::default()).unwrap();
        assert!(p.encrypt && p.why["encrypt"].contains("receiver requires encryption"), "{:?}", p.why);
    }

    #[test]
    fn a_long_path_is_internet_encrypted_compressed_and_paced() {
        let p = decide(&req(|_| {}), HOST, FILE, &probe(80_000, 0.2, true), Thresholds::default()).unwrap();
        assert_eq!((p.mode, p.encrypt, p.acp), (Mode::Internet, true, "delay"));
        assert_eq!(p.hde, Some(HdePlan { compress: Effort::Auto, delta_round: false }));
        assert_eq!(p.initial_window, Some(dataplane::send::FIRST_WINDOW));
        assert_eq!(p.startup_window, Some(dataplane::send::STARTUP_GAIN));
        // Off when asked, without ACP, without the first window's program, or off BBR.
        for (what, r) in [
            ("asked off", req(|r| r.startup_window = Some(0.0))),
            ("ACP off", req(|r| r.acp = AcpChoice::Off)),
            ("first window off", req(|r| r.initial_window = Some(0))),
            ("cubic", req(|r| r.cc = Some("cubic".into()))),
        ] {
            let p = decide(&r, HOST, FILE, &probe(80_000, 0.2, true), Thresholds::default()).unwrap();
            assert_eq!(p.startup_window, None, "{what}: {:?}", p.why.get("startup_window"));
        }
        let p = decide(&req(|r| r.startup_window = Some(1.5)), HOST, FILE, &probe(80_000, 0.2, true), Thresholds::default()).unwrap();
        assert_eq!(p.startup_window, Some(1.5));
        // Not a whole-page image: no HDE.
        let odd = SourceFacts { size: Some((64 << 20) + 1), ..FILE };
        assert_eq!(decide(&req(|_| {}), HOST, odd, &probe(80_000, 0.2, true), Thresholds::default()).unwrap().hde, None);
    }

    #[test]
    fn a_receiver_on_this_host_is_datacenter_whatever_a_loaded_host_measured() {
        // The probe CI measured on loopback beside three other transfers.
        let lo = SourceFacts { loopback: true, ..FILE };
        let p = decide(&req(|_| {}), HOST, lo, &probe(28, 0.80, false), Thresholds::default()).unwrap();
        assert_eq!((p.mode, p.live, p.forced), (Mode::Datacenter, false, false));
        assert!(p.why["mode"].contains("loopback"), "{}", p.why["mode"]);
        assert_eq!((p.streams, p.active, p.stream_trials), (4, 4, false), "nothing parked for a switch that cannot come");
        // The same figures from another host: internet, switching live.
        let p = decide(&req(|_| {}), HOST, FILE, &probe(28, 0.80, false), Thresholds::default()).unwrap();
        assert_eq!((p.mode, p.live), (Mode::Internet, true));
        // A forced mode still wins.
        let p = decide(&req(|r| r.mode = ModeChoice::Internet), HOST, lo, &probe(28, 20.0, true), Thresholds::default()).unwrap();
        assert_eq!((p.mode, p.forced), (Mode::Internet, true));
    }

    #[test]
    fn flags_win_over_the_mode() {
        let r = req(|r| {
            r.encrypt = Some(true);
            r.streams = Some(3);
            r.acp = AcpChoice::Off;
            r.hde = Choice::Off;
        });
        let p = decide(&r, HOST, FILE, &probe(80_000, 0.2, true), Thresholds::default()).unwrap();
        assert_eq!((p.streams, p.active, p.streams_fixed, p.encrypt, p.acp, p.hde), (3, 3, true, true, "off", None));
        assert!(!p.stream_trials);
        // Forced internet on a short path: every stream active, no live switching.
        let p = decide(&req(|r| r.mode = ModeChoice::Internet), HOST, FILE, &probe(30, f64::NAN, true), Thresholds::default()).unwrap();
        assert_eq!((p.mode, p.live, p.encrypt, p.streams == p.active), (Mode::Internet, false, true, true));
        // RDMA forced: plaintext unless asked, and HDE stays off.
        let p = decide(&req(|r| r.transport = TransportChoice::Rdma), HOST, FILE, &probe(30, 20.0, true), Thresholds::default());
        if cfg!(feature = "rdma") {
            let p = p.unwrap();
            assert_eq!((p.transport, p.encrypt, p.hde), (Transport::Rdma, false, None));
        } else {
            assert!(p.is_err());
        }
    }

    #[test]
    fn a_qemu_stream_gets_a_window_of_two_bdps_and_a_bounded_queue() {
        let r = req(|r| {
            r.source = "-".into();
            r.qemu = true;
        });
        // 200 Mbit/s, 50 ms: a BDP of 1.25 MB; two over 4 active streams of 256 KiB chunks.
        let p = decide(&r, HOST, PIPE, &probe(50_000, 0.2, true), Thresholds::default()).unwrap();
        assert_eq!(p.qemu, Some(QemuPlan { level: Some(3), cache_bytes: 256 << 20 }));
        assert_eq!(p.chunk_size, QEMU_CHUNK);
        assert_eq!(p.window, qemu_window(&probe(50_000, 0.2, true), QEMU_CHUNK, p.active));
        assert!(p.window >= 4, "{}", p.window);
        assert_eq!((p.read_ahead, p.notsent_lowat, p.stream_trials), (Some(1), Some(QEMU_NOTSENT_LOWAT), false));
        // Not from a pipe: refused, saying what to do.
        let e = decide(&req(|r| r.qemu = true), HOST, FILE, &probe(50_000, 0.2, true), Thresholds::default()).unwrap_err();
        assert!(e.to_string().contains("pass - or unix:PATH as the source"), "{e}");
    }

    #[test]
    fn contradictions_are_refused_with_what_to_change() {
        let r = req(|r| {
            r.round_of = Some("prev.img".into());
            r.hde = Choice::Off;
        });
        let e = decide(&r, HOST, FILE, &probe(30, 20.0, true), Thresholds::default()).unwrap_err();
        assert!(e.to_string().contains("drop --hde off"), "{e}");
        assert!(decide(&req(|r| r.streams = Some(0)), HOST, FILE, &probe(30, 20.0, true), Thresholds::default()).is_err());
    }

    #[test]
    fn a_request_reads_from_json_and_refuses_unknown_fields() {
        let r: Request = serde_json::from_str(r#"{"to":"10.0.0.2:7470","source":"gen:1GiB","streams":4,"compress":"3","mode":"internet"}"#).unwrap();
        assert_eq!((r.streams, r.compress, r.mode), (Some(4), Effort::Level(3), ModeChoice::Internet));
        let e = serde_json::from_str::<Request>(r#"{"to":"x","stream":4}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `stream`"), "{e}");
        assert!(serde_json::from_str::<Request>(r#"{"compress":"30"}"#).is_err());
        let p = decide(&r, HOST, FILE, &probe(30, 20.0, true), Thresholds::default()).unwrap();
        let j = serde_json::to_value(&p).unwrap();
        assert_eq!(j["streams"], 4);
        assert!(j["why"]["mode"].as_str().unwrap().contains("forced"), "{j}");
    }
}
