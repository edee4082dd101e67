//! The sender's monitor thread: every interval it samples each stream (eBPF probes, or
//! `TCP_INFO` when they cannot load), runs ACP and PBA on what it saw, applies their decisions
//! (per-stream `SO_MAX_PACING_RATE`, the active stream count, the predicted bandwidth that sets
//! HDE's effort), publishes srtt and retransmits for the mode controller, and records the
//! interval for `--trace-out`.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use super::Shared;
use crate::control::acp::AcpKind;
use crate::control::pba::{Ewma, Predictor, SecondInterval, StreamTrials};
use crate::control::{Observation, StreamSample};

/// Path control of a send.
#[derive(Debug, Clone)]
pub struct ControlOptions {
    /// The ACP controller (`Off`: the streams' congestion control alone).
    pub acp: AcpKind,
    /// Congestion control set on every stream (`bbr`, `cubic`; None: the system's default, or
    /// `bbr` under ACP).
    pub cc: Option<String>,
    /// Probes or polling.
    pub monitor: ebpf::Want,
    /// Control interval.
    pub interval: Duration,
    /// Where each interval's record goes as it ends (`--trace-out`).
    pub trace: Option<crossbeam_channel::Sender<TraceRow>>,
    /// The streams' first congestion window, bytes (None: the kernel's ten segments). Set by an
    /// eBPF sockops program before they connect ([`FIRST_WINDOW`] under ACP by default).
    pub initial_window: Option<u32>,
    /// The startup window's gain (None: none): while ACP is in its startup, each stream holds in
    /// flight at most this many times what it delivers per least RTT, so that the streams'
    /// BBR startup does not overflow the bottleneck's queue when the link fills
    /// ([`STARTUP_GAIN`] under ACP on BBR by default; the same sockops program, see
    /// `ebpf/src/bpf/initwin.bpf.c`). Lifted when ACP paces.
    pub startup_window: Option<f64>,
    /// PBA activates parked streams while the streams' buffers hold them back
    /// ([`crate::control::pba::StreamTrials`]); off when the user fixed the stream count.
    pub grow_streams: bool,
    /// PBA cuts the chunk size of a startup-bound object ([`crate::control::pba::chunk_size`]);
    /// off when the user gave one.
    pub cut_chunks: bool,
    /// The opening probe's bandwidth estimate, bit/s: PBA's prediction before any interval.
    pub link_bps: Option<f64>,
}

/// The first window `--initial-window auto` gives the streams under ACP: 64 KiB, the most a
/// receiver advertises before its first scaled window (TCP's 16-bit window field), so the most
/// the first round trip can carry. The kernel's ten segments use a fifth of it; make bench-wan
/// measures both.
pub const FIRST_WINDOW: u32 = 64 * 1024;

/// The startup window's default gain (`--startup-window auto` under ACP on BBR): what a stream
/// may hold in flight over what it delivers per least RTT while ACP is in startup. Startup grows
/// by this factor per round trip, and once the link is full at most (gain - 1) BDP stands in the
/// queue; make bench-wan measures it against none.
pub const STARTUP_GAIN: f64 = 2.0;

impl Default for ControlOptions {
    fn default() -> Self {
        Self {
            acp: AcpKind::Off,
            cc: None,
            monitor: ebpf::Want::Auto,
            interval: Duration::from_millis(100),
            trace: None,
            initial_window: None,
            startup_window: None,
            grow_streams: false,
            cut_chunks: false,
            link_bps: None,
        }
    }
}

impl ControlOptions {
    /// The congestion control the streams get.
    pub fn effective_cc(&self) -> Option<&str> {
        self.cc.as_deref().or((self.acp != AcpKind::Off).then_some("bbr"))
    }
}

/// One interval of a send, as `--trace-out` records it (CSV, [`TraceRow::HEADER`]).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TraceRow {
    /// End of the interval, s since the streams started.
    pub t: f64,
    /// Its length, s.
    pub dt: f64,
    /// Bytes the transport acknowledged, over all streams, as bit/s.
    pub goodput_bps: f64,
    /// Byte-weighted smoothed RTT of the streams that carried data, µs.
    pub srtt_us: f64,
    /// Least RTT seen, µs.
    pub min_rtt_us: f64,
    /// Segments retransmitted in the interval.
    pub retrans: u64,
    /// Congestion windows summed, segments.
    pub cwnd_sum: u64,
    /// Active streams.
    pub active: u16,
    /// ACP's aggregate pace for the next interval, bit/s (0: uncapped).
    pub pacing_bps: f64,
    /// PBA's prediction of the next interval's goodput, bit/s.
    pub predicted_bps: f64,
}

impl TraceRow {
    /// The CSV header line.
    pub const HEADER: &'static str = "t_s,dt_s,goodput_bps,srtt_us,min_rtt_us,retrans,cwnd_sum,active,pacing_bps,predicted_bps";

    /// The CSV line.
    pub fn csv(&self) -> String {
        format!(
            "{:.3},{:.3},{:.0},{:.0},{:.0},{},{},{},{:.0},{:.0}",
            self.t, self.dt, self.goodput_bps, self.srtt_us, self.min_rtt_us, self.retrans, self.cwnd_sum, self.active, self.pacing_bps, self.predicted_bps
        )
    }

    /// Parses a CSV line (None for the header or a malformed line).
    pub fn parse(line: &str) -> Option<Self> {
        let f: Vec<f64> = line.split(',').map(|v| v.trim().parse::<f64>()).collect::<Result<_, _>>().ok()?;
        (f.len() == 10).then(|| Self {
            t: f[0],
            dt: f[1],
            goodput_bps: f[2],
            srtt_us: f[3],
            min_rtt_us: f[4],
            retrans: f[5] as u64,
            cwnd_sum: f[6] as u64,
            active: f[7] as u16,
            pacing_bps: f[8],
            predicted_bps: f[9],
        })
    }
}

/// What the monitor reports at the end.
#[derive(Debug, Clone, Default)]
pub struct ControlReport {
    /// `ebpf` or `tcp_info`.
    pub backend: &'static str,
    /// Why the probes were not used.
    pub degraded: Option<String>,
    /// ACP controller name (`off` when none).
    pub acp: &'static str,
    /// Congestion control set on the streams (None: the system's default).
    pub cc: Option<String>,
    /// Why setting it failed.
    pub cc_error: Option<String>,
    /// Segments retransmitted over all streams.
    pub retrans: u64,
    /// Least RTT seen, µs.
    pub min_rtt_us: f64,
    /// Mean over intervals with data of the byte-weighted srtt, µs.
    pub mean_srtt_us: f64,
    /// Retransmit and congestion-state events the probes delivered through their ring buffer.
    pub probe_events: (u64, u64),
    /// Streams' BBR restarted under ACP ([`BbrRestarts`]).
    pub bbr_restarts: u64,
    /// The probe programs' runs and run time (nonzero only while BPF statistics are on).
    pub probe_cost: Vec<ebpf::ProgCost>,
    /// PBA's stream trials: kept, given back ([`crate::control::pba::StreamTrials`]).
    pub stream_trials: (u32, u32),
    /// What the first-window program did (None when it was not asked for or could not load).
    pub initial_window: Option<ebpf::WindowReport>,
    /// Why the streams kept the kernel's first window although another was asked for.
    pub initial_window_degraded: Option<String>,
    /// When ACP's first pace released the streams' startup window, s since the monitor started
    /// (None: released when the send ended, or there was none).
    pub startup_lifted_s: Option<f64>,
    /// The streams were switched to the rate congestion control ([`RateSwitch`]): when and why,
    /// or why they could not be.
    pub rate_cc: Option<String>,
}

/// The switch of the streams to dwcp's rate congestion control (`ebpf::RateCc`, whose window
/// follows ACP's pace) when ACP finds the kernel's least RTT implausible
/// ([`crate::control::acp::RttBase`]): BBR's window is built on that minimum and collapses with
/// it. Once per send; if the program cannot be registered the streams stay on their algorithm
/// and the report says why.
#[derive(Debug, Default)]
struct RateSwitch {
    cc: Option<ebpf::RateCc>,
    tried: bool,
}

impl RateSwitch {
    /// Switches `socks` (once); returns what the report says.
    fn switch(&mut self, socks: &[OwnedFd], t: f64, min_rtt_us: f64, base_us: Option<f64>) -> String {
        self.tried = true;
        let why = format!("the kernel's least RTT ({:.2} ms) is under a quarter of the least smoothed RTT ({:.1} ms)", min_rtt_us / 1e3, base_us.unwrap_or(0.0) / 1e3);
        let cc = match ebpf::RateCc::register() {
            Ok(cc) => cc,
            Err(e) => {
                warn!("{why}, but the rate congestion control is not available: {e}; the streams keep their algorithm");
                return format!("not switched at {t:.1} s: {why}; {e}");
            }
        };
        for (k, s) in socks.iter().enumerate() {
            if let Err(e) = crate::sys::set_congestion(s.as_raw_fd(), cc.name()) {
                warn!("stream {k}: {e}; it keeps its algorithm");
            }
        }
        info!(cc = cc.name(), "{why}: the streams' windows now follow ACP's pace");
        let name = cc.name().to_string();
        self.cc = Some(cc);
        format!("{name} from {t:.1} s: {why}")
    }
}

/// The streams' first window and startup window: the sockops program, shared by this process's
/// sends ([`ebpf::InitialWindow::shared`]), with the peer in its map, or the reason it is not.
#[derive(Debug)]
pub(super) struct FirstWindow {
    prog: Result<(&'static ebpf::InitialWindow, std::net::SocketAddr), String>,
    startup: bool,
}

impl FirstWindow {
    /// Lists `to` (resolved as the streams resolve it) with `bytes` and, with `startup_gain`,
    /// the startup window.
    pub(super) fn open(to: &str, bytes: u32, startup_gain: Option<f64>) -> Self {
        use std::net::ToSocketAddrs;
        let prog = (|| {
            let peer = to.to_socket_addrs().map_err(|e| format!("{to}: {e}"))?.next().ok_or_else(|| format!("{to} resolves to nothing"))?;
            let p = ebpf::InitialWindow::shared()?;
            p.set(peer, bytes, startup_gain).map_err(|e| e.to_string())?;
            Ok((p, peer))
        })();
        if let Err(why) = &prog {
            info!("first window degraded: {why}; the streams start with the kernel's");
        }
        Self { prog, startup: startup_gain.is_some() }
    }

    /// The program, when it holds the streams' startup window (the monitor releases them).
    pub(super) fn startup(&self) -> Option<&'static ebpf::InitialWindow> {
        self.prog.as_ref().ok().filter(|_| self.startup).map(|p| p.0)
    }

    /// Once the send is over: what the program did, or why it did nothing.
    pub(super) fn report(&self) -> (Option<ebpf::WindowReport>, Option<String>) {
        match &self.prog {
            Ok((p, peer)) => (p.report(*peer), None),
            Err(why) => (None, Some(why.clone())),
        }
    }
}

impl Drop for FirstWindow {
    /// The peer's entry goes with the send (however it ends): its streams not yet released
    /// are at their next acknowledgement, and later connections get the kernel's first window.
    fn drop(&mut self) {
        if let Ok((p, peer)) = &self.prog {
            p.forget(*peer);
        }
    }
}

/// Releases the streams from their startup window (once): when ACP paces, or the send ends.
/// Returns whether it did now (the streams' BBR should then start anew: see [`BbrRestarts`]).
fn release_startup(prog: &mut Option<&'static ebpf::InitialWindow>, socks: &[OwnedFd], t: f64) -> bool {
    let Some(p) = prog.take() else { return false };
    let mut n = 0;
    for (k, s) in socks.iter().enumerate() {
        match p.release(s.as_fd()) {
            Ok(true) => n += 1,
            Ok(false) => {}
            Err(e) => warn!("stream {k}: releasing its startup window: {e}"),
        }
    }
    debug!(streams = n, t, "startup window released");
    n > 0
}

/// How often each stream's BBR is restarted under ACP (see [`BbrRestarts`]): below BBR's ten
/// seconds, with room for one interval's lateness.
const BBR_RESTART_EVERY: Duration = Duration::from_secs(8);

/// Kernel BBR drains a stream to four segments for at least 200 ms once its least RTT is ten
/// seconds old (PROBE_RTT), and only an RTT sample *below* that least renews it. Under ACP's pace
/// the queue stays short but rarely empty, so the samples never go below it, and the streams,
/// started together, all drain together every ten seconds: `make bench-wan`'s traces show the
/// sum of windows falling from about 8000 segments to 500 and a second of goodput lost with it.
/// ACP keeps the queue short itself and tracks the least RTT over all streams, so under it each
/// stream's BBR is restarted before that (switched to reno and back: setting the algorithm a
/// socket already has does nothing). A restart keeps the kernel's windowed least RTT and the
/// pace cap and starts BBR's ten seconds again; the stream's window may fall to about what it
/// has in flight at its next loss and regrow within a second, far less than all streams at four
/// segments together. The restarts are staggered over the streams so that no two come together.
#[derive(Debug)]
struct BbrRestarts {
    /// When each stream restarts next, since the monitor started.
    next: Vec<Duration>,
    /// Restarts done.
    done: u64,
}

impl BbrRestarts {
    fn new(streams: usize) -> Self {
        // The first between 2 and 8 s, evenly spread; then every BBR_RESTART_EVERY.
        let n = streams.max(1) as u32;
        Self { next: (0..n).map(|k| Duration::from_secs(2) + Duration::from_secs(6) * k / n).collect(), done: 0 }
    }

    /// The streams whose time has come (and their next time set).
    fn due(&mut self, since_start: Duration) -> Vec<usize> {
        let mut due = Vec::new();
        for (k, next) in self.next.iter_mut().enumerate() {
            if since_start >= *next {
                *next += BBR_RESTART_EVERY;
                due.push(k);
            }
        }
        due
    }

    /// Restarts the streams whose time has come.
    fn run(&mut self, since_start: Duration, socks: &[OwnedFd]) {
        let due = self.due(since_start);
        self.restart(socks, due);
    }

    /// Restarts every stream now: after the startup window, whose clamp held each stream's BBR
    /// to what it delivered then. Its bandwidth estimate stays that low once the clamp is gone
    /// (a windowed maximum, probed up by a quarter every eight round trips, slower still under
    /// loss: five seconds of a 150 ms, 1% link ran at 0.9 of the others); started anew, its
    /// startup climbs to ACP's pace within round trips, which the pace holds.
    fn restart_all(&mut self, socks: &[OwnedFd]) {
        self.restart(socks, (0..socks.len()).collect());
    }

    fn restart(&mut self, socks: &[OwnedFd], which: Vec<usize>) {
        for k in which {
            let Some(s) = socks.get(k) else { continue };
            let fd = s.as_raw_fd();
            match crate::sys::set_congestion(fd, "reno").and_then(|()| crate::sys::set_congestion(fd, "bbr")) {
                Ok(()) => self.done += 1,
                Err(e) => {
                    // Left on reno a stream would collapse at the first loss: put BBR back or say so.
                    if let Err(e2) = crate::sys::set_congestion(fd, "bbr") {
                        warn!("stream {k}: restarting BBR: {e}; {e2}");
                    }
                }
            }
        }
    }
}

/// The congestion control is set before any data flows.
pub(super) fn set_cc(socks: &[OwnedFd], opts: &ControlOptions) -> Option<String> {
    let cc = opts.effective_cc()?;
    for s in socks {
        if let Err(e) = crate::sys::set_congestion(s.as_raw_fd(), cc) {
            warn!("{e}; the streams keep the system's default");
            return Some(e.to_string());
        }
    }
    None
}

/// Runs until the send stops. `socks` are duplicates of the streams' sockets (index = stream).
/// `startup`: the program holding the streams' startup window, released when ACP first paces.
pub(super) fn run(socks: Vec<OwnedFd>, opts: &ControlOptions, shared: &Shared, cc_error: Option<String>, mut startup: Option<&'static ebpf::InitialWindow>) -> ControlReport {
    let mut mon = ebpf::Monitor::open(opts.monitor);
    if let Some(why) = mon.degraded() {
        info!("path monitor degraded: {why}");
    }
    let idx: Vec<usize> = socks.iter().map(|s| mon.watch(s.as_fd())).collect();
    let mut acp = opts.acp.build(socks.len() as u16);
    let mut pba = Ewma::new(crate::control::pba::SEND_ALPHA);
    let mut second = SecondInterval::default();
    let mut last_cap: Option<f64> = None;
    let mut trials = opts.grow_streams.then(StreamTrials::default);
    let mut report = ControlReport {
        backend: mon.backend(),
        degraded: mon.degraded().map(str::to_string),
        acp: opts.acp.name(),
        cc: opts.effective_cc().map(str::to_string),
        cc_error,
        ..Default::default()
    };
    // Counters from the start of this send: a warm peer's stream carried sessions and its
    // warm-up before this one, and its lifetime totals are not this send's first interval.
    let mut last: Vec<Option<ebpf::SocketStats>> = idx.iter().map(|&i| mon.sample_with_time(i).0).collect();
    let mut last_time: Vec<Option<ebpf::sys::SendTime>> = vec![None; socks.len()];
    let mut samples = vec![StreamSample::default(); socks.len()];
    let mut events = Vec::new();
    let t0 = Instant::now();
    let mut prev = t0;
    let mut pace_applied: Option<u64> = None;
    let (mut srtt_sum, mut srtt_n) = (0.0, 0u32);
    let mut min_rtt = f64::INFINITY;
    let lost_streams = || shared.lost.load(Relaxed).min(u64::from(u16::MAX)) as u16;
    let mut restarts = (acp.is_some() && opts.effective_cc() == Some("bbr") && report.cc_error.is_none()).then(|| BbrRestarts::new(socks.len()));
    let mut rate = RateSwitch::default();
    while !shared.stop.load(Relaxed) && !shared.done() {
        std::thread::sleep(opts.interval);
        let now = Instant::now();
        let dt = now.duration_since(prev).as_secs_f64();
        prev = now;
        let active_n = match shared.progress.active.load(Relaxed) {
            0 => socks.len() as u16,
            a => a.saturating_add(lost_streams()),
        };
        // This interval's send chronographs, per stream (read with the stats: one TCP_INFO read
        // per stream without the probes).
        let mut times: Vec<Option<ebpf::sys::SendTime>> = vec![None; socks.len()];
        for (k, &i) in idx.iter().enumerate() {
            let active = (k as u16) < active_n;
            let (stats, time) = mon.sample_with_time(i);
            times[k] = time;
            samples[k] = match stats {
                Some(c) => {
                    let p = last[k].replace(c).unwrap_or_default();
                    StreamSample {
                        srtt_us: c.srtt_us,
                        min_rtt_us: c.min_rtt_us,
                        cwnd: c.cwnd,
                        mss: c.mss,
                        retrans: c.total_retrans.saturating_sub(p.total_retrans),
                        acked: c.bytes_acked.saturating_sub(p.bytes_acked),
                        delivery_bps: c.delivery_rate_bps,
                        active,
                    }
                }
                None => StreamSample { active, ..Default::default() },
            };
        }
        // Whether this interval's goodput measured the path: how much of the active streams'
        // time their windows or pace held them, as against the receiver's window, their send
        // buffers or nothing to send (a receiver writing to a slow disk stalls a loopback
        // transfer; that says nothing of the path).
        // And how much of their busy time their own buffers held them back (the receiver's
        // window or the send buffer): what PBA's stream trials go by.
        let (mut watched, mut path, mut busy, mut buffers) = (0u64, 0u64, 0u64, 0u64);
        for (k, t) in times.into_iter().enumerate() {
            let Some(now_t) = t else { continue };
            if let Some(p) = last_time[k].replace(now_t)
                && samples[k].active
            {
                watched += (dt * 1e6) as u64;
                path += now_t.path_limited_us().saturating_sub(p.path_limited_us()).min((dt * 1e6) as u64);
                busy += now_t.busy_us.saturating_sub(p.busy_us);
                buffers += (now_t.rwnd_limited_us + now_t.sndbuf_limited_us).saturating_sub(p.rwnd_limited_us + p.sndbuf_limited_us);
            }
        }
        let buffer_limited = if busy > 0 { (buffers as f64 / busy as f64).min(1.0) } else { 0.0 };
        shared.progress.watched_us.fetch_add(watched, Relaxed);
        shared.progress.path_limited_us.fetch_add(path, Relaxed);
        mon.drain(&mut events);
        for e in events.drain(..) {
            match e {
                ebpf::Event::Retransmit { .. } => report.probe_events.0 += 1,
                ebpf::Event::CongState { .. } => report.probe_events.1 += 1,
            }
        }
        if let Some(r) = restarts.as_mut() {
            r.run(now.duration_since(t0), &socks);
        }
        let o = Observation { t: now.duration_since(t0).as_secs_f64(), dt, streams: &samples };
        let g = o.goodput_bps();
        let srtt = o.srtt_us();
        if let Some(m) = o.min_rtt_us() {
            min_rtt = min_rtt.min(m);
        }
        // For the mode controller: the least srtt over streams carrying data, and retransmits.
        if let Some(least) = samples.iter().filter(|s| s.acked > 0 && s.srtt_us > 0).map(|s| s.srtt_us).min() {
            shared.progress.srtt_us.store(u64::from(least), Relaxed);
        }
        report.retrans += o.retrans();
        shared.progress.retrans.store(report.retrans, Relaxed);
        if let Some(s) = srtt {
            srtt_sum += s;
            srtt_n += 1;
        }
        pba.observe(g);
        let predicted = pba.predict().unwrap_or(0.0);
        shared.progress.predicted_bps.store(predicted as u64, Relaxed);
        second.on_interval(g, dt);
        if let Some(iv) = second.interval() {
            shared.progress.next_second_bps.store(iv.lo as u64, iv.hi as u64);
        }
        let mut acp_pace = None;
        if let Some(t) = trials.as_mut()
            && let Some(n) = t.on_interval(predicted, buffer_limited, o.active() as u16, socks.len() as u16)
        {
            debug!(streams = n, buffer_limited, predicted_bps = predicted, "PBA sets the active streams");
            shared.progress.active.store(n, Relaxed);
        }
        if let Some(c) = acp.as_mut() {
            let d = c.on_interval(&o);
            if d.pace_windows && !rate.tried {
                report.rate_cc = Some(rate.switch(&socks, o.t, min_rtt, c.base_us()));
                if rate.cc.is_some() {
                    // BBR's restarts would put the streams back on BBR.
                    restarts = None;
                    pace_applied = None;
                }
            }
            // PBA may have activated as many this interval (0: all are active already).
            let now_active = shared.progress.active.load(Relaxed);
            if let Some(n) = d.streams
                && now_active != 0
                && n > now_active
            {
                debug!(streams = n, "ACP activates another stream");
                shared.progress.active.store(n, Relaxed);
            }
            acp_pace = d.pacing_bps;
        }
        if (acp_pace.is_some() || acp.is_none()) && release_startup(&mut startup, &socks, o.t) {
            report.startup_lifted_s = Some(o.t);
            if let Some(r) = restarts.as_mut() {
                r.restart_all(&socks);
            }
        }
        // The caller's cap (the daemon sharing a link between jobs) bounds ACP's pace, or paces
        // alone without ACP.
        let cap = match shared.progress.rate_cap_bps.load(Relaxed) {
            0 => None,
            c => Some(c as f64),
        };
        // A cap lifted or more than doubled: what ACP learned under it (the rate it could
        // deliver) no longer holds, and its gain cycles would take seconds to climb (1.25x per
        // cycle); it starts anew, from its startup, which doubles per round trip.
        if let (Some(before), Some(_)) = (last_cap, acp.as_ref())
            && cap.is_none_or(|c| c > 2.0 * before)
        {
            debug!(before, now = ?cap, "the pace cap was lifted: ACP restarts");
            acp = opts.acp.build(socks.len() as u16);
        }
        last_cap = cap;
        let pace = match (acp_pace, cap) {
            (Some(p), Some(c)) => Some(p.min(c)),
            (p, c) => p.or(c),
        };
        let active = o.active().max(1) as f64;
        let per = pace.map(|r| (r / 8.0 / active) as u64);
        if per != pace_applied {
            for (k, s) in socks.iter().enumerate() {
                let rate = if samples[k].active { per.unwrap_or(u64::MAX) } else { u64::MAX };
                let _ = crate::sys::set_max_pacing_rate(s.as_raw_fd(), rate);
            }
            pace_applied = per;
        }
        let pacing = pace.unwrap_or(0.0);
        if let Some(tx) = &opts.trace {
            let _ = tx.send(TraceRow {
                t: o.t,
                dt,
                goodput_bps: g,
                srtt_us: srtt.unwrap_or(0.0),
                min_rtt_us: if min_rtt.is_finite() { min_rtt } else { 0.0 },
                retrans: o.retrans(),
                cwnd_sum: samples.iter().map(|s| u64::from(s.cwnd)).sum(),
                active: o.active() as u16,
                pacing_bps: pacing,
                predicted_bps: predicted,
            });
        }
    }
    let _ = release_startup(&mut startup, &socks, t0.elapsed().as_secs_f64());
    report.probe_cost = mon.cost();
    report.bbr_restarts = restarts.map_or(0, |r| r.done);
    report.stream_trials = trials.map_or((0, 0), |t| (t.kept, t.given_back));
    report.min_rtt_us = if min_rtt.is_finite() { min_rtt } else { 0.0 };
    report.mean_srtt_us = if srtt_n > 0 { srtt_sum / f64::from(srtt_n) } else { 0.0 };
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bbr_restarts_come_before_bbrs_ten_seconds_and_never_two_at_once() {
        for n in [1usize, 2, 8, 16] {
            let mut r = BbrRestarts::new(n);
            let mut last = vec![Duration::ZERO; n];
            let mut t = Duration::ZERO;
            while t < Duration::from_secs(60) {
                t += Duration::from_millis(100);
                let due = r.due(t);
                // Up to 16 streams, 375 ms apart or more.
                assert!(due.len() <= 1, "{n} streams: {due:?} at {t:?}");
                for k in due {
                    assert!(t - last[k] >= Duration::from_secs(2), "{n} streams: stream {k} again after {:?}", t - last[k]);
                    last[k] = t;
                }
                for (k, l) in last.iter().enumerate() {
                    assert!(t - *l < Duration::from_secs(9), "{n} streams: stream {k} not restarted for {:?} at {t:?}", t - *l);
                }
            }
        }
    }
}
