//! The sender's controllers, free of I/O (time and measurements passed in): [`acp`]
//! (adaptive congestion prevention: per-stream pacing and stream count from per-stream path
//! state), [`pba`] (predictive bandwidth allocation: the next interval's bandwidth from
//! history) and [`effort`] (HDE's compression level for the link as measured). `send` runs the
//! first two on a monitor thread fed by the eBPF probes or `TCP_INFO`, the third in its shards.

pub mod acp;
pub mod effort;
pub mod pba;

/// One stream over one control interval.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StreamSample {
    /// Smoothed RTT, µs (0: not measured).
    pub srtt_us: u32,
    /// The kernel's windowed least RTT, µs.
    pub min_rtt_us: u32,
    /// Congestion window, segments.
    pub cwnd: u32,
    /// Segment size, bytes.
    pub mss: u32,
    /// Segments retransmitted during the interval.
    pub retrans: u32,
    /// Bytes acknowledged during the interval.
    pub acked: u64,
    /// The kernel's last delivery-rate sample, bit/s.
    pub delivery_bps: u64,
    /// The stream takes new chunks (not parked).
    pub active: bool,
}

/// What a controller sees each interval.
#[derive(Debug, Clone, Copy)]
pub struct Observation<'a> {
    /// Time since the transfer started, s.
    pub t: f64,
    /// Length of this interval, s.
    pub dt: f64,
    /// Streams opened (parked ones too).
    pub streams: &'a [StreamSample],
}

impl Observation<'_> {
    /// Bytes acknowledged over all streams this interval, as bit/s.
    pub fn goodput_bps(&self) -> f64 {
        if self.dt <= 0.0 {
            return 0.0;
        }
        self.streams.iter().map(|s| s.acked as f64).sum::<f64>() * 8.0 / self.dt
    }

    /// Least of the streams' least RTTs, µs (None before any is measured).
    pub fn min_rtt_us(&self) -> Option<f64> {
        self.streams.iter().map(|s| s.min_rtt_us).filter(|&r| r > 0).min().map(f64::from)
    }

    /// Smoothed RTT over the streams that carried data, weighted by bytes (None if none did).
    pub fn srtt_us(&self) -> Option<f64> {
        let (w, sum) =
            self.streams.iter().filter(|s| s.acked > 0 && s.srtt_us > 0).fold((0.0, 0.0), |(w, sum), s| (w + s.acked as f64, sum + s.acked as f64 * f64::from(s.srtt_us)));
        (w > 0.0).then(|| sum / w)
    }

    /// The kernel's latest delivery-rate samples of the active streams, summed, bit/s (None when
    /// none has one). Each sample spans at least a round trip and counts what SACKs report
    /// delivered, so over a lossy path it reads the bottleneck where [`Self::goodput_bps`]
    /// (cumulative ACKs, held back by every hole until it is repaired) reads low: 148 against
    /// 197 Mbit/s on a full 200 Mbit/s link at 1% loss.
    pub fn delivery_bps(&self) -> Option<f64> {
        let d: f64 = self.streams.iter().filter(|s| s.active).map(|s| s.delivery_bps as f64).sum();
        (d > 0.0).then_some(d)
    }

    /// What the controllers take as delivered: [`Self::delivery_bps`], or the goodput where the
    /// streams have no delivery-rate samples.
    pub fn delivered_bps(&self) -> f64 {
        self.delivery_bps().unwrap_or_else(|| self.goodput_bps())
    }

    /// Segments retransmitted over all streams this interval.
    pub fn retrans(&self) -> u64 {
        self.streams.iter().map(|s| u64::from(s.retrans)).sum()
    }

    /// Streams taking new chunks.
    pub fn active(&self) -> usize {
        self.streams.iter().filter(|s| s.active).count()
    }
}

/// A controller's decision for the next interval.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Decision {
    /// Aggregate pacing rate in bit/s, shared evenly by the active streams (None: uncapped).
    pub pacing_bps: Option<f64>,
    /// Streams to keep active (None: no change).
    pub streams: Option<u16>,
    /// The kernel's least RTT is implausible ([`acp::RttBase`]): the streams' windows should
    /// follow this pace (the rate congestion control) rather than their own RTT model.
    pub pace_windows: bool,
}
