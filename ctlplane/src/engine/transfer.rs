//! Starting, watching, cancelling and finishing one send: the probe, [`super::plan::decide`],
//! the options the data plane takes, the live mode controller and the trace writer, for every
//! caller alike (`dwcp send`, the daemon's jobs, the C ABI, the tuning sweeps).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::thread::JoinHandle;
use std::time::Duration;

use dataplane::crypto::Psk;
use dataplane::handshake::{self, Conn, HandshakeError};
use dataplane::probe::{self, PathEstimate, ProbeOptions};
use dataplane::send::{self, Faults, Progress, SendError, SendOptions, SendReport, ZeroCopy};
use dataplane::source::Source;

use super::live::{self, SwitchRecord};
use super::plan::{self, Choice, Effort, Host, Plan, PlanError, Request, SourceFacts};
use crate::mode::{Live, Thresholds};

/// Why a send could not start or did not finish.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The request cannot be met.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// The source cannot be read.
    #[error("{0}")]
    Source(String),
    /// The opening probe failed (no receiver, a wrong key, a closed port).
    #[error("probing {to}: {source}")]
    Probe {
        /// The receiver.
        to: String,
        /// Cause.
        source: HandshakeError,
    },
    /// A file the request names (a previous round, a dirty log, the trace) failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, and to which file.
        what: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The send failed.
    #[error("sending {name} to {to}: {source}")]
    Send {
        /// The object.
        name: String,
        /// The receiver.
        to: String,
        /// Cause.
        source: SendError,
    },
}

/// What kind of failure an [`EngineError`] is: what a caller tells apart (the CLI's exit code,
/// the C ABI's status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Bad or contradictory options: a usage error.
    Invalid,
    /// The receiver refused the handshake: a wrong key, another version, or not dwcp.
    Auth,
    /// The receiver cannot be reached or stopped answering.
    Connect,
    /// The receiver's digest did not match, or it refused the object's bytes.
    Digest,
    /// The receiver ended the session for another reason (busy, refused, out of space).
    Receiver,
    /// Cancelled by the caller; nothing was published.
    Cancelled,
    /// A local file or system call failed.
    Io,
}

fn handshake_failure(e: &HandshakeError) -> Failure {
    use dataplane::wire::ErrorCode;
    match e {
        HandshakeError::Closed { .. } | HandshakeError::Crypto(_) => Failure::Auth,
        HandshakeError::Connect { .. } | HandshakeError::Timeout { .. } | HandshakeError::Io { .. } => Failure::Connect,
        HandshakeError::Refused { code: ErrorCode::DigestMismatch | ErrorCode::Checksum, .. } => Failure::Digest,
        _ => Failure::Receiver,
    }
}

impl EngineError {
    /// What kind of failure this is.
    pub fn failure(&self) -> Failure {
        use dataplane::wire::ErrorCode;
        match self {
            EngineError::Plan(_) => Failure::Invalid,
            EngineError::Source(_) | EngineError::Io { .. } => Failure::Io,
            EngineError::Probe { source, .. } => handshake_failure(source),
            EngineError::Send { source, .. } => match source {
                SendError::Cancelled { .. } => Failure::Cancelled,
                SendError::Setup { source, .. } => handshake_failure(source),
                SendError::Receiver { code: ErrorCode::DigestMismatch | ErrorCode::Checksum, .. } => Failure::Digest,
                SendError::Receiver { .. } => Failure::Receiver,
                SendError::AllStreamsLost { .. } | SendError::Rdma(_) => Failure::Connect,
                SendError::Io { .. } => Failure::Io,
                _ => Failure::Invalid,
            },
        }
    }
}

/// A finished send: what was planned, what happened, and the live switches.
#[derive(Debug)]
pub struct Outcome {
    /// The plan it ran.
    pub plan: Plan,
    /// The data plane's report.
    pub report: SendReport,
    /// Live mode switches.
    pub switches: Vec<SwitchRecord>,
}

impl Outcome {
    /// The whole outcome as one JSON object (`dwcp send --json`, a job's result).
    pub fn json(&self) -> serde_json::Value {
        let mut j = super::report::json(&self.report, Some(live::json(&self.plan, &self.switches)));
        j["plan"] = serde_json::to_value(&self.plan).unwrap_or_default();
        j
    }
}

/// A running send.
#[derive(Debug)]
pub struct Transfer {
    plan: Plan,
    name: String,
    size: Option<u64>,
    progress: Arc<Progress>,
    stop: Arc<AtomicBool>,
    send: JoinHandle<Result<SendReport, SendError>>,
    controller: Option<JoinHandle<Vec<SwitchRecord>>>,
    to: String,
    /// Whether it runs on a warm peer's streams, and why (not).
    warm: Option<String>,
}

/// The probe a send opens with: three RTT samples (the key exchange, the Welcome, which also
/// says whether plaintext is allowed, and one ping), up to five more pings while none was
/// within the datacenter threshold (a busy host delays samples by milliseconds), and on a long
/// path (both handshake samples at or above the internet threshold) neither the ping nor the
/// bulk burst: there each round trip of the probe delays the transfer (a migration's first
/// byte), and live goodput measures the path anyway.
fn probe_options(req: &Request, t: Thresholds) -> ProbeOptions {
    ProbeOptions {
        rtt_samples: 3,
        extra_pings: 5,
        recheck_above: Some(t.dc_max_rtt),
        bulk_bytes: plan::probe_needs(req).bulk_bytes,
        long_path_rtt: Some(t.inet_min_rtt),
        ..ProbeOptions::default()
    }
}

/// The data plane's options for `plan` (the files a delta round names are mapped here).
pub fn send_options(req: &Request, plan: &Plan, probe: &PathEstimate, psk: Psk, size: Option<u64>) -> Result<SendOptions, EngineError> {
    let mut o = SendOptions::new(req.to.clone(), psk);
    o.streams = Some(plan.streams);
    o.chunk_size = plan.chunk_size;
    o.encrypt = plan.encrypt;
    o.resume = req.resume;
    o.window = plan.window;
    o.read_ahead = plan.read_ahead;
    o.notsent_lowat = plan.notsent_lowat;
    o.zerocopy = match plan.zerocopy {
        Choice::On => ZeroCopy::On,
        Choice::Off => ZeroCopy::Off,
        Choice::Auto => ZeroCopy::Auto,
    };
    o.idle_timeout = req.idle_timeout();
    o.cores = req.cores.clone();
    #[cfg(feature = "rdma")]
    if plan.transport == crate::mode::Transport::Rdma {
        o.rdma = Some(send::RdmaOptions {
            device: req.rdma_device.clone(),
            qps: req.rdma_qps,
            poll: if req.rdma_event { dataplane::transport::rdma::Poll::Event } else { dataplane::transport::rdma::Poll::Busy },
        });
    }
    if let Some(h) = plan.hde {
        let round_of = match &req.round_of {
            Some(p) => {
                Some(Arc::new(dataplane::source::map_image(p).map_err(|source| EngineError::Io { what: format!("cannot map the previous round {}", p.display()), source })?))
            }
            None => None,
        };
        let dirty = match &req.dirty {
            Some(p) => {
                let bits = std::fs::read(p).map_err(|source| EngineError::Io { what: format!("cannot read the dirty log {}", p.display()), source })?;
                let log = dataplane::hde::DirtyLog::new(bits, req.dirty_unit.unwrap_or(4096), size.unwrap_or(0))
                    .map_err(|e| PlanError::Invalid(format!("--dirty {}: {e}", p.display())))?;
                Some(Arc::new(log))
            }
            None => None,
        };
        let compress = match h.compress {
            Effort::Auto => send::Compress::Auto,
            Effort::Off => send::Compress::Off,
            Effort::Level(l) => send::Compress::Level(l),
        };
        o.hde = Some(send::HdeSend { compress, round_of, dirty, link_bps: probe.bw_bps });
    }
    o.qemu = plan.qemu.map(|q| send::QemuPages { level: q.level, cache_bytes: q.cache_bytes });
    o.control = send::ControlOptions {
        acp: plan.acp_kind(),
        cc: req.cc.clone(),
        monitor: if req.monitor_poll { ebpf::Want::Poll } else { ebpf::Want::Auto },
        grow_streams: plan.stream_trials,
        cut_chunks: plan.cut_chunks,
        link_bps: Some(probe.bw_bps).filter(|b| b.is_finite() && *b > 0.0),
        initial_window: plan.initial_window,
        startup_window: plan.startup_window,
        ..Default::default()
    };
    Ok(o)
}

/// Starts a send: parses the source, probes the receiver (stream 0 connecting meanwhile),
/// plans, and runs the transfer on its own threads. `faults` are what a test injects (the CLI's
/// hidden flags; [`Faults::default`] otherwise).
pub fn start(req: Request, psk: Psk, host: Host, t: Thresholds, faults: Faults) -> Result<Transfer, EngineError> {
    start_on(req, psk, host, t, faults, None)
}

/// As [`start`], on a warm peer's parked streams when `warm` lends them ([`crate::warm`]): the
/// path as measured on them stands in for the probe, stream 0 opens the session on its parked
/// stream and the others join in one round trip; after a verified session the streams go to
/// the loan's `keep` to be parked again. A plan they cannot carry (plaintext, RDMA) gives them
/// back unused and connects as usual.
pub fn start_on(req: Request, psk: Psk, host: Host, t: Thresholds, faults: Faults, warm: Option<&mut crate::warm::Lent>) -> Result<Transfer, EngineError> {
    let source = dataplane::source::parse(&req.source, req.name.clone()).map_err(EngineError::Source)?;
    start_from(req, source, psk, host, t, faults, warm)
}

/// As [`start_on`], reading `source` (opened by the caller: a migration's stream) instead of
/// the one `req.source` names.
pub fn start_from(req: Request, source: Source, psk: Psk, host: Host, t: Thresholds, faults: Faults, warm: Option<&mut crate::warm::Lent>) -> Result<Transfer, EngineError> {
    let later_round = req.round_of.is_some() || req.dirty.is_some();
    if later_round && req.name.is_none() && !matches!(source, Source::File { .. }) {
        return Err(PlanError::Invalid("--round-of and --dirty send a later round of an object the receiver holds by name: pass --name".into()).into());
    }
    let addrs: Vec<_> = std::net::ToSocketAddrs::to_socket_addrs(req.to.as_str()).map(Iterator::collect).unwrap_or_default();
    let loopback = !addrs.is_empty() && addrs.iter().all(|a: &std::net::SocketAddr| a.ip().is_loopback());
    let facts = SourceFacts { stdin: matches!(source, Source::Stream { .. }), size: source.size(), loopback, mapped: matches!(source, Source::File { map: Some(_), .. }) };
    // Stream 0 connects, encrypted, while the probe runs: on a long path that saves the two
    // round trips of its connection and key exchange. Unused, it is closed before its Hello.
    let warm = warm.map(|l| (std::mem::take(&mut l.conns), l.est, l.keep.clone(), l.measured_ago));
    let early0 = (warm.is_none() && plan::early_stream_zero(&req)).then(|| {
        let (to, psk, idle) = (req.to.clone(), psk.clone(), req.idle_timeout());
        std::thread::spawn(move || handshake::connect(&to, &psk, true, 0, idle))
    });
    let est = match &warm {
        // As a cold probe does on a long path, the bandwidth is left to the transfer to find:
        // a warm-up burst there ends in slow start, and its rate is only a lower bound (paced
        // at it, a warm 256 MiB transfer at 150 ms took 1.4x a cold one's time).
        Some((_, e, ..)) if e.rtt_min >= t.inet_min_rtt => PathEstimate { bw_bps: f64::NAN, ..*e },
        Some((_, e, ..)) => *e,
        None => probe::measure(&req.to, &psk, probe_options(&req, t)).map_err(|source| EngineError::Probe { to: req.to.clone(), source })?,
    };
    let plan = plan::decide(&req, host, facts, &est, t)?;
    let (start, warm) = match warm {
        Some((mut conns, e, keep, ago)) if plan.encrypt && plan.transport == crate::mode::Transport::Tcp && !conns.is_empty() => {
            let c0 = conns.remove(0);
            let why = format!("{} parked streams, the path measured on them {:.0} s ago: no probe, no key exchange, no slow start", conns.len() + 1, ago.as_secs_f64());
            (send::Start { stream0: Some((c0, e.rtt_min)), parked: conns, keep: Some(keep) }, Some(why))
        }
        Some((conns, _, keep, _)) => {
            for c in conns {
                let _ = keep.send(c);
            }
            (send::Start::default(), Some("not used: warm streams are encrypted TCP, and the plan is not".to_string()))
        }
        None => {
            let stream0: Option<(Conn, Duration)> = early0.and_then(|h| h.join().ok()?.ok()).filter(|_| plan.encrypt);
            (send::Start { stream0, ..send::Start::default() }, None)
        }
    };
    let mut opts = send_options(&req, &plan, &est, psk, facts.size)?;
    // The trace is written as intervals end, so an interrupted send leaves it too.
    let trace = match &req.trace_out {
        Some(path) => {
            use std::io::Write;
            let f = std::fs::File::create(path).map_err(|source| EngineError::Io { what: format!("creating the trace file {}", path.display()), source })?;
            let mut w = std::io::LineWriter::new(f);
            writeln!(w, "{}", send::TraceRow::HEADER).map_err(|source| EngineError::Io { what: format!("writing {}", path.display()), source })?;
            let (tx, rx) = crossbeam_channel::unbounded::<send::TraceRow>();
            opts.control.trace = Some(tx);
            Some(std::thread::spawn(move || {
                for row in rx {
                    let _ = writeln!(w, "{}", row.csv());
                }
            }))
        }
        None => None,
    };
    let progress = Arc::new(Progress::default());
    progress.active.store(plan.active, Relaxed);
    let stop = Arc::new(AtomicBool::new(false));
    let controller = plan.live.then(|| live::spawn(Live::new(t, plan.mode, host.rdma, host.cores, plan.streams), progress.clone(), stop.clone(), plan.streams_fixed));
    let (name, size) = (source.name().to_owned(), source.size());
    let p = progress.clone();
    let send = std::thread::Builder::new()
        .name("dwcp-send".into())
        .spawn(move || {
            let r = send::send_with(source, &opts, p, start, faults);
            // The options hold the trace channel's sender: dropping them ends the writer's loop.
            drop(opts);
            if let Some(w) = trace {
                let _ = w.join();
            }
            r
        })
        .map_err(|source| EngineError::Io { what: "starting the send thread".into(), source })?;
    Ok(Transfer { plan, name, size, progress, stop, send, controller, to: req.to, warm })
}

impl Transfer {
    /// What it runs.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Whether it runs on a warm peer's streams, and why (not).
    pub fn warm(&self) -> Option<&str> {
        self.warm.as_deref()
    }

    /// The object's name at the receiver.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The object's size, when known before it is read.
    pub fn size(&self) -> Option<u64> {
        self.size
    }

    /// Its live counters (bytes acknowledged, total, streams active, RTT).
    pub fn progress(&self) -> &Arc<Progress> {
        &self.progress
    }

    /// Ends it without a commit: the receiver publishes nothing. [`Transfer::wait`] then
    /// returns [`SendError::Cancelled`].
    pub fn cancel(&self) {
        self.progress.cancel.store(true, Relaxed);
    }

    /// Whether it has ended (the result is ready).
    pub fn is_finished(&self) -> bool {
        self.send.is_finished()
    }

    /// Waits for the end (the plan stays readable from [`Transfer::plan`] before it).
    pub fn wait(self) -> Result<Outcome, EngineError> {
        let r = self.send.join().unwrap_or_else(|_| Err(SendError::Invalid("the send thread panicked".into())));
        self.stop.store(true, Relaxed);
        let switches = self.controller.map(|c| c.join().unwrap_or_default()).unwrap_or_default();
        match r {
            Ok(report) => Ok(Outcome { plan: self.plan, report, switches }),
            Err(source) => Err(EngineError::Send { name: self.name, to: self.to, source }),
        }
    }
}
