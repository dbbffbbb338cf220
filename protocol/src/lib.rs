//! The tierd wire format, shared by the edge agent and the cloud relay.
//!
//! This crate owns the wire format and does no I/O:
//! - [`cascade`]: the shared words — [`Signal`], [`Tier`], [`FallbackReason`];
//! - [`topic`]: the MQTT topic tree `tierd/v1/{device_id}/…` and its parser;
//! - [`message`]: every message that crosses MQTT, as plain serde types;
//! - [`telemetry`]: the periodic report each agent publishes (counts, latency, energy);
//! - [`config`]: the remote config document (JSON, retained) and its value ranges;
//! - [`rollout`]: model rollout over the air (the signed rollout document, chunked transfer,
//!   the agent's acks and shadow evidence);
//! - [`codec`]: framing (version byte + kind byte + postcard body) with size limits checked
//!   *before* anything is decoded.
//!
//! Tensors travel in their native dtype (u8 pixels stay u8, one byte each) because radio bytes
//! cost energy on the device; JSON floats would be ~8x larger for the same image.

pub mod cascade;
pub mod codec;
pub mod config;
pub mod inspect;
pub mod message;
pub mod rollout;
pub mod signed;
pub mod telemetry;
pub mod topic;

pub use cascade::{top1, FallbackReason, Signal, Tier, UnknownLabel};
pub use codec::{decode, encode, WireError, WireMessage, WIRE_VERSION};
pub use config::{ConfigDocError, ConfigDocument, Settings};
pub use message::*;
pub use rollout::{
    ModelChunk, ModelFetch, RolloutAck, RolloutDocument, RolloutPhase, RolloutStage, ShadowReport,
};
pub use signed::{PublicKey, SignedError, Signer};
pub use telemetry::*;
pub use topic::{Topic, TopicError, TopicKind};

/// Declares a typed error that is one human-readable reason (for the client or operator who
/// sent the bad input), with `From<String>` and `From<&str>`. The crate using it needs
/// `thiserror`.
#[macro_export]
macro_rules! reason_error {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
        #[error("{0}")]
        pub struct $name(pub String);

        impl From<String> for $name {
            fn from(m: String) -> Self {
                $name(m)
            }
        }

        impl From<&str> for $name {
            fn from(m: &str) -> Self {
                $name(m.to_owned())
            }
        }
    };
}
