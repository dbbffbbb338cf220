//! `cargo run --release -p tierd-demo --bin rollout`: a model rollout end to end, in one
//! process. A relay with its embedded broker and an agent serving `digits-edge` 1.0.0 (the tiny
//! model); live traffic from the evaluation stream; then the operator's rollout of 2.0.0 (the
//! shipped model), signed with a fresh model-release key: fetched in chunks, verified, shadowed
//! on the live traffic, certified and promoted by the relay. Prints each step as it happens and
//! the escalation rate and agreement with the cloud model before and after.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use cloud_relay::Relay;
use edge_agent::Agent;
use serde_json::{json, Value};
use tierd_devkit::{free_port, inproc, release, repo_path, CLOUD_MANIFEST, EDGE_MANIFEST};
use tierd_protocol::{Tensor, TensorData};
use tierd_runtime::{stream, Model};

#[derive(Parser)]
#[command(about = "A model rollout end to end: shadow, certified promotion, before/after")]
struct Args {
    /// Requests before the rollout starts, and after it ends.
    #[arg(long, default_value_t = 3000)]
    phase: usize,
    /// Share of live requests the candidate shadows.
    #[arg(long, default_value_t = 0.5)]
    shadow_rate: f64,
    /// Give up if the rollout is not decided within this many requests.
    #[arg(long, default_value_t = 30_000)]
    max_requests: usize,
}

/// Escalation rate and agreement with the cloud model over a phase's requests.
#[derive(Default)]
struct Phase {
    requests: u64,
    escalated: u64,
    agree: u64,
    versions: std::collections::BTreeSet<String>,
}

impl Phase {
    fn line(&self, name: &str) -> String {
        let n = self.requests.max(1) as f64;
        format!(
            "{name:<8} {:>6} requests  escalated {:>5.1} %  agreement with the cloud {:>6.2} %  served by {}",
            self.requests,
            100.0 * self.escalated as f64 / n,
            100.0 * self.agree as f64 / n,
            self.versions.iter().cloned().collect::<Vec<_>>().join(", ")
        )
    }
}

/// What sending one request of the stream needs.
struct Ctx {
    client: reqwest::Client,
    url: String,
    cloud: Model,
    records: Vec<stream::Record>,
}

impl Ctx {
    /// Sends record `next` (round and round the stream) and counts it into `phase`.
    async fn send(&self, next: &mut usize, phase: &mut Phase) -> anyhow::Result<()> {
        let r = &self.records[*next % self.records.len()];
        *next += 1;
        let cloud_top1 = self
            .cloud
            .predict(&Tensor {
                shape: vec![1, 64],
                data: TensorData::U8(r.pixels.clone()),
            })
            .map(|p| edge_agent::cascade::top1(&p.probabilities))?;
        let body = json!({
            "inputs": [{"name": "input", "shape": [1, 64], "datatype": "UINT8", "data": r.pixels}],
        });
        let v: Value = self
            .client
            .post(&self.url)
            .json(&body)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let probs: Vec<f32> = serde_json::from_value(v["outputs"][0]["data"].clone())?;
        phase.requests += 1;
        phase.escalated += u64::from(v["parameters"]["tier"] != "edge");
        phase.agree += u64::from(cloud_top1 == edge_agent::cascade::top1(&probs));
        phase
            .versions
            .insert(v["model_version"].as_str().unwrap_or("?").to_string());
        Ok(())
    }
}

fn main() -> anyhow::Result<()> {
    tierd_runtime::init_logging("warn,rumqttd=off");
    let args = Args::parse();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(demo(args))
}

async fn demo(args: Args) -> anyhow::Result<()> {
    let records = stream::read(&repo_path("models/eval/stream.bin"))?;
    let cloud = Model::load(&repo_path(CLOUD_MANIFEST))?;
    let state = std::env::temp_dir().join(format!("tierd-rollout-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    std::fs::create_dir_all(&state)?;

    // The operator's model-release key and the two versions of digits-edge.
    let key = state.join("release.pk8");
    let signer = tierd_runtime::keyfile::create(&key)?;
    let models = state.join("releases");
    let current = release::signed_copy(
        &repo_path("models/edge/digits-edge-tiny.toml"),
        "digits-edge",
        "1.0.0",
        &models,
        &signer,
    )?;
    let candidate = release::signed_copy(
        &repo_path(EDGE_MANIFEST),
        "digits-edge",
        "2.0.0",
        &models,
        &signer,
    )?;

    let broker_port = free_port()?;
    let relay_cfg = inproc::relay_config(broker_port, state.join("relay"));
    let mut agent_cfg = inproc::agent_config("rollout-pi", broker_port, state.join("agent"));
    inproc::trust_relay(&mut agent_cfg, &relay_cfg)?;
    agent_cfg.model.manifest = current;
    agent_cfg.model.trusted_keys = vec![signer.public().clone()];
    agent_cfg.cascade.max_audits_per_second = 1000;
    let token_file = relay_cfg
        .state_dir()
        .join(cloud_relay::http_auth::TOKEN_FILE_NAME);
    let relay = Relay::start(relay_cfg)
        .await
        .context("starting the relay")?;
    let api = format!("http://{}", relay.http_addr());
    let relay = inproc::serve_relay(relay);
    let agent = Agent::start(agent_cfg)
        .await
        .context("starting the agent")?;
    let addr = agent.local_addr()?;
    let escalator = agent.escalator();
    let agent = inproc::serve_agent(agent);
    inproc::wait_connected(&escalator, Duration::from_secs(10)).await?;
    let token = std::fs::read_to_string(&token_file)?.trim().to_string();
    let client = reqwest::Client::builder().no_proxy().build()?;
    let url = format!("http://{addr}/v2/models/digits-edge/infer");
    println!(
        "tierd rollout demo: relay on {api}, agent on http://{addr}, serving digits-edge 1.0.0"
    );

    let ctx = Ctx {
        client: client.clone(),
        url,
        cloud,
        records,
    };
    let mut next = 0usize;

    // Before: the tiny model, its threshold steered by the relay's tuner.
    let mut before = Phase::default();
    for _ in 0..args.phase {
        ctx.send(&mut next, &mut before).await?;
    }
    println!("{}", before.line("before"));

    // The rollout, as `cloud-relay rollout start` sends it.
    let manifest = std::fs::read_to_string(&candidate)?;
    let signature = std::fs::read_to_string(tierd_runtime::signature_path(&candidate))?;
    let onnx = std::fs::read(candidate.with_file_name("digits-edge.onnx"))?;
    let t0 = Instant::now();
    let resp = client
        .post(format!("{api}/api/rollouts"))
        .bearer_auth(&token)
        .json(&json!({
            "id": "digits-2", "manifest": manifest, "signature": signature,
            "onnx_hex": hex::encode(&onnx), "devices": ["rollout-pi"], "shadow_rate": args.shadow_rate,
        }))
        .send()
        .await?;
    if !resp.status().is_success() {
        bail!("rollout start: {}", resp.text().await?);
    }
    println!(
        "rollout digits-2 started: digits-edge 2.0.0 ({} bytes), shadow rate {}",
        onnx.len(),
        args.shadow_rate
    );
    let mut during = Phase::default();
    let mut last_phase = String::new();
    let verdict = loop {
        for _ in 0..100 {
            ctx.send(&mut next, &mut during).await?;
        }
        let v: Value = client
            .get(format!("{api}/api/rollouts/digits-2"))
            .bearer_auth(&token)
            .send()
            .await?
            .json()
            .await?;
        let d = &v["devices"]["rollout-pi"];
        let phase = match &d["phase"] {
            Value::String(s) => s.clone(),
            Value::Object(o) => o.keys().next().cloned().unwrap_or_default(),
            _ => String::new(),
        };
        if phase != last_phase {
            let extra = if phase == "Shadowing" {
                format!(
                    " (fetched in {} chunks and verified) after {:.2} s",
                    onnx.len()
                        .div_ceil(tierd_protocol::rollout::MAX_CHUNK_BYTES as usize),
                    t0.elapsed().as_secs_f64(),
                )
            } else {
                String::new()
            };
            println!(
                "  device rollout-pi: {phase}{extra} ({} requests since the start)",
                during.requests
            );
            last_phase = phase.clone();
        }
        if phase == "Promoted" || phase == "RolledBack" || phase == "Failed" {
            break d["judgement"]["verdict"]["why"]
                .as_str()
                .unwrap_or(d["reason"].as_str().unwrap_or(""))
                .to_string();
        }
        if during.requests as usize > args.max_requests {
            bail!(
                "the rollout was not decided within {} requests: {v:#}",
                args.max_requests
            );
        }
    };
    println!("  verdict: {verdict}");
    println!("{}", during.line("during"));
    let mut after = Phase::default();
    for _ in 0..args.phase {
        ctx.send(&mut next, &mut after).await?;
    }
    println!("{}", before.line("before"));
    println!("{}", after.line("after"));
    agent.shutdown().await??;
    relay.shutdown().await?;
    let _ = std::fs::remove_dir_all(&state);
    Ok(())
}
