//! Benchmark 4d (`--oip-only`): escalation latency through the relay's OIP backend (MLServer +
//! onnxruntime serving the cloud model, `tests/oip-server/serve.py`) next to the built-in tract
//! backend, in one run.
//!
//! Two in-process relays on one embedded broker: relay "tract" runs digits-cloud itself and
//! serves edge model `digits-edge`; relay "oip" forwards to MLServer serving the same
//! digits-cloud.onnx and serves `digits-edge-tiny`. Two agents, one per edge model, pinned at
//! threshold 1.01 (every request escalates), so both sides send the same inputs to the same
//! cloud model and differ only in the backend. Rounds alternate between the sides; the report
//! gives the median p50 / p99 over rounds and the per-round ratio range.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tierd_devkit::{inproc, repo_path, CLOUD_MANIFEST};

use crate::inproc::{http_round, relay_config};
use crate::inputs::infer_body;
use crate::stats::{round_ratio_range, Series};

/// MLServer, killed on drop.
struct MlServer(Child);

impl Drop for MlServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn start_mlserver(dir: &std::path::Path) -> anyhow::Result<(MlServer, String)> {
    let (http, grpc) = (tierd_devkit::free_port()?, tierd_devkit::free_port()?);
    let child = Command::new("python3")
        .arg(repo_path("tests/oip-server/serve.py"))
        .arg("--model")
        .arg(repo_path("models/cloud/digits-cloud.onnx"))
        .args(["--name", "digits-cloud"])
        .args(["--http-port", &http.to_string(), "--grpc-port", &grpc.to_string()])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting MLServer (python3 tests/oip-server/serve.py; scripts/install-test-deps installs it)")?;
    let server = MlServer(child);
    let url = format!("http://127.0.0.1:{http}");
    let client = reqwest::Client::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        if let Ok(r) = client.get(format!("{url}/v2/health/ready")).send().await {
            if r.status().is_success() {
                return Ok((server, url));
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("MLServer did not become ready within 60 s")
}

async fn start_agent(
    device: &str,
    manifest: &str,
    relay: &cloud_relay::config::RelayConfig,
    broker_port: u16,
    dir: std::path::PathBuf,
) -> anyhow::Result<(
    SocketAddr,
    inproc::Running<Result<(), edge_agent::AgentError>>,
)> {
    let mut cfg = inproc::agent_config(device, broker_port, dir);
    inproc::trust_relay(&mut cfg, relay)?;
    cfg.model.manifest = repo_path(manifest);
    cfg.cascade.threshold = Some(1.01);
    cfg.cascade.escalation_timeout_ms = 2000;
    cfg.telemetry.enabled = false;
    let agent = edge_agent::Agent::start(cfg).await?;
    let addr = agent.local_addr()?;
    let escalator = agent.escalator();
    let running = inproc::serve_agent(agent);
    inproc::wait_connected(&escalator, Duration::from_secs(10))
        .await
        .map_err(|_| anyhow::anyhow!("agent {device} did not connect"))?;
    Ok((addr, running))
}

pub async fn run(rounds: usize, iterations: usize, warmup: usize) -> anyhow::Result<String> {
    let scratch = tempfile::tempdir()?;
    let (_mlserver, url) = start_mlserver(&scratch.path().join("mlserver")).await?;
    let broker_port = tierd_devkit::free_port()?;

    let mut tract_cfg = relay_config(broker_port);
    tract_cfg.relay_id = "bench-tract".into();
    tract_cfg.state_dir = Some(scratch.path().join("relay-tract"));
    tract_cfg.model.serves = vec!["digits-edge".into()];
    let tract = inproc::serve_relay(cloud_relay::Relay::start(tract_cfg.clone()).await?);

    let mut oip_cfg = relay_config(broker_port);
    oip_cfg.relay_id = "bench-oip".into();
    oip_cfg.state_dir = Some(scratch.path().join("relay-oip"));
    oip_cfg.mqtt = Some(tract_cfg.client_mqtt());
    oip_cfg.model.manifest = repo_path(CLOUD_MANIFEST);
    oip_cfg.model.serves = vec!["digits-edge-tiny".into()];
    oip_cfg.model.oip = Some(cloud_relay::config::OipConfig {
        url: url.clone(),
        model: None,
        version: None,
        timeout_ms: 2000,
        concurrency: 4,
    });
    let oip = inproc::serve_relay(cloud_relay::Relay::start(oip_cfg.clone()).await?);

    let (a_tract, agent_t) = start_agent(
        "bench-oip-t",
        "models/edge/digits-edge.toml",
        &tract_cfg,
        broker_port,
        scratch.path().join("agent-t"),
    )
    .await?;
    let (a_oip, agent_o) = start_agent(
        "bench-oip-o",
        "models/edge/digits-edge-tiny.toml",
        &tract_cfg,
        broker_port,
        scratch.path().join("agent-o"),
    )
    .await?;

    let examples = crate::inputs::load_examples(&repo_path("models/eval/examples.toml"))?;
    let ex = crate::inputs::example(&examples, "unsure")?;
    let client = reqwest::Client::new();
    let url_t = format!("http://{a_tract}/v2/models/digits-edge/infer");
    let url_o = format!("http://{a_oip}/v2/models/digits-edge-tiny/infer");
    let body = infer_body("bench-oip", "input", &ex.pixels);
    http_round(&client, &url_t, &body, "cloud", warmup).await?;
    http_round(&client, &url_o, &body, "cloud", warmup).await?;
    let (mut t, mut o) = (Series::default(), Series::default());
    for r in 0..rounds {
        // Alternate which side goes first, so neither always runs on a warmer machine.
        if r % 2 == 0 {
            t.push(http_round(&client, &url_t, &body, "cloud", iterations).await?);
            o.push(http_round(&client, &url_o, &body, "cloud", iterations).await?);
        } else {
            o.push(http_round(&client, &url_o, &body, "cloud", iterations).await?);
            t.push(http_round(&client, &url_t, &body, "cloud", iterations).await?);
        }
    }
    for r in [agent_t, agent_o] {
        let _ = tokio::time::timeout(Duration::from_secs(5), r.shutdown()).await;
    }
    for r in [oip, tract] {
        let _ = tokio::time::timeout(Duration::from_secs(5), r.shutdown()).await;
    }
    let (lo, hi) = round_ratio_range(&t, &o);
    Ok(format!(
        "### 4d. Escalation through the OIP backend (MLServer {url}) vs the built-in tract backend\n\
         {rounds} rounds x {iterations} sequential escalated requests per side (threshold 1.01, \
         input `unsure`), client-side HTTP round trip:\n\n\
         | backend | p50 | p99 |\n| --- | --- | --- |\n\
         | tract (in the relay) | {:.1} us | {:.1} us |\n\
         | OIP (MLServer 1.7.1 + onnxruntime, HTTP/JSON) | {:.1} us | {:.1} us |\n\n\
         OIP / tract p50 per round: {lo:.2}x to {hi:.2}x ({} + {} samples)",
        t.p50_us(),
        t.p99_us(),
        o.p50_us(),
        o.p99_us(),
        t.samples(),
        o.samples()
    ))
}
