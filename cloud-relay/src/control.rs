//! **Where thresholds are pushed.** Remote config per device, kept apart from the I/O: which
//! document a device should run, when a tuned threshold is worth a push, what the device
//! acknowledged, and the operators' overrides.
//!
//! A device's document is `defaults` (relay.toml `[defaults]`), overlaid by its file overrides
//! (`[devices.<id>]`), overlaid by operator overrides (`cloud-relay config set`, persisted in
//! the state directory), plus the tuned threshold when no override pins one. Versions are
//! `max(last + 1, now in Unix ms)`: strictly increasing per device even across relay restarts
//! with a broker that forgot its retained messages (rumqttd keeps them in memory only), as
//! long as the relay's clock does not jump back.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;
use thiserror::Error;
use tierd_protocol::{ConfigAck, ConfigDocument, Settings, TopicError};

use crate::fleet::Proposal;
use crate::tuner::{Basis, PushRules};

pub const OVERRIDES_FILE: &str = "operator-overrides.json";
/// Each device's config epoch (raised by `cloud-relay config reset`), in the state directory.
pub const EPOCHS_FILE: &str = "config-epochs.json";

/// Why no document could be composed for a device.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum ComposeError {
    #[error("device limit reached")]
    DeviceLimit,
    #[error(
        "device {device:?}: config version {version} (epoch {epoch}) is the last one; \
         run `cloud-relay config reset --device {device}` to start a new epoch"
    )]
    VersionExhausted {
        device: String,
        epoch: u64,
        version: u64,
    },
    #[error("device {device:?}: config epoch {epoch} cannot be raised further")]
    EpochExhausted { device: String, epoch: u64 },
}

/// Why an operator's change (see [`Control::set`]) was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SetError {
    #[error(transparent)]
    DeviceId(#[from] TopicError),
    #[error("nothing to set: give key=value pairs")]
    Nothing,
    /// A key or value the settings refuse (the message names the key).
    #[error("{0}")]
    Setting(tierd_protocol::config::SettingsError),
    #[error("the relay tracks at most {0} devices")]
    TooManyDevices(usize),
    #[error(transparent)]
    Compose(#[from] ComposeError),
}

/// Why the saved operator overrides could not be loaded.
#[derive(Debug, Error)]
pub enum OverridesError {
    #[error("cannot read {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is not valid: {source}", .path.display())]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{}: device {device:?}: {reason}", .path.display())]
    Invalid {
        path: PathBuf,
        device: String,
        reason: tierd_protocol::config::SettingsError,
    },
}

/// The last ack a device sent.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct AckRecord {
    pub version: u64,
    pub applied: bool,
    pub reason: String,
    pub in_force: u64,
    pub received_ms: u64,
}

#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct DeviceControl {
    /// The latest document published for the device (by us, or seen retained on the broker).
    pub published: Option<ConfigDocument>,
    pub last_push_ms: Option<u64>,
    pub last_ack: Option<AckRecord>,
    /// The threshold the tuner last pushed (kept when an operator changes another key).
    pub tuned_threshold: Option<f32>,
    /// The same for each further model, by name (`models.<name>.threshold`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tuned_models: BTreeMap<String, f32>,
}

/// What `config show` prints.
#[derive(Debug, Clone, Serialize)]
pub struct ConfigView {
    pub device_id: String,
    pub defaults: Settings,
    pub file_overrides: Settings,
    pub operator_overrides: Settings,
    /// Whether an override fixes the threshold (the tuner then only proposes).
    pub pinned: bool,
    pub tuning_pushes: bool,
    #[serde(flatten)]
    pub state: DeviceControl,
}

#[derive(Debug)]
pub struct Control {
    pub push_tuned: bool,
    pub rules: PushRules,
    defaults: Settings,
    file: BTreeMap<String, Settings>,
    operator: BTreeMap<String, Settings>,
    devices: BTreeMap<String, DeviceControl>,
    max_devices: usize,
    /// Each device's current epoch (absent: 0), persisted in [`EPOCHS_FILE`].
    epochs: BTreeMap<String, u64>,
    /// The edge models this relay answers for (empty: all); it pushes tuned thresholds only
    /// for these, so two pools serving two models of one device each tune their own.
    serves: Vec<String>,
}

impl Control {
    pub fn new(
        push_tuned: bool,
        rules: PushRules,
        defaults: Settings,
        file: BTreeMap<String, Settings>,
        operator: BTreeMap<String, Settings>,
        max_devices: usize,
    ) -> Self {
        Control {
            push_tuned,
            rules,
            defaults,
            file,
            operator,
            devices: BTreeMap::new(),
            max_devices,
            epochs: BTreeMap::new(),
            serves: Vec::new(),
        }
    }

    /// Pushes tuned thresholds only for the edge models in `serves` (empty: all).
    pub fn with_serves(mut self, serves: Vec<String>) -> Self {
        self.serves = serves;
        self
    }

    /// Whether this relay tunes the edge model `name`.
    pub fn tunes(&self, name: &str) -> bool {
        self.serves.is_empty() || self.serves.iter().any(|s| s == name)
    }

    /// The devices' epochs, as [`load_epochs`] restored them.
    pub fn with_epochs(mut self, epochs: BTreeMap<String, u64>) -> Self {
        self.epochs = epochs;
        self
    }

    pub fn epochs(&self) -> &BTreeMap<String, u64> {
        &self.epochs
    }

    pub fn epoch(&self, device: &str) -> u64 {
        self.epochs.get(device).copied().unwrap_or(0)
    }

    fn overrides(&self, device: &str) -> Settings {
        let file = self.file.get(device).cloned().unwrap_or_default();
        let op = self.operator.get(device).cloned().unwrap_or_default();
        file.overlay(&op)
    }

    pub fn pinned(&self, device: &str) -> bool {
        self.overrides(device).threshold.is_some()
    }

    /// Whether an override fixes the threshold of `model` on `device`: its `models.<name>`
    /// entry, or for the primary also the top-level `threshold`.
    pub fn pinned_model(&self, device: &str, model: &str, primary: bool) -> bool {
        let o = self.overrides(device);
        o.models.get(model).is_some_and(|m| m.threshold.is_some())
            || (primary && o.threshold.is_some())
    }

    pub fn operator_overrides(&self) -> &BTreeMap<String, Settings> {
        &self.operator
    }

    /// The operators' overrides, as the fleet store (or another replica) holds them.
    pub fn set_operator_overrides(&mut self, operator: BTreeMap<String, Settings>) {
        self.operator = operator;
    }

    /// The devices' epochs, as the fleet store holds them.
    pub fn set_epochs(&mut self, epochs: BTreeMap<String, u64>) {
        self.epochs = epochs;
    }

    /// A device's config state as the fleet store keeps it.
    pub fn stored(&self, device: &str) -> Option<Result<String, serde_json::Error>> {
        self.devices.get(device).map(serde_json::to_string)
    }

    /// Puts back a device's config state from the store.
    pub fn restore(&mut self, device: &str, body: &str) -> Result<(), serde_json::Error> {
        let d: DeviceControl = serde_json::from_str(body)?;
        self.devices.insert(device.to_string(), d);
        Ok(())
    }

    fn slot(&mut self, device: &str) -> Option<&mut DeviceControl> {
        if !self.devices.contains_key(device) && self.devices.len() >= self.max_devices {
            return None;
        }
        Some(self.devices.entry(device.to_string()).or_default())
    }

    fn compose(
        &mut self,
        device: &str,
        source: &str,
        certificate: Option<serde_json::Value>,
        now_ms: u64,
    ) -> Result<ConfigDocument, ComposeError> {
        let overrides = self.overrides(device);
        let mut settings = self.defaults.overlay(&overrides);
        let epoch = self.epoch(device);
        let slot = self.slot(device).ok_or(ComposeError::DeviceLimit)?;
        if overrides.threshold.is_none() {
            settings.threshold = slot.tuned_threshold.or(settings.threshold);
        }
        for (name, &t) in &slot.tuned_models {
            if overrides
                .models
                .get(name)
                .is_none_or(|m| m.threshold.is_none())
            {
                settings.models.entry(name.clone()).or_default().threshold = Some(t);
            }
        }
        // A new epoch starts its versions over.
        let last = slot
            .published
            .as_ref()
            .filter(|d| d.epoch == epoch)
            .map_or(0, |d| d.version);
        let next = last
            .checked_add(1)
            .ok_or_else(|| ComposeError::VersionExhausted {
                device: device.to_string(),
                epoch,
                version: last,
            })?;
        let doc = ConfigDocument {
            version: next.max(now_ms),
            epoch,
            device_id: device.to_string(),
            issued_ms: now_ms,
            source: source.to_string(),
            settings,
            certificate,
        };
        slot.published = Some(doc.clone());
        slot.last_push_ms = Some(now_ms);
        Ok(doc)
    }

    /// After new evidence: the document to publish, if the threshold the device should run
    /// (see [`crate::tuner::in_force`]) is worth a push. Drift and violations go out at once;
    /// other changes wait for the hysteresis and the least interval between pushes.
    pub fn on_proposal(
        &mut self,
        device: &str,
        proposal: &Proposal,
        now_ms: u64,
    ) -> Option<ConfigDocument> {
        let model = proposal.model.as_str();
        if !self.push_tuned
            || !self.tunes(model)
            || self.pinned_model(device, model, proposal.primary)
        {
            return None;
        }
        let target = proposal.in_force.threshold;
        let urgent = matches!(proposal.in_force.basis, Basis::Drift | Basis::Violation);
        if proposal.in_force.basis == Basis::Kept {
            return None;
        }
        let last_push = self.devices.get(device).and_then(|d| d.last_push_ms);
        let too_soon =
            last_push.is_some_and(|last| now_ms.saturating_sub(last) < self.rules.min_interval_ms);
        if (too_soon && !urgent) || (target - proposal.running).abs() < self.rules.hysteresis {
            return None;
        }
        // Already published and not yet in force on the device: wait for its ack.
        let tuned = |d: &DeviceControl| {
            if proposal.primary {
                d.tuned_threshold
            } else {
                d.tuned_models.get(model).copied()
            }
        };
        if self.devices.get(device).and_then(tuned) == Some(target) {
            return None;
        }
        let slot = self.slot(device)?;
        if proposal.primary {
            slot.tuned_threshold = Some(target);
        } else {
            slot.tuned_models.insert(model.to_string(), target);
        }
        // The certificate behind the threshold, with which one it is.
        let mut certificate = match (proposal.in_force.basis, &proposal.offline) {
            // Through text, so an f32 reads 0.9 and not 0.8999999761581421.
            (Basis::Offline, Some(o)) => crate::api::to_json(o).ok(),
            _ => crate::api::to_json(&proposal.certificate).ok(),
        };
        if let Some(serde_json::Value::Object(m)) = certificate.as_mut() {
            if let Ok(basis) = serde_json::to_value(proposal.in_force.basis) {
                m.insert("basis".into(), basis);
            }
            m.insert("why".into(), proposal.in_force.why.clone().into());
            // (An offline certificate names its model already.)
            m.entry("model")
                .or_insert_with(|| proposal.edge_model.clone().into());
        }
        match self.compose(device, "tuner", certificate, now_ms) {
            Ok(doc) => Some(doc),
            Err(e) => {
                tracing::warn!(%device, %model, error = %e, "tuned threshold not pushed");
                None
            }
        }
    }

    /// An operator's `key=value` changes (`key=` unsets). All or nothing; the document to
    /// publish on success.
    pub fn set(
        &mut self,
        device: &str,
        changes: &[(String, String)],
        now_ms: u64,
    ) -> Result<ConfigDocument, SetError> {
        tierd_protocol::topic::validate_device_id(device)?;
        if changes.is_empty() {
            return Err(SetError::Nothing);
        }
        let mut next = self.operator.get(device).cloned().unwrap_or_default();
        for (k, v) in changes {
            next.set(k, v).map_err(SetError::Setting)?;
        }
        if !self.devices.contains_key(device) && self.devices.len() >= self.max_devices {
            return Err(SetError::TooManyDevices(self.max_devices));
        }
        let previous = if next.is_empty() {
            self.operator.remove(device)
        } else {
            self.operator.insert(device.to_string(), next)
        };
        match self.compose(device, "operator", None, now_ms) {
            Ok(doc) => Ok(doc),
            Err(e) => {
                // All or nothing: the overrides stay as they were.
                match previous {
                    Some(p) => self.operator.insert(device.to_string(), p),
                    None => self.operator.remove(device),
                };
                Err(e.into())
            }
        }
    }

    /// An operator's reset: raises the device's epoch and issues its document with the
    /// versions started over, so a device whose version line is at its end (or ahead of this
    /// relay) takes documents again. The caller persists [`Control::epochs`].
    pub fn reset(&mut self, device: &str, now_ms: u64) -> Result<ConfigDocument, SetError> {
        tierd_protocol::topic::validate_device_id(device)?;
        if !self.devices.contains_key(device) && self.devices.len() >= self.max_devices {
            return Err(SetError::TooManyDevices(self.max_devices));
        }
        let seen = self
            .devices
            .get(device)
            .and_then(|d| d.published.as_ref())
            .map_or(0, |d| d.epoch);
        let current = self.epoch(device).max(seen);
        let epoch = current
            .checked_add(1)
            .ok_or_else(|| ComposeError::EpochExhausted {
                device: device.to_string(),
                epoch: current,
            })?;
        self.epochs.insert(device.to_string(), epoch);
        Ok(self.compose(device, "operator", None, now_ms)?)
    }

    pub fn record_ack(&mut self, device: &str, ack: ConfigAck, now_ms: u64) {
        if let Some(slot) = self.slot(device) {
            slot.last_ack = Some(AckRecord {
                version: ack.version,
                applied: ack.applied,
                reason: ack.reason,
                in_force: ack.in_force,
                received_ms: now_ms,
            });
        }
    }

    /// A document seen on the broker (retained, or from another replica): versions continue
    /// from it.
    pub fn learn_published(&mut self, doc: ConfigDocument) {
        let device = doc.device_id.clone();
        let epoch = doc.epoch;
        let Some(slot) = self.slot(&device) else {
            return;
        };
        let newer = slot
            .published
            .as_ref()
            .is_none_or(|p| (doc.epoch, doc.version) > (p.epoch, p.version));
        if !newer {
            return;
        }
        if doc.source == "tuner" {
            slot.tuned_threshold = doc.settings.threshold;
            slot.tuned_models = doc
                .settings
                .models
                .iter()
                .filter_map(|(name, m)| m.threshold.map(|t| (name.clone(), t)))
                .collect();
        }
        slot.published = Some(doc);
        // Another replica reset the device: continue in its epoch.
        let known = self.epochs.entry(device).or_insert(0);
        *known = (*known).max(epoch);
    }

    /// The audit rate of `model` (a name) in the document the device acknowledged as in
    /// force, if it set one.
    pub fn audit_rate_in_force(&self, device: &str, model: &str) -> Option<f32> {
        let d = self.devices.get(device)?;
        let published = d.published.as_ref()?;
        let ack = d.last_ack.as_ref()?;
        (ack.applied && ack.in_force == published.version)
            .then(|| published.settings.for_model(model).audit_rate)
            .flatten()
            .map(|r| r as f32)
    }

    pub fn view(&self, device: &str) -> ConfigView {
        ConfigView {
            device_id: device.to_string(),
            defaults: self.defaults.clone(),
            file_overrides: self.file.get(device).cloned().unwrap_or_default(),
            operator_overrides: self.operator.get(device).cloned().unwrap_or_default(),
            pinned: self.pinned(device),
            tuning_pushes: self.push_tuned,
            state: self.devices.get(device).cloned().unwrap_or_default(),
        }
    }
}

/// Loads the operators' overrides; a missing file is an empty set.
pub fn load_overrides(dir: &Path) -> Result<BTreeMap<String, Settings>, OverridesError> {
    let path = dir.join(OVERRIDES_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(source) => return Err(OverridesError::Read { path, source }),
    };
    let map: BTreeMap<String, Settings> = match serde_json::from_slice(&bytes) {
        Ok(m) => m,
        Err(source) => return Err(OverridesError::Parse { path, source }),
    };
    for (device, s) in &map {
        if let Err(reason) = s.validate() {
            return Err(OverridesError::Invalid {
                path,
                device: device.clone(),
                reason,
            });
        }
    }
    Ok(map)
}

/// Loads the devices' epochs; a missing file is all zero.
pub fn load_epochs(dir: &Path) -> Result<BTreeMap<String, u64>, OverridesError> {
    let path = dir.join(EPOCHS_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(source) => return Err(OverridesError::Read { path, source }),
    };
    serde_json::from_slice(&bytes).map_err(|source| OverridesError::Parse { path, source })
}

/// Saves them atomically (temp file, fsync, rename, fsync of the directory).
pub fn save_epochs(dir: &Path, map: &BTreeMap<String, u64>) -> std::io::Result<()> {
    let json = serde_json::to_vec_pretty(map).map_err(std::io::Error::other)?;
    tierd_runtime::state::write_atomic(dir, EPOCHS_FILE, &json)
}

/// Saves them atomically (temp file, fsync, rename, fsync of the directory).
pub fn save_overrides(dir: &Path, map: &BTreeMap<String, Settings>) -> std::io::Result<()> {
    let json = serde_json::to_vec_pretty(map).map_err(std::io::Error::other)?;
    tierd_runtime::state::write_atomic(dir, OVERRIDES_FILE, &json)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tuner::{Certificate, Policy};

    fn cert(threshold: f32, insufficient: bool) -> Certificate {
        Certificate {
            threshold,
            policy: Policy::TargetAgreement {
                target: 0.99,
                delta: 0.05,
            },
            agreement: 0.995,
            agreement_lower_bound: 0.991,
            delta: 0.05,
            escalation_rate: 0.2,
            cost_per_1000: 0.0,
            requests: 5000,
            labelled_escalated: 1000,
            audited: 80,
            insufficient_evidence: insufficient,
            note: String::new(),
        }
    }

    /// The online certificate `cert(threshold, insufficient)` as the rule in force makes it.
    fn prop(threshold: f32, insufficient: bool, running: f32) -> Proposal {
        let (threshold, basis) = if insufficient {
            (running, Basis::Kept)
        } else {
            (threshold, Basis::Online)
        };
        Proposal {
            model: "m".into(),
            edge_model: "m@1".into(),
            primary: true,
            in_force: crate::tuner::InForce {
                threshold,
                basis,
                why: String::new(),
            },
            certificate: cert(threshold, insufficient),
            offline: None,
            running,
        }
    }

    #[test]
    fn drift_and_violations_skip_the_interval_and_say_why() {
        let mut c = control();
        c.on_proposal("d", &prop(0.8, false, 0.9), 1_000_000)
            .expect("push");
        let mut drift = prop(0.8, false, 0.8);
        drift.in_force = crate::tuner::InForce {
            threshold: crate::tuner::ALWAYS_ESCALATE,
            basis: Basis::Drift,
            why: "drift: test".into(),
        };
        // One second later: well within the interval, but drift goes out at once.
        let doc = c.on_proposal("d", &drift, 1_001_000).expect("urgent push");
        assert_eq!(doc.settings.threshold, Some(crate::tuner::ALWAYS_ESCALATE));
        let cert = doc.certificate.expect("certificate");
        assert_eq!(cert["basis"], "drift");
        assert_eq!(cert["why"], "drift: test");
        assert_eq!(
            cert["threshold"].to_string(),
            "0.8",
            "no float noise: {cert}"
        );
        // A lowering within the interval waits.
        assert!(c
            .on_proposal("d", &prop(0.7, false, 1.01), 1_002_000)
            .is_none());
    }

    fn control() -> Control {
        let mut file = BTreeMap::new();
        file.insert(
            "pinned".to_string(),
            Settings {
                threshold: Some(0.95),
                ..Default::default()
            },
        );
        Control::new(
            true,
            PushRules {
                hysteresis: 0.01,
                min_interval_ms: 60_000,
            },
            Settings {
                audit_rate: Some(0.05),
                ..Default::default()
            },
            file,
            BTreeMap::new(),
            10,
        )
    }

    #[test]
    fn tuned_thresholds_are_pushed_with_guard_rails() {
        let mut c = control();
        let doc = c
            .on_proposal("d", &prop(0.8, false, 0.9), 1_000_000)
            .expect("push");
        assert_eq!(doc.settings.threshold, Some(0.8));
        assert_eq!(
            doc.settings.audit_rate,
            Some(0.05),
            "fleet defaults ride along"
        );
        assert_eq!(doc.version, 1_000_000);
        assert!(doc.certificate.is_some());
        // Within the minimum interval, below hysteresis, thin evidence, pinned: no push.
        assert!(c
            .on_proposal("d", &prop(0.7, false, 0.8), 1_000_001)
            .is_none());
        assert!(c
            .on_proposal("d", &prop(0.805, false, 0.8), 2_000_000)
            .is_none());
        assert!(c
            .on_proposal("d", &prop(0.5, true, 0.8), 2_000_000)
            .is_none());
        assert!(c
            .on_proposal("pinned", &prop(0.5, false, 0.95), 2_000_000)
            .is_none());
        let next = c
            .on_proposal("d", &prop(0.7, false, 0.8), 2_000_000)
            .expect("push");
        assert!(next.version > doc.version);
    }

    #[test]
    fn a_further_models_threshold_goes_in_its_entry_and_only_from_its_pool() {
        let further = |threshold, running| Proposal {
            model: "breast".into(),
            edge_model: "breast@1".into(),
            primary: false,
            ..prop(threshold, false, running)
        };
        let mut c = control();
        c.on_proposal("d", &prop(0.8, false, 0.9), 1_000_000)
            .expect("push");
        let doc = c
            .on_proposal("d", &further(0.6, 0.9), 2_000_000)
            .expect("push");
        // Its own entry; the primary's tuned threshold stays in the document.
        assert_eq!(doc.settings.for_model("breast").threshold, Some(0.6));
        assert_eq!(doc.settings.threshold, Some(0.8));
        assert_eq!(
            doc.certificate.as_ref().and_then(|c| c.get("model")),
            Some(&serde_json::Value::from("breast@1"))
        );
        // Already published, not yet in force: no second push.
        assert!(c.on_proposal("d", &further(0.6, 0.9), 3_000_000).is_none());
        // An operator pins the model's threshold: the tuner only proposes, and the primary's
        // pushes keep the operator's value for it.
        c.set(
            "d",
            &[("models.breast.threshold".into(), "0.95".into())],
            3_000_000,
        )
        .expect("set");
        assert!(c.on_proposal("d", &further(0.5, 0.95), 4_000_000).is_none());
        let doc = c
            .on_proposal("d", &prop(0.7, false, 0.8), 5_000_000)
            .expect("push");
        assert_eq!(doc.settings.for_model("breast").threshold, Some(0.95));
        // A relay of the digits pool does not tune the breast model, and the reverse.
        let mut pool = control().with_serves(vec!["digits".into()]);
        assert!(pool
            .on_proposal("d", &further(0.6, 0.9), 1_000_000)
            .is_none());
        let mut other = control().with_serves(vec!["breast".into()]);
        assert!(other
            .on_proposal("d", &prop(0.8, false, 0.9), 1_000_000)
            .is_none());
        let doc = other
            .on_proposal("d", &further(0.6, 0.9), 1_000_000)
            .expect("push");
        // The other pool learns it from the broker and keeps it in its own documents.
        pool.learn_published(doc);
        assert_eq!(pool.view("d").state.tuned_models.get("breast"), Some(&0.6));
        let doc = pool
            .on_proposal(
                "d",
                &Proposal {
                    model: "digits".into(),
                    ..prop(0.8, false, 0.9)
                },
                2_000_000,
            )
            .expect("push");
        assert_eq!(doc.settings.for_model("breast").threshold, Some(0.6));
        assert_eq!(doc.settings.threshold, Some(0.8));
    }

    #[test]
    fn operator_overrides_pin_merge_and_unset() {
        let mut c = control();
        c.on_proposal("d", &prop(0.8, false, 0.9), 1_000_000)
            .expect("push");
        let doc = c
            .set(
                "d",
                &[("escalation_timeout_ms".into(), "400".into())],
                1_000_001,
            )
            .expect("set");
        assert_eq!(doc.settings.threshold, Some(0.8), "tuned threshold kept");
        assert_eq!(doc.settings.escalation_timeout_ms, Some(400));
        assert_eq!(doc.version, 1_000_001);
        let doc = c
            .set("d", &[("threshold".into(), "0.97".into())], 5)
            .expect("pin");
        assert_eq!(doc.settings.threshold, Some(0.97));
        assert!(
            doc.version > 1_000_001,
            "versions never go back with the clock"
        );
        assert!(c.pinned("d"));
        assert!(c
            .on_proposal("d", &prop(0.5, false, 0.97), 9_000_000)
            .is_none());
        let err = c
            .set("d", &[("threshold".into(), "3".into())], 6)
            .unwrap_err()
            .to_string();
        assert!(err.contains("threshold"), "{err}");
        assert_eq!(
            c.view("d").operator_overrides.threshold,
            Some(0.97),
            "unchanged on error"
        );
        c.set("d", &[("threshold".into(), String::new())], 7)
            .expect("unpin");
        assert!(!c.pinned("d"));
        assert!(c
            .set("a/b", &[("threshold".into(), "0.5".into())], 8)
            .is_err());
    }

    #[test]
    fn versions_continue_from_what_the_broker_retained() {
        let mut c = control();
        c.learn_published(ConfigDocument {
            version: 9_000_000_000_000,
            epoch: 0,
            device_id: "d".into(),
            issued_ms: 0,
            source: "tuner".into(),
            settings: Settings {
                threshold: Some(0.6),
                ..Default::default()
            },
            certificate: None,
        });
        let doc = c
            .set("d", &[("audit_rate".into(), "0.1".into())], 1)
            .expect("set");
        assert_eq!(doc.version, 9_000_000_000_001);
        assert_eq!(doc.settings.threshold, Some(0.6));
    }

    #[test]
    fn the_last_version_asks_for_a_reset_and_a_reset_recovers() {
        let mut c = control();
        c.learn_published(ConfigDocument {
            version: u64::MAX,
            epoch: 0,
            device_id: "d".into(),
            issued_ms: 0,
            source: "operator".into(),
            settings: Settings::default(),
            certificate: None,
        });
        let e = c
            .set("d", &[("audit_rate".into(), "0.1".into())], 5)
            .unwrap_err()
            .to_string();
        assert!(e.contains("cloud-relay config reset --device d"), "{e}");
        let doc = c.reset("d", 5).expect("reset");
        assert_eq!((doc.epoch, doc.version), (1, 5));
        assert_ne!(
            doc.settings.audit_rate,
            Some(0.1),
            "the refused set changed nothing"
        );
        let next = c
            .set("d", &[("audit_rate".into(), "0.2".into())], 6)
            .expect("set after reset");
        assert_eq!((next.epoch, next.version), (1, 6));
        let dir = tempfile::tempdir().unwrap();
        assert!(load_epochs(dir.path()).unwrap().is_empty());
        save_epochs(dir.path(), c.epochs()).unwrap();
        assert_eq!(load_epochs(dir.path()).unwrap().get("d"), Some(&1));
    }

    #[test]
    fn overrides_persist_atomically() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load_overrides(dir.path()).unwrap().is_empty());
        let mut c = control();
        c.set("d", &[("threshold".into(), "0.9".into())], 1)
            .expect("set");
        save_overrides(dir.path(), c.operator_overrides()).unwrap();
        let back = load_overrides(dir.path()).unwrap();
        assert_eq!(back.get("d").and_then(|s| s.threshold), Some(0.9));
        std::fs::write(dir.path().join(OVERRIDES_FILE), br#"{"d":{"threshold":9}}"#).unwrap();
        assert!(load_overrides(dir.path())
            .unwrap_err()
            .to_string()
            .contains("threshold"));
    }
}
