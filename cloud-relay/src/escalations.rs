//! Answering escalations: take requests from the shared subscription, run the cloud model, reply
//! to the requesting device.
//!
//! One task owns the MQTT event loop and hands each escalation to a bounded queue; a fixed pool
//! of workers answers them. A full queue is answered with `Overloaded` instead of growing
//! memory. Every reject is logged with the device id and counted; nothing a client sends can
//! stop the loop. Everything else that arrives (telemetry, status, config acks and documents)
//! goes to [`intake`](crate::intake).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::Filter;
use rumqttc::v5::mqttbytes::v5::{Publish, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use thiserror::Error;
use tierd_protocol::{
    decode, encode, EscalationReply, EscalationRequest, ReplyErrorCode, ReplyOutcome, Topic,
    TopicError, TopicKind,
};

use crate::backend::Backend;
use crate::state::{RelayState, RelayStats};
use tierd_runtime::link::{Publisher, Routes};
use tokio::sync::{mpsc, Mutex};
use tracing::{debug, warn};

/// Decides the reply to one decoded request that arrived on the escalation topic of edge model
/// `topic_model`: refused when the request is from another edge model than its topic says, or
/// from one the relay does not serve; else the backend's answer.
pub async fn answer(
    backend: &Backend,
    serves: &[String],
    topic_model: &str,
    req: &EscalationRequest,
) -> ReplyOutcome {
    let edge_name = req.edge_model.split('@').next().unwrap_or_default();
    if edge_name != topic_model {
        return ReplyOutcome::Error {
            code: ReplyErrorCode::BadRequest,
            message: format!(
                "the topic is for edge model {topic_model:?} but the request is from {:?}",
                req.edge_model
            ),
        };
    }
    if !serves.is_empty() && !serves.iter().any(|s| s == edge_name) {
        return ReplyOutcome::Error {
            code: ReplyErrorCode::UnknownModel,
            message: format!(
                "this relay answers for {serves:?}, not edge model {:?}",
                req.edge_model
            ),
        };
    }
    backend.answer(&req.input).await
}

/// One unit of work for a worker.
struct Job {
    device_id: String,
    /// The edge model the topic names.
    model: String,
    reply_topic: String,
    correlation: Option<Bytes>,
    payload: Bytes,
    received: Instant,
}

/// Why an inbound message is ignored without a reply.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RouteError {
    #[error(transparent)]
    Topic(#[from] TopicError),
    #[error("unexpected topic {0}")]
    Unexpected(Topic),
    #[error("device {device} asked for replies on {asked:?}, which is not its own reply topic")]
    ForeignReplyTopic { device: String, asked: String },
}

/// Where a reply goes, or why the request is dropped without one.
///
/// The reply topic must be the sending device's own: a forged request must not turn the relay
/// into a publisher on arbitrary topics.
fn route(parsed: &Topic, publish: &Publish) -> Result<Job, RouteError> {
    if parsed.kind != TopicKind::Escalate {
        return Err(RouteError::Unexpected(parsed.clone()));
    }
    let own_reply = Topic::new(&parsed.device_id, TopicKind::EscalateReply)?.to_string();
    let props = publish.properties.as_ref();
    if let Some(rt) = props.and_then(|p| p.response_topic.as_deref()) {
        if rt != own_reply {
            return Err(RouteError::ForeignReplyTopic {
                device: parsed.device_id.clone(),
                asked: rt.to_string(),
            });
        }
    }
    Ok(Job {
        device_id: parsed.device_id.clone(),
        model: parsed.model.clone().unwrap_or_default(),
        reply_topic: own_reply,
        correlation: props.and_then(|p| p.correlation_data.clone()),
        payload: publish.payload.clone(),
        received: Instant::now(),
    })
}

/// Hands a job to the workers, or answers `Overloaded` at once when the queue is full.
fn enqueue(job: Job, tx: &mpsc::Sender<Job>, stats: &RelayStats, client: &Publisher) {
    if let Err(mpsc::error::TrySendError::Full(job)) = tx.try_send(job) {
        stats.overloaded.fetch_add(1, Ordering::Relaxed);
        let reply = EscalationReply {
            request_id: job
                .correlation
                .as_ref()
                .and_then(|c| <[u8; 8]>::try_from(c.as_ref()).ok())
                .map(u64::from_be_bytes)
                .unwrap_or(0),
            outcome: ReplyOutcome::Error {
                code: ReplyErrorCode::Overloaded,
                message: "relay queue is full".into(),
            },
        };
        if let Ok(payload) = encode(&reply) {
            let props = PublishProperties {
                correlation_data: job.correlation.clone(),
                ..Default::default()
            };
            let _ = client.try_publish_with_properties(
                &job.reply_topic,
                QoS::AtMostOnce,
                false,
                payload,
                props,
            );
        }
    }
}

async fn work(
    backend: Backend,
    serves: Arc<Vec<String>>,
    client: Publisher,
    rx: Arc<Mutex<mpsc::Receiver<Job>>>,
    stats: Arc<RelayStats>,
) {
    loop {
        let job = {
            let mut rx = rx.lock().await;
            match rx.recv().await {
                Some(j) => j,
                None => return,
            }
        };
        let (request_id, outcome) = match decode::<EscalationRequest>(&job.payload) {
            Ok(req) => {
                let queued = job.received.elapsed();
                if queued > Duration::from_millis(u64::from(req.deadline_ms)) {
                    // The agent has already answered its caller; skip the work.
                    debug!(device = %job.device_id, request_id = req.request_id, "deadline passed in queue; dropped");
                    continue;
                }
                let outcome = answer(&backend, &serves, &job.model, &req).await;
                if matches!(
                    outcome,
                    ReplyOutcome::Error {
                        code: ReplyErrorCode::BadRequest,
                        ..
                    }
                ) {
                    stats.rejected.fetch_add(1, Ordering::Relaxed);
                }
                (req.request_id, outcome)
            }
            Err(e) => {
                stats.rejected.fetch_add(1, Ordering::Relaxed);
                warn!(device = %job.device_id, error = %e, "rejected escalation");
                // Without a decodable request id, the reply can only be matched by correlation data.
                let id = job
                    .correlation
                    .as_ref()
                    .and_then(|c| <[u8; 8]>::try_from(c.as_ref()).ok())
                    .map(u64::from_be_bytes);
                match id {
                    Some(id) => (
                        id,
                        ReplyOutcome::Error {
                            code: ReplyErrorCode::BadRequest,
                            message: e.to_string(),
                        },
                    ),
                    None => continue,
                }
            }
        };
        match &outcome {
            ReplyOutcome::Answer { compute_us, .. } => {
                debug!(device = %job.device_id, request_id, compute_us, "answered escalation");
                stats.answered.fetch_add(1, Ordering::Relaxed)
            }
            ReplyOutcome::Error { code, message } => {
                warn!(device = %job.device_id, request_id, ?code, %message, "escalation answered with an error");
                stats.errors.fetch_add(1, Ordering::Relaxed)
            }
        };
        publish_reply(&client, &job, request_id, outcome).await;
    }
}

async fn publish_reply(client: &Publisher, job: &Job, request_id: u64, outcome: ReplyOutcome) {
    let reply = EscalationReply {
        request_id,
        outcome,
    };
    let payload = match encode(&reply) {
        Ok(p) => p,
        Err(e) => {
            warn!(device = %job.device_id, error = %e, "cannot encode reply");
            return;
        }
    };
    let props = PublishProperties {
        correlation_data: job.correlation.clone(),
        ..Default::default()
    };
    if let Err(e) = client
        .publish_with_properties(&job.reply_topic, QoS::AtMostOnce, false, payload, props)
        .await
    {
        warn!(device = %job.device_id, error = %e, "cannot publish reply");
    }
}

/// What the escalation service needs besides its MQTT connection.
pub struct Service {
    pub backend: Backend,
    /// Edge model names answered for; empty = any.
    pub serves: Vec<String>,
    pub workers: usize,
    pub queue: usize,
    pub state: RelayState,
}

/// The escalation service on a link: a route that hands each escalation to the worker pool
/// (or answers `Overloaded` at once), and the pool that answers and publishes the replies.
pub struct Escalations {
    queue: Arc<std::sync::Mutex<Option<mpsc::Sender<Job>>>>,
    pool: Vec<tokio::task::JoinHandle<()>>,
}

/// The shared-subscription filters escalations for the edge models `serves` arrive on, one
/// group per model (QoS 0: see the topic table in tierd-protocol).
pub fn subscriptions(serves: &[String]) -> Result<Vec<Filter>, TopicError> {
    Ok(Topic::relay_escalation_filters(serves)?
        .into_iter()
        .map(|f| Filter::new(f, QoS::AtMostOnce))
        .collect())
}

impl Escalations {
    /// Starts `workers` workers and routes [`TopicKind::Escalate`] to them.
    pub fn start(service: Service, publisher: Publisher, routes: &mut Routes) -> Self {
        let Service {
            backend,
            serves,
            workers,
            queue,
            state,
        } = service;
        let stats = state.stats.clone();
        let (tx, rx) = mpsc::channel::<Job>(queue);
        let rx = Arc::new(Mutex::new(rx));
        let serves = Arc::new(serves);
        let pool = (0..workers)
            .map(|_| {
                tokio::spawn(work(
                    backend.clone(),
                    serves.clone(),
                    publisher.clone(),
                    rx.clone(),
                    stats.clone(),
                ))
            })
            .collect();
        let queue = Arc::new(std::sync::Mutex::new(Some(tx)));
        let q = queue.clone();
        routes.handler(
            TopicKind::Escalate,
            Arc::new(move |topic: Topic, p: Publish| {
                let tx = q.lock().ok().and_then(|g| g.clone());
                match (route(&topic, &p), tx) {
                    (Ok(job), Some(tx)) => enqueue(job, &tx, &stats, &publisher),
                    // Draining for a stop: the agent's deadline answers its caller.
                    (Ok(_), None) => {}
                    (Err(why), _) => {
                        stats.rejected.fetch_add(1, Ordering::Relaxed);
                        warn!(%why, "ignored message");
                    }
                }
            }),
        );
        Escalations { queue, pool }
    }

    /// Stops taking escalations and lets the workers answer what is queued (bounded), while
    /// the link is still up to carry the replies.
    pub async fn drain(self) {
        if let Ok(mut q) = self.queue.lock() {
            q.take();
        }
        for w in self.pool {
            let _ = tokio::time::timeout(Duration::from_secs(2), w).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(topic: &str, response_topic: Option<&str>) -> Publish {
        let mut p = Publish::new(topic, QoS::AtMostOnce, vec![1, 2, 3], None);
        p.properties = Some(PublishProperties {
            response_topic: response_topic.map(str::to_owned),
            correlation_data: Some(Bytes::from_static(&[0, 0, 0, 0, 0, 0, 0, 9])),
            ..Default::default()
        });
        p
    }

    /// The tierd topic a publish arrived on; parsed once, then dispatched on its kind.
    fn publish_topic(publish: &Publish) -> Result<Topic, RouteError> {
        let topic = std::str::from_utf8(&publish.topic).expect("test topics are UTF-8");
        Ok(Topic::parse(topic)?)
    }

    fn routed(p: &Publish) -> Result<Job, RouteError> {
        route(&publish_topic(p)?, p)
    }

    #[tokio::test]
    async fn requests_are_answered_only_on_their_own_models_topic_and_when_served() {
        let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../models/cloud/digits-cloud.toml");
        let backend = Backend::Tract(tierd_runtime::Model::load(&manifest).expect("cloud"));
        let req = EscalationRequest {
            request_id: 1,
            kind: tierd_protocol::EscalationKind::Escalation,
            edge_model: "digits-edge@2.0.0".into(),
            deadline_ms: 100,
            input: tierd_protocol::Tensor {
                shape: vec![1, 64],
                data: tierd_protocol::TensorData::U8(vec![0; 64]),
            },
            edge_probabilities: vec![0.1; 10],
        };
        let serves = ["digits-edge".to_string()];
        let code = |o: ReplyOutcome| match o {
            ReplyOutcome::Error { code, .. } => Some(code),
            ReplyOutcome::Answer { .. } => None,
        };
        assert_eq!(
            code(answer(&backend, &serves, "digits-edge", &req).await),
            None
        );
        assert_eq!(
            code(answer(&backend, &serves, "breast-edge", &req).await),
            Some(ReplyErrorCode::BadRequest)
        );
        let other = ["breast-edge".to_string()];
        assert_eq!(
            code(answer(&backend, &other, "digits-edge", &req).await),
            Some(ReplyErrorCode::UnknownModel)
        );
    }

    #[test]
    fn routes_replies_to_the_sender_only() {
        let job = routed(&publish(
            "tierd/v1/pi-1/escalate/m",
            Some("tierd/v1/pi-1/reply"),
        ))
        .unwrap();
        assert_eq!((job.device_id.as_str(), job.model.as_str()), ("pi-1", "m"));
        assert_eq!(job.reply_topic, "tierd/v1/pi-1/reply");
        let job = routed(&publish("tierd/v1/pi-1/escalate/m", None)).unwrap();
        assert_eq!(job.reply_topic, "tierd/v1/pi-1/reply");
        let err = routed(&publish(
            "tierd/v1/pi-1/escalate/m",
            Some("tierd/v1/pi-2/reply"),
        ))
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("not its own"), "{err}");
        assert!(routed(&publish("tierd/v1/pi-1/telemetry", None)).is_err());
        assert!(routed(&publish("elsewhere", None)).is_err());
    }
}
