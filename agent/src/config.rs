//! `agent.toml`: every key has a documented default, unknown keys are errors, and values are
//! range-checked before anything starts. `cross/agent.example.toml` lists them all.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

use tierd_runtime::mqtt::MqttConfig;

use crate::cascade::Signal;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("config: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Identity on MQTT topics (`tierd/v1/{device_id}/…`): 1–64 of `[A-Za-z0-9_.-]`.
    pub device_id: String,
    pub http: HttpConfig,
    pub model: ModelConfig,
    pub cascade: CascadeConfig,
    pub mqtt: MqttConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address of the local Open Inference Protocol v2 API. Loopback by default: local apps only.
    pub listen: SocketAddr,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// Inference requests handled at once; more wait in the queue.
    pub max_concurrent: usize,
    /// Requests allowed to wait for a slot; beyond that the agent answers 503 with Retry-After.
    pub max_queued: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Manifest of the edge model (TOML beside the .onnx). Relative paths are taken from the
    /// directory of the config file.
    pub manifest: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CascadeConfig {
    /// Answer locally iff confidence >= threshold. 0 never escalates; above 1 always does.
    pub threshold: f32,
    pub signal: Signal,
    /// How long a caller waits for the cloud before getting the edge answer (`edge_fallback`).
    pub escalation_timeout_ms: u64,
    /// Escalations awaiting a reply at once; beyond that requests fall back with `overload`.
    pub max_in_flight: usize,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            device_id: "edge-01".into(),
            http: HttpConfig::default(),
            model: ModelConfig::default(),
            cascade: CascadeConfig::default(),
            mqtt: MqttConfig::default(),
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_body_bytes: 256 * 1024,
            max_concurrent: 64,
            max_queued: 256,
        }
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            manifest: PathBuf::from("models/edge/digits-edge.toml"),
        }
    }
}

impl Default for CascadeConfig {
    fn default() -> Self {
        CascadeConfig {
            threshold: 0.9,
            signal: Signal::MaxProb,
            escalation_timeout_ms: 250,
            max_in_flight: 64,
        }
    }
}

impl AgentConfig {
    /// Reads, parses and validates a config file; relative paths become relative to its folder.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.to_owned(),
            source: e,
        })?;
        let mut cfg = Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { reason, .. } | ConfigError::Invalid(reason) => {
                ConfigError::Parse {
                    path: path.to_owned(),
                    reason,
                }
            }
            other => other,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        cfg.resolve_paths(base);
        Ok(cfg)
    }

    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let cfg: AgentConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            reason: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.model.manifest);
        self.mqtt.resolve_paths(base);
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |s: String| Err(ConfigError::Invalid(s));
        if let Err(e) = tierd_protocol::topic::validate_device_id(&self.device_id) {
            return bad(format!("device_id: {e}"));
        }
        let c = &self.cascade;
        if !(c.threshold.is_finite() && (0.0..=1.01).contains(&c.threshold)) {
            return bad(format!(
                "cascade.threshold = {} must be within [0, 1.01]",
                c.threshold
            ));
        }
        if !(1..=60_000).contains(&c.escalation_timeout_ms) {
            return bad(format!(
                "cascade.escalation_timeout_ms = {} must be within [1, 60000]",
                c.escalation_timeout_ms
            ));
        }
        if !(1..=10_000).contains(&c.max_in_flight) {
            return bad("cascade.max_in_flight must be within [1, 10000]".into());
        }
        let h = &self.http;
        if !(1024..=64 * 1024 * 1024).contains(&h.max_body_bytes) {
            return bad("http.max_body_bytes must be within [1 KiB, 64 MiB]".into());
        }
        if !(1..=10_000).contains(&h.max_concurrent) || h.max_queued > 100_000 {
            return bad(
                "http.max_concurrent must be within [1, 10000] and http.max_queued at most 100000"
                    .into(),
            );
        }
        if let Err(e) = self.mqtt.validate() {
            return bad(e.to_string());
        }
        Ok(())
    }

    pub fn escalation_timeout(&self) -> Duration {
        Duration::from_millis(self.cascade.escalation_timeout_ms)
    }

    /// The MQTT client id used unless `mqtt.client_id` is set.
    pub fn default_client_id(&self) -> String {
        format!("edge-agent-{}", self.device_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_documented_defaults() {
        let c = AgentConfig::parse("").unwrap();
        assert_eq!(c.http.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.cascade.escalation_timeout_ms, 250);
        assert_eq!(c.cascade.signal, Signal::MaxProb);
        assert_eq!(c.default_client_id(), "edge-agent-edge-01");
    }

    #[test]
    fn example_config_parses() {
        let text = include_str!("../../cross/agent.example.toml");
        let c = AgentConfig::parse(text).unwrap();
        assert_eq!(c.cascade.signal, Signal::MaxProb);
    }

    #[test]
    fn rejects_bad_values_with_the_key_named() {
        for (text, key) in [
            ("device_id = \"a/b\"", "device_id"),
            ("[cascade]\nthreshold = 2.0", "cascade.threshold"),
            (
                "[cascade]\nescalation_timeout_ms = 0",
                "escalation_timeout_ms",
            ),
            ("[cascade]\nsignal = \"vibes\"", "unknown variant"),
            ("[cascade]\nthreshhold = 0.5", "unknown field"),
            ("[mqtt]\npassword = \"x\"", "mqtt.password"),
            ("[http]\nlisten = \"nowhere\"", "invalid socket address"),
        ] {
            let err = AgentConfig::parse(text).unwrap_err().to_string();
            assert!(err.contains(key), "{key:?} not in {err:?}");
        }
    }

    #[test]
    fn relative_paths_follow_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, "[model]\nmanifest = \"m/x.toml\"").unwrap();
        let c = AgentConfig::load(&path).unwrap();
        assert_eq!(c.model.manifest, dir.path().join("m/x.toml"));
    }
}
