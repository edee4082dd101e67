//! HDE's effort controller (`--compress auto`): which zstd level, or none, finishes soonest on
//! the link as it is measured. Beside ACP and PBA, the other controllers a send runs.


/// What one effort setting gives on this data: compression ratio and encode speed per core.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LevelEstimate {
    /// zstd level, or None for no zstd.
    pub level: Option<i32>,
    /// Input bytes per output byte, over the pages zstd works on (literal, delta, raw): zero,
    /// duplicate and XBZRLE pages cost about nothing at every level, so they leave the choice
    /// alone (a chunk of mostly zeros once made level 9 look fast, and kept it on dense data).
    pub ratio: f64,
    /// Such bytes encoded per second on one core.
    pub bytes_per_s: f64,
}

/// Starting estimates for `--compress auto`, from `make bench-hde` on the guest-RAM corpus (one
/// core, the literal and delta pages of round 1); the sender replaces the one in use with what
/// it measures.
pub const DEFAULT_ESTIMATES: [LevelEstimate; 4] = [
    LevelEstimate { level: None, ratio: 1.0, bytes_per_s: 3.0e9 },
    LevelEstimate { level: Some(1), ratio: 2.8, bytes_per_s: 0.35e9 },
    LevelEstimate { level: Some(3), ratio: 3.2, bytes_per_s: 0.25e9 },
    LevelEstimate { level: Some(9), ratio: 3.5, bytes_per_s: 0.06e9 },
];

/// `--compress auto`: the effort that finishes soonest. Encoding on `cores` cores and sending
/// over a link of `link_bps` (bit/s) overlap, so image bytes go out at
/// `min(cores × speed, link / 8 × ratio)`; the level with the highest such rate wins (ties to
/// the cheaper one). A fast link picks little or no compression, a thin one the highest ratio
/// the cores can feed.
pub fn choose_level(link_bps: f64, cores: usize, est: &[LevelEstimate]) -> Option<i32> {
    let rate = |e: &LevelEstimate| (cores.max(1) as f64 * e.bytes_per_s).min(link_bps / 8.0 * e.ratio);
    let mut best: Option<&LevelEstimate> = None;
    for e in est {
        if best.is_none_or(|b| rate(e) > rate(b) * 1.02) {
            best = Some(e);
        }
    }
    best.and_then(|b| b.level)
}

/// How a level is named in reports: `zstd-3`, or `off` for no zstd.
pub fn level_name(level: Option<i32>) -> String {
    level.map_or("off".to_string(), |l| format!("zstd-{l}"))
}

/// `--compress auto`'s state, I/O-free (the caller gives its clock, in seconds, and what it
/// measured): each level's estimate, corrected by what the level in use achieves, and the choice
/// of level every 250 ms for the link as it is seen.
///
/// How compressible the data is applies to every level alike: one learned factor scales each
/// level's default **saving** (`1 - 1/ratio`), so the gaps between levels stay as measured on
/// the corpus whatever the data, and incompressible data (factor near 0) brings every level's
/// ratio to 1. (Scaling the ratios instead lost the gaps: once incompressible data had pressed
/// them all to 1, data that compressed again looked alike at levels 1 and 3, and level 1 stayed.)
#[derive(Debug, Clone)]
pub struct Effort {
    est: Vec<LevelEstimate>,
    /// Learned compressibility: the measured saving over the level's default saving (EWMA).
    factor: f64,
    level: Option<i32>,
    /// The probe's figure of the path (bit/s), until PBA has a prediction.
    probe_bps: f64,
    cores: usize,
    /// When the level was last chosen, and the bytes sent then.
    last: Option<(f64, u64)>,
    /// When no zstd was last left for a look at level 1 (see [`Effort::choose`]).
    explored: f64,
}

/// How often `--compress auto`, without zstd because the data did not compress, looks again.
const EXPLORE_EVERY: f64 = 2.0;

impl Effort {
    /// Starts from [`DEFAULT_ESTIMATES`] at the level they choose for the probe's figure
    /// (`probe_bps`, NaN if none: 1 Gbit/s is assumed) on `cores` encoding cores.
    pub fn new(probe_bps: f64, cores: usize) -> Self {
        let probe_bps = if probe_bps.is_finite() && probe_bps > 0.0 { probe_bps } else { 1e9 };
        Self { est: DEFAULT_ESTIMATES.to_vec(), factor: 1.0, level: choose_level(probe_bps, cores, &DEFAULT_ESTIMATES), probe_bps, cores, last: None, explored: 0.0 }
    }

    /// The level in use.
    pub fn level(&self) -> Option<i32> {
        self.level
    }

    /// What the level in use did: `zstd_bytes` of the pages zstd works on (and whatever else
    /// went with them) became `out_bytes` in `secs`. Its speed moves (EWMA); under zstd, so does
    /// the compressibility factor, and with it every zstd level's ratio (see [`Effort`]).
    pub fn observe(&mut self, zstd_bytes: u64, out_bytes: u64, secs: f64) {
        let Some(cur) = self.est.iter().position(|e| e.level == self.level) else { return };
        if zstd_bytes == 0 || secs <= 0.0 {
            return;
        }
        let measured = zstd_bytes as f64 / out_bytes.max(1) as f64;
        let saving = |ratio: f64| 1.0 - 1.0 / ratio.max(1.0);
        match self.level {
            // No zstd compresses nothing, however compressible the data: only its own
            // measurement moves it.
            None => self.est[cur].ratio = 0.8 * self.est[cur].ratio + 0.2 * measured,
            Some(_) => {
                let seen = saving(measured) / saving(DEFAULT_ESTIMATES[cur].ratio);
                self.factor = 0.8 * self.factor + 0.2 * seen.clamp(0.0, 4.0);
                for (e, d) in self.est.iter_mut().zip(&DEFAULT_ESTIMATES).filter(|(e, _)| e.level.is_some()) {
                    e.ratio = 1.0 / (1.0 - (self.factor * saving(d.ratio)).min(0.99));
                }
            }
        }
        let e = &mut self.est[cur];
        e.bytes_per_s = 0.8 * e.bytes_per_s + 0.2 * (zstd_bytes as f64 / secs);
    }

    /// At `now`, with `sent_bytes` on the wire so far and PBA's prediction of the path
    /// (`predicted_bps`, 0 before it has one): every 250 ms, the level for the link (the larger
    /// of the prediction, or before it the probe's figure, and the wire rate seen since the last
    /// choice). `Some(level)` when it differs from the one in use; [`Effort::set`] it once the
    /// encoder took it. Without zstd, what is sent says nothing of how well the data would
    /// compress (raw pages measure 1.0): when that is why zstd was left (every estimate's ratio
    /// fell to about 1: incompressible data), level 1 gets another look every
    /// [`EXPLORE_EVERY`] seconds, for one choice, so that data that compresses again is
    /// compressed again.
    pub fn choose(&mut self, now: f64, sent_bytes: u64, predicted_bps: f64) -> Option<Option<i32>> {
        let Some((t0, b0)) = self.last else {
            self.last = Some((now, sent_bytes));
            return None;
        };
        if now - t0 < 0.25 {
            return None;
        }
        self.last = Some((now, sent_bytes));
        let seen = sent_bytes.saturating_sub(b0) as f64 * 8.0 / (now - t0);
        let link = if predicted_bps > 0.0 { predicted_bps.max(seen) } else { self.probe_bps.max(seen) };
        let l = choose_level(link, self.cores, &self.est);
        if l.is_none() && self.level.is_none() && self.est.iter().all(|e| e.ratio < 1.05) && now - self.explored >= EXPLORE_EVERY {
            self.explored = now;
            return Some(Some(1));
        }
        (l != self.level).then_some(l)
    }

    /// The level now in use.
    pub fn set(&mut self, level: Option<i32>) {
        self.level = level;
    }
}
