//! The tierd edge agent as a library; `main.rs` is a thin CLI over it.
//!
//! - [`cascade`]: where escalation is decided (pure).
//! - [`oip`]: Open Inference Protocol v2 parsing (pure).
//! - [`http`]: the local API and admission control.
//! - [`escalation`]: the MQTT path to the relay, with deadlines and fallback.
//! - [`telemetry`]: latency histograms, counters and the periodic report over MQTT.
//! - [`metrics`]: `/metrics` in the Prometheus text format.
//! - [`evidence`]: per-bin counts and background audits for the relay's tuner.
//! - [`energy`]: where energy is measured (one module per meter) and attributed.
//! - [`config`]: the `agent.toml` schema.
//!
//! [`Agent::start`] does everything that can fail (config checks, model verification, binding the
//! port, TLS setup) before it returns, so "started" means "ready to serve" — the moment a
//! supervisor such as systemd should be told.

pub mod cascade;
pub mod config;
pub mod energy;
pub mod escalation;
pub mod evidence;
pub mod http;
pub mod metrics;
pub mod oip;
pub mod telemetry;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tierd_runtime::{Model, ModelError};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::info;

pub use tierd_runtime::shutdown_signal;

use crate::cascade::Signal;
use crate::config::{AgentConfig, ConfigError};
use crate::energy::sampler::Sampler;
use crate::energy::Roots;
use crate::escalation::{Escalator, MqttStats};
use crate::http::Admission;
use crate::telemetry::{DeviceProbe, LatestReport, Recorder, Reporter};

/// The cascade settings in force; swapped live when remote config arrives.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    pub threshold: f32,
    pub signal: Signal,
    pub escalation_timeout: Duration,
}

/// State shared by every request handler.
pub struct AppState {
    pub model: Model,
    pub escalator: Escalator,
    pub policy: watch::Receiver<Policy>,
    pub admission: Admission,
    pub recorder: Arc<Recorder>,
    pub evidence: Arc<evidence::Evidence>,
    pub metrics: prometheus_client::registry::Registry,
    pub max_body_bytes: usize,
}

#[derive(Debug, Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Mqtt(#[from] tierd_runtime::mqtt::MqttSetupError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("invalid device id: {0}")]
    DeviceId(#[from] tierd_protocol::TopicError),
    #[error("HTTP server failed: {0}")]
    Serve(std::io::Error),
    #[error("cannot start the energy sampler thread: {0}")]
    Sampler(std::io::Error),
}

/// A started agent: model verified, port bound, MQTT connecting in the background.
pub struct Agent {
    state: Arc<AppState>,
    listener: TcpListener,
    policy_tx: watch::Sender<Policy>,
    mqtt_task: tokio::task::JoinHandle<()>,
    stop_mqtt: watch::Sender<bool>,
    telemetry_task: Option<tokio::task::JoinHandle<()>>,
    stop_telemetry: watch::Sender<bool>,
    latest: LatestReport,
    mqtt_alive: Arc<AtomicBool>,
}

/// What the systemd watchdog checks before each ping: the HTTP server answers its own health
/// route, the model still reproduces its golden vectors, and the MQTT task is running.
#[derive(Clone)]
pub struct Health {
    state: Arc<AppState>,
    addr: SocketAddr,
    mqtt_alive: Arc<AtomicBool>,
}

impl Health {
    pub async fn check(&self) -> Result<(), String> {
        if !self.mqtt_alive.load(Ordering::Relaxed) {
            return Err("the MQTT task has stopped".into());
        }
        self.state
            .model
            .verify_golden()
            .map_err(|e| format!("model self-test failed: {e}"))?;
        tierd_runtime::systemd::probe_http(self.addr, "/v2/health/live").await
    }
}

impl Agent {
    pub async fn start(config: AgentConfig) -> Result<Self, AgentError> {
        config.validate()?;
        tierd_runtime::mqtt::install_crypto_provider();
        let model = Model::load(&config.model.manifest)?;
        info!(model = %model.id(), golden = model.manifest().golden.len(), "model verified");
        let boot_id = tierd_runtime::unix_ms();
        let mut options = config.mqtt.options(&config.default_client_id())?;
        // The broker publishes this, retained, if the connection dies without a clean
        // DISCONNECT; a clean stop publishes its own "stopped" status instead.
        let status_topic =
            tierd_protocol::Topic::new(&config.device_id, tierd_protocol::TopicKind::Status)?
                .to_string();
        let will = escalation::status_payload(false, boot_id, "connection lost");
        options.set_last_will(rumqttc::v5::mqttbytes::v5::LastWill::new(
            status_topic,
            will,
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            true,
            None,
        ));
        let (escalator, eventloop) = Escalator::new(
            options,
            &config.device_id,
            config.cascade.max_in_flight,
            boot_id,
        )?;
        let listener =
            TcpListener::bind(config.http.listen)
                .await
                .map_err(|e| AgentError::Bind {
                    addr: config.http.listen,
                    source: e,
                })?;
        let policy = Policy {
            threshold: config.cascade.threshold,
            signal: config.cascade.signal,
            escalation_timeout: config.escalation_timeout(),
        };
        let (policy_tx, policy_rx) = watch::channel(policy);
        let (stop_mqtt, stop_rx) = watch::channel(false);
        let recorder = Arc::new(Recorder::new(config.telemetry.enabled));
        let evidence = Arc::new(evidence::Evidence::new(
            config.cascade.audit_rate,
            config.cascade.max_audits_per_second,
        ));
        let latest = LatestReport::default();
        let metrics = metrics::registry(
            &config.device_id,
            recorder.clone(),
            escalator.stats().clone(),
            policy_rx.clone(),
            latest.clone(),
        );
        let (stop_telemetry, stop_telemetry_rx) = watch::channel(false);
        let telemetry_task = if config.telemetry.enabled {
            let roots = Roots::default();
            let stat_path = roots.proc_self_stat.clone();
            let sampler = Sampler::start(
                config.energy.source,
                roots,
                config.energy.ina219.clone(),
                Duration::from_millis(config.energy.sample_interval_ms),
            )
            .map_err(AgentError::Sampler)?;
            let energy = sampler.state();
            info!(meter = %energy.meter, estimated = energy.estimated, "energy meter");
            let reporter = Reporter {
                device_id: config.device_id.clone(),
                boot_id,
                model: model.id(),
                interval: config.telemetry_interval(),
                recorder: recorder.clone(),
                evidence: evidence.clone(),
                mqtt: escalator.stats().clone(),
                policy: policy_rx.clone(),
                sampler,
                device: DeviceProbe::new(stat_path),
                link: config.energy.link_model(),
                latest: latest.clone(),
            };
            let sink = escalator.report_sink(&config.device_id)?;
            Some(tokio::spawn(telemetry::run(
                reporter,
                sink,
                stop_telemetry_rx,
            )))
        } else {
            None
        };
        let mqtt_alive = Arc::new(AtomicBool::new(true));
        let guard = tierd_runtime::systemd::AliveGuard(mqtt_alive.clone());
        let mqtt_escalator = escalator.clone();
        let mqtt_task = tokio::spawn(async move {
            let _guard = guard;
            escalation::run_event_loop(mqtt_escalator, eventloop, stop_rx).await;
        });
        let state = Arc::new(AppState {
            model,
            escalator,
            policy: policy_rx,
            admission: Admission::new(config.http.max_concurrent, config.http.max_queued),
            recorder,
            evidence,
            metrics,
            max_body_bytes: config.http.max_body_bytes,
        });
        Ok(Agent {
            state,
            listener,
            policy_tx,
            mqtt_task,
            stop_mqtt,
            telemetry_task,
            stop_telemetry,
            latest,
            mqtt_alive,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Counters and latency histograms of the request path.
    pub fn recorder(&self) -> Arc<Recorder> {
        self.state.recorder.clone()
    }

    /// The last telemetry report published (None before the first interval ends).
    pub fn latest_report(&self) -> LatestReport {
        self.latest.clone()
    }

    pub fn mqtt_stats(&self) -> Arc<MqttStats> {
        self.state.escalator.stats().clone()
    }

    /// Whether the MQTT session to the broker is up (escalations possible).
    pub fn mqtt_connected(&self) -> bool {
        self.state.escalator.is_connected()
    }

    /// A handle that reports the MQTT connection state after `serve` has taken the agent.
    pub fn escalator(&self) -> Escalator {
        self.state.escalator.clone()
    }

    /// The watchdog's self-check (see [`Health`]).
    pub fn health(&self) -> std::io::Result<Health> {
        Ok(Health {
            state: self.state.clone(),
            addr: self.local_addr()?,
            mqtt_alive: self.mqtt_alive.clone(),
        })
    }

    pub fn policy(&self) -> Policy {
        *self.policy_tx.borrow()
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets in-flight requests finish,
    /// and closes the MQTT session.
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), AgentError> {
        let addr = self.local_addr().map_err(AgentError::Serve)?;
        info!(%addr, "serving Open Inference Protocol v2");
        let health = self.health().map_err(AgentError::Serve)?;
        let (stop_watchdog, watchdog_rx) = watch::channel(false);
        let watchdog = tokio::spawn(tierd_runtime::systemd::run_watchdog(
            move || {
                let h = health.clone();
                async move { h.check().await }
            },
            watchdog_rx,
        ));
        let app = http::router(self.state.clone());
        let served = axum::serve(self.listener, app)
            .with_graceful_shutdown(shutdown)
            .await
            .map_err(AgentError::Serve);
        let _ = stop_watchdog.send(true);
        let _ = watchdog.await;
        served?;
        // The last report covers the final partial window, so a clean stop loses no counts;
        // it is queued before MQTT is closed, and the disconnect flushes it.
        let _ = self.stop_telemetry.send(true);
        if let Some(t) = self.telemetry_task {
            let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
        }
        info!("HTTP drained; closing MQTT");
        let _ = self.stop_mqtt.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(2), self.mqtt_task).await;
        Ok(())
    }
}
