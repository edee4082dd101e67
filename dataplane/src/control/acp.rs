//! Adaptive congestion prevention: per interval, from the streams' RTTs, windows, retransmits
//! and acknowledged bytes, an aggregate pacing rate (split evenly over the active streams and
//! applied as `SO_MAX_PACING_RATE`) and stream-count changes. The aim is the link's rate with
//! the RTT within 1.25x of its minimum: pace before the queue fills, not after loss.
//!
//! The streams' own congestion control runs underneath (BBR by default under ACP, so random loss
//! does not collapse the window); ACP caps it. Two controllers:
//! - [`Delay`]: queue-delay targeting (Vegas/Copa family): once per round trip the pace is what
//!   the last round trips delivered (the kernel's delivery-rate samples, which count what SACKs
//!   report: cumulative ACKs lag behind every hole of a lossy path), scaled by the queue's
//!   distance from a target of 1.12x the least RTT (12% above with no queue, below when the
//!   queue passes the target).
//! - [`BbrModel`]: a model of BBR's probing on the aggregate: a windowed maximum of delivered
//!   rate, startup until it stops growing, a drain, then gain cycling (1.25, 0.75, 1 x 6).

use std::collections::VecDeque;

use super::{Decision, Observation};

/// A controller.
pub trait Acp: Send + std::fmt::Debug {
    /// Short name (`delay`, `bbr-model`).
    fn name(&self) -> &'static str;
    /// Decides the next interval from this one.
    fn on_interval(&mut self, o: &Observation<'_>) -> Decision;
    /// The least RTT it measures queueing against, µs ([`RttBase`]; None before any).
    fn base_us(&self) -> Option<f64>;
}

/// Which controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AcpKind {
    /// No pacing: the streams' congestion control alone.
    Off,
    /// [`Delay`].
    #[default]
    Delay,
    /// [`BbrModel`].
    BbrModel,
}

impl AcpKind {
    /// Parses `off`, `delay`, `bbr-model`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "off" => Some(Self::Off),
            "delay" => Some(Self::Delay),
            "bbr-model" => Some(Self::BbrModel),
            _ => None,
        }
    }

    /// The controller (None for `Off`).
    pub fn build(self, max_streams: u16) -> Option<Box<dyn Acp>> {
        match self {
            Self::Off => None,
            Self::Delay => Some(Box::new(Windowed::new(Delay::new(max_streams)))),
            Self::BbrModel => Some(Box::new(Windowed::new(BbrModel::new(max_streams)))),
        }
    }

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Delay => "delay",
            Self::BbrModel => "bbr-model",
        }
    }
}

/// RTT inflation over the minimum that ACP keeps below.
pub const TARGET_INFLATION: f64 = 1.25;
/// The inflation the delay controller steers the queue to.
const QUEUE_TARGET: f64 = 1.12;
/// Inflation under which the queue counts as empty.
const EMPTY_QUEUE: f64 = 1.10;
/// The least pace, bit/s.
const MIN_RATE: f64 = 1e6;

/// Startup as both controllers do it: uncapped until the delivered rate stops growing by 25% for
/// three intervals, or the queue starts to build. What it then reports as the path's rate is
/// the most the kernel's delivery-rate samples read over the last intervals (goodput where there
/// are none): when startup ends on a queue the link is full, and the samples say at what rate,
/// where the cumulative ACKs of a lossy path lag (at 1% loss they read 134 of 200 Mbit/s, and
/// the pace set from them held the link half empty for half a second).
///
/// The queue is judged against the path's own inflation ([`Startup::noise`]; after startup too,
/// by [`Delay`]): a few milliseconds of jitter on a 50 ms path read 1.22-1.25 against the least
/// RTT, the jitter's low edge, before any queue; startup then ended at its first round trip and
/// the pace hovered at its floor, 0.4 of the link, for seconds.
#[derive(Debug, Clone, Default)]
struct Startup {
    best: f64,
    stalls: u32,
    recent: VecDeque<f64>,
    /// Each interval's delivery and inflation (the first [`NOISE_SAMPLES`]).
    early: Vec<(f64, f64)>,
}

/// Startup intervals kept to judge the path's noise by.
const NOISE_SAMPLES: usize = 32;

impl Startup {
    /// The path's own inflation: the least over the intervals that delivered half the best so
    /// far or less (the link was not full then, so nothing queued); 1 without such intervals.
    /// At most [`MAX_NOISE`].
    fn noise(&self) -> f64 {
        let least = self.early.iter().filter(|e| e.0 <= 0.5 * self.best).map(|e| e.1).fold(f64::INFINITY, f64::min);
        if least.is_finite() { least.clamp(1.0, MAX_NOISE) } else { 1.0 }
    }

    /// Feeds an interval; returns the best recent rate once startup is over.
    fn step(&mut self, g: f64, delivery: Option<f64>, inflation: f64) -> Option<f64> {
        if self.early.len() < NOISE_SAMPLES {
            self.early.push((g, inflation));
        }
        self.recent.push_back(delivery.unwrap_or(g));
        if self.recent.len() > 4 {
            self.recent.pop_front();
        }
        if g >= 1.25 * self.best {
            self.best = g;
            self.stalls = 0;
        } else {
            self.stalls += 1;
        }
        // The first interval has nothing to judge its inflation against.
        let queue = self.early.len() > 1 && inflation / self.noise() > TARGET_INFLATION;
        (self.stalls >= 3 || queue).then(|| self.recent.iter().copied().fold(0.0, f64::max))
    }
}

/// Adds a stream when the pace is not what limits (the streams' windows are): the queue empty,
/// the pace above the goodput, and the goodput not growing, for three round trips in a row.
/// More windows then fill the link.
#[derive(Debug, Clone)]
struct StreamRule {
    max: u16,
    under: u32,
    first: f64,
}

impl StreamRule {
    fn new(max: u16) -> Self {
        Self { max, under: 0, first: 0.0 }
    }

    fn step(&mut self, o: &Observation<'_>, pace: Option<f64>, inflation: f64) -> Option<u16> {
        let active = o.active() as u16;
        let g = o.goodput_bps();
        let limited = pace.is_some_and(|p| g < 0.95 * p) && inflation < EMPTY_QUEUE;
        if !limited {
            self.under = 0;
            return None;
        }
        if self.under == 0 {
            self.first = g;
        }
        self.under += 1;
        if self.under >= 3 {
            self.under = 0;
            if g < 1.05 * self.first && active < self.max && active > 0 {
                return Some(active + 1);
            }
        }
        None
    }
}

/// Queueing below this (µs) is host scheduling, not a link queue worth pacing for: on a
/// sub-millisecond path the RTT's ratio to its minimum means nothing, and on a busy host (guests
/// and a userspace link emulator sharing two cores) ACKs arrive milliseconds late whatever the
/// rate. A live migration over the 2 ms rig link showed a steady 2 ms of such delay at any pace:
/// with a 2 ms floor ACP read it as a standing queue and paced the transfer down round after
/// round (from 145 to a few Mbit/s, with QEMU never converging); BBR in the streams deals with
/// queues this short anyway.
const RTT_FLOOR_US: f64 = 10_000.0;

/// Seconds of data before [`RttBase`] judges the kernel's least RTT.
const JUDGE_AFTER_S: f64 = 1.0;
/// The kernel's least RTT is implausible below this share of the least smoothed RTT.
const IMPLAUSIBLE: f64 = 0.25;

/// The least RTT ACP measures queueing against: the kernel's (the least of the streams'
/// windowed minima), unless it is implausible. A path that delivers a few packets far sooner
/// than the rest (netem-style reordering, where a reordered packet skips the delay; some
/// multipath links) hands the kernel RTT samples of a fraction of the real one: on the WAN rig
/// at 50 ms with 1% reordering, 0.1-4 ms. Against such a minimum every RTT looks like a queue of
/// ten round trips, and under BBR, whose window is two of its bandwidth estimate times that
/// minimum, the transfer collapses to a few percent of the link. So once the kernel's minimum
/// falls below a quarter of the least smoothed RTT seen (an average, which a rare early packet
/// barely moves) on a path of 10 ms or more, the least smoothed RTT is the base, and the
/// decision says the streams' windows should follow the pace ([`Decision::pace_windows`]).
/// Smoothed RTTs are taken over an interval's acknowledgements, so their least is the path's
/// RTT plus whatever queue never drained; a real path's minimum is not four times below it.
#[derive(Debug, Clone)]
pub struct RttBase {
    kernel_us: f64,
    srtt_floor_us: f64,
    seen_s: f64,
    implausible: bool,
}

impl Default for RttBase {
    fn default() -> Self {
        Self { kernel_us: f64::INFINITY, srtt_floor_us: f64::INFINITY, seen_s: 0.0, implausible: false }
    }
}

impl RttBase {
    /// Takes an interval; returns the RTT's inflation over the base (the base floored at
    /// [`RTT_FLOOR_US`]), None before any RTT was measured.
    pub fn inflation(&mut self, o: &Observation<'_>) -> Option<f64> {
        if let Some(m) = o.min_rtt_us() {
            self.kernel_us = self.kernel_us.min(m);
        }
        let srtt = o.srtt_us()?;
        self.srtt_floor_us = self.srtt_floor_us.min(srtt);
        self.seen_s += o.dt;
        if !self.implausible && self.seen_s >= JUDGE_AFTER_S && self.srtt_floor_us >= RTT_FLOOR_US && self.kernel_us < IMPLAUSIBLE * self.srtt_floor_us {
            self.implausible = true;
        }
        let base = if self.implausible { self.srtt_floor_us } else { self.kernel_us };
        base.is_finite().then(|| srtt / base.max(RTT_FLOOR_US))
    }

    /// Whether the kernel's least RTT was found implausible.
    pub fn implausible(&self) -> bool {
        self.implausible
    }

    /// The base, µs (None before any RTT).
    pub fn base_us(&self) -> Option<f64> {
        let b = if self.implausible { self.srtt_floor_us } else { self.kernel_us };
        b.is_finite().then_some(b)
    }
}

/// What the last [`BW_WINDOW`] periods delivered, bit/s each.
#[derive(Debug, Clone, Default)]
struct Delivered(VecDeque<f64>);

impl Delivered {
    fn push(&mut self, g: f64) {
        self.0.push_back(g);
        if self.0.len() > BW_WINDOW {
            self.0.pop_front();
        }
    }

    /// The most of the window (at least [`MIN_RATE`]).
    fn max(&self) -> f64 {
        self.0.iter().copied().fold(MIN_RATE, f64::max)
    }

    /// The mean of the last `n` periods (at least [`MIN_RATE`]).
    fn mean_last(&self, n: usize) -> f64 {
        let n = self.0.len().min(n);
        if n == 0 {
            return MIN_RATE;
        }
        (self.0.iter().rev().take(n).sum::<f64>() / n as f64).max(MIN_RATE)
    }
}

/// Queue-delay targeting. See the module documentation.
#[derive(Debug, Clone)]
pub struct Delay {
    base: RttBase,
    startup: Option<Startup>,
    /// Periods left draining the queue startup built (pace at 0.75 of the best rate seen).
    drain: u32,
    bw: Delivered,
    rate: f64,
    streams: StreamRule,
    /// Round trips in a row with a queue above target.
    queued: u32,
    /// The most delivered in a period since the queue was last empty.
    peak: f64,
    /// The queue is not ours: it stood through [`COMPETE_AFTER`] round trips of backing off.
    /// Round trips spent so in the current cycle, and the cycle's length.
    competing: Option<(u32, u32)>,
    /// The RTT's inflation with no queue, as startup measured it ([`Startup::noise`]: 1 on a
    /// smooth path, 1.22-1.25 at 50 ms with 5 ms of jitter).
    noise: f64,
}

/// The most of an RTT's inflation taken for the path's own noise rather than a queue.
const MAX_NOISE: f64 = 1.5;

/// Round trips between the first two tests of whether a standing queue is still another's.
const COMPETE_CYCLE: u32 = 18;
/// The longest such cycle (each test the queue survives doubles it).
const COMPETE_CYCLE_MAX: u32 = 8 * COMPETE_CYCLE;

/// Round trips a queue must stand through our backing off before it counts as another flow's.
const COMPETE_AFTER: u32 = 6;

impl Delay {
    /// A controller that may activate up to `max_streams` streams.
    pub fn new(max_streams: u16) -> Self {
        Self {
            base: RttBase::default(),
            startup: Some(Startup::default()),
            drain: 0,
            bw: Delivered::default(),
            rate: 0.0,
            streams: StreamRule::new(max_streams),
            queued: 0,
            peak: 0.0,
            competing: None,
            noise: 1.0,
        }
    }
}

impl Acp for Delay {
    fn name(&self) -> &'static str {
        "delay"
    }

    fn base_us(&self) -> Option<f64> {
        self.base.base_us()
    }

    fn on_interval(&mut self, o: &Observation<'_>) -> Decision {
        let d = self.decide(o);
        Decision { pace_windows: self.base.implausible(), ..d }
    }
}

impl Delay {
    fn decide(&mut self, o: &Observation<'_>) -> Decision {
        let g = o.delivered_bps();
        let was = self.base.implausible();
        let Some(q) = self.base.inflation(o) else {
            return Decision { pacing_bps: (self.startup.is_none()).then_some(self.rate), ..Decision::default() };
        };
        if self.base.implausible() && !was {
            // Whatever was decided against the implausible minimum (an early end of startup, a
            // queue taken for another flow's) is void: start again from what gets through.
            *self = Self { base: self.base.clone(), bw: self.bw.clone(), ..Self::new(self.streams.max) };
        }
        self.bw.push(g);
        if let Some(s) = &mut self.startup {
            match s.step(g, o.delivery_bps(), q) {
                // Startup overshoots: drain what it queued, then pace at what got through.
                Some(best) => {
                    self.rate = best.max(MIN_RATE);
                    self.noise = s.noise();
                    self.startup = None;
                    self.drain = 3;
                }
                // Windows that follow the pace do not grow by themselves: startup doubles the
                // pace each round trip instead, from the most delivered lately.
                None if self.base.implausible() => return Decision { pacing_bps: Some(2.0 * self.bw.max()), ..Decision::default() },
                None => return Decision::default(),
            }
        }
        // From here the queue is judged against the inflation the path showed with none.
        let q = q / self.noise;
        if self.drain > 0 {
            self.drain = if q <= TARGET_INFLATION { 0 } else { self.drain - 1 };
            if self.drain > 0 {
                return Decision { pacing_bps: Some(0.75 * self.rate), ..Decision::default() };
            }
        }
        // Proportional to the queue's distance from its target: at the target inflation the pace
        // is what the last round trips delivered; with no queue 12% above it (probing), with a
        // queue of 0.25 RTT 13% below (draining). One round trip later the queue tells again.
        // Without a queue the pace never drops: less delivered then means less offered (the
        // transfer's tail, a parked stream), and pacing the rest slower would only stretch it.
        //
        // A queue that stands through several round trips of backing off is not ours but a
        // competing flow's (a loss-based or BBR sender fills any queue it finds): yielding more
        // would only starve us (Copa's competitive mode answers the same). Then ACP lifts its
        // pace and the streams' own BBR competes as it would alone. After 16 round trips it backs
        // off to half for two: if the queue then drains, it was ours, and pacing resumes. Each
        // test the queue survives doubles the time to the next (up to 8x): a delay that never
        // drains (jitter of a few milliseconds reads as a standing queue against the jitter's
        // least RTT) would otherwise cost two round trips at half rate in every eighteen, about
        // 6% of the link (measured: 0.83 against BBR's 0.88 at 1 Gbit/s, 50 ms, 5 ms jitter).
        let recent = self.bw.mean_last(4);
        // Lifting the pace means leaving the rate to the streams' own congestion control; when
        // their windows follow the pace (the kernel's least RTT is implausible) it is lifted to
        // a quarter above what got through instead, which probes as BBR's gain does.
        let lifted = Decision { pacing_bps: self.base.implausible().then_some(1.25 * recent), ..Decision::default() };
        if let Some((n, cycle)) = self.competing {
            let n = n + 1;
            self.competing = Some((n % cycle, cycle));
            match n {
                n if n == cycle - 2 => return Decision { pacing_bps: Some(0.5 * recent), ..Decision::default() },
                n if n == cycle - 1 && q <= TARGET_INFLATION => {
                    self.competing = None;
                    self.queued = 0;
                    self.rate = recent;
                }
                n if n == cycle - 1 => {
                    self.competing = Some((0, (2 * cycle).min(COMPETE_CYCLE_MAX)));
                    return Decision { pacing_bps: Some(0.5 * recent), ..Decision::default() };
                }
                _ => return lifted,
            }
        }
        // Over the same round trips as the pace: one round trip's ACKs can arrive bunched (a
        // startup burst acknowledged late read 1.2 Gbit/s on a 1 Gbit/s link), and half of such a
        // peak held the pace where a standing queue needed it to back off: the queue, then
        // counted as another flow's, was partly its own.
        self.peak = if q <= EMPTY_QUEUE { recent } else { self.peak.max(recent) };
        self.queued = if q > TARGET_INFLATION { self.queued + 1 } else { 0 };
        if self.queued >= COMPETE_AFTER {
            self.competing = Some((0, COMPETE_CYCLE));
            return lifted;
        }
        let factor = (1.0 + (QUEUE_TARGET - q)).clamp(0.8, 1.15);
        // Backing off never goes below half of the most the path delivered since the queue was
        // last empty: a delay the pace does not cause (noise, another flow) must not ratchet it
        // down to nothing, one round trip at a time.
        //
        // When the streams' windows follow the pace, nothing else probes: the path delivers what
        // is paced and no more, so the last round trips' delivery trails a rising pace and
        // scaling it by at most 15% never overtakes the pace. Then, while the queue is empty and
        // the path delivered most of the pace, the pace itself is scaled.
        let from = if self.base.implausible() && q <= EMPTY_QUEUE && g >= 0.8 * self.rate { self.rate.max(recent) } else { recent };
        let next = (from * factor).max(0.5 * self.peak).max(MIN_RATE);
        self.rate = if q > QUEUE_TARGET { next } else { next.max(self.rate) };
        let streams = self.streams.step(o, Some(self.rate), q);
        Decision { pacing_bps: Some(self.rate), streams, ..Decision::default() }
    }
}

/// Runs a controller once per round trip (at least once per 100 ms interval... and no more):
/// it sums the monitor's intervals until they cover the least RTT, so that goodput and RTT are
/// measured over a whole window of ACKs, not over a fraction of one.
#[derive(Debug, Clone)]
pub struct Windowed<A> {
    inner: A,
    acc: Vec<super::StreamSample>,
    dt: f64,
    last: Decision,
    min_rtt_s: f64,
}

impl<A: Acp> Windowed<A> {
    /// Wraps `inner`.
    pub fn new(inner: A) -> Self {
        Self { inner, acc: Vec::new(), dt: 0.0, last: Decision::default(), min_rtt_s: f64::INFINITY }
    }
}

impl<A: Acp> Acp for Windowed<A> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn base_us(&self) -> Option<f64> {
        self.inner.base_us()
    }

    fn on_interval(&mut self, o: &Observation<'_>) -> Decision {
        if let Some(m) = o.min_rtt_us() {
            self.min_rtt_s = self.min_rtt_s.min(m / 1e6);
        }
        if self.acc.len() != o.streams.len() {
            self.acc = vec![super::StreamSample::default(); o.streams.len()];
        }
        for (a, s) in self.acc.iter_mut().zip(o.streams) {
            // RTTs weighted by the bytes each interval carried; counters summed; state: latest.
            let w = a.acked as f64 + s.acked as f64;
            if s.srtt_us > 0 {
                a.srtt_us = if a.srtt_us == 0 || w == 0.0 { s.srtt_us } else { ((a.acked as f64 * f64::from(a.srtt_us) + s.acked as f64 * f64::from(s.srtt_us)) / w) as u32 };
            }
            a.acked += s.acked;
            a.retrans += s.retrans;
            a.min_rtt_us = s.min_rtt_us;
            a.cwnd = s.cwnd;
            a.mss = s.mss;
            a.delivery_bps = s.delivery_bps;
            a.active = s.active;
        }
        self.dt += o.dt;
        let period = if self.min_rtt_s.is_finite() { self.min_rtt_s.max(o.dt * 0.99) } else { o.dt };
        if self.dt + 1e-9 < period {
            return self.last;
        }
        let acc = std::mem::take(&mut self.acc);
        let whole = Observation { t: o.t, dt: self.dt, streams: &acc };
        self.last = self.inner.on_interval(&whole);
        self.dt = 0.0;
        self.last
    }
}

/// Gain cycle of BBR's ProbeBW phase.
const GAINS: [f64; 8] = [1.25, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0];
/// Periods (round trips) the bandwidth maximum is taken over.
const BW_WINDOW: usize = 10;

#[derive(Debug, Clone)]
enum Phase {
    Startup(Startup),
    Drain(u32),
    ProbeBw(usize),
}

/// A model of BBR's probing on the aggregate. See the module documentation.
#[derive(Debug, Clone)]
pub struct BbrModel {
    base: RttBase,
    bw: Delivered,
    phase: Phase,
    streams: StreamRule,
}

impl BbrModel {
    /// A controller that may activate up to `max_streams` streams.
    pub fn new(max_streams: u16) -> Self {
        Self { base: RttBase::default(), bw: Delivered::default(), phase: Phase::Startup(Startup::default()), streams: StreamRule::new(max_streams) }
    }
}

impl Acp for BbrModel {
    fn name(&self) -> &'static str {
        "bbr-model"
    }

    fn base_us(&self) -> Option<f64> {
        self.base.base_us()
    }

    fn on_interval(&mut self, o: &Observation<'_>) -> Decision {
        // Goodput, not the delivery-rate samples Delay uses: the maximum filter below needs the
        // bursts' peaks to probe with (on delivery-rate samples it held 0.91 of the 1 Gbit/s rig
        // link against 0.94 on goodput).
        let g = o.goodput_bps();
        let Some(q) = self.base.inflation(o) else {
            return Decision::default();
        };
        // As BBR discards application-limited samples: a period far under the estimate without
        // a queue says the sender had less to send, not that the path got slower.
        if !(g < 0.5 * self.bw.max() && q < EMPTY_QUEUE) {
            self.bw.push(g);
        }
        let gain = match &mut self.phase {
            Phase::Startup(s) => match s.step(g, o.delivery_bps(), q) {
                Some(best) => {
                    self.bw.push(best);
                    self.phase = Phase::Drain(0);
                    0.75
                }
                None => return Decision::default(),
            },
            Phase::Drain(n) => {
                *n += 1;
                if q <= TARGET_INFLATION || *n >= 3 {
                    self.phase = Phase::ProbeBw(0);
                    GAINS[0]
                } else {
                    0.75
                }
            }
            Phase::ProbeBw(i) => {
                *i = (*i + 1) % GAINS.len();
                // A standing queue cuts the cycle short to its draining phase.
                if q > TARGET_INFLATION && GAINS[*i] >= 1.0 {
                    *i = 1;
                }
                GAINS[*i]
            }
        };
        let rate = gain * self.bw.max();
        let streams = self.streams.step(o, Some(rate), q);
        Decision { pacing_bps: Some(rate), streams, pace_windows: self.base.implausible() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::StreamSample;

    /// A fluid model of one bottleneck with a drop-tail queue of one BDP, fed by `n` paced
    /// streams whose own windows would fill it (the role BBR plays underneath).
    struct Bottleneck {
        link_bps: f64,
        min_rtt_s: f64,
        queue_bits: f64,
    }

    impl Bottleneck {
        /// One interval at aggregate pace `pace` (None: as fast as 1.5x the link).
        fn step(&mut self, pace: Option<f64>, dt: f64, n: usize) -> Vec<StreamSample> {
            let offered = pace.unwrap_or(1.5 * self.link_bps).min(1.5 * self.link_bps);
            let cap = self.link_bps * self.min_rtt_s;
            self.queue_bits = (self.queue_bits + (offered - self.link_bps) * dt).clamp(0.0, cap);
            let delivered = offered.min(self.link_bps) * dt;
            let srtt = self.min_rtt_s + self.queue_bits / self.link_bps;
            (0..n)
                .map(|_| StreamSample {
                    srtt_us: (srtt * 1e6) as u32,
                    min_rtt_us: (self.min_rtt_s * 1e6) as u32,
                    acked: (delivered / 8.0 / n as f64) as u64,
                    active: true,
                    cwnd: 100,
                    mss: 1448,
                    ..Default::default()
                })
                .collect()
        }
    }

    /// Runs a controller for `secs` on the model; returns (mean utilization, mean inflation) over
    /// the second half.
    fn run(mut c: Box<dyn Acp>, link_bps: f64, rtt: f64, secs: f64) -> (f64, f64) {
        let mut b = Bottleneck { link_bps, min_rtt_s: rtt, queue_bits: 0.0 };
        let dt = 0.1;
        let mut pace = None;
        let (mut util, mut infl, mut k) = (0.0, 0.0, 0);
        let steps = (secs / dt) as usize;
        for i in 0..steps {
            let s = b.step(pace, dt, 8);
            let o = Observation { t: i as f64 * dt, dt, streams: &s };
            pace = c.on_interval(&o).pacing_bps;
            if i >= steps / 2 {
                util += o.goodput_bps() / link_bps;
                infl += o.srtt_us().unwrap() / (rtt * 1e6);
                k += 1;
            }
        }
        (util / k as f64, infl / k as f64)
    }

    #[test]
    fn both_controllers_fill_the_link_without_a_standing_queue() {
        for kind in [AcpKind::Delay, AcpKind::BbrModel] {
            for (link, rtt) in [(1e9, 0.05), (2e8, 0.15)] {
                let (u, q) = run(kind.build(8).unwrap(), link, rtt, 30.0);
                assert!(u >= 0.9, "{kind:?} at {link} bit/s, {rtt} s: utilization {u:.3}");
                assert!(q <= TARGET_INFLATION, "{kind:?} at {link} bit/s, {rtt} s: inflation {q:.3}");
            }
        }
    }

    #[test]
    fn delay_is_not_starved_by_a_flow_that_keeps_the_queue_full() {
        // A competitor offering 90% of the link whatever the queue (as cubic or BBR would while it
        // has window): a pure delay controller would back off to the 10% it leaves.
        let (link, rtt, dt) = (1e9, 0.05, 0.1);
        let mut c = Windowed::new(Delay::new(8));
        let (mut queue, mut pace): (f64, Option<f64>) = (0.0, None);
        let mut ours = Vec::new();
        for i in 0..300 {
            let mine = pace.unwrap_or(1.5 * link).min(1.5 * link);
            let comp = 0.9 * link;
            let cap = link * rtt;
            queue = (queue + (mine + comp - link) * dt).clamp(0.0, cap);
            // The link is shared in proportion to what each offers once it is full.
            let got = if mine + comp > link { link * mine / (mine + comp) } else { mine };
            let srtt = rtt + queue / link;
            let s = vec![StreamSample { srtt_us: (srtt * 1e6) as u32, min_rtt_us: (rtt * 1e6) as u32, acked: (got * dt / 8.0) as u64, active: true, ..Default::default() }];
            pace = c.on_interval(&Observation { t: f64::from(i) * dt, dt, streams: &s }).pacing_bps;
            if i >= 150 {
                ours.push(got / link);
            }
        }
        let share = ours.iter().sum::<f64>() / ours.len() as f64;
        assert!(share >= 0.35, "starved: {share:.3} of the link against a queue-filling flow");
    }

    #[test]
    fn a_bunched_round_trip_does_not_hold_the_pace_over_a_standing_queue() {
        // One round trip whose ACKs arrive bunched reads above the link; the queue then stands.
        // Backing off must not stop at half of that one reading (it did: the pace stayed at 0.6
        // Gbit/s for six round trips, and the queue, partly its own, was taken for a competitor's).
        let mut c = Delay::new(8);
        let sample = |srtt: u32, bps: f64| vec![StreamSample { srtt_us: srtt, min_rtt_us: 50_000, acked: (bps / 8.0 * 0.1) as u64, active: true, ..Default::default() }];
        // Startup's first round trip: no queue yet.
        assert_eq!(c.on_interval(&Observation { t: 0.0, dt: 0.1, streams: &sample(50_500, 0.5e9) }).pacing_bps, None);
        let mut step = |srtt, bps| c.on_interval(&Observation { t: 0.0, dt: 0.1, streams: &sample(srtt, bps) }).pacing_bps.unwrap();
        step(70_000, 1e9); // startup ends on a queue
        step(51_000, 0.6e9); // drained
        step(51_000, 1.2e9); // the bunched round trip
        let mut pace = 0.0;
        for _ in 0..5 {
            pace = step(75_000, 0.5e9);
        }
        assert!(pace < 0.5e9, "the pace stayed at {pace:.3e} through five round trips of a standing queue");
    }

    #[test]
    fn startup_on_a_lossy_path_ends_at_the_rate_the_delivery_samples_read() {
        // A full 200 Mbit/s link at 1% loss: cumulative ACKs, held back by the holes, read 134
        // Mbit/s; the kernel's delivery-rate samples read the link. The drain paces at 0.75 of
        // the latter (it paced at 0.75 of the former, and the link stood half empty).
        let mut c = Delay::new(8);
        let s = |srtt: u32| {
            (0..4)
                .map(|_| StreamSample {
                    srtt_us: srtt,
                    min_rtt_us: 150_000,
                    acked: (134e6 / 4.0 / 8.0 * 0.15) as u64,
                    delivery_bps: 197_000_000 / 4,
                    active: true,
                    ..Default::default()
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(c.on_interval(&Observation { t: 0.15, dt: 0.15, streams: &s(151_000) }).pacing_bps, None, "startup is uncapped");
        let d = c.on_interval(&Observation { t: 0.3, dt: 0.15, streams: &s(200_000) }).pacing_bps.unwrap();
        assert!((d - 0.75 * 197e6).abs() < 1e3, "{d:.4e}");
    }

    #[test]
    fn uncapped_streams_fill_the_queue() {
        // The model itself: without a controller the queue stands full (inflation 2), which is
        // what the controllers are tested to prevent.
        let mut b = Bottleneck { link_bps: 1e9, min_rtt_s: 0.05, queue_bits: 0.0 };
        let s = (0..50).map(|_| b.step(None, 0.1, 4)).last().unwrap();
        assert!(f64::from(s[0].srtt_us) / 50_000.0 > 1.9);
    }

    #[test]
    fn delay_drains_startup_then_backs_off_on_inflation_and_probes_when_empty() {
        let mut c = Delay::new(8);
        let sample = |srtt: u32, bps: f64| vec![StreamSample { srtt_us: srtt, min_rtt_us: 50_000, acked: (bps / 8.0 * 0.1) as u64, active: true, ..Default::default() }];
        // Startup's first round trip: no queue yet.
        assert_eq!(c.on_interval(&Observation { t: 0.0, dt: 0.1, streams: &sample(50_500, 0.5e9) }).pacing_bps, None);
        let mut step = |srtt, bps| c.on_interval(&Observation { t: 0.0, dt: 0.1, streams: &sample(srtt, bps) }).pacing_bps.unwrap();
        // Startup ends on a queue: drain at 0.75 of the best rate while the queue stands.
        assert!((step(70_000, 1e9) - 0.75e9).abs() < 1.0);
        assert!((step(80_000, 0.9e9) - 0.75e9).abs() < 1.0);
        // Queue gone: 12% over what the last four round trips delivered.
        let r = step(51_000, 0.95e9);
        // (Without a queue the pace never drops below the rate startup ended at.)
        let recent: f64 = (0.5e9 + 1e9 + 0.9e9 + 0.95e9) / 4.0;
        assert!((r - (recent * (1.0 + 1.12 - 1.02)).max(1e9)).abs() < 1e3, "{r}");
        // A queue of 0.6 RTT: 20% under (the floor of the factor).
        let r2 = step(80_000, 1.0e9);
        let recent = (1e9 + 0.9e9 + 0.95e9 + 1e9) / 4.0;
        assert!((r2 - 0.8 * recent).abs() < 1e3, "{r2}");
    }

    #[test]
    fn windowed_decides_once_per_round_trip() {
        let mut w = Windowed::new(Delay::new(8));
        let s = vec![StreamSample { srtt_us: 150_500, min_rtt_us: 150_000, acked: 1_000_000, active: true, ..Default::default() }];
        let mut decided = 0;
        let mut last = None;
        for i in 0..30 {
            let d = w.on_interval(&Observation { t: f64::from(i) * 0.1, dt: 0.1, streams: &s });
            if Some(d) != last {
                decided += 1;
                last = Some(d);
            }
        }
        // 3 s of 100 ms intervals on a 150 ms path: decisions every second interval at most.
        assert!(decided <= 15, "{decided}");
    }

    #[test]
    fn the_pace_holds_when_the_offered_load_falls_without_a_queue() {
        let mut c = Delay::new(8);
        let mut step = |bps: f64| {
            let s = vec![StreamSample { srtt_us: 50_500, min_rtt_us: 50_000, acked: (bps / 8.0 * 0.1) as u64, active: true, ..Default::default() }];
            c.on_interval(&Observation { t: 0.0, dt: 0.1, streams: &s }).pacing_bps
        };
        for _ in 0..6 {
            step(9e8);
        }
        let before = step(9e8).unwrap();
        for _ in 0..10 {
            step(1e6);
        }
        assert!(step(1e6).unwrap() >= before, "the tail of a transfer was paced down");
    }

    /// Feeds `Delay` a path of `link` bit/s whose RTT is `srtt(i)` whatever the pace (a delay ACP
    /// does not cause); the transfer offers as much as the pace allows. Returns the paces.
    fn paced_against_foreign_delay(link: f64, min_rtt_us: u32, srtt: impl Fn(u32) -> u32) -> Vec<f64> {
        let mut c = Delay::new(2);
        let mut pace = f64::INFINITY;
        let mut out = Vec::new();
        for i in 0..200 {
            let got = pace.min(link);
            let s: Vec<_> = (0..2).map(|_| StreamSample { srtt_us: srtt(i), min_rtt_us, acked: (got * 0.1 / 8.0 / 2.0) as u64, active: true, ..Default::default() }).collect();
            pace = c.on_interval(&Observation { t: f64::from(i) * 0.1, dt: 0.1, streams: &s }).pacing_bps.unwrap_or(f64::INFINITY);
            out.push(pace);
        }
        out
    }

    #[test]
    fn a_few_milliseconds_of_host_delay_on_a_short_path_is_no_queue() {
        // The 2 ms rig link on a busy host: ACKs 2 ms late at any rate.
        let p = paced_against_foreign_delay(200e6, 2000, |_| 4000);
        assert!(p[100..].iter().all(|&x| x >= 0.9 * 200e6), "paced down: {:?}", &p[95..105]);
    }

    #[test]
    fn a_noisy_delay_never_ratchets_the_pace_to_nothing() {
        // 50 ms path, srtt flickering about the limit (never a run long enough for competitive
        // mode): the pace backs off, but not below half of what the path delivered lately.
        let p = paced_against_foreign_delay(200e6, 50_000, |i| if i % 3 == 0 { 60_000 } else { 66_000 });
        let least = p[20..].iter().copied().fold(f64::INFINITY, f64::min);
        assert!(least >= 0.4 * 200e6, "collapsed to {least}");
    }

    #[test]
    fn an_implausible_least_rtt_hands_the_windows_to_the_pace_and_the_pace_finds_the_link() {
        // 1 Gbit/s, 50 ms, a queue of one BDP. From the sixth round trip the kernel's least RTT
        // reads 150 µs (reordered packets that skipped the delay); BBR's window, built on it,
        // then holds the streams to 5% of the link whatever the pace. Once the windows follow
        // the pace, the path takes what is paced, up to the link.
        let link = 1e9;
        let mut c = Windowed::new(Delay::new(8));
        let (mut queue_bits, mut pace, mut switched): (f64, Option<f64>, Option<u32>) = (0.0, None, None);
        let mut tail = Vec::new();
        for i in 0..100u32 {
            let offered = match switched {
                Some(_) => pace.expect("paced"),
                None => pace.unwrap_or(link).min(0.05 * link),
            };
            let got = offered.min(link);
            queue_bits = (queue_bits + (offered - link) * 0.1).clamp(0.0, link * 0.05);
            let srtt = 50_000.0 + queue_bits / link * 1e6;
            let min_rtt_us = if i < 5 { 48_000 } else { 150 };
            let s: Vec<_> = (0..8)
                .map(|_| StreamSample { srtt_us: srtt as u32, min_rtt_us, acked: (got * 0.1 / 8.0 / 8.0) as u64, delivery_bps: (got / 8.0) as u64, active: true, ..Default::default() })
                .collect();
            let d = c.on_interval(&Observation { t: f64::from(i) * 0.1, dt: 0.1, streams: &s });
            if d.pace_windows && switched.is_none() {
                switched = Some(i);
            }
            if switched.is_some() {
                assert!(d.pacing_bps.is_some(), "round trip {i}: uncapped, but the windows follow the pace");
            }
            pace = d.pacing_bps;
            if i >= 50 {
                tail.push((got, srtt));
            }
        }
        let at = switched.expect("the implausible least RTT was found");
        assert!(at <= 12, "found at round trip {at}");
        let util = tail.iter().map(|t| t.0).sum::<f64>() / tail.len() as f64 / link;
        let inflation = tail.iter().map(|t| t.1).sum::<f64>() / tail.len() as f64 / 50_000.0;
        assert!(util >= 0.85, "utilization {util:.3} over the last 5 s");
        assert!(inflation <= 1.3, "RTT inflation {inflation:.3} over the last 5 s");
        assert_eq!(c.base_us().map(|b| b.round()), Some(50_000.0), "the base is the least smoothed RTT");
    }

    #[test]
    fn a_short_path_or_a_plausible_least_rtt_keeps_the_kernels_minimum() {
        for (srtt, min) in [(40u32, 5u32), (2_000, 300), (50_500, 48_000), (60_000, 20_000)] {
            let mut b = RttBase::default();
            for i in 0..50 {
                let s = [StreamSample { srtt_us: srtt, min_rtt_us: min, acked: 1_000_000, active: true, ..Default::default() }];
                b.inflation(&Observation { t: f64::from(i) * 0.1, dt: 0.1, streams: &s });
            }
            assert!(!b.implausible(), "srtt {srtt} µs, least {min} µs");
            assert_eq!(b.base_us(), Some(f64::from(min)));
        }
    }

    #[test]
    fn jitter_from_the_first_round_trip_does_not_end_startup() {
        // 50 ms with 5 ms of jitter: the least RTT is the jitter's low edge (40 ms) and every
        // smoothed RTT reads 1.27 of it before any queue. Startup goes on while the rate grows,
        // and after it the pace is not held down by that inflation.
        let mut c = Delay::new(8);
        for (i, bps) in [0.1e9, 0.2e9, 0.4e9, 0.8e9].into_iter().enumerate() {
            let s = [StreamSample { srtt_us: 51_000, min_rtt_us: 40_000, acked: (bps * 0.1 / 8.0) as u64, active: true, ..Default::default() }];
            let d = c.on_interval(&Observation { t: i as f64 * 0.1, dt: 0.1, streams: &s });
            assert_eq!(d.pacing_bps, None, "round trip {i}: startup ended at {bps:.1e}");
        }
        // A queue on top of the jitter ends it.
        let s = [StreamSample { srtt_us: 70_000, min_rtt_us: 40_000, acked: (1e9 * 0.1 / 8.0) as u64, active: true, ..Default::default() }];
        assert!(c.on_interval(&Observation { t: 0.4, dt: 0.1, streams: &s }).pacing_bps.is_some());
        // With the queue drained back to the jitter alone, the pace probes upward.
        let mut last = 0.0;
        for i in 0..10 {
            let s = [StreamSample { srtt_us: 51_000, min_rtt_us: 40_000, acked: (0.9e9 * 0.1 / 8.0) as u64, active: true, ..Default::default() }];
            last = c.on_interval(&Observation { t: 0.5 + f64::from(i) * 0.1, dt: 0.1, streams: &s }).pacing_bps.expect("paced");
        }
        assert!(last > 0.9e9, "the pace stayed at {last:.3e} under the jitter's inflation");
    }

    #[test]
    fn a_delay_that_never_drains_is_tested_ever_less_often() {
        // A standing 1.4x that backing off never drains (jitter, or another flow for good): after
        // the first test at round trip 16 of competing, each failed test doubles the wait.
        let mut c = Delay::new(2);
        let mut backoffs = Vec::new();
        for i in 0..600u32 {
            let s = [StreamSample { srtt_us: 70_000, min_rtt_us: 50_000, acked: (0.5e9 * 0.1 / 8.0) as u64, active: true, ..Default::default() }];
            let d = c.on_interval(&Observation { t: f64::from(i) * 0.1, dt: 0.1, streams: &s });
            if c.competing.is_some() && d.pacing_bps.is_some() {
                backoffs.push(i);
            }
        }
        assert!(backoffs.len() >= 6 && backoffs.len() <= 12, "{} round trips backed off: {backoffs:?}", backoffs.len());
        let gaps: Vec<u32> = backoffs.windows(2).map(|w| w[1] - w[0]).filter(|&g| g > 1).collect();
        assert!(gaps.windows(2).all(|g| g[1] >= g[0]), "the waits between tests grow: {gaps:?}");
        assert!(gaps.last().is_some_and(|&g| g >= 100), "{gaps:?}");
    }

    #[test]
    fn a_loopback_rtt_is_no_queue() {
        // 40 µs over a 5 µs minimum is the scheduler, not a queue: the pace follows the goodput.
        let mut c = Delay::new(2);
        let mut pace = 0.0;
        for i in 0..20 {
            let s = vec![StreamSample { srtt_us: 40, min_rtt_us: 5, acked: 250_000_000, active: true, ..Default::default() }];
            pace = c.on_interval(&Observation { t: f64::from(i) * 0.1, dt: 0.1, streams: &s }).pacing_bps.unwrap_or(f64::INFINITY);
        }
        assert!(pace >= 20e9, "{pace}");
    }

    #[test]
    fn a_window_limited_path_gets_another_stream() {
        let mut c = Delay::new(4);
        let mut got = None;
        for i in 0..30 {
            // Two active streams, the queue empty, goodput far under any pace.
            let s: Vec<_> =
                (0..4).map(|k| StreamSample { srtt_us: 50_500, min_rtt_us: 50_000, acked: if k < 2 { 1_000_000 } else { 0 }, active: k < 2, ..Default::default() }).collect();
            let d = c.on_interval(&Observation { t: f64::from(i) * 0.1, dt: 0.1, streams: &s });
            if d.streams.is_some() {
                got = d.streams;
                break;
            }
        }
        assert_eq!(got, Some(3));
    }

    /// The recorded traces of `make bench-pba` (real transfers over the WAN rig with changing
    /// cross traffic), replayed through the delay controller as one stream per interval.
    fn recorded() -> Vec<Vec<crate::send::TraceRow>> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../benches/traces");
        (0..6)
            .map(|k| {
                let text = std::fs::read_to_string(dir.join(format!("pba-{k}.csv"))).expect("benches/traces (make bench-pba RECORD=1)");
                text.lines().filter_map(crate::send::TraceRow::parse).collect()
            })
            .collect()
    }

    #[test]
    fn delay_on_recorded_traces_keeps_its_rules() {
        for rows in recorded() {
            assert!(rows.len() > 100);
            let mut c = Delay::new(8);
            let mut prev: Option<f64> = None;
            let mut holds = 0;
            for r in &rows {
                let s = vec![StreamSample {
                    srtt_us: r.srtt_us as u32,
                    min_rtt_us: r.min_rtt_us as u32,
                    acked: (r.goodput_bps * r.dt / 8.0) as u64,
                    active: true,
                    ..Default::default()
                }];
                let o = Observation { t: r.t, dt: r.dt, streams: &s };
                let q = o.srtt_us().zip(o.min_rtt_us()).map(|(a, m)| a / m.max(RTT_FLOOR_US));
                let d = c.on_interval(&o);
                if let (Some(p), Some(now), Some(q)) = (prev, d.pacing_bps, q) {
                    assert!(now >= MIN_RATE && now.is_finite(), "{now}");
                    // Pacing (not startup, drain or competing) with no queue never lowers the pace.
                    if q <= QUEUE_TARGET && c.startup.is_none() && c.drain == 0 && c.competing.is_none() && now < p {
                        panic!("paced down from {p} to {now} with no queue (inflation {q:.3}) at t={}", r.t);
                    }
                    holds += u32::from(q <= QUEUE_TARGET);
                }
                prev = d.pacing_bps.or(prev);
            }
            assert!(holds > 0, "the trace never had an empty queue");
        }
    }

    #[test]
    fn pba_fits_the_recorded_traces() {
        use crate::control::pba;
        let series: Vec<Vec<f64>> = recorded().iter().map(|rows| rows.iter().map(|r| r.goodput_bps).filter(|&g| g > 0.0).collect()).collect();
        let (train, held) = series.split_at(3);
        let fitted = pba::fit(train);
        assert_eq!(fitted.len(), 4, "one per family");
        for p in &fitted {
            let m = pba::mean_mape(p.as_ref(), held);
            assert!(m.is_finite() && m > 0.0, "{}: {m}", p.name());
            // Fitting on the training traces never does worse there than the send default.
            if pba::family(&p.name()) == "ewma" {
                assert!(pba::mean_mape(p.as_ref(), train) <= pba::mean_mape(&pba::Ewma::new(pba::SEND_ALPHA), train) + 1e-9);
            }
        }
    }
}
