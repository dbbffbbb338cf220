//! The tierd edge agent as a library; `main.rs` is a thin CLI over it.
//!
//! - [`cascade`]: where escalation is decided (pure).
//! - [`oip`]: Open Inference Protocol v2 parsing (pure).
//! - [`http`]: the local API and admission control.
//! - [`escalation`]: the MQTT path to the relay, with deadlines and fallback.
//! - [`spool`] and [`forward`]: store-and-forward of reports and acks, acknowledged end to end.
//! - [`remote_config`]: the relay's config document: checked, persisted, applied live.
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
pub mod forward;
pub mod http;
pub mod metrics;
pub mod oip;
pub mod remote_config;
pub mod spool;
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

/// The settings in force: `agent.toml`, overlaid by the remote config document last applied.
/// Swapped live (a `watch` channel) when a new document is applied.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    pub threshold: f32,
    pub signal: Signal,
    pub escalation_timeout: Duration,
    pub audit_rate: f64,
    pub telemetry_interval: Duration,
    /// Version of the remote document in force; 0 = `agent.toml` only.
    pub config_version: u64,
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
    #[error("state directory {path}: {source}")]
    StateDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Spool(#[from] spool::SpoolError),
}

/// How long the broker keeps the agent's session (subscriptions, queued QoS 1 messages such as
/// config documents and spool acks) while it is offline: a day covers an overnight outage;
/// after that the retained config document still reaches it at the next subscribe.
pub const SESSION_EXPIRY_S: u32 = 86_400;

/// A started agent: model verified, port bound, MQTT connecting in the background.
pub struct Agent {
    state: Arc<AppState>,
    listener: TcpListener,
    mqtt_task: tokio::task::JoinHandle<()>,
    forward_task: tokio::task::JoinHandle<()>,
    stop_forward: watch::Sender<bool>,
    config_task: tokio::task::JoinHandle<()>,
    flush_timeout: Duration,
    spool: forward::SpoolSink,
    stop_mqtt: watch::Sender<bool>,
    telemetry_task: Option<tokio::task::JoinHandle<()>>,
    stop_telemetry: watch::Sender<bool>,
    latest: LatestReport,
    mqtt_alive: Arc<AtomicBool>,
}

/// Handles one config document: applies it (policy and audit rate) or not, and spools the ack.
fn apply_remote(
    remote: &mut remote_config::RemoteConfig,
    payload: &[u8],
    policy_tx: &watch::Sender<Policy>,
    evidence: &evidence::Evidence,
    sink: &forward::SpoolSink,
) {
    use crate::telemetry::ReportSink;
    let ack = match remote.handle(payload) {
        remote_config::Outcome::Unchanged => return,
        remote_config::Outcome::Applied(policy, ack) => {
            evidence.set_audit_rate(policy.audit_rate);
            policy_tx.send_replace(policy);
            info!(
                version = ack.version,
                threshold = policy.threshold,
                signal = policy.signal.as_str(),
                audit_rate = policy.audit_rate,
                "remote config applied"
            );
            tierd_runtime::systemd::status(&format!(
                "serving; remote config version {} applied (threshold {})",
                ack.version, policy.threshold
            ));
            ack
        }
        remote_config::Outcome::Rejected(ack) => {
            tracing::warn!(version = ack.version, reason = %ack.reason, "remote config rejected; settings unchanged");
            ack
        }
    };
    match tierd_protocol::encode(&ack) {
        Ok(bytes) => {
            if let Err(e) = sink.send(tierd_protocol::RecordKind::ConfigAck, bytes) {
                tracing::warn!(error = %e, "config ack not spooled");
            }
        }
        Err(e) => tracing::warn!(error = %e, "config ack cannot be encoded"),
    }
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
        let state_dir = config.state_dir();
        std::fs::create_dir_all(&state_dir).map_err(|e| AgentError::StateDir {
            path: state_dir.clone(),
            source: e,
        })?;
        let (spool, recovery) =
            spool::Spool::open(&state_dir.join("spool"), config.spool.max_bytes)?;
        if recovery.corrupt_frames > 0 || recovery.note.is_some() {
            tracing::warn!(
                records = recovery.records,
                corrupt_frames = recovery.corrupt_frames,
                corrupt_bytes = recovery.corrupt_bytes,
                note = recovery.note.as_deref().unwrap_or(""),
                "spool recovered with damage (counted in spool.corrupt)"
            );
        }
        info!(
            dir = %state_dir.display(),
            pending = recovery.records,
            stream = recovery.stream_id,
            "spool open"
        );
        let base_policy = Policy {
            threshold: config.cascade.threshold,
            signal: config.cascade.signal,
            escalation_timeout: config.escalation_timeout(),
            audit_rate: config.cascade.audit_rate,
            telemetry_interval: config.telemetry_interval(),
            config_version: 0,
        };
        let (mut remote, warning) =
            remote_config::RemoteConfig::load(&state_dir, &config.device_id, base_policy);
        if let Some(w) = warning {
            tracing::warn!("{w}");
        }
        if remote.version() > 0 {
            info!(version = remote.version(), "remote config restored");
        }
        let policy = remote.policy();
        let mut options = config.mqtt.options(&config.default_client_id())?;
        // A persistent session: QoS 1 messages for us (config documents, spool acks) queue at
        // the broker while we are away, and rumqttc re-sends our unacknowledged publishes
        // after a reconnect instead of dropping them.
        options.set_clean_start(false);
        options.set_session_expiry_interval(Some(SESSION_EXPIRY_S));
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
        let (escalator, eventloop, inbound) = Escalator::new(
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
        let (policy_tx, policy_rx) = watch::channel(policy);
        let (stop_mqtt, stop_rx) = watch::channel(false);
        let recorder = Arc::new(Recorder::new(config.telemetry.enabled));
        let evidence = Arc::new(evidence::Evidence::new(
            policy.audit_rate,
            config.cascade.max_audits_per_second,
        ));
        let sink = forward::SpoolSink {
            spool: Arc::new(std::sync::Mutex::new(spool)),
            notify: Arc::new(tokio::sync::Notify::new()),
        };
        let (stop_forward, stop_forward_rx) = watch::channel(false);
        let forward_task = tokio::spawn(forward::run(
            forward::Forwarder {
                sink: sink.clone(),
                client: escalator.client(),
                device_id: config.device_id.clone(),
                acks: inbound.acks,
                connection: escalator.connection(),
                resend_after: Duration::from_secs_f64(config.spool.resend_after_s),
                flush_timeout: Duration::from_secs_f64(config.spool.flush_timeout_s),
            },
            stop_forward_rx,
        ));
        let config_task = {
            let (sink, evidence) = (sink.clone(), evidence.clone());
            let mut documents = inbound.config;
            let mut stop = stop_rx.clone();
            tokio::spawn(async move {
                loop {
                    let payload = tokio::select! {
                        p = documents.recv() => match p { Some(p) => p, None => return },
                        _ = stop.changed() => return,
                    };
                    apply_remote(&mut remote, &payload, &policy_tx, &evidence, &sink);
                }
            })
        };
        let latest = LatestReport::default();
        let metrics = metrics::registry(
            &config.device_id,
            recorder.clone(),
            escalator.stats().clone(),
            policy_rx.clone(),
            latest.clone(),
            sink.clone(),
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
                recorder: recorder.clone(),
                evidence: evidence.clone(),
                mqtt: escalator.stats().clone(),
                policy: policy_rx.clone(),
                sampler,
                device: DeviceProbe::new(stat_path),
                link: config.energy.link_model(),
                latest: latest.clone(),
            };
            Some(tokio::spawn(telemetry::run(
                reporter,
                sink.clone(),
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
            mqtt_task,
            forward_task,
            stop_forward,
            config_task,
            flush_timeout: Duration::from_secs_f64(config.spool.flush_timeout_s),
            spool: sink,
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
        *self.state.policy.borrow()
    }

    /// The spool's counters (pending, dropped, corrupt).
    pub fn spool_stats(&self) -> Option<spool::SpoolStats> {
        self.spool.stats()
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
        // it goes to the spool, and the forwarder then waits (bounded) for the relay to
        // acknowledge what is pending while MQTT is still up. The rest stays on disk.
        let _ = self.stop_telemetry.send(true);
        if let Some(t) = self.telemetry_task {
            let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
        }
        info!("HTTP drained; flushing the spool");
        let _ = self.stop_forward.send(true);
        let _ = tokio::time::timeout(
            self.flush_timeout + Duration::from_secs(1),
            self.forward_task,
        )
        .await;
        info!("closing MQTT");
        let _ = self.stop_mqtt.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(2), self.mqtt_task).await;
        self.config_task.abort();
        Ok(())
    }
}
