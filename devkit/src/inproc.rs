//! A relay (with its embedded broker) and agents started in this process — the library code the
//! daemons run — as the demo and the bench do: on 127.0.0.1, HTTP on port 0, the committed
//! models, state in a folder of the caller's choosing.
//!
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use tierd_devkit::inproc;
//!
//! let broker_port = tierd_devkit::free_port()?;
//! let state = std::env::temp_dir().join("my-tool");
//! let relay_cfg = inproc::relay_config(broker_port, state.join("relay"));
//! let mut agent_cfg = inproc::agent_config("dev-1", broker_port, state.join("agent"));
//! inproc::trust_relay(&mut agent_cfg, &relay_cfg)?; // apply the relay's signed config
//! let relay = cloud_relay::Relay::start(relay_cfg).await?;
//! let relay = inproc::serve_relay(relay);
//! let agent = edge_agent::Agent::start(agent_cfg).await?;
//! let escalator = agent.escalator();
//! let agent = inproc::serve_agent(agent);
//! inproc::wait_connected(&escalator, Duration::from_secs(10)).await?;
//! // ... talk to them ...
//! agent.shutdown().await??;
//! relay.shutdown().await?;
//! # Ok(()) }
//! ```
//!
//! Both must run inside a multi-thread Tokio runtime: they spawn their tasks onto the current one.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use cloud_relay::config::RelayConfig;
use cloud_relay::Relay;
use edge_agent::config::AgentConfig;
use edge_agent::escalation::Escalator;
use edge_agent::{Agent, AgentError};
use thiserror::Error;
use tierd_runtime::mqtt::MqttConfig;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::paths::{repo_path, CLOUD_MANIFEST, EDGE_MANIFEST};

/// A relay config for an in-process relay: the cloud model, the embedded broker on
/// 127.0.0.1:`broker_port`, HTTP on a free port, state in `state_dir`; defaults otherwise.
pub fn relay_config(broker_port: u16, state_dir: PathBuf) -> RelayConfig {
    let mut cfg = RelayConfig::default();
    cfg.model.manifest = repo_path(CLOUD_MANIFEST);
    cfg.embedded_broker.listen = ([127, 0, 0, 1], broker_port).into();
    cfg.http.listen = ([127, 0, 0, 1], 0).into();
    cfg.state_dir = Some(state_dir);
    cfg
}

/// Makes `agent` trust `relay`'s config-signing key (loading it, or creating it in the relay's
/// state directory as the relay would at start), so the agent applies the relay's signed
/// documents.
pub fn trust_relay(
    agent: &mut AgentConfig,
    relay: &RelayConfig,
) -> Result<(), cloud_relay::signing::SigningKeyError> {
    let (signer, _) = cloud_relay::signing::load_or_create(&relay.signing_key_path())?;
    let key = signer.public().clone();
    if !agent.remote_config.trusted_keys.contains(&key) {
        agent.remote_config.trusted_keys.push(key);
    }
    Ok(())
}

/// An agent config for an in-process agent: `device_id`, MQTT to 127.0.0.1:`broker_port`, HTTP
/// on a free port, the edge model, one telemetry report a second, state in `state_dir`.
pub fn agent_config(device_id: &str, broker_port: u16, state_dir: PathBuf) -> AgentConfig {
    let mut cfg = AgentConfig {
        device_id: device_id.into(),
        mqtt: MqttConfig {
            port: broker_port,
            ..MqttConfig::default()
        },
        ..AgentConfig::default()
    };
    cfg.http.listen = ([127, 0, 0, 1], 0).into();
    cfg.model.manifest = repo_path(EDGE_MANIFEST);
    cfg.telemetry.interval_s = 1.0;
    cfg.state_dir = Some(state_dir);
    cfg
}

/// A server serving on a task of its own until [`Running::shutdown`].
#[derive(Debug)]
pub struct Running<T> {
    stop: oneshot::Sender<()>,
    task: JoinHandle<T>,
}

impl<T> Running<T> {
    /// Tells the server to stop (graceful: in-flight requests finish) and hands back its task,
    /// to await (with a timeout, if wanted) for its result.
    pub fn shutdown(self) -> JoinHandle<T> {
        // A server that already ended has dropped its receiver; its task holds the outcome.
        let _ = self.stop.send(());
        self.task
    }
}

/// Serves `relay` on a new task until [`Running::shutdown`].
pub fn serve_relay(relay: Relay) -> Running<()> {
    let (stop, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(relay.serve(async move {
        let _ = rx.await;
    }));
    Running { stop, task }
}

/// Serves `agent` on a new task until [`Running::shutdown`].
pub fn serve_agent(agent: Agent) -> Running<Result<(), AgentError>> {
    let (stop, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(agent.serve(async move {
        let _ = rx.await;
    }));
    Running { stop, task }
}

/// The agent had no MQTT session within the time given.
#[derive(Debug, Error)]
#[error("the agent did not connect to its broker within {0:?}")]
pub struct NotConnected(pub Duration);

/// Waits (polling every 20 ms) until the agent behind `escalator` has an MQTT session.
pub async fn wait_connected(escalator: &Escalator, within: Duration) -> Result<(), NotConnected> {
    let deadline = Instant::now() + within;
    while !escalator.is_connected() {
        if Instant::now() > deadline {
            return Err(NotConnected(within));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_point_at_the_committed_models_and_the_given_broker() {
        let relay = relay_config(18830, PathBuf::from("/tmp/r"));
        assert_eq!(relay.model.manifest, repo_path(CLOUD_MANIFEST));
        assert_eq!(relay.embedded_broker.listen.port(), 18830);
        assert_eq!(relay.http.listen.port(), 0);
        assert_eq!(
            relay.state_dir.as_deref(),
            Some(std::path::Path::new("/tmp/r"))
        );
        let agent = agent_config("dev-1", 18830, PathBuf::from("/tmp/a"));
        assert_eq!(
            (agent.device_id.as_str(), agent.mqtt.port),
            ("dev-1", 18830)
        );
        assert_eq!(agent.model.manifest, repo_path(EDGE_MANIFEST));
        assert_eq!(agent.http.listen.port(), 0);
        assert_eq!(agent.telemetry.interval_s, 1.0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn relay_and_agent_start_connect_and_stop() {
        let state = tempfile::tempdir().unwrap();
        let port = crate::free_port().unwrap();
        let relay_cfg = relay_config(port, state.path().join("relay"));
        let mut agent_cfg = agent_config("devkit-test", port, state.path().join("agent"));
        trust_relay(&mut agent_cfg, &relay_cfg).unwrap();
        assert_eq!(agent_cfg.remote_config.trusted_keys.len(), 1);
        let relay = Relay::start(relay_cfg).await.unwrap();
        let relay = serve_relay(relay);
        let agent = Agent::start(agent_cfg).await.unwrap();
        let escalator = agent.escalator();
        let agent = serve_agent(agent);
        wait_connected(&escalator, Duration::from_secs(10))
            .await
            .unwrap();
        agent.shutdown().await.unwrap().unwrap();
        relay.shutdown().await.unwrap();
    }
}
