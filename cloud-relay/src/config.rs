//! `relay.toml`. Without an `[mqtt]` section the relay embeds a broker and connects to it, so a
//! newcomer needs nothing installed; with one, it joins that broker (several relays then split
//! escalations through a shared subscription).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use std::collections::BTreeMap;

use serde::Deserialize;
use thiserror::Error;
use tierd_protocol::{Settings, Topic, TopicError};
use tierd_runtime::mqtt::{MqttConfig, MqttSetupError};

use crate::report::{Prices, PricesError};
use crate::tuner::{Costs, EvidenceRules, Limits, Policy, PushRules, Setup, ALWAYS_ESCALATE};

pub use tierd_runtime::config::ConfigError;

/// Why a `relay.toml` is refused; the message names the key at fault.
#[derive(Debug, Error)]
pub enum InvalidConfig {
    #[error(transparent)]
    Toml(#[from] toml::de::Error),
    #[error("relay_id {0:?} must be 1-64 of [A-Za-z0-9_.-]")]
    RelayId(String),
    #[error("model.serves: {0} (edge model names, without version)")]
    Serves(String),
    #[error("model.oip.url {0:?} must be an http:// or https:// URL (the server's base, e.g. http://127.0.0.1:8000)")]
    OipUrl(String),
    #[error("{key} must be within {range}")]
    OutOfRange {
        key: &'static str,
        range: &'static str,
    },
    #[error("{key} = {value} must be within (0, 1)")]
    NotARatio { key: &'static str, value: f64 },
    #[error("tuning.min_threshold <= tuning.max_threshold, both within [0, 1.01]")]
    ThresholdBounds,
    #[error("{key} = {value} must be a non-negative number")]
    Negative { key: &'static str, value: f64 },
    #[error(transparent)]
    Mqtt(#[from] MqttSetupError),
    #[error("defaults.{0}")]
    Defaults(tierd_protocol::config::SettingsError),
    #[error("[devices.{device}]: {source}")]
    DeviceId { device: String, source: TopicError },
    #[error("devices.{device}.{reason}")]
    Device {
        device: String,
        reason: tierd_protocol::config::SettingsError,
    },
    #[error(transparent)]
    Prices(#[from] PricesError),
    #[error("http.allowed_hosts has an empty entry")]
    EmptyHost,
    #[error("store.url {0:?} must be sqlite:///path/fleet.db or postgres://user:password@host/db")]
    StoreUrl(String),
    #[error("metrics.groups.{0:?}: a non-empty name and at least one pattern (a device id, or a prefix ending in '*'; '*' alone is the default group)")]
    Group(String),
}

impl From<InvalidConfig> for ConfigError {
    fn from(e: InvalidConfig) -> Self {
        ConfigError::invalid(e.to_string())
    }
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
    /// Where operator overrides (`cloud-relay config set`) are kept. Default:
    /// `$STATE_DIRECTORY` (systemd `StateDirectory=`), else `tierd-relay-state` in the working
    /// directory.
    pub state_dir: Option<PathBuf>,
    /// The Ed25519 key (PKCS#8, mode 0600) that signs every config document. Default:
    /// `config-signing-key.pk8` in the state directory, created at the first start. Replicas
    /// that push config share one key; agents pin its public key.
    pub signing_key: Option<PathBuf>,
    pub tuning: TuningConfig,
    /// Fleet defaults sent in every device's config document (any of `threshold`, `signal`,
    /// `audit_rate`, `escalation_timeout_ms`, `telemetry_interval_s`; unset = the agent's own).
    pub defaults: Settings,
    /// Per-device overrides, `[devices.<device_id>]`, same keys. A `threshold` here pins it:
    /// the tuner still proposes, but never pushes.
    pub devices: BTreeMap<String, Settings>,
    pub prices: Prices,
    pub rollout: RolloutConfig,
    pub store: StoreConfig,
    pub metrics: MetricsConfig,
}

/// `[store]`: where the fleet state is kept (see `store`), and the replicas' clocks.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `sqlite:///path/fleet.db` (one relay) or `postgres://user:password@host/db` (replicas).
    /// Default: `fleet.db` in the state directory.
    pub url: Option<String>,
    /// How often the writer writes its dirty rows; acks wait for it, so it is also the
    /// added delay before a device may delete a record.
    pub flush_ms: u64,
    /// How often the writer checks its lease and a follower tries to take it: a dead
    /// writer's lease is taken over within about this long (PostgreSQL frees it at once).
    pub lease_ms: u64,
    /// How often a follower reads what the writer wrote (its API is at most this stale).
    pub refresh_ms: u64,
    /// This replica's HTTP API as other replicas should send operators to it. Default:
    /// `http://` + `http.listen`.
    pub advertise_url: Option<String>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            url: None,
            flush_ms: 200,
            lease_ms: 1000,
            refresh_ms: 1000,
            advertise_url: None,
        }
    }
}

/// `[metrics]`: how many Prometheus series `/metrics` exports.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Devices exported with per-device series (`tierd_device_*`), the first by id; 0: none.
    /// Every device stays in `/api/devices`; the fleet-level `tierd_fleet_*` series cover all.
    pub max_device_series: usize,
    /// Device groups for the fleet-level series: group name to device-id patterns (exact, or
    /// a prefix ending in `*`). A device in none is in group `other`.
    pub groups: BTreeMap<String, Vec<String>>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            max_device_series: 100,
            groups: BTreeMap::new(),
        }
    }
}

/// `[rollout]`: how much shadow evidence a rollout decision needs (see `rollout::decide`).
/// The decision holds the candidate to `tuning.target` at `tuning.delta`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RolloutConfig {
    /// Cloud-labelled shadow pairs before the first look.
    pub min_pairs: u64,
    /// Pairs at the last look (then the candidate is promoted or rolled back).
    pub max_pairs: u64,
}

impl Default for RolloutConfig {
    fn default() -> Self {
        RolloutConfig {
            min_pairs: 1000,
            max_pairs: 8000,
        }
    }
}

/// Which policy the tuner follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyName {
    TargetAgreement,
    Budget,
    MinCost,
}

/// `[tuning]`: how thresholds are chosen and when they are pushed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TuningConfig {
    /// Push tuned thresholds to devices. false: propose only (shown in `/api/devices`). With
    /// several replicas only the one holding the store's lease pushes (see `store`).
    pub push: bool,
    pub policy: PolicyName,
    /// `target_agreement`: agreement with the cloud to certify, and the bound's error rate.
    pub target: f64,
    pub delta: f64,
    /// `budget`: the highest share of requests a device may escalate.
    pub max_escalation_rate: f64,
    /// Fewer requests than this in a device's evidence window: keep its threshold.
    pub min_requests: u64,
    pub min_threshold: f32,
    pub max_threshold: f32,
    /// Smallest threshold change worth a push, and the least time between pushes.
    pub hysteresis: f32,
    pub min_interval_s: f64,
    /// Requests a device's evidence window holds (sliding, whole telemetry windows).
    pub window_requests: u64,
    /// The drift test watches the newest this-many requests; after it fires, the evidence
    /// window is cut back to them and the most conservative threshold is pushed at once.
    pub drift_requests: u64,
    /// The drift test's error level (and the certified-violation test's): a false alarm
    /// costs escalations, never the guarantee.
    pub drift_delta: f64,
    /// `min_cost`: price of a second of added latency per request, the escalation latency
    /// SLO (p95), and the penalty per escalation while a device's p95 exceeds it.
    pub latency_price_per_s: f64,
    pub latency_slo_ms: f64,
    pub slo_penalty: f64,
}

impl Default for TuningConfig {
    fn default() -> Self {
        TuningConfig {
            push: true,
            policy: PolicyName::TargetAgreement,
            target: 0.99,
            delta: 0.05,
            max_escalation_rate: 0.5,
            min_requests: 1000,
            min_threshold: 0.0,
            max_threshold: ALWAYS_ESCALATE,
            hysteresis: 0.01,
            min_interval_s: 300.0,
            window_requests: EvidenceRules::default().window_requests,
            drift_requests: EvidenceRules::default().recent_requests,
            drift_delta: EvidenceRules::default().drift_delta,
            latency_price_per_s: 0.0,
            latency_slo_ms: 1000.0,
            slo_penalty: 0.0,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Manifest of the cloud model. Relative paths start at the config file's folder.
    pub manifest: PathBuf,
    /// Edge model names (without version) this cloud model answers for; empty = any whose
    /// input fits.
    pub serves: Vec<String>,
    /// Forward escalations to an existing Open Inference Protocol v2 server (Triton, KServe,
    /// MLServer) instead of running the model here. The manifest still says what the model
    /// takes and gives; its `file` need not exist on this host.
    pub oip: Option<OipConfig>,
}

/// `[model.oip]`: the OIP v2 server serving the cloud model.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OipConfig {
    /// Base URL, e.g. `http://127.0.0.1:8000` (requests go to
    /// `{url}/v2/models/{model}/versions/{version}/infer`).
    pub url: String,
    /// The model's name on the server; default the manifest's `name`.
    #[serde(default)]
    pub model: Option<String>,
    /// The version on the server; default the manifest's `version`; `""` for the server's
    /// default version.
    #[serde(default)]
    pub version: Option<String>,
    /// Per request (connect included); past it the agent falls back to its own answer.
    #[serde(default = "OipConfig::default_timeout_ms")]
    pub timeout_ms: u64,
    /// Requests in flight at most (the size of the worker pool for this backend).
    #[serde(default = "OipConfig::default_concurrency")]
    pub concurrency: usize,
}

impl OipConfig {
    fn default_timeout_ms() -> u64 {
        1000
    }
    fn default_concurrency() -> usize {
        16
    }

    fn validate(&self) -> Result<(), InvalidConfig> {
        let url = self.url.trim();
        if !(url.starts_with("http://") || url.starts_with("https://")) || url.len() < 10 {
            return Err(InvalidConfig::OipUrl(self.url.clone()));
        }
        if !(1..=60_000).contains(&self.timeout_ms) {
            return Err(InvalidConfig::OutOfRange {
                key: "model.oip.timeout_ms",
                range: "[1, 60000]",
            });
        }
        if !(1..=1024).contains(&self.concurrency) {
            return Err(InvalidConfig::OutOfRange {
                key: "model.oip.concurrency",
                range: "[1, 1024]",
            });
        }
        Ok(())
    }
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
    /// `/metrics`, `/api/devices`, `/health`. Loopback by default.
    pub listen: SocketAddr,
    /// Devices tracked at most; reports from further devices are dropped and counted.
    pub max_devices: usize,
    /// File holding the bearer token every API route but `/health` requires. A bare file
    /// name is looked up in `$CREDENTIALS_DIRECTORY` (systemd `LoadCredential=`) when that is
    /// set; other relative paths start at the config file's folder. Absent: the relay
    /// generates one on first start in its state directory (`http-token`, mode 0600) and
    /// logs where it is.
    pub token_file: Option<PathBuf>,
    /// Reads (`GET /metrics`, `/api/...`) need the token too. Default true: the fleet view
    /// names every device, its thresholds and traffic; Prometheus sends a token with
    /// `authorization: {credentials_file: ...}`.
    pub auth_reads: bool,
    /// `Host` names (without port) accepted besides `localhost`, `127.0.0.1`, `::1` and the
    /// listen address; any other `Host` gets 421 (a DNS-rebinding guard). `"*"` accepts any
    /// (behind a proxy that checks it).
    pub allowed_hosts: Vec<String>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9100)),
            max_devices: 100_000,
            token_file: None,
            auth_reads: true,
            allowed_hosts: Vec::new(),
        }
    }
}

/// Where a credential file named in a config is: a bare file name is taken from
/// `credentials_dir` (systemd's `$CREDENTIALS_DIRECTORY`) when there is one; other relative
/// paths start at `base`, the config file's folder.
pub fn resolve_credential(path: &Path, base: &Path, credentials_dir: Option<&Path>) -> PathBuf {
    let bare = path.components().count() == 1
        && matches!(
            path.components().next(),
            Some(std::path::Component::Normal(_))
        );
    match credentials_dir {
        Some(dir) if bare => dir.join(path),
        _ if path.is_relative() => base.join(path),
        _ => path.to_path_buf(),
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
            state_dir: None,
            signing_key: None,
            tuning: TuningConfig::default(),
            defaults: Settings::default(),
            devices: BTreeMap::new(),
            prices: Prices::default(),
            rollout: RolloutConfig::default(),
            store: StoreConfig::default(),
            metrics: MetricsConfig::default(),
        }
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            manifest: PathBuf::from("models/cloud/digits-cloud.toml"),
            serves: Vec::new(),
            oip: None,
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
        let (mut cfg, base) = tierd_runtime::config::read(path, |text| Ok(Self::parse(text)?))?;
        let base = base.as_path();
        if cfg.model.manifest.is_relative() {
            cfg.model.manifest = base.join(&cfg.model.manifest);
        }
        if let Some(m) = &mut cfg.mqtt {
            m.resolve_paths(base);
        }
        if let Some(t) = cfg.http.token_file.as_mut() {
            let creds = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
            *t = resolve_credential(t, base, creds.as_deref());
        }
        for d in [cfg.state_dir.as_mut(), cfg.signing_key.as_mut()]
            .into_iter()
            .flatten()
        {
            if d.is_relative() {
                *d = base.join(&*d);
            }
        }
        Ok(cfg)
    }

    /// Parses and validates; the error names the key at fault.
    pub fn parse(text: &str) -> Result<Self, InvalidConfig> {
        let cfg: RelayConfig = toml::from_str(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), InvalidConfig> {
        let range = |key, range| Err(InvalidConfig::OutOfRange { key, range });
        if self.relay_id.is_empty()
            || self.relay_id.len() > 64
            || !self
                .relay_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return Err(InvalidConfig::RelayId(self.relay_id.clone()));
        }
        if !(1..=256).contains(&self.workers) {
            return range("workers", "[1, 256]");
        }
        if !(1..=10_000_000).contains(&self.rollout.min_pairs)
            || self.rollout.max_pairs < self.rollout.min_pairs
            || self.rollout.max_pairs > 1_000_000_000
        {
            return range(
                "rollout.min_pairs / max_pairs",
                "1 <= min_pairs <= 10000000, min_pairs <= max_pairs <= 1000000000",
            );
        }
        if !(1..=1_000_000).contains(&self.queue) {
            return range("queue", "[1, 1000000]");
        }
        let st = &self.store;
        for (key, v) in [
            ("store.flush_ms", st.flush_ms),
            ("store.lease_ms", st.lease_ms),
            ("store.refresh_ms", st.refresh_ms),
        ] {
            if !(10..=60_000).contains(&v) {
                return range(key, "[10, 60000]");
            }
        }
        if let Some(u) = &st.url {
            if !["sqlite:", "postgres://", "postgresql://"]
                .iter()
                .any(|p| u.starts_with(p))
            {
                return Err(InvalidConfig::StoreUrl(crate::store::redact(u)));
            }
        }
        if self.metrics.max_device_series > 100_000 {
            return range("metrics.max_device_series", "[0, 100000]");
        }
        if let Some((g, _)) = self.metrics.groups.iter().find(|(g, pats)| {
            g.is_empty() || pats.is_empty() || pats.iter().any(|p| p.is_empty() || p == "*")
        }) {
            return Err(InvalidConfig::Group(g.clone()));
        }
        if !(1..=10_000_000).contains(&self.http.max_devices) {
            return range("http.max_devices", "[1, 10000000]");
        }
        if self.http.allowed_hosts.iter().any(|h| h.trim().is_empty()) {
            return Err(InvalidConfig::EmptyHost);
        }
        if let Some(m) = &self.mqtt {
            m.validate()?;
        }
        if let Some(o) = &self.model.oip {
            o.validate()?;
        }
        if let Err(e) = Topic::relay_escalation_filters(&self.model.serves) {
            return Err(InvalidConfig::Serves(e.to_string()));
        }
        let t = &self.tuning;
        let unit = |v: f64| v.is_finite() && v > 0.0 && v < 1.0;
        if !unit(t.target) {
            return Err(InvalidConfig::NotARatio {
                key: "tuning.target",
                value: t.target,
            });
        }
        if !unit(t.delta) {
            return Err(InvalidConfig::NotARatio {
                key: "tuning.delta",
                value: t.delta,
            });
        }
        if !(t.max_escalation_rate.is_finite() && (0.0..=1.0).contains(&t.max_escalation_rate)) {
            return range("tuning.max_escalation_rate", "[0, 1]");
        }
        let th = tierd_protocol::config::limits::THRESHOLD;
        if !(th.contains(&t.min_threshold)
            && th.contains(&t.max_threshold)
            && t.min_threshold <= t.max_threshold)
        {
            return Err(InvalidConfig::ThresholdBounds);
        }
        if !(t.hysteresis.is_finite() && (0.0..=1.0).contains(&t.hysteresis)) {
            return range("tuning.hysteresis", "[0, 1]");
        }
        if !unit(t.drift_delta) {
            return Err(InvalidConfig::NotARatio {
                key: "tuning.drift_delta",
                value: t.drift_delta,
            });
        }
        if t.window_requests < t.min_requests.max(1) || t.drift_requests == 0 {
            return range(
                "tuning.window_requests",
                "at least tuning.min_requests (and drift_requests at least 1)",
            );
        }
        for (key, v) in [
            ("tuning.min_interval_s", t.min_interval_s),
            ("tuning.latency_price_per_s", t.latency_price_per_s),
            ("tuning.latency_slo_ms", t.latency_slo_ms),
            ("tuning.slo_penalty", t.slo_penalty),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(InvalidConfig::Negative { key, value: v });
            }
        }
        self.defaults.validate().map_err(InvalidConfig::Defaults)?;
        for (device, s) in &self.devices {
            tierd_protocol::topic::validate_device_id(device).map_err(|source| {
                InvalidConfig::DeviceId {
                    device: device.clone(),
                    source,
                }
            })?;
            s.validate().map_err(|reason| InvalidConfig::Device {
                device: device.clone(),
                reason,
            })?;
        }
        self.prices.validate()?;
        Ok(())
    }

    /// The tuner's policy, limits and prices.
    /// What rollouts decide with: the tuning target and limits, always as a target agreement.
    pub fn rollout_setup(&self) -> (Setup, crate::rollout::Rules) {
        let mut setup = self.tuner_setup();
        setup.policy = Policy::TargetAgreement {
            target: self.tuning.target,
            delta: self.tuning.delta,
        };
        let rules = crate::rollout::Rules {
            min_pairs: self.rollout.min_pairs,
            max_pairs: self.rollout.max_pairs,
        };
        (setup, rules)
    }

    pub fn tuner_setup(&self) -> Setup {
        let t = &self.tuning;
        Setup {
            policy: match t.policy {
                PolicyName::TargetAgreement => Policy::TargetAgreement {
                    target: t.target,
                    delta: t.delta,
                },
                PolicyName::Budget => Policy::Budget {
                    max_escalation_rate: t.max_escalation_rate,
                },
                PolicyName::MinCost => Policy::MinCost,
            },
            limits: Limits {
                min_threshold: t.min_threshold,
                max_threshold: t.max_threshold,
                min_requests: t.min_requests,
            },
            costs: Costs {
                per_joule: self.prices.energy_per_kwh / 3.6e6,
                per_cloud_call: self.prices.cloud_per_1000_calls / 1000.0,
                per_latency_second: t.latency_price_per_s,
                per_disagreement: self.prices.per_disagreement,
                per_slo_violation: t.slo_penalty,
                latency_slo_s: t.latency_slo_ms / 1000.0,
            },
            evidence: EvidenceRules {
                window_requests: t.window_requests,
                recent_requests: t.drift_requests,
                drift_delta: t.drift_delta,
            },
        }
    }

    pub fn push_rules(&self) -> PushRules {
        PushRules {
            hysteresis: self.tuning.hysteresis,
            min_interval_ms: (self.tuning.min_interval_s * 1000.0) as u64,
        }
    }

    /// The config-signing key's file (see [`RelayConfig::signing_key`]).
    pub fn signing_key_path(&self) -> PathBuf {
        crate::signing::key_path(self.signing_key.as_deref(), &self.state_dir())
    }

    /// The fleet store's URL in force (see [`StoreConfig::url`]).
    pub fn store_url(&self) -> String {
        self.store
            .url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", self.state_dir().join("fleet.db").display()))
    }

    /// The state directory in force (see [`RelayConfig::state_dir`]).
    pub fn state_dir(&self) -> PathBuf {
        tierd_runtime::state::state_directory(self.state_dir.as_deref(), "tierd-relay-state")
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
    fn credentials_are_looked_up_where_systemd_puts_them() {
        let (base, creds) = (Path::new("/etc/tierd"), Path::new("/run/credentials/x"));
        let r = |p: &str, c| resolve_credential(Path::new(p), base, c);
        assert_eq!(r("relay-token", Some(creds)), creds.join("relay-token"));
        assert_eq!(r("relay-token", None), base.join("relay-token"));
        assert_eq!(r("keys/token", Some(creds)), base.join("keys/token"));
        assert_eq!(r("/srv/token", Some(creds)), PathBuf::from("/srv/token"));
        let c = RelayConfig::parse("").unwrap();
        assert!(c.http.auth_reads && c.http.token_file.is_none());
    }

    #[test]
    fn rejects_bad_values() {
        for (text, needle) in [
            ("workers = 0", "workers"),
            ("relay_id = \"a b\"", "relay_id"),
            ("[mqtt]\nkeep_alive_s = 1", "keep_alive_s"),
            ("wrokers = 2", "unknown field"),
            ("[tuning]\ntarget = 1.5", "tuning.target"),
            ("[tuning]\npolicy = \"vibes\"", "unknown variant"),
            ("[defaults]\nthreshold = 3.0", "defaults.threshold"),
            (
                "[devices.pi-1]\naudit_rate = 2.0",
                "devices.pi-1.audit_rate",
            ),
            ("[devices.\"a b\"]\nthreshold = 0.5", "devices.a b"),
            ("[prices]\nenergy_per_kwh = -1.0", "prices.energy_per_kwh"),
            ("[http]\nallowed_hosts = [\"\"]", "http.allowed_hosts"),
        ] {
            let err = RelayConfig::parse(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{needle:?} not in {err:?}");
        }
    }
}
