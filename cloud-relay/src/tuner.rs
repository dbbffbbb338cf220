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
//! # Pooled strata: the bound
//! Pooling per bin is exact but spends the error budget on every bin: a Bonferroni share
//! `δ/m` each, and a bin with few labels bounds its rate near 1. Pooling *bins* is exact too,
//! as long as every request in the pool had the same chance of being labelled at every moment:
//! then the labelled ones are a uniform sample of the pool and its disagreement rate `d_S`
//! gets one Clopper–Pearson bound. A threshold in force cuts the bins into the escalated side
//! (labelled always) and the local side (labelled at the audit rate), so a **stratum** is a run
//! of bins between two consecutive thresholds that were in force at some moment of the window
//! (`cuts`: the agents report every threshold they decided a request under). Inside a stratum,
//! at any moment, every request was escalated, or every request was a candidate for audit:
//! the labelling depends on *when* a request came, never on *what* it was.
//!
//! For a candidate `t` the region `[t, 1]` splits at the cuts above `t` into `k` strata `S`
//! (usually one to three), with `π_S` the stratum's exact share of the window's requests,
//! `n_S` labelled requests and `x_S` disagreements among them. Each gets the one-sided exact
//! Clopper–Pearson upper bound `U_S` at level `δ/k`, so with probability ≥ 1 − δ every `d_S`
//! is below its `U_S` and `LB(t) = 1 − Σ_S π_S·U_S` is a lower bound on `A(t)`.
//! A cut inside a bin (a threshold that is not a bin edge) leaves that bin's labels a biased
//! sample (its escalated part is the less confident one): such a bin is a stratum of its own
//! and gets no credit (`U = 1`). With the cuts unknown, every bin edge is a cut: per-bin
//! pooling, as before. Evidence gathered while a stratum was escalated keeps certifying it
//! after the threshold drops below it, until the sliding window forgets it.
//!
//! The same strata give a **certified violation**: with the exact Clopper–Pearson *lower*
//! bounds `L_S` at `δ/k`, `UB(t) = 1 − Σ_S π_S·L_S` is an upper bound on `A(t)`; if it is
//! below the target, the threshold in force misses the target with confidence 1 − δ.
//!
//! Candidate thresholds are tested from the most conservative down (escalate everything, then
//! each bin edge in decreasing order), stopping at the first that fails: fixed-sequence testing,
//! which keeps the family-wise error at δ without a multiplicity correction because
//! agreement only falls as the threshold falls (Learn-then-Test, Angelopoulos et al. 2021;
//! selective risk, Geifman & El-Yaniv 2017). The threshold chosen is the last one that passed.
//!
//! Assumptions, each with the direction it biases:
//! - requests are exchangeable within the window (the window slides, and the drift test in
//!   `fleet::evidence` cuts it short, so drift is forgotten); under drift the bound is
//!   optimistic for the new traffic until the old evidence leaves — hence the drift test;
//! - whether a request is audited does not depend on what it is (a random draw, capped per
//!   second: time-dependent only);
//! - the thresholds in force are treated as fixed, though the tuner chose them from earlier
//!   evidence of the same window (adaptive labelling); `tierd-replay` measures the share of
//!   certificates that miss, which stays below δ;
//! - escalations that got no cloud answer (fallbacks) are missing at random; timeouts of
//!   harder inputs would make the bound optimistic by at most their share of the stratum;
//! - the cloud model is the reference ("agreement", not accuracy).
//!
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

/// Exact one-sided lower confidence bound (Clopper–Pearson): with probability ≥ 1 − `alpha`,
/// the true rate is at least this.
pub fn clopper_pearson_lower(successes: u64, trials: u64, alpha: f64) -> f64 {
    if trials == 0 || successes == 0 {
        return 0.0;
    }
    let a = successes as f64;
    let b = (trials - successes.min(trials)) as f64 + 1.0;
    Beta::new(a, b).map_or(0.0, |d| d.inverse_cdf(alpha).clamp(0.0, 1.0))
}

fn total_requests(bins: &[Bin]) -> u64 {
    bins.iter().map(Bin::requests).sum()
}

/// The thresholds in force while a window's evidence was gathered (see the module docs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Cuts {
    /// These thresholds, and only these, decided the window's requests.
    Known(Vec<f32>),
    /// Not known: every bin edge is a cut (per-bin pooling).
    Unknown,
}

impl Cuts {
    /// Union of two windows' cuts.
    pub fn union(&self, other: &Cuts) -> Cuts {
        match (self, other) {
            (Cuts::Known(a), Cuts::Known(b)) => {
                let mut v = a.clone();
                for t in b {
                    if !v.contains(t) {
                        v.push(*t);
                    }
                }
                Cuts::Known(v)
            }
            _ => Cuts::Unknown,
        }
    }

    fn cuts_at(&self, lower: f32, upper: f32) -> CutAt {
        match self {
            Cuts::Unknown => CutAt::Lower,
            Cuts::Known(v) => {
                if v.iter().any(|&c| c > lower && c < upper) {
                    CutAt::Inside
                } else if v.contains(&lower) {
                    CutAt::Lower
                } else {
                    CutAt::None
                }
            }
        }
    }
}

enum CutAt {
    None,
    Lower,
    Inside,
}

/// One stratum of a region: its requests and labelled outcomes; `credit` is false for a bin
/// a cut falls inside (its labels are not a uniform sample of it).
#[derive(Debug, Clone, Copy, Default)]
struct Stratum {
    requests: u64,
    labelled: u64,
    disagree: u64,
    credit: bool,
}

/// The strata of the region `[t, 1]`, from the top bin down.
fn strata(bins: &[Bin], cuts: &Cuts, t: f32) -> Vec<Stratum> {
    let mut out: Vec<Stratum> = Vec::new();
    let mut open = false;
    let mut region: Vec<&Bin> = bins.iter().filter(|b| b.lower >= t).collect();
    region.sort_by(|a, b| b.lower.total_cmp(&a.lower));
    for b in region {
        let labelled = b.escalated.labelled + b.audited.labelled;
        let disagree = b.escalated.disagree() + b.audited.disagree();
        match cuts.cuts_at(b.lower, b.upper) {
            CutAt::Inside => {
                out.push(Stratum {
                    requests: b.requests(),
                    labelled,
                    disagree,
                    credit: false,
                });
                open = false;
            }
            cut => {
                if !open {
                    out.push(Stratum {
                        credit: true,
                        ..Stratum::default()
                    });
                    open = true;
                }
                if let Some(s) = out.last_mut() {
                    s.requests += b.requests();
                    s.labelled += labelled;
                    s.disagree += disagree;
                }
                if matches!(cut, CutAt::Lower) {
                    open = false;
                }
            }
        }
    }
    out.retain(|s| s.requests > 0);
    out
}

/// Point estimate and (1 − delta) lower bound of agreement at `t` (see the module docs).
fn agreement_at(bins: &[Bin], cuts: &Cuts, t: f32, delta: f64) -> (f64, f64) {
    let n = total_requests(bins) as f64;
    if n == 0.0 {
        return (1.0, 0.0);
    }
    let region = strata(bins, cuts, t);
    let k = region.len().max(1) as f64;
    let (mut estimate, mut lower) = (1.0, 1.0);
    for s in region {
        let pi = s.requests as f64 / n;
        if s.labelled > 0 {
            estimate -= pi * s.disagree as f64 / s.labelled as f64;
        }
        let u = if s.credit {
            clopper_pearson_upper(s.disagree, s.labelled, delta / k)
        } else {
            1.0
        };
        lower -= pi * u;
    }
    (estimate.clamp(0.0, 1.0), lower.clamp(0.0, 1.0))
}

/// A (1 − delta) **upper** bound on agreement at `t`: below the target, the threshold is a
/// certified violation (see the module docs). 1 without evidence.
pub fn agreement_upper_bound(bins: &[Bin], cuts: &Cuts, t: f32, delta: f64) -> f64 {
    let n = total_requests(bins) as f64;
    if n == 0.0 {
        return 1.0;
    }
    let region = strata(bins, cuts, t);
    let k = region.len().max(1) as f64;
    let mut upper = 1.0;
    for s in region.iter().filter(|s| s.credit) {
        upper -= s.requests as f64 / n * clopper_pearson_lower(s.disagree, s.labelled, delta / k);
    }
    upper.clamp(0.0, 1.0)
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
    cuts: &Cuts,
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
        let (agreement, lower) = agreement_at(bins, cuts, t, delta);
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
                let (_, lower) = agreement_at(bins, cuts, t, delta);
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
                    let (agreement, _) = agreement_at(bins, cuts, t, delta);
                    let c = cost_per_request(costs, device, escalation_rate_at(bins, t), agreement);
                    (t, c)
                })
                .min_by(|a, b| a.1.total_cmp(&b.1))
                .map_or(current, |(t, _)| t);
            certify(t, false, "lowest expected cost per request".into())
        }
    }
}

/// How a device's evidence window is kept and watched for drift (relay.toml `[tuning]`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EvidenceRules {
    /// Requests the sliding window holds (whole calibration windows, the oldest leaving once
    /// the rest hold this many).
    pub window_requests: u64,
    /// The drift test looks at the newest windows holding at least this many requests, and
    /// after it fires the evidence window is cut back to them.
    pub recent_requests: u64,
    /// The drift test's error level (a false alarm only costs escalations: it pushes the
    /// conservative threshold).
    pub drift_delta: f64,
}

impl Default for EvidenceRules {
    fn default() -> Self {
        EvidenceRules {
            window_requests: 20_000,
            recent_requests: 1_000,
            drift_delta: 0.001,
        }
    }
}

/// Share of requests with confidence below `t` (the bins wholly below it).
fn share_below(bins: &[Bin], t: f32) -> (u64, u64) {
    let below = bins
        .iter()
        .filter(|b| b.upper <= t)
        .map(Bin::requests)
        .sum();
    (below, total_requests(bins))
}

/// **The drift test.** On the newest evidence (`recent`, at least `rules.recent_requests`):
/// either the threshold the device runs is a certified violation there (the exact upper bound
/// on agreement at `running` is below `target`, at level `drift_delta/2`), or the share of
/// requests less confident than `running` rose against the older evidence of the window
/// (`older`): its exact lower bound on `recent` is above its exact upper bound on `older`,
/// each at `drift_delta/4`. A fired test only ever makes the threshold more conservative, so
/// its error level buys fewer false alarms, never a weaker certificate. `Some(why)` if fired.
pub fn drift(
    recent: &[Bin],
    recent_cuts: &Cuts,
    older: &[Bin],
    running: f32,
    target: f64,
    rules: &EvidenceRules,
) -> Option<String> {
    let n = total_requests(recent);
    if running >= ALWAYS_ESCALATE || n == 0 || n < rules.recent_requests {
        return None;
    }
    let ub = agreement_upper_bound(recent, recent_cuts, running, rules.drift_delta / 2.0);
    if ub < target {
        return Some(format!(
            "agreement at threshold {running} over the last {n} requests is at most {ub:.4} \
             (target {target}, confidence {})",
            1.0 - rules.drift_delta / 2.0
        ));
    }
    let (below_r, n_r) = share_below(recent, running);
    let (below_o, n_o) = share_below(older, running);
    if n_o >= n_r {
        let lo = clopper_pearson_lower(below_r, n_r, rules.drift_delta / 4.0);
        let hi = clopper_pearson_upper(below_o, n_o, rules.drift_delta / 4.0);
        if lo > hi {
            return Some(format!(
                "the share of requests less confident than {running} rose from at most {hi:.3} \
                 (previous {n_o} requests) to at least {lo:.3} (last {n_r})"
            ));
        }
    }
    None
}

/// A model's threshold certified offline, as its device's status announced it, once
/// [`check_offline`] has re-derived `agreement_lower_bound` from its counts.
pub type Offline = tierd_protocol::ModelCalibration;

/// Whether a model's offline certificate can stand in for an online one under `policy`: only
/// for `target_agreement`, with a target and confidence at least the policy's, against the
/// `reference` model the relay answers with, and with the bound it claims re-derived exactly
/// from its counts. `Err` says why not.
pub fn check_offline(
    c: &tierd_protocol::ModelCalibration,
    policy: &Policy,
    reference: Option<&str>,
) -> Result<Offline, String> {
    let Policy::TargetAgreement { target, delta } = *policy else {
        return Err("the tuning policy is not target_agreement".into());
    };
    if !(c.threshold.is_finite() && (0.0..=ALWAYS_ESCALATE).contains(&c.threshold)) {
        return Err(format!("threshold {} is out of range", c.threshold));
    }
    if c.target < target || !(c.delta > 0.0 && c.delta <= delta) {
        return Err(format!(
            "certified for agreement {} at confidence {}, weaker than the policy's {target} at {}",
            c.target,
            1.0 - c.delta,
            1.0 - delta
        ));
    }
    if let Some(r) = reference {
        if r != c.reference {
            return Err(format!(
                "certified against {}, but this relay answers with {r}",
                c.reference
            ));
        }
    }
    if c.samples == 0 || c.disagreements > c.samples {
        return Err(format!(
            "{} disagreements in {} samples",
            c.disagreements, c.samples
        ));
    }
    let lb = 1.0 - clopper_pearson_upper(c.disagreements, c.samples, c.delta);
    if (lb - c.agreement_lower_bound).abs() > 1e-6 || lb < target {
        return Err(format!(
            "its lower bound {} does not follow from {} disagreements in {} samples \
             (exact bound {lb:.6}, target {target})",
            c.agreement_lower_bound, c.disagreements, c.samples
        ));
    }
    Ok(Offline {
        agreement_lower_bound: lb,
        ..c.clone()
    })
}

/// Whether the newest evidence looks like the offline calibration set again, after a drift
/// alarm or a violation discredited the offline certificate: at least `recent_requests`
/// requests, the share less confident than the offline threshold not above the calibration
/// set's (its exact lower bound at `drift_delta` is at most the certificate's escalation
/// rate), and no certified violation at the offline threshold on that evidence. The offline
/// certificate is then trusted again (as for a new device); the violation and drift tests
/// keep watching it.
pub fn matches_calibration(
    recent: &[Bin],
    recent_cuts: &Cuts,
    offline: &Offline,
    target: f64,
    rules: &EvidenceRules,
) -> bool {
    let (below, n) = share_below(recent, offline.threshold);
    n > 0
        && n >= rules.recent_requests
        && clopper_pearson_lower(below, n, rules.drift_delta) <= offline.escalation_rate
        && agreement_upper_bound(recent, recent_cuts, offline.threshold, rules.drift_delta)
            >= target
}

/// Which certificate backs the threshold a device should run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Basis {
    /// The online certificate from the device's own evidence window.
    Online,
    /// The model's offline certificate (the online window cannot certify as low yet).
    Offline,
    /// The threshold the device ran is a certified violation: moved up.
    Violation,
    /// The drift test fired: the conservative threshold, until the bound brings it down.
    Drift,
    /// Nothing certifies a change yet: the device keeps its threshold.
    Kept,
}

impl std::fmt::Display for Basis {
    /// The name the API and pushed documents use (`offline`, `drift`, …).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Basis::Online => "online",
            Basis::Offline => "offline",
            Basis::Violation => "violation",
            Basis::Drift => "drift",
            Basis::Kept => "kept",
        })
    }
}

/// The threshold a device should run, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InForce {
    pub threshold: f32,
    pub basis: Basis,
    pub why: String,
}

/// What the choice of a device's threshold depends on.
#[derive(Debug, Clone, Copy)]
pub struct Situation<'a> {
    /// The tuner's proposal from the whole evidence window.
    pub online: &'a Certificate,
    /// The model's offline certificate, if it has one the relay trusts (not discredited by a
    /// violation or drift since the online window last certified at or below it).
    pub offline: Option<&'a Offline>,
    /// The threshold the device runs.
    pub running: f32,
    /// `running` is a certified violation on the whole window.
    pub violation: bool,
    /// The drift test fired on this window, and why.
    pub drift: Option<&'a str>,
}

/// **The rule for the threshold in force.** Drift: the most conservative threshold allowed,
/// at once. A certified violation: the online proposal if it is above the running threshold,
/// else the most conservative. Otherwise the online certificate when it certifies a threshold
/// at or below the offline one, else the offline one: thin online evidence never pushes a
/// device above its offline-certified threshold; only evidence that it misses does. Without
/// an offline certificate, the online proposal, or the running threshold while the window is
/// too small.
pub fn in_force(s: &Situation<'_>, limits: &Limits) -> InForce {
    let online_ok = !s.online.insufficient_evidence;
    if let Some(why) = s.drift {
        return InForce {
            threshold: limits.max_threshold,
            basis: Basis::Drift,
            why: format!("drift: {why}"),
        };
    }
    if s.violation {
        let (threshold, why) = if online_ok && s.online.threshold > s.running {
            (s.online.threshold, "the online certificate's threshold")
        } else {
            (
                limits.max_threshold,
                "the most conservative threshold allowed",
            )
        };
        return InForce {
            threshold,
            basis: Basis::Violation,
            why: format!(
                "threshold {} misses the target on the evidence window: {why}",
                s.running
            ),
        };
    }
    match s.offline {
        Some(o) if !(online_ok && s.online.threshold <= o.threshold) => InForce {
            threshold: o
                .threshold
                .clamp(limits.min_threshold, limits.max_threshold),
            basis: Basis::Offline,
            why: format!(
                "{}'s offline certificate ({} of {} samples disagree, agreement ≥ {:.4}); the \
                 online window does not certify a threshold as low yet",
                o.model, o.disagreements, o.samples, o.agreement_lower_bound
            ),
        },
        _ if online_ok => InForce {
            threshold: s.online.threshold,
            basis: Basis::Online,
            why: s.online.note.clone(),
        },
        _ => InForce {
            threshold: s.running,
            basis: Basis::Kept,
            why: s.online.note.clone(),
        },
    }
}

/// What the relay tunes with (relay.toml `[tuning]` and `[prices]`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Setup {
    pub policy: Policy,
    pub limits: Limits,
    pub costs: Costs,
    pub evidence: EvidenceRules,
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
            evidence: EvidenceRules::default(),
        }
    }
}

/// Point estimate and (1 − delta) lower bound of agreement with the cloud if the device ran
/// at threshold `t` (for reports; the tuner uses the same computation).
pub fn estimate_agreement(bins: &[Bin], cuts: &Cuts, t: f32, delta: f64) -> (f64, f64) {
    agreement_at(bins, cuts, t, delta)
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
            &Cuts::Unknown,
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
            &Cuts::Unknown,
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
            &Cuts::Unknown,
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
            &Cuts::Unknown,
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
        let c = tune(
            &b,
            &Cuts::Unknown,
            Policy::MinCost,
            0.9,
            &Limits::default(),
            &free,
            &device,
        );
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
        let c = tune(
            &b,
            &Cuts::Unknown,
            Policy::MinCost,
            0.9,
            &Limits::default(),
            &slo,
            &slow,
        );
        assert!(c.threshold < 0.8, "{c:?}");
    }

    #[test]
    fn push_rules() {
        let b = bins(10_000, &DISAGREE, 0.0, 1);
        let c = tune(
            &b,
            &Cuts::Unknown,
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

    /// One window at threshold `tau` (a bin edge), `n` requests per bin, audits at 1/`every`.
    fn window(n: u64, tau: f32, every: u64) -> (Vec<Bin>, Cuts) {
        (bins(n, &DISAGREE, tau, every), Cuts::Known(vec![tau]))
    }

    #[test]
    fn clopper_pearson_lower_matches_known_values() {
        // 5 of 100 at 95 % one-sided: scipy.stats.beta.ppf(0.05, 5, 96) = 0.0199056.
        let l = clopper_pearson_lower(5, 100, 0.05);
        assert!((l - 0.0199056).abs() < 1e-6, "{l}");
        assert_eq!(clopper_pearson_lower(0, 100, 0.05), 0.0);
        assert!(clopper_pearson_lower(7, 7, 0.05) > 0.6);
    }

    #[test]
    fn pooled_strata_certify_lower_than_per_bin_pooling() {
        // The same evidence, bounded per bin (cuts unknown) and pooled between the one
        // threshold in force: pooling spends δ on two strata instead of eleven bins.
        let (b, cuts) = window(3_000, 0.9, 20);
        let per_bin = at_target(&b, 0.99, 0.9);
        let pooled = tune(
            &b,
            &cuts,
            Policy::TargetAgreement {
                target: 0.99,
                delta: 0.05,
            },
            0.9,
            &Limits::default(),
            &costs(),
            &DeviceCosts::default(),
        );
        assert!(
            pooled.threshold < per_bin.threshold,
            "{pooled:?} vs {per_bin:?}"
        );
        assert!(pooled.agreement_lower_bound >= 0.99, "{pooled:?}");
        // With every local answer audited the region is known, and the bound is exact: it
        // lands where the true rates say (0.85, as in the test above), never lower.
        let (all, cuts) = window(100_000, 0.9, 1);
        let c = tune(
            &all,
            &cuts,
            Policy::TargetAgreement {
                target: 0.99,
                delta: 0.05,
            },
            0.9,
            &Limits::default(),
            &costs(),
            &DeviceCosts::default(),
        );
        assert_eq!(c.threshold, 0.85, "{c:?}");
    }

    #[test]
    fn a_cut_inside_a_bin_gets_no_credit() {
        // A threshold of 0.95 sits inside the bin [0.93, 0.96): its labels are biased (the
        // escalated part is the less confident one), so nothing at or below it certifies.
        let (b, _) = window(100_000, 0.9, 1);
        let inside = Cuts::Known(vec![0.95]);
        let (_, lb) = estimate_agreement(&b, &inside, 0.93, 0.05);
        let (_, lb_edge) = estimate_agreement(&b, &Cuts::Known(vec![0.93]), 0.93, 0.05);
        assert!(lb < 0.95 && lb_edge > 0.99, "{lb} vs {lb_edge}");
        let (_, above) = estimate_agreement(&b, &inside, 0.96, 0.05);
        assert!(above > 0.99, "{above}");
    }

    #[test]
    fn certified_violations_need_evidence() {
        // All audited, true agreement at 0.7 is 1 − (0.2+0.1+0.05+0.02+0.01+0.004+0.002)/11
        // ≈ 0.965: with 10,000 per bin that is a certified violation of 0.99; with 8 per bin
        // it is not (upper bound above the target), and nothing certifies without labels.
        let (b, cuts) = window(10_000, 0.0, 1);
        assert!(agreement_upper_bound(&b, &cuts, 0.7, 0.01) < 0.99);
        let (thin, cuts) = window(8, 0.0, 1);
        assert!(agreement_upper_bound(&thin, &cuts, 0.7, 0.01) >= 0.99);
        assert_eq!(agreement_upper_bound(&[], &Cuts::Unknown, 0.7, 0.01), 1.0);
    }

    #[test]
    fn drift_fires_on_a_confidence_shift_or_a_violation_and_not_on_more_of_the_same() {
        let rules = EvidenceRules {
            window_requests: 20_000,
            recent_requests: 1_000,
            drift_delta: 0.001,
        };
        let (older, _) = window(2_000, 0.9, 50);
        let (same, cuts) = window(200, 0.9, 50);
        assert_eq!(drift(&same, &cuts, &older, 0.9, 0.99, &rules), None);
        // Too few recent requests: no test.
        let (few, cuts_few) = window(50, 0.9, 50);
        assert_eq!(drift(&few, &cuts_few, &older, 0.9, 0.99, &rules), None);
        // Half the recent traffic moved into the lowest bin: the share below 0.9 jumped.
        let mut shifted = same.clone();
        shifted[0].escalated_requests += 2_000;
        shifted[0].escalated.labelled += 2_000;
        let why = drift(&shifted, &cuts, &older, 0.9, 0.99, &rules).expect("fires");
        assert!(why.contains("less confident than 0.9"), "{why}");
        // Same histogram, but the local answers now disagree a third of the time.
        let mut wrong = same.clone();
        for b in wrong.iter_mut().filter(|b| b.lower >= 0.9) {
            b.audited = Outcomes {
                labelled: 100,
                agree: 66,
            };
        }
        let why = drift(&wrong, &cuts, &older, 0.9, 0.99, &rules).expect("fires");
        assert!(why.contains("agreement at threshold 0.9"), "{why}");
        // Escalating everything: nothing local to watch.
        assert_eq!(
            drift(&wrong, &cuts, &older, ALWAYS_ESCALATE, 0.99, &rules),
            None
        );
    }

    fn manifest_cert(k: u64, n: u64, lb: f64) -> tierd_protocol::ModelCalibration {
        tierd_protocol::ModelCalibration {
            model: "edge@2".into(),
            threshold: 0.9,
            target: 0.99,
            delta: 0.05,
            samples: n,
            disagreements: k,
            agreement_lower_bound: lb,
            escalation_rate: 0.1,
            reference: "cloud@1".into(),
        }
    }

    #[test]
    fn offline_certificates_are_rederived_before_they_are_believed() {
        let policy = Policy::TargetAgreement {
            target: 0.99,
            delta: 0.05,
        };
        let lb = 1.0 - clopper_pearson_upper(129, 20_000, 0.05);
        let o = check_offline(&manifest_cert(129, 20_000, lb), &policy, Some("cloud@1"))
            .expect("valid");
        assert!((o.agreement_lower_bound - lb).abs() < 1e-12);
        let err = |c, p: &Policy, r| check_offline(&c, p, r).unwrap_err();
        assert!(err(manifest_cert(129, 20_000, 0.9999), &policy, None).contains("does not follow"));
        assert!(err(manifest_cert(400, 20_000, 0.9999), &policy, None).contains("does not follow"));
        assert!(err(manifest_cert(129, 20_000, lb), &policy, Some("big@9")).contains("big@9"));
        let stricter = Policy::TargetAgreement {
            target: 0.995,
            delta: 0.05,
        };
        assert!(err(manifest_cert(129, 20_000, lb), &stricter, None).contains("weaker"));
        assert!(err(manifest_cert(129, 20_000, lb), &Policy::MinCost, None).contains("policy"));
    }

    #[test]
    fn the_rule_in_force() {
        let limits = Limits::default();
        let lb = 1.0 - clopper_pearson_upper(129, 20_000, 0.05);
        let policy = Policy::TargetAgreement {
            target: 0.99,
            delta: 0.05,
        };
        let offline = check_offline(&manifest_cert(129, 20_000, lb), &policy, None).expect("ok");
        let (b, cuts) = window(2_000, 0.9, 50);
        let thin = tune(
            &b,
            &cuts,
            policy,
            0.9,
            &limits,
            &costs(),
            &DeviceCosts::default(),
        );
        assert!(thin.threshold > 0.9, "{thin:?}");
        fn s<'a>(
            online: &'a Certificate,
            offline: Option<&'a Offline>,
            violation: bool,
            drift: Option<&'a str>,
        ) -> Situation<'a> {
            Situation {
                online,
                offline,
                running: 0.9,
                violation,
                drift,
            }
        }
        // Thin online evidence does not move a device off its offline certificate.
        let r = in_force(&s(&thin, Some(&offline), false, None), &limits);
        assert_eq!((r.threshold, r.basis), (0.9, Basis::Offline));
        // Without one, the online certificate rules.
        let r = in_force(&s(&thin, None, false, None), &limits);
        assert_eq!((r.threshold, r.basis), (thin.threshold, Basis::Online));
        // An online certificate at or below the offline threshold takes over.
        let (rich, cuts) = window(100_000, 0.9, 1);
        let low = tune(
            &rich,
            &cuts,
            policy,
            0.9,
            &limits,
            &costs(),
            &DeviceCosts::default(),
        );
        assert!(low.threshold < 0.9);
        let r = in_force(&s(&low, Some(&offline), false, None), &limits);
        assert_eq!((r.threshold, r.basis), (low.threshold, Basis::Online));
        // Violation: up to the online proposal; drift: the most conservative, at once.
        let r = in_force(&s(&thin, Some(&offline), true, None), &limits);
        assert_eq!((r.threshold, r.basis), (thin.threshold, Basis::Violation));
        let r = in_force(&s(&low, Some(&offline), false, Some("shift")), &limits);
        assert_eq!((r.threshold, r.basis), (ALWAYS_ESCALATE, Basis::Drift));
        // Displayed as the API spells it.
        assert_eq!(
            serde_json::to_value(r.basis).ok(),
            Some(serde_json::Value::from(r.basis.to_string()))
        );
        // Too little evidence and no offline certificate: keep what runs.
        let (tiny, cuts) = window(10, 0.9, 1);
        let none = tune(
            &tiny,
            &cuts,
            policy,
            0.9,
            &limits,
            &costs(),
            &DeviceCosts::default(),
        );
        let r = in_force(&s(&none, None, false, None), &limits);
        assert_eq!((r.threshold, r.basis), (0.9, Basis::Kept));
    }

    #[test]
    fn the_offline_certificate_is_trusted_again_when_traffic_looks_like_its_calibration() {
        let rules = EvidenceRules::default();
        let lb = 1.0 - clopper_pearson_upper(129, 20_000, 0.05);
        let policy = Policy::TargetAgreement {
            target: 0.99,
            delta: 0.05,
        };
        let mut cert = manifest_cert(129, 20_000, lb);
        // 10 of the 11 test bins lie below 0.9 in `window`: calibrated at that share.
        cert.escalation_rate = 10.0 / 11.0;
        let offline = check_offline(&cert, &policy, None).expect("ok");
        let (b, cuts) = window(200, 1.01, 50);
        assert!(matches_calibration(&b, &cuts, &offline, 0.99, &rules));
        cert.escalation_rate = 0.5;
        let strict = check_offline(&cert, &policy, None).expect("ok");
        assert!(!matches_calibration(&b, &cuts, &strict, 0.99, &rules));
        let (few, cuts) = window(20, 1.01, 50);
        assert!(!matches_calibration(&few, &cuts, &offline, 0.99, &rules));
    }
}
