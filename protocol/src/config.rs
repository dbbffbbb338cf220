//! The remote config document the relay publishes, retained, on `tierd/v1/{device}/config`.
//!
//! JSON rather than postcard, unlike every other message: it is small and rare, operators read
//! it with `mosquitto_sub` and write it with `cloud-relay config set`, and a self-describing
//! format lets the agent reject an unknown key or a wrong type by name instead of misreading
//! bytes. Unknown keys are errors at every level (`deny_unknown_fields`), so a typo can never
//! be silently ignored.
//!
//! On the wire the document travels inside a signed envelope ([`crate::signed`]): the relay
//! signs the exact bytes of [`ConfigDocument::to_json`] and the agent applies only what a key it
//! trusts signed.
//!
//! Ordering: a document is newer than the one in force when its `(epoch, version)` pair is
//! greater. Versions increase with every document; an epoch increases only on an operator's
//! reset (`cloud-relay config reset`), which lets a signed document recover a device whose
//! version line is broken (a version at `u64::MAX`) with a lower version. Neither wraps: the
//! relay refuses to issue past `u64::MAX`.
//!
//! Every setting is optional: an absent one keeps the agent's own `agent.toml` value. Ranges
//! are defined here once ([`limits`]) and shared by the agent's file config and the relay.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::cascade::Signal;

/// Models a document sets per-model settings for, at most (an agent serves its primary model
/// and up to 16 more).
pub const MAX_MODEL_SETTINGS: usize = 17;

/// Largest document accepted, in bytes (a full document with certificate is ~700 bytes).
pub const MAX_CONFIG_BYTES: usize = 16 * 1024;

/// Valid ranges of the remotely settable values.
pub mod limits {
    use std::ops::RangeInclusive;
    /// 0 never escalates; above 1 (up to 1.01) always does.
    pub const THRESHOLD: RangeInclusive<f32> = 0.0..=1.01;
    pub const AUDIT_RATE: RangeInclusive<f64> = 0.0..=1.0;
    pub const ESCALATION_TIMEOUT_MS: RangeInclusive<u64> = 1..=60_000;
    pub const TELEMETRY_INTERVAL_S: RangeInclusive<f64> = 0.1..=86_400.0;
}

crate::reason_error!(
    /// Why a setting is refused; the message names the key and the allowed range.
    SettingsError
);

/// The settings a document can carry. `None` leaves the agent's file value in force.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<Signal>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit_rate: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub escalation_timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub telemetry_interval_s: Option<f64>,
    /// Per-model cascade settings, by edge model name, for an agent serving several models.
    /// The top-level `threshold`, `signal` and `audit_rate` are the primary model's (and
    /// `audit_rate` every model's without its own); a model's entry here wins for that model.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub models: BTreeMap<String, ModelSettings>,
}

/// One model's cascade settings in a document (`models.<name>.<key>` in `config set`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<Signal>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit_rate: Option<f64>,
}

impl ModelSettings {
    /// `over`'s values where set, ours elsewhere.
    pub fn overlay(&self, over: &ModelSettings) -> ModelSettings {
        ModelSettings {
            threshold: over.threshold.or(self.threshold),
            signal: over.signal.or(self.signal),
            audit_rate: over.audit_rate.or(self.audit_rate),
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == ModelSettings::default()
    }
}

/// Keys of [`Settings`], for `config set key=value` and error messages.
pub const SETTING_KEYS: [&str; 6] = [
    "threshold",
    "signal",
    "audit_rate",
    "escalation_timeout_ms",
    "telemetry_interval_s",
    "models.<name>.threshold|signal|audit_rate",
];

fn check_threshold(key: &str, t: f32) -> Result<(), SettingsError> {
    if t.is_finite() && limits::THRESHOLD.contains(&t) {
        Ok(())
    } else {
        Err(SettingsError::from(format!(
            "{key} = {t} is outside [0, 1.01]"
        )))
    }
}

fn check_audit_rate(key: &str, a: f64) -> Result<(), SettingsError> {
    if a.is_finite() && limits::AUDIT_RATE.contains(&a) {
        Ok(())
    } else {
        Err(SettingsError::from(format!(
            "{key} = {a} is outside [0, 1]"
        )))
    }
}

impl Settings {
    /// Range checks; the message names the key and the allowed range.
    pub fn validate(&self) -> Result<(), SettingsError> {
        if let Some(t) = self.threshold {
            check_threshold("threshold", t)?;
        }
        if let Some(a) = self.audit_rate {
            check_audit_rate("audit_rate", a)?;
        }
        if self.models.len() > MAX_MODEL_SETTINGS {
            return Err(SettingsError::from(format!(
                "models: settings for {} models, at most {MAX_MODEL_SETTINGS}",
                self.models.len()
            )));
        }
        for (name, m) in &self.models {
            crate::topic::validate_model_name(name)
                .map_err(|e| SettingsError::from(format!("models: {e}")))?;
            if let Some(t) = m.threshold {
                check_threshold(&format!("models.{name}.threshold"), t)?;
            }
            if let Some(a) = m.audit_rate {
                check_audit_rate(&format!("models.{name}.audit_rate"), a)?;
            }
        }
        if let Some(ms) = self.escalation_timeout_ms {
            if !limits::ESCALATION_TIMEOUT_MS.contains(&ms) {
                return Err(SettingsError::from(format!(
                    "escalation_timeout_ms = {ms} is outside [1, 60000]"
                )));
            }
        }
        if let Some(s) = self.telemetry_interval_s {
            if !(s.is_finite() && limits::TELEMETRY_INTERVAL_S.contains(&s)) {
                return Err(SettingsError::from(format!(
                    "telemetry_interval_s = {s} is outside [0.1, 86400]"
                )));
            }
        }
        Ok(())
    }

    /// `over`'s values where set, ours elsewhere (fleet defaults < device overrides).
    pub fn overlay(&self, over: &Settings) -> Settings {
        Settings {
            threshold: over.threshold.or(self.threshold),
            signal: over.signal.or(self.signal),
            audit_rate: over.audit_rate.or(self.audit_rate),
            escalation_timeout_ms: over.escalation_timeout_ms.or(self.escalation_timeout_ms),
            telemetry_interval_s: over.telemetry_interval_s.or(self.telemetry_interval_s),
            models: {
                let mut models = self.models.clone();
                for (name, o) in &over.models {
                    let m = models.entry(name.clone()).or_default();
                    *m = m.overlay(o);
                }
                models
            },
        }
    }

    /// The settings in force for the model named `name`: its entry in `models` over the
    /// top-level `audit_rate` (the top-level `threshold` and `signal` are the primary's only).
    pub fn for_model(&self, name: &str) -> ModelSettings {
        let base = ModelSettings {
            threshold: None,
            signal: None,
            audit_rate: self.audit_rate,
        };
        self.models.get(name).map_or(base, |m| base.overlay(m))
    }

    /// Sets one key from text (`threshold=0.93`); `key=` (empty) unsets it. Validated; on
    /// error nothing changes.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), SettingsError> {
        let mut next = self.clone();
        next.set_unchecked(key, value)?;
        next.validate()?;
        *self = next;
        Ok(())
    }

    fn set_unchecked(&mut self, key: &str, value: &str) -> Result<(), SettingsError> {
        let value = value.trim();
        let unset = value.is_empty();
        fn num<T: std::str::FromStr>(key: &str, v: &str) -> Result<T, SettingsError> {
            v.parse()
                .map_err(|_| SettingsError(format!("{key}: {v:?} is not a valid number")))
        }
        fn signal(v: &str) -> Result<Signal, SettingsError> {
            v.parse::<Signal>()
                .map_err(|e| SettingsError(e.to_string()))
        }
        if let Some(rest) = key.strip_prefix("models.") {
            let Some((name, field)) = rest.rsplit_once('.') else {
                return Err(SettingsError::from(format!(
                    "{key:?}: a model's key is models.<name>.threshold, .signal or .audit_rate"
                )));
            };
            let m = self.models.entry(name.to_string()).or_default();
            match field {
                "threshold" => m.threshold = (!unset).then(|| num(key, value)).transpose()?,
                "signal" => m.signal = (!unset).then(|| signal(value)).transpose()?,
                "audit_rate" => m.audit_rate = (!unset).then(|| num(key, value)).transpose()?,
                other => {
                    return Err(SettingsError::from(format!(
                        "{key:?}: unknown model key {other:?}; a model's keys are threshold, \
                         signal and audit_rate"
                    )))
                }
            }
            if m.is_empty() {
                self.models.remove(name);
            }
            return Ok(());
        }
        match key {
            "threshold" => self.threshold = (!unset).then(|| num(key, value)).transpose()?,
            "signal" => self.signal = (!unset).then(|| signal(value)).transpose()?,
            "audit_rate" => self.audit_rate = (!unset).then(|| num(key, value)).transpose()?,
            "escalation_timeout_ms" => {
                self.escalation_timeout_ms = (!unset).then(|| num(key, value)).transpose()?
            }
            "telemetry_interval_s" => {
                self.telemetry_interval_s = (!unset).then(|| num(key, value)).transpose()?
            }
            other => {
                return Err(SettingsError::from(format!(
                    "unknown key {other:?}; settable keys are {SETTING_KEYS:?}"
                )))
            }
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        *self == Settings::default()
    }
}

/// Relay → agent, retained: the settings the device should run with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigDocument {
    /// Strictly increasing per device; an agent applies only versions above the one in force.
    pub version: u64,
    /// Raised by an operator's reset; a higher epoch wins over any version of a lower one.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub epoch: u64,
    /// The device it is for (must match the topic and the agent's own id).
    pub device_id: String,
    /// Relay clock, Unix ms.
    #[serde(default)]
    pub issued_ms: u64,
    /// Who decided: `tuner`, `operator`, or `defaults`.
    #[serde(default)]
    pub source: String,
    #[serde(default)]
    pub settings: Settings,
    /// The tuner's certificate behind the threshold, for the record (the agent keeps it, does
    /// not interpret it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<serde_json::Value>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum ConfigDocError {
    #[error("config document of {0} bytes exceeds the limit of {MAX_CONFIG_BYTES} bytes")]
    TooLarge(usize),
    #[error("config document is not valid: {0}")]
    Json(String),
    #[error("config document: {0}")]
    Invalid(String),
    #[error("config document is for device {doc:?}, not {expected:?}")]
    WrongDevice { doc: String, expected: String },
    #[error("config version {version} (epoch {epoch}) is not newer than the version in force ({in_force}, epoch {in_force_epoch})")]
    Stale {
        version: u64,
        epoch: u64,
        in_force: u64,
        in_force_epoch: u64,
    },
}

impl ConfigDocument {
    /// Parses and range-checks a document (size first, then JSON, then values).
    pub fn from_json(bytes: &[u8]) -> Result<Self, ConfigDocError> {
        if bytes.len() > MAX_CONFIG_BYTES {
            return Err(ConfigDocError::TooLarge(bytes.len()));
        }
        let doc: ConfigDocument =
            serde_json::from_slice(bytes).map_err(|e| ConfigDocError::Json(e.to_string()))?;
        if doc.version == 0 {
            return Err(ConfigDocError::Invalid("version must be at least 1".into()));
        }
        doc.settings
            .validate()
            .map_err(|e| ConfigDocError::Invalid(e.0))?;
        Ok(doc)
    }

    pub fn to_json(&self) -> Vec<u8> {
        // Serializing plain data with string keys cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Whether an agent with id `device_id`, running `in_force_epoch`/`in_force`, should take
    /// this document: it must be for this device and its `(epoch, version)` must be greater.
    pub fn check(
        &self,
        device_id: &str,
        in_force_epoch: u64,
        in_force: u64,
    ) -> Result<(), ConfigDocError> {
        if self.device_id != device_id {
            return Err(ConfigDocError::WrongDevice {
                doc: self.device_id.chars().take(80).collect(),
                expected: device_id.to_string(),
            });
        }
        if (self.epoch, self.version) <= (in_force_epoch, in_force) {
            return Err(ConfigDocError::Stale {
                version: self.version,
                epoch: self.epoch,
                in_force,
                in_force_epoch,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"version":7,"device_id":"pi-1","issued_ms":1,"source":"tuner",
        "settings":{"threshold":0.93,"signal":"margin","audit_rate":0.05,
        "escalation_timeout_ms":300,"telemetry_interval_s":10},
        "certificate":{"agreement_lower_bound":0.991}}"#;

    #[test]
    fn parses_and_round_trips() {
        let doc = ConfigDocument::from_json(GOOD.as_bytes()).expect("good");
        assert_eq!(doc.settings.threshold, Some(0.93));
        assert_eq!(ConfigDocument::from_json(&doc.to_json()), Ok(doc.clone()));
        assert!(doc.check("pi-1", 0, 6).is_ok());
    }

    #[test]
    fn rejects_with_the_reason() {
        for (text, needle) in [
            (GOOD.replace("0.93", "1.5"), "threshold = 1.5"),
            (GOOD.replace("\"margin\"", "\"vibes\""), "signal"),
            (
                GOOD.replace("\"audit_rate\"", "\"audit_rte\""),
                "unknown field `audit_rte`",
            ),
            (
                GOOD.replace("\"source\"", "\"sorce\""),
                "unknown field `sorce`",
            ),
            (GOOD.replace("300", "\"fast\""), "invalid type"),
            (GOOD.replace("\"version\":7", "\"version\":0"), "version"),
            (GOOD.replace("10}", "0}"), "telemetry_interval_s"),
            ("not json".to_string(), "not valid"),
        ] {
            let err = ConfigDocument::from_json(text.as_bytes())
                .expect_err(needle)
                .to_string();
            assert!(err.contains(needle), "{needle:?} not in {err:?}");
        }
        let big = vec![b' '; MAX_CONFIG_BYTES + 1];
        assert!(matches!(
            ConfigDocument::from_json(&big),
            Err(ConfigDocError::TooLarge(_))
        ));
        let doc = ConfigDocument::from_json(GOOD.as_bytes()).expect("good");
        assert!(matches!(
            doc.check("pi-1", 0, 7),
            Err(ConfigDocError::Stale { .. })
        ));
        assert!(matches!(
            doc.check("pi-2", 0, 0),
            Err(ConfigDocError::WrongDevice { .. })
        ));
    }

    #[test]
    fn a_higher_epoch_wins_over_any_version() {
        let mut doc = ConfigDocument::from_json(GOOD.as_bytes()).expect("good");
        assert!(
            doc.check("pi-1", 0, u64::MAX).is_err(),
            "locked out at epoch 0"
        );
        doc.epoch = 1;
        let again = ConfigDocument::from_json(&doc.to_json()).expect("round trip");
        assert_eq!(again.epoch, 1);
        assert!(again.check("pi-1", 0, u64::MAX).is_ok());
        let err = again.check("pi-1", 2, 1).unwrap_err().to_string();
        assert!(
            err.contains("not newer") && err.contains("epoch 2"),
            "{err}"
        );
        assert!(!String::from_utf8_lossy(
            &ConfigDocument::from_json(GOOD.as_bytes())
                .expect("good")
                .to_json()
        )
        .contains("epoch"));
    }

    #[test]
    fn per_model_settings_set_overlay_and_refuse() {
        let mut s = Settings::default();
        s.set("audit_rate", "0.1").expect("set");
        s.set("models.breast-edge.threshold", "0.7").expect("set");
        s.set("models.breast-edge.signal", "margin").expect("set");
        assert_eq!(
            s.for_model("breast-edge"),
            ModelSettings {
                threshold: Some(0.7),
                signal: Some(Signal::Margin),
                audit_rate: Some(0.1),
            }
        );
        // Another model gets the fleet audit rate and nothing else.
        assert_eq!(s.for_model("digits-edge").threshold, None);
        for (key, value, needle) in [
            (
                "models.breast-edge.threshold",
                "1.5",
                "models.breast-edge.threshold = 1.5",
            ),
            (
                "models.breast-edge.audit_rate",
                "-1",
                "models.breast-edge.audit_rate",
            ),
            ("models.breast-edge.treshold", "0.5", "unknown model key"),
            ("models.breast-edge", "0.5", "models.<name>.threshold"),
            ("models.a/b.threshold", "0.5", "models:"),
            ("models.+.threshold", "0.5", "models:"),
        ] {
            let before = s.clone();
            let err = s.set(key, value).expect_err(key).0;
            assert!(err.contains(needle), "{needle:?} not in {err:?}");
            assert_eq!(s, before, "nothing changes on error");
        }
        // A device override of one model key keeps the fleet's others.
        let mut device = Settings::default();
        device
            .set("models.breast-edge.threshold", "0.9")
            .expect("set");
        let merged = s.overlay(&device);
        assert_eq!(merged.for_model("breast-edge").threshold, Some(0.9));
        assert_eq!(merged.for_model("breast-edge").signal, Some(Signal::Margin));
        // Unsetting a model's last key drops the model.
        let mut d = device.clone();
        d.set("models.breast-edge.threshold", "").expect("unset");
        assert!(d.is_empty());
        // On the wire, with unknown model keys refused by name.
        let doc = GOOD.replace(
            "\"telemetry_interval_s\":10}",
            "\"telemetry_interval_s\":10,\"models\":{\"breast-edge\":{\"threshold\":0.5}}}",
        );
        let parsed = ConfigDocument::from_json(doc.as_bytes()).expect("models");
        assert_eq!(
            parsed.settings.for_model("breast-edge").threshold,
            Some(0.5)
        );
        let bad = doc.replace("{\"threshold\":0.5}", "{\"thresold\":0.5}");
        let err = ConfigDocument::from_json(bad.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `thresold`"), "{err}");
        let bad = doc.replace("0.5}}", "7.0}}");
        let err = ConfigDocument::from_json(bad.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(err.contains("models.breast-edge.threshold = 7"), "{err}");
    }

    #[test]
    fn set_overlay_and_unset() {
        let mut s = Settings::default();
        s.set("threshold", "0.8").expect("set");
        s.set("signal", "entropy").expect("set");
        assert!(s.set("threshold", "2").is_err());
        assert!(s
            .set("treshold", "0.5")
            .unwrap_err()
            .0
            .contains("unknown key"));
        assert!(s
            .set("audit_rate", "lots")
            .unwrap_err()
            .0
            .contains("not a valid number"));
        let defaults = Settings {
            threshold: Some(0.5),
            audit_rate: Some(0.02),
            ..Default::default()
        };
        let merged = defaults.overlay(&s);
        assert_eq!(merged.threshold, Some(0.8));
        assert_eq!(merged.audit_rate, Some(0.02));
        s.set("threshold", "").expect("unset");
        assert_eq!(s.threshold, None);
    }
}
