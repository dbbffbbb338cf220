//! One MQTT link per daemon: the only owner of the rumqttc event loop.
//!
//! Both daemons talk to the broker through a [`Link`]: it connects, reconnects with jittered
//! backoff, subscribes again on every connect (a broker that lost the session no longer has
//! the subscriptions, and subscribing again is also what makes it send retained documents),
//! follows the connection state, publishes what the daemon asked for on every connect (the
//! agent's retained "online" status) and before a clean stop ("stopped"), and disconnects
//! cleanly so the broker does not publish the last will. Inbound publishes are routed by their
//! tierd [`TopicKind`] into bounded channels (or, on the latency-critical reply path, straight
//! into a handler without a thread hop); everything else holds a cloneable [`Publisher`].
//!
//! The pattern is `bytebeam/rumqtt`'s (a pure state machine apart from the event loop) and
//! `bytebeam/uplink`'s (one MQTT owner routing into channels):
//! - [`Session`] is pure: what to do on CONNACK, SUBACK and errors (subscribe, mark connected,
//!   count a reconnect, how long to back off). Unit-tested without a broker.
//! - [`Link::spawn`] is the I/O around it.
//!
//! A full channel drops the newest message for that kind and counts it ([`LinkStats`]): every
//! consumer is fed by QoS 1 traffic that is resent, retained or superseded (config documents,
//! cumulative acks, spooled records resent by go-back-N), so the loop never blocks on a slow
//! consumer and keeps serving the others.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{Filter, Packet, Publish, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, ClientError, Event, EventLoop, MqttOptions};
use tierd_protocol::{Topic, TopicKind};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::mqtt::Backoff;

/// A message the link publishes on the daemon's behalf (on connect, before a clean stop).
#[derive(Debug, Clone)]
pub struct Message {
    pub topic: String,
    pub qos: QoS,
    pub retain: bool,
    pub payload: Bytes,
}

/// Called on the event loop's task for every publish of its kind, with the topic already
/// parsed: must not block.
pub type Handler = Arc<dyn Fn(Topic, Publish) + Send + Sync>;

enum Route {
    Channel(mpsc::Sender<Publish>),
    Handler(Handler),
}

/// Where inbound publishes go, by the kind of tierd topic they arrive on.
#[derive(Default)]
pub struct Routes {
    routes: HashMap<TopicKind, Route>,
}

impl Routes {
    pub fn new() -> Self {
        Routes::default()
    }

    /// Publishes of `kind` go into a bounded channel of `capacity`; returns its receiving end.
    pub fn channel(&mut self, kind: TopicKind, capacity: usize) -> mpsc::Receiver<Publish> {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        self.routes.insert(kind, Route::Channel(tx));
        rx
    }

    /// Publishes of `kind` are handed to `handler` on the event loop's task (no hop).
    pub fn handler(&mut self, kind: TopicKind, handler: Handler) {
        self.routes.insert(kind, Route::Handler(handler));
    }
}

/// The messages published after every connect, replaceable while the link runs.
pub type OnConnect = Arc<std::sync::Mutex<Vec<Message>>>;

/// `messages` as the link's [`OnConnect`].
pub fn on_connect(messages: Vec<Message>) -> OnConnect {
    Arc::new(std::sync::Mutex::new(messages))
}

/// What the link is asked to do; built by each daemon's composition root.
pub struct LinkOptions {
    /// Subscribed, in one SUBSCRIBE, after every connect.
    pub subscriptions: Vec<Filter>,
    pub routes: Routes,
    /// Published after every confirmed subscription (e.g. a retained "online" status); the
    /// owner may replace them while the link runs (a new model announced in the status).
    pub on_connect: OnConnect,
    /// Published before the clean DISCONNECT, if connected (e.g. a retained "stopped").
    pub on_stop: Vec<Message>,
    /// The INFO line logged each time the subscriptions are confirmed (a readiness signal).
    pub ready_line: &'static str,
    /// The WARN line logged when an established connection is lost.
    pub lost_line: &'static str,
}

/// Counters of the link itself (consumers count their own payloads).
#[derive(Debug, Default)]
pub struct LinkStats {
    pub reconnects: AtomicU64,
    /// Publishes on a topic that is not a tierd topic or has no route.
    pub unroutable: AtomicU64,
    /// Publishes dropped because their consumer's channel was full.
    pub dropped_full: AtomicU64,
}

/// Why a publish could not be queued.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The request queue is full, or the link has stopped.
    #[error("MQTT request queue is full or closed")]
    Queue,
}

/// A cloneable handle for publishing through the link and following its connection.
#[derive(Clone)]
pub struct Publisher {
    client: AsyncClient,
    connection: watch::Receiver<bool>,
    stats: Arc<LinkStats>,
}

impl Publisher {
    /// Queues a publish without waiting; fails at once if the request queue is full.
    pub fn try_publish(
        &self,
        topic: &str,
        qos: QoS,
        retain: bool,
        payload: impl Into<Bytes>,
    ) -> Result<(), PublishError> {
        self.try_publish_with_properties(topic, qos, retain, payload, PublishProperties::default())
    }

    /// Queues a publish with MQTT v5 properties without waiting.
    pub fn try_publish_with_properties(
        &self,
        topic: &str,
        qos: QoS,
        retain: bool,
        payload: impl Into<Bytes>,
        properties: PublishProperties,
    ) -> Result<(), PublishError> {
        self.client
            .try_publish_with_properties(topic, qos, retain, payload, properties)
            .map_err(|_: ClientError| PublishError::Queue)
    }

    /// Queues a publish with MQTT v5 properties, waiting for room in the request queue.
    pub async fn publish_with_properties(
        &self,
        topic: &str,
        qos: QoS,
        retain: bool,
        payload: impl Into<Bytes>,
        properties: PublishProperties,
    ) -> Result<(), PublishError> {
        self.client
            .publish_with_properties(topic, qos, retain, payload, properties)
            .await
            .map_err(|_: ClientError| PublishError::Queue)
    }

    /// Subscribes again to `filters` (already in the link's list): the broker sends their
    /// retained messages anew, e.g. to a relay replica that has just taken over.
    pub fn try_resubscribe(&self, filters: Vec<Filter>) -> Result<(), PublishError> {
        self.client
            .try_subscribe_many(filters)
            .map_err(|_: ClientError| PublishError::Queue)
    }

    /// True once the subscriptions are confirmed after a (re)connect; false when lost.
    pub fn is_connected(&self) -> bool {
        *self.connection.borrow()
    }

    /// Follows the connection state (see [`Publisher::is_connected`]).
    pub fn connection(&self) -> watch::Receiver<bool> {
        self.connection.clone()
    }

    pub fn stats(&self) -> &Arc<LinkStats> {
        &self.stats
    }

    /// False once the link's event-loop task has ended, for whatever reason (the watchdog's
    /// self-check reads it).
    pub fn link_running(&self) -> bool {
        self.connection.has_changed().is_ok()
    }
}

/// What the event loop should do after an event. Produced by [`Session`], carried out by
/// [`Link::spawn`].
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Connected: send the subscriptions.
    Subscribe,
    /// Subscriptions confirmed: mark connected, log, publish the on-connect messages.
    Ready {
        reconnect: bool,
    },
    /// The connection failed or dropped: mark disconnected and wait this long.
    Backoff {
        delay: Duration,
        /// An established connection was lost (logged at WARN); else a failed attempt.
        lost: bool,
    },
    Nothing,
}

/// The connection's state machine. Pure: no I/O, no clock beyond the backoff's jitter.
#[derive(Debug)]
pub struct Session {
    backoff: Backoff,
    connected: bool,
    ever_ready: bool,
}

impl Session {
    pub fn new(backoff: Backoff) -> Self {
        Session {
            backoff,
            connected: false,
            ever_ready: false,
        }
    }

    pub fn on_connack(&mut self) -> Step {
        self.backoff.reset();
        Step::Subscribe
    }

    /// Escalations (and anything waiting for replies) may start only now: before the SUBACK a
    /// reply could be dropped by the broker and its caller would wait out its timeout.
    pub fn on_suback(&mut self) -> Step {
        if self.connected {
            // A later SUBACK on the same connection: nothing new.
            return Step::Nothing;
        }
        self.connected = true;
        let reconnect = self.ever_ready;
        self.ever_ready = true;
        Step::Ready { reconnect }
    }

    pub fn on_error(&mut self) -> Step {
        let lost = std::mem::replace(&mut self.connected, false);
        Step::Backoff {
            delay: self.backoff.next_delay(),
            lost,
        }
    }

    pub fn is_connected(&self) -> bool {
        self.connected
    }
}

/// A running link: the event-loop task and its publisher.
pub struct Link {
    publisher: Publisher,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// A link whose client exists (so its [`Publisher`] can be handed to the handlers that will be
/// routed to) but whose event loop is not running yet.
pub struct Unstarted {
    client: AsyncClient,
    eventloop: EventLoop,
    connection: watch::Sender<bool>,
    publisher: Publisher,
}

impl Unstarted {
    pub fn publisher(&self) -> Publisher {
        self.publisher.clone()
    }

    /// Spawns the event loop (it connects in the background).
    pub fn start(self, options: LinkOptions) -> Link {
        let LinkOptions {
            subscriptions,
            routes,
            on_connect,
            on_stop,
            ready_line,
            lost_line,
        } = options;
        let (stop, stop_rx) = watch::channel(false);
        let io = EventLoopIo {
            client: self.client,
            eventloop: self.eventloop,
            subscriptions,
            routes,
            on_connect,
            on_stop,
            ready_line,
            lost_line,
            connection: self.connection,
            stats: self.publisher.stats.clone(),
        };
        let task = tokio::spawn(io.run(stop_rx));
        Link {
            publisher: self.publisher,
            stop,
            task,
        }
    }
}

impl Link {
    /// Creates the client; `queue` is the capacity of rumqttc's request queue (our own
    /// publishes waiting for the socket). Nothing connects until [`Unstarted::start`].
    pub fn open(mqtt: MqttOptions, queue: usize) -> Unstarted {
        let (client, eventloop) = AsyncClient::new(mqtt, queue.max(1));
        let (connection, connection_rx) = watch::channel(false);
        let publisher = Publisher {
            client: client.clone(),
            connection: connection_rx,
            stats: Arc::new(LinkStats::default()),
        };
        Unstarted {
            client,
            eventloop,
            connection,
            publisher,
        }
    }

    pub fn publisher(&self) -> Publisher {
        self.publisher.clone()
    }

    /// Publishes the on-stop messages (if connected), disconnects cleanly and waits (bounded)
    /// for the event loop to end.
    pub async fn shutdown(self, timeout: Duration) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(timeout, self.task).await;
    }
}

/// How often a failing connect is reported: the first failure at once, then at most one line
/// per this interval, with the number of attempts in between.
pub const CONNECT_FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(30);

/// Rate limit for "MQTT connect failed" lines. Pure: the caller passes the clock.
#[derive(Debug, Default)]
pub struct ConnectFailureLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl ConnectFailureLog {
    /// A failed attempt at `now`: `Some(n)` to log it (with `n` attempts not logged since the
    /// last line), `None` to stay quiet.
    pub fn on_failure(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(t) if now.saturating_duration_since(t) < CONNECT_FAILURE_LOG_INTERVAL => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }

    /// Connected: the next failure is reported at once.
    pub fn reset(&mut self) {
        *self = ConnectFailureLog::default();
    }
}

/// A connect error and its causes on one line, with what it most likely means in front (what
/// the link's WARN line and `edge-agent doctor` print).
pub fn describe_connect_error(e: &(dyn std::error::Error + 'static)) -> String {
    let line = crate::logging::error_chain(e);
    match connect_hint(&line) {
        Some(hint) => format!("{hint} ({line})"),
        None => line,
    }
}

/// What a connect error most likely means, in the operator's words, for the failures seen in
/// the field (TLS alerts and certificate checks, refused or unreachable brokers). Pure.
pub fn connect_hint(error: &str) -> Option<&'static str> {
    const HINTS: &[(&str, &str)] = &[
        (
            "CertificateRequired",
            "TLS: the broker requires a client certificate (set client_cert_file and client_key_file)",
        ),
        (
            "UnknownCA",
            "TLS: the broker does not trust our client certificate (signed by another CA?)",
        ),
        (
            "BadCertificate",
            "TLS: the broker rejected our client certificate",
        ),
        (
            "CertificateUnknown",
            "TLS: the broker rejected our client certificate",
        ),
        (
            "NotValidForName",
            "TLS: the broker's certificate does not name the host we dialled (server name mismatch)",
        ),
        (
            "not valid for name",
            "TLS: the broker's certificate does not name the host we dialled (server name mismatch)",
        ),
        (
            "UnknownIssuer",
            "TLS: the broker's certificate is not signed by our ca_file",
        ),
        (
            // A CA of the same name as ours but another key signed it.
            "BadSignature",
            "TLS: the broker's certificate is not signed by our ca_file",
        ),
        ("Expired", "TLS: a certificate has expired"),
        (
            "InvalidDnsNameError",
            "TLS: the broker host is not a valid server name",
        ),
        // Before "Connection refused": rumqttc words a refused CONNACK "Connection refused,
        // return code: `NotAuthorized`".
        ("NotAuthorized", "the broker refused our credentials"),
        ("BadUserNamePassword", "the broker refused our credentials"),
        (
            "Connection refused",
            "nothing accepts connections at the broker's address",
        ),
    ];
    HINTS
        .iter()
        .find(|(needle, _)| error.contains(needle))
        .map(|(_, hint)| *hint)
}

struct EventLoopIo {
    client: AsyncClient,
    eventloop: EventLoop,
    subscriptions: Vec<Filter>,
    routes: Routes,
    on_connect: OnConnect,
    on_stop: Vec<Message>,
    ready_line: &'static str,
    lost_line: &'static str,
    connection: watch::Sender<bool>,
    stats: Arc<LinkStats>,
}

impl EventLoopIo {
    async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut session = Session::new(Backoff::new(
            Duration::from_millis(100),
            Duration::from_secs(5),
        ));
        let mut connect_log = ConnectFailureLog::default();
        loop {
            let event = tokio::select! {
                _ = shutdown.changed() => break,
                ev = self.eventloop.poll() => ev,
            };
            let step = match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => session.on_connack(),
                Ok(Event::Incoming(Packet::SubAck(_))) => session.on_suback(),
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    self.route(p);
                    Step::Nothing
                }
                Ok(_) => Step::Nothing,
                Err(e) => {
                    let step = session.on_error();
                    if let Step::Backoff { lost, .. } = step {
                        if lost {
                            warn!(error = %e, "{}", self.lost_line);
                        } else if let Some(suppressed) = connect_log.on_failure(Instant::now()) {
                            let reason = describe_connect_error(&e);
                            if suppressed == 0 {
                                warn!("MQTT connect failed: {reason}");
                            } else {
                                warn!(
                                    "MQTT connect failed: {reason} ({suppressed} more failed \
                                     attempts since the last report)"
                                );
                            }
                        }
                    }
                    step
                }
            };
            match step {
                Step::Subscribe => {
                    if let Err(e) = self.client.try_subscribe_many(self.subscriptions.clone()) {
                        warn!(error = %e, "cannot queue subscription");
                    }
                }
                Step::Ready { reconnect } => {
                    connect_log.reset();
                    if reconnect {
                        self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                    }
                    self.set_connected(true);
                    info!("{}", self.ready_line);
                    let messages = self
                        .on_connect
                        .lock()
                        .map(|m| m.clone())
                        .unwrap_or_default();
                    self.publish_all(&messages);
                }
                Step::Backoff { delay, .. } => {
                    self.set_connected(false);
                    tokio::select! {
                        _ = shutdown.changed() => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
                Step::Nothing => {}
            }
        }
        // Queued before the DISCONNECT, so a clean stop leaves them (a clean DISCONNECT also
        // tells the broker not to publish the will).
        if session.is_connected() {
            self.publish_all(&self.on_stop);
        }
        self.set_connected(false);
        crate::mqtt::disconnect(&self.client, &mut self.eventloop).await;
    }

    /// Followers wake only on a change, not on every failed reconnect attempt.
    fn set_connected(&self, up: bool) {
        self.connection
            .send_if_modified(|c| std::mem::replace(c, up) != up);
    }

    fn publish_all(&self, messages: &[Message]) {
        for m in messages {
            if let Err(e) = self
                .client
                .try_publish(&m.topic, m.qos, m.retain, m.payload.clone())
            {
                warn!(topic = %m.topic, error = %e, "cannot queue a link message");
            }
        }
    }

    fn route(&self, publish: Publish) {
        let kind = std::str::from_utf8(&publish.topic)
            .ok()
            .and_then(|t| Topic::parse(t).ok());
        match kind.as_ref().and_then(|t| self.routes.routes.get(&t.kind)) {
            Some(Route::Handler(h)) => {
                if let Some(topic) = kind {
                    h(topic, publish)
                }
            }
            Some(Route::Channel(tx)) => {
                if tx.try_send(publish).is_err() {
                    self.stats.dropped_full.fetch_add(1, Ordering::Relaxed);
                    warn!(
                        ?kind,
                        "inbound messages arriving faster than they are handled; one dropped"
                    );
                }
            }
            None => {
                self.stats.unroutable.fetch_add(1, Ordering::Relaxed);
                warn!(
                    topic = %String::from_utf8_lossy(&publish.topic).chars().take(200).collect::<String>(),
                    "message on an unexpected topic ignored"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn connect_hints_name_the_tls_failure() {
        let hint = |e: &str| super::connect_hint(e).unwrap_or("");
        assert!(
            hint("IO: received fatal alert: CertificateRequired").contains("client certificate")
        );
        assert!(hint("invalid peer certificate: NotValidForName").contains("server name mismatch"));
        assert!(hint("invalid peer certificate: UnknownIssuer").contains("ca_file"));
        assert!(hint("I/O: Connection refused (os error 111)").contains("nothing accepts"));
        assert_eq!(super::connect_hint("something new"), None);
    }

    use super::*;

    fn session() -> Session {
        Session::new(Backoff::new(
            Duration::from_millis(100),
            Duration::from_secs(5),
        ))
    }

    #[test]
    fn connect_failures_are_reported_first_then_every_30_s_with_a_count() {
        let mut log = ConnectFailureLog::default();
        let t0 = Instant::now();
        assert_eq!(log.on_failure(t0), Some(0), "the first failure is reported");
        for i in 1..=5 {
            assert_eq!(log.on_failure(t0 + Duration::from_secs(i)), None);
        }
        assert_eq!(log.on_failure(t0 + Duration::from_secs(30)), Some(5));
        assert_eq!(log.on_failure(t0 + Duration::from_secs(31)), None);
        log.reset();
        assert_eq!(log.on_failure(t0 + Duration::from_secs(32)), Some(0));
    }

    #[test]
    fn one_line_skips_causes_already_in_the_message() {
        #[derive(Debug, thiserror::Error)]
        #[error("TLS: {0}")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::other("bad\ncert"));
        assert_eq!(describe_connect_error(&e), "TLS: bad cert");
    }

    #[test]
    fn ready_only_after_suback_and_reconnects_are_counted_once() {
        let mut s = session();
        assert_eq!(s.on_connack(), Step::Subscribe);
        assert!(!s.is_connected(), "a CONNACK alone is not ready");
        assert_eq!(s.on_suback(), Step::Ready { reconnect: false });
        assert!(s.is_connected());
        assert_eq!(
            s.on_suback(),
            Step::Nothing,
            "a second SUBACK changes nothing"
        );
        match s.on_error() {
            Step::Backoff { lost, .. } => assert!(lost, "an established connection was lost"),
            other => panic!("{other:?}"),
        }
        assert!(!s.is_connected());
        assert_eq!(s.on_connack(), Step::Subscribe);
        assert_eq!(s.on_suback(), Step::Ready { reconnect: true });
    }

    #[test]
    fn failed_attempts_back_off_and_are_not_losses() {
        let mut s = session();
        let mut delays = Vec::new();
        for _ in 0..6 {
            match s.on_error() {
                Step::Backoff { delay, lost } => {
                    assert!(!lost);
                    delays.push(delay);
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(delays[0] <= Duration::from_millis(100));
        assert!(delays[5] >= Duration::from_millis(1600), "{delays:?}");
        // A CONNACK resets the backoff.
        s.on_connack();
        match s.on_error() {
            Step::Backoff { delay, .. } => assert!(delay <= Duration::from_millis(100)),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn routes_by_topic_kind_and_counts_what_it_cannot_route() {
        let mut routes = Routes::new();
        let mut config = routes.channel(TopicKind::Config, 1);
        let seen = Arc::new(AtomicU64::new(0));
        let s = seen.clone();
        routes.handler(
            TopicKind::EscalateReply,
            Arc::new(move |_t, _p| {
                s.fetch_add(1, Ordering::Relaxed);
            }),
        );
        let (client, eventloop) = AsyncClient::new(MqttOptions::new("t", "127.0.0.1", 1), 4);
        let io = EventLoopIo {
            client,
            eventloop,
            subscriptions: vec![],
            routes,
            on_connect: on_connect(vec![]),
            on_stop: vec![],
            ready_line: "",
            lost_line: "",
            connection: watch::channel(false).0,
            stats: Arc::new(LinkStats::default()),
        };
        let publish = |topic: &str| Publish::new(topic, QoS::AtLeastOnce, "x", None);
        io.route(publish("tierd/v1/dev-1/config"));
        io.route(publish("tierd/v1/dev-1/config"));
        io.route(publish("tierd/v1/dev-1/reply"));
        io.route(publish("tierd/v1/dev-1/nonsense"));
        io.route(publish("elsewhere"));
        assert_eq!(
            config.recv().await.unwrap().topic.as_ref(),
            b"tierd/v1/dev-1/config"
        );
        assert!(config.try_recv().is_err());
        assert_eq!(seen.load(Ordering::Relaxed), 1);
        assert_eq!(io.stats.dropped_full.load(Ordering::Relaxed), 1);
        assert_eq!(io.stats.unroutable.load(Ordering::Relaxed), 2);
    }
}
