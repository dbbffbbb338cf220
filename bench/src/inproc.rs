//! Benchmarks against a relay and an agent started in this process (the demo's setup), on their
//! own multi-thread runtime so they keep the daemons' threading while the client drives the load
//! from a separate single-threaded runtime.
//!
//! The threshold is pinned: the relay runs with `tuning.push = false` (its tuner proposes, never
//! pushes), so what the bench measures cannot change mid-run because the tuner learned from the
//! bench's own traffic (a pushed threshold once turned the `confident` example into an
//! escalation: "expected tier edge, got cloud"). [`Servers::check_threshold`] proves it held.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use cloud_relay::Relay;
use edge_agent::telemetry::LatestReport;
use edge_agent::{Agent, AgentError};
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop};
use tierd_devkit::free_port;
use tierd_devkit::inproc::{self, Running};
use tierd_protocol::{encode, EscalationKind, EscalationRequest, Tensor};
use tierd_runtime::mqtt::MqttConfig;
use tierd_runtime::Model;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::inputs;
use crate::stats::{Recorder, Round};

/// Generous, so a noisy machine does not turn an escalation into an `edge_fallback` (which the
/// bench treats as a failure). The daemon default is 250 ms.
pub const ESCALATION_TIMEOUT_MS: u64 = 2_000;

/// Longest any single request, reply or connection step may take before the bench gives up.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// Relay (with its embedded broker) and agent, running on the server runtime.
pub struct Servers {
    pub broker_port: u16,
    /// Telemetry on, reporting every second (30x the default rate, to make its cost visible).
    pub agent_addr: SocketAddr,
    /// The same agent with `telemetry.enabled = false`: the baseline for the overhead.
    pub agent_off_addr: SocketAddr,
    /// The telemetry agent's latest report, to measure its encoded size.
    pub latest: LatestReport,
    /// The threshold both agents had in force at start; the relay never pushes another.
    pub threshold: f32,
    agents: Vec<Running<Result<(), AgentError>>>,
    relay: Running<()>,
}

struct Started {
    addr: SocketAddr,
    threshold: f32,
    latest: LatestReport,
    running: Running<Result<(), AgentError>>,
}

/// A fresh state folder per run (spool, applied config), under the system temp dir.
fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tierd-bench-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

async fn start_agent(
    device_id: &str,
    relay_cfg: &cloud_relay::config::RelayConfig,
    broker_port: u16,
    telemetry: bool,
) -> anyhow::Result<Started> {
    let mut cfg = inproc::agent_config(device_id, broker_port, scratch(device_id));
    inproc::trust_relay(&mut cfg, relay_cfg).context("loading the relay's signing key")?;
    cfg.cascade.escalation_timeout_ms = ESCALATION_TIMEOUT_MS;
    cfg.telemetry.enabled = telemetry;
    let agent = Agent::start(cfg)
        .await
        .with_context(|| format!("starting agent {device_id}"))?;
    let addr = agent.local_addr()?;
    let threshold = agent.policy().threshold;
    let latest = agent.latest_report();
    let escalator = agent.escalator();
    let running = inproc::serve_agent(agent);
    if inproc::wait_connected(&escalator, STEP_TIMEOUT)
        .await
        .is_err()
    {
        bail!("agent {device_id} did not connect to the embedded broker on port {broker_port}");
    }
    Ok(Started {
        addr,
        threshold,
        latest,
        running,
    })
}

/// The in-process relay's config: the devkit's, with tuning pushes off so the threshold the
/// agents start with stays in force for the whole run.
pub fn relay_config(broker_port: u16) -> cloud_relay::config::RelayConfig {
    let mut cfg = inproc::relay_config(broker_port, scratch("relay"));
    cfg.tuning.push = false;
    cfg
}

/// Must run on the server runtime: the relay and agent spawn their tasks onto the current one.
pub async fn start_servers() -> anyhow::Result<Servers> {
    let broker_port = free_port()?;
    let relay_cfg = relay_config(broker_port);
    let relay = Relay::start(relay_cfg.clone())
        .await
        .context("starting the relay")?;
    let relay = inproc::serve_relay(relay);

    let on = start_agent("bench-edge", &relay_cfg, broker_port, true).await?;
    let off = start_agent("bench-edge-notel", &relay_cfg, broker_port, false).await?;
    if on.threshold != off.threshold {
        bail!(
            "the two agents start at different thresholds ({} and {}): the telemetry comparison \
             would not compare like with like",
            on.threshold,
            off.threshold
        );
    }
    Ok(Servers {
        broker_port,
        agent_addr: on.addr,
        agent_off_addr: off.addr,
        latest: on.latest,
        threshold: on.threshold,
        agents: vec![on.running, off.running],
        relay,
    })
}

impl Servers {
    pub fn infer_url(&self) -> String {
        format!("http://{}/v2/models/digits-edge/infer", self.agent_addr)
    }

    pub fn infer_url_without_telemetry(&self) -> String {
        format!("http://{}/v2/models/digits-edge/infer", self.agent_off_addr)
    }

    /// Fails unless both agents still run the threshold they started with, read from their
    /// `tierd_threshold` metric (what the cascade uses, not what a config file says).
    pub async fn check_threshold(&self, client: &reqwest::Client) -> anyhow::Result<()> {
        for addr in [self.agent_addr, self.agent_off_addr] {
            let now = threshold_in_force(client, addr).await?;
            // The gauge is the f32 widened to f64: compare as f32.
            if now as f32 != self.threshold {
                bail!(
                    "the agent at {addr} runs threshold {now}, not the {} it started with: \
                     something pushed a threshold although the bench pins it",
                    self.threshold
                );
            }
        }
        Ok(())
    }

    pub async fn stop(self) -> anyhow::Result<()> {
        // Every agent is told first, then each awaited, so they wind down together.
        let agent_tasks: Vec<_> = self.agents.into_iter().map(Running::shutdown).collect();
        for task in agent_tasks {
            tokio::time::timeout(STEP_TIMEOUT, task)
                .await
                .context("an agent did not stop")???;
        }
        tokio::time::timeout(STEP_TIMEOUT, self.relay.shutdown())
            .await
            .context("the relay did not stop")??;
        Ok(())
    }
}

/// The agent's `tierd_threshold` gauge from its `/metrics`.
pub async fn threshold_in_force(client: &reqwest::Client, addr: SocketAddr) -> anyhow::Result<f64> {
    let url = format!("http://{addr}/metrics");
    let text = tokio::time::timeout(STEP_TIMEOUT, async {
        client
            .get(&url)
            .send()
            .await?
            .error_for_status()?
            .text()
            .await
    })
    .await
    .with_context(|| format!("GET {url} timed out"))?
    .with_context(|| format!("GET {url}"))?;
    parse_gauge(&text, "tierd_threshold").with_context(|| format!("no tierd_threshold in {url}"))
}

/// The value of the first sample of metric `name` in Prometheus text.
fn parse_gauge(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(['{', ' ']))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Sends `body` until the agent answers it from `tier` (the relay subscribes a moment after it
/// connects, so the first escalations may still fall back). Bounded by [`STEP_TIMEOUT`].
pub async fn wait_for_tier(
    client: &reqwest::Client,
    url: &str,
    body: &Bytes,
    tier: &str,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        let resp = inputs::post(client, url, body.clone()).await?;
        let a = inputs::parse_answer(&resp)?;
        if a.tier == tier {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "no {tier} answer within {STEP_TIMEOUT:?}; last tier {} ({:?})",
                a.tier,
                a.fallback_reason
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `iterations` raw forwards of the edge model, in this thread.
pub fn forward_round(model: &Model, input: &Tensor, iterations: usize) -> anyhow::Result<Round> {
    let mut rec = Recorder::new();
    for _ in 0..iterations {
        let t = Instant::now();
        let p = model.predict(input)?;
        rec.record(t.elapsed());
        std::hint::black_box(p);
    }
    Ok(rec.finish())
}

/// `iterations` sequential POSTs over one keep-alive connection; each answer must be from `tier`.
/// The clock stops once the response body is in; checking the tier is not timed.
pub async fn http_round(
    client: &reqwest::Client,
    url: &str,
    body: &Bytes,
    tier: &str,
    iterations: usize,
) -> anyhow::Result<Round> {
    let mut rec = Recorder::new();
    for i in 0..iterations {
        let t = Instant::now();
        let resp = tokio::time::timeout(STEP_TIMEOUT, inputs::post(client, url, body.clone()))
            .await
            .context("HTTP request timed out")??;
        rec.record(t.elapsed());
        inputs::check_tier(&resp, tier, &format!("request {i} of the round"))?;
    }
    Ok(rec.finish())
}

pub const ECHO_REQUEST_TOPIC: &str = "tierd-bench/echo/request";
pub const ECHO_REPLY_TOPIC: &str = "tierd-bench/echo/reply";

/// Two plain rumqttc v5 clients on the relay's embedded broker: the requester (driven from the
/// bench's runtime) and an echo that republishes every request on the reply topic (on the server
/// runtime, where the relay's client lives). Both use `MqttConfig::options`, so TCP_NODELAY.
pub struct Echo {
    requester: AsyncClient,
    replies: mpsc::Receiver<Bytes>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<anyhow::Result<()>>>,
}

async fn drive(
    name: &'static str,
    client: AsyncClient,
    mut eventloop: EventLoop,
    subscribe_to: &'static str,
    mut ready: Option<oneshot::Sender<()>>,
    mut stop: watch::Receiver<bool>,
    mut on_publish: impl FnMut(&AsyncClient, Bytes) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    loop {
        let ev = tokio::select! {
            _ = stop.changed() => break,
            ev = eventloop.poll() => ev.with_context(|| format!("echo bench: {name} MQTT connection failed"))?,
        };
        match ev {
            Event::Incoming(Packet::ConnAck(_)) => client
                .try_subscribe(subscribe_to, QoS::AtMostOnce)
                .with_context(|| format!("echo bench: {name} cannot subscribe"))?,
            Event::Incoming(Packet::SubAck(_)) => {
                if let Some(tx) = ready.take() {
                    let _ = tx.send(());
                }
            }
            Event::Incoming(Packet::Publish(p)) => on_publish(&client, p.payload)?,
            _ => {}
        }
    }
    let _ = client.try_disconnect();
    Ok(())
}

pub async fn start_echo(port: u16, server: &tokio::runtime::Handle) -> anyhow::Result<Echo> {
    let cfg = MqttConfig {
        port,
        ..MqttConfig::default()
    };
    let (stop, stop_rx) = watch::channel(false);

    let (echo, echo_loop) = AsyncClient::new(cfg.options("tierd-bench-echo")?, 64);
    let (echo_ready, echo_ready_rx) = oneshot::channel();
    let echo_task = server.spawn(drive(
        "echo",
        echo,
        echo_loop,
        ECHO_REQUEST_TOPIC,
        Some(echo_ready),
        stop_rx.clone(),
        |c, payload| {
            c.try_publish(ECHO_REPLY_TOPIC, QoS::AtMostOnce, false, payload)
                .context("echo: cannot republish")
        },
    ));

    let (requester, req_loop) = AsyncClient::new(cfg.options("tierd-bench-requester")?, 64);
    let (req_ready, req_ready_rx) = oneshot::channel();
    let (tx, replies) = mpsc::channel(64);
    let req_task = tokio::spawn(drive(
        "requester",
        requester.clone(),
        req_loop,
        ECHO_REPLY_TOPIC,
        Some(req_ready),
        stop_rx,
        move |_, payload| {
            tx.try_send(payload)
                .map_err(|e| anyhow::anyhow!("echo: reply queue: {e}"))
        },
    ));
    let e = Echo {
        requester,
        replies,
        stop,
        tasks: vec![echo_task, req_task],
    };
    for (who, rx) in [("echo", echo_ready_rx), ("requester", req_ready_rx)] {
        tokio::time::timeout(STEP_TIMEOUT, rx)
            .await
            .with_context(|| format!("echo bench: {who} not subscribed within {STEP_TIMEOUT:?}"))?
            .with_context(|| format!("echo bench: {who} stopped before subscribing"))?;
    }
    Ok(e)
}

impl Echo {
    /// `iterations` sequential request/echo round trips. Each payload is the escalation request
    /// the agent would send for `input`, with a distinct request id so a stray reply is caught.
    pub async fn round(
        &mut self,
        edge_model: &str,
        input: &Tensor,
        edge_probabilities: &[f32],
        iterations: usize,
        next_id: &AtomicU64,
    ) -> anyhow::Result<Round> {
        let mut rec = Recorder::new();
        for _ in 0..iterations {
            let payload = Bytes::from(escalation_payload(
                next_id.fetch_add(1, Ordering::Relaxed),
                edge_model,
                input,
                edge_probabilities,
            )?);
            let t = Instant::now();
            self.requester
                .publish(ECHO_REQUEST_TOPIC, QoS::AtMostOnce, false, payload.clone())
                .await
                .context("echo: publish failed")?;
            let got = tokio::time::timeout(STEP_TIMEOUT, self.replies.recv())
                .await
                .context("echo: no reply within the step timeout")?
                .context("echo: requester stopped")?;
            rec.record(t.elapsed());
            if got != payload {
                bail!("echo: reply does not match the request just sent");
            }
        }
        Ok(rec.finish())
    }

    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        for t in self.tasks {
            tokio::time::timeout(STEP_TIMEOUT, t)
                .await
                .context("echo client did not stop")???;
        }
        Ok(())
    }
}

/// The bytes the agent publishes when it escalates `input` (same codec, same fields).
pub fn escalation_payload(
    request_id: u64,
    edge_model: &str,
    input: &Tensor,
    edge_probabilities: &[f32],
) -> anyhow::Result<Vec<u8>> {
    Ok(encode(&EscalationRequest {
        request_id,
        kind: EscalationKind::Escalation,
        edge_model: edge_model.to_owned(),
        deadline_ms: ESCALATION_TIMEOUT_MS as u32,
        input: input.clone(),
        edge_probabilities: edge_probabilities.to_vec(),
    })?)
}

/// One request of a throughput run: its body and, if known, the tier it must come from.
#[derive(Clone)]
pub struct Job {
    pub body: Bytes,
    pub tier: Option<&'static str>,
}

/// Result of one throughput run.
pub struct Throughput {
    pub requests: usize,
    pub elapsed: Duration,
    pub cloud: u64,
}

impl Throughput {
    pub fn rps(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }
}

/// Sends every job with `concurrency` requests in flight. Every answer must be 2xx, from the
/// job's tier when it has one, and never `edge_fallback` (which would mean a lost escalation).
pub async fn throughput(
    client: &reqwest::Client,
    url: &str,
    jobs: Arc<Vec<Job>>,
    concurrency: usize,
) -> anyhow::Result<Throughput> {
    let next = Arc::new(AtomicUsize::new(0));
    let cloud = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut workers = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let (client, url, jobs, next, cloud) = (
            client.clone(),
            url.to_owned(),
            jobs.clone(),
            next.clone(),
            cloud.clone(),
        );
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(job) = jobs.get(i) else { break };
                let resp = tokio::time::timeout(
                    STEP_TIMEOUT,
                    inputs::post(&client, &url, job.body.clone()),
                )
                .await
                .with_context(|| format!("request {i} timed out"))??;
                let a = inputs::parse_answer(&resp)?;
                match (job.tier, a.tier.as_str()) {
                    (Some(want), got) if want != got => {
                        bail!(
                            "request {i}: expected tier {want}, got {got} ({:?})",
                            a.fallback_reason
                        )
                    }
                    (_, "edge") => {}
                    (_, "cloud") => {
                        cloud.fetch_add(1, Ordering::Relaxed);
                    }
                    (_, other) => bail!("request {i}: tier {other} ({:?})", a.fallback_reason),
                }
            }
            anyhow::Ok(())
        }));
    }
    for w in workers {
        w.await??;
    }
    Ok(Throughput {
        requests: jobs.len(),
        elapsed: started.elapsed(),
        cloud: cloud.load(Ordering::Relaxed),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_benchs_relay_never_pushes_a_threshold() {
        let cfg = relay_config(18_830);
        assert!(!cfg.tuning.push);
        // Everything else is the devkit's in-process relay.
        let devkit = inproc::relay_config(18_830, scratch("relay"));
        assert_eq!(cfg.embedded_broker.listen, devkit.embedded_broker.listen);
        assert_eq!(cfg.model.manifest, devkit.model.manifest);
        assert!(
            devkit.tuning.push,
            "the devkit default pushes; the bench turns it off"
        );
    }

    #[test]
    fn the_threshold_gauge_is_read_from_prometheus_text() {
        let text = "# HELP tierd_threshold Escalation threshold in force.\n\
                    # TYPE tierd_threshold gauge\n\
                    tierd_thresholds_total 3\n\
                    tierd_threshold{signal=\"max_prob\"} 0.8999999761581421\n";
        assert_eq!(
            parse_gauge(text, "tierd_threshold"),
            Some(0.8999999761581421)
        );
        assert_eq!(
            parse_gauge(text, "tierd_threshold").map(|v| v as f32),
            Some(0.9)
        );
        assert_eq!(
            parse_gauge("tierd_threshold_x 1\n", "tierd_threshold"),
            None
        );
        assert_eq!(parse_gauge("", "tierd_threshold"), None);
    }
}
