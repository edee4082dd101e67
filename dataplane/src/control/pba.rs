//! Predictive bandwidth allocation: the next interval's bandwidth from the history of measured
//! ones. Statistical predictors (last value, EWMA, Holt's trend, additive Holt-Winters), their
//! parameters fitted by grid search on training traces, scored by one-step-ahead MAPE on
//! held-out ones (`make bench-pba`). The sender feeds its choice with each interval's goodput;
//! the prediction sets HDE's effort and is recorded in `--trace-out`.

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

/// One-step-ahead mean absolute percentage error of `p` (fresh) over `series`, in percent;
/// intervals with a zero measurement are skipped (their percentage is undefined).
pub fn mape(p: &dyn Predictor, series: &[f64]) -> f64 {
    let mut p = p.fresh();
    let (mut sum, mut n) = (0.0, 0usize);
    for &x in series {
        if let Some(f) = p.predict()
            && x > 0.0
        {
            sum += (f - x).abs() / x;
            n += 1;
        }
        p.observe(x);
    }
    if n == 0 { f64::NAN } else { 100.0 * sum / n as f64 }
}

/// One-step-ahead weighted absolute percentage error (sum of errors over sum of values), in
/// percent: unlike MAPE, an interval near zero does not dominate it.
pub fn wape(p: &dyn Predictor, series: &[f64]) -> f64 {
    let mut p = p.fresh();
    let (mut err, mut sum) = (0.0, 0.0);
    for &x in series {
        if let Some(f) = p.predict() {
            err += (f - x).abs();
            sum += x.abs();
        }
        p.observe(x);
    }
    if sum == 0.0 { f64::NAN } else { 100.0 * err / sum }
}

/// Mean MAPE over several series.
pub fn mean_mape(p: &dyn Predictor, series: &[Vec<f64>]) -> f64 {
    series.iter().map(|s| mape(p, s)).sum::<f64>() / series.len().max(1) as f64
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
    fn mape_skips_zero_intervals_and_is_scored_before_observing() {
        // 100 vs 0 is skipped; then 0 (the last value) vs 110 is 100% off.
        assert!((mape(&Last::default(), &[100.0, 0.0, 110.0]) - 100.0).abs() < 1e-9);
        assert!(mape(&Last::default(), &[1.0]).is_nan());
    }
}
