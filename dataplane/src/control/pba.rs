//! Predictive bandwidth allocation: the next interval's bandwidth from the history of measured
//! ones. Statistical predictors (last value, EWMA, Holt's trend, additive Holt-Winters), their
//! parameters fitted by grid search on training traces, scored by one-step-ahead MAPE on
//! held-out ones (`make bench-pba`). The sender feeds its choice with each interval's goodput;
//! the prediction sets HDE's effort and is recorded in `--trace-out`.
//!
//! What PBA sizes from it: the session's chunk size at the open ([`chunk_size`]), the active
//! stream count while it runs ([`StreamTrials`]), and HDE's effort (`control::effort::Effort`).

/// The EWMA smoothing the sender's PBA runs with: what `make bench-pba` fitted on the recorded
/// traces at the 100 ms interval (it held out three of six traces).
pub const SEND_ALPHA: f64 = 0.9;

/// A one-step-ahead predictor.
pub trait Predictor: Send + std::fmt::Debug {
    /// Name with parameters.
    fn name(&self) -> String;
    /// Feeds the measurement of the interval that just ended.
    fn observe(&mut self, x: f64);
    /// The next interval's value (None until it has seen enough).
    fn predict(&self) -> Option<f64>;
    /// A fresh copy (same parameters, no history).
    fn fresh(&self) -> Box<dyn Predictor>;
}

/// The last value.
#[derive(Debug, Clone, Default)]
pub struct Last(Option<f64>);

impl Predictor for Last {
    fn name(&self) -> String {
        "last".into()
    }
    fn observe(&mut self, x: f64) {
        self.0 = Some(x);
    }
    fn predict(&self) -> Option<f64> {
        self.0
    }
    fn fresh(&self) -> Box<dyn Predictor> {
        Box::new(Self::default())
    }
}

/// Exponentially weighted moving average.
#[derive(Debug, Clone)]
pub struct Ewma {
    alpha: f64,
    level: Option<f64>,
}

impl Ewma {
    /// With smoothing `alpha` in (0, 1].
    pub fn new(alpha: f64) -> Self {
        Self { alpha, level: None }
    }
}

impl Predictor for Ewma {
    fn name(&self) -> String {
        format!("ewma(a={:.2})", self.alpha)
    }
    fn observe(&mut self, x: f64) {
        self.level = Some(self.level.map_or(x, |l| l + self.alpha * (x - l)));
    }
    fn predict(&self) -> Option<f64> {
        self.level
    }
    fn fresh(&self) -> Box<dyn Predictor> {
        Box::new(Self::new(self.alpha))
    }
}

/// Holt's linear trend (double exponential smoothing); the trend is damped by `phi`.
#[derive(Debug, Clone)]
pub struct Holt {
    alpha: f64,
    beta: f64,
    phi: f64,
    state: Option<(f64, f64)>,
}

impl Holt {
    /// With level smoothing `alpha`, trend smoothing `beta`, damping `phi`.
    pub fn new(alpha: f64, beta: f64, phi: f64) -> Self {
        Self { alpha, beta, phi, state: None }
    }
}

impl Predictor for Holt {
    fn name(&self) -> String {
        format!("holt(a={:.2},b={:.2},phi={:.2})", self.alpha, self.beta, self.phi)
    }
    fn observe(&mut self, x: f64) {
        self.state = Some(match self.state {
            None => (x, 0.0),
            Some((l, b)) => {
                let nl = self.alpha * x + (1.0 - self.alpha) * (l + self.phi * b);
                (nl, self.beta * (nl - l) + (1.0 - self.beta) * self.phi * b)
            }
        });
    }
    fn predict(&self) -> Option<f64> {
        self.state.map(|(l, b)| (l + self.phi * b).max(0.0))
    }
    fn fresh(&self) -> Box<dyn Predictor> {
        Box::new(Self::new(self.alpha, self.beta, self.phi))
    }
}

/// Additive Holt-Winters with a season of `m` intervals (periodic cross traffic).
#[derive(Debug, Clone)]
pub struct HoltWinters {
    alpha: f64,
    beta: f64,
    gamma: f64,
    m: usize,
    level: f64,
    trend: f64,
    season: Vec<f64>,
    seen: Vec<f64>,
}

impl HoltWinters {
    /// With smoothing `alpha`, `beta`, `gamma` and season length `m` (>= 2).
    pub fn new(alpha: f64, beta: f64, gamma: f64, m: usize) -> Self {
        Self { alpha, beta, gamma, m: m.max(2), level: 0.0, trend: 0.0, season: Vec::new(), seen: Vec::new() }
    }
}

impl Predictor for HoltWinters {
    fn name(&self) -> String {
        format!("holt-winters(a={:.2},b={:.2},g={:.2},m={})", self.alpha, self.beta, self.gamma, self.m)
    }
    fn observe(&mut self, x: f64) {
        let t = self.seen.len();
        self.seen.push(x);
        if t + 1 < self.m {
            return;
        }
        if t + 1 == self.m {
            // The first season initializes level and the seasonal offsets.
            self.level = self.seen.iter().sum::<f64>() / self.m as f64;
            self.season = self.seen.iter().map(|v| v - self.level).collect();
            return;
        }
        let s = self.season[t % self.m];
        let l = self.alpha * (x - s) + (1.0 - self.alpha) * (self.level + self.trend);
        self.trend = self.beta * (l - self.level) + (1.0 - self.beta) * self.trend;
        self.season[t % self.m] = self.gamma * (x - l) + (1.0 - self.gamma) * s;
        self.level = l;
    }
    fn predict(&self) -> Option<f64> {
        let t = self.seen.len();
        if t < self.m {
            return self.seen.last().copied();
        }
        Some((self.level + self.trend + self.season[t % self.m]).max(0.0))
    }
    fn fresh(&self) -> Box<dyn Predictor> {
        Box::new(Self::new(self.alpha, self.beta, self.gamma, self.m))
    }
}

/// The chunk size PBA cuts a session into when the user gave none: the base size (1 MiB, the best
/// measured on loopback: 128 KiB chunks cost 28-36% of the goodput at 32 Gbit/s plaintext and
/// 23-44% at 19 Gbit/s encrypted, 2 MiB gained nothing) unless the transfer is startup-bound. A transfer is startup-bound when it lasts fewer
/// than [`STARTUP_RTTS`] round trips at the predicted rate (or no rate is predicted yet, as on a
/// long path, where the opening probe sends no burst) and the object is too small to give every
/// stream [`CHUNKS_PER_STREAM`] chunks of the base size. A session's chunks are the unit its
/// streams take, so a 4 MiB object in 1 MiB chunks uses 4 of 8 streams, and on a long path each
/// idle stream is a first window (64 KiB under ACP) that carries nothing in the first round
/// trips. Such an object is cut so that each stream gets that many chunks, in a power of two of
/// at least [`MIN_CHUNK`]. Objects of unknown size (standard input) keep the base.
pub fn chunk_size(object: Option<u64>, streams: u16, predicted_bps: Option<f64>, rtt: std::time::Duration, base: u32) -> u32 {
    let Some(size) = object else { return base };
    let want = u64::from(streams.max(1)) * CHUNKS_PER_STREAM;
    if size >= want * u64::from(base) {
        return base;
    }
    if let Some(bps) = predicted_bps.filter(|b| b.is_finite() && *b > 0.0) {
        let rtts = size as f64 * 8.0 / bps / rtt.as_secs_f64().max(1e-6);
        if rtts >= STARTUP_RTTS {
            return base;
        }
    }
    let per = (size / want).max(1);
    // The largest power of two at or below `per`, within [MIN_CHUNK, base].
    let pow = 1u64 << (63 - per.leading_zeros());
    pow.clamp(u64::from(MIN_CHUNK).min(u64::from(base)), u64::from(base)) as u32
}

/// Chunks each stream gets of a startup-bound object ([`chunk_size`]).
pub const CHUNKS_PER_STREAM: u64 = 4;
/// The smallest chunk [`chunk_size`] cuts (a whole number of 4 KiB pages, for HDE).
pub const MIN_CHUNK: u32 = 64 << 10;
/// Round trips at the predicted rate below which a transfer is startup-bound ([`chunk_size`]).
pub const STARTUP_RTTS: f64 = 20.0;

/// PBA's stream count while a send runs: when the streams' own buffers hold them back (the
/// receiver's advertised window or the sender's send buffer, per the kernel's chronographs) more
/// than half their busy time for [`StreamTrials::AFTER`] intervals in a row, another parked
/// stream is activated for a trial. After [`StreamTrials::TRIAL`] intervals the prediction,
/// averaged over the trial's last [`StreamTrials::MEAN_OF`] intervals, is compared with its
/// average over the ones before the trial (one 100 ms interval's goodput moves by 15% on its
/// own, more than the half stream's share a trial must show): it is kept if the predicted
/// bandwidth rose by at least half a stream's share, and otherwise the stream is parked again and no trial starts for
/// [`StreamTrials::BACKOFF`] intervals. On a long fat path a stream holds at most its send buffer
/// in flight (`tcp_wmem`'s 4 MiB by default: 170 Mbit/s at 150 ms), so more streams carry more;
/// on loopback a receiver that cannot keep up also shows as the receiver's window, and there the
/// trial finds no gain and gives the stream back. ACP's own rule (the pace not reached with no
/// queue) adds streams for the path's windows; this one for the hosts' buffers.
#[derive(Debug, Clone, Default)]
pub struct StreamTrials {
    /// Intervals in a row the buffers held the streams back.
    limited: u32,
    /// The running trial: the prediction before it, the active count before it, its intervals.
    trial: Option<(f64, u16, u32)>,
    /// The last [`Self::MEAN_OF`] predictions.
    recent: std::collections::VecDeque<f64>,
    /// Intervals left before another trial may start.
    backoff: u32,
    /// Trials kept and given back.
    pub kept: u32,
    /// See `kept`.
    pub given_back: u32,
}

impl StreamTrials {
    /// Intervals in a row the buffers must limit before a trial.
    pub const AFTER: u32 = 3;
    /// Intervals a trial runs (a new stream's slow start on a long path takes several round trips).
    pub const TRIAL: u32 = 15;
    /// Intervals without a trial after one that gained nothing.
    pub const BACKOFF: u32 = 100;
    /// Intervals the predictions compared are averaged over.
    pub const MEAN_OF: usize = 5;

    /// One interval: `predicted_bps` is PBA's prediction after it, `buffer_limited` the share of
    /// the active streams' busy time their buffers held them back (0..=1), `active` and `opened`
    /// the streams taking chunks and connected. Returns the active count to set, if it changes.
    pub fn on_interval(&mut self, predicted_bps: f64, buffer_limited: f64, active: u16, opened: u16) -> Option<u16> {
        if self.recent.len() == Self::MEAN_OF {
            self.recent.pop_front();
        }
        self.recent.push_back(predicted_bps);
        let mean = self.recent.iter().sum::<f64>() / self.recent.len() as f64;
        if let Some((before, was, n)) = self.trial.as_mut() {
            *n += 1;
            if *n < Self::TRIAL {
                return None;
            }
            let (before, was) = (*before, *was);
            self.trial = None;
            self.limited = 0;
            if mean >= before * (1.0 + 0.5 / f64::from(was.max(1))) {
                self.kept += 1;
                return None;
            }
            self.given_back += 1;
            self.backoff = Self::BACKOFF;
            return (active > was).then_some(was);
        }
        if self.backoff > 0 {
            self.backoff -= 1;
            return None;
        }
        if buffer_limited <= 0.5 || predicted_bps <= 0.0 {
            self.limited = 0;
            return None;
        }
        self.limited += 1;
        if self.limited < Self::AFTER || active == 0 || active >= opened {
            return None;
        }
        self.trial = Some((mean, active, 0));
        Some(active + 1)
    }
}

/// Runs a fresh copy of `p` over `series` one step ahead: `f(prediction, outcome)` for each
/// interval, before the predictor observes it.
fn one_step(p: &dyn Predictor, series: &[f64], mut f: impl FnMut(Option<f64>, f64)) {
    let mut p = p.fresh();
    for &x in series {
        f(p.predict(), x);
        p.observe(x);
    }
}

/// One-step-ahead mean absolute percentage error of `p` (fresh) over `series`, in percent;
/// intervals with a zero measurement are skipped (their percentage is undefined).
pub fn mape(p: &dyn Predictor, series: &[f64]) -> f64 {
    let (mut sum, mut n) = (0.0, 0usize);
    one_step(p, series, |f, x| {
        if let Some(f) = f
            && x > 0.0
        {
            sum += (f - x).abs() / x;
            n += 1;
        }
    });
    if n == 0 { f64::NAN } else { 100.0 * sum / n as f64 }
}

/// One-step-ahead weighted absolute percentage error (sum of errors over sum of values), in
/// percent: unlike MAPE, an interval near zero does not dominate it.
pub fn wape(p: &dyn Predictor, series: &[f64]) -> f64 {
    let (mut err, mut sum) = (0.0, 0.0);
    one_step(p, series, |f, x| {
        if let Some(f) = f {
            err += (f - x).abs();
            sum += x.abs();
        }
    });
    if sum == 0.0 { f64::NAN } else { 100.0 * err / sum }
}

/// Mean MAPE over several series.
pub fn mean_mape(p: &dyn Predictor, series: &[Vec<f64>]) -> f64 {
    series.iter().map(|s| mape(p, s)).sum::<f64>() / series.len().max(1) as f64
}

/// A prediction interval: the point prediction and the bounds the outcome falls between with
/// the calibrator's coverage, bit/s.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Interval {
    /// Lower bound.
    pub lo: f64,
    /// The point predictor's value.
    pub mid: f64,
    /// Upper bound.
    pub hi: f64,
}

impl Interval {
    /// Whether `x` falls inside (bounds included).
    pub fn holds(&self, x: f64) -> bool {
        self.lo <= x && x <= self.hi
    }
    /// Its width, bit/s.
    pub fn width(&self) -> f64 {
        self.hi - self.lo
    }
}

/// Prediction intervals around a point predictor, which is what a deadline decision needs (will
/// the next second carry at least this much?) and MAPE does not say.
///
/// Split-conformal on a sliding window: the interval is the prediction scaled by the quantiles
/// of the recent ratios of outcome to prediction (a ratio, not a difference, because the error
/// grows with the rate). Bandwidth is not exchangeable (a cross flow arrives, the link's rate
/// changes), so the quantile level is steered online by adaptive conformal inference (Gibbs and
/// Candès, 2021): after each outcome the miss level moves by `gamma` times (target miss - miss),
/// which holds the long-run coverage near the target on any sequence. The window starts from a
/// prior (ratios seen on other transfers) so that the first intervals have bounds.
#[derive(Debug)]
pub struct Calibrated {
    p: Box<dyn Predictor>,
    coverage: f64,
    window: usize,
    gamma: f64,
    ratios: std::collections::VecDeque<f64>,
    /// ACI's current miss level (the quantiles taken are `miss/2` and `1 - miss/2`).
    miss: f64,
}

/// Ratios of outcome to prediction needed before an interval is given.
pub const MIN_RATIOS: usize = 8;

impl Calibrated {
    /// Around `p` (fresh), aiming at `coverage` in (0, 1), over the last `window` ratios, steered
    /// by `gamma` (0: plain split-conformal), starting from the last `window` of `prior`.
    pub fn new(p: &dyn Predictor, coverage: f64, window: usize, gamma: f64, prior: &[f64]) -> Self {
        let window = window.max(MIN_RATIOS);
        let ratios = prior[prior.len().saturating_sub(window)..].iter().copied().filter(|r| r.is_finite() && *r >= 0.0).collect();
        Self { p: p.fresh(), coverage, window, gamma, ratios, miss: 1.0 - coverage }
    }

    /// Its name: the point predictor's, the window and the step.
    pub fn name(&self) -> String {
        format!("{} w={} g={}", self.p.name(), self.window, self.gamma)
    }

    /// The next interval's prediction with its bounds (None until the predictor has a value and
    /// the window holds [`MIN_RATIOS`] ratios).
    pub fn interval(&self) -> Option<Interval> {
        let mid = self.p.predict()?;
        if self.ratios.len() < MIN_RATIOS {
            return None;
        }
        let mut r: Vec<f64> = self.ratios.iter().copied().collect();
        r.sort_by(f64::total_cmp);
        let q = |level: f64| {
            // The conformal quantile: the ceil((n + 1) level)-th smallest, clamped to the sample.
            let k = ((r.len() + 1) as f64 * level.clamp(0.0, 1.0)).ceil() as usize;
            r[k.clamp(1, r.len()) - 1]
        };
        let m = self.miss.clamp(0.0, 1.0);
        Some(Interval { lo: mid * q(m / 2.0), mid, hi: mid * q(1.0 - m / 2.0) })
    }

    /// Feeds the measurement of the interval that just ended: scores the interval given for it,
    /// steers the level, keeps its ratio, then feeds the point predictor.
    pub fn observe(&mut self, x: f64) {
        if let Some(iv) = self.interval() {
            let missed = if iv.holds(x) { 0.0 } else { 1.0 };
            // Bounded so that a long run of hits or misses cannot park the level where it takes
            // as long to come back.
            self.miss = (self.miss + self.gamma * ((1.0 - self.coverage) - missed)).clamp(-0.5, 1.5);
        }
        if let Some(f) = self.p.predict()
            && f > 0.0
        {
            self.ratios.push_back(x / f);
            if self.ratios.len() > self.window {
                self.ratios.pop_front();
            }
        }
        self.p.observe(x);
    }
}

/// The one-step ratios of outcome to prediction of `p` (fresh) over `series`: the prior a
/// [`Calibrated`] starts from.
pub fn ratios(p: &dyn Predictor, series: &[Vec<f64>]) -> Vec<f64> {
    let mut out = Vec::new();
    for s in series {
        one_step(p, s, |f, x| {
            if let Some(f) = f.filter(|f| *f > 0.0) {
                out.push(x / f);
            }
        });
    }
    out
}

/// How a calibrated predictor did on one series.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Calibration {
    /// Intervals given.
    pub n: usize,
    /// Outcomes inside their interval.
    pub held: usize,
    /// Sum of the intervals' widths, bit/s.
    pub width_sum: f64,
}

impl Calibration {
    /// The share of outcomes inside their interval.
    pub fn coverage(&self) -> f64 {
        if self.n == 0 { f64::NAN } else { self.held as f64 / self.n as f64 }
    }
    /// The intervals' mean width, bit/s.
    pub fn mean_width(&self) -> f64 {
        if self.n == 0 { f64::NAN } else { self.width_sum / self.n as f64 }
    }
}

impl std::ops::Add for Calibration {
    type Output = Self;
    fn add(self, o: Self) -> Self {
        Self { n: self.n + o.n, held: self.held + o.held, width_sum: self.width_sum + o.width_sum }
    }
}

/// Scores a fresh copy of `c`'s set-up (`Calibrated::new` with the same arguments) on `series`.
pub fn calibration(p: &dyn Predictor, coverage: f64, window: usize, gamma: f64, prior: &[f64], series: &[f64]) -> Calibration {
    let mut c = Calibrated::new(p, coverage, window, gamma, prior);
    let mut out = Calibration::default();
    for &x in series {
        if let Some(iv) = c.interval() {
            out.n += 1;
            out.held += usize::from(iv.holds(x));
            out.width_sum += iv.width();
        }
        c.observe(x);
    }
    out
}

/// The window and step of [`Calibrated`] for `p` fitted on `train`, each series scored with the
/// others' ratios as its prior (so the fit does not see its own outcomes in the window it
/// starts from). A setting is judged by its worst series, not the pooled coverage: a transfer
/// needs its own intervals calibrated, and a setting right on average can be 0.6 on one path
/// and 0.95 on another. Of the settings whose every series is within 0.05 of the target, the
/// narrowest; if none, the one whose worst series is closest. The step is never 0: without
/// steering nothing holds the coverage when the path changes.
pub fn fit_calibration(p: &dyn Predictor, coverage: f64, train: &[Vec<f64>]) -> (usize, f64) {
    // Each series' prior: the others' ratios, in order; the same for every setting.
    let own: Vec<Vec<f64>> = train.iter().map(|s| ratios(p, std::slice::from_ref(s))).collect();
    let priors: Vec<Vec<f64>> = (0..train.len()).map(|i| own.iter().enumerate().filter(|(j, _)| *j != i).flat_map(|(_, r)| r.iter().copied()).collect()).collect();
    let mut best: Option<((usize, f64), bool, f64)> = None;
    for &w in &[20usize, 50, 100, 200] {
        for &g in &[0.01, 0.02, 0.05, 0.1] {
            let mut total = Calibration::default();
            let mut worst = 0.0f64;
            for (s, prior) in train.iter().zip(&priors) {
                let c = calibration(p, coverage, w, g, prior, s);
                if c.n > 0 {
                    worst = worst.max((c.coverage() - coverage).abs());
                }
                total = total + c;
            }
            let ok = worst <= 0.05;
            let score = if ok { total.mean_width() } else { worst };
            let better = match best {
                None => true,
                Some((_, bok, bscore)) => (ok && !bok) || (ok == bok && score < bscore),
            };
            if better && score.is_finite() {
                best = Some(((w, g), ok, score));
            }
        }
    }
    best.map_or((50, 0.02), |b| b.0)
}

/// Control intervals (100 ms) per period of the sender's prediction interval: deadlines and the
/// time left are reckoned a second at a time.
pub const SECOND_INTERVALS: usize = 10;
/// Data left out before the sender's interval starts, in control intervals: slow start and
/// ACP's drain are not what it predicts (as in `make bench-pba`).
pub const SKIP_INTERVALS: usize = 20;
/// The window and step of the sender's 1 s interval around its EWMA: what
/// [`fit_calibration`] gives on `make bench-pba`'s six training traces (a test checks it).
pub const SEND_WINDOW: usize = 20;
/// See [`SEND_WINDOW`].
pub const SEND_GAMMA: f64 = 0.1;
/// The prior the sender's interval starts from: the 5% to 95% quantiles (in steps of 5%) of the
/// EWMA's 1 s outcome/prediction ratios on the training traces (a test checks them), so that a
/// transfer has an interval from its first second of prediction on.
pub const SEND_PRIOR: [f64; 19] = [
    0.6086687893810007,
    0.6430275719821663,
    0.71076384969906,
    0.772218058119743,
    0.8320044832962499,
    0.8874668062170119,
    0.915874108398038,
    0.932939696654641,
    0.9556694287373477,
    0.9831990130640311,
    1.0082375062502755,
    1.0351503824250463,
    1.0703213999923646,
    1.0947472549280284,
    1.1261164703875284,
    1.1615521806514537,
    1.271876471258444,
    1.3565449334185358,
    1.4981087979272507,
];

/// The goodput series of a `--trace-out` trace from `skip` intervals after its first data,
/// aggregated to `per` intervals (bit/s, weighted by each interval's length).
pub fn series(rows: &[crate::send::TraceRow], per: usize, skip: usize) -> Vec<f64> {
    let first = rows.iter().position(|r| r.goodput_bps > 0.0).unwrap_or(rows.len());
    rows[(first + skip).min(rows.len())..]
        .chunks(per)
        .filter(|c| c.len() == per)
        .map(|c| c.iter().map(|r| r.goodput_bps * r.dt).sum::<f64>() / c.iter().map(|r| r.dt).sum::<f64>())
        .collect()
}

/// The 5% to 95% quantiles (steps of 5%) of `ratios`: a prior small enough for any window.
pub fn prior_quantiles(ratios: &[f64]) -> [f64; 19] {
    let mut r = ratios.to_vec();
    r.sort_by(f64::total_cmp);
    let mut q = [0.0; 19];
    if r.is_empty() {
        return q;
    }
    for (k, v) in q.iter_mut().enumerate() {
        let i = (((k + 1) as f64 * 0.05) * (r.len() - 1) as f64).round() as usize;
        *v = r[i];
    }
    q
}

/// The sender's 1 s prediction interval: its control intervals' goodput aggregated a second at
/// a time (after [`SKIP_INTERVALS`] of data), an EWMA of [`SEND_ALPHA`] calibrated to 80%.
#[derive(Debug)]
pub struct SecondInterval {
    seen_data: usize,
    bits: f64,
    secs: f64,
    n: usize,
    cal: Calibrated,
}

impl Default for SecondInterval {
    fn default() -> Self {
        Self { seen_data: 0, bits: 0.0, secs: 0.0, n: 0, cal: Calibrated::new(&Ewma::new(SEND_ALPHA), 0.8, SEND_WINDOW, SEND_GAMMA, &SEND_PRIOR) }
    }
}

impl SecondInterval {
    /// Feeds one control interval: `goodput_bps` over `dt` seconds.
    pub fn on_interval(&mut self, goodput_bps: f64, dt: f64) {
        if self.seen_data == 0 && goodput_bps <= 0.0 {
            return;
        }
        self.seen_data += 1;
        if self.seen_data <= SKIP_INTERVALS {
            return;
        }
        self.bits += goodput_bps * dt;
        self.secs += dt;
        self.n += 1;
        if self.n == SECOND_INTERVALS {
            if self.secs > 0.0 {
                self.cal.observe(self.bits / self.secs);
            }
            (self.bits, self.secs, self.n) = (0.0, 0.0, 0);
        }
    }

    /// The next second's goodput with its 80% bounds, bit/s (None before the first second).
    pub fn interval(&self) -> Option<Interval> {
        self.cal.interval()
    }
}

/// The candidates of each family, for fitting.
pub fn candidates() -> Vec<Box<dyn Predictor>> {
    let mut c: Vec<Box<dyn Predictor>> = vec![Box::new(Last::default())];
    let grid = [0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9];
    for &a in &grid {
        c.push(Box::new(Ewma::new(a)));
        for &b in &[0.05, 0.1, 0.3] {
            for &phi in &[0.8, 0.9, 1.0] {
                c.push(Box::new(Holt::new(a, b, phi)));
            }
            for &m in &[10, 20, 40] {
                c.push(Box::new(HoltWinters::new(a, b, 0.3, m)));
            }
        }
    }
    c
}

/// The family of a predictor's name (`last`, `ewma`, `holt`, `holt-winters`).
pub fn family(name: &str) -> &str {
    name.split('(').next().unwrap_or(name)
}

/// For each family, the candidate with the least mean MAPE on `train`.
pub fn fit(train: &[Vec<f64>]) -> Vec<Box<dyn Predictor>> {
    let mut best: Vec<(String, f64, Box<dyn Predictor>)> = Vec::new();
    for c in candidates() {
        let m = mean_mape(c.as_ref(), train);
        let fam = family(&c.name()).to_string();
        match best.iter_mut().find(|b| b.0 == fam) {
            Some(b) if m < b.1 => *b = (fam, m, c),
            Some(_) => {}
            None => best.push((fam, m, c)),
        }
    }
    best.into_iter().map(|b| b.2).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_constant_is_predicted_exactly_by_every_family() {
        let s = vec![5e8; 100];
        for c in fit(std::slice::from_ref(&s)) {
            assert!(mape(c.as_ref(), &s) < 1e-9, "{}", c.name());
        }
    }

    #[test]
    fn holt_follows_a_ramp_better_than_ewma() {
        let s: Vec<f64> = (0..200).map(|i| 1e8 + 1e6 * f64::from(i)).collect();
        let e = mape(&Ewma::new(0.3), &s);
        let h = mape(&Holt::new(0.5, 0.3, 1.0), &s);
        assert!(h < e / 5.0, "holt {h} vs ewma {e}");
    }

    #[test]
    fn holt_winters_learns_a_season() {
        // Cross traffic on for 10 intervals, off for 10: the link alternates 600 and 900 Mbit/s.
        let s: Vec<f64> = (0..400).map(|i| if (i / 10) % 2 == 0 { 9e8 } else { 6e8 }).collect();
        let hw = mape(&HoltWinters::new(0.1, 0.05, 0.5, 20), &s);
        let last = mape(&Last::default(), &s);
        assert!(hw < last / 2.0, "holt-winters {hw} vs last {last}");
    }

    #[test]
    fn a_startup_bound_object_is_cut_to_reach_every_stream_and_a_long_one_is_not() {
        use std::time::Duration;
        const MIB: u64 = 1 << 20;
        let (base, ms150) = (1 << 20, Duration::from_millis(150));
        // 16 MiB over 8 streams, no rate predicted (a long path): 512 KiB, 4 chunks a stream.
        assert_eq!(chunk_size(Some(16 * MIB), 8, None, ms150, base), 512 << 10);
        // Large enough for 4 chunks of 1 MiB on every stream: the base.
        assert_eq!(chunk_size(Some(32 * MIB), 8, None, ms150, base), base);
        // Small but long at the predicted rate (100 ms on a 50 µs path): the base.
        assert_eq!(chunk_size(Some(16 * MIB), 8, Some(1.3e9), Duration::from_micros(50), base), base);
        // Small and short at the predicted rate (16 MiB at 1 Gbit/s is under one 150 ms trip).
        assert_eq!(chunk_size(Some(16 * MIB), 8, Some(1e9), ms150, base), 512 << 10);
        // Tiny objects stop at the floor; a smaller base than the floor is kept; stdin keeps it.
        assert_eq!(chunk_size(Some(100_000), 8, None, ms150, base), MIN_CHUNK);
        assert_eq!(chunk_size(Some(100_000), 8, None, ms150, 4096), 4096);
        assert_eq!(chunk_size(None, 8, None, ms150, base), base);
        // Always a power of two (a whole number of pages): 24 MiB / 32 = 768 KiB -> 512 KiB.
        assert_eq!(chunk_size(Some(24 * MIB), 8, None, ms150, base), 512 << 10);
    }

    #[test]
    fn a_stream_trial_is_kept_when_the_prediction_rises_and_given_back_when_not() {
        let mut t = StreamTrials::default();
        // Buffer-limited three intervals in a row at 4 of 8 streams: a fifth is tried.
        assert_eq!(t.on_interval(4e8, 0.9, 4, 8), None);
        assert_eq!(t.on_interval(4e8, 0.9, 4, 8), None);
        assert_eq!(t.on_interval(4e8, 0.9, 4, 8), Some(5));
        // The trial's intervals decide nothing until it ends; a rise of a stream's share keeps it.
        for _ in 1..StreamTrials::TRIAL {
            assert_eq!(t.on_interval(5e8, 0.9, 5, 8), None);
        }
        assert_eq!(t.on_interval(5e8, 0.9, 5, 8), None);
        assert_eq!((t.kept, t.given_back), (1, 0));
        // The next trial gains nothing (a receiver that cannot keep up): the stream goes back.
        for _ in 0..2 {
            assert_eq!(t.on_interval(5e8, 0.9, 5, 8), None);
        }
        assert_eq!(t.on_interval(5e8, 0.9, 5, 8), Some(6));
        for _ in 1..StreamTrials::TRIAL {
            assert_eq!(t.on_interval(5.1e8, 0.9, 6, 8), None);
        }
        assert_eq!(t.on_interval(5.1e8, 0.9, 6, 8), Some(5));
        assert_eq!((t.kept, t.given_back), (1, 1));
        // Then it waits out its backoff however limited the streams are.
        for _ in 0..StreamTrials::BACKOFF {
            assert_eq!(t.on_interval(5e8, 1.0, 5, 8), None);
        }
        // One low interval at the trial's end does not give back a stream that carried more
        // (the means of the last five decide), nor does one high interval keep one that did not.
        let mut t = StreamTrials::default();
        for _ in 0..2 {
            t.on_interval(4e8, 0.9, 4, 8);
        }
        assert_eq!(t.on_interval(4e8, 0.9, 4, 8), Some(5));
        for _ in 1..StreamTrials::TRIAL {
            assert_eq!(t.on_interval(5e8, 0.9, 5, 8), None);
        }
        assert_eq!(t.on_interval(4e8, 0.9, 5, 8), None);
        assert_eq!((t.kept, t.given_back), (1, 0));
        for _ in 0..2 {
            t.on_interval(5e8, 0.9, 5, 8);
        }
        assert_eq!(t.on_interval(5e8, 0.9, 5, 8), Some(6));
        for _ in 1..StreamTrials::TRIAL {
            assert_eq!(t.on_interval(5e8, 0.9, 6, 8), None);
        }
        // Before: the mean of 5, 4, 5, 5, 5 (x 1e8); after: of 5, 5, 5, 5, 6, short of 1.1x.
        assert_eq!(t.on_interval(6e8, 0.9, 6, 8), Some(5));
        assert_eq!((t.kept, t.given_back), (1, 1));
        // Not limited, or no parked stream left: nothing.
        let mut t = StreamTrials::default();
        for _ in 0..10 {
            assert_eq!(t.on_interval(5e8, 0.3, 4, 8), None);
            assert_eq!(t.on_interval(5e8, 1.0, 8, 8), None);
        }
    }

    #[test]
    fn intervals_hold_their_coverage_on_noise_and_after_the_noise_grows() {
        // A level with multiplicative noise from a fixed seed; then the noise quadruples (cross
        // traffic arrives). The prior is from the calm part only.
        use proptest::prelude::RngExt;
        let mut rng = proptest::test_runner::TestRng::deterministic_rng(proptest::test_runner::RngAlgorithm::ChaCha);
        let mut noise = move || rng.random::<f64>() - 0.5;
        let calm: Vec<f64> = (0..400).map(|_| 5e8 * (1.0 + 0.2 * noise())).collect();
        let rough: Vec<f64> = (0..2000).map(|_| 5e8 * (1.0 + 0.8 * noise())).collect();
        let prior = ratios(&Ewma::new(0.1), std::slice::from_ref(&calm));
        // Steered, the coverage over the rough part stays near 80%; a fixed window of calm
        // ratios (no steering, a window as long as the series) falls far short.
        let steered = calibration(&Ewma::new(0.1), 0.8, 50, 0.02, &prior, &rough);
        let fixed = calibration(&Ewma::new(0.1), 0.8, 10_000, 0.0, &prior, &rough);
        assert!((steered.coverage() - 0.8).abs() < 0.03, "steered {}", steered.coverage());
        assert!(fixed.coverage() < 0.72, "fixed {}", fixed.coverage());
        // And on calm data alone the interval is narrow: within +-10% (the noise is +-10%).
        let calm2: Vec<f64> = (0..1000).map(|_| 5e8 * (1.0 + 0.2 * noise())).collect();
        let c = calibration(&Ewma::new(0.1), 0.8, 50, 0.02, &prior, &calm2);
        assert!((c.coverage() - 0.8).abs() < 0.04, "calm {}", c.coverage());
        assert!(c.mean_width() < 0.2 * 5e8, "width {}", c.mean_width());
    }

    #[test]
    fn no_interval_before_the_window_has_enough_ratios() {
        let mut c = Calibrated::new(&Last::default(), 0.8, 20, 0.0, &[]);
        assert_eq!(c.interval(), None);
        for k in 0..=MIN_RATIOS {
            c.observe(1e8 + k as f64);
        }
        // A rising series: every ratio is above 1, so the interval lies above the prediction.
        let iv = c.interval().expect("an interval");
        assert!(iv.mid < iv.lo && iv.lo <= iv.hi, "{iv:?}");
    }

    #[test]
    fn the_senders_interval_constants_are_what_the_training_traces_give() {
        // make bench-pba's six training traces (pba-0 to pba-5).
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../benches/traces");
        let train: Vec<Vec<f64>> = (0..6)
            .map(|k| {
                let text = std::fs::read_to_string(dir.join(format!("pba-{k}.csv"))).expect("benches/traces");
                let rows: Vec<crate::send::TraceRow> = text.lines().filter_map(crate::send::TraceRow::parse).collect();
                series(&rows, SECOND_INTERVALS, SKIP_INTERVALS)
            })
            .collect();
        let ewma = Ewma::new(SEND_ALPHA);
        assert_eq!(fit_calibration(&ewma, 0.8, &train), (SEND_WINDOW, SEND_GAMMA));
        assert_eq!(prior_quantiles(&ratios(&ewma, &train)), SEND_PRIOR);
    }

    #[test]
    fn the_senders_interval_skips_startup_and_speaks_a_second_at_a_time() {
        let mut s = SecondInterval::default();
        // Idle intervals before the first data, then the startup's, then nine of a second: none.
        for _ in 0..5 {
            s.on_interval(0.0, 0.1);
        }
        for _ in 0..SKIP_INTERVALS + SECOND_INTERVALS - 1 {
            s.on_interval(8e8, 0.1);
        }
        assert_eq!(s.interval(), None);
        // The tenth ends the second: the EWMA predicts 800 Mbit/s, the prior gives the bounds.
        s.on_interval(8e8, 0.1);
        let iv = s.interval().expect("an interval after one second");
        assert!((iv.mid - 8e8).abs() < 1.0, "{iv:?}");
        assert!(iv.lo < iv.mid && iv.mid < iv.hi && iv.lo > 0.4e8, "{iv:?}");
    }

    #[test]
    fn mape_skips_zero_intervals_and_is_scored_before_observing() {
        // 100 vs 0 is skipped; then 0 (the last value) vs 110 is 100% off.
        assert!((mape(&Last::default(), &[100.0, 0.0, 110.0]) - 100.0).abs() < 1e-9);
        assert!(mape(&Last::default(), &[1.0]).is_nan());
    }
}
