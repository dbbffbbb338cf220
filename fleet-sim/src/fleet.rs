//! The virtual fleet on the wire: `devices` virtual devices spread over `connections` MQTT
//! connections (device `i` on connection `i % connections`), and a fleet-wide escalation load.
//!
//! Per connection, two tasks:
//! - the *poll* task owns rumqttc's event loop; it answers escalation replies on the spot
//!   (latency is measured there, without a hop) and hands spool acks, config documents and
//!   connection changes to the device task through a bounded channel (it waits when that is
//!   full: back-pressure on the broker, nothing dropped);
//! - the *device* task owns its devices: it subscribes their `reply`, `config` and `ack`
//!   topics, publishes their retained online status (before any of their records), builds a
//!   telemetry report per device every report interval (and a calibration window every
//!   `calibration_every` reports), answers config documents with acks, and sends every spooled
//!   record by go-back-N ([`Outbox`]), never blocking: a full MQTT request queue rewinds.
//!
//! One more task paces escalations ([`Pacer`]), round robin over the devices, at most
//! `max_in_flight` outstanding; one that has no reply within its deadline counts as timed out.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use hdrhistogram::Histogram;
use rumqttc::v5::mqttbytes::v5::{Filter, Packet, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use rumqttc::{NetworkOptions, Outgoing};
use tierd_protocol::{
    decode, encode, EscalationKind, EscalationReply, EscalationRequest, RecordKind, ReplyErrorCode,
    ReplyOutcome, SpoolAck, SpoolCounts, Spooled, Tensor, TensorData, Topic, TopicKind,
};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use crate::outbox::{Outbox, WINDOW};
use crate::pace::Pacer;
use crate::records::{DeviceRecords, Policy, Rng};

/// Largest MQTT packet sent or accepted (the daemons' `MAX_PACKET_BYTES`).
const MAX_PACKET_BYTES: u32 = 256 * 1024;
/// How often the device tasks look for due reports and records to send.
const DEVICE_TICK: Duration = Duration::from_millis(20);
/// How often the escalation pacer runs.
const ESCALATION_TICK: Duration = Duration::from_millis(2);
/// Inbound messages (acks, config documents) waiting for a device task, per connection.
const INBOUND_QUEUE: usize = 1024;

#[derive(Debug, Clone)]
pub struct FleetConfig {
    pub devices: usize,
    pub connections: usize,
    pub report_interval: Duration,
    pub calibration_every: u64,
    pub requests_per_report: u64,
    pub escalations_per_s: f64,
    pub escalation_timeout: Duration,
    pub max_in_flight: usize,
    /// `name@version`.
    pub edge_model: String,
    pub broker_host: String,
    pub broker_port: u16,
    /// Device ids are `{prefix}{index:05}`.
    pub id_prefix: String,
    pub resend_after: Duration,
    /// Records a device's spool holds at most.
    pub spool_cap: usize,
    /// Unix ms at start: every device's `boot_id`.
    pub boot_id: u64,
    pub seed: u64,
}

/// Counters of what the fleet did; read with [`Counters::snapshot`].
#[derive(Debug, Default)]
pub struct Counters {
    pub records_generated: AtomicU64,
    pub telemetry_generated: AtomicU64,
    pub calibration_generated: AtomicU64,
    pub config_acks_generated: AtomicU64,
    pub records_published: AtomicU64,
    pub records_acked: AtomicU64,
    pub spool_dropped: AtomicU64,
    pub resends: AtomicU64,
    pub queue_full: AtomicU64,
    pub acks_received: AtomicU64,
    pub bad_inbound: AtomicU64,
    pub config_docs: AtomicU64,
    pub config_applied: AtomicU64,
    pub config_refused: AtomicU64,
    pub statuses_published: AtomicU64,
    pub reconnects: AtomicU64,
    pub esc_sent: AtomicU64,
    pub esc_answered: AtomicU64,
    pub esc_overloaded: AtomicU64,
    pub esc_errors: AtomicU64,
    pub esc_timeouts: AtomicU64,
    pub esc_late: AtomicU64,
    pub esc_skipped: AtomicU64,
}

/// The counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Snapshot {
    pub records_generated: u64,
    pub telemetry_generated: u64,
    pub calibration_generated: u64,
    pub config_acks_generated: u64,
    pub records_published: u64,
    pub records_acked: u64,
    pub spool_dropped: u64,
    pub resends: u64,
    pub queue_full: u64,
    pub acks_received: u64,
    pub bad_inbound: u64,
    pub config_docs: u64,
    pub config_applied: u64,
    pub config_refused: u64,
    pub statuses_published: u64,
    pub reconnects: u64,
    pub esc_sent: u64,
    pub esc_answered: u64,
    pub esc_overloaded: u64,
    pub esc_errors: u64,
    pub esc_timeouts: u64,
    pub esc_late: u64,
    pub esc_skipped: u64,
}

impl Snapshot {
    /// Records produced and neither acknowledged nor dropped: the ack lag.
    pub fn lag(&self) -> u64 {
        self.records_generated
            .saturating_sub(self.records_acked)
            .saturating_sub(self.spool_dropped)
    }
}

impl Counters {
    pub fn snapshot(&self) -> Snapshot {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Snapshot {
            records_generated: r(&self.records_generated),
            telemetry_generated: r(&self.telemetry_generated),
            calibration_generated: r(&self.calibration_generated),
            config_acks_generated: r(&self.config_acks_generated),
            records_published: r(&self.records_published),
            records_acked: r(&self.records_acked),
            spool_dropped: r(&self.spool_dropped),
            resends: r(&self.resends),
            queue_full: r(&self.queue_full),
            acks_received: r(&self.acks_received),
            bad_inbound: r(&self.bad_inbound),
            config_docs: r(&self.config_docs),
            config_applied: r(&self.config_applied),
            config_refused: r(&self.config_refused),
            statuses_published: r(&self.statuses_published),
            reconnects: r(&self.reconnects),
            esc_sent: r(&self.esc_sent),
            esc_answered: r(&self.esc_answered),
            esc_overloaded: r(&self.esc_overloaded),
            esc_errors: r(&self.esc_errors),
            esc_timeouts: r(&self.esc_timeouts),
            esc_late: r(&self.esc_late),
            esc_skipped: r(&self.esc_skipped),
        }
    }
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// End-to-end escalation latency, in microseconds (1 µs .. 60 s, 3 significant digits).
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("constant bounds: 1 <= 60e6, 3 sigfigs")
}

/// What every task shares.
pub struct Shared {
    pub counters: Counters,
    /// The report interval in force, in microseconds (`--saturate` changes it).
    interval_us: AtomicU64,
    /// Devices build new records while set (cleared to drain at the end).
    generating: AtomicBool,
    /// Escalations are sent while set.
    escalating: AtomicBool,
    connected: Vec<AtomicBool>,
    /// Outstanding escalations: request id -> when it was sent.
    pending: Mutex<HashMap<u64, Instant>>,
    latency: Mutex<Histogram<u64>>,
}

/// A running fleet; [`Fleet::stop`] ends it cleanly.
pub struct Fleet {
    pub shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    pub devices: usize,
}

enum Inbound {
    Connected,
    Disconnected,
    Ack(usize, Bytes),
    Config(usize, Bytes),
}

struct Device {
    records: DeviceRecords,
    outbox: Outbox,
    rng: Rng,
    telemetry_topic: String,
    config_ack_topic: String,
    status_topic: String,
    /// The online status went out on this connection: its records may follow.
    announced: bool,
    next_report: Instant,
}

/// Device `i`'s id.
pub fn device_id(prefix: &str, i: usize) -> String {
    format!("{prefix}{i:05}")
}

impl Fleet {
    /// Connects every connection and starts the devices (they announce themselves and begin
    /// reporting at a random phase within the first interval) and the escalation pacer.
    pub fn start(cfg: &FleetConfig) -> anyhow::Result<Fleet> {
        if cfg.devices == 0 || cfg.connections == 0 {
            bail!("--devices and --connections must be at least 1");
        }
        let connections = cfg.connections.min(cfg.devices);
        let shared = Arc::new(Shared {
            counters: Counters::default(),
            interval_us: AtomicU64::new(duration_us(cfg.report_interval)),
            generating: AtomicBool::new(true),
            escalating: AtomicBool::new(false),
            connected: (0..connections).map(|_| AtomicBool::new(false)).collect(),
            pending: Mutex::new(HashMap::new()),
            latency: Mutex::new(new_histogram()),
        });
        let (stop, stop_rx) = watch::channel(false);
        let now = Instant::now();
        let mut tasks = Vec::new();
        let mut clients = Vec::new();
        let name = cfg
            .edge_model
            .split('@')
            .next()
            .unwrap_or_default()
            .to_string();
        let mut escalation_targets = Vec::with_capacity(cfg.devices);
        for c in 0..connections {
            let mut devices = Vec::new();
            let mut index = HashMap::new();
            for i in (c..cfg.devices).step_by(connections) {
                let id = device_id(&cfg.id_prefix, i);
                let topic = |k| Topic::new(&id, k).map(|t| t.to_string());
                let mut rng = Rng::new(cfg.seed ^ (i as u64).wrapping_mul(0x1000_0000_01B3));
                let stream_id = rng.next_u64().max(1);
                let phase = cfg.report_interval.mul_f64(rng.unit());
                index.insert(id.clone(), devices.len());
                devices.push(Device {
                    records: DeviceRecords::new(
                        id.clone(),
                        cfg.boot_id,
                        cfg.edge_model.clone(),
                        Policy::default(),
                    ),
                    outbox: Outbox::new(stream_id, cfg.spool_cap, cfg.resend_after),
                    rng,
                    telemetry_topic: topic(TopicKind::Telemetry)?,
                    config_ack_topic: topic(TopicKind::ConfigAck)?,
                    status_topic: topic(TopicKind::Status)?,
                    announced: false,
                    next_report: now + phase,
                });
                escalation_targets.push(EscalationTarget {
                    connection: c,
                    request_topic: Topic::escalate(&id, &name)
                        .context("--edge-model's name is not a valid topic level")?
                        .to_string(),
                    reply_topic: topic(TopicKind::EscalateReply)?,
                });
            }
            let mut options = MqttOptions::new(
                format!("tierd-fleet-sim-{}-{c}", std::process::id()),
                cfg.broker_host.clone(),
                cfg.broker_port,
            );
            options.set_keep_alive(Duration::from_secs(30));
            options.set_clean_start(true);
            options.set_max_packet_size(Some(MAX_PACKET_BYTES));
            let mut net = NetworkOptions::new();
            net.set_tcp_nodelay(true);
            net.set_connection_timeout(10);
            options.set_network_options(net);
            // Every device's window of records, its status and a few acks fit at once.
            let capacity = devices.len() * (WINDOW as usize + 4) + cfg.max_in_flight + 64;
            let (client, eventloop) = AsyncClient::new(options, capacity);
            let (tx, rx) = mpsc::channel(INBOUND_QUEUE);
            tasks.push(tokio::spawn(poll(
                c,
                eventloop,
                index,
                tx,
                shared.clone(),
                stop_rx.clone(),
            )));
            tasks.push(tokio::spawn(run_devices(
                c,
                devices,
                client.clone(),
                rx,
                shared.clone(),
                cfg.clone(),
                stop_rx.clone(),
            )));
            clients.push(client);
        }
        // Round robin in device order, which walks the connections in turn.
        escalation_targets.sort_by_key(|t| t.connection);
        let targets = interleave(escalation_targets, connections);
        tasks.push(tokio::spawn(escalate(
            clients,
            targets,
            shared.clone(),
            cfg.clone(),
            stop_rx,
        )));
        Ok(Fleet {
            shared,
            stop,
            tasks,
            devices: cfg.devices,
        })
    }

    pub fn snapshot(&self) -> Snapshot {
        self.shared.counters.snapshot()
    }

    /// Waits until every connection is up and every device announced itself.
    pub async fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let up = self
                .shared
                .connected
                .iter()
                .filter(|c| c.load(Ordering::Relaxed))
                .count();
            let announced = self.snapshot().statuses_published;
            if up == self.shared.connected.len() && announced >= self.devices as u64 {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "after {timeout:?}: {up} of {} MQTT connections up, {announced} of {} devices announced",
                    self.shared.connected.len(),
                    self.devices
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn set_escalating(&self, on: bool) {
        self.shared.escalating.store(on, Ordering::Relaxed);
    }

    /// Stops building new records (what is spooled still goes out and is resent).
    pub fn stop_generating(&self) {
        self.shared.generating.store(false, Ordering::Relaxed);
    }

    pub fn set_interval(&self, interval: Duration) {
        self.shared
            .interval_us
            .store(duration_us(interval), Ordering::Relaxed);
    }

    /// The escalation latencies since the last call (and a fresh histogram for the next).
    pub fn take_latency(&self) -> Histogram<u64> {
        match self.shared.latency.lock() {
            Ok(mut h) => std::mem::replace(&mut *h, new_histogram()),
            Err(_) => new_histogram(),
        }
    }

    /// Waits until every record was acknowledged, at most `timeout`; returns the lag left.
    pub async fn drain(&self, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            let lag = self.snapshot().lag();
            if lag == 0 || Instant::now() > deadline {
                return lag;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Publishes every device's offline status (`stopped`), disconnects cleanly and waits for
    /// the tasks (at most a few seconds).
    pub async fn stop(self) {
        self.set_escalating(false);
        let _ = self.stop.send(true);
        let aborts: Vec<_> = self.tasks.iter().map(|t| t.abort_handle()).collect();
        let all = async {
            for t in self.tasks {
                let _ = t.await;
            }
        };
        if tokio::time::timeout(Duration::from_secs(10), all)
            .await
            .is_err()
        {
            warn!("fleet tasks did not stop within 10 s; aborted");
            for a in aborts {
                a.abort();
            }
        }
    }
}

fn duration_us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

/// Orders targets grouped by connection so that consecutive ones are on different
/// connections (0, 1, 2, ..., 0, 1, 2, ...).
fn interleave(sorted: Vec<EscalationTarget>, connections: usize) -> Vec<EscalationTarget> {
    let mut per: Vec<Vec<EscalationTarget>> = (0..connections).map(|_| Vec::new()).collect();
    for t in sorted {
        if let Some(v) = per.get_mut(t.connection) {
            v.push(t);
        }
    }
    let mut iters: Vec<_> = per.into_iter().map(|v| v.into_iter()).collect();
    let mut out = Vec::new();
    loop {
        let before = out.len();
        for it in iters.iter_mut() {
            if let Some(t) = it.next() {
                out.push(t);
            }
        }
        if out.len() == before {
            return out;
        }
    }
}

/// The event loop of connection `c`.
async fn poll(
    c: usize,
    mut eventloop: EventLoop,
    index: HashMap<String, usize>,
    tx: mpsc::Sender<Inbound>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let counters = &shared.counters;
    let mut stopping = false;
    let mut was_up = false;
    loop {
        let event = tokio::select! {
            ev = eventloop.poll() => ev,
            _ = stop.wait_for(|s| *s), if !stopping => {
                stopping = true;
                continue;
            }
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                if was_up {
                    bump(&counters.reconnects, 1);
                }
                was_up = true;
                shared.connected[c].store(true, Ordering::Relaxed);
                if !forward(&tx, Inbound::Connected, &mut stop).await {
                    return;
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let topic = std::str::from_utf8(&p.topic)
                    .ok()
                    .and_then(|t| Topic::parse(t).ok());
                let Some(topic) = topic else {
                    bump(&counters.bad_inbound, 1);
                    continue;
                };
                match topic.kind {
                    TopicKind::EscalateReply => reply(&shared, &p.payload),
                    TopicKind::SpoolAck | TopicKind::Config => {
                        let Some(&d) = index.get(&topic.device_id) else {
                            bump(&counters.bad_inbound, 1);
                            continue;
                        };
                        let msg = if topic.kind == TopicKind::SpoolAck {
                            Inbound::Ack(d, p.payload)
                        } else {
                            Inbound::Config(d, p.payload)
                        };
                        if !forward(&tx, msg, &mut stop).await {
                            return;
                        }
                    }
                    _ => bump(&counters.bad_inbound, 1),
                }
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) if stopping => {
                // Read on until the broker closes, so the DISCONNECT is not lost to a reset.
                let _ = tokio::time::timeout(Duration::from_secs(1), async {
                    while eventloop.poll().await.is_ok() {}
                })
                .await;
                return;
            }
            Ok(_) => {}
            Err(e) => {
                shared.connected[c].store(false, Ordering::Relaxed);
                if stopping {
                    return;
                }
                warn!(connection = c, error = %e, "MQTT connection lost; reconnecting");
                let _ = forward(&tx, Inbound::Disconnected, &mut stop).await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// Hands `msg` to the device task, waiting while its queue is full, unless the fleet is
/// stopping (then the message is dropped: the device task no longer reads, and waiting would
/// stall the event loop its last publishes need). `false`: the device task is gone.
async fn forward(
    tx: &mpsc::Sender<Inbound>,
    msg: Inbound,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    tokio::select! {
        r = tx.send(msg) => r.is_ok(),
        _ = stop.wait_for(|s| *s) => true,
    }
}

/// An escalation reply: its latency, if it was still awaited.
fn reply(shared: &Shared, payload: &[u8]) {
    let counters = &shared.counters;
    let Ok(r) = decode::<EscalationReply>(payload) else {
        bump(&counters.bad_inbound, 1);
        return;
    };
    let sent = shared
        .pending
        .lock()
        .ok()
        .and_then(|mut p| p.remove(&r.request_id));
    let Some(sent) = sent else {
        bump(&counters.esc_late, 1);
        return;
    };
    match r.outcome {
        ReplyOutcome::Answer { .. } => {
            let us = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX);
            if us > 20_000 {
                debug!(
                    request_id = r.request_id,
                    ms = us / 1000,
                    "slow escalation reply"
                );
            }
            if let Ok(mut h) = shared.latency.lock() {
                h.saturating_record(us.max(1));
            }
            bump(&counters.esc_answered, 1);
        }
        ReplyOutcome::Error {
            code: ReplyErrorCode::Overloaded,
            ..
        } => bump(&counters.esc_overloaded, 1),
        ReplyOutcome::Error { code, message } => {
            debug!(?code, %message, "escalation answered with an error");
            bump(&counters.esc_errors, 1);
        }
    }
}

/// The devices of connection `c`.
async fn run_devices(
    c: usize,
    mut devices: Vec<Device>,
    client: AsyncClient,
    mut inbound: mpsc::Receiver<Inbound>,
    shared: Arc<Shared>,
    cfg: FleetConfig,
    mut stop: watch::Receiver<bool>,
) {
    let counters = &shared.counters;
    let mut tick = tokio::time::interval(DEVICE_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut connected = false;
    let mut interval_us = shared.interval_us.load(Ordering::Relaxed);
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            msg = inbound.recv() => match msg {
                None => return,
                Some(Inbound::Connected) => {
                    connected = true;
                    let filters: Vec<Filter> = devices
                        .iter()
                        .flat_map(|d| {
                            let id = &d.records.device_id;
                            [
                                (TopicKind::EscalateReply, QoS::AtMostOnce),
                                (TopicKind::Config, QoS::AtLeastOnce),
                                (TopicKind::SpoolAck, QoS::AtLeastOnce),
                            ]
                            .into_iter()
                            .filter_map(move |(k, q)| {
                                Topic::new(id, k).ok().map(|t| Filter::new(t.to_string(), q))
                            })
                        })
                        .collect();
                    if let Err(e) = client.try_subscribe_many(filters) {
                        warn!(connection = c, error = %e, "cannot queue the subscriptions");
                    }
                    for d in devices.iter_mut() {
                        d.announced = false;
                        d.outbox.reconnected();
                    }
                }
                Some(Inbound::Disconnected) => connected = false,
                Some(Inbound::Ack(i, payload)) => {
                    bump(&counters.acks_received, 1);
                    let Some(d) = devices.get_mut(i) else { continue };
                    match decode::<SpoolAck>(&payload) {
                        Ok(a) if a.stream_id == d.outbox.stream_id => {
                            let released = d.outbox.ack(a.upto, Instant::now());
                            bump(&counters.records_acked, released);
                        }
                        Ok(_) => {}
                        Err(_) => bump(&counters.bad_inbound, 1),
                    }
                }
                Some(Inbound::Config(i, payload)) => {
                    let Some(d) = devices.get_mut(i) else { continue };
                    if payload.is_empty() {
                        continue;
                    }
                    bump(&counters.config_docs, 1);
                    if let Some(ack) = d.records.apply_config(&payload) {
                        bump(if ack.applied { &counters.config_applied } else { &counters.config_refused }, 1);
                        match encode(&ack) {
                            Ok(body) => {
                                spool(d, RecordKind::ConfigAck, body, counters);
                                bump(&counters.config_acks_generated, 1);
                            }
                            Err(e) => warn!(error = %e, "config ack cannot be encoded"),
                        }
                    }
                }
            },
            _ = tick.tick() => {
                let now = Instant::now();
                let wanted = shared.interval_us.load(Ordering::Relaxed);
                let interval = Duration::from_micros(wanted);
                if wanted != interval_us {
                    interval_us = wanted;
                    for d in devices.iter_mut() {
                        if d.next_report > now + interval {
                            d.next_report = now + interval.mul_f64(d.rng.unit());
                        }
                    }
                }
                if shared.generating.load(Ordering::Relaxed) {
                    for d in devices.iter_mut().filter(|d| d.next_report <= now) {
                        report(d, &cfg, counters);
                        d.next_report += interval;
                        if d.next_report + interval < now {
                            // Fell far behind (a stall): go on from now, no burst.
                            d.next_report = now + interval;
                        }
                    }
                }
                if connected {
                    for d in devices.iter_mut() {
                        pump(d, &client, counters, now);
                    }
                }
            }
        }
    }
    // A clean stop: every device's offline status, then DISCONNECT (no last will is set).
    let goodbye = async {
        if connected {
            for d in &devices {
                if let Ok(payload) = encode(&d.records.status(false)) {
                    let _ = client
                        .publish(&d.status_topic, QoS::AtLeastOnce, true, payload)
                        .await;
                }
            }
        }
        let _ = client.disconnect().await;
    };
    if tokio::time::timeout(Duration::from_secs(5), goodbye)
        .await
        .is_err()
    {
        warn!(connection = c, "offline statuses not all queued within 5 s");
    }
}

fn spool(d: &mut Device, kind: RecordKind, body: Vec<u8>, counters: &Counters) {
    let dropped = d.outbox.dropped;
    d.outbox.append(kind, body);
    bump(&counters.records_generated, 1);
    bump(&counters.spool_dropped, d.outbox.dropped - dropped);
}

/// The device's next telemetry window (and calibration window, when due), into its spool.
fn report(d: &mut Device, cfg: &FleetConfig, counters: &Counters) {
    let spool_counts = SpoolCounts {
        pending: d.outbox.pending(),
        dropped: d.outbox.dropped,
        corrupt: 0,
    };
    let (telemetry, calibration) = d.records.next_window(
        &mut d.rng,
        cfg.requests_per_report,
        unix_ms(),
        cfg.calibration_every,
        spool_counts,
    );
    match encode(&telemetry) {
        Ok(body) => {
            spool(d, RecordKind::Telemetry, body, counters);
            bump(&counters.telemetry_generated, 1);
        }
        Err(e) => warn!(error = %e, "telemetry report cannot be encoded"),
    }
    if let Some(c) = calibration {
        match encode(&c) {
            Ok(body) => {
                spool(d, RecordKind::Calibration, body, counters);
                bump(&counters.calibration_generated, 1);
            }
            Err(e) => warn!(error = %e, "calibration report cannot be encoded"),
        }
    }
}

/// Publishes the device's status if not yet done on this connection, then what is due of
/// its spool; stops at the first publish the client cannot queue.
fn pump(d: &mut Device, client: &AsyncClient, counters: &Counters, now: Instant) {
    if !d.announced {
        let Ok(payload) = encode(&d.records.status(true)) else {
            return;
        };
        if client
            .try_publish(&d.status_topic, QoS::AtLeastOnce, true, payload)
            .is_err()
        {
            bump(&counters.queue_full, 1);
            return;
        }
        d.announced = true;
        bump(&counters.statuses_published, 1);
    }
    let resends = d.outbox.resends;
    let range = d.outbox.due(now);
    bump(&counters.resends, d.outbox.resends - resends);
    let floor = d.outbox.floor();
    for seq in range {
        let Some(r) = d.outbox.get(seq) else {
            continue;
        };
        let envelope = Spooled {
            stream_id: d.outbox.stream_id,
            seq,
            floor,
            kind: r.kind,
            body: r.body.clone(),
        };
        let topic = match r.kind {
            RecordKind::ConfigAck => &d.config_ack_topic,
            _ => &d.telemetry_topic,
        };
        let payload = match encode(&envelope) {
            Ok(p) => p,
            Err(e) => {
                warn!(seq, error = %e, "record cannot be enveloped");
                continue;
            }
        };
        if client
            .try_publish(topic, QoS::AtLeastOnce, false, payload)
            .is_err()
        {
            bump(&counters.queue_full, 1);
            d.outbox.rewind(seq);
            return;
        }
        bump(&counters.records_published, 1);
    }
}

struct EscalationTarget {
    connection: usize,
    request_topic: String,
    reply_topic: String,
}

/// Paces escalations over the devices, round robin; times out the unanswered ones.
async fn escalate(
    clients: Vec<AsyncClient>,
    targets: Vec<EscalationTarget>,
    shared: Arc<Shared>,
    cfg: FleetConfig,
    mut stop: watch::Receiver<bool>,
) {
    let counters = &shared.counters;
    let mut tick = tokio::time::interval(ESCALATION_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let burst = (cfg.escalations_per_s * 0.1).ceil().max(1.0) as u64;
    let mut pacer = Pacer::new(cfg.escalations_per_s, Instant::now(), burst);
    let mut rng = Rng::new(cfg.seed ^ 0xE5CA_1A7E);
    let mut next_id: u64 = rng.next_u64() >> 16;
    let mut next_target = 0usize;
    let deadline_ms = u32::try_from(cfg.escalation_timeout.as_millis()).unwrap_or(u32::MAX);
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {}
        }
        let now = Instant::now();
        if let Ok(mut p) = shared.pending.lock() {
            let before = p.len();
            p.retain(|_, sent| now.duration_since(*sent) < cfg.escalation_timeout);
            bump(&counters.esc_timeouts, (before - p.len()) as u64);
        }
        let due = pacer.due(now);
        if !shared.escalating.load(Ordering::Relaxed) || targets.is_empty() {
            continue;
        }
        for _ in 0..due {
            let t = &targets[next_target % targets.len()];
            next_target = next_target.wrapping_add(1);
            let full = shared
                .pending
                .lock()
                .map_or(true, |p| p.len() >= cfg.max_in_flight);
            if full || !shared.connected[t.connection].load(Ordering::Relaxed) {
                bump(&counters.esc_skipped, 1);
                continue;
            }
            next_id = next_id.wrapping_add(1);
            let request = EscalationRequest {
                request_id: next_id,
                kind: EscalationKind::Escalation,
                edge_model: cfg.edge_model.clone(),
                deadline_ms,
                input: Tensor {
                    shape: vec![1, 64],
                    data: TensorData::U8((0..64).map(|_| (rng.next_u64() >> 56) as u8).collect()),
                },
                edge_probabilities: vec![0.1; 10],
            };
            let Ok(payload) = encode(&request) else {
                continue;
            };
            let props = PublishProperties {
                response_topic: Some(t.reply_topic.clone()),
                correlation_data: Some(Bytes::copy_from_slice(&next_id.to_be_bytes())),
                ..Default::default()
            };
            if let Ok(mut p) = shared.pending.lock() {
                p.insert(next_id, Instant::now());
            }
            let sent = clients[t.connection].try_publish_with_properties(
                &t.request_topic,
                QoS::AtMostOnce,
                false,
                payload,
                props,
            );
            if sent.is_err() {
                if let Ok(mut p) = shared.pending.lock() {
                    p.remove(&next_id);
                }
                bump(&counters.esc_skipped, 1);
            } else {
                bump(&counters.esc_sent, 1);
            }
        }
    }
}

pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escalations_walk_the_connections_in_turn() {
        let targets: Vec<_> = [0, 0, 0, 1, 1, 2]
            .into_iter()
            .enumerate()
            .map(|(i, c)| EscalationTarget {
                connection: c,
                request_topic: i.to_string(),
                reply_topic: String::new(),
            })
            .collect();
        let order: Vec<usize> = interleave(targets, 3)
            .iter()
            .map(|t| t.connection)
            .collect();
        assert_eq!(order, [0, 1, 2, 0, 1, 0]);
    }

    #[test]
    fn lag_counts_what_is_neither_acked_nor_dropped() {
        let s = Snapshot {
            records_generated: 100,
            records_acked: 90,
            spool_dropped: 4,
            ..Default::default()
        };
        assert_eq!(s.lag(), 6);
        assert_eq!(device_id("sim-", 7), "sim-00007");
    }
}
