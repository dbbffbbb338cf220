//! The system under test: a relay and its broker, spawned here (Mosquitto on a free loopback
//! port, `cloud-relay` joining it with a generated `relay.toml`) or already running, and the
//! relay's `/metrics`.

use std::net::{IpAddr, SocketAddr, TcpListener, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tempfile::TempDir;
use tokio::process::{Child, Command};
use tracing::info;

/// What `cloud-relay` logs once it is connected and subscribed (`cloud-relay/src/lib.rs`).
pub const RELAY_READY: &str = "connected; taking escalations";
/// The token file a relay generates in its state directory (`cloud-relay/src/http_auth.rs`).
pub const TOKEN_FILE: &str = "http-token";

/// Where to find the relay and broker, and how to measure them.
pub struct Target {
    pub broker_host: String,
    pub broker_port: u16,
    /// Base URL of the relay's HTTP API, e.g. `http://127.0.0.1:9100`.
    pub api: String,
    pub token: Option<String>,
    pub relay_pid: Option<u32>,
    pub broker_pid: Option<u32>,
    /// What the store size is measured on (a file with its SQLite siblings, or a folder).
    pub store_path: Option<PathBuf>,
    /// Set when this process started the relay and broker (killed on drop).
    pub spawned: Option<Spawned>,
}

pub struct Spawned {
    relay: Child,
    broker: Child,
    pub relay_log: PathBuf,
    pub broker_log: PathBuf,
    /// Removed on drop; `None` with `--keep-dir`.
    _dir: Option<TempDir>,
}

/// What [`spawn`] needs.
pub struct SpawnOptions<'a> {
    pub relay_bin: &'a Path,
    pub mosquitto_bin: &'a Path,
    pub manifest: &'a Path,
    pub extra_toml: Option<String>,
    /// Appended to the generated mosquitto.conf.
    pub extra_broker_conf: Option<String>,
    pub max_devices: usize,
    pub keep_dir: bool,
}

/// A free TCP port on 127.0.0.1 (free when asked; the caller binds it soon after).
fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `path` as a TOML string literal.
fn toml_str(path: &Path) -> String {
    toml::Value::String(path.to_string_lossy().into_owned()).to_string()
}

/// The Mosquitto config: loopback only, anonymous (the simulator is the only client besides
/// the relay), TCP_NODELAY as in production, and room to queue QoS 1 messages for a relay that
/// falls behind (the default of 1000 per client would drop them, which would measure the
/// broker's queue, not the relay).
pub fn mosquitto_conf(port: u16) -> String {
    format!(
        "listener {port} 127.0.0.1\n\
         allow_anonymous true\n\
         set_tcp_nodelay true\n\
         persistence false\n\
         max_queued_messages 1000000\n\
         max_packet_size 300000\n\
         log_dest stderr\n\
         log_type error\n\
         log_type warning\n"
    )
}

/// The generated `relay.toml`: joins the broker, serves its API on loopback, tracks
/// `max_devices`; `extra` (whole sections, e.g. `[store]` or `[tuning]`) is appended.
pub fn relay_toml(
    manifest: &Path,
    broker_port: u16,
    http_port: u16,
    max_devices: usize,
    extra: &str,
) -> String {
    format!(
        "relay_id = \"fleet-sim\"\n\
         state_dir = \"state\"\n\n\
         [model]\n\
         manifest = {}\n\n\
         [mqtt]\n\
         host = \"127.0.0.1\"\n\
         port = {broker_port}\n\n\
         [http]\n\
         listen = \"127.0.0.1:{http_port}\"\n\
         max_devices = {max_devices}\n\n\
         {extra}\n",
        toml_str(manifest)
    )
}

async fn wait_port(port: u16, child: &mut Child, log: &Path, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "{what} exited ({status}); log {}:\n{}",
                log.display(),
                tail(log, 30)
            );
        }
        if Instant::now() > deadline {
            bail!(
                "{what} not listening on {port} after 20 s; log:\n{}",
                tail(log, 30)
            );
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The last `n` lines of a log file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `line` without ANSI colour sequences (`ESC [ ... m`), as the relay writes them.
pub fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The relay log's warnings and errors, counted by message (the text before the first
/// `key=value` field), most frequent first, at most `n`.
pub fn log_warnings(path: &Path, n: usize) -> Vec<(String, u64)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut counts: std::collections::BTreeMap<String, u64> = Default::default();
    for line in text.lines().map(strip_ansi) {
        let Some(at) = line.find(" WARN ").or_else(|| line.find(" ERROR ")) else {
            continue;
        };
        let message: Vec<&str> = line[at..]
            .split_whitespace()
            .skip(1)
            .take_while(|t| !t.contains('='))
            .collect();
        *counts.entry(message.join(" ")).or_default() += 1;
    }
    let mut v: Vec<_> = counts.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v.truncate(n);
    v
}

/// Lines of a log file containing `needle`, at most `n` (the first ones), without colours.
pub fn grep(path: &Path, needle: &str, n: usize) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(strip_ansi)
        .filter(|l| l.contains(needle))
        .take(n)
        .collect()
}

fn log_file(path: &Path) -> anyhow::Result<Stdio> {
    Ok(Stdio::from(
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
    ))
}

/// Starts Mosquitto and a relay joining it, in a temp dir; waits until the relay is ready.
pub async fn spawn(o: SpawnOptions<'_>) -> anyhow::Result<Target> {
    let dir = tempfile::Builder::new()
        .prefix("tierd-fleet-sim-")
        .tempdir()
        .context("creating a temp dir")?;
    let broker_port = free_port()?;
    let http_port = free_port()?;
    let broker_conf = dir.path().join("mosquitto.conf");
    let mut conf = mosquitto_conf(broker_port);
    if let Some(extra) = &o.extra_broker_conf {
        conf.push_str(extra);
        conf.push('\n');
    }
    std::fs::write(&broker_conf, conf)?;
    let broker_log = dir.path().join("mosquitto.log");
    let mut broker = Command::new(o.mosquitto_bin)
        .arg("-c")
        .arg(&broker_conf)
        .stdout(log_file(&broker_log)?)
        .stderr(log_file(&broker_log.with_extension("err.log"))?)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", o.mosquitto_bin.display()))?;
    wait_port(
        broker_port,
        &mut broker,
        &broker_log.with_extension("err.log"),
        "mosquitto",
    )
    .await?;

    let manifest = std::fs::canonicalize(o.manifest)
        .with_context(|| format!("the cloud model manifest {}", o.manifest.display()))?;
    let config = relay_toml(
        &manifest,
        broker_port,
        http_port,
        o.max_devices,
        o.extra_toml.as_deref().unwrap_or(""),
    );
    let config_path = dir.path().join("relay.toml");
    std::fs::write(&config_path, &config)?;
    let relay_log = dir.path().join("relay.log");
    let mut relay = Command::new(o.relay_bin)
        .arg("run")
        .arg("--config")
        .arg(&config_path)
        .current_dir(dir.path())
        .stdout(log_file(&dir.path().join("relay.out"))?)
        .stderr(log_file(&relay_log)?)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", o.relay_bin.display()))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let log = std::fs::read_to_string(&relay_log).unwrap_or_default();
        if log.contains(RELAY_READY) {
            break;
        }
        if let Some(status) = relay.try_wait()? {
            bail!(
                "cloud-relay exited ({status}); relay.toml:\n{config}\nlog:\n{}",
                tail(&relay_log, 30)
            );
        }
        if Instant::now() > deadline {
            bail!(
                "cloud-relay not ready after 60 s; log:\n{}",
                tail(&relay_log, 30)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let state = dir.path().join("state");
    let token = std::fs::read_to_string(state.join(TOKEN_FILE))
        .map(|t| t.trim().to_string())
        .ok();
    let root = dir.path().to_path_buf();
    let dir = if o.keep_dir {
        info!(dir = %root.display(), "keeping the relay's folder (--keep-dir)");
        let _ = dir.keep();
        None
    } else {
        Some(dir)
    };
    info!(
        broker = broker_port,
        api = http_port,
        folder = %root.display(),
        "spawned mosquitto and cloud-relay"
    );
    Ok(Target {
        broker_host: "127.0.0.1".into(),
        broker_port,
        api: format!("http://127.0.0.1:{http_port}"),
        token,
        relay_pid: relay.id(),
        broker_pid: broker.id(),
        store_path: Some(root.join("state")),
        spawned: Some(Spawned {
            relay,
            broker,
            relay_log: root.join("relay.log"),
            broker_log: root.join("mosquitto.err.log"),
            _dir: dir,
        }),
    })
}

impl Target {
    /// Fails if a spawned relay or broker has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(s) = self.spawned.as_mut() {
            if let Some(status) = s.relay.try_wait()? {
                bail!(
                    "cloud-relay exited ({status}); log:\n{}",
                    tail(&s.relay_log, 30)
                );
            }
            if let Some(status) = s.broker.try_wait()? {
                bail!(
                    "mosquitto exited ({status}); log:\n{}",
                    tail(&s.broker_log, 30)
                );
            }
        }
        Ok(())
    }

    /// Stops what was spawned (SIGKILL: nothing of it is kept unless `--keep-dir`).
    pub async fn shutdown(&mut self) {
        if let Some(s) = self.spawned.as_mut() {
            let _ = s.relay.kill().await;
            let _ = s.broker.kill().await;
        }
    }
}

/// Refuses anything but a loopback address: the simulator publishes as thousands of devices
/// and must never do so on a real network.
pub fn loopback_broker(addr: &str) -> anyhow::Result<(String, u16)> {
    let (host, port) = addr.rsplit_once(':').context("--broker is host:port")?;
    let port: u16 = port.parse().context("--broker's port")?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let addrs: Vec<SocketAddr> = (host.as_str(), port)
        .to_socket_addrs()
        .with_context(|| format!("resolving {host}"))?
        .collect();
    if addrs.is_empty() || !addrs.iter().all(|a| a.ip().is_loopback()) {
        bail!("--broker {addr} is not a loopback address (127.0.0.0/8, ::1, localhost)");
    }
    Ok((host, port))
}

/// The relay API's base URL, refused unless plain HTTP on a loopback host.
pub fn loopback_api(url: &str) -> anyhow::Result<String> {
    let u = reqwest::Url::parse(url).with_context(|| format!("--relay-api {url:?}"))?;
    if u.scheme() != "http" {
        bail!("--relay-api {url} must be http:// (loopback)");
    }
    let host = u.host_str().context("--relay-api has no host")?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if !loopback {
        bail!("--relay-api {url} is not on a loopback address");
    }
    Ok(url.trim_end_matches('/').to_string())
}

/// The relay's counters this tool reads, from one `/metrics` scrape.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct RelayMetrics {
    /// `tierd_relay_telemetry_reports_total{result="accepted"}`: spooled records filed
    /// (telemetry, calibration, config acks alike).
    pub accepted: u64,
    pub rejected: u64,
    /// `tierd_relay_escalations_total` by outcome.
    pub esc_answered: u64,
    pub esc_overloaded: u64,
    /// `tierd_fleet_devices`, if exported.
    pub devices: Option<u64>,
    /// How long the scrape took and how big it was.
    pub scrape_ms: f64,
    pub scrape_bytes: usize,
}

/// The value of the sample `name{...label...}` (any other labels allowed), if present.
pub fn sample(text: &str, name: &str, label: Option<&str>) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .find(|l| label.is_none_or(|lb| l.contains(lb)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

pub fn parse_metrics(text: &str) -> anyhow::Result<RelayMetrics> {
    let counter = |name: &str, label: &str| sample(text, name, Some(label)).map(|v| v as u64);
    let reports = "tierd_relay_telemetry_reports_total";
    let esc = "tierd_relay_escalations_total";
    Ok(RelayMetrics {
        accepted: counter(reports, "result=\"accepted\"")
            .with_context(|| format!("/metrics has no {reports}{{result=\"accepted\"}}"))?,
        rejected: counter(reports, "result=\"rejected\"")
            .with_context(|| format!("/metrics has no {reports}{{result=\"rejected\"}}"))?,
        esc_answered: counter(esc, "outcome=\"answered\"").unwrap_or(0),
        esc_overloaded: counter(esc, "outcome=\"overloaded\"").unwrap_or(0),
        devices: sample(text, "tierd_fleet_devices", None).map(|v| v as u64),
        scrape_ms: 0.0,
        scrape_bytes: text.len(),
    })
}

/// Reads the relay's `/metrics` (with its bearer token, if any).
pub async fn scrape(
    http: &reqwest::Client,
    api: &str,
    token: Option<&str>,
) -> anyhow::Result<RelayMetrics> {
    let start = Instant::now();
    let mut req = http.get(format!("{api}/metrics"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req
        .send()
        .await
        .with_context(|| format!("GET {api}/metrics"))?;
    let status = resp.status();
    if status == reqwest::StatusCode::UNAUTHORIZED {
        bail!(
            "GET {api}/metrics: 401: the relay wants its API token (--relay-token-file, or \
             the relay's state_dir/{TOKEN_FILE})"
        );
    }
    if !status.is_success() {
        bail!("GET {api}/metrics: {status}");
    }
    let text = resp.text().await?;
    // Megabytes at thousands of devices: parsed off the async workers, so the fleet's event
    // loops (and the escalation latencies they time) do not wait behind it.
    let mut m = tokio::task::spawn_blocking(move || parse_metrics(&text)).await??;
    m.scrape_ms = start.elapsed().as_secs_f64() * 1000.0;
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_relays_counters() {
        let text = "# HELP tierd_relay_telemetry_reports Telemetry reports received.\n\
                    # TYPE tierd_relay_telemetry_reports counter\n\
                    tierd_relay_telemetry_reports_total{result=\"accepted\"} 1234\n\
                    tierd_relay_telemetry_reports_total{result=\"rejected\"} 0\n\
                    tierd_relay_escalations_total{outcome=\"answered\"} 99\n\
                    tierd_fleet_devices{state=\"online\"} 20\n";
        let m = parse_metrics(text).unwrap();
        assert_eq!((m.accepted, m.rejected, m.esc_answered), (1234, 0, 99));
        assert_eq!(m.devices, Some(20));
        assert!(parse_metrics("tierd_other_total 1\n").is_err());
        assert_eq!(sample(text, "tierd_relay_telemetry_reports", None), None);
    }

    #[test]
    fn log_lines_lose_their_colours() {
        assert_eq!(
            strip_ansi("\u{1b}[33m WARN\u{1b}[0m record \u{1b}[3mrejected\u{1b}[0m"),
            " WARN record rejected"
        );
    }

    #[test]
    fn counts_the_relays_warnings_by_message() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("relay.log");
        std::fs::write(
            &log,
            "t  INFO cloud_relay: ready\n\
             t \u{1b}[33m WARN\u{1b}[0m cloud_relay::intake: cannot queue a spool ack; the agent will send again error=full\n\
             t  WARN cloud_relay::intake: cannot queue a spool ack; the agent will send again error=full\n\
             t ERROR cloud_relay: boom device=x\n",
        )
        .unwrap();
        let w = log_warnings(&log, 5);
        assert_eq!(
            w[0],
            (
                "cloud_relay::intake: cannot queue a spool ack; the agent will send again".into(),
                2
            )
        );
        assert_eq!(w[1], ("cloud_relay: boom".into(), 1));
    }

    #[test]
    fn only_loopback_is_accepted() {
        assert!(loopback_broker("127.0.0.1:1883").is_ok());
        assert!(loopback_broker("localhost:1883").is_ok());
        assert!(loopback_broker("[::1]:1883").is_ok());
        assert!(loopback_broker("10.0.0.1:1883").is_err());
        assert!(loopback_broker("127.0.0.1").is_err());
        assert_eq!(
            loopback_api("http://127.0.0.1:9100/").unwrap(),
            "http://127.0.0.1:9100"
        );
        assert!(loopback_api("http://192.168.1.2:9100").is_err());
        assert!(loopback_api("https://127.0.0.1:9100").is_err());
    }

    #[test]
    fn the_generated_relay_config_names_its_parts() {
        let t = relay_toml(
            Path::new("/m/c.toml"),
            1884,
            9101,
            1064,
            "[store]\nurl = \"x\"\n",
        );
        assert!(t.contains("manifest = \"/m/c.toml\""));
        assert!(t.contains("port = 1884"));
        assert!(t.contains("listen = \"127.0.0.1:9101\""));
        assert!(t.contains("max_devices = 1064"));
        assert!(t.ends_with("[store]\nurl = \"x\"\n\n"));
        assert!(t.parse::<toml::Table>().is_ok());
        let m = mosquitto_conf(1884);
        assert!(m.contains("listener 1884 127.0.0.1") && m.contains("max_queued_messages"));
    }
}
