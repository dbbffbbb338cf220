//! `tierd-demo`: the whole path on one machine with nothing installed.
//!
//! Starts a cloud relay (with its embedded broker) and an edge agent in this process — the same
//! library code the daemons run — then replays the labelled evaluation stream through the agent's
//! HTTP API like a local app would, and prints what the cascade did: where requests were answered,
//! accuracy against the true labels next to edge-only and cloud-only, latency per tier, and the
//! bytes that went over MQTT.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use cloud_relay::Relay;
use edge_agent::Agent;
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tierd_devkit::{free_port, inproc, repo_path, CLOUD_MANIFEST, EDGE_MANIFEST};
use tierd_runtime::{stream, Model};
use tokio::sync::Semaphore;

#[derive(Parser)]
#[command(
    name = "tierd-demo",
    about = "Relay + embedded broker + agent on this machine, replaying the evaluation stream"
)]
struct Args {
    /// Evaluation stream to replay.
    #[arg(long, default_value_os_t = repo_path("models/eval/stream.bin"))]
    stream: PathBuf,
    /// Replay only the first N records (0 = all).
    #[arg(long, default_value_t = 0)]
    limit: usize,
    /// Requests in flight at once (like several local apps).
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Pin the escalation threshold (max softmax probability) as an operator override.
    /// Default: the model's offline-certified threshold, moved by the relay's tuner.
    #[arg(long)]
    threshold: Option<f32>,
    /// Escalation timeout in milliseconds.
    #[arg(long, default_value_t = 250)]
    timeout_ms: u64,
    /// Rows of models/eval/breast-stream.npy sent to the second model the agent serves
    /// (breast-edge, escalating to its own relay pool with breast-cloud); 0 = skip.
    #[arg(long, default_value_t = 1000)]
    breast_limit: usize,
}

/// The second sample pair: FP32 features, a logits edge model, its own relay pool.
const BREAST_EDGE: &str = "models/edge/breast-edge.toml";
const BREAST_CLOUD: &str = "models/cloud/breast-cloud.toml";
/// The breast-edge threshold for the demo: 0.8 escalates ~30 % of the stream at ~99.9 %
/// agreement with breast-cloud (models/README.md).
const BREAST_THRESHOLD: f32 = 0.8;

#[derive(Default)]
struct TierStats {
    count: u64,
    correct: u64,
    latency_us: Option<Histogram<u64>>,
}

impl TierStats {
    fn record(&mut self, correct: bool, us: u64) {
        self.count += 1;
        self.correct += u64::from(correct);
        let h = self.latency_us.get_or_insert_with(|| {
            Histogram::new_with_bounds(1, 60_000_000, 3).expect("static bounds are valid")
        });
        let _ = h.record(us.max(1));
    }
}

fn main() -> anyhow::Result<()> {
    tierd_runtime::init_logging("warn,rumqttd=off");
    let args = Args::parse();
    if args.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(demo(args))
}

async fn demo(args: Args) -> anyhow::Result<()> {
    let mut records = stream::read(&args.stream)?;
    if args.limit > 0 {
        records.truncate(args.limit);
    }
    let edge_manifest = repo_path(EDGE_MANIFEST);
    let cloud_manifest = repo_path(CLOUD_MANIFEST);

    // 1. The relay with its embedded broker, on a free port so a local Mosquitto is no obstacle.
    //    State (spool, applied config, overrides) in a scratch folder: a demo leaves no trace.
    let broker_port = free_port()?;
    let state = std::env::temp_dir().join(format!("tierd-demo-{}", std::process::id()));
    let mut relay_cfg = inproc::relay_config(broker_port, state.join("relay"));
    // The relay's default tuning steers the threshold (unless --threshold pins one); an answer
    // that disagrees with the cloud is priced at 0.2 cents so the cost report weighs accuracy
    // too (illustrative: set your own in [prices]).
    relay_cfg.prices.per_disagreement = 0.002;
    // One pool per model behind the embedded broker: this relay answers digits-edge, a second
    // one (below) breast-edge.
    relay_cfg.model.serves = vec!["digits-edge".into()];
    let prices = relay_cfg.prices.clone();
    let delta = relay_cfg.tuning.delta;
    let target = relay_cfg.tuning.target;
    let token_file = relay_cfg
        .state_dir()
        .join(cloud_relay::http_auth::TOKEN_FILE_NAME);
    let relay_cfg_for_trust = relay_cfg.clone();
    let relay = Relay::start(relay_cfg)
        .await
        .context("starting the relay")?;
    let relay_stats = relay.stats();
    let relay_http = relay.http_addr();
    let fleet = relay.fleet();
    let relay = inproc::serve_relay(relay);
    let breast_relay = if args.breast_limit > 0 {
        let mut cfg = inproc::relay_config(broker_port, state.join("relay-breast"));
        cfg.relay_id = "relay-breast".into();
        cfg.mqtt = Some(relay_cfg_for_trust.client_mqtt());
        cfg.model.manifest = repo_path(BREAST_CLOUD);
        cfg.model.serves = vec!["breast-edge".into()];
        cfg.tuning.push = false;
        let r = Relay::start(cfg)
            .await
            .context("starting the breast-cancer relay pool")?;
        Some(inproc::serve_relay(r))
    } else {
        None
    };

    // 2. The agent, speaking HTTP on a free port and MQTT to that broker; one report a second,
    //    so the relay's view is live while the replay runs.
    let mut agent_cfg = inproc::agent_config("demo-pi", broker_port, state.join("agent"));
    // The agent applies only config documents signed by a relay key it pins.
    inproc::trust_relay(&mut agent_cfg, &relay_cfg_for_trust)
        .context("loading the relay's config-signing key")?;
    agent_cfg.cascade.threshold = None;
    agent_cfg.cascade.escalation_timeout_ms = args.timeout_ms;
    if args.breast_limit > 0 {
        agent_cfg.models.push(edge_agent::config::ExtraModelConfig {
            manifest: repo_path(BREAST_EDGE),
            threshold: Some(BREAST_THRESHOLD),
            signal: None,
        });
    }
    let agent = Agent::start(agent_cfg)
        .await
        .context("starting the agent")?;
    let addr = agent.local_addr()?;
    let recorder = agent.recorder();
    let counters = &recorder.counters;
    let mqtt = agent.mqtt_stats();
    let escalator = agent.escalator();
    let agent = inproc::serve_agent(agent);
    if inproc::wait_connected(&escalator, Duration::from_secs(10))
        .await
        .is_err()
    {
        bail!("the agent did not connect to the embedded broker on port {broker_port} within 10 s");
    }
    // The relay subscribes right after it connects; give its SUBSCRIBE a moment to land.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let token = std::fs::read_to_string(&token_file)
        .with_context(|| format!("reading the relay's API token {}", token_file.display()))?;
    push_signed_config(relay_http, token.trim(), args.threshold).await?;

    println!(
        "tierd demo: relay + embedded broker on 127.0.0.1:{broker_port}, agent on http://{addr}"
    );
    println!(
        "            agent metrics http://{addr}/metrics, fleet view http://{relay_http}/api/devices"
    );
    println!(
        "            (the relay's API wants `Authorization: Bearer $(cat {})`)",
        token_file.display()
    );
    println!(
        "replaying {} images from {} (threshold {}, timeout {} ms, {} in flight)",
        records.len(),
        args.stream.display(),
        args.threshold.map_or_else(
            || "the model's offline-certified one, tuned by the relay".to_string(),
            |t| format!("{t}, pinned")
        ),
        args.timeout_ms,
        args.concurrency
    );

    // 3. Replay through HTTP.
    let client = reqwest::Client::builder().no_proxy().build()?;
    let url = Arc::new(format!("http://{addr}/v2/models/digits-edge/infer"));
    let sem = Arc::new(Semaphore::new(args.concurrency));
    let mut handles = Vec::with_capacity(records.len());
    let started = Instant::now();
    for (i, r) in records.iter().enumerate() {
        let permit = sem.clone().acquire_owned().await?;
        let client = client.clone();
        let url = url.clone();
        let body = json!({
            "id": i.to_string(),
            "inputs": [{"name": "input", "shape": [1, 64], "datatype": "UINT8", "data": r.pixels}],
        });
        let label = r.label;
        handles.push(tokio::spawn(async move {
            let t = Instant::now();
            let resp = client.post(url.as_str()).json(&body).send().await;
            let us = t.elapsed().as_micros() as u64;
            drop(permit);
            let v: Value = resp?.error_for_status()?.json().await?;
            anyhow::Ok((label, us, v))
        }));
        let done = i + 1;
        if done % (records.len() / 10).max(1) == 0 {
            println!(
                "  {:>3}% sent  ({done} requests, edge {} / cloud {} / fallback {})",
                done * 100 / records.len(),
                counters.edge.load(Ordering::Relaxed),
                counters.cloud.load(Ordering::Relaxed),
                counters.edge_fallback.load(Ordering::Relaxed),
            );
        }
    }
    let mut per_tier: [(&str, TierStats); 3] = [
        ("edge", TierStats::default()),
        ("cloud", TierStats::default()),
        ("edge_fallback", TierStats::default()),
    ];
    let mut fallback_reasons = std::collections::BTreeMap::<String, u64>::new();
    for h in handles {
        let (label, us, v) = h.await??;
        let tier = v["parameters"]["tier"].as_str().unwrap_or("?").to_owned();
        let predicted = v["parameters"]["label"]
            .as_str()
            .and_then(|s| s.parse::<u8>().ok());
        if let Some(r) = v["parameters"]["fallback_reason"].as_str() {
            *fallback_reasons.entry(r.to_owned()).or_default() += 1;
        }
        let slot = per_tier
            .iter_mut()
            .find(|(name, _)| *name == tier)
            .with_context(|| format!("unexpected tier {tier:?} in response"))?;
        slot.1.record(predicted == Some(label), us);
    }
    let elapsed = started.elapsed();
    let breast = if args.breast_limit > 0 {
        Some(replay_breast(&client, addr, args.breast_limit).await?)
    } else {
        None
    };

    // 4. Baselines from the same images: each model run directly.
    let edge = Model::load(&edge_manifest)?;
    let cloud = Model::load(&cloud_manifest)?;
    let (mut edge_ok, mut cloud_ok) = (0u64, 0u64);
    for r in &records {
        let t = edge.manifest().wire_input(&to_f32(&r.pixels));
        edge_ok += u64::from(argmax(&edge.predict(&t)?.probabilities) == usize::from(r.label));
        cloud_ok += u64::from(argmax(&cloud.predict(&t)?.probabilities) == usize::from(r.label));
    }

    let n = records.len() as f64;
    let total: u64 = per_tier.iter().map(|(_, s)| s.count).sum();
    let correct: u64 = per_tier.iter().map(|(_, s)| s.correct).sum();
    println!();
    println!("== summary ==================================================");
    println!(
        "requests            {total} in {:.1} s ({:.0} req/s)",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64()
    );
    for (name, s) in &per_tier {
        let (p50, p95) = s
            .latency_us
            .as_ref()
            .map(|h| (h.value_at_quantile(0.5), h.value_at_quantile(0.95)))
            .unwrap_or((0, 0));
        println!(
            "  {name:<14} {:>6} ({:>5.1}%)  latency p50 {:>6.2} ms  p95 {:>6.2} ms",
            s.count,
            100.0 * s.count as f64 / n,
            p50 as f64 / 1000.0,
            p95 as f64 / 1000.0
        );
    }
    for (reason, count) in &fallback_reasons {
        println!("    fallback reason {reason}: {count}");
    }
    println!("accuracy vs labels");
    println!("  edge only        {:>6.2}%", 100.0 * edge_ok as f64 / n);
    println!("  cloud only       {:>6.2}%", 100.0 * cloud_ok as f64 / n);
    println!(
        "  tierd cascade    {:>6.2}%  with {:.1}% of requests sent to the cloud",
        100.0 * correct as f64 / n,
        100.0 * per_tier[1].1.count as f64 / n
    );
    println!(
        "MQTT (agent side)   sent {} bytes in {} messages, received {} bytes in {} messages",
        mqtt.bytes_out.load(Ordering::Relaxed),
        mqtt.messages_out.load(Ordering::Relaxed),
        mqtt.bytes_in.load(Ordering::Relaxed),
        mqtt.messages_in.load(Ordering::Relaxed),
    );
    println!(
        "relay               answered {}, errors {}, rejected {}",
        relay_stats.answered.load(Ordering::Relaxed),
        relay_stats.errors.load(Ordering::Relaxed),
        relay_stats.rejected.load(Ordering::Relaxed),
    );

    // The agent's last report covers the final partial window; once it has landed, the relay's
    // fleet view accounts for every request.
    let _ = agent.shutdown().await;
    let deadline = Instant::now() + Duration::from_secs(5);
    let record = loop {
        let rec = fleet.lock().ok().and_then(|f| f.get("demo-pi").cloned());
        let done = rec.as_ref().is_some_and(|r| {
            r.latest.totals.answered() == total + breast.as_ref().map_or(0, |b| b.sent)
        });
        if done || Instant::now() > deadline {
            break rec;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    match &record {
        Some(d) => {
            let r = &d.latest;
            let e = &r.energy;
            println!(
                "relay fleet view    demo-pi: {} reports (seq {}..{}, {} missing), totals edge {} / cloud {} / fallback {}",
                d.reports,
                d.first_seq,
                d.last_seq,
                d.missing_reports,
                r.totals.edge,
                r.totals.cloud,
                r.totals.edge_fallback
            );
            if let Some(b) = &breast {
                println!(
                    "                    (device totals: both models, the {} breast-edge requests below included)",
                    b.sent
                );
            }
            println!(
                "energy              meter {}{}: {:.3} J attributed to the agent in total{}",
                e.meter,
                if e.estimated {
                    " (ESTIMATED: no power meter on this machine)"
                } else {
                    ""
                },
                e.total_joules,
                e.error
                    .as_deref()
                    .map(|m| format!(" [{m}]"))
                    .unwrap_or_default()
            );
        }
        None => println!("relay fleet view    no telemetry from demo-pi reached the relay"),
    }
    if let Some(d) = &record {
        if let Some(cal) = d.calibration.as_ref() {
            let c = &cal.certificate;
            println!(
                "online certificate  threshold {} for {} % agreement with the cloud: lower bound {:.4} (estimate {:.4}), escalation rate {:.1} %, from {} requests ({} audited){}",
                c.threshold,
                100.0 * target,
                c.agreement_lower_bound,
                c.agreement,
                100.0 * c.escalation_rate,
                c.requests,
                c.audited,
                if c.insufficient_evidence { " [insufficient evidence]" } else { "" }
            );
            if let Some(o) = &cal.offline {
                println!(
                    "offline certificate threshold {} for {} % agreement: lower bound {:.4} from {} of {} held-out samples disagreeing ({})",
                    o.threshold,
                    100.0 * o.target,
                    o.agreement_lower_bound,
                    o.disagreements,
                    o.samples,
                    o.model
                );
            }
            println!(
                "threshold in force  {} ({}: {}); the device ran {}",
                cal.in_force.threshold, cal.in_force.basis, cal.in_force.why, d.latest.threshold
            );
        }
        let report = cloud_relay::report::build(&[cloud_relay::report::usage(d, delta)], &prices);
        println!(
            "\ncost report (cloud-relay report):\n{}",
            cloud_relay::report::render_text(&report)
        );
    }
    if let Some(b) = &breast {
        b.print();
    }
    if let Some(r) = breast_relay {
        let _ = r.shutdown().await;
    }
    let _ = relay.shutdown().await;
    let _ = std::fs::remove_dir_all(&state);
    if total != records.len() as u64 {
        bail!("{} requests sent but {total} answered", records.len());
    }
    Ok(())
}

/// What the second model did with the breast-cancer stream.
struct Breast {
    sent: u64,
    tiers: std::collections::BTreeMap<String, u64>,
    cascade_ok: u64,
    edge_ok: u64,
    cloud_ok: u64,
}

impl Breast {
    fn print(&self) {
        let n = self.sent as f64;
        let pct = |k: u64| 100.0 * k as f64 / n;
        println!("\n== second model on the same agent: breast-edge -> breast-cloud ==");
        println!(
            "FP32 features, logits softmaxed at the edge, threshold {BREAST_THRESHOLD} (fixed), \
             escalations to their own relay pool"
        );
        let tiers: Vec<String> = self.tiers.iter().map(|(t, c)| format!("{t} {c}")).collect();
        println!(
            "{} rows of breast-stream.npy: {}",
            self.sent,
            tiers.join(" / ")
        );
        println!(
            "accuracy vs labels  edge only {:.2}%, cloud only {:.2}%, cascade {:.2}%",
            pct(self.edge_ok),
            pct(self.cloud_ok),
            pct(self.cascade_ok)
        );
    }
}

/// Sends the first `limit` rows of the breast-cancer stream to the agent's second model and
/// scores the answers against the labels, next to each model run alone.
async fn replay_breast(
    client: &reqwest::Client,
    addr: std::net::SocketAddr,
    limit: usize,
) -> anyhow::Result<Breast> {
    let (x, y) = tierd_devkit::breast_stream().context("reading models/eval/breast-stream*.npy")?;
    let edge = Model::load(&repo_path(BREAST_EDGE))?;
    let cloud = Model::load(&repo_path(BREAST_CLOUD))?;
    let url = format!("http://{addr}/v2/models/breast-edge/infer");
    let mut out = Breast {
        sent: 0,
        tiers: Default::default(),
        cascade_ok: 0,
        edge_ok: 0,
        cloud_ok: 0,
    };
    for (row, &label) in x.iter().zip(&y).take(limit) {
        let body = json!({
            "inputs": [{"name": "input", "shape": [1, row.len()], "datatype": "FP32", "data": row}],
        });
        let v: Value = client
            .post(&url)
            .json(&body)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let tier = v["parameters"]["tier"].as_str().unwrap_or("?").to_owned();
        *out.tiers.entry(tier).or_default() += 1;
        let label = usize::try_from(label).unwrap_or(usize::MAX);
        let got = v["outputs"][0]["data"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_f64)
                    .map(|f| f as f32)
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        out.cascade_ok += u64::from(!got.is_empty() && argmax(&got) == label);
        let t = edge.manifest().wire_input(row);
        out.edge_ok += u64::from(argmax(&edge.predict(&t)?.probabilities) == label);
        out.cloud_ok += u64::from(argmax(&cloud.predict(&t)?.probabilities) == label);
        out.sent += 1;
    }
    Ok(out)
}

fn argmax(p: &[f32]) -> usize {
    edge_agent::cascade::top1(p)
}

/// The relay sends an operator document (signed with its key; the threshold if one is pinned,
/// else the default audit rate) and the agent applies it: the demo runs on a config the
/// agent verified.
async fn push_signed_config(
    relay_http: std::net::SocketAddr,
    token: &str,
    threshold: Option<f32>,
) -> anyhow::Result<()> {
    let client = reqwest::Client::builder().no_proxy().build()?;
    // Forced: the demo may configure its device before the relay has seen its status.
    let url = format!("http://{relay_http}/api/devices/demo-pi/config?force=true");
    let body = match threshold {
        Some(t) => serde_json::json!({ "threshold": t }),
        None => serde_json::json!({
            "audit_rate": edge_agent::config::CascadeConfig::default().audit_rate
        }),
    };
    let what = match threshold {
        Some(t) => format!("threshold {t}"),
        None => "the default audit rate".to_string(),
    };
    let resp = client
        .put(&url)
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .context("pushing the demo's config through the relay")?;
    if !resp.status().is_success() {
        bail!(
            "the relay refused the demo's config: {}",
            resp.text().await.unwrap_or_default()
        );
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let view: serde_json::Value = client
            .get(&url)
            .bearer_auth(token)
            .send()
            .await?
            .json()
            .await?;
        let published = &view["published"]["version"];
        if view["last_ack"]["applied"] == true && &view["last_ack"]["version"] == published {
            println!(
                "remote config: the relay's signed document (version {published}, {what}) applied by the agent"
            );
            return Ok(());
        }
        if view["last_ack"]["applied"] == false && &view["last_ack"]["version"] == published {
            bail!(
                "the agent rejected the relay's signed config: {}",
                view["last_ack"]["reason"]
            );
        }
        if std::time::Instant::now() > deadline {
            bail!("the agent did not acknowledge the relay's signed config within 15 s: {view}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Pixels as the wire values a manifest's golden vectors and `wire_input` take.
fn to_f32(pixels: &[u8]) -> Vec<f32> {
    pixels.iter().map(|&p| f32::from(p)).collect()
}
