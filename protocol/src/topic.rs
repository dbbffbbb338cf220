//! The MQTT topic tree.
//!
//! | topic | direction | QoS | retained | payload |
//! |---|---|---|---|---|
//! | `tierd/v1/{device}/escalate/{model}` | agent → relay (shared subscription per model) | 0 | no | [`EscalationRequest`](crate::EscalationRequest) |
//! | `tierd/v1/{device}/reply` | relay → agent | 0 | no | [`EscalationReply`](crate::EscalationReply) |
//! | `tierd/v1/{device}/telemetry` | agent → relay | 1 | no | [`Spooled`](crate::Spooled) telemetry / calibration report |
//! | `tierd/v1/{device}/config` | relay → agent | 1 | yes | [`ConfigDocument`](crate::ConfigDocument) (JSON) |
//! | `tierd/v1/{device}/config/ack` | agent → relay | 1 | no | [`Spooled`](crate::Spooled) [`ConfigAck`](crate::ConfigAck) |
//! | `tierd/v1/{device}/ack` | relay → agent | 1 | no | [`SpoolAck`](crate::SpoolAck) |
//! | `tierd/v1/{device}/status` | agent (and its last will) | 1 | yes | [`DeviceStatus`](crate::DeviceStatus) |
//! | `tierd/v1/{device}/rollout` | relay → agent | 1 | yes | [`RolloutDocument`](crate::RolloutDocument) (JSON, signed) |
//! | `tierd/v1/{device}/model/fetch` | agent → relay (shared subscription) | 0 | no | [`ModelFetch`](crate::ModelFetch) |
//! | `tierd/v1/{device}/model/chunk` | relay → agent | 0 | no | [`ModelChunk`](crate::ModelChunk) |
//!
//! Escalations use QoS 0 on purpose: an escalation is bound by a deadline of a few hundred
//! milliseconds, QoS 1 redelivery would arrive after the caller was already answered, and embedded
//! rumqttd (which never sets TCP_NODELAY) turns every QoS 1 round trip into ~44 ms of Nagle delay.
//! A lost escalation is covered by the agent's timeout and local fallback, never by waiting.
//!
//! `{model}` is the edge model's name (without version): each relay pool subscribes to the
//! models it serves, one shared-subscription group per model (`$share/tierd-relay.{model}/...`),
//! so two pools serving two models behind one broker each get only their own escalations; a
//! relay that serves any model takes `$share/tierd-relay/tierd/v1/+/escalate/+` (which is why
//! replies live apart, on `{device}/reply`). A model name follows the device-id rules.

use thiserror::Error;

/// First two levels of every tierd topic.
pub const PREFIX: &str = "tierd/v1";

/// Longest device id accepted, in bytes.
pub const MAX_DEVICE_ID_LEN: usize = 64;

/// Shared-subscription group the relays join, so several replicas split escalations.
pub const RELAY_SHARE_GROUP: &str = "tierd-relay";

/// Shared-subscription group for model fetches (one relay answers each chunk request).
pub const MODEL_SHARE_GROUP: &str = "tierd-relay-models";

/// What a topic carries, independent of the device it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TopicKind {
    Escalate,
    EscalateReply,
    Telemetry,
    Config,
    ConfigAck,
    SpoolAck,
    Status,
    Rollout,
    ModelFetch,
    ModelChunk,
}

impl TopicKind {
    /// The topic suffix after `tierd/v1/{device}/`.
    pub fn suffix(self) -> &'static str {
        match self {
            TopicKind::Escalate => "escalate",
            TopicKind::EscalateReply => "reply",
            TopicKind::Telemetry => "telemetry",
            TopicKind::Config => "config",
            TopicKind::ConfigAck => "config/ack",
            TopicKind::SpoolAck => "ack",
            TopicKind::Status => "status",
            TopicKind::Rollout => "rollout",
            TopicKind::ModelFetch => "model/fetch",
            TopicKind::ModelChunk => "model/chunk",
        }
    }

    const ALL: [TopicKind; 10] = [
        TopicKind::Escalate,
        TopicKind::EscalateReply,
        TopicKind::Telemetry,
        TopicKind::Config,
        TopicKind::ConfigAck,
        TopicKind::SpoolAck,
        TopicKind::Status,
        TopicKind::Rollout,
        TopicKind::ModelFetch,
        TopicKind::ModelChunk,
    ];
}

/// A parsed tierd topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topic {
    pub device_id: String,
    pub kind: TopicKind,
    /// The edge model an escalation is for: set for [`TopicKind::Escalate`] only.
    pub model: Option<String>,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum TopicError {
    #[error("topic {0:?} is not under {PREFIX}/")]
    NotTierd(String),
    #[error("topic {0:?} has an unknown suffix")]
    UnknownSuffix(String),
    #[error("invalid device id {id:?}: {why}")]
    BadDeviceId { id: String, why: &'static str },
    #[error("invalid model name {name:?} for a topic: {why}")]
    BadModelName { name: String, why: &'static str },
    #[error("an escalation topic names its edge model: use Topic::escalate")]
    NeedsModel,
}

/// Checks an edge model's name for the escalation topic: the device-id rules (one topic
/// level, no wildcards).
pub fn validate_model_name(name: &str) -> Result<(), TopicError> {
    match validate_device_id(name) {
        Ok(()) => Ok(()),
        Err(TopicError::BadDeviceId { why, .. }) => Err(TopicError::BadModelName {
            name: name.chars().take(80).collect(),
            why,
        }),
        Err(e) => Err(e),
    }
}

/// Checks a device id: 1–64 bytes of `[A-Za-z0-9_.-]`, so it can never inject MQTT wildcards
/// (`+`, `#`) or extra topic levels (`/`).
pub fn validate_device_id(id: &str) -> Result<(), TopicError> {
    let bad = |why| {
        Err(TopicError::BadDeviceId {
            id: id.chars().take(80).collect(),
            why,
        })
    };
    if id.is_empty() {
        return bad("empty");
    }
    if id.len() > MAX_DEVICE_ID_LEN {
        return bad("longer than 64 bytes");
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    {
        return bad("only letters, digits, '_', '-' and '.' are allowed");
    }
    Ok(())
}

impl Topic {
    /// A topic of `kind` for `device_id`; an escalation topic needs [`Topic::escalate`].
    pub fn new(device_id: &str, kind: TopicKind) -> Result<Self, TopicError> {
        validate_device_id(device_id)?;
        if kind == TopicKind::Escalate {
            return Err(TopicError::NeedsModel);
        }
        Ok(Topic {
            device_id: device_id.to_owned(),
            kind,
            model: None,
        })
    }

    /// `tierd/v1/{device}/escalate/{model}`: where `device_id` escalates for edge model `model`.
    pub fn escalate(device_id: &str, model: &str) -> Result<Self, TopicError> {
        validate_device_id(device_id)?;
        validate_model_name(model)?;
        Ok(Topic {
            device_id: device_id.to_owned(),
            kind: TopicKind::Escalate,
            model: Some(model.to_owned()),
        })
    }

    /// Parses `tierd/v1/{device}/{suffix}`.
    pub fn parse(topic: &str) -> Result<Self, TopicError> {
        let rest = topic
            .strip_prefix(PREFIX)
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(|| TopicError::NotTierd(topic.chars().take(200).collect()))?;
        let (device, suffix) = rest
            .split_once('/')
            .ok_or_else(|| TopicError::UnknownSuffix(topic.chars().take(200).collect()))?;
        validate_device_id(device)?;
        if let Some(model) = suffix.strip_prefix("escalate/") {
            return Self::escalate(device, model);
        }
        let kind = TopicKind::ALL
            .into_iter()
            .filter(|k| *k != TopicKind::Escalate)
            .find(|k| k.suffix() == suffix)
            .ok_or_else(|| TopicError::UnknownSuffix(topic.chars().take(200).collect()))?;
        Ok(Topic {
            device_id: device.to_owned(),
            kind,
            model: None,
        })
    }

    /// Filter matching this kind of topic for every device, e.g. `tierd/v1/+/telemetry`
    /// (escalations: for every model too, `tierd/v1/+/escalate/+`).
    pub fn all_devices(kind: TopicKind) -> String {
        match kind {
            TopicKind::Escalate => format!("{PREFIX}/+/escalate/+"),
            _ => format!("{PREFIX}/+/{}", kind.suffix()),
        }
    }

    /// The shared-subscription filters a relay pool serving edge models `serves` takes
    /// escalations on: one group per model, or one group for every model when `serves` is
    /// empty.
    pub fn relay_escalation_filters(serves: &[String]) -> Result<Vec<String>, TopicError> {
        if serves.is_empty() {
            return Ok(vec![format!(
                "$share/{RELAY_SHARE_GROUP}/{}",
                Self::all_devices(TopicKind::Escalate)
            )]);
        }
        serves
            .iter()
            .map(|m| {
                validate_model_name(m)?;
                Ok(format!(
                    "$share/{RELAY_SHARE_GROUP}.{m}/{PREFIX}/+/escalate/{m}"
                ))
            })
            .collect()
    }
}

impl std::fmt::Display for Topic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.kind, &self.model) {
            (TopicKind::Escalate, Some(m)) => {
                write!(f, "{PREFIX}/{}/escalate/{m}", self.device_id)
            }
            _ => write!(f, "{PREFIX}/{}/{}", self.device_id, self.kind.suffix()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escalation_topics_name_their_model() {
        let t = Topic::escalate("pi-1", "digits-edge").unwrap();
        assert_eq!(t.to_string(), "tierd/v1/pi-1/escalate/digits-edge");
        assert_eq!(Topic::parse(&t.to_string()).unwrap(), t);
        assert_eq!(
            Topic::new("pi-1", TopicKind::Escalate),
            Err(TopicError::NeedsModel)
        );
        assert!(Topic::escalate("pi-1", "a/b").is_err());
        assert!(Topic::escalate("pi-1", "+").is_err());
        // The old model-less topic is no escalation any more.
        assert!(Topic::parse("tierd/v1/pi-1/escalate").is_err());
        assert!(Topic::parse("tierd/v1/pi-1/escalate/a/b").is_err());
        assert_eq!(
            Topic::relay_escalation_filters(&[]).unwrap(),
            ["$share/tierd-relay/tierd/v1/+/escalate/+"]
        );
        assert_eq!(
            Topic::relay_escalation_filters(&["digits-edge".into(), "breast-edge".into()]).unwrap(),
            [
                "$share/tierd-relay.digits-edge/tierd/v1/+/escalate/digits-edge",
                "$share/tierd-relay.breast-edge/tierd/v1/+/escalate/breast-edge"
            ]
        );
        assert!(Topic::relay_escalation_filters(&["#".into()]).is_err());
    }

    #[test]
    fn round_trips_every_kind() {
        for kind in TopicKind::ALL {
            let t = if kind == TopicKind::Escalate {
                Topic::escalate("pi-4.field_07", "m-1").unwrap()
            } else {
                Topic::new("pi-4.field_07", kind).unwrap()
            };
            let s = t.to_string();
            assert_eq!(Topic::parse(&s).unwrap(), t, "{s}");
        }
        assert_eq!(
            Topic::new("d1", TopicKind::EscalateReply)
                .unwrap()
                .to_string(),
            "tierd/v1/d1/reply"
        );
    }

    #[test]
    fn rejects_foreign_and_malformed_topics() {
        assert!(matches!(
            Topic::parse("other/v1/d/escalate"),
            Err(TopicError::NotTierd(_))
        ));
        assert!(matches!(
            Topic::parse("tierd/v1/d/nope"),
            Err(TopicError::UnknownSuffix(_))
        ));
        assert!(matches!(
            Topic::parse("tierd/v1/d"),
            Err(TopicError::UnknownSuffix(_))
        ));
        assert!(matches!(
            Topic::parse("tierd/v1/+/escalate"),
            Err(TopicError::BadDeviceId { .. })
        ));
    }

    #[test]
    fn device_ids_cannot_inject_levels_or_wildcards() {
        for bad in ["", "a/b", "a+", "#", "sp ace", &"x".repeat(65), "é"] {
            assert!(validate_device_id(bad).is_err(), "{bad:?} accepted");
        }
        assert!(validate_device_id(&"x".repeat(64)).is_ok());
    }
}
