//! Benchmark 8 (`--rollout-only`): what a model rollout costs.
//!
//! a. **Transfer**: bytes on the wire and time from `POST /api/rollouts` to the device's
//!    `Shadowing` ack (document, chunked download over the embedded broker, verification: size,
//!    sha256, signature, tract load, golden vectors), for a 22 KB and a 204 KB candidate; a fresh
//!    in-process agent per round, so every round downloads.
//! b. **Shadow**: the `edge-agent` binary's CPU time per request (from /proc) and the request
//!    latency, with a candidate shadowing every request next to an agent without one, rounds
//!    interleaved. The shadow's cloud labels (audits of local answers) cost relay CPU too; that is
//!    not in the figure, which is the device's.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};
use tierd_devkit::{free_port, inproc, release, repo_path, CLOUD_MANIFEST, EDGE_MANIFEST};
use tierd_protocol::rollout::{ChunkBody, MAX_CHUNK_BYTES};
use tierd_protocol::{encode, ModelChunk, ModelFetch, Signer};
use tierd_runtime::stream;

use crate::rss::{find_bin, Daemon};
use crate::stats::median;

struct Api {
    client: reqwest::Client,
    base: String,
    token: String,
}

impl Api {
    async fn post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        let r = self
            .client
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await?;
        let status = r.status();
        let v: Value = r.json().await?;
        if !status.is_success() {
            bail!("POST {path}: {status}: {v}");
        }
        Ok(v)
    }

    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        Ok(self
            .client
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await?
            .json()
            .await?)
    }

    /// Starts rollout `id` of `manifest` for `device`.
    async fn start(
        &self,
        id: &str,
        manifest: &Path,
        device: &str,
        rate: f64,
    ) -> anyhow::Result<()> {
        let text = std::fs::read_to_string(manifest)?;
        let sig = std::fs::read_to_string(tierd_runtime::signature_path(manifest))?;
        let m = tierd_runtime::Manifest::from_text(manifest, &text)?;
        let onnx = std::fs::read(m.model_path())?;
        self.post(
            "/api/rollouts",
            json!({"id": id, "manifest": text, "signature": sig, "onnx_hex": hex::encode(&onnx),
                   "devices": [device], "shadow_rate": rate}),
        )
        .await?;
        Ok(())
    }

    /// Waits until `device` acks `phase` in rollout `id`.
    async fn wait_phase(&self, id: &str, device: &str, phase: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let v = self.get(&format!("/api/rollouts/{id}")).await?;
            let p = &v["devices"][device]["phase"];
            if p == phase {
                return Ok(());
            }
            if p == "Failed" {
                bail!(
                    "rollout {id} failed on {device}: {}",
                    v["devices"][device]["reason"]
                );
            }
            if Instant::now() > deadline {
                bail!("{device} did not reach {phase} in rollout {id}: {v:#}");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

/// MQTT payload bytes of a transfer of `size` bytes: one fetch and one chunk per 32 KiB.
fn wire_bytes(size: u64) -> anyhow::Result<(u64, u64)> {
    let chunk = u64::from(MAX_CHUNK_BYTES);
    let chunks = size.div_ceil(chunk);
    let fetch = encode(&ModelFetch {
        rollout_id: "bench-0-0".into(),
        sha256: "0".repeat(64),
        offset: size,
        len: MAX_CHUNK_BYTES,
    })?
    .len() as u64;
    let header = encode(&ModelChunk {
        sha256: "0".repeat(64),
        offset: size,
        total: size,
        body: ChunkBody::Data(vec![0; MAX_CHUNK_BYTES as usize]),
    })?
    .len() as u64
        - chunk;
    Ok((chunks, chunks * (fetch + header) + size))
}

pub async fn run(rounds: usize, requests: usize) -> anyhow::Result<String> {
    let dir = tempfile::tempdir()?;
    let key = dir.path().join("release.pk8");
    let signer: Signer = tierd_runtime::keyfile::create(&key)?;
    let releases = dir.path().join("releases");
    let current = release::signed_copy(
        &repo_path("models/edge/digits-edge-tiny.toml"),
        "digits-edge",
        "1.0.0",
        &releases,
        &signer,
    )?;
    let candidates = [
        (
            "digits-edge 2.0.0",
            release::signed_copy(
                &repo_path(EDGE_MANIFEST),
                "digits-edge",
                "2.0.0",
                &releases,
                &signer,
            )?,
        ),
        (
            "digits-cloud as digits-edge 3.0.0",
            release::signed_copy(
                &repo_path(CLOUD_MANIFEST),
                "digits-edge",
                "3.0.0",
                &releases,
                &signer,
            )?,
        ),
    ];

    // One relay (embedded broker) whose rollouts never decide: the shadow runs as long as the
    // bench wants.
    let broker_port = free_port()?;
    let mut relay_cfg = inproc::relay_config(broker_port, dir.path().join("relay"));
    relay_cfg.tuning.push = false;
    relay_cfg.rollout.min_pairs = 10_000_000;
    relay_cfg.rollout.max_pairs = 10_000_000;
    let token_file = relay_cfg
        .state_dir()
        .join(cloud_relay::http_auth::TOKEN_FILE_NAME);
    let relay_keys = {
        let (s, _) = cloud_relay::signing::load_or_create(&relay_cfg.signing_key_path())?;
        s.public().clone()
    };
    let relay = cloud_relay::Relay::start(relay_cfg).await?;
    let api = Api {
        client: reqwest::Client::builder().no_proxy().build()?,
        base: format!("http://{}", relay.http_addr()),
        token: std::fs::read_to_string(&token_file)?.trim().to_string(),
    };
    let relay = inproc::serve_relay(relay);

    // a. Transfer.
    let mut out = String::from(
        "## 8. Model rollout\n\n### 8a. Rolling a model out to one device (embedded broker)\n\n\
         From `POST /api/rollouts` to the device's `Shadowing` ack: the signed document, the chunked\n\
         download, and the checks (size, sha256, signature, tract load, golden vectors). A fresh\n\
         agent each round, so each round downloads.\n\n\
         | candidate | file | chunks | MQTT payload bytes | time, median of rounds | range |\n|---|---|---|---|---|---|\n",
    );
    for (k, (name, manifest)) in candidates.iter().enumerate() {
        let size = std::fs::metadata(
            manifest.with_file_name(
                tierd_runtime::Manifest::from_path(manifest)?
                    .file
                    .file_name()
                    .context("file")?,
            ),
        )?
        .len();
        let mut times = Vec::new();
        for r in 0..rounds {
            let device = format!("bench-{k}-{r}");
            let mut cfg = inproc::agent_config(&device, broker_port, dir.path().join(&device));
            cfg.model.manifest = current.clone();
            cfg.model.trusted_keys = vec![signer.public().clone()];
            cfg.remote_config.trusted_keys = vec![relay_keys.clone()];
            cfg.telemetry.interval_s = 60.0;
            let agent = edge_agent::Agent::start(cfg).await?;
            let escalator = agent.escalator();
            let agent = inproc::serve_agent(agent);
            inproc::wait_connected(&escalator, Duration::from_secs(10)).await?;
            tokio::time::sleep(Duration::from_millis(200)).await;
            let id = format!("bench-{k}-{r}");
            let t = Instant::now();
            api.start(&id, manifest, &device, 0.01).await?;
            api.wait_phase(&id, &device, "Shadowing").await?;
            times.push(t.elapsed().as_secs_f64() * 1000.0);
            api.post(&format!("/api/rollouts/{id}/abort"), json!({}))
                .await?;
            agent.shutdown().await??;
            eprintln!(
                "rollout transfer {name}: round {} {:.1} ms",
                r + 1,
                times[r]
            );
        }
        let (chunks, bytes) = wire_bytes(size)?;
        let lo = times.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = times.iter().copied().fold(0.0, f64::max);
        out.push_str(&format!(
            "| {name} | {size} B | {chunks} | {bytes} | {:.1} ms | {lo:.1}–{hi:.1} ms |\n",
            median(times.iter().copied())
        ));
    }

    // b. Shadow cost on the real binary.
    let agent_bin = find_bin("edge-agent")?;
    let records = stream::read(&repo_path("models/eval/stream.bin"))?;
    let records = &records[..requests.min(records.len())];
    let mut agents = Vec::new();
    let sides = [
        ("bench-noshadow", None),
        ("bench-shadow-10", Some(0.1)),
        ("bench-shadow", Some(1.0)),
    ];
    for (name, shadow) in sides {
        let http_port = free_port()?;
        let adir = dir.path().join(name);
        std::fs::create_dir_all(&adir)?;
        let cfg = adir.join("agent.toml");
        std::fs::write(
            &cfg,
            format!(
                "device_id = \"{name}\"\nstate_dir = {:?}\n\n[http]\nlisten = \"127.0.0.1:{http_port}\"\n\n\
                 [model]\nmanifest = {:?}\ntrusted_keys = [\"{}\"]\n\n[cascade]\nmax_audits_per_second = 10000\n\n\
                 [mqtt]\nhost = \"127.0.0.1\"\nport = {broker_port}\n\n[telemetry]\ninterval_s = 1\n\n\
                 [remote_config]\ntrusted_keys = [\"{relay_keys}\"]\n",
                adir.join("state"),
                current,
                signer.public(),
            ),
        )?;
        let mut d = Daemon::spawn("edge-agent", &agent_bin, &cfg, &adir)?;
        let base = format!("http://127.0.0.1:{http_port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while api
            .client
            .get(format!("{base}/v2/health/ready"))
            .send()
            .await
            .is_err()
        {
            d.check_alive()?;
            if Instant::now() > deadline {
                bail!("{name} not ready (log {})", d.log.display());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        if let Some(rate) = shadow {
            api.start(name, &candidates[0].1, name, rate).await?;
            api.wait_phase(name, name, "Shadowing").await?;
        }
        agents.push((name, d, format!("{base}/v2/models/digits-edge/infer")));
    }
    let cpu = |pid: u32| -> anyhow::Result<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        let rest = stat.rsplit_once(')').context("stat")?.1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
        Ok(ticks / 100.0)
    };
    let mut cpu_per = [Vec::new(), Vec::new(), Vec::new()];
    let mut p50 = [Vec::new(), Vec::new(), Vec::new()];
    for round in 0..rounds.max(1) {
        for (i, (name, d, url)) in agents.iter().enumerate() {
            let pid = d.pid()?;
            let c0 = cpu(pid)?;
            let mut lat = Vec::with_capacity(records.len());
            for r in records {
                let t = Instant::now();
                let resp = api
                    .client
                    .post(url)
                    .json(&json!({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "UINT8", "data": r.pixels}]}))
                    .send()
                    .await?;
                if !resp.status().is_success() {
                    bail!("{name}: {}", resp.status());
                }
                lat.push(t.elapsed().as_secs_f64() * 1e6);
            }
            // Let the shadow's background work of this round finish before reading the CPU.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let c1 = cpu(pid)?;
            cpu_per[i].push((c1 - c0) / records.len() as f64 * 1e6);
            p50[i].push(median(lat.into_iter()));
            eprintln!(
                "shadow cost round {}: {name} {:.1} us CPU/request",
                round + 1,
                cpu_per[i].last().copied().unwrap_or(0.0)
            );
        }
    }
    // One more telemetry window, so the last round's shadow report reaches the relay.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let shadowed = api.get("/api/rollouts/bench-shadow").await?;
    let pairs = shadowed["devices"]["bench-shadow"]["evidence"]["current"]
        .as_array()
        .map_or(0, |b| {
            b.iter().filter_map(|x| x["requests"].as_u64()).sum::<u64>()
        });
    let cpu_of = |i: usize| median(cpu_per[i].iter().copied());
    let p50_of = |i: usize| median(p50[i].iter().copied());
    out.push_str(&format!(
        "\n### 8b. The shadow's cost on the device\n\n\
         `edge-agent` (this build) serving `digits-edge` 1.0.0, {} requests of stream.bin per round, \
         one at a time; CPU time of the agent process (/proc, 10 ms ticks) per request and the \
         client's p50, medians of {} interleaved rounds. With a shadow, `digits-edge` 2.0.0 \
         shadows a share of the requests, each local one audited for its cloud label ({pairs} \
         labelled pairs reached the relay at rate 1).\n\n\
         | agent | CPU per request | ratio | p50 latency | ratio |\n|---|---|---|---|---|\n",
        records.len(),
        rounds.max(1),
    ));
    for (i, (_, rate)) in sides.iter().enumerate() {
        let what = rate.map_or_else(
            || "no shadow".to_string(),
            |r| format!("shadow at rate {r}"),
        );
        out.push_str(&format!(
            "| {what} | {:.1} µs | {:.2}x | {:.0} µs | {:.2}x |\n",
            cpu_of(i),
            cpu_of(i) / cpu_of(0),
            p50_of(i),
            p50_of(i) / p50_of(0)
        ));
    }
    for (_, d, _) in agents {
        d.stop().await?;
    }
    relay.shutdown().await?;
    Ok(out)
}
