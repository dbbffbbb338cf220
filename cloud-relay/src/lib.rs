//! The tierd cloud relay as a library; `main.rs` is a thin CLI over it.
//!
//! - [`escalations`]: answers escalations with the cloud model (shared subscription, worker pool).
//! - [`broker`]: the embedded rumqttd used when no broker is configured.
//! - [`config`]: the `relay.toml` schema.

pub mod broker;
pub mod config;
pub mod escalations;

use std::sync::Arc;
use std::time::Duration;

use rumqttc::v5::AsyncClient;
use thiserror::Error;
use tierd_runtime::{Model, ModelError};
use tokio::sync::watch;
use tracing::info;

use crate::config::{ConfigError, RelayConfig};
use crate::escalations::{RelayStats, Service};

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
}

/// A started relay: model verified, broker (if embedded) listening, client connecting.
pub struct Relay {
    stats: Arc<RelayStats>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
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
        let options = config
            .client_mqtt()
            .options(&format!("cloud-relay-{}", config.relay_id))?;
        let (client, eventloop) = AsyncClient::new(options, 1024);
        let stats = Arc::new(RelayStats::default());
        let (stop, stop_rx) = watch::channel(false);
        let service = Service {
            model,
            serves: config.model.serves.clone(),
            workers: config.workers,
            queue: config.queue,
            stats: stats.clone(),
        };
        let task = tokio::spawn(escalations::run(service, client, eventloop, stop_rx));
        Ok(Relay { stats, stop, task })
    }

    pub fn stats(&self) -> Arc<RelayStats> {
        self.stats.clone()
    }

    /// Runs until `shutdown` resolves, then stops taking escalations and disconnects.
    pub async fn serve(self, shutdown: impl std::future::Future<Output = ()>) {
        shutdown.await;
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
        info!("relay stopped");
    }
}
