//! **Where the threshold is tuned.** Pure: evidence and policy in, a threshold and its
//! certificate out. No I/O, no clock; the caller decides when to run it and whether to push.
//!
//! # Evidence
//! Per confidence bin, the requests the device saw, split by how they were handled then:
//! - *escalated* (confidence below the threshold in force): every one has a cloud answer, so
//!   edge/cloud agreement is known for all of them;
//! - *answered locally*: a uniform random fraction was **audited** (sent to the cloud in the
//!   background), so agreement is known for a uniform sample of them.
//!
//! # `target_agreement`: the lowest threshold whose agreement is certified
//! Answering locally everything at or above threshold `t` (and escalating the rest, which then
//! agrees with the cloud by definition) gives agreement `A(t) = 1 − Σ_b π_b·d_b` over the bins
//! `b` at or above `t`, where `π_b` is the bin's share of traffic (known exactly: every request
//! is counted) and `d_b` its edge/cloud disagreement rate. Thresholds are always bin edges, so
//! whether a request in bin `b` was escalated depends only on *when* it came, not on what it
//! was; under exchangeability both its escalated requests and its audited ones are independent
//! draws from the bin, and pooling them gives `k_b` disagreements in `n_b` labelled requests.
//! Each `d_b` gets a one-sided exact Clopper–Pearson upper bound `U_b` at level `δ/m` (`m`
//! bins in the region: Bonferroni), so
//! `LB(t) = 1 − Σ_b π_b·U_b` holds with probability ≥ 1 − δ.
//! Pooling per bin matters: evidence gathered while a bin was escalated keeps certifying it
//! after the threshold drops below it, until the sliding window forgets it.
//!
//! Candidate thresholds are tested from the most conservative down (escalate everything, then
//! each bin edge in decreasing order), stopping at the first that fails: fixed-sequence testing,
//! which keeps the family-wise error at δ without a multiplicity correction because
//! agreement only falls as the threshold falls (Learn-then-Test, Angelopoulos et al. 2021;
//! selective risk, Geifman & El-Yaniv 2017). The threshold chosen is the last one that passed.
//!
//! Assumptions: requests are exchangeable within the window (the window slides so drift is
//! forgotten), audits are a uniform random sample of locally answered requests, thresholds sit
//! on bin edges, and the cloud model is the reference ("agreement", not accuracy).
//! With fewer than `min_requests` in the window the current threshold is kept and the
//! certificate says so.
//!
//! # `budget` and `min_cost`
//! `budget` takes the highest threshold (most agreement) whose escalation rate stays at or
//! below a ceiling. `min_cost` minimizes expected cost per request over the candidates:
//! local energy + P(escalate)·(radio energy + cloud price + latency cost) + P(disagree)·error
//! cost, with energy and latency from the device's telemetry. If the device's escalation
//! round trip p95 exceeds its latency SLO, each escalation also pays the SLO penalty.

use serde::{Deserialize, Serialize};
use statrs::distribution::{Beta, ContinuousCDF};

/// Known outcomes in one stratum of one bin.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcomes {
    /// Requests whose cloud answer is known.
    pub labelled: u64,
    /// Of those, how many had the same top-1 at the edge and in the cloud.
    pub agree: u64,
}

impl Outcomes {
    pub fn disagree(&self) -> u64 {
        self.labelled.saturating_sub(self.agree)
    }
}

/// One confidence bin `[lower, upper)` of the sliding window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Bin {
    pub lower: f32,
    pub upper: f32,
    /// Requests escalated (all labelled: `escalated.labelled` should equal this).
    pub escalated_requests: u64,
    pub escalated: Outcomes,
    /// Requests answered locally; `audited` is the uniform sample of them with cloud answers.
    pub local_requests: u64,
    pub audited: Outcomes,
}

impl Bin {
    pub fn requests(&self) -> u64 {
        self.escalated_requests + self.local_requests
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "policy", rename_all = "snake_case")]
pub enum Policy {
    /// Lowest threshold whose (1 − delta) lower bound on agreement is at least `target`.
    TargetAgreement { target: f64, delta: f64 },
    /// Highest threshold whose escalation rate is at most `max_escalation_rate`.
    Budget { max_escalation_rate: f64 },
    /// Lowest expected cost per request.
    MinCost,
}

/// What a request costs, for `min_cost` and for the certificate's cost figure.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Costs {
    /// Price of a joule on the device (money units per J).
    pub per_joule: f64,
    /// Price of one cloud call.
    pub per_cloud_call: f64,
    /// Price of one second of added latency per request.
    pub per_latency_second: f64,
    /// Price of one answer that disagrees with the cloud.
    pub per_disagreement: f64,
    /// Paid per escalation while the device's escalation p95 exceeds `latency_slo_s`.
    pub per_slo_violation: f64,
    pub latency_slo_s: f64,
}

impl Default for Costs {
    /// Nothing priced (a one-second latency SLO, unpenalized).
    fn default() -> Self {
        Costs {
            per_joule: 0.0,
            per_cloud_call: 0.0,
            per_latency_second: 0.0,
            per_disagreement: 0.0,
            per_slo_violation: 0.0,
            latency_slo_s: 1.0,
        }
    }
}

/// The device's measured figures, from its latest telemetry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceCosts {
    /// Joules per local inference (compute).
    pub local_joules: f64,
    /// Modelled radio joules per escalation.
    pub radio_joules: f64,
    /// Escalation round trip p50 and p95, seconds.
    pub escalation_p50_s: f64,
    pub escalation_p95_s: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    pub min_threshold: f32,
    pub max_threshold: f32,
    /// Below this many requests in the window, keep the current threshold.
    pub min_requests: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            min_threshold: 0.0,
            max_threshold: ALWAYS_ESCALATE,
            min_requests: 1000,
        }
    }
}

/// A threshold above every confidence: escalate everything. Always meets any agreement target.
pub const ALWAYS_ESCALATE: f32 = 1.01;

/// The tuner's answer and why it is safe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Certificate {
    pub threshold: f32,
    pub policy: Policy,
    /// Point estimate of agreement with the cloud at `threshold`.
    pub agreement: f64,
    /// One-sided (1 − delta) lower bound on it (delta of the policy, or 0.05 for the others).
    pub agreement_lower_bound: f64,
    pub delta: f64,
    pub escalation_rate: f64,
    /// Expected cost of 1,000 requests at `threshold`, in the config's money units.
    pub cost_per_1000: f64,
    pub requests: u64,
    pub labelled_escalated: u64,
    pub audited: u64,
    /// True when the window was too small to tune and the current threshold was kept.
    pub insufficient_evidence: bool,
    pub note: String,
}

/// Exact one-sided upper confidence bound on a binomial proportion (Clopper–Pearson):
/// with probability ≥ 1 − `alpha`, the true rate is at most this.
pub fn clopper_pearson_upper(successes: u64, trials: u64, alpha: f64) -> f64 {
    if trials == 0 || successes >= trials {
        return 1.0;
    }
    let a = successes as f64 + 1.0;
    let b = (trials - successes) as f64;
    Beta::new(a, b).map_or(1.0, |d| d.inverse_cdf(1.0 - alpha).clamp(0.0, 1.0))
}

fn total_requests(bins: &[Bin]) -> u64 {
    bins.iter().map(Bin::requests).sum()
}

/// Point estimate and lower bound of agreement at `t` (see the module docs).
fn agreement_at(bins: &[Bin], t: f32, delta: f64) -> (f64, f64) {
    let n = total_requests(bins) as f64;
    if n == 0.0 {
        return (1.0, 0.0);
    }
    let region: Vec<&Bin> = bins
        .iter()
        .filter(|b| b.lower >= t && b.requests() > 0)
        .collect();
    let m = region.len().max(1) as f64;
    let (mut estimate, mut lower) = (1.0, 1.0);
    for b in region {
        let pi = b.requests() as f64 / n;
        let labelled = b.escalated.labelled + b.audited.labelled;
        let disagree = b.escalated.disagree() + b.audited.disagree();
        if labelled > 0 {
            estimate -= pi * disagree as f64 / labelled as f64;
        }
        lower -= pi * clopper_pearson_upper(disagree, labelled, delta / m);
    }
    (estimate.clamp(0.0, 1.0), lower.clamp(0.0, 1.0))
}

fn escalation_rate_at(bins: &[Bin], t: f32) -> f64 {
    let n = total_requests(bins);
    if n == 0 {
        return 0.0;
    }
    let below: u64 = bins.iter().filter(|b| b.lower < t).map(Bin::requests).sum();
    below as f64 / n as f64
}

fn cost_per_request(c: &Costs, d: &DeviceCosts, escalation_rate: f64, agreement: f64) -> f64 {
    let slo = if d.escalation_p95_s > c.latency_slo_s {
        c.per_slo_violation
    } else {
        0.0
    };
    let per_escalation = d.radio_joules * c.per_joule
        + c.per_cloud_call
        + d.escalation_p50_s * c.per_latency_second
        + slo;
    d.local_joules * c.per_joule
        + escalation_rate * per_escalation
        + (1.0 - agreement) * c.per_disagreement
}

/// Candidate thresholds from the most conservative down: always-escalate, then bin lower
/// edges in decreasing order, within the limits.
fn candidates(bins: &[Bin], limits: &Limits) -> Vec<f32> {
    let mut edges: Vec<f32> = bins.iter().map(|b| b.lower).collect();
    edges.push(ALWAYS_ESCALATE);
    edges.retain(|t| (limits.min_threshold..=limits.max_threshold).contains(t));
    edges.sort_by(|a, b| b.total_cmp(a));
    edges.dedup();
    if edges.is_empty() {
        edges.push(limits.max_threshold);
    }
    edges
}

/// Proposes a threshold for one device.
pub fn tune(
    bins: &[Bin],
    policy: Policy,
    current: f32,
    limits: &Limits,
    costs: &Costs,
    device: &DeviceCosts,
) -> Certificate {
    let delta = match policy {
        Policy::TargetAgreement { delta, .. } => delta,
        _ => 0.05,
    };
    let n = total_requests(bins);
    let labelled_escalated = bins.iter().map(|b| b.escalated.labelled).sum();
    let audited = bins.iter().map(|b| b.audited.labelled).sum();
    let certify = |t: f32, insufficient: bool, note: String| {
        let (agreement, lower) = agreement_at(bins, t, delta);
        let esc = escalation_rate_at(bins, t);
        Certificate {
            threshold: t,
            policy,
            agreement,
            agreement_lower_bound: lower,
            delta,
            escalation_rate: esc,
            cost_per_1000: 1000.0 * cost_per_request(costs, device, esc, agreement),
            requests: n,
            labelled_escalated,
            audited,
            insufficient_evidence: insufficient,
            note,
        }
    };
    if n < limits.min_requests {
        return certify(
            current,
            true,
            format!(
                "{n} requests in the window, fewer than the {} needed; threshold kept",
                limits.min_requests
            ),
        );
    }
    let cands = candidates(bins, limits);
    match policy {
        Policy::TargetAgreement { target, delta } => {
            let mut chosen = None;
            for &t in &cands {
                let (_, lower) = agreement_at(bins, t, delta);
                if t >= ALWAYS_ESCALATE || lower >= target {
                    chosen = Some(t);
                } else {
                    break;
                }
            }
            match chosen {
                Some(t) => certify(
                    t,
                    false,
                    format!("lowest threshold whose {:.0} % lower bound on agreement meets {target}", 100.0 * (1.0 - delta)),
                ),
                // Only when max_threshold < ALWAYS_ESCALATE and even it fails.
                None => certify(
                    cands[0],
                    false,
                    format!("no threshold within the limits certifies {target}; using the most conservative allowed"),
                ),
            }
        }
        Policy::Budget {
            max_escalation_rate,
        } => {
            let t = cands
                .iter()
                .copied()
                .find(|&t| escalation_rate_at(bins, t) <= max_escalation_rate)
                .unwrap_or(*cands.last().unwrap_or(&limits.min_threshold));
            certify(
                t,
                false,
                format!("highest threshold escalating at most {max_escalation_rate} of requests"),
            )
        }
        Policy::MinCost => {
            let t = cands
                .iter()
                .copied()
                .map(|t| {
                    let (agreement, _) = agreement_at(bins, t, delta);
                    let c = cost_per_request(costs, device, escalation_rate_at(bins, t), agreement);
                    (t, c)
                })
                .min_by(|a, b| a.1.total_cmp(&b.1))
                .map_or(current, |(t, _)| t);
            certify(t, false, "lowest expected cost per request".into())
        }
    }
}

/// What the relay tunes with (relay.toml `[tuning]` and `[prices]`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Setup {
    pub policy: Policy,
    pub limits: Limits,
    pub costs: Costs,
}

impl Default for Setup {
    /// 99 % agreement with the cloud at 95 % confidence; nothing priced.
    fn default() -> Self {
        Setup {
            policy: Policy::TargetAgreement {
                target: 0.99,
                delta: 0.05,
            },
            limits: Limits::default(),
            costs: Costs::default(),
        }
    }
}

/// Point estimate and (1 − delta) lower bound of agreement with the cloud if the device ran
/// at threshold `t` (for reports; the tuner uses the same computation).
pub fn estimate_agreement(bins: &[Bin], t: f32, delta: f64) -> (f64, f64) {
    agreement_at(bins, t, delta)
}

/// Guard rails on pushing a new threshold to a device.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PushRules {
    /// Smallest change worth a push.
    pub hysteresis: f32,
    pub min_interval_ms: u64,
}

/// Whether to push `proposed` now. A pinned device never gets a tuned value.
pub fn should_push(
    current: f32,
    proposed: &Certificate,
    pinned: bool,
    last_push_ms: Option<u64>,
    now_ms: u64,
    rules: &PushRules,
) -> bool {
    if pinned || proposed.insufficient_evidence {
        return false;
    }
    if let Some(last) = last_push_ms {
        if now_ms.saturating_sub(last) < rules.min_interval_ms {
            return false;
        }
    }
    (proposed.threshold - current).abs() >= rules.hysteresis
}

#[cfg(test)]
mod tests {
    use super::*;

    const EDGES: [f32; 11] = [0.0, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.96, 0.98, 0.99];

    /// Bins with known disagreement rates, all handled at threshold `tau`, audit rate 1/`every`.
    fn bins(requests_per_bin: u64, disagree: &[f64], tau: f32, every: u64) -> Vec<Bin> {
        EDGES
            .iter()
            .enumerate()
            .map(|(i, &lower)| {
                let upper = EDGES.get(i + 1).copied().unwrap_or(1.0);
                let wrong = (requests_per_bin as f64 * disagree[i]).round() as u64;
                let mut b = Bin {
                    lower,
                    upper,
                    ..Default::default()
                };
                if lower < tau {
                    b.escalated_requests = requests_per_bin;
                    b.escalated = Outcomes {
                        labelled: requests_per_bin,
                        agree: requests_per_bin - wrong,
                    };
                } else {
                    b.local_requests = requests_per_bin;
                    let audited = requests_per_bin / every;
                    let audited_wrong = (audited as f64 * disagree[i]).round() as u64;
                    b.audited = Outcomes {
                        labelled: audited,
                        agree: audited - audited_wrong,
                    };
                }
                b
            })
            .collect()
    }

    const DISAGREE: [f64; 11] = [0.6, 0.4, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01, 0.004, 0.002, 0.0];

    fn costs() -> Costs {
        Costs {
            per_joule: 0.0,
            per_cloud_call: 1.0,
            per_latency_second: 0.0,
            per_disagreement: 8.0,
            per_slo_violation: 0.0,
            latency_slo_s: 1.0,
        }
    }

    /// `target_agreement` at δ = 0.05 with the default limits and test prices.
    fn at_target(b: &[Bin], target: f64, current: f32) -> Certificate {
        tune(
            b,
            Policy::TargetAgreement {
                target,
                delta: 0.05,
            },
            current,
            &Limits::default(),
            &costs(),
            &DeviceCosts::default(),
        )
    }

    #[test]
    fn clopper_pearson_matches_known_values() {
        // 0 of 299: the rule of three gives ~3/n at 95 % one-sided.
        let u = clopper_pearson_upper(0, 299, 0.05);
        assert!((u - 0.00997).abs() < 2e-4, "{u}");
        // 5 of 100 at 95 % one-sided: scipy.stats.beta.ppf(0.95, 6, 95) = 0.102253.
        let u = clopper_pearson_upper(5, 100, 0.05);
        assert!((u - 0.102253).abs() < 1e-5, "{u}");
        assert_eq!(clopper_pearson_upper(0, 0, 0.05), 1.0);
        assert_eq!(clopper_pearson_upper(7, 7, 0.05), 1.0);
    }

    #[test]
    fn target_met_at_the_known_threshold_with_plenty_of_evidence() {
        // Everything audited: the answer follows from the rates alone. Answering locally from
        // 0.93 up disagrees on (0.01 + 0.004 + 0.002 + 0) / 11 = 0.15 % of traffic; from 0.9 up
        // on 0.33 %; from 0.85 on 0.78 %; from 0.8 on 1.7 % — so a 0.99 target lands on 0.85.
        let b = bins(100_000, &DISAGREE, 0.0, 1);
        let c = at_target(&b, 0.99, 0.9);
        assert_eq!(c.threshold, 0.85, "{c:?}");
        assert!(c.agreement_lower_bound >= 0.99 && c.agreement > c.agreement_lower_bound);
        assert!(!c.insufficient_evidence);
        assert!((c.escalation_rate - 5.0 / 11.0).abs() < 1e-9);
    }

    #[test]
    fn thin_evidence_is_conservative_and_too_little_keeps_the_threshold() {
        // Same rates, 1 % audits of few requests: the bound is loose, so a higher threshold.
        let b = bins(2_000, &DISAGREE, 0.9, 100);
        let c = at_target(&b, 0.99, 0.9);
        assert!(c.threshold > 0.85, "{c:?}");
        assert!(c.agreement_lower_bound >= 0.99, "{c:?}");
        let tiny = bins(50, &DISAGREE, 0.9, 1);
        let c = at_target(&tiny, 0.99, 0.77);
        assert!(c.insufficient_evidence, "{c:?}");
        assert_eq!(c.threshold, 0.77);
    }

    #[test]
    fn more_demanding_targets_never_lower_the_threshold() {
        let b = bins(20_000, &DISAGREE, 0.8, 10);
        let mut last = 0.0;
        for target in [0.9, 0.95, 0.98, 0.99, 0.995, 0.999] {
            let c = at_target(&b, target, 0.9);
            assert!(c.threshold >= last, "target {target}: {c:?}");
            last = c.threshold;
        }
    }

    #[test]
    fn budget_binds_and_limits_hold() {
        let b = bins(10_000, &DISAGREE, 0.9, 10);
        let c = tune(
            &b,
            Policy::Budget {
                max_escalation_rate: 0.3,
            },
            0.9,
            &Limits::default(),
            &costs(),
            &DeviceCosts::default(),
        );
        // 3 of 11 bins below 0.7 = 27 % ≤ 30 %; 0.8 would be 36 %.
        assert_eq!(c.threshold, 0.7, "{c:?}");
        let limits = Limits {
            min_threshold: 0.8,
            max_threshold: 0.95,
            min_requests: 0,
        };
        let c = tune(
            &b,
            Policy::Budget {
                max_escalation_rate: 0.3,
            },
            0.9,
            &limits,
            &costs(),
            &DeviceCosts::default(),
        );
        assert_eq!(c.threshold, 0.8, "clamped to the lower bound: {c:?}");
    }

    #[test]
    fn min_cost_follows_prices() {
        let b = bins(10_000, &DISAGREE, 0.0, 1);
        let device = DeviceCosts::default();
        // A disagreement costs 8 cloud calls: escalate bins whose disagreement rate > 12.5 %.
        let c = tune(
            &b,
            Policy::MinCost,
            0.9,
            &Limits::default(),
            &costs(),
            &device,
        );
        assert_eq!(c.threshold, 0.8, "{c:?}");
        // Free cloud: escalate everything.
        let free = Costs {
            per_cloud_call: 0.0,
            ..costs()
        };
        let c = tune(&b, Policy::MinCost, 0.9, &Limits::default(), &free, &device);
        assert_eq!(c.threshold, ALWAYS_ESCALATE, "{c:?}");
        // A slow link past its SLO makes escalations dearer: the threshold drops.
        let slo = Costs {
            per_slo_violation: 5.0,
            latency_slo_s: 0.2,
            ..costs()
        };
        let slow = DeviceCosts {
            escalation_p95_s: 0.5,
            ..device
        };
        let c = tune(&b, Policy::MinCost, 0.9, &Limits::default(), &slo, &slow);
        assert!(c.threshold < 0.8, "{c:?}");
    }

    #[test]
    fn push_rules() {
        let b = bins(10_000, &DISAGREE, 0.0, 1);
        let c = tune(
            &b,
            Policy::MinCost,
            0.9,
            &Limits::default(),
            &costs(),
            &DeviceCosts::default(),
        );
        let rules = PushRules {
            hysteresis: 0.02,
            min_interval_ms: 60_000,
        };
        assert!(should_push(0.9, &c, false, None, 0, &rules));
        assert!(!should_push(0.9, &c, true, None, 0, &rules), "pinned");
        assert!(
            !should_push(0.81, &c, false, None, 0, &rules),
            "within hysteresis"
        );
        assert!(
            !should_push(0.9, &c, false, Some(10_000), 30_000, &rules),
            "too soon"
        );
        assert!(should_push(0.9, &c, false, Some(10_000), 80_000, &rules));
    }
}
