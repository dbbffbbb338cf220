//! The shadow: a candidate model run beside the serving one on a uniform random sample of live
//! requests, off the request path, each sampled request labelled by the cloud model (the
//! escalation's answer when the serving model escalated it, a background audit otherwise).
//! Counts per bin of each model's own confidence and paired, per telemetry window, for the
//! relay's rollout decision (`cloud_relay::rollout::decide`).
//!
//! Sampling is a random draw at the rollout's `shadow_rate`, then a per-second cap on the cloud
//! calls it adds (the audit limiter's rule): whether a request is sampled depends on when it
//! came, never on what it is, so the labelled pairs are a uniform sample of the traffic.

use std::sync::Mutex;

use rand::{RngExt, SeedableRng};
use tierd_protocol::rollout::Labelled;

use crate::evidence::{bin_of, PerSecondCap, EDGES};

/// One window's paired counts.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ShadowCounts {
    pub current: [Labelled; EDGES.len()],
    pub candidate: [Labelled; EDGES.len()],
    pub current_only: u64,
    pub candidate_only: u64,
}

impl ShadowCounts {
    pub fn pairs(&self) -> u64 {
        self.current.iter().map(|b| b.requests).sum()
    }
}

/// What one sampled request showed: each model's confidence and whether its top class was
/// the cloud's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pair {
    pub current_confidence: f32,
    pub current_agrees: bool,
    pub candidate_confidence: f32,
    pub candidate_agrees: bool,
}

/// A candidate in shadow, with its counts. `M` is the model type (tract's in production).
#[derive(Debug)]
pub struct Shadow<M> {
    pub rollout_id: String,
    /// `name@version` of the candidate.
    pub candidate_id: String,
    pub candidate: M,
    rate: f64,
    counts: Mutex<ShadowCounts>,
    rng: Mutex<rand::rngs::Xoshiro256PlusPlus>,
    cap: PerSecondCap,
}

impl<M> Shadow<M> {
    pub fn new(
        rollout_id: &str,
        candidate_id: &str,
        candidate: M,
        rate: f64,
        max_per_second: u32,
    ) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(7, |d| d.as_nanos() as u64);
        Shadow {
            rollout_id: rollout_id.to_string(),
            candidate_id: candidate_id.to_string(),
            candidate,
            rate: rate.clamp(0.0, 1.0),
            counts: Mutex::new(ShadowCounts::default()),
            rng: Mutex::new(rand::rngs::Xoshiro256PlusPlus::seed_from_u64(seed)),
            cap: PerSecondCap::new(max_per_second),
        }
    }

    /// Whether to shadow this request: a draw at the rate, then the per-second cap.
    pub fn sample(&self) -> bool {
        let drawn = self
            .rng
            .lock()
            .map(|mut r| r.random_bool(self.rate))
            .unwrap_or(false);
        if !drawn {
            return false;
        }
        self.cap.grant()
    }

    pub fn record(&self, p: Pair) {
        let Ok(mut c) = self.counts.lock() else {
            return;
        };
        let cur = &mut c.current[bin_of(p.current_confidence)];
        cur.requests += 1;
        cur.agree += u64::from(p.current_agrees);
        let cand = &mut c.candidate[bin_of(p.candidate_confidence)];
        cand.requests += 1;
        cand.agree += u64::from(p.candidate_agrees);
        match (p.current_agrees, p.candidate_agrees) {
            (true, false) => c.current_only += 1,
            (false, true) => c.candidate_only += 1,
            _ => {}
        }
    }

    /// The counts since the previous call.
    pub fn take_window(&self) -> ShadowCounts {
        self.counts
            .lock()
            .map(|mut c| std::mem::take(&mut *c))
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_land_in_each_models_bins_and_discordance_is_counted() {
        let s = Shadow::new("r", "m@2", (), 1.0, 100);
        assert!(s.sample());
        s.record(Pair {
            current_confidence: 0.55,
            current_agrees: false,
            candidate_confidence: 0.97,
            candidate_agrees: true,
        });
        s.record(Pair {
            current_confidence: 0.999,
            current_agrees: true,
            candidate_confidence: 0.999,
            candidate_agrees: true,
        });
        let w = s.take_window();
        assert_eq!(w.pairs(), 2);
        assert_eq!(w.current[bin_of(0.55)].requests, 1);
        assert_eq!(w.candidate[bin_of(0.97)].agree, 1);
        assert_eq!((w.current_only, w.candidate_only), (0, 1));
        assert_eq!(s.take_window().pairs(), 0, "a new window");
    }

    #[test]
    fn the_rate_and_the_cap_bound_the_sample() {
        let never = Shadow::new("r", "m@2", (), 0.0, 100);
        assert!((0..1000).all(|_| !never.sample()));
        let capped = Shadow::new("r", "m@2", (), 1.0, 5);
        assert_eq!((0..100).filter(|_| capped.sample()).count(), 5);
        let half = Shadow::new("r", "m@2", (), 0.5, u32::MAX);
        let n = (0..10_000).filter(|_| half.sample()).count();
        assert!((4_500..5_500).contains(&n), "{n}");
    }
}
