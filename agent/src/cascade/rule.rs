//! The cascade rule: how confident the edge model is, whether to escalate, and which answer the
//! caller gets. Pure functions only — every decision here is unit-tested without sockets. The
//! words themselves ([`Signal`], [`Tier`], [`FallbackReason`]) are the protocol's.

use tierd_protocol::ReplyErrorCode;
pub use tierd_protocol::{top1, FallbackReason, Signal, Tier};

/// Confidence of a probability vector under `signal`, in `[0, 1]`.
/// Degenerate input (empty, non-finite) yields 0, which escalates: when unsure, ask.
pub fn confidence(probs: &[f32], signal: Signal) -> f32 {
    if probs.is_empty() || probs.iter().any(|p| !p.is_finite()) {
        return 0.0;
    }
    let c = match signal {
        Signal::MaxProb => probs.iter().copied().fold(f32::MIN, f32::max),
        Signal::Margin => {
            let (mut a, mut b) = (f32::MIN, f32::MIN);
            for &p in probs {
                if p > a {
                    b = a;
                    a = p;
                } else if p > b {
                    b = p;
                }
            }
            if probs.len() == 1 {
                a
            } else {
                a - b
            }
        }
        Signal::Entropy => {
            if probs.len() < 2 {
                return 1.0;
            }
            let h: f32 = probs
                .iter()
                .filter(|&&p| p > 0.0)
                .map(|&p| -p * p.ln())
                .sum();
            1.0 - h / (probs.len() as f32).ln()
        }
    };
    c.clamp(0.0, 1.0)
}

/// The escalate-or-not rule: answer locally iff `confidence >= threshold`.
pub fn should_escalate(confidence: f32, threshold: f32) -> bool {
    confidence < threshold
}

/// What the cloud path produced for an escalated request.
pub type CloudResult = Result<Vec<f32>, FallbackReason>;

/// The answer returned to the caller.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub tier: Tier,
    pub probabilities: Vec<f32>,
    pub fallback: Option<FallbackReason>,
}

/// Combines the edge prediction with the cloud outcome (if the request was escalated).
/// A cloud answer of the wrong length is treated as a relay error rather than passed on.
pub fn resolve(edge: Vec<f32>, cloud: Option<CloudResult>) -> Answer {
    match cloud {
        None => Answer {
            tier: Tier::Edge,
            probabilities: edge,
            fallback: None,
        },
        Some(Ok(p)) if p.len() == edge.len() => Answer {
            tier: Tier::Cloud,
            probabilities: p,
            fallback: None,
        },
        Some(Ok(_)) => Answer {
            tier: Tier::EdgeFallback,
            probabilities: edge,
            fallback: Some(FallbackReason::RelayError(ReplyErrorCode::BadShape)),
        },
        Some(Err(reason)) => Answer {
            tier: Tier::EdgeFallback,
            probabilities: edge,
            fallback: Some(reason),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EPS: f32 = 1e-6;

    #[test]
    fn max_prob_and_margin() {
        let p = [0.1, 0.7, 0.2];
        assert!((confidence(&p, Signal::MaxProb) - 0.7).abs() < EPS);
        assert!((confidence(&p, Signal::Margin) - 0.5).abs() < EPS);
        assert!((confidence(&[0.5, 0.5], Signal::Margin)).abs() < EPS);
    }

    #[test]
    fn entropy_is_one_for_certain_and_zero_for_uniform() {
        assert!((confidence(&[0.0, 1.0, 0.0], Signal::Entropy) - 1.0).abs() < EPS);
        assert!(confidence(&[0.25; 4], Signal::Entropy).abs() < 1e-5);
        let mid = confidence(&[0.8, 0.1, 0.1], Signal::Entropy);
        assert!(mid > 0.2 && mid < 0.8, "{mid}");
    }

    #[test]
    fn signals_agree_on_ordering_of_clear_cases() {
        let sure = [0.98, 0.01, 0.01];
        let unsure = [0.4, 0.35, 0.25];
        for s in [Signal::MaxProb, Signal::Margin, Signal::Entropy] {
            assert!(confidence(&sure, s) > confidence(&unsure, s), "{s:?}");
        }
    }

    #[test]
    fn degenerate_input_escalates() {
        for s in [Signal::MaxProb, Signal::Margin, Signal::Entropy] {
            assert_eq!(confidence(&[], s), 0.0);
            assert_eq!(confidence(&[f32::NAN, 0.5], s), 0.0);
            assert!(should_escalate(confidence(&[], s), 0.5));
        }
    }

    #[test]
    fn threshold_is_inclusive_on_the_confident_side() {
        assert!(!should_escalate(0.9, 0.9));
        assert!(should_escalate(0.8999, 0.9));
        assert!(!should_escalate(0.0, 0.0), "threshold 0 never escalates");
        assert!(
            should_escalate(0.999, 1.01),
            "threshold above 1 always escalates"
        );
    }

    #[test]
    fn top1_picks_first_max() {
        assert_eq!(top1(&[0.1, 0.6, 0.3]), 1);
        assert_eq!(top1(&[0.5, 0.5]), 0);
    }

    #[test]
    fn resolve_covers_every_path() {
        let edge = vec![0.6, 0.4];
        assert_eq!(resolve(edge.clone(), None).tier, Tier::Edge);
        let a = resolve(edge.clone(), Some(Ok(vec![0.1, 0.9])));
        assert_eq!((a.tier, a.probabilities), (Tier::Cloud, vec![0.1, 0.9]));
        let a = resolve(edge.clone(), Some(Err(FallbackReason::Timeout)));
        assert_eq!(a.tier, Tier::EdgeFallback);
        assert_eq!(a.probabilities, edge);
        assert_eq!(a.fallback.unwrap().as_str(), "timeout");
        let a = resolve(edge.clone(), Some(Ok(vec![1.0])));
        assert_eq!(
            a.tier,
            Tier::EdgeFallback,
            "wrong-length cloud answer is not passed on"
        );
    }
}
