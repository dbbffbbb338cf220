//! Latency histograms per round and the medians across rounds that the report prints.

use std::time::Duration;

use hdrhistogram::Histogram;

/// Latencies of one side of one round, in nanoseconds.
pub struct Recorder(Histogram<u64>);

impl Recorder {
    pub fn new() -> Self {
        // 1 ns .. 60 s at 3 significant digits: sub-microsecond resolution for the ~30 µs forward.
        Recorder(Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("static bounds are valid"))
    }

    pub fn record(&mut self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1);
        self.0.saturating_record(ns);
    }

    pub fn finish(&self) -> Round {
        Round {
            p50_ns: self.0.value_at_quantile(0.50),
            p99_ns: self.0.value_at_quantile(0.99),
            n: self.0.len(),
        }
    }
}

/// p50/p99 of one round.
#[derive(Debug, Clone, Copy)]
pub struct Round {
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub n: u64,
}

/// All rounds of one side of a comparison.
#[derive(Debug, Default, Clone)]
pub struct Series(pub Vec<Round>);

impl Series {
    pub fn push(&mut self, r: Round) {
        self.0.push(r);
    }

    pub fn p50_us(&self) -> f64 {
        median(self.0.iter().map(|r| r.p50_ns as f64)) / 1e3
    }

    pub fn p99_us(&self) -> f64 {
        median(self.0.iter().map(|r| r.p99_ns as f64)) / 1e3
    }

    pub fn samples(&self) -> u64 {
        self.0.iter().map(|r| r.n).sum()
    }
}

/// Ratios `b / a` of the per-round p50s: (min, max), to show how much the rounds disagree.
pub fn round_ratio_range(a: &Series, b: &Series) -> (f64, f64) {
    let ratios: Vec<f64> =
        a.0.iter()
            .zip(&b.0)
            .map(|(x, y)| y.p50_ns as f64 / x.p50_ns.max(1) as f64)
            .collect();
    let min = ratios.iter().copied().fold(f64::INFINITY, f64::min);
    let max = ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (min, max)
}

/// Median of the values (mean of the middle two for an even count); NaN when empty.
pub fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_odd_even_empty() {
        assert_eq!(median([3.0, 1.0, 2.0].into_iter()), 2.0);
        assert_eq!(median([4.0, 1.0, 2.0, 3.0].into_iter()), 2.5);
        assert!(median(std::iter::empty()).is_nan());
    }

    #[test]
    fn recorder_quantiles() {
        let mut r = Recorder::new();
        for us in 1..=100u64 {
            r.record(Duration::from_micros(us));
        }
        let round = r.finish();
        assert_eq!(round.n, 100);
        assert!(
            (49_900..=50_100).contains(&round.p50_ns),
            "{}",
            round.p50_ns
        );
        assert!(
            (98_900..=99_100).contains(&round.p99_ns),
            "{}",
            round.p99_ns
        );
    }
}
