//! Memory of the real daemons: `cloud-relay` (embedded broker) and `edge-agent` as subprocesses
//! with config files, VmRSS sampled from /proc while a mixed load runs.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use tierd_devkit::{free_port, repo_path};
use tokio::process::{Child, Command};

use crate::inproc::{wait_for_tier, ESCALATION_TIMEOUT_MS};
use crate::inputs::{self, Example};

/// kB values from /proc/PID/status.
#[derive(Debug, Clone, Copy, Default)]
pub struct Mem {
    pub rss_kb: u64,
    pub hwm_kb: u64,
}

pub fn read_mem(pid: u32) -> anyhow::Result<Mem> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let field = |key: &str| -> anyhow::Result<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("{path}: no {key}"))
    };
    Ok(Mem {
        rss_kb: field("VmRSS:")?,
        hwm_kb: field("VmHWM:")?,
    })
}

pub struct RssReport {
    pub agent_idle: Mem,
    pub agent_peak_sampled_kb: u64,
    pub agent_end: Mem,
    pub relay_idle: Mem,
    pub relay_end: Mem,
    pub load_seconds: f64,
    pub requests: u64,
    pub cloud: u64,
    pub samples: u64,
    pub agent_bin: PathBuf,
}

/// A child that is killed (by its own pid, via tokio's kill-on-drop) however the bench ends.
pub struct Daemon {
    name: &'static str,
    child: Child,
    pub log: PathBuf,
}

impl Daemon {
    pub fn spawn(
        name: &'static str,
        bin: &Path,
        config: &Path,
        dir: &Path,
    ) -> anyhow::Result<Self> {
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(bin)
            .arg("run")
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info,rumqttd=off")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(Daemon { name, child, log })
    }

    pub fn pid(&self) -> anyhow::Result<u32> {
        self.child
            .id()
            .with_context(|| format!("{} has already exited", self.name))
    }

    /// Fails (with the tail of its log) if the daemon has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            bail!(
                "{} exited with {status}; last log lines:\n{}",
                self.name,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        Ok(())
    }

    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.check_alive()?;
        self.child.kill().await?;
        Ok(())
    }
}

/// Where `cargo build --release` put the daemons: next to this binary, which is built in the
/// same profile directory.
pub fn release_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    Ok(exe
        .parent()
        .context("the bench binary has no parent directory")?
        .to_owned())
}

pub fn find_bin(name: &str) -> anyhow::Result<PathBuf> {
    let p = release_dir()?.join(name);
    if !p.is_file() {
        bail!(
            "{} not found: run `cargo build --release -p edge-agent -p cloud-relay` first",
            p.display()
        );
    }
    Ok(p)
}

pub async fn run(
    examples: &[Example],
    input_name: &str,
    load_for: Duration,
    concurrency: usize,
) -> anyhow::Result<RssReport> {
    let agent_bin = find_bin("edge-agent")?;
    let relay_bin = find_bin("cloud-relay")?;
    let dir = std::env::temp_dir().join(format!("tierd-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let broker_port = free_port()?;
    let http_port = free_port()?;
    let abs = |rel: &str| -> anyhow::Result<String> {
        Ok(std::fs::canonicalize(repo_path(rel))
            .with_context(|| format!("resolving {rel}"))?
            .display()
            .to_string())
    };
    let relay_cfg = dir.join("relay.toml");
    std::fs::write(
        &relay_cfg,
        format!(
            // No tuning pushes: the load's tiers must not change mid-run (see `inproc`).
            "[embedded_broker]\nlisten = \"127.0.0.1:{broker_port}\"\n\n[model]\nmanifest = {:?}\n\n\
             [tuning]\npush = false\n",
            abs("models/cloud/digits-cloud.toml")?
        ),
    )?;
    let agent_cfg = dir.join("agent.toml");
    std::fs::write(
        &agent_cfg,
        format!(
            "device_id = \"bench-rss\"\n\n[http]\nlisten = \"127.0.0.1:{http_port}\"\n\n[model]\nmanifest = {:?}\n\n\
             [cascade]\nescalation_timeout_ms = {ESCALATION_TIMEOUT_MS}\n\n[mqtt]\nhost = \"127.0.0.1\"\nport = {broker_port}\n",
            abs("models/edge/digits-edge.toml")?
        ),
    )?;

    let mut relay = Daemon::spawn("cloud-relay", &relay_bin, &relay_cfg, &dir)?;
    wait_for_port(broker_port, &mut relay).await?;
    let mut agent = Daemon::spawn("edge-agent", &agent_bin, &agent_cfg, &dir)?;
    let client = reqwest::Client::builder().no_proxy().build()?;
    let base = format!("http://127.0.0.1:{http_port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        agent.check_alive()?;
        if let Ok(r) = client.get(format!("{base}/v2/health/ready")).send().await {
            if r.status().is_success() {
                break;
            }
        }
        if Instant::now() > deadline {
            bail!(
                "edge-agent not ready within 30 s (log: {})",
                agent.log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Let the MQTT session come up and the allocator settle before calling it idle.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (agent_pid, relay_pid) = (agent.pid()?, relay.pid()?);
    let agent_idle = read_mem(agent_pid)?;
    let relay_idle = read_mem(relay_pid)?;

    let url = format!("{base}/v2/models/digits-edge/infer");
    let jobs: Arc<Vec<(Bytes, &'static str)>> = Arc::new(
        examples
            .iter()
            .map(|e| {
                (
                    inputs::infer_body(&e.name, input_name, &e.pixels),
                    e.expected_tier,
                )
            })
            .collect(),
    );
    let unsure = jobs
        .iter()
        .find(|j| j.1 == "cloud")
        .context("no unsure example")?;
    wait_for_tier(&client, &url, &unsure.0, "cloud").await?;

    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(0));
    let samples = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (stop, peak, samples) = (stop.clone(), peak.clone(), samples.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let m = read_mem(agent_pid)?;
                peak.fetch_max(m.rss_kb, Ordering::Relaxed);
                samples.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            anyhow::Ok(())
        })
    };
    let next = Arc::new(AtomicUsize::new(0));
    let cloud = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let end = started + load_for;
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (client, url, jobs, next, cloud) = (
            client.clone(),
            url.clone(),
            jobs.clone(),
            next.clone(),
            cloud.clone(),
        );
        workers.push(tokio::spawn(async move {
            while Instant::now() < end {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let (body, tier) = &jobs[i % jobs.len()];
                let resp = tokio::time::timeout(
                    Duration::from_secs(10),
                    inputs::post(&client, &url, body.clone()),
                )
                .await
                .with_context(|| format!("request {i} timed out"))??;
                inputs::check_tier(&resp, tier, &format!("load request {i}"))?;
                if *tier == "cloud" {
                    cloud.fetch_add(1, Ordering::Relaxed);
                }
            }
            anyhow::Ok(())
        }));
    }
    let mut load_result = Ok(());
    for w in workers {
        if let Err(e) = w.await.map_err(anyhow::Error::from).and_then(|r| r) {
            load_result = Err(e);
        }
    }
    let load_seconds = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    sampler.await??;
    load_result?;
    let agent_end = read_mem(agent_pid)?;
    let relay_end = read_mem(relay_pid)?;
    let requests = next.load(Ordering::Relaxed) as u64;
    agent.stop().await?;
    relay.stop().await?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(RssReport {
        agent_idle,
        agent_peak_sampled_kb: peak.load(Ordering::Relaxed).max(agent_end.rss_kb),
        agent_end,
        relay_idle,
        relay_end,
        load_seconds,
        requests,
        cloud: cloud.load(Ordering::Relaxed),
        samples: samples.load(Ordering::Relaxed),
        agent_bin,
    })
}

async fn wait_for_port(port: u16, daemon: &mut Daemon) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        daemon.check_alive()?;
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{} not listening on {port} within 30 s (log: {})",
                daemon.name,
                daemon.log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
