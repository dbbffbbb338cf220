//! The tierd edge agent as a library; `main.rs` is a thin CLI over it, and this file is the
//! composition root: it wires the parts below and owns the one shutdown sequence.
//!
//! - [`cascade`]: **where escalation is decided** — the pure rule and the cascade service.
//! - [`oip`], [`http`]: Open Inference Protocol v2 parsing (pure) and the HTTP front end.
//! - [`link`], [`escalation`]: the agent's MQTT link (topics, routes, status, will) and the
//!   request/reply matching of escalations over it.
//! - [`spool`], [`forward`]: **where nothing is lost** — store-and-forward of reports and acks,
//!   acknowledged end to end.
//! - [`policy`], [`remote_config`]: the settings in force, and the relay's config document:
//!   checked, persisted, applied live.
//! - [`telemetry`], [`metrics`], [`evidence`]: latency histograms and counters, the periodic
//!   report, `/metrics`, and the per-bin evidence and audits for the relay's tuner.
//! - [`energy`]: **where energy is measured** (one module per meter) and attributed.
//! - [`config`]: the `agent.toml` schema.
//!
//! [`Agent::start`] does everything that can fail (config checks, model verification, binding the
//! port, TLS setup) before it returns, so "started" means "ready to serve" — the moment a
//! supervisor such as systemd should be told. [`Agent::serve`] runs until its shutdown future
//! resolves, then stops in order: stop accepting → drain requests → final telemetry report →
//! flush the spool → disconnect (see [`Stage`]).

pub mod cascade;
pub mod config;
pub mod doctor;
pub mod energy;
pub mod escalation;
pub mod evidence;
pub mod forward;
pub mod http;
pub mod identity;
pub mod link;
pub mod metrics;
pub mod model_init;
pub mod oip;
pub mod policy;
pub mod remote_config;
pub mod rollout;
pub mod spool;
pub mod telemetry;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tierd_runtime::link::Link;
use tierd_runtime::{Model, ModelError};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::info;

pub use tierd_runtime::shutdown_signal;

use crate::cascade::Cascade;
use crate::config::{AgentConfig, ConfigError};
use crate::energy::sampler::Sampler;
use crate::energy::Roots;
use crate::escalation::{Escalator, MqttStats};
use crate::forward::SpoolSink;
use crate::http::{Admission, AppState};
use crate::policy::Policy;
use crate::remote_config::RemoteConfig;
use crate::telemetry::{DeviceProbe, LatestReport, Recorder, Reporter};

pub use crate::link::SESSION_EXPIRY_S;

#[derive(Debug, Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Mqtt(#[from] tierd_runtime::mqtt::MqttSetupError),
    #[error(transparent)]
    Token(#[from] http::TokenError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// A device id or model name that cannot be a topic level (the error says which).
    #[error("{0}")]
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

/// The shutdown sequence, in order. One `watch` channel carries the stage reached; each
/// background task stops when the stage it waits for is reached, so the order is explicit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    Serving,
    /// HTTP has stopped accepting and drained: the last telemetry report covers the final
    /// partial window, so a clean stop loses no counts.
    FinalReport,
    /// The forwarder waits (bounded) for the relay to acknowledge what is pending while MQTT is
    /// still up; the rest stays on disk.
    FlushSpool,
    /// Status "stopped", clean DISCONNECT.
    Disconnect,
}

/// Resolves once `stage` is reached (or the sequence is gone).
async fn reached(mut rx: watch::Receiver<Stage>, stage: Stage) {
    let _ = rx.wait_for(|s| *s >= stage).await;
}

/// What the systemd watchdog checks before each ping: the HTTP server answers its own health
/// route, the model still reproduces its golden vectors, and the MQTT link is running.
#[derive(Clone)]
pub struct Health {
    state: Arc<AppState>,
    addr: SocketAddr,
    link: tierd_runtime::link::Publisher,
}

/// Why the watchdog's self-check failed.
#[derive(Debug, Error)]
pub enum HealthError {
    #[error("the MQTT task has stopped")]
    LinkStopped,
    #[error("model self-test failed: {0}")]
    Model(ModelError),
    #[error(transparent)]
    Http(#[from] tierd_runtime::systemd::ProbeError),
}

impl Health {
    pub async fn check(&self) -> Result<(), HealthError> {
        if !self.link.link_running() {
            return Err(HealthError::LinkStopped);
        }
        for c in self.state.cascades() {
            c.model().verify_golden().map_err(HealthError::Model)?;
        }
        tierd_runtime::systemd::probe_http(self.addr, "/v2/health/live").await?;
        Ok(())
    }
}

/// The background tasks, each stopping at its [`Stage`].
struct Tasks {
    telemetry: Option<JoinHandle<()>>,
    forward: JoinHandle<()>,
    config: JoinHandle<()>,
    rollout: JoinHandle<()>,
}

/// A started agent: model verified, port bound, MQTT connecting in the background.
pub struct Agent {
    state: Arc<AppState>,
    listener: TcpListener,
    link: Link,
    escalator: Escalator,
    stage: watch::Sender<Stage>,
    tasks: Tasks,
    flush_timeout: Duration,
    spool: SpoolSink,
    policy: watch::Receiver<Policy>,
    latest: LatestReport,
}

/// Opens the spool in `state_dir`, logging what recovery found.
fn open_spool(state_dir: &Path, max_bytes: u64) -> Result<SpoolSink, AgentError> {
    std::fs::create_dir_all(state_dir).map_err(|e| AgentError::StateDir {
        path: state_dir.to_path_buf(),
        source: e,
    })?;
    let (spool, recovery) = spool::Spool::open(&state_dir.join("spool"), max_bytes)?;
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
    Ok(SpoolSink {
        spool: Arc::new(std::sync::Mutex::new(spool)),
        notify: Arc::new(tokio::sync::Notify::new()),
    })
}

/// The `[[models]]` besides `primary`, each verified like it; names must be distinct (a name is
/// the OIP route and the escalation topic).
fn load_extra_models(
    config: &AgentConfig,
    primary: &Model,
) -> Result<Vec<(crate::config::ExtraModelConfig, Model)>, AgentError> {
    let mut names = vec![primary.manifest().name.clone()];
    let mut out = Vec::with_capacity(config.models.len());
    for m in &config.models {
        let model = Model::load_trusted(&m.manifest, &config.model.trusted_keys)?;
        let name = &model.manifest().name;
        if names.contains(name) {
            return Err(ConfigError::invalid(format!(
                "[[models]] {}: a model named {name:?} is already served; each model needs its \
                 own name (it is the OIP route and the escalation topic)",
                m.manifest.display()
            ))
            .into());
        }
        tierd_protocol::topic::validate_model_name(name)?;
        info!(model = %model.id(), golden = model.manifest().golden.len(), "model verified");
        names.push(name.clone());
        out.push((m.clone(), model));
    }
    Ok(out)
}

/// The persisted remote config laid over `agent.toml`'s settings.
fn restore_policy(config: &AgentConfig, state_dir: &Path, threshold: f32) -> RemoteConfig {
    let base = Policy {
        threshold,
        signal: config.cascade.signal,
        escalation_timeout: config.escalation_timeout(),
        audit_rate: config.cascade.audit_rate,
        telemetry_interval: config.telemetry_interval(),
        config_version: 0,
    };
    let (remote, warning) = RemoteConfig::load(
        state_dir,
        &config.device_id,
        base,
        config.remote_config.trusted_keys.clone(),
    );
    if let Some(w) = warning {
        tracing::warn!("{w}");
    }
    if remote.version() > 0 {
        info!(version = remote.version(), "remote config restored");
    }
    remote
}

impl Agent {
    pub async fn start(config: AgentConfig) -> Result<Self, AgentError> {
        config.validate()?;
        info!(
            device_id = %config.device_id,
            from = %config.device_id_source.describe(),
            "identity"
        );
        tierd_runtime::mqtt::install_crypto_provider();
        let configured = Model::load_trusted(&config.model.manifest, &config.model.trusted_keys)?;
        info!(model = %configured.id(), golden = configured.manifest().golden.len(), "model verified");
        let extra_models = load_extra_models(&config, &configured)?;
        let boot_id = tierd_runtime::unix_ms();
        let state_dir = config.state_dir();
        // A model a rollout promoted serves instead, if it still verifies.
        let (model, refused) =
            rollout::starting_model(&state_dir, configured, &config.model.trusted_keys);
        if let Some(why) = refused {
            tracing::warn!(%why, "serving the model agent.toml names");
        }
        let sink = open_spool(&state_dir, config.spool.max_bytes)?;
        let (threshold, from) = config.cascade.start_threshold(model.manifest());
        info!(threshold, from, "starting threshold");
        let remote =
            restore_policy(&config, &state_dir, threshold).with_primary(&model.manifest().name);
        let options = config.mqtt.options(&config.default_client_id())?;
        let served: Vec<tierd_protocol::ServedModel> = extra_models
            .iter()
            .map(|(_, m)| tierd_protocol::ServedModel {
                model: m.id(),
                calibration: link::model_calibration(m.manifest()),
            })
            .collect();
        let mqtt = link::start(
            options,
            &config.device_id,
            &model.manifest().name,
            config.cascade.max_in_flight,
            boot_id,
            link::model_calibration(model.manifest()),
            served.clone(),
            crate::identity::read_machine_tag(),
        )?;
        let listener =
            TcpListener::bind(config.http.listen)
                .await
                .map_err(|e| AgentError::Bind {
                    addr: config.http.listen,
                    source: e,
                })?;
        let (stage, stage_rx) = watch::channel(Stage::Serving);
        let (policy_tx, policy_rx) = watch::channel(remote.policy());
        let recorder = Arc::new(Recorder::new(config.telemetry.enabled));
        let evidence = Arc::new(evidence::Evidence::new(
            remote.policy().audit_rate,
            config.cascade.max_audits_per_second,
        ));
        let primary = Cascade::new(
            model,
            mqtt.escalator.clone(),
            policy_rx.clone(),
            evidence.clone(),
            recorder.clone(),
        );
        let serving = primary.serving();
        let rollout_task = tokio::spawn(rollout::run(
            rollout::Rollouts {
                state_dir: state_dir.clone(),
                device_id: config.device_id.clone(),
                relay_keys: config.remote_config.trusted_keys.clone(),
                model_keys: config.model.trusted_keys.clone(),
                configured_manifest: config.model.manifest.clone(),
                serving: serving.clone(),
                sink: sink.clone(),
                fetcher: rollout::fetch::Fetcher {
                    publisher: mqtt.link.publisher(),
                    topic: tierd_protocol::Topic::new(
                        &config.device_id,
                        tierd_protocol::TopicKind::ModelFetch,
                    )?
                    .to_string(),
                    chunks: mqtt.chunks,
                    max_bytes_per_s: config.rollout.max_download_bytes_per_s,
                },
                announcer: mqtt.announcer,
                further: served,
                max_shadow_per_second: config.cascade.max_audits_per_second,
            },
            mqtt.rollout,
            reached(stage_rx.clone(), Stage::Disconnect),
        ));
        let forward = tokio::spawn(forward::run(
            forward::Forwarder {
                sink: sink.clone(),
                publisher: mqtt.link.publisher(),
                device_id: config.device_id.clone(),
                acks: mqtt.acks,
                resend_after: Duration::from_secs_f64(config.spool.resend_after_s),
                flush_timeout: Duration::from_secs_f64(config.spool.flush_timeout_s),
            },
            reached(stage_rx.clone(), Stage::FlushSpool),
        ));
        // Each further model: its own policy (its `[[models]]` settings under the remote
        // document's entry for it) and its own evidence and audits for the relay's tuner.
        let mut further = Vec::with_capacity(extra_models.len());
        let mut further_cascades = Vec::with_capacity(extra_models.len());
        for (m, model) in extra_models {
            let (threshold, from) = m.start_threshold(model.manifest());
            let name = model.manifest().name.clone();
            let base = Policy {
                threshold,
                signal: m.signal.unwrap_or(config.cascade.signal),
                ..remote.base()
            };
            let policy = remote.policy_of(&name, &base);
            info!(model = %model.id(), threshold = policy.threshold, from, "serving a further model");
            let (tx, rx) = watch::channel(policy);
            let evidence = Arc::new(evidence::Evidence::new(
                policy.audit_rate,
                config.cascade.max_audits_per_second,
            ));
            further_cascades.push((model, rx, evidence.clone()));
            further.push(remote_config::FurtherModel {
                name,
                base,
                policy: tx,
                evidence,
            });
        }
        let further_evidence: Vec<telemetry::ModelEvidence> = further_cascades
            .iter()
            .map(|(model, rx, evidence)| telemetry::ModelEvidence {
                model: model.id(),
                evidence: evidence.clone(),
                policy: rx.clone(),
            })
            .collect();
        let config_task = tokio::spawn(remote_config::run(
            remote,
            mqtt.config,
            policy_tx,
            evidence.clone(),
            further,
            sink.clone(),
            reached(stage_rx.clone(), Stage::Disconnect),
        ));
        let latest = LatestReport::default();
        let telemetry = if config.telemetry.enabled {
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
                serving: serving.clone(),
                recorder: recorder.clone(),
                evidence: evidence.clone(),
                further: further_evidence,
                mqtt: mqtt.escalator.stats().clone(),
                policy: policy_rx.clone(),
                sampler,
                device: DeviceProbe::new(stat_path),
                link: config.energy.link_model(),
                latest: latest.clone(),
            };
            Some(tokio::spawn(telemetry::run(
                reporter,
                sink.clone(),
                reached(stage_rx.clone(), Stage::FinalReport),
            )))
        } else {
            None
        };
        let metrics = metrics::registry(
            &config.device_id,
            recorder.clone(),
            mqtt.escalator.stats().clone(),
            policy_rx.clone(),
            latest.clone(),
            sink.clone(),
        );
        let escalator = mqtt.escalator.clone();
        let mut extra = Vec::with_capacity(further_cascades.len());
        for (model, policy, evidence) in further_cascades {
            let name = model.manifest().name.clone();
            extra.push(Cascade::new(
                model,
                mqtt.escalator.for_model(&config.device_id, &name)?,
                policy,
                evidence,
                recorder.clone(),
            ));
        }
        let state = Arc::new(AppState {
            cascade: primary,
            extra,
            admission: Admission::new(config.http.max_concurrent, config.http.max_queued),
            recorder,
            metrics,
            max_body_bytes: config.http.max_body_bytes,
            token: http::load_token(&config.http)?,
        });
        Ok(Agent {
            state,
            listener,
            link: mqtt.link,
            escalator,
            stage,
            tasks: Tasks {
                telemetry,
                forward,
                config: config_task,
                rollout: rollout_task,
            },
            flush_timeout: Duration::from_secs_f64(config.spool.flush_timeout_s),
            spool: sink,
            policy: policy_rx,
            latest,
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
        self.escalator.stats().clone()
    }

    /// Whether the MQTT session to the broker is up (escalations possible).
    pub fn mqtt_connected(&self) -> bool {
        self.escalator.is_connected()
    }

    /// A handle that reports the MQTT connection state after `serve` has taken the agent.
    pub fn escalator(&self) -> Escalator {
        self.escalator.clone()
    }

    /// The watchdog's self-check (see [`Health`]).
    pub fn health(&self) -> std::io::Result<Health> {
        Ok(Health {
            state: self.state.clone(),
            addr: self.local_addr()?,
            link: self.link.publisher(),
        })
    }

    pub fn policy(&self) -> Policy {
        *self.policy.borrow()
    }

    /// The spool's counters (pending, dropped, corrupt).
    pub fn spool_stats(&self) -> Option<spool::SpoolStats> {
        self.spool.stats()
    }

    /// Serves until `shutdown` resolves, then stops in [`Stage`] order.
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
        // Stop accepting and drain the requests in flight.
        let app = http::router(self.state.clone());
        let served = axum::serve(self.listener, app)
            .with_graceful_shutdown(shutdown)
            .await
            .map_err(AgentError::Serve);
        let _ = stop_watchdog.send(true);
        let _ = watchdog.await;
        served?;
        let Tasks {
            telemetry,
            forward,
            config,
            rollout,
        } = self.tasks;
        self.stage.send_replace(Stage::FinalReport);
        if let Some(t) = telemetry {
            let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
        }
        info!("HTTP drained; flushing the spool");
        self.stage.send_replace(Stage::FlushSpool);
        let _ = tokio::time::timeout(self.flush_timeout + Duration::from_secs(1), forward).await;
        info!("closing MQTT");
        self.stage.send_replace(Stage::Disconnect);
        let _ = config.await;
        let _ = rollout.await;
        self.link.shutdown(Duration::from_secs(2)).await;
        Ok(())
    }
}
