//! `relay.toml`. Without an `[mqtt]` section the relay embeds a broker and connects to it, so a
//! newcomer needs nothing installed; with one, it joins that broker (several relays then split
//! escalations through a shared subscription).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;
use tierd_runtime::mqtt::MqttConfig;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    /// Names this replica in logs and in its MQTT client id.
    pub relay_id: String,
    pub model: ModelConfig,
    /// The broker to join. Absent: run the embedded broker below and use it.
    pub mqtt: Option<MqttConfig>,
    pub embedded_broker: EmbeddedBrokerConfig,
    pub http: HttpConfig,
    /// Escalations processed at once.
    pub workers: usize,
    /// Escalations waiting for a worker; beyond it the relay answers `Overloaded`.
    pub queue: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Manifest of the cloud model. Relative paths start at the config file's folder.
    pub manifest: PathBuf,
    /// Edge model names (without version) this cloud model answers for; empty = any whose
    /// input fits.
    pub serves: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmbeddedBrokerConfig {
    /// Where the embedded rumqttd listens (MQTT v5, plain TCP, no auth: development only).
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// `/metrics`, `/api/devices`, `/health`. Loopback by default; put a proxy with auth in
    /// front before exposing it.
    pub listen: SocketAddr,
    /// Devices tracked at most; reports from further devices are dropped and counted.
    pub max_devices: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9100)),
            max_devices: 100_000,
        }
    }
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            relay_id: "relay-1".into(),
            model: ModelConfig::default(),
            mqtt: None,
            embedded_broker: EmbeddedBrokerConfig::default(),
            http: HttpConfig::default(),
            workers: 4,
            queue: 1024,
        }
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            manifest: PathBuf::from("models/cloud/digits-cloud.toml"),
            serves: Vec::new(),
        }
    }
}

impl Default for EmbeddedBrokerConfig {
    fn default() -> Self {
        EmbeddedBrokerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 1883)),
        }
    }
}

impl RelayConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.to_owned(),
            source: e,
        })?;
        let mut cfg = Self::parse(&text).map_err(|reason| ConfigError::Invalid {
            path: path.to_owned(),
            reason,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        if cfg.model.manifest.is_relative() {
            cfg.model.manifest = base.join(&cfg.model.manifest);
        }
        if let Some(m) = &mut cfg.mqtt {
            m.resolve_paths(base);
        }
        Ok(cfg)
    }

    /// Parses and validates; the error names the key at fault.
    pub fn parse(text: &str) -> Result<Self, String> {
        let cfg: RelayConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.relay_id.is_empty()
            || self.relay_id.len() > 64
            || !self
                .relay_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return Err(format!(
                "relay_id {:?} must be 1-64 of [A-Za-z0-9_.-]",
                self.relay_id
            ));
        }
        if !(1..=256).contains(&self.workers) {
            return Err("workers must be within [1, 256]".into());
        }
        if !(1..=1_000_000).contains(&self.queue) {
            return Err("queue must be within [1, 1000000]".into());
        }
        if !(1..=10_000_000).contains(&self.http.max_devices) {
            return Err("http.max_devices must be within [1, 10000000]".into());
        }
        if let Some(m) = &self.mqtt {
            m.validate().map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Broker settings the relay's client uses: the configured broker or the embedded one.
    pub fn client_mqtt(&self) -> MqttConfig {
        self.mqtt.clone().unwrap_or_else(|| MqttConfig {
            host: self.embedded_broker.listen.ip().to_string(),
            port: self.embedded_broker.listen.port(),
            ..MqttConfig::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_embed_a_broker() {
        let c = RelayConfig::parse("").unwrap();
        assert!(c.mqtt.is_none());
        assert_eq!(c.client_mqtt().port, 1883);
    }

    #[test]
    fn example_config_parses() {
        RelayConfig::parse(include_str!("../../cross/relay.example.toml")).unwrap();
    }

    #[test]
    fn rejects_bad_values() {
        for (text, needle) in [
            ("workers = 0", "workers"),
            ("relay_id = \"a b\"", "relay_id"),
            ("[mqtt]\nkeep_alive_s = 1", "keep_alive_s"),
            ("wrokers = 2", "unknown field"),
        ] {
            let err = RelayConfig::parse(text).unwrap_err();
            assert!(err.contains(needle), "{needle:?} not in {err:?}");
        }
    }
}
