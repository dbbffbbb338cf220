//! **Where escalation is decided.**
//!
//! - [`rule`] (pure): how confident the edge model is, whether to escalate, which answer the
//!   caller gets.
//! - [`service`]: the cascade as one call — forward, decision, escalation, evidence, audit draw
//!   — over traits for the model and the cloud path, so every front end (the OIP HTTP API
//!   today) shares it and it is unit-tested without sockets.

pub mod rule;
pub mod service;

pub use rule::*;
pub use service::{Cascade, EdgeModel, Outcome, Serving};
