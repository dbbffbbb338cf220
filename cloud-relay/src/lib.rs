//! The tierd cloud relay as a library; `main.rs` is a thin CLI over it. [`Relay::start`] is
//! the composition root: it wires the modules below over one [`state::RelayState`].
//!
//! Shared state
//! - [`state`]: the handles the HTTP and MQTT sides share (fleet, control, counters), and
//!   [`state::publish_config`], the one way a config document leaves the relay.
//!
//! MQTT side
//! - [`escalations`]: answers escalations with the cloud model (shared subscription, bounded
//!   queue, worker pool); owns the MQTT event loop and hands everything else to `intake`.
//! - [`intake`]: spooled telemetry, calibration and config acks (exactly once, acknowledged),
//!   device status, retained config documents.
//! - [`broker`]: the embedded rumqttd used when no broker is configured.
//!
//! Fleet store
//! - [`store`]: what survives restarts (SQLite, or PostgreSQL shared by replicas), batched
//!   writes with acks after commit, and the lease that makes one replica the writer.
//!
//! Domain (pure)
//! - [`fleet`]: every device's latest telemetry, spool streams with gap accounting, status, and
//!   calibration evidence (where the tuner runs).
//! - [`tuner`]: where the escalation threshold is tuned, with a statistical certificate.
//! - [`control`]: where thresholds are pushed: per-device config documents, overrides, acks.
//! - [`report`]: the cost report (money, energy, CO₂) against all-cloud and all-edge.
//!
//! Edges
//! - [`api`]: `/metrics`, `/api/devices`, `/api/report`, `/health` over HTTP.
//! - [`config`]: the `relay.toml` schema.

pub mod api;
pub mod backend;
pub mod broker;
pub mod config;
pub mod control;
pub mod dashboard;
pub mod escalations;
pub mod fleet;
pub mod fleet_table;
pub mod http_auth;
pub mod intake;
pub mod report;
pub mod rollout;
pub mod signing;
pub mod state;
pub mod store;
pub mod tuner;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use backend::Backend;
use thiserror::Error;
use tierd_runtime::link::{Link, LinkOptions, Publisher, Routes, Unstarted};
use tierd_runtime::systemd::AliveGuard;
use tierd_runtime::{Model, ModelError};
use tokio::sync::watch;
use tracing::info;

use crate::config::{ConfigError, RelayConfig};
use crate::escalations::{Escalations, Service};
use crate::intake::Intake;
use crate::state::{RelayState, RelayStats, SharedFleet};

#[derive(Debug, Error)]
pub enum RelayError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("config: {0}")]
    Invalid(config::InvalidConfig),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("cloud model backend: {0}")]
    Backend(String),
    #[error("model.serves: {0}")]
    Serves(#[from] tierd_protocol::TopicError),
    #[error(transparent)]
    Broker(#[from] broker::BrokerError),
    #[error(transparent)]
    Mqtt(#[from] tierd_runtime::mqtt::MqttSetupError),
    #[error("state directory: {0}")]
    State(#[from] control::OverridesError),
    #[error(transparent)]
    Token(#[from] http_auth::TokenError),
    #[error(transparent)]
    SigningKey(#[from] signing::SigningKeyError),
    #[error("rollouts: {0}")]
    Rollouts(#[from] rollout::store::StoreError),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("cannot listen on {addr} (http.listen): {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A started relay: model verified, broker (if embedded) listening, client connecting.
pub struct Relay {
    state: RelayState,
    http_addr: SocketAddr,
    stop: watch::Sender<bool>,
    mqtt: Mqtt,
    http_task: tokio::task::JoinHandle<()>,
    backend: Backend,
    http_alive: Arc<AtomicBool>,
    replica: tokio::task::JoinHandle<()>,
}

/// The MQTT side: one link, the escalation workers and intake routed on it.
struct Mqtt {
    link: Link,
    escalations: Escalations,
}

impl Relay {
    /// The composition root: checks the config and the model, brings up the broker (when
    /// embedded), the HTTP API and the MQTT side over one shared state.
    pub async fn start(config: RelayConfig) -> Result<Self, RelayError> {
        config.validate().map_err(RelayError::Invalid)?;
        tierd_runtime::mqtt::install_crypto_provider();
        let backend = load_backend(&config.model).await?;
        info!(model = %backend.id(), backend = %backend.describe(), "cloud model ready");
        if config.mqtt.is_none() {
            broker::start(config.embedded_broker.listen)?;
        }
        let (listener, http_addr) = bind_http(&config).await?;
        let options = config
            .client_mqtt()
            .options(&format!("cloud-relay-{}", config.relay_id))?;
        let link = Link::open(options, 1024);
        let state = shared_state(&config, &backend.id())?;
        let persist = open_store(&config, http_addr, link.publisher(), &state).await?;
        let state = state.with_persist(persist.clone());
        let (stop, stop_rx) = watch::channel(false);
        let access = http_access(&config, http_addr)?;

        let app = api::router(
            state.clone(),
            api::ApiDeps {
                client: link.publisher(),
                prices: config.prices.clone(),
                state_dir: config.state_dir(),
                delta: config.tuning.delta,
                target: config.tuning.target,
                access,
                metrics: config.metrics.clone(),
            },
        );
        let (http_task, http_alive) = spawn_http(listener, app, stop_rx.clone());
        info!(addr = %http_addr, "serving /metrics and /api/devices");

        let workers = match &config.model.oip {
            // I/O-bound: one worker per request in flight.
            Some(o) => o.concurrency,
            None => config.workers,
        };
        let service = Service {
            backend: backend.clone(),
            serves: config.model.serves.clone(),
            workers,
            queue: config.queue,
            state: state.clone(),
        };
        let filters = escalations::subscriptions(&config.model.serves)?;
        let mqtt = start_mqtt(link, service, filters, state.clone());
        let timing = store::replica::Timing {
            flush: Duration::from_millis(config.store.flush_ms),
            lease: Duration::from_millis(config.store.lease_ms),
            refresh: Duration::from_millis(config.store.refresh_ms),
        };
        let promoted = {
            let (state, publisher) = (state.clone(), mqtt.link.publisher());
            Box::new(move || on_promote(&state, &publisher))
        };
        let replica = tokio::spawn(store::replica::run(
            state.clone(),
            persist,
            timing,
            promoted,
            stop_rx.clone(),
        ));
        Ok(Relay {
            state,
            http_addr,
            stop,
            mqtt,
            http_task,
            backend,
            http_alive,
            replica,
        })
    }

    pub fn stats(&self) -> Arc<RelayStats> {
        self.state.stats.clone()
    }

    /// Where `/metrics` and `/api/devices` are served (useful with port 0).
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    pub fn fleet(&self) -> SharedFleet {
        self.state.fleet.clone()
    }

    /// Runs until `shutdown` resolves, then stops taking escalations and disconnects.
    pub async fn serve(self, shutdown: impl std::future::Future<Output = ()>) {
        let (model, addr) = (self.backend.clone(), self.http_addr);
        let (link, http) = (self.mqtt.link.publisher(), self.http_alive.clone());
        let watchdog = tokio::spawn(tierd_runtime::systemd::run_watchdog(
            move || {
                let (model, link, http) = (model.clone(), link.clone(), http.clone());
                async move { self_check(&model, &link, &http, addr).await }
            },
            self.stop.subscribe(),
        ));
        shutdown.await;
        let _ = self.stop.send(true);
        let _ = watchdog.await;
        // Stop taking escalations, answer the queued ones while the link still carries the
        // replies, then disconnect.
        self.mqtt.escalations.drain().await;
        // The last batch, and its acks while the link still carries them; the lease freed.
        let _ = tokio::time::timeout(Duration::from_secs(5), self.replica).await;
        self.mqtt.link.shutdown(Duration::from_secs(2)).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.http_task).await;
        info!("relay stopped");
    }
}

/// Binds the HTTP API's listener (`http.listen`; port 0 picks one).
async fn bind_http(
    config: &RelayConfig,
) -> Result<(tokio::net::TcpListener, SocketAddr), RelayError> {
    let addr = config.http.listen;
    let bind_error = |source| RelayError::Bind { addr, source };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(bind_error)?;
    let local = listener.local_addr().map_err(bind_error)?;
    Ok((listener, local))
}

/// The HTTP API's guard: the token in force (generated in the state directory when none is
/// configured) and the accepted `Host` names.
fn http_access(
    config: &RelayConfig,
    http_addr: SocketAddr,
) -> Result<http_auth::Access, RelayError> {
    let (token, source) = http_auth::load_or_create_token(&config.http, &config.state_dir())?;
    let reads = if config.http.auth_reads {
        "every route but /health"
    } else {
        "mutating routes"
    };
    match &source {
        http_auth::TokenSource::Generated(p) => {
            info!(token_file = %p.display(), "generated the HTTP API token (set http.token_file to use your own); {reads} need it")
        }
        s => info!(token_file = %s.path().display(), "HTTP API token loaded; {reads} need it"),
    }
    Ok(http_auth::Access::new(token, &config.http, http_addr))
}

/// The fleet view and the config controller, with the operators' overrides restored from the
/// state directory.
fn shared_state(config: &RelayConfig, reference: &str) -> Result<RelayState, RelayError> {
    let state_dir = config.state_dir();
    let operator = control::load_overrides(&state_dir)?;
    if !operator.is_empty() {
        info!(devices = operator.len(), dir = %state_dir.display(), "operator overrides restored");
    }
    let epochs = control::load_epochs(&state_dir)?;
    let key_path = config.signing_key_path();
    let (signer, created) = signing::load_or_create(&key_path)?;
    info!(
        public_key = %signer.public(),
        key_id = %signer.public().key_id(),
        file = %key_path.display(),
        created,
        "config documents are signed with this key; pin it in every agent's [remote_config] trusted_keys"
    );
    let (setup, rules) = config.rollout_setup();
    let rollouts = rollout::store::load(&state_dir, setup, rules)?;
    if !rollouts.rollouts.is_empty() {
        info!(rollouts = rollouts.rollouts.len(), "rollouts restored");
    }
    Ok(RelayState::new(
        fleet::Fleet::new(config.http.max_devices)
            .with_tuner(config.tuner_setup())
            .with_reference(reference),
        control::Control::new(
            config.tuning.push,
            config.push_rules(),
            config.defaults.clone(),
            config.devices.clone(),
            operator,
            config.http.max_devices,
        )
        .with_epochs(epochs)
        .with_serves(config.model.serves.clone()),
        signer,
    )
    .with_rollouts(rollouts, state_dir))
}

/// Opens the fleet store, puts what it holds into memory (rows from before the store, in the
/// state directory's files, are taken over), and takes the writer's lease if it is free.
async fn open_store(
    config: &RelayConfig,
    http_addr: SocketAddr,
    client: Publisher,
    state: &RelayState,
) -> Result<Arc<store::Persist>, RelayError> {
    let url = config.store_url();
    let sql = store::SqlStore::open(&url).await?;
    let shown = sql.shown().to_string();
    let backend = store::FleetStore::backend(&sql);
    let api_url = config
        .store
        .advertise_url
        .clone()
        .unwrap_or_else(|| format!("http://{http_addr}"));
    let persist = Arc::new(store::Persist::new(
        Arc::new(sql),
        client,
        config.relay_id.clone(),
        api_url,
    ));
    let state = state.clone().with_persist(persist.clone());
    let rows = store::replica::restore(&state, &persist).await?;
    let writer = store::replica::try_take(&state, &persist).await?;
    if writer {
        // The fleet-wide rows as memory holds them now: the store's, or (the first time)
        // those the state directory's files held.
        for key in [
            store::persist::OVERRIDES,
            store::persist::EPOCHS,
            store::persist::ROLLOUTS,
        ] {
            state.mark(store::Kind::Kv, key);
        }
    }
    info!(
        store = %shown,
        backend,
        rows,
        role = if writer { "writer" } else { "follower" },
        "fleet store open"
    );
    Ok(persist)
}

/// This replica has just taken the writer's lease over: the retained statuses and config
/// documents again (the old writer filed those it saw; ones that came since are resent by the
/// broker), and the rollout documents in force.
fn on_promote(state: &RelayState, publisher: &Publisher) {
    if let Err(e) = publisher.try_resubscribe(intake::subscriptions()) {
        tracing::warn!(error = %e, "cannot ask the broker for the retained statuses again");
    }
    if let Ok(r) = state.rollouts() {
        let docs = r.newest_documents();
        state.after_rollout_change(publisher, &r, &docs);
    }
}

/// Serves the HTTP API until `stop` flips. The flag is cleared when the task ends (the
/// watchdog's self-check reads it).
fn spawn_http(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    mut stop: watch::Receiver<bool>,
) -> (tokio::task::JoinHandle<()>, Arc<AtomicBool>) {
    let alive = Arc::new(AtomicBool::new(true));
    let down = AliveGuard(alive.clone());
    let task = tokio::spawn(async move {
        let _down = down;
        let shutdown = async move {
            let _ = stop.changed().await;
        };
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!(error = %e, "relay HTTP API failed");
        }
    });
    (task, alive)
}

/// Routes escalations to the worker pool and everything else devices send to intake, then
/// starts the link: one SUBSCRIBE for the shared escalation filter and intake's topics.
fn start_mqtt(
    link: Unstarted,
    service: Service,
    escalation_filters: Vec<rumqttc::v5::mqttbytes::v5::Filter>,
    state: RelayState,
) -> Mqtt {
    let publisher: Publisher = link.publisher();
    let mut routes = Routes::new();
    let escalations = Escalations::start(service, publisher.clone(), &mut routes);
    rollout::serve::route(state.clone(), publisher.clone(), &mut routes);
    // The rollout documents in force, again: a restarted embedded broker forgot them (a
    // device ignores a version it already handled).
    if state.is_writer() {
        if let Ok(r) = state.rollouts() {
            let docs = r.newest_documents();
            state.after_rollout_change(&publisher, &r, &docs);
        }
    }
    Intake::new(state, publisher).route(&mut routes);
    let mut subscriptions = escalation_filters;
    subscriptions.push(rollout::serve::subscription());
    // Not shared: see `intake` for why every replica takes all of these.
    subscriptions.extend(intake::subscriptions());
    let link = link.start(LinkOptions {
        subscriptions,
        routes,
        on_connect: tierd_runtime::link::on_connect(Vec::new()),
        on_stop: Vec::new(),
        ready_line: "connected; taking escalations",
        lost_line: "MQTT connection lost; reconnecting",
    });
    Mqtt { link, escalations }
}

/// Why the watchdog's self-check failed.
#[derive(Debug, Error)]
enum Unhealthy {
    #[error("the escalation loop has stopped")]
    LoopStopped,
    #[error("the HTTP API has stopped")]
    HttpStopped,
    #[error("model self-test failed: {0}")]
    Model(ModelError),
    #[error(transparent)]
    Probe(#[from] tierd_runtime::systemd::ProbeError),
}

/// The cloud model's backend: tract in process (the model verified: sha256, golden vectors),
/// or an OIP server (the manifest checked; its golden vectors run on the server when it is
/// reachable, and a server answering differently is refused).
async fn load_backend(config: &config::ModelConfig) -> Result<Backend, RelayError> {
    let Some(oip) = &config.oip else {
        return Ok(Backend::Tract(Model::load(&config.manifest)?));
    };
    let manifest = tierd_runtime::Manifest::from_path(&config.manifest)?;
    let client = backend::Oip::new(manifest, oip).map_err(|e| {
        RelayError::Backend(format!("cannot build the HTTP client for {}: {e}", oip.url))
    })?;
    match client.verify_golden().await {
        Ok(true) => info!(url = %client.infer_url(), "OIP server answers the golden vectors"),
        Ok(false) => tracing::warn!(
            url = %client.infer_url(),
            "OIP server unreachable at start; escalations fall back on the devices until it answers"
        ),
        Err(e) => return Err(RelayError::Backend(e)),
    }
    Ok(Backend::Oip(Arc::new(client)))
}

/// The watchdog's self-check: both tasks running, an in-process model still reproduces its
/// golden vectors, and the HTTP API answers. (An OIP server being down is not the relay's
/// fault: agents fall back, and the relay answers again when it is back.)
async fn self_check(
    model: &Backend,
    link: &Publisher,
    http: &AtomicBool,
    addr: SocketAddr,
) -> Result<(), Unhealthy> {
    if !link.link_running() {
        return Err(Unhealthy::LoopStopped);
    }
    if !http.load(Ordering::Relaxed) {
        return Err(Unhealthy::HttpStopped);
    }
    if let Backend::Tract(model) = model {
        model.verify_golden().map_err(Unhealthy::Model)?;
    }
    tierd_runtime::systemd::probe_http(addr, "/health")
        .await
        .map_err(Unhealthy::Probe)
}
