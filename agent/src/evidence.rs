//! Evidence for the relay's tuner: per confidence bin, how many requests were escalated or
//! answered locally, and how often the edge agreed with the cloud where the cloud's answer is
//! known — every escalation, plus **audits**: a random fraction of local answers that is also
//! sent to the cloud in the background, never delaying the caller, so the tuner sees how often
//! the edge is wrong *above* the threshold without bias.
//!
//! Counts are per window: the telemetry loop takes them with each report and sends them as a
//! `CalibrationReport`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::{RngExt, SeedableRng};
use tierd_protocol::{BinCounts, MAX_THRESHOLDS_IN_FORCE};

/// Lower bin edges, finer near 1 where thresholds live. The tuner only proposes thresholds on
/// these edges, which its statistics rely on (see `cloud_relay::tuner`).
pub const EDGES: [f32; 20] = [
    0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.925, 0.95, 0.96, 0.97, 0.98, 0.99,
    0.995, 0.998, 0.999,
];

pub fn bin_of(confidence: f32) -> usize {
    EDGES.iter().rposition(|&e| confidence >= e).unwrap_or(0)
}

/// At most `max` grants per second (a fixed one-second window): the cap on the cloud calls
/// audits and the rollout shadow add. Time-dependent only, never on what a request is.
#[derive(Debug)]
pub struct PerSecondCap {
    max: u32,
    window: Mutex<(Instant, u32)>,
}

impl PerSecondCap {
    pub fn new(max: u32) -> Self {
        PerSecondCap {
            max,
            window: Mutex::new((Instant::now(), 0)),
        }
    }

    /// Whether one more is allowed now (and counts it).
    pub fn grant(&self) -> bool {
        let Ok(mut w) = self.window.lock() else {
            return false;
        };
        if w.0.elapsed() >= Duration::from_secs(1) {
            *w = (Instant::now(), 0);
        }
        if w.1 >= self.max {
            return false;
        }
        w.1 += 1;
        true
    }
}

/// One window's counts and the thresholds its requests were decided under, behind one lock so
/// a request never lands in one window with its threshold in another.
#[derive(Debug, Clone, Default)]
struct Counts {
    bins: [BinCounts; EDGES.len()],
    thresholds: Vec<f32>,
    /// More distinct thresholds than the protocol lists.
    overflow: bool,
}

impl Counts {
    fn note(&mut self, threshold: f32) {
        if self.overflow || self.thresholds.contains(&threshold) {
            return;
        }
        if self.thresholds.len() < MAX_THRESHOLDS_IN_FORCE {
            self.thresholds.push(threshold);
        } else {
            self.overflow = true;
        }
    }
}

/// What [`Evidence::take_window`] hands the telemetry loop.
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    pub bins: Vec<BinCounts>,
    /// Every threshold a request of the window was decided under; every bin edge (more than
    /// the protocol's list holds) when there were too many, which the relay treats as unknown.
    pub thresholds: Vec<f32>,
}

#[derive(Debug)]
pub struct Evidence {
    counts: Mutex<Counts>,
    rng: Mutex<rand::rngs::Xoshiro256PlusPlus>,
    cap: PerSecondCap,
    /// f64 bits: remote config changes the rate while requests read it.
    audit_rate: AtomicU64,
}

impl Evidence {
    pub fn new(audit_rate: f64, max_audits_per_second: u32) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        Evidence {
            counts: Mutex::new(Counts::default()),
            rng: Mutex::new(rand::rngs::Xoshiro256PlusPlus::seed_from_u64(seed)),
            cap: PerSecondCap::new(max_audits_per_second),
            audit_rate: AtomicU64::new(audit_rate.to_bits()),
        }
    }

    pub fn audit_rate(&self) -> f64 {
        f64::from_bits(self.audit_rate.load(Ordering::Relaxed))
    }

    /// Applied by remote config; the caller has range-checked it.
    pub fn set_audit_rate(&self, rate: f64) {
        self.audit_rate
            .store(rate.clamp(0.0, 1.0).to_bits(), Ordering::Relaxed);
    }

    fn with_bin(&self, confidence: f32, threshold: Option<f32>, f: impl FnOnce(&mut BinCounts)) {
        if let Ok(mut c) = self.counts.lock() {
            if let Some(t) = threshold {
                c.note(t);
            }
            f(&mut c.bins[bin_of(confidence)]);
        }
    }

    /// An escalated request decided under `threshold`; `agree` is `None` when no cloud answer
    /// came (fallback).
    pub fn record_escalated(&self, confidence: f32, threshold: f32, agree: Option<bool>) {
        self.with_bin(confidence, Some(threshold), |b| {
            b.escalated += 1;
            if let Some(a) = agree {
                b.escalated_labelled += 1;
                b.escalated_agree += u64::from(a);
            }
        });
    }

    /// A request answered locally under `threshold`.
    pub fn record_local(&self, confidence: f32, threshold: f32) {
        self.with_bin(confidence, Some(threshold), |b| b.local += 1);
    }

    /// A completed audit of a local answer.
    pub fn record_audit(&self, confidence: f32, agree: bool) {
        self.with_bin(confidence, None, |b| {
            b.audited += 1;
            b.audited_agree += u64::from(agree);
        });
    }

    /// Whether to audit this local answer: a random draw at the audit rate, then a per-second
    /// cap so a burst of traffic cannot turn into a burst of cloud calls.
    pub fn should_audit(&self) -> bool {
        let rate = self.audit_rate();
        if rate <= 0.0 {
            return false;
        }
        let drawn = self
            .rng
            .lock()
            .map(|mut r| r.random_bool(rate.min(1.0)))
            .unwrap_or(false);
        if !drawn {
            return false;
        }
        self.cap.grant()
    }

    /// The counts since the previous call, which starts a new window.
    pub fn take_window(&self) -> Window {
        let c = match self.counts.lock() {
            Ok(mut c) => std::mem::take(&mut *c),
            Err(_) => Counts::default(),
        };
        Window {
            bins: c.bins.to_vec(),
            thresholds: if c.overflow {
                EDGES.to_vec()
            } else {
                c.thresholds
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bins_follow_the_edges() {
        assert_eq!(bin_of(0.0), 0);
        assert_eq!(bin_of(0.899), 9);
        assert_eq!(bin_of(0.9), 10);
        assert_eq!(bin_of(1.0), EDGES.len() - 1);
        assert_eq!(bin_of(f32::NAN), 0);
    }

    #[test]
    fn counts_land_in_their_bins_and_windows_reset() {
        let e = Evidence::new(0.0, 10);
        e.record_escalated(0.5, 0.9, Some(true));
        e.record_escalated(0.5, 0.9, Some(false));
        e.record_escalated(0.5, 0.95, None);
        e.record_local(0.97, 0.95);
        e.record_audit(0.97, false);
        let taken = e.take_window();
        assert_eq!(taken.thresholds, vec![0.9, 0.95]);
        let w = taken.bins;
        assert_eq!(
            w[bin_of(0.5)],
            BinCounts {
                escalated: 3,
                escalated_labelled: 2,
                escalated_agree: 1,
                ..Default::default()
            }
        );
        assert_eq!((w[bin_of(0.97)].local, w[bin_of(0.97)].audited), (1, 1));
        let empty = e.take_window();
        assert!(empty.bins.iter().all(|b| *b == BinCounts::default()));
        assert!(empty.thresholds.is_empty());
        // More thresholds than the protocol lists: every edge, which the relay reads as unknown.
        for i in 0..=MAX_THRESHOLDS_IN_FORCE {
            e.record_local(0.99, i as f32 / 100.0);
        }
        assert_eq!(e.take_window().thresholds, EDGES.to_vec());
    }

    #[test]
    fn audits_follow_the_rate_and_the_cap() {
        assert!(!(0..1000).any(|_| Evidence::new(0.0, 100).should_audit()));
        let all = Evidence::new(1.0, 5);
        let granted = (0..100).filter(|_| all.should_audit()).count();
        assert_eq!(granted, 5, "capped at 5 per second");
        let some = Evidence::new(0.2, 1_000_000);
        let n = (0..10_000).filter(|_| some.should_audit()).count();
        assert!((1_500..2_500).contains(&n), "{n} of 10000 at 20 %");
    }
}
