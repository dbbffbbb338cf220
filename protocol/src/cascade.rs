//! The cascade's shared words: which confidence [`Signal`] decides, which [`Tier`] answered, and
//! why an escalated request fell back ([`FallbackReason`]). One definition for the agent, the
//! relay, metrics labels and the API.
//!
//! On the wire (postcard and JSON alike) each is its text label (`"max_prob"`, `"edge_fallback"`,
//! `"relay_error:bad_shape"`), so the bytes are what they were when these travelled as strings,
//! and a spool written by an older agent still decodes.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;

use crate::message::ReplyErrorCode;

/// A label that names none of the variants of `what`.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{what} = {got:?} is not one of {allowed:?}")]
pub struct UnknownLabel {
    pub what: &'static str,
    pub got: String,
    pub allowed: Vec<&'static str>,
}

/// `FromStr`, `Display` and serde through the text label, for enums with `ALL`, `as_str` and
/// `LABELS`; `$what` names the value in errors. A label that
/// names no variant reads like serde's "unknown variant" error for a derived enum, and also
/// names the key (a config document's ack must say which value was wrong).
macro_rules! labelled {
    ($t:ty, $what:literal) => {
        impl FromStr for $t {
            type Err = UnknownLabel;

            fn from_str(s: &str) -> Result<Self, UnknownLabel> {
                <$t>::ALL
                    .into_iter()
                    .find(|v| v.as_str() == s)
                    .ok_or_else(|| UnknownLabel {
                        what: $what,
                        got: s.to_owned(),
                        allowed: <$t>::LABELS.to_vec(),
                    })
            }
        }

        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                text.parse().map_err(|e: UnknownLabel| {
                    serde::de::Error::custom(format_args!(
                        "unknown variant `{}` for {}, expected one of `{}`",
                        e.got,
                        e.what,
                        e.allowed.join("`, `")
                    ))
                })
            }
        }

        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

/// Which confidence signal decides escalation. All map to `[0, 1]`, higher = more confident, so
/// one threshold semantics fits all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Signal {
    /// Maximum softmax probability: the standard baseline, hard to beat (Hendrycks & Gimpel 2017).
    #[default]
    MaxProb,
    /// Top-1 minus top-2 probability.
    Margin,
    /// `1 - H(p) / ln(K)`: one minus normalized entropy (the form Sedna's CrossEntropy filter uses).
    Entropy,
}

impl Signal {
    pub const ALL: [Signal; 3] = [Signal::MaxProb, Signal::Margin, Signal::Entropy];
    pub const LABELS: &'static [&'static str] = &["max_prob", "margin", "entropy"];

    pub fn as_str(self) -> &'static str {
        match self {
            Signal::MaxProb => "max_prob",
            Signal::Margin => "margin",
            Signal::Entropy => "entropy",
        }
    }
}

labelled!(Signal, "signal");

/// Which tier produced the answer the caller received.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tier {
    Edge,
    Cloud,
    EdgeFallback,
}

impl Tier {
    /// Every tier, in the order metrics and reports list them.
    pub const ALL: [Tier; 3] = [Tier::Edge, Tier::Cloud, Tier::EdgeFallback];
    pub const LABELS: &'static [&'static str] = &["edge", "cloud", "edge_fallback"];

    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Edge => "edge",
            Tier::Cloud => "cloud",
            Tier::EdgeFallback => "edge_fallback",
        }
    }
}

labelled!(Tier, "tier");

/// Why an escalated request was answered by the edge after all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FallbackReason {
    /// No cloud answer within the escalation timeout.
    Timeout,
    /// Not connected to the broker when the request came in.
    Disconnected,
    /// Too many escalations already in flight.
    Overload,
    /// The relay answered with an error.
    RelayError(ReplyErrorCode),
    /// The request could not be encoded or published.
    PublishFailed,
}

impl FallbackReason {
    pub const ALL: [FallbackReason; 9] = [
        FallbackReason::Timeout,
        FallbackReason::Disconnected,
        FallbackReason::Overload,
        FallbackReason::RelayError(ReplyErrorCode::BadRequest),
        FallbackReason::RelayError(ReplyErrorCode::UnknownModel),
        FallbackReason::RelayError(ReplyErrorCode::BadShape),
        FallbackReason::RelayError(ReplyErrorCode::Internal),
        FallbackReason::RelayError(ReplyErrorCode::Overloaded),
        FallbackReason::PublishFailed,
    ];
    pub const LABELS: &'static [&'static str] = &[
        "timeout",
        "disconnected",
        "overload",
        "relay_error:bad_request",
        "relay_error:unknown_model",
        "relay_error:bad_shape",
        "relay_error:internal",
        "relay_error:overloaded",
        "publish_failed",
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            FallbackReason::Timeout => "timeout",
            FallbackReason::Disconnected => "disconnected",
            FallbackReason::Overload => "overload",
            FallbackReason::RelayError(ReplyErrorCode::BadRequest) => "relay_error:bad_request",
            FallbackReason::RelayError(ReplyErrorCode::UnknownModel) => "relay_error:unknown_model",
            FallbackReason::RelayError(ReplyErrorCode::BadShape) => "relay_error:bad_shape",
            FallbackReason::RelayError(ReplyErrorCode::Internal) => "relay_error:internal",
            FallbackReason::RelayError(ReplyErrorCode::Overloaded) => "relay_error:overloaded",
            FallbackReason::PublishFailed => "publish_failed",
        }
    }
}

labelled!(FallbackReason, "fallback_reason");

/// Index of the largest probability (first on ties).
pub fn top1(probs: &[f32]) -> usize {
    probs
        .iter()
        .enumerate()
        .fold(
            (0, f32::MIN),
            |(bi, bp), (i, &p)| {
                if p > bp {
                    (i, p)
                } else {
                    (bi, bp)
                }
            },
        )
        .0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_round_trip_in_json_and_postcard_as_the_old_strings() {
        for s in Signal::ALL {
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(json, format!("{:?}", s.as_str()));
            assert_eq!(serde_json::from_str::<Signal>(&json).unwrap(), s);
            // Byte-identical to the String that travelled before.
            let bytes = postcard::to_stdvec(&s).unwrap();
            assert_eq!(bytes, postcard::to_stdvec(&s.as_str().to_string()).unwrap());
            assert_eq!(postcard::from_bytes::<Signal>(&bytes).unwrap(), s);
        }
        let labels = |all: &[&'static str]| all.to_vec();
        assert_eq!(
            labels(Signal::LABELS),
            Signal::ALL.map(Signal::as_str).to_vec()
        );
        assert_eq!(labels(Tier::LABELS), Tier::ALL.map(Tier::as_str).to_vec());
        for t in Tier::ALL {
            assert_eq!(t.as_str().parse::<Tier>().unwrap(), t);
        }
        for (i, r) in FallbackReason::ALL.iter().enumerate() {
            assert_eq!(FallbackReason::LABELS[i], r.as_str());
        }
        for r in FallbackReason::ALL {
            assert_eq!(r.as_str().parse::<FallbackReason>().unwrap(), r);
            let json = serde_json::to_string(&r).unwrap();
            assert_eq!(serde_json::from_str::<FallbackReason>(&json).unwrap(), r);
        }
    }

    #[test]
    fn an_unknown_label_names_what_is_allowed() {
        let e = "maxprob".parse::<Signal>().unwrap_err().to_string();
        assert_eq!(
            e,
            r#"signal = "maxprob" is not one of ["max_prob", "margin", "entropy"]"#
        );
        let e = serde_json::from_str::<Signal>("\"nope\"")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "unknown variant `nope` for signal, expected one of `max_prob`, `margin`, `entropy`"
        );
        assert!("cloudy".parse::<Tier>().is_err());
    }
}
