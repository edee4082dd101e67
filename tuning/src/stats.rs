//! The sweep's statistics: a point's runs summarised with a 95% confidence interval of the mean
//! (Student's t), the rule that says when a point has been measured enough, and the interval of
//! a ratio of two means (the gain of a setting over the defaults).

use serde::Serialize;

/// Two-sided 97.5% quantiles of Student's t for 1 to 30 degrees of freedom.
const T975: [f64; 30] = [
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069,
    2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
];

/// t such that mean ± t·s/√n covers the mean 95% of the time, for `df` degrees of freedom.
pub fn t95(df: usize) -> f64 {
    match df {
        0 => f64::INFINITY,
        1..=30 => T975[df - 1],
        31..=60 => 2.000,
        61..=120 => 1.980,
        _ => 1.960,
    }
}

/// A point's runs, summarised.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Summary {
    /// Runs.
    pub n: usize,
    /// Mean.
    pub mean: f64,
    /// Sample standard deviation (0 for one run).
    pub sd: f64,
    /// Half-width of the 95% confidence interval of the mean (infinite for one run).
    pub ci95: f64,
    /// Median.
    pub median: f64,
    /// Least.
    pub min: f64,
    /// Greatest.
    pub max: f64,
}

impl Summary {
    /// Summarises `xs` (None when empty or when a value is not finite).
    pub fn of(xs: &[f64]) -> Option<Summary> {
        if xs.is_empty() || xs.iter().any(|x| !x.is_finite()) {
            return None;
        }
        let n = xs.len();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let sd = if n > 1 { (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt() } else { 0.0 };
        let mut s = xs.to_vec();
        s.sort_by(f64::total_cmp);
        let median = if n % 2 == 1 { s[n / 2] } else { (s[n / 2 - 1] + s[n / 2]) / 2.0 };
        let ci95 = if n > 1 { t95(n - 1) * sd / (n as f64).sqrt() } else { f64::INFINITY };
        Some(Summary { n, mean, sd, ci95, median, min: s[0], max: s[n - 1] })
    }

    /// The interval's half-width relative to the mean.
    pub fn rel_ci(&self) -> f64 {
        if self.mean == 0.0 { f64::INFINITY } else { self.ci95 / self.mean.abs() }
    }
}

/// When a point has been measured enough.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Stopping {
    /// Runs every point gets (at least 2, so there is an interval).
    pub min_runs: usize,
    /// Runs no point gets more than.
    pub max_runs: usize,
    /// Done once the 95% interval's half-width is at most this fraction of the mean.
    pub rel_ci: f64,
}

impl Default for Stopping {
    fn default() -> Self {
        Stopping { min_runs: 3, max_runs: 10, rel_ci: 0.05 }
    }
}

impl Stopping {
    /// Whether the runs `xs` of one point are enough: the interval is narrow, or the runs are
    /// at their maximum.
    pub fn done(&self, xs: &[f64]) -> bool {
        if xs.len() >= self.max_runs {
            return true;
        }
        if xs.len() < self.min_runs.max(2) {
            return false;
        }
        Summary::of(xs).is_some_and(|s| s.rel_ci() <= self.rel_ci)
    }
}

/// The ratio of two means with an approximate 95% interval (the relative half-widths combined in
/// quadrature, first order): the gain of `a` over `b`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Ratio {
    /// a's mean over b's.
    pub value: f64,
    /// Lower end of the interval.
    pub lo: f64,
    /// Upper end.
    pub hi: f64,
}

impl Ratio {
    /// a over b.
    pub fn of(a: &Summary, b: &Summary) -> Ratio {
        let value = a.mean / b.mean;
        let r = (a.rel_ci().powi(2) + b.rel_ci().powi(2)).sqrt();
        Ratio { value, lo: value * (1.0 - r).max(0.0), hi: value * (1.0 + r) }
    }

    /// Whether `a` is better than `b` beyond the noise, where better is higher.
    pub fn above_one(&self) -> bool {
        self.lo > 1.0
    }

    /// Whether `a` is better than `b` beyond the noise, where better is lower.
    pub fn below_one(&self) -> bool {
        self.hi < 1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_summary_matches_a_hand_computed_interval() {
        let s = Summary::of(&[10.0, 12.0, 11.0, 13.0, 9.0]).unwrap();
        assert_eq!(s.n, 5);
        assert!((s.mean - 11.0).abs() < 1e-12);
        assert!((s.sd - 2.5f64.sqrt()).abs() < 1e-12);
        // t(4) = 2.776; 2.776 * 1.5811 / 2.2361 = 1.963
        assert!((s.ci95 - 1.963).abs() < 1e-3, "{s:?}");
        assert_eq!((s.median, s.min, s.max), (11.0, 9.0, 13.0));
        assert!(Summary::of(&[]).is_none() && Summary::of(&[1.0, f64::NAN]).is_none());
        assert!(Summary::of(&[4.0]).unwrap().ci95.is_infinite());
    }

    #[test]
    fn a_point_stops_when_its_interval_is_narrow() {
        let rule = Stopping { min_runs: 3, max_runs: 10, rel_ci: 0.05 };
        assert!(!rule.done(&[10.0, 10.0]), "fewer than min_runs");
        assert!(rule.done(&[10.0, 10.1, 9.9]), "1% spread: narrow at three runs");
        assert!(!rule.done(&[10.0, 14.0, 7.0]), "30% spread: wide");
        // Always at least two runs, whatever min_runs says: one run has no interval.
        assert!(!Stopping { min_runs: 1, ..rule }.done(&[10.0]));
    }

    #[test]
    fn a_noisy_point_stops_at_its_maximum() {
        let rule = Stopping { min_runs: 3, max_runs: 6, rel_ci: 0.01 };
        let noisy = [10.0, 14.0, 7.0, 12.0, 8.0, 13.0];
        assert!(!rule.done(&noisy[..5]));
        assert!(rule.done(&noisy), "six runs is the maximum");
    }

    #[test]
    fn a_gain_inside_the_noise_is_not_a_gain() {
        let base = Summary::of(&[10.0, 10.5, 9.5, 10.2, 9.8]).unwrap();
        let clear = Summary::of(&[12.0, 12.2, 11.8, 12.1, 11.9]).unwrap();
        let close = Summary::of(&[10.3, 11.5, 9.4, 10.6, 9.9]).unwrap();
        let g = Ratio::of(&clear, &base);
        assert!(g.above_one() && (g.value - 1.2).abs() < 1e-9 && g.lo < g.value && g.hi > g.value, "{g:?}");
        assert!(!Ratio::of(&close, &base).above_one(), "{:?}", Ratio::of(&close, &base));
        assert!(Ratio::of(&base, &clear).below_one());
    }
}
