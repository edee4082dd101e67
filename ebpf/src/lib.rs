//! dwcp's eBPF TCP probes: per-socket path state of dwcp's own sockets, read from inside the
//! kernel, and the `TCP_INFO` polling that stands in when BPF is refused.
//!
//! The BPF programs (`src/bpf/tcpstats.bpf.c`, CO-RE, compiled at build time by libbpf-cargo
//! into a skeleton) sit on the tracepoints `tcp:tcp_probe`, `tcp:tcp_retransmit_skb` and
//! `tcp:tcp_cong_state_set`. Only sockets registered with [`Probes::watch`] (by socket cookie)
//! are recorded: per-socket state in a hash map, retransmits and congestion-state changes also
//! as events in a ring buffer that the caller drains at its own cadence ([`Probes::drain`]).
//! [`Monitor`] is what the sender uses: the probes when they load, otherwise `TCP_INFO`
//! polling, with the reason it degraded.

mod initwin;
mod monitor;
#[cfg(not(dwcp_no_bpf))]
mod probes;
mod ratecc;
pub mod sys;

pub use initwin::{InitialWindow, WindowReport};
pub use monitor::{Monitor, Want};
#[cfg(not(dwcp_no_bpf))]
pub use probes::Probes;
pub use ratecc::{RateCc, rate_cc_name};
pub use sys::probe_bpf;

/// One socket's path state, from the probes or from `TCP_INFO`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SocketStats {
    /// Smoothed RTT, µs.
    pub srtt_us: u32,
    /// Least RTT the kernel has seen (windowed), µs.
    pub min_rtt_us: u32,
    /// Congestion window, segments.
    pub cwnd: u32,
    /// Slow-start threshold, segments.
    pub ssthresh: u32,
    /// Segment size, bytes.
    pub mss: u32,
    /// Segments retransmitted over the socket's life.
    pub total_retrans: u32,
    /// Bytes acknowledged by the peer over the socket's life.
    pub bytes_acked: u64,
    /// Segments delivered over the socket's life.
    pub delivered: u64,
    /// The kernel's last delivery-rate sample, bit/s.
    pub delivery_rate_bps: u64,
    /// Congestion state (0 Open, 1 Disorder, 2 CWR, 3 Recovery, 4 Loss).
    pub cong_state: u8,
    /// Times the socket entered Recovery or Loss (probes only; 0 when polled).
    pub recoveries: u64,
    /// Probe events recorded for the socket (0 when polled).
    pub events: u64,
}

/// What the ring buffer reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A segment of the socket was retransmitted (value: the TCP state).
    Retransmit {
        /// Socket cookie.
        cookie: u64,
        /// Kernel monotonic time, ns.
        ts_ns: u64,
    },
    /// The socket's congestion state changed.
    CongState {
        /// Socket cookie.
        cookie: u64,
        /// Kernel monotonic time, ns.
        ts_ns: u64,
        /// New state (0 Open .. 4 Loss).
        state: u8,
    },
}

/// Why the probes could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProbeError {
    /// This build has no BPF programs (the build could not compile them).
    #[error("the eBPF probes were not built: {0}")]
    NotBuilt(&'static str),
    /// The kernel refused (no CAP_BPF / CAP_PERFMON, or BPF disabled).
    #[error("{0} (run as root or grant CAP_BPF and CAP_PERFMON)")]
    Permission(String),
    /// Loading or attaching failed for another reason.
    #[error("loading eBPF failed: {0}")]
    Load(String),
    /// A map operation failed.
    #[error("eBPF map {map}: {source}")]
    Map {
        /// Which map.
        map: &'static str,
        /// Cause.
        source: std::io::Error,
    },
}

/// Run-time cost of one probe program, from the kernel's BPF statistics
/// (`kernel.bpf_stats_enabled`, switched on by [`Probes::enable_stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProgCost {
    /// Program name.
    pub name: &'static str,
    /// Times it ran.
    pub runs: u64,
    /// Nanoseconds spent in it, summed.
    pub run_ns: u64,
}
