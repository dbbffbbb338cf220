//! `agent.toml`: every key has a documented default, unknown keys are errors, and values are
//! range-checked before anything starts. `cross/agent.example.toml` lists them all.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use tierd_protocol::config::limits;
use tierd_runtime::mqtt::MqttConfig;

use crate::cascade::Signal;
use crate::energy::attribution::{Link, LinkModel};
use crate::energy::{EnergySource, Ina219Config};

pub use tierd_runtime::config::ConfigError;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Identity on MQTT topics (`tierd/v1/{device_id}/…`): 1–64 of `[A-Za-z0-9_.-]`.
    /// Default: `$TIERD_DEVICE_ID`, else the hostname (see [`crate::identity`]).
    pub device_id: String,
    /// Where `device_id` came from.
    #[serde(skip)]
    pub device_id_source: crate::identity::IdSource,
    pub http: HttpConfig,
    pub model: ModelConfig,
    /// More models served beside `[model]` (`[[models]]`), each with its own threshold,
    /// escalation topic, evidence and audits. `[model]` stays the primary: the telemetry names
    /// it and a config document's top-level threshold and signal are its; a further model's are
    /// its `models.<name>` entry.
    pub models: Vec<ExtraModelConfig>,
    pub cascade: CascadeConfig,
    pub mqtt: MqttConfig,
    pub telemetry: TelemetryConfig,
    pub energy: EnergyConfig,
    /// Where the spool and the applied remote config live. Default: `$STATE_DIRECTORY` (set by
    /// systemd's `StateDirectory=`), else `tierd-state` in the working directory. Relative
    /// paths start at the config file's folder.
    pub state_dir: Option<PathBuf>,
    pub spool: SpoolConfig,
    pub remote_config: RemoteConfigSection,
    pub rollout: RolloutSection,
}

/// `[rollout]`: how a new model version is fetched (see `crate::rollout`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RolloutSection {
    /// At most this many bytes per second of model download, so a metered or slow link (LTE)
    /// keeps room for escalations; 0: as fast as the link goes.
    pub max_download_bytes_per_s: u64,
}

/// `[remote_config]`: which relays may set this device's config.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RemoteConfigSection {
    /// Public keys of the relays whose signed config documents are applied
    /// (`tierd-ed25519:<64 hex>`, as `cloud-relay keygen --print-public` prints them). A list,
    /// so keys can be rotated. Empty: every remote document is refused.
    pub trusted_keys: Vec<tierd_protocol::PublicKey>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolConfig {
    /// Size cap of the on-disk spool (telemetry, calibration reports, config acks waiting for
    /// the relay's acknowledgement). At the cap the oldest records are dropped and counted.
    pub max_bytes: u64,
    /// Unacknowledged records are sent again after this long without progress.
    pub resend_after_s: f64,
    /// On a clean stop, how long to wait for the relay to acknowledge what is pending before
    /// leaving it on disk for the next start.
    pub flush_timeout_s: f64,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            max_bytes: 16 * 1024 * 1024,
            resend_after_s: 10.0,
            flush_timeout_s: 3.0,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Record latencies and publish reports. Off: counters only, no reports, no `/metrics`
    /// latency histograms (for measuring the overhead, not for production).
    pub enabled: bool,
    /// Seconds between reports on `tierd/v1/{device_id}/telemetry`.
    pub interval_s: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EnergyConfig {
    /// `auto` (RAPL, hwmon, a configured INA219; else the estimate), or one of `rapl`, `hwmon`,
    /// `ina219`, `estimate`. A chosen source that fails falls back to the estimate, flagged.
    pub source: EnergySource,
    /// How often the meter is read; integrating meters (hwmon, INA219) need at least 1 Hz.
    pub sample_interval_ms: u64,
    /// Radio link of the escalations, for the radio energy model: `ethernet`, `wifi`, `lte`.
    pub link: Link,
    /// Override the link's modelled joules per payload byte.
    pub joules_per_byte: Option<f64>,
    /// Override the link's modelled joules per MQTT message (connection/tail overhead).
    pub joules_per_message: Option<f64>,
    /// An external INA219 on I2C (Raspberry Pi 4). Absent: none.
    pub ina219: Option<Ina219Config>,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            enabled: true,
            interval_s: 30.0,
        }
    }
}

impl Default for EnergyConfig {
    fn default() -> Self {
        EnergyConfig {
            source: EnergySource::Auto,
            sample_interval_ms: 1000,
            link: Link::Wifi,
            joules_per_byte: None,
            joules_per_message: None,
            ina219: None,
        }
    }
}

impl EnergyConfig {
    pub fn link_model(&self) -> LinkModel {
        let base = self.link.model();
        LinkModel {
            joules_per_byte: self.joules_per_byte.unwrap_or(base.joules_per_byte),
            joules_per_message: self.joules_per_message.unwrap_or(base.joules_per_message),
        }
    }
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
    /// File holding a bearer token the OIP routes then require (`/v2/health/live` and
    /// `/v2/health/ready` stay open). A bare file name is looked up in
    /// `$CREDENTIALS_DIRECTORY` (systemd `LoadCredential=`) when that is set; other relative
    /// paths start at the config file's folder. Absent: no token (fine on loopback; the agent
    /// warns when it listens beyond loopback without one).
    pub token_file: Option<PathBuf>,
}

/// Where a credential file named in a config is: a bare file name is taken from
/// `credentials_dir` (systemd's `$CREDENTIALS_DIRECTORY`) when there is one; other relative
/// paths start at `base`, the config file's folder.
pub fn resolve_credential(path: &Path, base: &Path, credentials_dir: Option<&Path>) -> PathBuf {
    let mut parts = path.components();
    let bare = matches!(
        (parts.next(), parts.next()),
        (Some(std::path::Component::Normal(_)), None)
    );
    match credentials_dir {
        Some(dir) if bare => dir.join(path),
        _ if path.is_relative() => base.join(path),
        _ => path.to_path_buf(),
    }
}

/// One `[[models]]` entry: a further model the agent serves (a model repository in the way of
/// Triton's, written as a list).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtraModelConfig {
    /// Its manifest; relative paths start at the config file's folder. Verified like
    /// `[model]`'s (sha256, golden vectors, and the signature when `model.trusted_keys` is set).
    pub manifest: PathBuf,
    /// Answer locally iff confidence >= threshold; unset: the manifest's offline-certified
    /// threshold, else 0.9 (as `cascade.threshold`).
    #[serde(default)]
    pub threshold: Option<f32>,
    /// Confidence signal; unset: `cascade.signal`.
    #[serde(default)]
    pub signal: Option<Signal>,
}

impl ExtraModelConfig {
    /// The threshold it runs at, and where that came from.
    pub fn start_threshold(&self, manifest: &tierd_runtime::Manifest) -> (f32, &'static str) {
        CascadeConfig {
            threshold: self.threshold,
            ..CascadeConfig::default()
        }
        .start_threshold(manifest)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Manifest of the edge model (TOML beside the .onnx). Relative paths are taken from the
    /// directory of the config file.
    pub manifest: PathBuf,
    /// Model-release public keys (`tierd-ed25519:<hex>`, as `edge-agent model keygen`
    /// prints them). When any is set, the manifest must carry a valid signature by one of
    /// them (`<manifest>.sig`, written by `edge-agent model sign`) or the agent refuses to
    /// start. Empty (the default): manifests are checked by sha256 and golden vectors only.
    pub trusted_keys: Vec<tierd_protocol::PublicKey>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CascadeConfig {
    /// Answer locally iff confidence >= threshold. 0 never escalates; above 1 always does.
    /// Unset (the default): the threshold certified offline in the model's manifest
    /// (`[calibration]`), else [`UNCALIBRATED_THRESHOLD`].
    pub threshold: Option<f32>,
    pub signal: Signal,
    /// How long a caller waits for the cloud before getting the edge answer (`edge_fallback`).
    pub escalation_timeout_ms: u64,
    /// Escalations awaiting a reply at once; beyond that requests fall back with `overload`.
    pub max_in_flight: usize,
    /// Fraction of locally answered requests also sent to the cloud in the background, so the
    /// relay's tuner can measure how often the edge is wrong above the threshold.
    pub audit_rate: f64,
    /// Cap on audits per second, whatever the traffic.
    pub max_audits_per_second: u32,
}

/// Most `[[models]]` entries: each holds a compiled plan in memory.
pub const MAX_EXTRA_MODELS: usize = 16;

impl Default for AgentConfig {
    fn default() -> Self {
        let (device_id, device_id_source) = crate::identity::from_environment();
        AgentConfig {
            device_id,
            device_id_source,
            http: HttpConfig::default(),
            model: ModelConfig::default(),
            models: Vec::new(),
            cascade: CascadeConfig::default(),
            mqtt: MqttConfig::default(),
            telemetry: TelemetryConfig::default(),
            energy: EnergyConfig::default(),
            state_dir: None,
            spool: SpoolConfig::default(),
            remote_config: RemoteConfigSection::default(),
            rollout: RolloutSection::default(),
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
            token_file: None,
        }
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            manifest: PathBuf::from("models/edge/digits-edge.toml"),
            trusted_keys: Vec::new(),
        }
    }
}

/// The threshold of a model whose manifest certifies none, when `agent.toml` sets none.
pub const UNCALIBRATED_THRESHOLD: f32 = 0.9;

impl CascadeConfig {
    /// The threshold to start from, and where it comes from: `agent.toml`, else the model's
    /// offline certificate, else [`UNCALIBRATED_THRESHOLD`].
    pub fn start_threshold(&self, manifest: &tierd_runtime::Manifest) -> (f32, &'static str) {
        match (self.threshold, &manifest.calibration) {
            (Some(t), _) => (t, "agent.toml"),
            (None, Some(c)) => (c.threshold, "the model's offline certificate"),
            (None, None) => (UNCALIBRATED_THRESHOLD, "the uncalibrated default"),
        }
    }
}

impl Default for CascadeConfig {
    fn default() -> Self {
        CascadeConfig {
            threshold: None,
            signal: Signal::MaxProb,
            escalation_timeout_ms: 250,
            max_in_flight: 64,
            audit_rate: 0.02,
            max_audits_per_second: 10,
        }
    }
}

impl AgentConfig {
    /// Reads, parses and validates a config file; relative paths become relative to its folder.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let (mut cfg, base) = tierd_runtime::config::read(path, Self::parse)?;
        cfg.resolve_paths(&base);
        Ok(cfg)
    }

    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let mut cfg: AgentConfig = tierd_runtime::config::from_toml(text)?;
        if text
            .parse::<toml::Table>()
            .is_ok_and(|t| t.contains_key("device_id"))
        {
            cfg.device_id_source = crate::identity::IdSource::Config;
        }
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
        for m in &mut self.models {
            fix(&mut m.manifest);
        }
        if let Some(t) = self.http.token_file.as_mut() {
            let creds = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
            *t = resolve_credential(t, base, creds.as_deref());
        }
        if let Some(d) = self.state_dir.as_mut() {
            fix(d);
        }
        self.mqtt.resolve_paths(base);
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |s: String| Err(ConfigError::invalid(s));
        if let Err(e) = tierd_protocol::topic::validate_device_id(&self.device_id) {
            return match self.device_id_source {
                crate::identity::IdSource::Environment => bad(format!(
                    "{} (no device_id in agent.toml): {e}",
                    crate::identity::DEVICE_ID_ENV
                )),
                _ => bad(format!("device_id: {e}")),
            };
        }
        let c = &self.cascade;
        if let Some(t) = c
            .threshold
            .filter(|t| !(t.is_finite() && limits::THRESHOLD.contains(t)))
        {
            return bad(format!("cascade.threshold = {t} must be within [0, 1.01]"));
        }
        for (i, m) in self.models.iter().enumerate() {
            if let Some(t) = m
                .threshold
                .filter(|t| !(t.is_finite() && limits::THRESHOLD.contains(t)))
            {
                return bad(format!(
                    "models[{i}].threshold = {t} must be within [0, 1.01]"
                ));
            }
        }
        if self.models.len() > MAX_EXTRA_MODELS {
            return bad(format!(
                "{} [[models]]: at most {MAX_EXTRA_MODELS} besides [model]",
                self.models.len()
            ));
        }
        if !limits::ESCALATION_TIMEOUT_MS.contains(&c.escalation_timeout_ms) {
            return bad(format!(
                "cascade.escalation_timeout_ms = {} must be within [1, 60000]",
                c.escalation_timeout_ms
            ));
        }
        if !(1..=10_000).contains(&c.max_in_flight) {
            return bad("cascade.max_in_flight must be within [1, 10000]".into());
        }
        if !(c.audit_rate.is_finite() && limits::AUDIT_RATE.contains(&c.audit_rate)) {
            return bad(format!(
                "cascade.audit_rate = {} must be within [0, 1]",
                c.audit_rate
            ));
        }
        if c.max_audits_per_second > 10_000 {
            return bad("cascade.max_audits_per_second must be at most 10000".into());
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
        let t = &self.telemetry;
        if !(t.interval_s.is_finite() && limits::TELEMETRY_INTERVAL_S.contains(&t.interval_s)) {
            return bad(format!(
                "telemetry.interval_s = {} must be within [0.1, 86400]",
                t.interval_s
            ));
        }
        let e = &self.energy;
        if !(10..=60_000).contains(&e.sample_interval_ms) {
            return bad(format!(
                "energy.sample_interval_ms = {} must be within [10, 60000]",
                e.sample_interval_ms
            ));
        }
        for (key, v) in [
            ("energy.joules_per_byte", e.joules_per_byte),
            ("energy.joules_per_message", e.joules_per_message),
        ] {
            if let Some(v) = v {
                if !(v.is_finite() && v >= 0.0) {
                    return bad(format!("{key} = {v} must be a non-negative number"));
                }
            }
        }
        if let Some(i) = &e.ina219 {
            if !(0x40..=0x4F).contains(&i.address) {
                return bad(format!(
                    "energy.ina219.address = {:#x} must be within 0x40-0x4f",
                    i.address
                ));
            }
            let positive = |v: f64| v.is_finite() && v > 0.0;
            if !(positive(i.shunt_ohms) && positive(i.max_current_a)) {
                return bad(
                    "energy.ina219.shunt_ohms and max_current_a must be positive numbers".into(),
                );
            }
        }
        if e.source == EnergySource::Ina219 && e.ina219.is_none() {
            return bad("energy.source = \"ina219\" needs an [energy.ina219] section".into());
        }
        let sp = &self.spool;
        if !(crate::spool::MIN_MAX_BYTES..=(1 << 40)).contains(&sp.max_bytes) {
            return bad(format!(
                "spool.max_bytes = {} must be within [{}, 1 TiB]",
                sp.max_bytes,
                crate::spool::MIN_MAX_BYTES
            ));
        }
        for (key, v) in [
            ("spool.resend_after_s", sp.resend_after_s),
            ("spool.flush_timeout_s", sp.flush_timeout_s),
        ] {
            if !(v.is_finite() && (0.05..=3600.0).contains(&v)) {
                return bad(format!("{key} = {v} must be within [0.05, 3600]"));
            }
        }
        if let Some(d) = &self.state_dir {
            if d.as_os_str().is_empty() {
                return bad("state_dir is empty".into());
            }
        }
        Ok(())
    }

    /// The state directory in force (see [`AgentConfig::state_dir`]).
    pub fn state_dir(&self) -> PathBuf {
        tierd_runtime::state::state_directory(self.state_dir.as_deref(), "tierd-state")
    }

    pub fn telemetry_interval(&self) -> Duration {
        Duration::from_secs_f64(self.telemetry.interval_s)
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
        // No device_id: the environment's or the hostname's (crate::identity).
        assert_ne!(c.device_id_source, crate::identity::IdSource::Config);
        assert_eq!(c.default_client_id(), format!("edge-agent-{}", c.device_id));
        let c = AgentConfig::parse("device_id = \"pi-7\"").unwrap();
        assert_eq!(c.device_id_source, crate::identity::IdSource::Config);
        assert_eq!(c.default_client_id(), "edge-agent-pi-7");
    }

    #[test]
    fn example_config_parses() {
        let text = include_str!("../../cross/agent.example.toml");
        let c = AgentConfig::parse(text).unwrap();
        assert_eq!(c.cascade.signal, Signal::MaxProb);
        // The example pins no relay key (there is no key to ship): remote config is refused
        // until the operator pastes the relay's. The format it documents parses.
        assert!(c.remote_config.trusted_keys.is_empty());
        let key = format!("tierd-ed25519:{}", "ab".repeat(32));
        let c =
            AgentConfig::parse(&format!("[remote_config]\ntrusted_keys = [\"{key}\"]")).unwrap();
        assert_eq!(c.remote_config.trusted_keys[0].to_string(), key);
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
            ("[telemetry]\ninterval_s = 0", "telemetry.interval_s"),
            ("[energy]\nsource = \"ina219\"", "[energy.ina219]"),
            ("[energy]\nlink = \"carrier_pigeon\"", "unknown variant"),
            ("[energy]\njoules_per_byte = -1.0", "energy.joules_per_byte"),
            ("[spool]\nmax_bytes = 10", "spool.max_bytes"),
            (
                "[remote_config]\ntrusted_keys = [\"ssh-ed25519 AAAA\"]",
                "is not `tierd-ed25519:` followed by 64 hex digits",
            ),
            ("[spool]\nresend_after_s = 0", "spool.resend_after_s"),
            (
                "[energy.ina219]\nbus = \"/dev/i2c-1\"\naddress = 0x20\nshunt_ohms = 0.1\nmax_current_a = 3.2",
                "energy.ina219.address",
            ),
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
