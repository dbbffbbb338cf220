//! `tierd-fleet-sim`: what one `cloud-relay` costs, measured with N virtual devices speaking
//! the real protocol to a real broker and a real relay process.
//!
//! # What is simulated
//!
//! Each virtual device behaves on the wire as `edge-agent` does (see `records` and `fleet`):
//! its retained online status announces its boot (Unix ms at start) and the offline
//! certificate of its model before any record; every report interval it spools a telemetry
//! report, and every `--calibration-every` reports a calibration window covering exactly the
//! requests of those reports; it answers each config document the relay pushes with a config
//! ack; every record travels in the agent's `Spooled` envelope (stream id, seq, floor) by the
//! agent's go-back-N (window 32, resend after `--resend-after-s`), and leaves the spool only
//! when the relay's cumulative `SpoolAck` releases it. Escalations (`--escalations-per-s`
//! fleet-wide, round robin over the devices) go to `tierd/v1/{device}/escalate/{model}` with
//! the device's reply topic and correlation data, QoS 0, as the agent sends them; their
//! request→reply latency is measured end to end (publish queued to reply decoded), between
//! this tool's own `/metrics` scrapes (a scrape holds the relay's fleet lock, which stalls its
//! MQTT link for the scrape's duration: reported apart, as the scrape time). Every record is
//! built to be believed: a run with any rejection fails.
//!
//! # What is not, and which way each simplification biases the figures
//!
//! - **Shared connections.** Devices are multiplexed over `--connections` MQTT connections
//!   (default min(N, 100)); a real fleet has one connection per device. The relay has one
//!   connection either way and sees the same topics and messages, so this measures the relay,
//!   not broker fan-in: the broker does less work (fewer sockets, keep-alives, larger TCP
//!   segments) than with a real fleet, so a broker-bound limit found here is optimistic.
//!   Sessions are clean (`clean_start`) and no last will is set (MQTT allows one per
//!   connection); a clean stop publishes each device's "stopped" status instead.
//! - **No TLS, no ACLs, loopback only.** A production broker does TLS and per-device ACL
//!   checks: broker CPU here is a lower bound; the relay's own cost is unaffected (its one
//!   connection's TLS is small next to filing records). Network latency is ~0: escalation
//!   latencies are the relay's processing and queueing plus two loopback hops (optimistic
//!   against any real network).
//! - **Same machine.** Simulator, broker and relay share the cores. The relay's CPU % is its
//!   own (from `/proc`), but contention can slow it: a saturation limit found here is
//!   pessimistic for a relay on its own machine; `--saturate` says when the machine, not the
//!   relay, was the limit.
//! - **Synthetic traffic.** Report contents come from a fixed confidence histogram, not a
//!   model, and are not tied to the escalations actually sent (the relay does not cross-check
//!   them). Sizes match real reports (~200 B); the tuner and drift test run on every window
//!   as for a real device, but on a stationary, well-behaved distribution: a fleet that drifts
//!   or is re-tuned more often costs the relay more config pushes than measured here.
//! - **Config documents are not verified** (the signature is not checked; see
//!   `records::DeviceRecords::apply_config`), and `telemetry_interval_s` /
//!   `escalation_timeout_ms` in them are not followed (the command line sets the rates).
//!   No cost to the relay either way.
//! - **No model rollouts, shadow reports, audits as escalations, or restarts/outages** (every
//!   device stays connected for the whole run, one boot): steady-state costs only.
//!
//! # What is reported
//!
//! Over the measured window (after `--warmup-s`): records offered and ingested per second
//! (the relay's `tierd_relay_telemetry_reports_total{result="accepted"}` and the acks
//! received), records rejected (must be 0: non-zero exit), escalation p50/p99/max and timeouts,
//! relay CPU % (one core = 100 %, from `/proc/PID/stat`) and RSS (`VmRSS`) total and per device,
//! store bytes (the relay's state directory, or `--store-path`: a file with its `-wal`/`-shm`
//! siblings, or a folder) total and per device, and the ack lag (records produced but not
//! acknowledged) at the window's end and after a drain. `--saturate` ramps the report rate
//! (halving the interval every `--step-s`) until ingest falls behind, and reports the last
//! sustained rate and what looked like the limit.

mod fleet;
mod outbox;
mod pace;
mod procfs;
mod records;
mod report;
mod target;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use tracing::{error, info, warn};

use fleet::{Fleet, FleetConfig, Snapshot};
use pace::{CpuShares, StepFigures};
use report::Report;
use target::{RelayMetrics, Target};

/// N virtual tierd devices against a real broker and cloud-relay: what one relay costs.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Args {
    /// Virtual devices [default: 1000; --quick: 20].
    #[arg(long)]
    devices: Option<usize>,
    /// MQTT connections the devices are multiplexed over [default: min(devices, 100)]. A real
    /// fleet has one per device: this measures the relay, not broker fan-in.
    #[arg(long)]
    connections: Option<usize>,
    /// Seconds between a device's telemetry reports [default: 10; --quick: 1].
    #[arg(long)]
    report_interval_s: Option<f64>,
    /// A calibration window every K reports (0: none) [default: 6; --quick: 3].
    #[arg(long)]
    calibration_every: Option<u64>,
    /// Requests a device answers per report window (the counts in its reports).
    #[arg(long, default_value_t = 100)]
    requests_per_report: u64,
    /// Escalations per second, fleet-wide [default: 20].
    #[arg(long)]
    escalations_per_s: Option<f64>,
    /// How long a device waits for an escalation's reply (the agent's default).
    #[arg(long, default_value_t = 250)]
    escalation_timeout_ms: u64,
    /// Escalations outstanding at most, fleet-wide.
    #[arg(long, default_value_t = 256)]
    max_in_flight: usize,
    /// Seconds measured [default: 60; --quick: 10].
    #[arg(long)]
    duration_s: Option<f64>,
    /// Seconds of load before measuring [default: 15; --quick: 5].
    #[arg(long)]
    warmup_s: Option<f64>,
    /// After the window: seconds to wait for every record to be acknowledged.
    #[arg(long, default_value_t = 15.0)]
    drain_s: f64,
    /// The devices' edge model, `name@version` (the relay must answer for its name).
    #[arg(long, default_value = records::DEFAULT_EDGE_MODEL)]
    edge_model: String,
    /// Device ids are `{prefix}{index:05}`.
    #[arg(long, default_value = "sim-")]
    id_prefix: String,
    /// Seed of the synthetic traffic and stream ids.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The agent's go-back-N resend timeout.
    #[arg(long, default_value_t = 10.0)]
    resend_after_s: f64,
    /// Records a device's spool holds at most (oldest dropped beyond).
    #[arg(long, default_value_t = 4096)]
    spool_cap: usize,

    /// Attach: the running broker, host:port (loopback only).
    #[arg(long, conflicts_with = "spawn_relay")]
    broker: Option<String>,
    /// Attach: the running relay's HTTP API base URL (loopback only), e.g. http://127.0.0.1:9100.
    #[arg(long, conflicts_with = "spawn_relay")]
    relay_api: Option<String>,
    /// Attach: the relay's pid, for its CPU and RSS.
    #[arg(long, conflicts_with = "spawn_relay")]
    relay_pid: Option<u32>,
    /// Attach: the broker's pid, for its CPU.
    #[arg(long, conflicts_with = "spawn_relay")]
    broker_pid: Option<u32>,
    /// The relay's API token file (attach; spawned relays' tokens are found by themselves).
    #[arg(long, env = "TIERD_RELAY_TOKEN_FILE")]
    relay_token_file: Option<PathBuf>,
    /// What the store size is measured on: a file (with its -wal/-shm siblings) or a folder
    /// [spawned: the relay's state_dir].
    #[arg(long)]
    store_path: Option<PathBuf>,

    /// Spawn: the cloud-relay binary to run (with a Mosquitto this tool starts).
    #[arg(long)]
    spawn_relay: Option<PathBuf>,
    /// Spawn: the Mosquitto binary [default: /usr/sbin/mosquitto, else `mosquitto` on PATH].
    #[arg(long)]
    mosquitto: Option<PathBuf>,
    /// Spawn: the relay's cloud model manifest [default: models/cloud/digits-cloud.toml of
    /// this repository].
    #[arg(long)]
    relay_model: Option<PathBuf>,
    /// Spawn: a TOML file appended to the generated relay.toml (whole sections, e.g.
    /// `[store]` or `[tuning]`; not `[mqtt]`, `[http]` or `[model]`, which are generated).
    #[arg(long)]
    relay_extra_toml: Option<PathBuf>,
    /// Spawn: a file appended to the generated mosquitto.conf (e.g. `max_inflight_messages`).
    #[arg(long)]
    mosquitto_extra_conf: Option<PathBuf>,
    /// Spawn: keep the relay's folder (config, logs, state) after the run.
    #[arg(long)]
    keep_dir: bool,

    /// Ramp the report rate (halving the interval every --step-s) until ingest falls behind.
    #[arg(long)]
    saturate: bool,
    /// Seconds per --saturate step.
    #[arg(long, default_value_t = 20.0)]
    step_s: f64,
    /// --saturate stops at this report interval.
    #[arg(long, default_value_t = 0.01)]
    min_interval_s: f64,

    /// A short run for CI (20 devices, 1 s reports, 5 s warmup, 10 s measured): fails if
    /// anything was rejected or nothing was ingested.
    #[arg(long)]
    quick: bool,
    /// Also write the figures as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// The run's settings with the defaults (and `--quick`'s) applied.
#[derive(Debug, Clone)]
struct Plan {
    devices: usize,
    connections: usize,
    report_interval: Duration,
    calibration_every: u64,
    escalations_per_s: f64,
    duration: Duration,
    warmup: Duration,
}

fn secs(what: &str, s: f64, min: f64, max: f64) -> anyhow::Result<Duration> {
    if !(s.is_finite() && (min..=max).contains(&s)) {
        bail!("{what} = {s} must be within [{min}, {max}]");
    }
    Ok(Duration::from_secs_f64(s))
}

impl Plan {
    fn from(a: &Args) -> anyhow::Result<Plan> {
        let q = a.quick;
        let devices = a.devices.unwrap_or(if q { 20 } else { 1000 });
        if !(1..=1_000_000).contains(&devices) {
            bail!("--devices must be within [1, 1000000]");
        }
        let connections = a.connections.unwrap_or(devices.min(100));
        if connections == 0 {
            bail!("--connections must be at least 1");
        }
        let escalations_per_s = a.escalations_per_s.unwrap_or(20.0);
        if !(escalations_per_s.is_finite() && (0.0..=100_000.0).contains(&escalations_per_s)) {
            bail!("--escalations-per-s must be within [0, 100000]");
        }
        if a.max_in_flight == 0 || a.max_in_flight > 100_000 {
            bail!("--max-in-flight must be within [1, 100000]");
        }
        if a.escalation_timeout_ms == 0 || a.escalation_timeout_ms > 60_000 {
            bail!("--escalation-timeout-ms must be within [1, 60000]");
        }
        if a.spool_cap == 0 {
            bail!("--spool-cap must be at least 1");
        }
        secs("--step-s", a.step_s, 2.0, 3600.0)?;
        secs("--resend-after-s", a.resend_after_s, 0.1, 3600.0)?;
        secs("--drain-s", a.drain_s, 0.0, 3600.0)?;
        secs("--min-interval-s", a.min_interval_s, 0.001, 3600.0)?;
        Ok(Plan {
            devices,
            connections,
            report_interval: secs(
                "--report-interval-s",
                a.report_interval_s.unwrap_or(if q { 1.0 } else { 10.0 }),
                0.001,
                86_400.0,
            )?,
            calibration_every: a.calibration_every.unwrap_or(if q { 3 } else { 6 }),
            escalations_per_s,
            duration: secs(
                "--duration-s",
                a.duration_s.unwrap_or(if q { 10.0 } else { 60.0 }),
                1.0,
                86_400.0,
            )?,
            warmup: secs(
                "--warmup-s",
                a.warmup_s.unwrap_or(if q { 5.0 } else { 15.0 }),
                0.0,
                86_400.0,
            )?,
        })
    }
}

/// Where the repository's files are (this crate sits at its top level).
fn repo_path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(rel)
}

fn find_mosquitto(given: Option<&PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p.clone());
    }
    let standard = PathBuf::from("/usr/sbin/mosquitto");
    if standard.is_file() {
        return Ok(standard);
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|p| p.join("mosquitto"))
                .find(|p| p.is_file())
        })
        .context("mosquitto not found (--mosquitto PATH, or apt-get install mosquitto)")
}

/// Everything measured at one moment.
#[derive(Debug, Clone)]
struct Point {
    at: Instant,
    sim: Snapshot,
    relay: RelayMetrics,
    relay_ticks: Option<u64>,
    broker_ticks: Option<u64>,
    self_ticks: Option<u64>,
    relay_rss: Option<(u64, u64)>,
    store: Option<u64>,
}

struct Run {
    target: Target,
    http: reqwest::Client,
}

impl Run {
    async fn point(&mut self, fleet: Option<&Fleet>) -> anyhow::Result<Point> {
        self.target.check_alive()?;
        let relay =
            target::scrape(&self.http, &self.target.api, self.target.token.as_deref()).await?;
        let t = &self.target;
        Ok(Point {
            at: Instant::now(),
            sim: fleet.map(Fleet::snapshot).unwrap_or_default(),
            relay,
            relay_ticks: t.relay_pid.and_then(|p| procfs::cpu_ticks(p).ok()),
            broker_ticks: t.broker_pid.and_then(|p| procfs::cpu_ticks(p).ok()),
            self_ticks: procfs::cpu_ticks(std::process::id()).ok(),
            relay_rss: t.relay_pid.and_then(|p| procfs::rss(p).ok()),
            store: t.store_path.as_deref().map(procfs::store_bytes),
        })
    }

    /// Waits `d`, checking every second that what was spawned still runs.
    async fn wait(&mut self, d: Duration, what: &str, fleet: &Fleet) -> anyhow::Result<()> {
        let end = Instant::now() + d;
        let mut last_log = Instant::now();
        while Instant::now() < end {
            tokio::time::sleep((end - Instant::now()).min(Duration::from_secs(1))).await;
            self.target.check_alive()?;
            if last_log.elapsed() >= Duration::from_secs(10) {
                last_log = Instant::now();
                let s = fleet.snapshot();
                info!(
                    phase = what,
                    generated = s.records_generated,
                    acked = s.records_acked,
                    lag = s.lag(),
                    escalations = s.esc_sent,
                    "progress"
                );
            }
        }
        Ok(())
    }
}

fn cpu_share(a: Option<u64>, b: Option<u64>, seconds: f64) -> Option<f64> {
    let (a, b) = (a?, b?);
    (seconds > 0.0).then(|| 100.0 * b.saturating_sub(a) as f64 / procfs::TICKS_PER_S / seconds)
}

fn cpu(a: &Point, b: &Point) -> CpuShares {
    let s = b.at.duration_since(a.at).as_secs_f64();
    CpuShares {
        relay: cpu_share(a.relay_ticks, b.relay_ticks, s),
        broker: cpu_share(a.broker_ticks, b.broker_ticks, s),
        simulator: cpu_share(a.self_ticks, b.self_ticks, s).unwrap_or(0.0),
    }
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn window(
    a: &Point,
    b: &Point,
    latency: &hdrhistogram::Histogram<u64>,
    idle_rss: Option<u64>,
) -> report::Window {
    let s = b.at.duration_since(a.at).as_secs_f64().max(1e-9);
    let d = |f: fn(&Snapshot) -> u64| f(&b.sim).saturating_sub(f(&a.sim));
    let rate = |f: fn(&Snapshot) -> u64| d(f) as f64 / s;
    let have = !latency.is_empty();
    let accepted = b.relay.accepted.saturating_sub(a.relay.accepted);
    let cpu = cpu(a, b);
    report::Window {
        seconds: s,
        records_offered_per_s: rate(|x| x.records_generated),
        telemetry_offered_per_s: rate(|x| x.telemetry_generated),
        calibration_offered_per_s: rate(|x| x.calibration_generated),
        config_acks_offered_per_s: rate(|x| x.config_acks_generated),
        records_published_per_s: rate(|x| x.records_published),
        ingested_per_s_relay: accepted as f64 / s,
        relay_cpu_us_per_record: cpu
            .relay
            .filter(|_| accepted > 0)
            .map(|c| c / 100.0 * s * 1e6 / accepted as f64),
        ingested_per_s_acks: rate(|x| x.records_acked),
        escalations: report::Escalations {
            sent: d(|x| x.esc_sent),
            answered: d(|x| x.esc_answered),
            per_s: rate(|x| x.esc_sent),
            p50_ms: have.then(|| ms(latency.value_at_quantile(0.50))),
            p99_ms: have.then(|| ms(latency.value_at_quantile(0.99))),
            max_ms: have.then(|| ms(latency.max())),
            timed_out: d(|x| x.esc_timeouts),
            overloaded: d(|x| x.esc_overloaded),
            errors: d(|x| x.esc_errors),
            late_replies: d(|x| x.esc_late),
            skipped: d(|x| x.esc_skipped),
        },
        cpu,
        relay_rss_bytes: b.relay_rss.map(|r| r.0),
        relay_rss_peak_bytes: b.relay_rss.map(|r| r.1),
        relay_rss_idle_bytes: idle_rss,
        store_bytes: b.store,
        store_growth_bytes: a
            .store
            .zip(b.store)
            .map(|(x, y)| i64::try_from(y).unwrap_or(i64::MAX) - i64::try_from(x).unwrap_or(0)),
        ack_lag_end: b.sim.lag(),
        resends: d(|x| x.resends),
        queue_full: d(|x| x.queue_full),
    }
}

async fn setup_target(a: &Args, plan: &Plan) -> anyhow::Result<Target> {
    let token_from_file = |p: &PathBuf| -> anyhow::Result<String> {
        Ok(std::fs::read_to_string(p)
            .with_context(|| format!("reading the relay token {}", p.display()))?
            .trim()
            .to_string())
    };
    if let Some(bin) = &a.spawn_relay {
        let mosquitto = find_mosquitto(a.mosquitto.as_ref())?;
        let manifest = a
            .relay_model
            .clone()
            .unwrap_or_else(|| repo_path("models/cloud/digits-cloud.toml"));
        let extra = a
            .relay_extra_toml
            .as_ref()
            .map(|p| {
                std::fs::read_to_string(p)
                    .with_context(|| format!("reading --relay-extra-toml {}", p.display()))
            })
            .transpose()?;
        let extra_broker_conf = a
            .mosquitto_extra_conf
            .as_ref()
            .map(|p| {
                std::fs::read_to_string(p)
                    .with_context(|| format!("reading --mosquitto-extra-conf {}", p.display()))
            })
            .transpose()?;
        let mut t = target::spawn(target::SpawnOptions {
            extra_broker_conf,
            relay_bin: bin,
            mosquitto_bin: &mosquitto,
            manifest: &manifest,
            extra_toml: extra,
            max_devices: plan.devices + 64,
            keep_dir: a.keep_dir,
        })
        .await?;
        if let Some(p) = &a.store_path {
            t.store_path = Some(p.clone());
        }
        if let Some(p) = &a.relay_token_file {
            t.token = Some(token_from_file(p)?);
        }
        return Ok(t);
    }
    let (Some(broker), Some(api)) = (&a.broker, &a.relay_api) else {
        bail!("either --spawn-relay PATH, or --broker HOST:PORT with --relay-api URL");
    };
    let (broker_host, broker_port) = target::loopback_broker(broker)?;
    Ok(Target {
        broker_host,
        broker_port,
        api: target::loopback_api(api)?,
        token: a
            .relay_token_file
            .as_ref()
            .map(token_from_file)
            .transpose()?,
        relay_pid: a.relay_pid,
        broker_pid: a.broker_pid,
        store_path: a.store_path.clone(),
        spawned: None,
    })
}

async fn run(a: Args) -> anyhow::Result<Report> {
    let plan = Plan::from(&a)?;
    let mut run = Run {
        target: setup_target(&a, &plan).await?,
        http: reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(30))
            .build()?,
    };
    let result = measure(&a, &plan, &mut run).await;
    if !matches!(&result, Ok(r) if r.passed) {
        if let Some(s) = &run.target.spawned {
            let lines = target::grep(&s.relay_log, "rejected", 10);
            if !lines.is_empty() {
                error!("the relay's first rejections:\n{}", lines.join("\n"));
            }
        }
    }
    run.target.shutdown().await;
    result
}

async fn measure(a: &Args, plan: &Plan, run: &mut Run) -> anyhow::Result<Report> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let before = run.point(None).await?;
    let idle_rss = before.relay_rss.map(|r| r.0);
    let cfg = FleetConfig {
        devices: plan.devices,
        connections: plan.connections,
        report_interval: plan.report_interval,
        calibration_every: plan.calibration_every,
        requests_per_report: a.requests_per_report,
        escalations_per_s: plan.escalations_per_s,
        escalation_timeout: Duration::from_millis(a.escalation_timeout_ms),
        max_in_flight: a.max_in_flight,
        edge_model: a.edge_model.clone(),
        broker_host: run.target.broker_host.clone(),
        broker_port: run.target.broker_port,
        id_prefix: a.id_prefix.clone(),
        resend_after: Duration::from_secs_f64(a.resend_after_s),
        spool_cap: a.spool_cap,
        boot_id: fleet::unix_ms(),
        seed: a.seed,
    };
    if !a.edge_model.contains('@') {
        bail!("--edge-model {} must be name@version", a.edge_model);
    }
    info!(
        devices = plan.devices,
        connections = cfg.connections.min(plan.devices),
        broker = %format!("{}:{}", cfg.broker_host, cfg.broker_port),
        "starting the fleet"
    );
    let fleet = Fleet::start(&cfg)?;
    let outcome = drive(a, plan, run, &fleet, &before, idle_rss, cores).await;
    fleet.stop().await;
    outcome
}

async fn drive(
    a: &Args,
    plan: &Plan,
    run: &mut Run,
    fleet: &Fleet,
    before: &Point,
    idle_rss: Option<u64>,
    cores: usize,
) -> anyhow::Result<Report> {
    fleet
        .wait_ready(Duration::from_secs(60))
        .await
        .context("the fleet did not come up")?;
    fleet.set_escalating(true);
    info!(seconds = plan.warmup.as_secs_f64(), "warming up");
    run.wait(plan.warmup, "warmup", fleet).await?;

    let (win, saturation) = if a.saturate {
        saturate(a, plan, run, fleet, idle_rss, cores).await?
    } else {
        // Latencies are taken between this tool's own /metrics scrapes: a scrape stalls the
        // relay's MQTT link for its duration (reported apart, as the scrape's time).
        let start = run.point(Some(fleet)).await?;
        let _ = fleet.take_latency();
        info!(seconds = plan.duration.as_secs_f64(), "measuring");
        run.wait(plan.duration, "measuring", fleet).await?;
        let latency = fleet.take_latency();
        let end = run.point(Some(fleet)).await?;
        (window(&start, &end, &latency, idle_rss), None)
    };

    // Drain: no new records or escalations; what is spooled must all be acknowledged.
    fleet.stop_generating();
    fleet.set_escalating(false);
    let lag_after = fleet.drain(Duration::from_secs_f64(a.drain_s)).await;
    // Late escalations time out, late rejections show.
    tokio::time::sleep(Duration::from_millis(a.escalation_timeout_ms + 200)).await;
    let last = run.point(Some(fleet)).await?;
    let total = last.sim;
    let rejected = last.relay.rejected.saturating_sub(before.relay.rejected);
    let accepted_total = last.relay.accepted.saturating_sub(before.relay.accepted);
    let mut failures = Vec::new();
    let mut warnings = Vec::new();
    if rejected > 0 {
        failures.push(format!(
            "the relay rejected {rejected} records: something the simulator sent was not believed, or a relay limit (e.g. http.max_devices) was hit; the relay's log says why"
        ));
    }
    if accepted_total == 0 {
        failures.push("the relay ingested nothing".into());
    }
    if lag_after > 0 {
        warnings.push(format!(
            "{lag_after} records still unacknowledged {:.0} s after the load stopped",
            a.drain_s
        ));
    }
    if total.spool_dropped > 0 {
        warnings.push(format!(
            "{} records dropped at the devices' spool cap",
            total.spool_dropped
        ));
    }
    if win.escalations.timed_out > 0 {
        warnings.push(format!(
            "{} escalations timed out in the window",
            win.escalations.timed_out
        ));
    }
    if total.config_refused > 0 {
        warnings.push(format!(
            "{} config documents refused by the devices' rules",
            total.config_refused
        ));
    }
    if total.reconnects > 0 {
        warnings.push(format!("{} MQTT reconnects", total.reconnects));
    }
    let relay_log_warnings = run
        .target
        .spawned
        .as_ref()
        .map(|s| target::log_warnings(&s.relay_log, 5))
        .unwrap_or_default();
    let passed = failures.is_empty();
    Ok(Report {
        setup: report::Setup {
            mode: if a.quick {
                "quick".into()
            } else if a.saturate {
                "saturate".into()
            } else {
                "steady".into()
            },
            devices: plan.devices,
            connections: plan.connections.min(plan.devices),
            report_interval_s: plan.report_interval.as_secs_f64(),
            calibration_every: plan.calibration_every,
            requests_per_report: a.requests_per_report,
            escalations_per_s: plan.escalations_per_s,
            escalation_timeout_ms: a.escalation_timeout_ms,
            warmup_s: plan.warmup.as_secs_f64(),
            duration_s: plan.duration.as_secs_f64(),
            relay_spawned: run.target.spawned.is_some(),
            cores,
        },
        window: win,
        saturation,
        rejected,
        accepted_total,
        records_generated: total.records_generated,
        telemetry_generated: total.telemetry_generated,
        calibration_generated: total.calibration_generated,
        config_documents_received: total.config_docs,
        config_acks_sent: total.config_acks_generated,
        spool_dropped: total.spool_dropped,
        ack_lag_after_drain: lag_after,
        relay_devices: last.relay.devices,
        metrics_scrape_ms: last.relay.scrape_ms,
        metrics_scrape_bytes: last.relay.scrape_bytes,
        reconnects: total.reconnects,
        relay_log_warnings,
        passed,
        failures,
        warnings,
    })
}

/// The `--saturate` ramp: steps of `--step-s` at halving report intervals, until a step is not
/// sustained (or the interval floor). The window reported is the last sustained step's.
async fn saturate(
    a: &Args,
    plan: &Plan,
    run: &mut Run,
    fleet: &Fleet,
    idle_rss: Option<u64>,
    cores: usize,
) -> anyhow::Result<(report::Window, Option<report::Saturation>)> {
    let step = Duration::from_secs_f64(a.step_s);
    let settle = (step / 5).min(Duration::from_secs(4));
    let min = Duration::from_secs_f64(a.min_interval_s);
    let mut interval = plan.report_interval;
    let mut steps = Vec::new();
    let mut best: Option<report::Window> = None;
    let mut first: Option<report::Window> = None;
    let limit = loop {
        fleet.set_interval(interval);
        run.wait(settle, "settling", fleet).await?;
        let start = run.point(Some(fleet)).await?;
        let _ = fleet.take_latency();
        run.wait(step - settle, "saturate step", fleet).await?;
        let latency = fleet.take_latency();
        let end = run.point(Some(fleet)).await?;
        let w = window(&start, &end, &latency, idle_rss);
        let figures = StepFigures {
            seconds: w.seconds,
            offered_per_s: w.records_offered_per_s,
            accepted_per_s: w.ingested_per_s_relay,
            lag_start: start.sim.lag(),
            lag_end: end.sim.lag(),
        };
        let verdict = pace::fell_behind(&figures);
        info!(
            interval_s = interval.as_secs_f64(),
            offered = format!("{:.0}/s", w.records_offered_per_s),
            accepted = format!("{:.0}/s", w.ingested_per_s_relay),
            relay_cpu = ?w.cpu.relay,
            verdict = verdict.as_deref().unwrap_or("sustained"),
            "saturate step"
        );
        steps.push(report::Step {
            report_interval_s: interval.as_secs_f64(),
            seconds: w.seconds,
            telemetry_offered_per_s: w.telemetry_offered_per_s,
            records_offered_per_s: w.records_offered_per_s,
            accepted_per_s: w.ingested_per_s_relay,
            acked_per_s: w.ingested_per_s_acks,
            lag_start: figures.lag_start,
            lag_end: figures.lag_end,
            cpu: w.cpu,
            escalation_p99_ms: w.escalations.p99_ms,
            escalation_timeouts: w.escalations.timed_out,
            fell_behind: verdict.clone(),
        });
        if first.is_none() {
            first = Some(w.clone());
        }
        if verdict.is_some() {
            break pace::limit(&w.cpu, cores);
        }
        best = Some(w);
        match pace::next_interval(interval, min) {
            Some(next) => interval = next,
            None => {
                break format!(
                    "not reached: sustained down to the {:.3} s interval floor (--min-interval-s)",
                    interval.as_secs_f64()
                )
            }
        }
    };
    let sustained = best.as_ref();
    let sat = report::Saturation {
        sustained_records_per_s: sustained.map(|w| w.records_offered_per_s),
        sustained_telemetry_per_s: sustained.map(|w| w.telemetry_offered_per_s),
        steps,
        limit,
    };
    let win = best.or(first).unwrap_or_default();
    Ok((win, Some(sat)))
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let json = args.json.clone();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    let report = match runtime.block_on(run(args)) {
        Ok(r) => r,
        Err(e) => {
            error!("{e:#}");
            return ExitCode::FAILURE;
        }
    };
    print!("{}", report.table());
    if let Some(path) = json {
        match serde_json::to_string_pretty(&report) {
            Ok(text) => {
                if let Err(e) = std::fs::write(&path, text + "\n") {
                    warn!(path = %path.display(), error = %e, "cannot write the JSON report");
                    return ExitCode::FAILURE;
                }
            }
            Err(e) => {
                warn!(error = %e, "cannot encode the JSON report");
                return ExitCode::FAILURE;
            }
        }
    }
    if report.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
