//! The tierd wire format, shared by the edge agent and the cloud relay.
//!
//! This crate owns the wire format and does no I/O:
//! - [`cascade`]: the shared words — [`Signal`], [`Tier`], [`FallbackReason`];
//! - [`topic`]: the MQTT topic tree `tierd/v1/{device_id}/…` and its parser;
//! - [`message`]: every message that crosses MQTT, as plain serde types;
//! - [`telemetry`]: the periodic report each agent publishes (counts, latency, energy);
//! - [`config`]: the remote config document (JSON, retained) and its value ranges;
//! - [`codec`]: framing (version byte + kind byte + postcard body) with size limits checked
//!   *before* anything is decoded.
//!
//! Tensors travel in their native dtype (u8 pixels stay u8, one byte each) because radio bytes
//! cost energy on the device; JSON floats would be ~8x larger for the same image.

pub mod cascade;
pub mod codec;
pub mod config;
pub mod message;
pub mod telemetry;
pub mod topic;

pub use cascade::{top1, FallbackReason, Signal, Tier, UnknownLabel};
pub use codec::{decode, encode, WireError, WireMessage, WIRE_VERSION};
pub use config::{ConfigDocError, ConfigDocument, Settings};
pub use message::*;
pub use telemetry::*;
pub use topic::{Topic, TopicError, TopicKind};
