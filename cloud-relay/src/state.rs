//! The relay's shared state: the fleet view, the config controller and the counters, as the
//! HTTP API and the MQTT side both hold them, plus the one way a config document leaves the
//! relay ([`publish_config`]).
//!
//! Both sides import from here and from nowhere else, so neither depends on the other.

use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};

use rumqttc::v5::mqttbytes::QoS;
use thiserror::Error;
use tierd_protocol::{encode, ConfigDocument, Signer, SpoolAck, Topic, TopicKind};
use tierd_runtime::link::Publisher;
use tracing::warn;

use crate::control::{self, Control, SetError};
use crate::fleet::Fleet;
use crate::rollout::Rollouts;
use crate::store::{persist, Kind, Persist};

pub type SharedFleet = Arc<Mutex<Fleet>>;
pub type SharedControl = Arc<Mutex<Control>>;
pub type SharedRollouts = Arc<Mutex<Rollouts>>;

/// The relay replica's counters (exported on `/metrics`).
#[derive(Debug, Default)]
pub struct RelayStats {
    pub answered: AtomicU64,
    pub errors: AtomicU64,
    pub rejected: AtomicU64,
    pub overloaded: AtomicU64,
    pub telemetry_accepted: AtomicU64,
    pub telemetry_rejected: AtomicU64,
    /// Spooled records received again (resends after a lost ack); acknowledged, not re-filed.
    pub duplicates: AtomicU64,
    /// Config documents seen on the broker that this relay's key did not sign: ignored.
    pub config_unverified: AtomicU64,
    /// Online statuses from a second machine under a device id already online.
    pub id_collisions: AtomicU64,
}

/// A lock over shared state was poisoned (a thread panicked while holding it).
#[derive(Debug, Clone, Copy, Error, PartialEq, Eq)]
pub enum Poisoned {
    #[error("fleet state poisoned")]
    Fleet,
    #[error("control state poisoned")]
    Control,
    #[error("rollout state poisoned")]
    Rollouts,
}

/// The handles every part of the relay shares; cheap to clone.
#[derive(Debug, Clone)]
pub struct RelayState {
    pub fleet: SharedFleet,
    pub control: SharedControl,
    pub stats: Arc<RelayStats>,
    /// Signs every config and rollout document the relay publishes.
    pub signer: Arc<Signer>,
    pub rollouts: SharedRollouts,
    /// Where rollouts' files are kept (and their state, without a fleet store; `None`: in
    /// memory only, for tests).
    pub state_dir: Option<std::path::PathBuf>,
    /// The fleet store's side (`None`: nothing survives a restart, for tests).
    pub persist: Option<Arc<Persist>>,
}

impl RelayState {
    pub fn new(fleet: Fleet, control: Control, signer: Signer) -> Self {
        RelayState {
            fleet: Arc::new(Mutex::new(fleet)),
            control: Arc::new(Mutex::new(control)),
            stats: Arc::new(RelayStats::default()),
            signer: Arc::new(signer),
            rollouts: Arc::new(Mutex::new(Rollouts::default())),
            state_dir: None,
            persist: None,
        }
    }

    /// Keeps what must survive in `persist`'s store.
    pub fn with_persist(mut self, persist: Arc<Persist>) -> Self {
        self.persist = Some(persist);
        self
    }

    /// Whether this replica files telemetry, tunes and pushes (always, without a store).
    pub fn is_writer(&self) -> bool {
        self.persist.as_ref().is_none_or(|p| p.is_writer())
    }

    /// Row `kind/key` changed: written with the next batch (no-op without a store).
    pub fn mark(&self, kind: Kind, key: &str) {
        if let Some(p) = &self.persist {
            p.mark(kind, key);
        }
    }

    /// Acknowledges a device's spool stream up to `upto`: at once without a store, else once
    /// the batch holding the record's effect is committed.
    pub fn ack(&self, client: &Publisher, device: &str, stream_id: u64, upto: u64) {
        match &self.persist {
            Some(p) => p.defer_ack(device, stream_id, upto),
            None => publish_ack(client, device, stream_id, upto),
        }
    }

    /// Writes what is dirty now (an operator's change is stored before it is published).
    async fn flush_now(&self) -> Result<(), crate::store::StoreError> {
        match &self.persist {
            Some(p) => p.flush(self).await.map(|_| ()),
            None => Ok(()),
        }
    }

    /// Rollouts restored from (and persisted to) `state_dir`.
    pub fn with_rollouts(mut self, rollouts: Rollouts, state_dir: std::path::PathBuf) -> Self {
        self.rollouts = Arc::new(Mutex::new(rollouts));
        self.state_dir = Some(state_dir);
        self
    }

    pub fn rollouts(&self) -> Result<MutexGuard<'_, Rollouts>, Poisoned> {
        self.rollouts.lock().map_err(|_| Poisoned::Rollouts)
    }

    /// Persists the rollouts (held locked by the caller) and publishes `docs`, signed. A state
    /// that cannot be saved is logged; the documents still go out (a device acting on them is
    /// what the relay decided).
    pub fn after_rollout_change(
        &self,
        client: &Publisher,
        rollouts: &Rollouts,
        docs: &[tierd_protocol::RolloutDocument],
    ) {
        if self.persist.is_some() {
            self.mark(Kind::Kv, persist::ROLLOUTS);
        } else if let Some(dir) = &self.state_dir {
            if let Err(e) = crate::rollout::store::save(dir, rollouts) {
                warn!(error = %e, "cannot persist the rollouts");
            }
        }
        for doc in docs {
            publish_rollout(client, &self.signer, doc);
        }
    }

    pub fn fleet(&self) -> Result<MutexGuard<'_, Fleet>, Poisoned> {
        self.fleet.lock().map_err(|_| Poisoned::Fleet)
    }

    pub fn control(&self) -> Result<MutexGuard<'_, Control>, Poisoned> {
        self.control.lock().map_err(|_| Poisoned::Control)
    }
}

/// Why an operator's config change was not published.
#[derive(Debug, Error)]
pub enum OperatorError {
    #[error(transparent)]
    Poisoned(#[from] Poisoned),
    #[error(transparent)]
    Set(#[from] SetError),
    #[error("cannot save the overrides in {}: {source}", .dir.display())]
    Save {
        dir: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot save the config epochs in {}: {source}", .dir.display())]
    SaveEpochs {
        dir: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("not stored, so not published: {0}")]
    Store(#[from] crate::store::StoreError),
}

impl RelayState {
    /// An operator's `key=value` changes (`value` empty unsets): applied all or nothing,
    /// persisted (fleet store, else `state_dir`), and the device's new document published.
    pub async fn operator_set(
        &self,
        client: &Publisher,
        state_dir: &Path,
        device: &str,
        pairs: &[(String, String)],
        now_ms: u64,
    ) -> Result<ConfigDocument, OperatorError> {
        let doc = {
            let mut c = self.control()?;
            let doc = c.set(device, pairs, now_ms)?;
            if self.persist.is_none() {
                control::save_overrides(state_dir, c.operator_overrides()).map_err(|source| {
                    OperatorError::Save {
                        dir: state_dir.to_owned(),
                        source,
                    }
                })?;
            }
            doc
        };
        self.mark(Kind::Kv, persist::OVERRIDES);
        self.mark(Kind::Control, device);
        self.flush_now().await?;
        self.publish_config(client, &doc);
        Ok(doc)
    }

    /// An operator's reset of a device's config (`cloud-relay config reset`): a new epoch,
    /// persisted (fleet store, else `state_dir`) before the document is published.
    pub async fn operator_reset(
        &self,
        client: &Publisher,
        state_dir: &Path,
        device: &str,
        now_ms: u64,
    ) -> Result<ConfigDocument, OperatorError> {
        let doc = {
            let mut c = self.control()?;
            let doc = c.reset(device, now_ms)?;
            if self.persist.is_none() {
                control::save_epochs(state_dir, c.epochs()).map_err(|source| {
                    OperatorError::SaveEpochs {
                        dir: state_dir.to_owned(),
                        source,
                    }
                })?;
            }
            doc
        };
        self.mark(Kind::Kv, persist::EPOCHS);
        self.mark(Kind::Control, device);
        self.flush_now().await?;
        self.publish_config(client, &doc);
        Ok(doc)
    }

    /// Publishes a device's config document, signed with the relay's key.
    pub fn publish_config(&self, client: &Publisher, doc: &ConfigDocument) {
        publish_config(client, &self.signer, doc);
    }
}

/// Publishes a device's rollout document, signed by `signer`, retained, QoS 1.
pub fn publish_rollout(client: &Publisher, signer: &Signer, doc: &tierd_protocol::RolloutDocument) {
    let topic = match Topic::new(&doc.device_id, TopicKind::Rollout) {
        Ok(t) => t.to_string(),
        Err(e) => {
            warn!(error = %e, "rollout document not published");
            return;
        }
    };
    let payload = signer.sign_bytes(&String::from_utf8_lossy(&doc.to_json()));
    if let Err(e) = client.try_publish(&topic, QoS::AtLeastOnce, true, payload) {
        warn!(device = %doc.device_id, error = %e, "cannot queue the rollout document");
    } else {
        tracing::info!(
            device = %doc.device_id,
            rollout = %doc.rollout_id,
            stage = doc.stage.as_str(),
            version = doc.version,
            "rollout document published"
        );
    }
}

/// Publishes a device's config document, signed by `signer`, retained, QoS 1.
pub fn publish_config(client: &Publisher, signer: &Signer, doc: &ConfigDocument) {
    let topic = match Topic::new(&doc.device_id, TopicKind::Config) {
        Ok(t) => t.to_string(),
        Err(e) => {
            warn!(error = %e, "config document not published");
            return;
        }
    };
    if let Err(e) = client.try_publish(&topic, QoS::AtLeastOnce, true, signer.sign(doc)) {
        warn!(device = %doc.device_id, error = %e, "cannot queue the config document");
    }
}

fn ack_message(device: &str, stream_id: u64, upto: u64) -> Option<(String, Vec<u8>)> {
    let topic = Topic {
        device_id: device.to_string(),
        kind: TopicKind::SpoolAck,
        model: None,
    }
    .to_string();
    encode(&SpoolAck { stream_id, upto })
        .ok()
        .map(|payload| (topic, payload))
}

/// Like [`publish_ack`], waiting for room in the link's queue until `deadline`.
pub async fn publish_ack_waiting(
    client: &Publisher,
    device: &str,
    stream_id: u64,
    upto: u64,
    deadline: tokio::time::Instant,
) {
    let Some((topic, payload)) = ack_message(device, stream_id, upto) else {
        return;
    };
    let queued = tokio::time::timeout_at(
        deadline,
        client.publish_with_properties(
            &topic,
            QoS::AtLeastOnce,
            false,
            payload,
            Default::default(),
        ),
    )
    .await;
    if !matches!(queued, Ok(Ok(()))) {
        warn!(%device, "cannot queue a spool ack; the agent will send again");
    }
}

/// Acknowledges a device's spool stream up to `upto` (cumulative) on its `ack` topic.
pub fn publish_ack(client: &Publisher, device: &str, stream_id: u64, upto: u64) {
    if let Some((topic, payload)) = ack_message(device, stream_id, upto) {
        if let Err(e) = client.try_publish(&topic, QoS::AtLeastOnce, false, payload) {
            warn!(error = %e, "cannot queue a spool ack; the agent will send again");
        }
    }
}
