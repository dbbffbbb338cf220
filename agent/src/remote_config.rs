//! Remote config: the relay's retained document on `tierd/v1/{device}/config`, checked,
//! persisted, applied live, and acknowledged.
//!
//! A document is taken only if it is signed by one of the relay keys `agent.toml` pins
//! (`[remote_config] trusted_keys`, see [`tierd_protocol::signed`]) over its exact bytes, it
//! parses, every value is in range, it names this device, and its `(epoch, version)` is above
//! the one in force. With no trusted key configured every document is refused. The signed
//! payload is then written to `applied-config.json` in the state directory (temp file, fsync,
//! rename, fsync of the directory), and only then put in force: what runs is always what a
//! reboot would restore, and a restart verifies the file's signature again. Anything else changes nothing and
//! is acknowledged as rejected with the reason. A document with the version already in force
//! is the retained copy the broker hands out at every subscribe: ignored without an ack.
//!
//! [`RemoteConfig`] does the file I/O but no MQTT; [`run`] feeds it the payloads the link
//! routes here, puts what it applied in force and sends the acks it returns through the spool.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::Publish;
use tierd_protocol::signed::{self, SignedError};
use tierd_protocol::{ConfigAck, ConfigDocError, ConfigDocument, PublicKey, Settings};
use tierd_runtime::state::write_atomic;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::evidence::Evidence;
use crate::forward::SpoolSink;
use crate::policy::Policy;
use crate::telemetry::ReportSink;

pub const APPLIED_FILE: &str = "applied-config.json";

/// `base` (from `agent.toml`) with the document's top-level settings laid over it. Pure.
pub fn overlay(base: &Policy, s: &Settings, version: u64) -> Policy {
    let signal = s.signal.unwrap_or(base.signal);
    Policy {
        threshold: s.threshold.unwrap_or(base.threshold),
        signal,
        escalation_timeout: s
            .escalation_timeout_ms
            .map_or(base.escalation_timeout, Duration::from_millis),
        audit_rate: s.audit_rate.unwrap_or(base.audit_rate),
        telemetry_interval: s
            .telemetry_interval_s
            .map_or(base.telemetry_interval, Duration::from_secs_f64),
        config_version: version,
    }
}

/// The policy of the model named `name`, whose `agent.toml` settings are `base`: the primary
/// model takes the document's top-level settings, a further model only the shared ones (audit
/// rate, timeout, interval); then the model's own entry in `models` wins. Pure.
pub fn overlay_model(
    base: &Policy,
    s: &Settings,
    version: u64,
    name: &str,
    primary: bool,
) -> Policy {
    let mut p = if primary {
        overlay(base, s, version)
    } else {
        let shared = Settings {
            threshold: None,
            signal: None,
            ..s.clone()
        };
        overlay(base, &shared, version)
    };
    if let Some(m) = s.models.get(name) {
        p.threshold = m.threshold.unwrap_or(p.threshold);
        p.signal = m.signal.unwrap_or(p.signal);
        p.audit_rate = m.audit_rate.unwrap_or(p.audit_rate);
    }
    p
}

/// A further model's place in the remote config: its name, its `agent.toml` settings, where
/// its policy is published and the evidence whose audit rate follows it.
#[derive(Debug)]
pub struct FurtherModel {
    pub name: String,
    pub base: Policy,
    pub policy: watch::Sender<Policy>,
    pub evidence: std::sync::Arc<Evidence>,
}

/// What became of one payload.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// In force now; send the ack.
    Applied(Policy, ConfigAck),
    /// Nothing changed; send the ack (it carries the reason).
    Rejected(ConfigAck),
    /// The document already in force, delivered again (retained): nothing to say.
    Unchanged,
}

#[derive(Debug)]
pub struct RemoteConfig {
    device_id: String,
    base: Policy,
    dir: PathBuf,
    trusted: Vec<PublicKey>,
    doc: Option<ConfigDocument>,
    /// The primary model's name, whose `models` entry the document may also set.
    primary: String,
}

impl RemoteConfig {
    /// Loads the persisted document, if any. A file that no longer validates (edited by hand,
    /// written by another version) is moved aside and reported, never half-applied.
    /// The file is verified with `trusted` like a document from the broker: one a key no
    /// longer trusted signed is set aside too.
    pub fn load(
        dir: &Path,
        device_id: &str,
        base: Policy,
        trusted: Vec<PublicKey>,
    ) -> (Self, Option<String>) {
        let mut rc = RemoteConfig {
            device_id: device_id.to_string(),
            base,
            dir: dir.to_path_buf(),
            trusted,
            doc: None,
            primary: String::new(),
        };
        let path = dir.join(APPLIED_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (rc, None),
            Err(e) => {
                return (
                    rc,
                    Some(format!(
                        "cannot read {}: {e}; running on agent.toml",
                        path.display()
                    )),
                )
            }
        };
        let checked = signed::verify(&bytes, &rc.trusted).and_then(|d| {
            d.check(device_id, 0, 0)
                .map(|_| d)
                .map_err(SignedError::from)
        });
        match checked {
            Ok(doc) => {
                rc.doc = Some(doc);
                (rc, None)
            }
            Err(e) => {
                let aside = dir.join(format!(
                    "{APPLIED_FILE}.rejected-{}",
                    tierd_runtime::unix_ms()
                ));
                let moved = std::fs::rename(&path, &aside).is_ok();
                (
                    rc,
                    Some(format!(
                        "{} is not a valid config ({e}); {}; running on agent.toml",
                        path.display(),
                        if moved {
                            format!("moved to {}", aside.display())
                        } else {
                            "could not move it aside".to_string()
                        }
                    )),
                )
            }
        }
    }

    /// The primary's `agent.toml` settings, before any document.
    pub fn base(&self) -> Policy {
        self.base
    }

    /// Names the primary model, so a document's `models.<primary>` entry applies to it.
    pub fn with_primary(mut self, name: &str) -> Self {
        self.primary = name.to_string();
        self
    }

    pub fn version(&self) -> u64 {
        self.doc.as_ref().map_or(0, |d| d.version)
    }

    pub fn epoch(&self) -> u64 {
        self.doc.as_ref().map_or(0, |d| d.epoch)
    }

    /// Whether any relay key is pinned (without one every document is refused).
    pub fn has_trusted_keys(&self) -> bool {
        !self.trusted.is_empty()
    }

    pub fn document(&self) -> Option<&ConfigDocument> {
        self.doc.as_ref()
    }

    /// The settings in force for the primary model.
    pub fn policy(&self) -> Policy {
        match &self.doc {
            Some(d) => overlay_model(&self.base, &d.settings, d.version, &self.primary, true),
            None => self.base,
        }
    }

    /// The settings in force for the further model `name`, whose `agent.toml` settings are
    /// `base`.
    pub fn policy_of(&self, name: &str, base: &Policy) -> Policy {
        match &self.doc {
            Some(d) => overlay_model(base, &d.settings, d.version, name, false),
            None => *base,
        }
    }

    pub fn handle(&mut self, payload: &[u8]) -> Outcome {
        let in_force = self.version();
        let in_force_epoch = self.epoch();
        // `version` is 0 when the payload does not even verify.
        let rejected = |version: u64, reason: String| {
            Outcome::Rejected(ConfigAck {
                version,
                applied: false,
                reason,
                in_force,
            })
        };
        let doc = match signed::verify(payload, &self.trusted) {
            Ok(d) => d,
            Err(e) => return rejected(0, e.to_string()),
        };
        let version = doc.version;
        if self.doc.as_ref() == Some(&doc) {
            return Outcome::Unchanged;
        }
        if let Err(e) = doc.check(&self.device_id, in_force_epoch, in_force) {
            // The same version with different content is as stale as an older one.
            return rejected(version, match e {
                ConfigDocError::Stale { .. } if version == in_force && doc.epoch == in_force_epoch => format!(
                    "config version {version} is already in force with different content; versions must increase"
                ),
                other => other.to_string(),
            });
        }
        // The signed payload, so a restart can verify it again.
        if let Err(e) = write_atomic(&self.dir, APPLIED_FILE, payload) {
            warn!(error = %e, dir = %self.dir.display(), "cannot persist the config document");
            return rejected(
                version,
                format!(
                    "cannot persist it in {}: {e}; not applied, so a reboot cannot undo it",
                    self.dir.display()
                ),
            );
        }
        self.doc = Some(doc);
        Outcome::Applied(
            self.policy(),
            ConfigAck {
                version,
                applied: true,
                reason: String::new(),
                in_force: version,
            },
        )
    }
}

/// Applies the documents the link delivers until the channel closes or `shutdown` resolves.
pub async fn run(
    mut remote: RemoteConfig,
    mut documents: mpsc::Receiver<Publish>,
    policy: watch::Sender<Policy>,
    evidence: std::sync::Arc<Evidence>,
    further: Vec<FurtherModel>,
    sink: SpoolSink,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    if !remote.has_trusted_keys() {
        warn!(
            "{}; remote config documents will be refused",
            SignedError::NoTrustedKeys
        );
    }
    loop {
        let publish = tokio::select! {
            p = documents.recv() => match p { Some(p) => p, None => return },
            _ = &mut shutdown => return,
        };
        // An empty retained message is how an operator clears the topic: nothing to apply.
        if !publish.payload.is_empty() {
            apply(
                &mut remote,
                &publish.payload,
                &policy,
                &evidence,
                &further,
                &sink,
            );
        }
    }
}

/// Handles one config document: applies it (policy and audit rate) or not, and spools the ack.
fn apply(
    remote: &mut RemoteConfig,
    payload: &[u8],
    policy_tx: &watch::Sender<Policy>,
    evidence: &Evidence,
    further: &[FurtherModel],
    sink: &SpoolSink,
) {
    let ack = match remote.handle(payload) {
        Outcome::Unchanged => return,
        Outcome::Applied(policy, ack) => {
            evidence.set_audit_rate(policy.audit_rate);
            policy_tx.send_replace(policy);
            for m in further {
                let p = remote.policy_of(&m.name, &m.base);
                m.evidence.set_audit_rate(p.audit_rate);
                m.policy.send_replace(p);
                info!(model = %m.name, threshold = p.threshold, signal = p.signal.as_str(), audit_rate = p.audit_rate, "remote config applied to a further model");
            }
            info!(
                version = ack.version,
                threshold = policy.threshold,
                signal = policy.signal.as_str(),
                audit_rate = policy.audit_rate,
                "remote config applied"
            );
            tierd_runtime::systemd::status(&format!(
                "serving; remote config version {} applied (threshold {})",
                ack.version, policy.threshold
            ));
            ack
        }
        Outcome::Rejected(ack) => {
            warn!(version = ack.version, in_force = ack.in_force, reason = %ack.reason, "remote config rejected; settings unchanged");
            ack
        }
    };
    match tierd_protocol::encode(&ack) {
        Ok(bytes) => {
            if let Err(e) = sink.send(tierd_protocol::RecordKind::ConfigAck, bytes) {
                warn!(error = %e, "config ack not spooled");
            }
        }
        Err(e) => warn!(error = %e, "config ack cannot be encoded"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cascade::Signal;
    use tierd_protocol::Signer;

    fn base() -> Policy {
        Policy {
            threshold: 0.9,
            signal: Signal::MaxProb,
            escalation_timeout: Duration::from_millis(250),
            audit_rate: 0.02,
            telemetry_interval: Duration::from_secs(30),
            config_version: 0,
        }
    }

    fn relay_key() -> Signer {
        // One key for the whole test binary (generation is cheap, but a stable key keeps the
        // persisted files of one test verifiable by another RemoteConfig).
        static KEY: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
        let pkcs8 = KEY.get_or_init(|| Signer::generate_pkcs8().expect("generate"));
        Signer::from_pkcs8(pkcs8).expect("pkcs8")
    }

    fn trusted() -> Vec<PublicKey> {
        vec![relay_key().public().clone()]
    }

    fn unsigned(version: u64, settings: &str) -> String {
        format!(
            r#"{{"version":{version},"device_id":"d1","source":"operator","settings":{settings}}}"#
        )
    }

    fn doc(version: u64, settings: &str) -> Vec<u8> {
        relay_key().sign_bytes(&unsigned(version, settings))
    }

    fn load(dir: &Path) -> (RemoteConfig, Option<String>) {
        RemoteConfig::load(dir, "d1", base(), trusted())
    }

    #[test]
    fn applies_persists_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (mut rc, warning) = load(dir.path());
        assert_eq!(warning, None);
        let Outcome::Applied(p, ack) = rc.handle(&doc(5, r#"{"threshold":0.7,"signal":"margin"}"#))
        else {
            panic!("not applied");
        };
        assert_eq!(
            (p.threshold, p.signal, p.config_version),
            (0.7, Signal::Margin, 5)
        );
        assert_eq!(p.audit_rate, 0.02, "unset keys keep the file value");
        assert!(ack.applied && ack.in_force == 5);
        assert_eq!(
            rc.handle(&doc(5, r#"{"threshold":0.7,"signal":"margin"}"#)),
            Outcome::Unchanged
        );
        let (again, _) = load(dir.path());
        assert_eq!(again.policy(), p);
    }

    #[test]
    fn each_model_takes_its_own_entry_and_the_shared_settings() {
        let dir = tempfile::tempdir().unwrap();
        let (rc, _) = load(dir.path());
        let mut rc = rc.with_primary("digits-edge");
        let further = Policy {
            threshold: 0.5,
            ..base()
        };
        let settings = r#"{"threshold":0.7,"audit_rate":0.1,"escalation_timeout_ms":900,
            "models":{"breast-edge":{"threshold":0.6,"signal":"margin"}}}"#;
        let Outcome::Applied(p, _) = rc.handle(&doc(3, settings)) else {
            panic!("not applied");
        };
        assert_eq!((p.threshold, p.audit_rate), (0.7, 0.1));
        let b = rc.policy_of("breast-edge", &further);
        assert_eq!((b.threshold, b.signal), (0.6, Signal::Margin));
        assert_eq!(b.audit_rate, 0.1, "the shared audit rate");
        assert_eq!(b.escalation_timeout, Duration::from_millis(900));
        assert_eq!(b.config_version, 3);
        // A further model without an entry keeps its own threshold: the top-level one is the
        // primary's.
        let other = rc.policy_of("wine-edge", &further);
        assert_eq!((other.threshold, other.signal), (0.5, Signal::MaxProb));
        // The primary's own entry wins over the top level.
        let settings = r#"{"threshold":0.7,"models":{"digits-edge":{"threshold":0.8}}}"#;
        let Outcome::Applied(p, _) = rc.handle(&doc(4, settings)) else {
            panic!("not applied");
        };
        assert_eq!(p.threshold, 0.8);
    }

    #[test]
    fn invalid_or_stale_documents_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (mut rc, _) = load(dir.path());
        assert!(matches!(
            rc.handle(&doc(3, r#"{"threshold":0.8}"#)),
            Outcome::Applied(..)
        ));
        let before = rc.policy();
        for (payload, needle) in [
            (doc(4, r#"{"threshold":7}"#), "threshold = 7"),
            (doc(4, r#"{"threshhold":0.5}"#), "unknown field"),
            (doc(4, r#"{"threshold":"high"}"#), "invalid type"),
            (doc(2, r#"{"threshold":0.5}"#), "not newer"),
            (doc(3, r#"{"threshold":0.5}"#), "already in force"),
            (b"{".to_vec(), "not a signed config envelope"),
            (
                relay_key().sign_bytes(r#"{"version":9,"device_id":"other","settings":{}}"#),
                "not \"d1\"",
            ),
        ] {
            match rc.handle(&payload) {
                Outcome::Rejected(ack) => {
                    assert!(!ack.applied);
                    assert_eq!(ack.in_force, 3);
                    assert!(
                        ack.reason.contains(needle),
                        "{needle:?} not in {:?}",
                        ack.reason
                    );
                }
                other => panic!("{needle}: {other:?}"),
            }
            assert_eq!(rc.policy(), before);
        }
        let (again, _) = load(dir.path());
        assert_eq!(again.policy(), before);
    }

    #[test]
    fn only_documents_signed_by_a_trusted_key_are_applied() {
        let dir = tempfile::tempdir().unwrap();
        let (mut rc, _) = load(dir.path());
        assert!(matches!(
            rc.handle(&doc(3, r#"{"threshold":0.8}"#)),
            Outcome::Applied(..)
        ));
        let before = rc.policy();
        let stranger = Signer::from_pkcs8(&Signer::generate_pkcs8().unwrap()).unwrap();
        let forged_sig = String::from_utf8(doc(4, r#"{"threshold":0.5}"#))
            .unwrap()
            .replace("0.5", "0.0");
        for (payload, needle) in [
            (
                unsigned(4, r#"{"threshold":0}"#).into_bytes(),
                "unsigned config document refused",
            ),
            (
                stranger.sign_bytes(&unsigned(4, r#"{"threshold":0}"#)),
                "signed by unknown key",
            ),
            (forged_sig.into_bytes(), "bad signature"),
        ] {
            match rc.handle(&payload) {
                Outcome::Rejected(ack) => {
                    assert!(ack.reason.contains(needle), "{needle:?} not in {ack:?}");
                    assert_eq!(ack.in_force, 3);
                }
                other => panic!("{needle}: {other:?}"),
            }
            assert_eq!(rc.policy(), before);
        }
        // No key pinned: everything refused, and a persisted file is not trusted either.
        let (mut none, warning) = RemoteConfig::load(dir.path(), "d1", base(), Vec::new());
        assert!(warning.expect("warning").contains("no trusted relay keys"));
        assert_eq!(none.policy(), base());
        match none.handle(&doc(5, r#"{"threshold":0.5}"#)) {
            Outcome::Rejected(ack) => assert_eq!(
                ack.reason,
                "no trusted relay keys configured; set remote_config.trusted_keys"
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_higher_epoch_recovers_a_broken_version_line() {
        let dir = tempfile::tempdir().unwrap();
        let (mut rc, _) = load(dir.path());
        let max = relay_key().sign_bytes(&unsigned(u64::MAX, r#"{"threshold":0.1}"#));
        assert!(matches!(rc.handle(&max), Outcome::Applied(..)));
        let next = doc(1000, r#"{"threshold":0.6}"#);
        assert!(matches!(rc.handle(&next), Outcome::Rejected(_)));
        let reset = relay_key().sign_bytes(
            r#"{"version":1000,"epoch":1,"device_id":"d1","settings":{"threshold":0.6}}"#,
        );
        let Outcome::Applied(p, _) = rc.handle(&reset) else {
            panic!("epoch 1 not applied");
        };
        assert_eq!((p.threshold, p.config_version), (0.6, 1000));
        // Epoch 0 documents are now stale, whatever their version; epoch 1 goes on.
        match rc.handle(&doc(2000, r#"{"threshold":0.2}"#)) {
            Outcome::Rejected(ack) => assert!(ack.reason.contains("not newer"), "{ack:?}"),
            other => panic!("{other:?}"),
        }
        let on = relay_key().sign_bytes(
            r#"{"version":1001,"epoch":1,"device_id":"d1","settings":{"threshold":0.7}}"#,
        );
        assert!(matches!(rc.handle(&on), Outcome::Applied(..)));
        let (again, _) = load(dir.path());
        assert_eq!((again.epoch(), again.version()), (1, 1001));
    }

    #[test]
    fn a_corrupt_persisted_file_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(APPLIED_FILE), b"{\"version\":").unwrap();
        let (rc, warning) = load(dir.path());
        assert_eq!(rc.policy(), base());
        assert!(warning.expect("warning").contains("moved to"));
        assert!(!dir.path().join(APPLIED_FILE).exists());
    }

    #[test]
    fn an_unwritable_state_dir_rejects_instead_of_applying() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, b"x").unwrap();
        let (mut rc, _) = load(&file);
        match rc.handle(&doc(1, r#"{"threshold":0.5}"#)) {
            Outcome::Rejected(ack) => assert!(ack.reason.contains("cannot persist"), "{ack:?}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(rc.policy(), base());
    }
}
