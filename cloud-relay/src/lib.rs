//! The tierd cloud relay as a library; `main.rs` is a thin CLI over it.
//!
//! - [`escalations`]: answers escalations with the cloud model (shared subscription, worker pool).
//! - [`broker`]: the embedded rumqttd used when no broker is configured.
//! - [`tuner`]: where the escalation threshold is tuned, with a statistical certificate (pure).
//! - [`control`]: where thresholds are pushed: per-device config documents, overrides, acks (pure).
//! - [`fleet`]: every device's latest telemetry, with sequence-gap accounting (pure).
//! - [`report`]: the cost report (money, energy, CO₂) against all-cloud and all-edge (pure).
//! - [`api`]: `/metrics`, `/api/devices` over HTTP.
//! - [`config`]: the `relay.toml` schema.

pub mod api;
pub mod broker;
pub mod config;
pub mod control;
pub mod escalations;
pub mod fleet;
pub mod intake;
pub mod report;
pub mod state;
pub mod tuner;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::v5::AsyncClient;
use thiserror::Error;
use tierd_runtime::systemd::AliveGuard;
use tierd_runtime::{Model, ModelError};
use tokio::sync::watch;
use tracing::info;

use crate::config::{ConfigError, RelayConfig};
use crate::escalations::Service;
use crate::state::{RelayState, RelayStats, SharedFleet};

#[derive(Debug, Error)]
pub enum RelayError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("config: {0}")]
    Invalid(String),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Broker(#[from] broker::BrokerError),
    #[error(transparent)]
    Mqtt(#[from] tierd_runtime::mqtt::MqttSetupError),
    #[error("state directory: {0}")]
    State(#[from] control::OverridesError),
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
    task: tokio::task::JoinHandle<()>,
    http_task: tokio::task::JoinHandle<()>,
    model: Model,
    loop_alive: Arc<AtomicBool>,
    http_alive: Arc<AtomicBool>,
}

impl Relay {
    pub async fn start(config: RelayConfig) -> Result<Self, RelayError> {
        config.validate().map_err(RelayError::Invalid)?;
        tierd_runtime::mqtt::install_crypto_provider();
        let model = Model::load(&config.model.manifest)?;
        info!(model = %model.id(), "cloud model verified");
        if config.mqtt.is_none() {
            broker::start(config.embedded_broker.listen)?;
        }
        let listener = tokio::net::TcpListener::bind(config.http.listen)
            .await
            .map_err(|e| RelayError::Bind {
                addr: config.http.listen,
                source: e,
            })?;
        let http_addr = listener.local_addr().map_err(|e| RelayError::Bind {
            addr: config.http.listen,
            source: e,
        })?;
        let options = config
            .client_mqtt()
            .options(&format!("cloud-relay-{}", config.relay_id))?;
        let (client, eventloop) = AsyncClient::new(options, 1024);
        let (stop, stop_rx) = watch::channel(false);
        let state_dir = config.state_dir();
        let operator = control::load_overrides(&state_dir)?;
        if !operator.is_empty() {
            info!(devices = operator.len(), dir = %state_dir.display(), "operator overrides restored");
        }
        let state = RelayState::new(
            fleet::Fleet::new(config.http.max_devices).with_tuner(config.tuner_setup()),
            control::Control::new(
                config.tuning.push,
                config.push_rules(),
                config.defaults.clone(),
                config.devices.clone(),
                operator,
                config.http.max_devices,
            ),
        );
        let app = api::router(
            state.clone(),
            api::ApiDeps {
                client: client.clone(),
                prices: config.prices.clone(),
                state_dir,
                delta: config.tuning.delta,
                target: config.tuning.target,
            },
        );
        // The watchdog's self-check reads these; the guards clear them when a task ends.
        let loop_alive = Arc::new(AtomicBool::new(true));
        let http_alive = Arc::new(AtomicBool::new(true));
        let http_down = AliveGuard(http_alive.clone());
        let loop_down = AliveGuard(loop_alive.clone());
        let mut http_stop = stop_rx.clone();
        let http_task = tokio::spawn(async move {
            let _down = http_down;
            let shutdown = async move {
                let _ = http_stop.changed().await;
            };
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
            {
                tracing::error!(error = %e, "relay HTTP API failed");
            }
        });
        info!(addr = %http_addr, "serving /metrics and /api/devices");
        let service = Service {
            model: model.clone(),
            serves: config.model.serves.clone(),
            workers: config.workers,
            queue: config.queue,
            state: state.clone(),
        };
        let task = tokio::spawn(async move {
            let _down = loop_down;
            escalations::run(service, client, eventloop, stop_rx).await;
        });
        Ok(Relay {
            state,
            http_addr,
            stop,
            task,
            http_task,
            model,
            loop_alive,
            http_alive,
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
        let (model, addr) = (self.model.clone(), self.http_addr);
        let alive = [self.loop_alive.clone(), self.http_alive.clone()];
        let watchdog = tokio::spawn(tierd_runtime::systemd::run_watchdog(
            move || {
                let (model, alive) = (model.clone(), alive.clone());
                async move { self_check(&model, &alive, addr).await }
            },
            self.stop.subscribe(),
        ));
        shutdown.await;
        let _ = self.stop.send(true);
        let _ = watchdog.await;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.http_task).await;
        info!("relay stopped");
    }
}

/// The watchdog's self-check: both tasks running, the model still reproduces its golden
/// vectors, and the HTTP API answers.
async fn self_check(
    model: &Model,
    alive: &[Arc<AtomicBool>; 2],
    addr: SocketAddr,
) -> Result<(), String> {
    if !alive[0].load(Ordering::Relaxed) {
        return Err("the escalation loop has stopped".into());
    }
    if !alive[1].load(Ordering::Relaxed) {
        return Err("the HTTP API has stopped".into());
    }
    model
        .verify_golden()
        .map_err(|e| format!("model self-test failed: {e}"))?;
    tierd_runtime::systemd::probe_http(addr, "/health").await
}
