//! One replay: the stream goes through the cascade rule and the tuner exactly as in the
//! daemons, with audits drawn from a seeded generator. Pure over precomputed model outputs,
//! so hundreds of seeded replays take seconds.

use std::collections::VecDeque;

use cloud_relay::fleet;
use cloud_relay::tuner::{self, Certificate, Costs, DeviceCosts, Limits, Policy};
use edge_agent::cascade;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use tierd_protocol::BinCounts;

/// One request with both models' answers, computed once.
#[derive(Debug, Clone, Copy)]
pub struct Item {
    pub confidence: f32,
    pub edge_top1: u8,
    pub cloud_top1: u8,
    pub label: u8,
    pub phase: usize,
}

impl Item {
    pub fn agree(&self) -> bool {
        self.edge_top1 == self.cloud_top1
    }
}

/// The agent's bin edges, so the replay bins exactly as the daemons do.
pub use edge_agent::evidence::{bin_of, EDGES};

#[derive(Debug, Clone)]
pub struct Config {
    pub target: f64,
    pub delta: f64,
    pub audit_rate: f64,
    pub initial_threshold: f32,
    /// Requests of evidence the tuner looks at (sliding).
    pub window: usize,
    pub retune_every: usize,
    pub report_every: usize,
    pub min_requests: u64,
}

/// What one report window saw.
#[derive(Debug, Clone, Default)]
pub struct Row {
    pub start: usize,
    pub phase: usize,
    pub threshold: f32,
    pub requests: usize,
    pub agreement: f64,
    pub escalation_rate: f64,
    pub oracle_rate: f64,
    pub accuracy: f64,
    pub audits: usize,
}

/// A certificate the tuner issued, and the truth about it.
#[derive(Debug, Clone)]
pub struct Issued {
    pub certificate: Certificate,
    /// Agreement the certified threshold has over the whole current phase (the population
    /// the evidence was drawn from).
    pub true_agreement: f64,
    /// The evidence window lay entirely inside one phase (exchangeable), so the guarantee
    /// applies; false while drift is washing through the window.
    pub clean: bool,
}

#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub rows: Vec<Row>,
    pub issued: Vec<Issued>,
    pub escalations: usize,
    pub audits: usize,
}

#[derive(Clone, Copy)]
struct Evidence {
    bin: usize,
    escalated: bool,
    labelled: bool,
    agree: bool,
    phase: usize,
}

impl Evidence {
    /// This request's contribution to its bin, as the agent counts it.
    fn counts(&self) -> BinCounts {
        let agree = u64::from(self.agree);
        if self.escalated {
            BinCounts {
                escalated: 1,
                escalated_labelled: 1,
                escalated_agree: agree,
                ..BinCounts::default()
            }
        } else {
            let audited = u64::from(self.labelled);
            BinCounts {
                local: 1,
                audited,
                audited_agree: audited * agree,
                ..BinCounts::default()
            }
        }
    }
}

/// Agreement over all `items` if answered at threshold `t`.
pub fn agreement_at(items: &[Item], t: f32) -> f64 {
    if items.is_empty() {
        return 1.0;
    }
    let wrong = items
        .iter()
        .filter(|i| !cascade::should_escalate(i.confidence, t) && !i.agree())
        .count();
    1.0 - wrong as f64 / items.len() as f64
}

/// Replays `phases` (each a population of items) in order. `seed` shuffles each phase and
/// draws the audits; seed 0 keeps the file order.
pub fn run(phases: &[Vec<Item>], cfg: &Config, seed: u64) -> Outcome {
    let mut rng = rand::rngs::Xoshiro256PlusPlus::seed_from_u64(seed);
    let mut stream: Vec<Item> = Vec::new();
    for p in phases {
        let mut p = p.clone();
        if seed != 0 {
            p.shuffle(&mut rng);
        }
        stream.extend(p);
    }
    let mut counts = vec![BinCounts::default(); EDGES.len()];
    let limits = Limits {
        min_requests: cfg.min_requests,
        ..Limits::default()
    };
    let costs = Costs::default();
    let policy = Policy::TargetAgreement {
        target: cfg.target,
        delta: cfg.delta,
    };
    let mut window: VecDeque<Evidence> = VecDeque::with_capacity(cfg.window + 1);
    let mut threshold = cfg.initial_threshold;
    let mut out = Outcome::default();
    let mut row = Row::default();
    let mut row_agree = 0usize;
    let mut row_esc = 0usize;
    let mut row_oracle = 0usize;
    let mut row_correct = 0usize;
    for (i, item) in stream.iter().enumerate() {
        if row.requests == 0 {
            row = Row {
                start: i,
                phase: item.phase,
                threshold,
                ..Row::default()
            };
        }
        let escalated = cascade::should_escalate(item.confidence, threshold);
        let audited = !escalated && rng.random_bool(cfg.audit_rate);
        let answer = if escalated {
            item.cloud_top1
        } else {
            item.edge_top1
        };
        row.requests += 1;
        row_agree += usize::from(answer == item.cloud_top1);
        row_esc += usize::from(escalated);
        row_oracle += usize::from(!item.agree());
        row_correct += usize::from(answer == item.label);
        row.audits += usize::from(audited);
        out.escalations += usize::from(escalated);
        out.audits += usize::from(audited);

        let e = Evidence {
            bin: bin_of(item.confidence),
            escalated,
            labelled: escalated || audited,
            agree: item.agree(),
            phase: item.phase,
        };
        counts[e.bin] = counts[e.bin].plus(e.counts());
        window.push_back(e);
        if window.len() > cfg.window {
            if let Some(old) = window.pop_front() {
                counts[old.bin] = counts[old.bin].minus(old.counts());
            }
        }

        if (i + 1) % cfg.retune_every == 0 {
            let cert = tuner::tune(
                // The same conversion the relay applies to the agents' reports.
                &fleet::tuner_bins(&EDGES, &counts),
                policy,
                threshold,
                &limits,
                &costs,
                &DeviceCosts::default(),
            );
            if !cert.insufficient_evidence {
                threshold = cert.threshold;
                let phase = item.phase;
                let clean = window.iter().all(|e| e.phase == phase) && window.len() == cfg.window;
                out.issued.push(Issued {
                    true_agreement: agreement_at(&phases[phase], cert.threshold),
                    certificate: cert,
                    clean,
                });
            }
        }
        if row.requests == cfg.report_every || i + 1 == stream.len() {
            let n = row.requests as f64;
            row.agreement = row_agree as f64 / n;
            row.escalation_rate = row_esc as f64 / n;
            row.oracle_rate = row_oracle as f64 / n;
            row.accuracy = row_correct as f64 / n;
            out.rows.push(std::mem::take(&mut row));
            row_agree = 0;
            row_esc = 0;
            row_oracle = 0;
            row_correct = 0;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn synthetic(n: usize, phase: usize) -> Vec<Item> {
        // Confidence spread evenly; the edge is wrong on every 5th item below 0.8 only.
        (0..n)
            .map(|i| {
                let confidence = (i % 100) as f32 / 100.0;
                let wrong = confidence < 0.8 && i % 5 == 0;
                Item {
                    confidence,
                    edge_top1: if wrong { 1 } else { 0 },
                    cloud_top1: 0,
                    label: 0,
                    phase,
                }
            })
            .collect()
    }

    fn cfg() -> Config {
        Config {
            target: 0.99,
            delta: 0.05,
            audit_rate: 0.05,
            initial_threshold: 0.9,
            window: 5000,
            retune_every: 500,
            report_every: 1000,
            min_requests: 1000,
        }
    }

    #[test]
    fn bins_cover_zero_to_one() {
        assert_eq!(bin_of(0.0), 0);
        assert_eq!(bin_of(0.95), 12);
        assert_eq!(bin_of(1.0), EDGES.len() - 1);
        assert_eq!(bin_of(0.9995), EDGES.len() - 1);
    }

    #[test]
    fn tuner_finds_the_safe_region_and_keeps_the_target() {
        // Every local answer audited and a window as long as the stream: the tuner settles on
        // 0.8, the lowest threshold whose region never disagrees (0.75 would sit at 0.99).
        let phases = vec![synthetic(20_000, 0)];
        let c = Config {
            audit_rate: 1.0,
            window: 20_000,
            ..cfg()
        };
        let out = run(&phases, &c, 7);
        let last = out.issued.last().expect("certificates issued");
        assert!(
            (last.certificate.threshold - 0.8).abs() < 1e-6,
            "{:?}",
            last.certificate
        );
        assert!(last.true_agreement >= 0.99, "{last:?}");
        assert!(
            out.rows.iter().all(|r| r.agreement >= 0.98),
            "{:?}",
            out.rows
        );
    }

    #[test]
    fn thin_audits_stay_conservative_never_wrong() {
        // 2 % audits cannot certify the local region for long: the threshold goes up rather
        // than below the target. No clean certificate may be violated on any seed.
        let phases = vec![synthetic(20_000, 0)];
        let c = Config {
            audit_rate: 0.02,
            ..cfg()
        };
        for seed in 1..=20 {
            let out = run(&phases, &c, seed);
            for i in out.issued.iter().filter(|i| i.clean) {
                assert!(i.true_agreement >= 0.99, "seed {seed}: {i:?}");
            }
        }
    }

    #[test]
    fn replays_are_reproducible_per_seed() {
        let phases = vec![synthetic(5_000, 0)];
        let a = run(&phases, &cfg(), 3);
        let b = run(&phases, &cfg(), 3);
        assert_eq!(a.escalations, b.escalations);
        assert_eq!(a.audits, b.audits);
        assert!(a.audits > 0);
    }
}
