//! Answering escalations: take requests from the shared subscription, run the cloud model, reply
//! to the requesting device.
//!
//! One task owns the MQTT event loop and hands each publish to a bounded queue; a fixed pool of
//! workers answers them. A full queue is answered with `Overloaded` instead of growing memory.
//! Every reject is logged with the device id and counted; nothing a client sends can stop the
//! loop.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::Filter;
use rumqttc::v5::mqttbytes::v5::{Packet, Publish, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop};
use tierd_protocol::{
    decode, encode, CalibrationReport, ConfigAck, ConfigDocument, DeviceStatus, EscalationReply,
    EscalationRequest, RecordKind, ReplyErrorCode, ReplyOutcome, SpoolAck, Spooled,
    TelemetryReport, Topic, TopicKind,
};

use crate::fleet::{Delivery, Ingest};
/// Re-exported from their home, [`crate::state`], for callers of the old paths.
pub use crate::state::{publish_config, RelayStats};
use crate::state::{RelayState, SharedControl, SharedFleet};
use tierd_runtime::mqtt::Backoff;
use tierd_runtime::{InputError, Model};
use tokio::sync::{mpsc, watch, Mutex};
use tracing::{debug, info, warn};

/// What the MQTT loop's handlers share.
struct Ctx {
    fleet: SharedFleet,
    control: SharedControl,
    stats: Arc<RelayStats>,
    client: AsyncClient,
}

/// Decides the reply to one decoded request. Pure apart from running the model.
pub fn answer(model: &Model, serves: &[String], req: &EscalationRequest) -> ReplyOutcome {
    let edge_name = req.edge_model.split('@').next().unwrap_or_default();
    if !serves.is_empty() && !serves.iter().any(|s| s == edge_name) {
        return ReplyOutcome::Error {
            code: ReplyErrorCode::UnknownModel,
            message: format!(
                "this relay answers for {serves:?}, not edge model {:?}",
                req.edge_model
            ),
        };
    }
    match model.predict(&req.input) {
        Ok(p) => ReplyOutcome::Answer {
            model: model.id(),
            probabilities: p.probabilities,
            compute_us: p.compute.as_micros().min(u128::from(u32::MAX)) as u32,
        },
        Err(InputError::Runtime(m)) => ReplyOutcome::Error {
            code: ReplyErrorCode::Internal,
            message: m,
        },
        Err(e) => ReplyOutcome::Error {
            code: ReplyErrorCode::BadShape,
            message: e.to_string(),
        },
    }
}

/// One unit of work for a worker.
struct Job {
    device_id: String,
    reply_topic: String,
    correlation: Option<Bytes>,
    payload: Bytes,
    received: Instant,
}

/// Where a reply goes, or why the request is dropped without one.
///
/// The reply topic must be the sending device's own: a forged request must not turn the relay
/// into a publisher on arbitrary topics.
fn route(parsed: &Topic, publish: &Publish) -> Result<Job, String> {
    if parsed.kind != TopicKind::Escalate {
        return Err(format!("unexpected topic {parsed}"));
    }
    let own_reply = Topic::new(&parsed.device_id, TopicKind::EscalateReply)
        .map_err(|e| e.to_string())?
        .to_string();
    let props = publish.properties.as_ref();
    if let Some(rt) = props.and_then(|p| p.response_topic.as_deref()) {
        if rt != own_reply {
            return Err(format!(
                "device {} asked for replies on {rt:?}, which is not its own reply topic",
                parsed.device_id
            ));
        }
    }
    Ok(Job {
        device_id: parsed.device_id.clone(),
        reply_topic: own_reply,
        correlation: props.and_then(|p| p.correlation_data.clone()),
        payload: publish.payload.clone(),
        received: Instant::now(),
    })
}

/// The tierd topic a publish arrived on; parsed once, then dispatched on its kind.
fn publish_topic(publish: &Publish) -> Result<Topic, String> {
    let topic =
        std::str::from_utf8(&publish.topic).map_err(|_| "topic is not UTF-8".to_string())?;
    Topic::parse(topic).map_err(|e| e.to_string())
}

/// Takes a spooled record (telemetry, calibration or config ack): delivers it once, in order,
/// and acknowledges cumulatively on the device's `ack` topic. A record whose body is bad is
/// still acknowledged (sending it again cannot fix it) and counted as rejected.
fn ingest_spooled(ctx: &Ctx, topic: Topic, publish: &Publish) {
    let device = topic.device_id.clone();
    let envelope = match decode::<Spooled>(&publish.payload) {
        Ok(e) => e,
        Err(e) => {
            ctx.stats.telemetry_rejected.fetch_add(1, Ordering::Relaxed);
            warn!(%device, error = %e, "spooled record rejected");
            return;
        }
    };
    let expected_topic = match envelope.kind {
        RecordKind::ConfigAck => TopicKind::ConfigAck,
        RecordKind::Telemetry | RecordKind::Calibration => TopicKind::Telemetry,
    };
    if topic.kind != expected_topic {
        ctx.stats.telemetry_rejected.fetch_add(1, Ordering::Relaxed);
        warn!(%device, kind = ?envelope.kind, "spooled record on the wrong topic");
        return;
    }
    let accepted = ctx
        .fleet
        .lock()
        .map_err(|_| "fleet state poisoned".to_string())
        .and_then(|mut f| {
            f.accept(&device, envelope.stream_id, envelope.seq, envelope.floor)
                .map_err(|e| e.to_string())
        });
    let (delivery, ack) = match accepted {
        Ok(x) => x,
        Err(why) => {
            ctx.stats.telemetry_rejected.fetch_add(1, Ordering::Relaxed);
            warn!(%device, %why, "spooled record rejected");
            return;
        }
    };
    match delivery {
        Delivery::Deliver => {
            let result = match envelope.kind {
                RecordKind::Telemetry => ingest_report(ctx, &device, &envelope.body),
                RecordKind::Calibration => ingest_calibration(ctx, &device, &envelope.body),
                RecordKind::ConfigAck => ingest_config_ack(ctx, &device, &envelope.body),
            };
            match result {
                Ok(()) => {
                    ctx.stats.telemetry_accepted.fetch_add(1, Ordering::Relaxed);
                }
                Err(why) => {
                    ctx.stats.telemetry_rejected.fetch_add(1, Ordering::Relaxed);
                    warn!(%device, %why, "record rejected");
                }
            }
        }
        Delivery::Duplicate => {
            ctx.stats.duplicates.fetch_add(1, Ordering::Relaxed);
            debug!(%device, seq = envelope.seq, "duplicate record (resend); acknowledged again");
        }
        Delivery::Ahead => {
            debug!(%device, seq = envelope.seq, "record ahead of a missing one; waiting for the resend");
        }
    }
    if let Some(upto) = ack {
        let ack = SpoolAck {
            stream_id: envelope.stream_id,
            upto,
        };
        let ack_topic = Topic {
            device_id: device,
            kind: TopicKind::SpoolAck,
        }
        .to_string();
        if let Ok(payload) = encode(&ack) {
            if let Err(e) = ctx
                .client
                .try_publish(ack_topic, QoS::AtLeastOnce, false, payload)
            {
                warn!(error = %e, "cannot queue a spool ack; the agent will send again");
            }
        }
    }
}

fn ingest_report(ctx: &Ctx, device: &str, body: &[u8]) -> Result<(), String> {
    let report = decode::<TelemetryReport>(body).map_err(|e| e.to_string())?;
    let outcome = ctx
        .fleet
        .lock()
        .map_err(|_| "fleet state poisoned".to_string())?
        .ingest(device, report, tierd_runtime::unix_ms())
        .map_err(|e| e.to_string())?;
    match outcome {
        Ingest::Gap { missing } => warn!(%device, missing, "telemetry reports missing"),
        Ingest::Restart => info!(%device, "device agent restarted"),
        Ingest::New => info!(%device, "first telemetry from device"),
        _ => debug!(%device, ?outcome, "telemetry"),
    }
    Ok(())
}

/// Files a calibration window, and pushes a new config document if the tuner's proposal is
/// worth it.
fn ingest_calibration(ctx: &Ctx, device: &str, body: &[u8]) -> Result<(), String> {
    let c = decode::<CalibrationReport>(body).map_err(|e| e.to_string())?;
    let (certificate, running) = {
        let mut fleet = ctx
            .fleet
            .lock()
            .map_err(|_| "fleet state poisoned".to_string())?;
        fleet
            .ingest_calibration(device, c)
            .map_err(|e| e.to_string())?;
        let rec = fleet.get(device);
        match rec.and_then(|d| {
            d.calibration
                .as_ref()
                .map(|c| (c.certificate.clone(), d.latest.threshold))
        }) {
            Some(x) => x,
            None => return Ok(()),
        }
    };
    let doc = ctx
        .control
        .lock()
        .map_err(|_| "control state poisoned".to_string())?
        .on_certificate(device, &certificate, running, tierd_runtime::unix_ms());
    if let Some(doc) = doc {
        info!(
            %device,
            version = doc.version,
            threshold = ?doc.settings.threshold,
            lower_bound = certificate.agreement_lower_bound,
            "pushing a tuned threshold"
        );
        publish_config(&ctx.client, &doc);
    }
    Ok(())
}

fn ingest_config_ack(ctx: &Ctx, device: &str, body: &[u8]) -> Result<(), String> {
    let ack = decode::<ConfigAck>(body).map_err(|e| e.to_string())?;
    if ack.applied {
        info!(%device, version = ack.version, "config applied by device");
    } else {
        warn!(%device, version = ack.version, reason = %ack.reason, "config rejected by device");
    }
    ctx.control
        .lock()
        .map_err(|_| "control state poisoned".to_string())?
        .record_ack(device, ack, tierd_runtime::unix_ms());
    Ok(())
}

/// A retained config document seen on the broker (ours, another replica's, or from before a
/// restart): versions continue from it.
fn learn_config(ctx: &Ctx, topic: Topic, publish: &Publish) {
    if publish.payload.is_empty() {
        return;
    }
    match ConfigDocument::from_json(&publish.payload) {
        Ok(doc) if doc.device_id == topic.device_id => {
            if let Ok(mut c) = ctx.control.lock() {
                c.learn_published(doc);
            }
        }
        Ok(_) => {
            warn!(device = %topic.device_id, "config document for another device on this topic ignored")
        }
        Err(e) => {
            warn!(device = %topic.device_id, error = %e, "invalid config document on the broker ignored")
        }
    }
}

/// Files a device's online/offline status (its own, or its last will published by the broker).
fn ingest_status(ctx: &Ctx, topic: Topic, publish: &Publish) {
    let (fleet, stats) = (&ctx.fleet, &ctx.stats);
    let result: Result<_, String> = (|| {
        let status = decode::<DeviceStatus>(&publish.payload)
            .map_err(|e| format!("device {}: {e}", topic.device_id))?;
        let online = status.online;
        let reason = status.reason.clone();
        fleet
            .lock()
            .map_err(|_| "fleet state poisoned".to_string())?
            .set_status(&topic.device_id, status, tierd_runtime::unix_ms())
            .map_err(|e| e.to_string())?;
        Ok((topic.device_id, online, reason))
    })();
    match result {
        Ok((device, online, reason)) => {
            info!(%device, online, %reason, "device status");
        }
        Err(why) => {
            stats.telemetry_rejected.fetch_add(1, Ordering::Relaxed);
            warn!(%why, "status rejected");
        }
    }
}

/// Hands a job to the workers, or answers `Overloaded` at once when the queue is full.
fn enqueue(job: Job, tx: &mpsc::Sender<Job>, stats: &RelayStats, client: &AsyncClient) {
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
    model: Model,
    serves: Arc<Vec<String>>,
    client: AsyncClient,
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
                (req.request_id, answer(&model, &serves, &req))
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

async fn publish_reply(client: &AsyncClient, job: &Job, request_id: u64, outcome: ReplyOutcome) {
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
    pub model: Model,
    /// Edge model names answered for; empty = any.
    pub serves: Vec<String>,
    pub workers: usize,
    pub queue: usize,
    pub state: RelayState,
}

/// Runs the escalation service until `shutdown` flips: event loop plus `workers` workers.
pub async fn run(
    service: Service,
    client: AsyncClient,
    mut eventloop: EventLoop,
    mut shutdown: watch::Receiver<bool>,
) {
    let Service {
        model,
        serves,
        workers,
        queue,
        state,
    } = service;
    let stats = state.stats.clone();
    let ctx = Ctx {
        fleet: state.fleet.clone(),
        control: state.control.clone(),
        stats: stats.clone(),
        client: client.clone(),
    };
    let (tx, rx) = mpsc::channel::<Job>(queue);
    let rx = Arc::new(Mutex::new(rx));
    let serves = Arc::new(serves);
    let mut pool = Vec::with_capacity(workers);
    for _ in 0..workers {
        pool.push(tokio::spawn(work(
            model.clone(),
            serves.clone(),
            client.clone(),
            rx.clone(),
            stats.clone(),
        )));
    }
    let filter = Topic::relay_escalation_filter();
    // Not shared: every replica sees every device's telemetry and can serve the fleet view.
    // Not shared either: acks go to every replica's controller, and every replica learns
    // the retained documents so versions keep increasing whoever pushes.
    let own_filters = [
        TopicKind::Telemetry,
        TopicKind::Status,
        TopicKind::ConfigAck,
        TopicKind::Config,
    ]
    .map(|k| Filter::new(Topic::all_devices(k), QoS::AtLeastOnce));
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let mut connected = false;
    loop {
        let event = tokio::select! {
            _ = shutdown.changed() => break,
            ev = eventloop.poll() => ev,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff.reset();
                connected = true;
                if let Err(e) = client.try_subscribe(&filter, QoS::AtMostOnce) {
                    warn!(error = %e, "cannot queue subscription");
                }
                if let Err(e) = client.try_subscribe_many(own_filters.clone()) {
                    warn!(error = %e, "cannot queue the telemetry/status/config subscriptions");
                }
            }
            // Logged on the broker's confirmation so the line is a true readiness signal.
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                info!(%filter, "connected; taking escalations");
            }
            Ok(Event::Incoming(Packet::Publish(p))) => match publish_topic(&p) {
                Ok(t) if matches!(t.kind, TopicKind::Telemetry | TopicKind::ConfigAck) => {
                    ingest_spooled(&ctx, t, &p)
                }
                Ok(t) if t.kind == TopicKind::Status => ingest_status(&ctx, t, &p),
                Ok(t) if t.kind == TopicKind::Config => learn_config(&ctx, t, &p),
                other => match other.and_then(|t| route(&t, &p)) {
                    Ok(job) => enqueue(job, &tx, &stats, &client),
                    Err(why) => {
                        stats.rejected.fetch_add(1, Ordering::Relaxed);
                        warn!(%why, "ignored message");
                    }
                },
            },
            Ok(_) => {}
            Err(e) => {
                if connected {
                    warn!(error = %e, "MQTT connection lost; reconnecting");
                } else {
                    debug!(error = %e, "MQTT connect failed");
                }
                connected = false;
                let delay = backoff.next_delay();
                tokio::select! {
                    _ = shutdown.changed() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
    drop(tx);
    for w in pool {
        let _ = tokio::time::timeout(Duration::from_secs(2), w).await;
    }
    tierd_runtime::mqtt::disconnect(&client, &mut eventloop).await;
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

    fn routed(p: &Publish) -> Result<Job, String> {
        route(&publish_topic(p)?, p)
    }

    #[test]
    fn routes_replies_to_the_sender_only() {
        let job = routed(&publish(
            "tierd/v1/pi-1/escalate",
            Some("tierd/v1/pi-1/escalate/reply"),
        ))
        .unwrap();
        assert_eq!(job.device_id, "pi-1");
        assert_eq!(job.reply_topic, "tierd/v1/pi-1/escalate/reply");
        let job = routed(&publish("tierd/v1/pi-1/escalate", None)).unwrap();
        assert_eq!(job.reply_topic, "tierd/v1/pi-1/escalate/reply");
        let err = routed(&publish(
            "tierd/v1/pi-1/escalate",
            Some("tierd/v1/pi-2/escalate/reply"),
        ))
        .err()
        .unwrap();
        assert!(err.contains("not its own"), "{err}");
        assert!(routed(&publish("tierd/v1/pi-1/telemetry", None)).is_err());
        assert!(routed(&publish("elsewhere", None)).is_err());
    }
}
