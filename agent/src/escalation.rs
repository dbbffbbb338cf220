//! Escalation over MQTT: publish an unsure request to the relay and wait, bounded in time and in
//! number, for the reply with the same correlation id.
//!
//! One task owns the rumqttc event loop; callers hold a cheap [`Escalator`] handle. Replies are
//! routed to waiting callers through a map of one-shot channels keyed by request id; config
//! documents and spool acks go to their own bounded channels ([`Inbound`]). The caller's
//! deadline, not MQTT, guarantees progress: a lost request or reply only ever costs the timeout,
//! and while the broker is unreachable callers fall back at once instead of waiting.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{Filter, Packet, Publish, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use tierd_protocol::{
    decode, encode, DeviceStatus, EscalationKind, EscalationReply, EscalationRequest, ReplyOutcome,
    SpoolAck, Tensor, Topic, TopicKind,
};
use tierd_runtime::mqtt::Backoff;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tracing::{debug, info, warn};

use crate::cascade::{CloudResult, FallbackReason};

/// Counters shared with the rest of the agent (telemetry reads them).
#[derive(Debug, Default)]
pub struct MqttStats {
    pub bytes_out: AtomicU64,
    pub bytes_in: AtomicU64,
    pub messages_out: AtomicU64,
    pub messages_in: AtomicU64,
    /// Replies that arrived after their caller had already been answered.
    pub late_replies: AtomicU64,
    /// Payloads on our topics that failed to decode or validate.
    pub rejected: AtomicU64,
    pub reconnects: AtomicU64,
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<EscalationReply>>>>;

/// Handle used by request handlers to escalate.
#[derive(Clone)]
pub struct Escalator {
    client: AsyncClient,
    request_topic: String,
    reply_topic: String,
    status_topic: String,
    config_topic: String,
    ack_topic: String,
    boot_id: u64,
    pending: Pending,
    in_flight: Arc<Semaphore>,
    connected: Arc<AtomicBool>,
    connection: Arc<watch::Sender<bool>>,
    routes: Arc<Routes>,
    next_id: Arc<AtomicU64>,
    stats: Arc<MqttStats>,
}

/// Where the event loop hands what is not an escalation reply.
struct Routes {
    config: mpsc::Sender<Bytes>,
    acks: mpsc::Sender<SpoolAck>,
}

/// The receiving ends of [`Routes`]: remote config documents and spool acknowledgements.
pub struct Inbound {
    pub config: mpsc::Receiver<Bytes>,
    pub acks: mpsc::Receiver<SpoolAck>,
}

/// Removes a pending entry however the wait ends (reply, timeout, or the caller going away).
struct PendingGuard<'a> {
    pending: &'a Pending,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut map) = self.pending.lock() {
            map.remove(&self.id);
        }
    }
}

impl Escalator {
    /// Creates the client and the event loop. The loop does nothing until [`run_event_loop`] runs.
    pub fn new(
        options: MqttOptions,
        device_id: &str,
        max_in_flight: usize,
        boot_id: u64,
    ) -> Result<(Self, EventLoop, Inbound), tierd_protocol::TopicError> {
        // The request channel only buffers our own publishes; in-flight escalations are bounded
        // by the semaphore below and spooled records by the forwarder's window.
        let (client, eventloop) = AsyncClient::new(options, max_in_flight.clamp(16, 4096) + 64);
        // Documents are rare (retained, one per change) and acks are cumulative, so a full
        // channel only ever drops something a later message supersedes.
        let (config_tx, config_rx) = mpsc::channel(8);
        let (acks_tx, acks_rx) = mpsc::channel(64);
        // Request ids start from the clock so a restarted agent never matches an old reply.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(1);
        Ok((
            Escalator {
                client,
                request_topic: Topic::new(device_id, TopicKind::Escalate)?.to_string(),
                reply_topic: Topic::new(device_id, TopicKind::EscalateReply)?.to_string(),
                status_topic: Topic::new(device_id, TopicKind::Status)?.to_string(),
                config_topic: Topic::new(device_id, TopicKind::Config)?.to_string(),
                ack_topic: Topic::new(device_id, TopicKind::SpoolAck)?.to_string(),
                boot_id,
                pending: Arc::new(Mutex::new(HashMap::new())),
                in_flight: Arc::new(Semaphore::new(max_in_flight)),
                connected: Arc::new(AtomicBool::new(false)),
                connection: Arc::new(watch::channel(false).0),
                routes: Arc::new(Routes {
                    config: config_tx,
                    acks: acks_tx,
                }),
                next_id: Arc::new(AtomicU64::new(seed)),
                stats: Arc::new(MqttStats::default()),
            },
            eventloop,
            Inbound {
                config: config_rx,
                acks: acks_rx,
            },
        ))
    }

    /// The MQTT client, for the spool forwarder's publishes.
    pub fn client(&self) -> AsyncClient {
        self.client.clone()
    }

    /// Follows the connection: true once subscribed after a (re)connect, false when lost.
    pub fn connection(&self) -> watch::Receiver<bool> {
        self.connection.subscribe()
    }

    fn set_connected(&self, up: bool) -> bool {
        let was = self.connected.swap(up, Ordering::Relaxed);
        self.connection.send_replace(up);
        was
    }

    pub fn stats(&self) -> &Arc<MqttStats> {
        &self.stats
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Sends `input` to the relay and waits at most `timeout` for its answer. An
    /// [`EscalationKind::Audit`] is the same round trip for a request already answered locally,
    /// marked as such on the wire; both share the in-flight bound.
    pub async fn ask(
        &self,
        kind: EscalationKind,
        input: Tensor,
        edge_model: String,
        edge_probabilities: Vec<f32>,
        timeout: Duration,
    ) -> CloudResult {
        let Ok(_permit) = self.in_flight.try_acquire() else {
            return Err(FallbackReason::Overload);
        };
        if !self.is_connected() {
            return Err(FallbackReason::Disconnected);
        }
        let request_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let request = EscalationRequest {
            request_id,
            kind,
            edge_model,
            deadline_ms: timeout.as_millis().min(u128::from(u32::MAX)) as u32,
            input,
            edge_probabilities,
        };
        let payload = match encode(&request) {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e, "cannot encode escalation");
                return Err(FallbackReason::PublishFailed);
            }
        };
        let (tx, rx) = oneshot::channel();
        match self.pending.lock() {
            Ok(mut map) => map.insert(request_id, tx),
            Err(_) => return Err(FallbackReason::PublishFailed),
        };
        let _guard = PendingGuard {
            pending: &self.pending,
            id: request_id,
        };
        let props = PublishProperties {
            response_topic: Some(self.reply_topic.clone()),
            correlation_data: Some(Bytes::copy_from_slice(&request_id.to_be_bytes())),
            ..Default::default()
        };
        let len = payload.len() as u64;
        let wait = async {
            // QoS 0: see the topic table in tierd-protocol for why escalations are not QoS 1.
            self.client
                .publish_with_properties(
                    &self.request_topic,
                    QoS::AtMostOnce,
                    false,
                    payload,
                    props,
                )
                .await
                .map_err(|_| FallbackReason::PublishFailed)?;
            self.stats.bytes_out.fetch_add(len, Ordering::Relaxed);
            self.stats.messages_out.fetch_add(1, Ordering::Relaxed);
            rx.await.map_err(|_| FallbackReason::Disconnected)
        };
        let reply = tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| FallbackReason::Timeout)??;
        match reply.outcome {
            ReplyOutcome::Answer { probabilities, .. } => Ok(probabilities),
            ReplyOutcome::Error { code, message } => {
                debug!(request_id, ?code, %message, "relay answered with an error");
                Err(FallbackReason::RelayError(code))
            }
        }
    }

    /// Dispatches an incoming publish on the topic it came on.
    fn route(&self, publish: &Publish) {
        let topic = publish.topic.as_ref();
        if topic == self.reply_topic.as_bytes() {
            self.route_reply(publish);
        } else if topic == self.config_topic.as_bytes() {
            // An empty retained message is how an operator clears the topic: nothing to apply.
            if !publish.payload.is_empty()
                && self
                    .routes
                    .config
                    .try_send(publish.payload.clone())
                    .is_err()
            {
                warn!("config documents arriving faster than they are applied; one dropped");
            }
        } else if topic == self.ack_topic.as_bytes() {
            match decode::<SpoolAck>(&publish.payload) {
                Ok(ack) => {
                    let _ = self.routes.acks.try_send(ack);
                }
                Err(e) => {
                    self.stats.rejected.fetch_add(1, Ordering::Relaxed);
                    warn!(error = %e, "rejected spool ack");
                }
            }
        } else {
            self.stats.rejected.fetch_add(1, Ordering::Relaxed);
            warn!(topic = %String::from_utf8_lossy(topic).chars().take(200).collect::<String>(), "message on an unexpected topic ignored");
        }
    }

    fn route_reply(&self, publish: &Publish) {
        let stats = &self.stats;
        stats.messages_in.fetch_add(1, Ordering::Relaxed);
        stats
            .bytes_in
            .fetch_add(publish.payload.len() as u64, Ordering::Relaxed);
        let reply = match decode::<EscalationReply>(&publish.payload) {
            Ok(r) => r,
            Err(e) => {
                stats.rejected.fetch_add(1, Ordering::Relaxed);
                warn!(error = %e, "rejected reply");
                return;
            }
        };
        let waiter = self
            .pending
            .lock()
            .ok()
            .and_then(|mut map| map.remove(&reply.request_id));
        match waiter {
            Some(tx) => {
                let _ = tx.send(reply);
            }
            None => {
                stats.late_replies.fetch_add(1, Ordering::Relaxed);
                debug!(
                    request_id = reply.request_id,
                    "reply for no waiting request (late or duplicate)"
                );
            }
        }
    }

    /// Wakes every waiter with "disconnected" so nobody waits for a reply that cannot come.
    fn fail_all_pending(&self) {
        if let Ok(mut map) = self.pending.lock() {
            map.clear();
        }
    }
}

/// The encoded `DeviceStatus` for the status topic and the last will.
pub fn status_payload(online: bool, boot_id: u64, reason: &str) -> Vec<u8> {
    encode(&DeviceStatus {
        online,
        boot_id,
        reason: reason.to_string(),
    })
    .unwrap_or_default()
}

impl Escalator {
    /// Publishes the retained status (online after connecting, offline on a clean stop).
    fn publish_status(&self, online: bool, reason: &str) {
        let payload = status_payload(online, self.boot_id, reason);
        if let Err(e) = self
            .client
            .try_publish(&self.status_topic, QoS::AtLeastOnce, true, payload)
        {
            warn!(error = %e, "cannot queue the status message");
        }
    }
}

/// Drives the MQTT connection until `shutdown` resolves: subscribes on every (re)connect, routes
/// replies, and reconnects with jittered backoff.
pub async fn run_event_loop(
    escalator: Escalator,
    mut eventloop: EventLoop,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let mut was_connected = false;
    loop {
        let event = tokio::select! {
            _ = shutdown.changed() => break,
            ev = eventloop.poll() => ev,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff.reset();
                // Subscribe after every connect, even with a persistent session: a broker
                // that lost the session (restarted rumqttd, expiry) no longer has them, and
                // subscribing again also makes it send the retained config document.
                let filters = [
                    Filter::new(escalator.reply_topic.clone(), QoS::AtMostOnce),
                    Filter::new(escalator.config_topic.clone(), QoS::AtLeastOnce),
                    Filter::new(escalator.ack_topic.clone(), QoS::AtLeastOnce),
                ];
                if let Err(e) = escalator.client.try_subscribe_many(filters) {
                    warn!(error = %e, "cannot queue subscription");
                }
            }
            // Escalate only once the reply subscription is confirmed: before that a reply
            // could be dropped by the broker and the caller would wait out the timeout.
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                escalator.set_connected(true);
                if was_connected {
                    escalator.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                }
                was_connected = true;
                info!("connected to MQTT broker");
                escalator.publish_status(true, "");
                tierd_runtime::systemd::status("serving; connected to the MQTT broker");
            }
            Ok(Event::Incoming(Packet::Publish(p))) => escalator.route(&p),
            Ok(_) => {}
            Err(e) => {
                if escalator.set_connected(false) {
                    warn!(error = %e, "MQTT connection lost; escalations fall back to the edge until it returns");
                    tierd_runtime::systemd::status(
                        "serving from the edge only: MQTT connection lost, reconnecting",
                    );
                } else {
                    debug!(error = %e, "MQTT connect failed");
                }
                escalator.fail_all_pending();
                let delay = backoff.next_delay();
                tokio::select! {
                    _ = shutdown.changed() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
    // Queued before the DISCONNECT, so a clean stop leaves "stopped" retained (a clean
    // DISCONNECT also tells the broker not to publish the will).
    if escalator.set_connected(false) {
        escalator.publish_status(false, "stopped");
    }
    tierd_runtime::mqtt::disconnect(&escalator.client, &mut eventloop).await;
}
