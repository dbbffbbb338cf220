//! The settings in force on the request path: `agent.toml`, overlaid by the remote config
//! document last applied ([`crate::remote_config`]). Shared through a `watch` channel and
//! swapped live when a new document is applied.

use std::time::Duration;

use crate::cascade::Signal;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    pub threshold: f32,
    pub signal: Signal,
    pub escalation_timeout: Duration,
    pub audit_rate: f64,
    pub telemetry_interval: Duration,
    /// Version of the remote document in force; 0 = `agent.toml` only.
    pub config_version: u64,
}
