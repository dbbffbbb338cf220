//! Intake: everything inbound that is not an escalation.
//!
//! - Spooled records (telemetry reports, calibration reports, config acks): delivered once and
//!   in order through the fleet's stream bookkeeping, acknowledged cumulatively on the device's
//!   `ack` topic. A calibration window may make the tuner's proposal worth a push.
//! - Device status (its own, or its last will published by the broker).
//! - Retained config documents seen on the broker, so versions continue from them.
//!
//! These subscriptions are not shared, but only the replica holding the fleet store's lease
//! (the writer, see `store`) files what arrives; the others drop it and follow the store.
//! Every record filed marks its rows for the next batch, and its ack waits for that batch.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use rumqttc::v5::mqttbytes::v5::{Filter, Publish};
use rumqttc::v5::mqttbytes::QoS;
use thiserror::Error;
use tierd_protocol::{
    decode, signed, CalibrationReport, ConfigAck, DeviceStatus, RecordKind, RolloutAck,
    RolloutPhase, ShadowReport, Spooled, TelemetryReport, Topic, TopicKind, WireError,
};
use tierd_runtime::link::{Publisher, Routes};
use tracing::{debug, info, warn};

use crate::fleet::{Delivery, FleetError, Ingest};
use crate::state::{Poisoned, RelayState};
use crate::store::Kind;

/// The topic kinds intake takes (each subscribed for all devices, not shared).
pub const TOPICS: [TopicKind; 4] = [
    TopicKind::Telemetry,
    TopicKind::Status,
    TopicKind::ConfigAck,
    TopicKind::Config,
];

/// What intake subscribes to: every device's [`TOPICS`], QoS 1.
pub fn subscriptions() -> Vec<Filter> {
    TOPICS
        .iter()
        .map(|&k| Filter::new(Topic::all_devices(k), QoS::AtLeastOnce))
        .collect()
}

/// Why an inbound record was not filed.
#[derive(Debug, Error)]
pub enum IntakeError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error(transparent)]
    Fleet(#[from] FleetError),
    #[error(transparent)]
    Poisoned(#[from] Poisoned),
    #[error("device {device}: {source}")]
    Status { device: String, source: WireError },
    #[error("shadow report from {device}: {why}")]
    Shadow { device: String, why: String },
}

impl IntakeError {
    /// Whether the record may be believed when sent again (a boot the device's status has
    /// not announced yet, or one from the future): such records are not acknowledged.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            IntakeError::Fleet(FleetError::UnannouncedBoot { .. } | FleetError::FutureBoot { .. })
        )
    }
}

/// Files what devices send besides escalations. `client` publishes spool acks and the config
/// documents the tuner's proposals call for.
pub struct Intake {
    state: RelayState,
    client: Publisher,
}

impl Intake {
    pub fn new(state: RelayState, client: Publisher) -> Self {
        Intake { state, client }
    }

    /// Routes every one of [`TOPICS`] to [`Intake::handle`], on the link's task (in arrival
    /// order, as exactly-once delivery wants).
    pub fn route(self, routes: &mut Routes) {
        let intake = Arc::new(self);
        for kind in TOPICS {
            let intake = intake.clone();
            routes.handler(
                kind,
                Arc::new(move |t: Topic, p: Publish| intake.handle(t, &p)),
            );
        }
    }

    /// Takes one message on one of [`TOPICS`].
    pub fn handle(&self, topic: Topic, publish: &Publish) {
        if !self.state.is_writer() {
            // Another replica files it; this one follows the store.
            return;
        }
        match topic.kind {
            TopicKind::Telemetry | TopicKind::ConfigAck => self.spooled(topic, publish),
            TopicKind::Status => self.status(topic, publish),
            TopicKind::Config => self.learn_config(topic, publish),
            _ => debug!(%topic, "not an intake topic; ignored"),
        }
    }

    fn rejected(&self) {
        self.state
            .stats
            .telemetry_rejected
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Takes a spooled record (telemetry, calibration or config ack): delivers it once, in
    /// order, and acknowledges cumulatively on the device's `ack` topic. A record of a boot
    /// not (yet) believed ([`IntakeError::retryable`]) is not acknowledged: it stays in the
    /// device's spool, which sends it again, so a forged one cannot make the device delete
    /// real reports. Any other rejected record (bad body, implausible evidence) is counted,
    /// logged with the reason and acknowledged, since sending it again cannot help and holding
    /// it would stall the spool.
    fn spooled(&self, topic: Topic, publish: &Publish) {
        let stats = &self.state.stats;
        let device = topic.device_id.clone();
        let envelope = match decode::<Spooled>(&publish.payload) {
            Ok(e) => e,
            Err(e) => {
                self.rejected();
                warn!(%device, error = %e, "spooled record rejected");
                return;
            }
        };
        let expected_topic = match envelope.kind {
            RecordKind::ConfigAck => TopicKind::ConfigAck,
            RecordKind::Telemetry
            | RecordKind::Calibration
            | RecordKind::RolloutAck
            | RecordKind::Shadow => TopicKind::Telemetry,
        };
        if topic.kind != expected_topic {
            self.rejected();
            warn!(%device, kind = ?envelope.kind, "spooled record on the wrong topic");
            return;
        }
        let accepted = self
            .state
            .fleet()
            .map_err(IntakeError::from)
            .and_then(|mut f| {
                Ok(f.accept(&device, envelope.stream_id, envelope.seq, envelope.floor)?)
            });
        let (delivery, ack) = match accepted {
            Ok(x) => x,
            Err(why) => {
                self.rejected();
                warn!(%device, %why, "spooled record rejected");
                return;
            }
        };
        let ack = match delivery {
            Delivery::Deliver => {
                let result = match envelope.kind {
                    RecordKind::Telemetry => self.report(&device, &envelope.body),
                    RecordKind::Calibration => self.calibration(&device, &envelope.body),
                    RecordKind::ConfigAck => self.config_ack(&device, &envelope.body),
                    RecordKind::RolloutAck => self.rollout_ack(&device, &envelope.body),
                    RecordKind::Shadow => self.shadow(&device, &envelope.body),
                };
                match result {
                    Ok(()) => {
                        stats.telemetry_accepted.fetch_add(1, Ordering::Relaxed);
                        self.state
                            .fleet()
                            .ok()
                            .and_then(|mut f| f.commit(&device, envelope.stream_id, envelope.seq))
                    }
                    Err(why) if why.retryable() => {
                        // Not acknowledged: the device keeps the record and sends it again
                        // (by then its status may have announced the boot); a forged record
                        // does not take a real one's place in the stream.
                        self.rejected();
                        warn!(
                            %device,
                            seq = envelope.seq,
                            %why,
                            "record rejected; not acknowledged, the device sends it again"
                        );
                        None
                    }
                    Err(why) => {
                        // Final: sending it again cannot change the verdict, and holding it
                        // would stall the device's spool behind it. Acknowledged, not filed.
                        self.rejected();
                        warn!(%device, seq = envelope.seq, %why, "record rejected");
                        self.state
                            .fleet()
                            .ok()
                            .and_then(|mut f| f.commit(&device, envelope.stream_id, envelope.seq))
                    }
                }
            }
            Delivery::Duplicate => {
                stats.duplicates.fetch_add(1, Ordering::Relaxed);
                debug!(%device, seq = envelope.seq, "duplicate record (resend); acknowledged again");
                ack
            }
            Delivery::Ahead => {
                debug!(%device, seq = envelope.seq, "record ahead of a missing one; waiting for the resend");
                ack
            }
        };
        // The stream moved (or was first seen): its position is stored with the next batch.
        self.state.mark(Kind::Device, &device);
        if let Some(upto) = ack {
            self.state
                .ack(&self.client, &device, envelope.stream_id, upto);
        }
    }

    fn report(&self, device: &str, body: &[u8]) -> Result<(), IntakeError> {
        let report = decode::<TelemetryReport>(body)?;
        let outcome = self
            .state
            .fleet()?
            .ingest(device, report, tierd_runtime::unix_ms())?;
        match outcome {
            Ingest::Gap { missing } => warn!(%device, missing, "telemetry reports missing"),
            Ingest::Restart => info!(%device, "device agent restarted"),
            Ingest::New => info!(%device, "first telemetry from device"),
            _ => debug!(%device, ?outcome, "telemetry"),
        }
        Ok(())
    }

    /// Files a calibration window, and pushes a new config document if the tuner's proposal
    /// is worth it.
    fn calibration(&self, device: &str, body: &[u8]) -> Result<(), IntakeError> {
        let c = decode::<CalibrationReport>(body)?;
        let model = crate::fleet::model_name(&c.model).to_string();
        let configured = self.state.control()?.audit_rate_in_force(device, &model);
        let proposal = {
            let mut fleet = self.state.fleet()?;
            fleet.ingest_calibration(device, c, configured)?;
            crate::dashboard::calibration_filed(
                &mut fleet,
                device,
                &model,
                tierd_runtime::unix_ms(),
            );
            fleet.proposal(device, Some(&model))
        };
        self.state.mark(Kind::Evidence, device);
        let Some(proposal) = proposal else {
            return Ok(());
        };
        let doc = self
            .state
            .control()?
            .on_proposal(device, &proposal, tierd_runtime::unix_ms());
        if let Some(doc) = doc {
            self.state.mark(Kind::Control, device);
            info!(
                %device,
                %model,
                version = doc.version,
                threshold = proposal.in_force.threshold,
                basis = ?proposal.in_force.basis,
                why = %proposal.in_force.why,
                "pushing a tuned threshold"
            );
            self.state.publish_config(&self.client, &doc);
            crate::dashboard::push_published(
                &self.state,
                device,
                &proposal,
                tierd_runtime::unix_ms(),
            );
        }
        Ok(())
    }

    fn config_ack(&self, device: &str, body: &[u8]) -> Result<(), IntakeError> {
        let ack = decode::<ConfigAck>(body)?;
        if ack.applied {
            info!(%device, version = ack.version, "config applied by device");
        } else {
            warn!(%device, version = ack.version, reason = %ack.reason, "config rejected by device");
        }
        self.state
            .control()?
            .record_ack(device, ack, tierd_runtime::unix_ms());
        self.state.mark(Kind::Control, device);
        Ok(())
    }

    /// A device's rollout ack: recorded; a failure halts the rollout, a promotion may start
    /// the next wave.
    fn rollout_ack(&self, device: &str, body: &[u8]) -> Result<(), IntakeError> {
        let ack = decode::<RolloutAck>(body)?;
        match ack.phase {
            RolloutPhase::Failed => {
                warn!(%device, rollout = %ack.rollout_id, version = ack.version, reason = %ack.reason, "rollout step failed on the device")
            }
            phase => {
                info!(%device, rollout = %ack.rollout_id, version = ack.version, ?phase, serving = %ack.serving, "rollout step")
            }
        }
        let mut r = self.state.rollouts()?;
        let docs = r.on_ack(device, &ack, tierd_runtime::unix_ms());
        self.state.after_rollout_change(&self.client, &r, &docs);
        Ok(())
    }

    /// A device's shadow evidence: added to its rollout, which may decide.
    fn shadow(&self, device: &str, body: &[u8]) -> Result<(), IntakeError> {
        let report = decode::<ShadowReport>(body)?;
        if report.device_id != device {
            return Err(IntakeError::Shadow {
                device: device.to_string(),
                why: format!("it claims device {:?}", report.device_id),
            });
        }
        let mut r = self.state.rollouts()?;
        let docs = r
            .on_shadow(device, &report, tierd_runtime::unix_ms())
            .map_err(|why| IntakeError::Shadow {
                device: device.to_string(),
                why,
            })?;
        self.state.after_rollout_change(&self.client, &r, &docs);
        Ok(())
    }

    /// A retained config document seen on the broker (ours, another replica's, or from before
    /// a restart): versions continue from it. Only documents signed with this relay's own key
    /// are learned; anything else (unsigned, another key, a bad signature: anyone on the
    /// broker may publish there) is ignored, counted and logged, so a forged version cannot
    /// move the relay's version line.
    fn learn_config(&self, topic: Topic, publish: &Publish) {
        if publish.payload.is_empty() {
            return;
        }
        let own = std::slice::from_ref(self.state.signer.public());
        match signed::verify(&publish.payload, own) {
            Ok(doc) if doc.device_id == topic.device_id => {
                if let Ok(mut c) = self.state.control() {
                    c.learn_published(doc);
                }
                self.state.mark(Kind::Control, &topic.device_id);
                self.state.mark(Kind::Kv, crate::store::persist::EPOCHS);
            }
            Ok(doc) => {
                self.unverified();
                warn!(device = %topic.device_id, doc_device = %doc.device_id, "signed config document for another device on this topic ignored")
            }
            Err(e) => {
                self.unverified();
                warn!(device = %topic.device_id, error = %e, "config document on the broker not signed by this relay's key; ignored")
            }
        }
    }

    fn unverified(&self) {
        self.state
            .stats
            .config_unverified
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Files a device's online/offline status (its own, or its last will published by the
    /// broker).
    fn status(&self, topic: Topic, publish: &Publish) {
        match self.file_status(topic, publish) {
            Ok((device, online, reason, collision)) => {
                info!(%device, online, %reason, "device status");
                if let Some(c) = collision {
                    self.state
                        .stats
                        .id_collisions
                        .fetch_add(1, Ordering::Relaxed);
                    warn!(
                        %device,
                        machine = %c.known,
                        other_machine = %c.other,
                        collisions = c.collisions,
                        "two machines claim device id {device:?} at once (boards cloned from one \
                         image?): give each its own device_id (agent.toml, $TIERD_DEVICE_ID or \
                         the hostname); their telemetry and config are mixed until then"
                    );
                }
                if online {
                    self.resend_rollout(&device);
                }
            }
            Err(why) => {
                self.rejected();
                warn!(%why, "status rejected");
            }
        }
    }

    /// A device came online: its last rollout document again (it may have missed it).
    fn resend_rollout(&self, device: &str) {
        let Ok(r) = self.state.rollouts() else {
            return;
        };
        if let Some(doc) = r.document_for(device) {
            self.state.after_rollout_change(&self.client, &r, &[doc]);
        }
    }

    fn file_status(
        &self,
        topic: Topic,
        publish: &Publish,
    ) -> Result<(String, bool, String, Option<crate::fleet::IdCollision>), IntakeError> {
        let status =
            decode::<DeviceStatus>(&publish.payload).map_err(|source| IntakeError::Status {
                device: topic.device_id.clone(),
                source,
            })?;
        let online = status.online;
        let reason = status.reason.clone();
        let collision =
            self.state
                .fleet()?
                .set_status(&topic.device_id, status, tierd_runtime::unix_ms())?;
        self.state.mark(Kind::Device, &topic.device_id);
        Ok((topic.device_id, online, reason, collision))
    }
}
