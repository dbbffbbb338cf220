//! **Where a rollout is decided.** Pure: one device's paired shadow evidence in, a verdict
//! out.
//!
//! # Evidence
//! While shadowing, the agent runs the candidate beside the current model on a uniform random
//! sample of live requests and has every sampled request labelled by the cloud model (the
//! escalation's answer if the current model escalated it, a background audit otherwise). So
//! for the same `n` requests, drawn uniformly from the device's traffic, both models'
//! confidence and agreement with the cloud are known: per bin of each model's own confidence
//! (what the tuner needs to certify a threshold for it), and paired (`current_only`: only the
//! current model agreed; `candidate_only`: only the candidate did).
//!
//! # The decision, at fixed looks
//! The evidence is judged only at looks `n ≥ min_pairs · 2^k`, `k = 0 … K − 1`, with
//! `K = ⌊log2(max_pairs / min_pairs)⌋ + 1`, and each look spends `δ / K` of the error budget:
//! Bonferroni over a schedule fixed in advance, so the repeated looks keep each error below `δ`
//! **for one device** over its shadow. Over a rollout of `N` devices the errors add up: up to
//! `N·δ` false promotions in expectation, and a false halt (one device's false "worse" stops the
//! wave) with probability up to `1 − (1 − δ)^N` for an equal candidate; canaries keep `N` small
//! for the first decision. At a look:
//! 1. **Certified worse → roll back.** Among the discordant pairs `b = current_only`,
//!    `c = candidate_only`, if the candidate were no worse then `b ~ Binomial(b + c, p)` with
//!    `p ≤ 1/2`; the exact one-sided Clopper–Pearson lower bound on `p` at `δ/K` above 1/2
//!    rejects that (McNemar's exact test): the candidate agrees with the cloud less often than
//!    the current model, with confidence `1 − δ/K`.
//! 2. **Certified at least as good → promote.** The tuner's exact bound (the same pooled
//!    Clopper–Pearson with fixed-sequence testing the relay tunes thresholds with, at `δ/K`)
//!    certifies a threshold for the candidate on its bins, its lower bound meeting the target,
//!    and the candidate's escalation rate at that threshold is at most the current model's at
//!    its own certified threshold, on the same sample. (The escalation rates are compared as
//!    measured on the paired sample, not bounded: a candidate that escalates a little more than
//!    it measured costs money, never accuracy, which the bound guards.)
//! 3. At the last look neither → **roll back**: not shown to be at least as good.
//!
//! "At least as good" is the target the tuner holds every model to, plus no more escalations
//! on the same requests; the sign test only catches a candidate certifiably worse in raw top-1
//! agreement. A candidate that meets the target but agrees a little less than the current model
//! can be promoted. The decision always uses `target_agreement` (`tuning.target`,
//! `tuning.delta`), whatever policy the tuner runs with.
//!
//! Below `min_pairs` nothing is decided: never on thin evidence.
//!
//! Assumptions, each with the direction it biases: the sampled requests are exchangeable over
//! the shadow (drift during the shadow makes both models' figures describe a mix; the paired
//! comparison stays fair, the candidate's certificate optimistic for the new traffic, as the
//! tuner's is); the cloud's answer is the reference, as everywhere in tierd.

use serde::{Deserialize, Serialize};
use tierd_protocol::rollout::Labelled;

use crate::fleet::tuner_bins;
use crate::tuner::{self, Certificate, Cuts, DeviceCosts, Policy, Setup, ALWAYS_ESCALATE};

/// When to look and how much evidence a verdict needs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Rules {
    /// Labelled pairs before the first look.
    pub min_pairs: u64,
    /// Pairs at the last look (then: promote or roll back).
    pub max_pairs: u64,
}

impl Default for Rules {
    fn default() -> Self {
        Rules {
            min_pairs: 1000,
            max_pairs: 8000,
        }
    }
}

impl Rules {
    /// The number of looks `K`.
    pub fn looks(&self) -> u32 {
        let min = self.min_pairs.max(1);
        let ratio = (self.max_pairs.max(min) / min).max(1);
        ratio.ilog2() + 1
    }

    /// Pairs at look `k` (0-based).
    pub fn look_at(&self, k: u32) -> u64 {
        self.min_pairs.max(1).saturating_mul(1u64 << k.min(62))
    }
}

/// One device's shadow evidence, summed over its reports.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Paired {
    pub edges: Vec<f32>,
    pub current: Vec<Labelled>,
    pub candidate: Vec<Labelled>,
    pub current_only: u64,
    pub candidate_only: u64,
}

impl Paired {
    pub fn pairs(&self) -> u64 {
        self.current
            .iter()
            .fold(0u64, |a, b| a.saturating_add(b.requests))
    }

    /// Each model's agreement with the cloud on the pairs.
    pub fn agreement(&self) -> (f64, f64) {
        let n = self.pairs().max(1) as f64;
        let agree =
            |bins: &[Labelled]| bins.iter().fold(0u64, |a, b| a.saturating_add(b.agree)) as f64 / n;
        (agree(&self.current), agree(&self.candidate))
    }
}

/// What to do with a device in shadow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Verdict {
    /// Not a look yet, or a look that settled nothing.
    Wait {
        why: String,
    },
    Promote {
        why: String,
    },
    RollBack {
        why: String,
    },
}

/// The judgement at one look, for the status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Judgement {
    pub verdict: Verdict,
    /// The look this was (`None`: between looks), of `looks`.
    pub look: Option<u32>,
    pub looks: u32,
    pub pairs: u64,
    /// Each model's certificate at the look's level, when one was computed.
    pub current: Option<Certificate>,
    pub candidate: Option<Certificate>,
}

/// The tuner's certificate for one model's labelled bins, at level `delta`.
fn certify(setup: &Setup, edges: &[f32], bins: &[Labelled], delta: f64) -> Certificate {
    let counts: Vec<_> = bins.iter().map(|b| b.as_bin()).collect();
    let policy = match setup.policy {
        Policy::TargetAgreement { target, .. } => Policy::TargetAgreement { target, delta },
        other => other,
    };
    tuner::tune(
        &tuner_bins(edges, &counts),
        // Every sampled request was labelled: as if all were escalated.
        &Cuts::Known(vec![ALWAYS_ESCALATE]),
        policy,
        ALWAYS_ESCALATE,
        &setup.limits,
        &setup.costs,
        &DeviceCosts::default(),
    )
}

/// Judges `evidence` at the first look not yet taken (`looks_taken` of them were); returns the
/// judgement and the looks taken after it.
pub fn decide(
    evidence: &Paired,
    looks_taken: u32,
    setup: &Setup,
    rules: &Rules,
) -> (Judgement, u32) {
    let n = evidence.pairs();
    let looks = rules.looks();
    let wait = |why: String| Judgement {
        verdict: Verdict::Wait { why },
        look: None,
        looks,
        pairs: n,
        current: None,
        candidate: None,
    };
    if looks_taken >= looks {
        return (wait("every look was taken".into()), looks_taken);
    }
    let due = rules.look_at(looks_taken);
    if n < due {
        return (
            wait(format!(
                "{n} labelled pairs; look {} of {looks} at {due}",
                looks_taken + 1
            )),
            looks_taken,
        );
    }
    // Looks whose size was passed in one report are spent too (their δ share is not reused).
    let mut k = looks_taken;
    while k + 1 < looks && n >= rules.look_at(k + 1) {
        k += 1;
    }
    let target = match setup.policy {
        Policy::TargetAgreement { target, delta } => Some((target, delta)),
        _ => None,
    };
    let delta = target.map_or(0.05, |(_, d)| d) / f64::from(looks);
    let last = k + 1 == looks;
    let (b, c) = (evidence.current_only, evidence.candidate_only);
    let discordant = b.saturating_add(c);
    let worse = discordant > 0 && tuner::clopper_pearson_lower(b, discordant, delta) > 0.5;
    let cur = certify(setup, &evidence.edges, &evidence.current, delta);
    let cand = certify(setup, &evidence.edges, &evidence.candidate, delta);
    let (agree_cur, agree_cand) = evidence.agreement();
    let verdict = if worse {
        Verdict::RollBack {
            why: format!(
                "certified worse: on {n} pairs the candidate agrees with the cloud {:.2} % vs \
                 {:.2} %; {b} pairs only the current model got right, {c} only the candidate \
                 (exact sign test at δ = {delta:.4})",
                agree_cand * 100.0,
                agree_cur * 100.0
            ),
        }
    } else {
        let meets = target.is_none_or(|(t, _)| cand.agreement_lower_bound >= t);
        let certified = !cand.insufficient_evidence && meets && cand.threshold < ALWAYS_ESCALATE;
        if certified && cand.escalation_rate <= cur.escalation_rate {
            Verdict::Promote {
                why: format!(
                    "certified: at threshold {} the candidate's agreement is at least {:.4} \
                     (δ = {delta:.4}), escalating {:.1} % against the current model's {:.1} % \
                     at {}; {n} pairs",
                    cand.threshold,
                    cand.agreement_lower_bound,
                    cand.escalation_rate * 100.0,
                    cur.escalation_rate * 100.0,
                    cur.threshold
                ),
            }
        } else if last {
            Verdict::RollBack {
                why: format!(
                    "not shown at least as good after {n} pairs: the candidate escalates {:.1} % \
                     at {} (certified: {certified}) against the current model's {:.1} % at {}",
                    cand.escalation_rate * 100.0,
                    cand.threshold,
                    cur.escalation_rate * 100.0,
                    cur.threshold
                ),
            }
        } else {
            Verdict::Wait {
                why: format!(
                    "look {} of {looks}: the candidate escalates {:.1} % at {} (certified: \
                     {certified}) against {:.1} % at {}; next look at {}",
                    k + 1,
                    cand.escalation_rate * 100.0,
                    cand.threshold,
                    cur.escalation_rate * 100.0,
                    cur.threshold,
                    rules.look_at(k + 1)
                ),
            }
        }
    };
    (
        Judgement {
            verdict,
            look: Some(k + 1),
            looks,
            pairs: n,
            current: Some(cur),
            candidate: Some(cand),
        },
        k + 1,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const EDGES: [f32; 4] = [0.0, 0.5, 0.8, 0.95];

    /// `n` pairs spread over the bins by `share`, each model disagreeing with the cloud at the
    /// given rate per bin; discordant pairs as if the errors were independent.
    fn paired(n: u64, share: [f64; 4], cur_wrong: [f64; 4], cand_wrong: [f64; 4]) -> Paired {
        let mut p = Paired {
            edges: EDGES.to_vec(),
            ..Default::default()
        };
        for i in 0..4 {
            let r = (n as f64 * share[i]).round() as u64;
            let w = |rate: f64| (r as f64 * rate).round() as u64;
            p.current.push(Labelled {
                requests: r,
                agree: r - w(cur_wrong[i]),
            });
            p.candidate.push(Labelled {
                requests: r,
                agree: r - w(cand_wrong[i]),
            });
            p.current_only += w(cand_wrong[i] * (1.0 - cur_wrong[i]));
            p.candidate_only += w(cur_wrong[i] * (1.0 - cand_wrong[i]));
        }
        p
    }

    const SHARE: [f64; 4] = [0.1, 0.2, 0.3, 0.4];
    const OLD: [f64; 4] = [0.6, 0.3, 0.08, 0.02];
    const GOOD: [f64; 4] = [0.5, 0.1, 0.01, 0.0];

    #[test]
    fn looks_are_a_fixed_doubling_schedule() {
        let r = Rules::default();
        assert_eq!(r.looks(), 4);
        assert_eq!(
            (0..4).map(|k| r.look_at(k)).collect::<Vec<_>>(),
            [1000, 2000, 4000, 8000]
        );
        let one = Rules {
            min_pairs: 500,
            max_pairs: 500,
        };
        assert_eq!(one.looks(), 1);
    }

    #[test]
    fn a_better_candidate_is_promoted_and_never_on_thin_evidence() {
        let setup = Setup::default();
        let rules = Rules::default();
        let thin = paired(990, SHARE, OLD, GOOD);
        let (j, taken) = decide(&thin, 0, &setup, &rules);
        assert!(matches!(j.verdict, Verdict::Wait { .. }), "{j:?}");
        assert_eq!(taken, 0);
        let enough = paired(1000, SHARE, OLD, GOOD);
        let (j, taken) = decide(&enough, 0, &setup, &rules);
        assert!(matches!(j.verdict, Verdict::Promote { .. }), "{j:?}");
        assert_eq!((taken, j.look), (1, Some(1)));
        let cand = j.candidate.expect("certificate");
        let cur = j.current.expect("certificate");
        assert!(
            cand.escalation_rate < cur.escalation_rate,
            "{cand:?} {cur:?}"
        );
        assert!(cand.agreement_lower_bound >= 0.99);
        assert_eq!(cand.delta, 0.05 / 4.0, "each look spends δ/K");
    }

    #[test]
    fn a_worse_candidate_is_rolled_back_by_the_exact_sign_test() {
        let setup = Setup::default();
        let rules = Rules::default();
        let worse = paired(1000, SHARE, GOOD, OLD);
        let (j, _) = decide(&worse, 0, &setup, &rules);
        let Verdict::RollBack { why } = &j.verdict else {
            panic!("{j:?}");
        };
        assert!(why.contains("certified worse"), "{why}");
    }

    #[test]
    fn an_equal_candidate_waits_then_is_rolled_back_at_the_last_look() {
        let setup = Setup::default();
        let rules = Rules::default();
        // Identical models: nothing discordant, the same certificate; promoted, since it
        // escalates no more (an equal model is "at least as good").
        let same = paired(1000, SHARE, GOOD, GOOD);
        let (j, _) = decide(&same, 0, &setup, &rules);
        assert!(matches!(j.verdict, Verdict::Promote { .. }), "{j:?}");
        // A candidate that needs to escalate more, not certifiably worse on raw agreement:
        // waits at each look, rolled back at the last.
        let more = [0.5, 0.1, 0.05, 0.0];
        let mut e = paired(1000, SHARE, GOOD, more);
        // Balance the discordant pairs so the sign test stays silent.
        e.candidate_only = e.current_only;
        let (j, taken) = decide(&e, 0, &setup, &rules);
        assert!(matches!(j.verdict, Verdict::Wait { .. }), "{j:?}");
        let mut e8 = paired(8000, SHARE, GOOD, more);
        e8.candidate_only = e8.current_only;
        // One report that jumps past every remaining look: the last look decides.
        let (j, taken) = decide(&e8, taken, &setup, &rules);
        assert_eq!((j.look, taken), (Some(4), 4));
        let Verdict::RollBack { why } = &j.verdict else {
            panic!("{j:?}");
        };
        assert!(why.contains("not shown at least as good"), "{why}");
        let (j, _) = decide(&e8, taken, &setup, &rules);
        assert!(matches!(j.verdict, Verdict::Wait { .. }));
    }
}
