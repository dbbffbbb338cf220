//! Escalation over MQTT: publish an unsure request to the relay and wait, bounded in time and in
//! number, for the reply with the same correlation id.
//!
//! The MQTT connection itself belongs to the link ([`crate::link`]); this module is only the
//! request/reply matching. Replies reach waiting callers through a map of one-shot channels
//! keyed by request id, filled by [`Replies::deliver`], which the link calls on its own task (no
//! extra hop). The caller's deadline, not MQTT, guarantees progress: a lost request or reply
//! only ever costs the timeout, and while the broker is unreachable callers fall back at once
//! instead of waiting.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{Publish, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use tierd_protocol::{
    decode, encode, EscalationKind, EscalationReply, EscalationRequest, ReplyOutcome, Tensor,
    Topic, TopicError, TopicKind,
};
use tierd_runtime::link::Publisher;
use tokio::sync::{oneshot, Semaphore};
use tracing::{debug, warn};

use crate::cascade::{CloudResult, FallbackReason};

/// Counters shared with the rest of the agent (telemetry and `/metrics` read them).
#[derive(Debug, Default)]
pub struct MqttStats {
    pub bytes_out: AtomicU64,
    pub bytes_in: AtomicU64,
    pub messages_out: AtomicU64,
    pub messages_in: AtomicU64,
    /// Replies that arrived after their caller had already been answered.
    pub late_replies: AtomicU64,
    /// Replies that failed to decode.
    pub rejected: AtomicU64,
}

/// The cloud path as the cascade sees it: send one request, get the cloud's probabilities or
/// the reason there are none. [`Escalator`] is the MQTT implementation; tests use fakes.
pub trait Escalate: Send + Sync + 'static {
    fn ask(
        &self,
        kind: EscalationKind,
        input: Tensor,
        edge_model: String,
        edge_probabilities: Vec<f32>,
        timeout: Duration,
    ) -> impl Future<Output = CloudResult> + Send;
}

type Pending = Mutex<HashMap<u64, oneshot::Sender<EscalationReply>>>;

/// Replies waiting for their callers; the link hands every reply publish to [`Replies::deliver`].
#[derive(Default)]
pub struct Replies {
    pending: Pending,
    stats: Arc<MqttStats>,
}

impl Replies {
    pub fn new() -> Arc<Self> {
        Arc::new(Replies::default())
    }

    pub fn stats(&self) -> &Arc<MqttStats> {
        &self.stats
    }

    /// Matches a reply to its waiting caller by request id.
    pub fn deliver(&self, publish: &Publish) {
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

/// Handle used by the cascade to escalate. Cheap to clone.
#[derive(Clone)]
pub struct Escalator {
    publisher: Publisher,
    request_topic: Arc<str>,
    reply_topic: Arc<str>,
    replies: Arc<Replies>,
    in_flight: Arc<Semaphore>,
    next_id: Arc<AtomicU64>,
}

impl Escalator {
    pub fn new(
        publisher: Publisher,
        replies: Arc<Replies>,
        device_id: &str,
        edge_model: &str,
        max_in_flight: usize,
    ) -> Result<Self, tierd_protocol::TopicError> {
        // Request ids start from the clock so a restarted agent never matches an old reply.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(1);
        Ok(Escalator {
            publisher,
            request_topic: Topic::escalate(device_id, edge_model)?.to_string().into(),
            reply_topic: Topic::new(device_id, TopicKind::EscalateReply)?
                .to_string()
                .into(),
            replies,
            in_flight: Arc::new(Semaphore::new(max_in_flight)),
            next_id: Arc::new(AtomicU64::new(seed)),
        })
    }

    pub fn stats(&self) -> &Arc<MqttStats> {
        self.replies.stats()
    }

    /// Whether the MQTT session is up with its subscriptions confirmed (escalations possible).
    pub fn is_connected(&self) -> bool {
        self.publisher.is_connected()
    }

    /// The same link, replies and in-flight bound, escalating for edge model `edge_model` on
    /// its own topic (`tierd/v1/{device}/escalate/{edge_model}`): a further model the agent
    /// serves reaches only the relay pool that serves it.
    pub fn for_model(&self, device_id: &str, edge_model: &str) -> Result<Self, TopicError> {
        Ok(Escalator {
            request_topic: Topic::escalate(device_id, edge_model)?.to_string().into(),
            ..self.clone()
        })
    }
}

impl Escalate for Escalator {
    /// Sends `input` to the relay and waits at most `timeout` for its answer. An
    /// [`EscalationKind::Audit`] is the same round trip for a request already answered locally,
    /// marked as such on the wire; both share the in-flight bound.
    async fn ask(
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
        let pending = &self.replies.pending;
        match pending.lock() {
            Ok(mut map) => map.insert(request_id, tx),
            Err(_) => return Err(FallbackReason::PublishFailed),
        };
        let _guard = PendingGuard {
            pending,
            id: request_id,
        };
        let props = PublishProperties {
            response_topic: Some(self.reply_topic.to_string()),
            correlation_data: Some(Bytes::copy_from_slice(&request_id.to_be_bytes())),
            ..Default::default()
        };
        let len = payload.len() as u64;
        let stats = self.stats();
        let mut connection = self.publisher.connection();
        let wait = async {
            // QoS 0: see the topic table in tierd-protocol for why escalations are not QoS 1.
            self.publisher
                .publish_with_properties(
                    &self.request_topic,
                    QoS::AtMostOnce,
                    false,
                    payload,
                    props,
                )
                .await
                .map_err(|_| FallbackReason::PublishFailed)?;
            stats.bytes_out.fetch_add(len, Ordering::Relaxed);
            stats.messages_out.fetch_add(1, Ordering::Relaxed);
            // A reply cannot come over a connection that is gone: fall back at once.
            tokio::select! {
                r = rx => r.map_err(|_| FallbackReason::Disconnected),
                _ = connection.wait_for(|up| !*up) => Err(FallbackReason::Disconnected),
            }
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
}
