//! The agent's MQTT link: which topics it subscribes, where each inbound kind goes, and the
//! device status it leaves on the broker (online on connect, "stopped" on a clean stop,
//! "connection lost" as the last will). The connection itself is [`tierd_runtime::link`].
//!
//! | topic (`tierd/v1/{device}/…`) | QoS | goes to |
//! |---|---|---|
//! | `reply` | 0 | [`Replies::deliver`] on the link's task (no hop: latency) |
//! | `config` | 1 | [`AgentLink::config`] → the remote-config task |
//! | `ack` | 1 | [`AgentLink::acks`] → the spool forwarder |

use std::sync::Arc;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{Filter, LastWill, Publish};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::MqttOptions;
use tierd_protocol::{
    encode, DeviceStatus, ModelCalibration, ServedModel, Topic, TopicError, TopicKind,
};
use tierd_runtime::link::{Link, LinkOptions, Message, Publisher, Routes};
use tokio::sync::mpsc;

use crate::escalation::{Escalator, Replies};

/// How long the broker keeps the agent's session (subscriptions, queued QoS 1 messages such as
/// config documents and spool acks) while it is offline: a day covers an overnight outage;
/// after that the retained config document still reaches it at the next subscribe.
pub const SESSION_EXPIRY_S: u32 = 86_400;

/// The encoded `DeviceStatus` for the status topic and the last will.
pub fn status_payload(
    online: bool,
    boot_id: u64,
    reason: &str,
    model: Option<ModelCalibration>,
    models: Vec<ServedModel>,
    machine: Option<&str>,
) -> Vec<u8> {
    encode(&DeviceStatus {
        online,
        boot_id,
        reason: reason.to_string(),
        model,
        models,
        machine: machine.map(str::to_owned),
    })
    .unwrap_or_default()
}

/// The model's offline certificate as the status announces it (the relay re-derives it).
pub fn model_calibration(m: &tierd_runtime::Manifest) -> Option<ModelCalibration> {
    let c = m.calibration.as_ref()?;
    Some(ModelCalibration {
        model: m.id(),
        threshold: c.threshold,
        target: c.target,
        delta: c.delta,
        samples: c.samples,
        disagreements: c.disagreements,
        agreement_lower_bound: c.agreement_lower_bound,
        escalation_rate: c.escalation_rate,
        reference: c.reference.clone(),
    })
}

/// The started link and what it feeds.
pub struct AgentLink {
    pub link: Link,
    pub escalator: Escalator,
    /// Remote config documents (retained; one per change).
    pub config: mpsc::Receiver<Publish>,
    /// Cumulative spool acknowledgements from the relay.
    pub acks: mpsc::Receiver<Publish>,
    /// Rollout documents (retained; one per stage change).
    pub rollout: mpsc::Receiver<Publish>,
    /// Chunks of a model being fetched.
    pub chunks: mpsc::Receiver<Publish>,
    /// Re-announces the status when the models served change.
    pub announcer: Announcer,
}

/// Publishes the online status again with other models, and makes it the one every later
/// connect publishes.
#[derive(Clone)]
pub struct Announcer {
    on_connect: tierd_runtime::link::OnConnect,
    publisher: Publisher,
    topic: String,
    boot_id: u64,
    machine: Option<String>,
}

impl Announcer {
    pub fn announce(&self, model: Option<ModelCalibration>, models: Vec<ServedModel>) {
        let m = Message {
            topic: self.topic.clone(),
            qos: QoS::AtLeastOnce,
            retain: true,
            payload: Bytes::from(status_payload(
                true,
                self.boot_id,
                "",
                model,
                models,
                self.machine.as_deref(),
            )),
        };
        if let Ok(mut slot) = self.on_connect.lock() {
            *slot = vec![m.clone()];
        }
        if let Err(e) = self
            .publisher
            .try_publish(&m.topic, m.qos, m.retain, m.payload)
        {
            tracing::warn!(error = %e, "cannot queue the status; the next connect publishes it");
        }
    }
}

impl AgentLink {
    pub fn publisher(&self) -> Publisher {
        self.link.publisher()
    }
}

/// Opens the agent's link (it connects in the background); escalations for `edge_model` go
/// to its own topic (`tierd/v1/{device}/escalate/{edge_model}`). The online status announces
/// `model` (the primary's offline certificate) and the further `models`; every status names
/// the `machine` (see [`crate::identity`]).
#[allow(clippy::too_many_arguments)]
pub fn start(
    mut options: MqttOptions,
    device_id: &str,
    edge_model: &str,
    max_in_flight: usize,
    boot_id: u64,
    model: Option<ModelCalibration>,
    models: Vec<ServedModel>,
    machine: Option<String>,
) -> Result<AgentLink, TopicError> {
    let topic = |kind| Topic::new(device_id, kind).map(|t| t.to_string());
    let status_topic = topic(TopicKind::Status)?;
    // A persistent session: QoS 1 messages for us (config documents, spool acks) queue at the
    // broker while we are away, and rumqttc re-sends our unacknowledged publishes after a
    // reconnect instead of dropping them.
    options.set_clean_start(false);
    options.set_session_expiry_interval(Some(SESSION_EXPIRY_S));
    // The broker publishes this, retained, if the connection dies without a clean DISCONNECT;
    // a clean stop publishes its own "stopped" status instead.
    options.set_last_will(LastWill::new(
        status_topic.clone(),
        status_payload(
            false,
            boot_id,
            "connection lost",
            None,
            Vec::new(),
            machine.as_deref(),
        ),
        QoS::AtLeastOnce,
        true,
        None,
    ));
    let replies = Replies::new();
    let mut routes = Routes::new();
    let r = replies.clone();
    routes.handler(
        TopicKind::EscalateReply,
        Arc::new(move |_topic, p: Publish| r.deliver(&p)),
    );
    // Documents are rare (retained, one per change) and acks are cumulative, so a full channel
    // only ever drops something a later message supersedes.
    let config = routes.channel(TopicKind::Config, 8);
    let acks = routes.channel(TopicKind::SpoolAck, 64);
    let rollout = routes.channel(TopicKind::Rollout, 8);
    // The fetcher keeps a few chunk requests in flight; late or surplus chunks are asked again.
    let chunks = routes.channel(TopicKind::ModelChunk, 32);
    let status = |online, reason| Message {
        topic: status_topic.clone(),
        qos: QoS::AtLeastOnce,
        retain: true,
        payload: Bytes::from(status_payload(
            online,
            boot_id,
            reason,
            online.then(|| model.clone()).flatten(),
            if online { models.clone() } else { Vec::new() },
            machine.as_deref(),
        )),
    };
    // The request queue only buffers our own publishes; in-flight escalations are bounded by the
    // escalator's semaphore and spooled records by the forwarder's window.
    let on_connect = tierd_runtime::link::on_connect(vec![status(true, "")]);
    let link = Link::open(options, max_in_flight.clamp(16, 4096) + 64).start(LinkOptions {
        subscriptions: vec![
            Filter::new(topic(TopicKind::EscalateReply)?, QoS::AtMostOnce),
            Filter::new(topic(TopicKind::Config)?, QoS::AtLeastOnce),
            Filter::new(topic(TopicKind::SpoolAck)?, QoS::AtLeastOnce),
            Filter::new(topic(TopicKind::Rollout)?, QoS::AtLeastOnce),
            Filter::new(topic(TopicKind::ModelChunk)?, QoS::AtMostOnce),
        ],
        routes,
        on_connect: on_connect.clone(),
        on_stop: vec![status(false, "stopped")],
        ready_line: "connected to MQTT broker",
        lost_line: "MQTT connection lost; escalations fall back to the edge until it returns",
    });
    let escalator = Escalator::new(
        link.publisher(),
        replies,
        device_id,
        edge_model,
        max_in_flight,
    )?;
    // The systemd STATUS= line follows the connection.
    let mut connection = link.publisher().connection();
    tokio::spawn(async move {
        while connection.changed().await.is_ok() {
            let up = *connection.borrow_and_update();
            tierd_runtime::systemd::status(if up {
                "serving; connected to the MQTT broker"
            } else {
                "serving from the edge only: MQTT connection lost, reconnecting"
            });
        }
    });
    let announcer = Announcer {
        on_connect,
        publisher: link.publisher(),
        topic: status_topic.clone(),
        boot_id,
        machine,
    };
    Ok(AgentLink {
        link,
        escalator,
        config,
        acks,
        rollout,
        chunks,
        announcer,
    })
}
