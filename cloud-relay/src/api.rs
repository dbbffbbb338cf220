//! The relay's HTTP API: `GET /metrics` (fleet and relay metrics, Prometheus text 0.0.4),
//! `GET /api/devices` and `GET /api/devices/{id}` (JSON), `GET|PUT /api/devices/{id}/config`
//! (remote config: show, or set `key=value` overrides), `GET /api/report` (cost report; JSON,
//! or `?format=text`), `GET /health`.
//!
//! Metrics are produced at scrape time by a `prometheus-client` collector over the
//! [`Fleet`](crate::fleet::Fleet),
//! so a device that reports is visible at the next scrape with no per-device registration.
//!
//! # Floats as written
//! Thresholds, audit rates, bin edges and a few device figures are `f32`. Widened with
//! `f64::from` they show their binary noise (`0.9_f32` becomes `0.8999999761581421`), and
//! `serde_json::json!`/`to_value` widen every `f32` inside a struct that way. So every JSON
//! body here that holds a struct goes through [`to_json`], and every `f32` handed to JSON or
//! a metric by itself through [`widen`]: both give the shortest decimal that reads back as
//! the same `f32` (`0.9`).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use serde::Serialize;
use serde_json::{json, Value};
use tierd_runtime::link::Publisher;
use tierd_runtime::metrics::{family, Labels};

use crate::fleet::Fleet;
use crate::report::{usage, DeviceUsage, Prices};
use crate::state::{RelayState, RelayStats, SharedControl, SharedFleet};

pub struct ApiState {
    pub relay: RelayState,
    pub fleet: SharedFleet,
    pub control: SharedControl,
    pub client: Publisher,
    pub prices: Prices,
    /// Where operator overrides are saved.
    pub state_dir: std::path::PathBuf,
    pub delta: f64,
    pub registry: Registry,
}

/// What the HTTP API needs besides the shared state.
pub struct ApiDeps {
    pub client: Publisher,
    pub prices: Prices,
    pub state_dir: std::path::PathBuf,
    /// Error rate of the agreement bounds in the report (`tuning.delta`).
    pub delta: f64,
    /// Agreement with the cloud the tuner certifies (`tuning.target`), for the metrics' help.
    pub target: f64,
    /// Who may call the API ([`crate::http_auth`]): applied as a layer over every route.
    pub access: crate::http_auth::Access,
    /// `[metrics]`: per-device series cap and device groups.
    pub metrics: crate::config::MetricsConfig,
}

#[derive(Debug)]
struct FleetCollector {
    fleet: SharedFleet,
    stats: Arc<RelayStats>,
    /// `tierd_device_proposed_threshold`'s help, which states the configured target.
    proposed_help: String,
    metrics: crate::config::MetricsConfig,
    persist: Option<Arc<crate::store::Persist>>,
}

/// The group of `device` in `[metrics] groups` (first match by group name), else `other`.
fn group_of<'a>(
    groups: &'a std::collections::BTreeMap<String, Vec<String>>,
    device: &str,
) -> &'a str {
    groups
        .iter()
        .find(|(_, pats)| {
            pats.iter().any(|p| match p.strip_suffix('*') {
                Some(prefix) => device.starts_with(prefix),
                None => device == p,
            })
        })
        .map_or("other", |(g, _)| g.as_str())
}

/// The fleet-level series (`tierd_fleet_*`): a handful per (model, version, group), whatever
/// the fleet's size.
fn fleet_series(
    enc: &mut DescriptorEncoder,
    fleet: &Fleet,
    m: &crate::config::MetricsConfig,
) -> std::fmt::Result {
    use std::collections::BTreeMap;
    type Key = (String, String, String);
    let mut devices: BTreeMap<Key, i64> = BTreeMap::new();
    let mut requests: BTreeMap<(Key, &'static str), u64> = BTreeMap::new();
    let mut missing: BTreeMap<String, u64> = BTreeMap::new();
    for d in fleet.devices() {
        let (name, version) = d
            .latest
            .model
            .split_once('@')
            .unwrap_or((&d.latest.model, ""));
        let group = group_of(&m.groups, &d.device_id).to_string();
        let key = (name.to_string(), version.to_string(), group.clone());
        *devices.entry(key.clone()).or_default() += 1;
        for (tier, n) in d.latest.totals.by_tier() {
            let e = requests.entry((key.clone(), tier.as_str())).or_default();
            *e = e.saturating_add(n);
        }
        let e = missing.entry(group).or_default();
        *e = e.saturating_add(d.missing_reports);
    }
    let labels = |(model, version, group): &Key| -> Labels {
        vec![
            ("model", model.clone()),
            ("version", version.clone()),
            ("group", group.clone()),
        ]
    };
    family(
        enc,
        "tierd_fleet_model_devices",
        "Devices by edge model, version and group (from their latest report).",
        MetricType::Gauge,
        devices
            .iter()
            .map(|(k, n)| (labels(k), ConstGauge::new(*n)))
            .collect(),
    )?;
    family(
        enc,
        "tierd_fleet_model_requests",
        "Requests answered by the devices of each edge model, version and group, by tier.",
        MetricType::Counter,
        requests
            .iter()
            .map(|((k, tier), n)| {
                let mut l = labels(k);
                l.push(("tier", tier.to_string()));
                (l, ConstCounter::new(*n))
            })
            .collect(),
    )?;
    family(
        enc,
        "tierd_fleet_telemetry_missing_reports",
        "Telemetry reports of the devices' current runs that never reached the relay, by group.",
        MetricType::Counter,
        missing
            .iter()
            .map(|(g, n)| (vec![("group", g.clone())], ConstCounter::new(*n)))
            .collect(),
    )?;
    let mut online: BTreeMap<String, i64> = BTreeMap::new();
    for (d, st) in fleet.statuses() {
        *online
            .entry(group_of(&m.groups, d).to_string())
            .or_default() += i64::from(st.online);
    }
    family(
        enc,
        "tierd_fleet_devices_online",
        "Devices whose retained status says online, by group.",
        MetricType::Gauge,
        online
            .iter()
            .map(|(g, n)| (vec![("group", g.clone())], ConstGauge::new(*n)))
            .collect(),
    )?;
    family(
        enc,
        "tierd_metrics_device_series_omitted",
        "Devices left out of the per-device series (metrics.max_device_series); all are in /api/devices.",
        MetricType::Gauge,
        vec![(
            Vec::new(),
            ConstGauge::new(fleet.len().saturating_sub(m.max_device_series) as i64),
        )],
    )
}

/// The fleet store's side of this replica.
fn store_series(enc: &mut DescriptorEncoder, p: &crate::store::Persist) -> std::fmt::Result {
    let st = &p.stats;
    family(
        enc,
        "tierd_relay_store_writer",
        "1 while this replica holds the fleet store's lease (files telemetry, tunes, pushes).",
        MetricType::Gauge,
        vec![(Vec::new(), ConstGauge::new(i64::from(p.is_writer())))],
    )?;
    for (name, help, c) in [
        (
            "tierd_relay_store_batches",
            "Batches written to the fleet store.",
            &st.batches,
        ),
        (
            "tierd_relay_store_rows_written",
            "Rows written to the fleet store.",
            &st.rows,
        ),
        (
            "tierd_relay_store_failures",
            "Batches the fleet store refused or failed (kept and retried; fenced ones dropped).",
            &st.failures,
        ),
        (
            "tierd_relay_store_rows_read",
            "Rows read from the fleet store (at start, and following the writer).",
            &st.rows_read,
        ),
        (
            "tierd_relay_store_rows_unreadable",
            "Stored rows that could not be read back (skipped).",
            &st.rows_unreadable,
        ),
        (
            "tierd_relay_store_takeovers",
            "Times this replica took the writer's lease.",
            &st.takeovers,
        ),
    ] {
        family(
            enc,
            name,
            help,
            MetricType::Counter,
            vec![(Vec::new(), ConstCounter::new(c.load(Ordering::Relaxed)))],
        )?;
    }
    family(
        enc,
        "tierd_relay_store_dirty_rows",
        "Rows changed in memory, waiting for the next batch.",
        MetricType::Gauge,
        vec![(Vec::new(), ConstGauge::new(p.dirty() as i64))],
    )?;
    family(
        enc,
        "tierd_relay_store_last_batch_seconds",
        "How long the last batch took to commit.",
        MetricType::Gauge,
        vec![(
            Vec::new(),
            ConstGauge::new(st.last_batch_us.load(Ordering::Relaxed) as f64 / 1e6),
        )],
    )
}

/// `v` as the `f64` nearest its shortest round-trip decimal: `0.9_f32` is `0.9`, where
/// `f64::from` gives `0.8999999761581421`. The value is the same `f32` read back; only the
/// noise below its precision is gone.
pub fn widen(v: f32) -> f64 {
    // `Display` writes the shortest decimal that parses back to `v` (no exponent; "NaN" and
    // "inf" parse too), so the fallback is never taken.
    format!("{v}").parse().unwrap_or(f64::from(v))
}

/// `v` as a JSON value with every `f32` in it as [`widen`] gives it. Serialized to text
/// first, where serde_json writes an `f32` as its shortest decimal, then parsed back; `json!`
/// or `serde_json::to_value` would widen it with `f64::from` instead.
pub fn to_json<T: Serialize + ?Sized>(v: &T) -> Result<Value, serde_json::Error> {
    serde_json::from_str(&serde_json::to_string(v)?)
}

/// A ratio as a percentage for people: `0.99` is `99`, `0.995` is `99.5`.
fn percent(ratio: f64) -> String {
    let p = (ratio * 100.0 * 1e4).round() / 1e4;
    format!("{p}")
}

impl Collector for FleetCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let s = &self.stats;
        family(
            &mut enc,
            "tierd_relay_escalations",
            "Escalations handled by this relay replica, by outcome.",
            MetricType::Counter,
            [
                ("answered", &s.answered),
                ("error", &s.errors),
                ("rejected", &s.rejected),
                ("overloaded", &s.overloaded),
            ]
            .into_iter()
            .map(|(o, c)| {
                (
                    vec![("outcome", o.to_string())],
                    ConstCounter::new(c.load(Ordering::Relaxed)),
                )
            })
            .collect(),
        )?;
        family(
            &mut enc,
            "tierd_relay_telemetry_reports",
            "Telemetry reports received, by what the relay made of them.",
            MetricType::Counter,
            [
                ("accepted", &s.telemetry_accepted),
                ("rejected", &s.telemetry_rejected),
            ]
            .into_iter()
            .map(|(o, c)| {
                (
                    vec![("result", o.to_string())],
                    ConstCounter::new(c.load(Ordering::Relaxed)),
                )
            })
            .collect(),
        )?;
        family(
            &mut enc,
            "tierd_relay_config_documents_ignored",
            "Config documents seen on the broker that this relay's key did not sign (ignored).",
            MetricType::Counter,
            [(
                Vec::<(&'static str, String)>::new(),
                ConstCounter::new(s.config_unverified.load(Ordering::Relaxed)),
            )]
            .into_iter()
            .collect(),
        )?;
        family(
            &mut enc,
            "tierd_relay_spooled_duplicates",
            "Spooled records received again (resent after a lost ack): acknowledged, not re-filed.",
            MetricType::Counter,
            [(
                Vec::<(&'static str, String)>::new(),
                ConstCounter::new(s.duplicates.load(Ordering::Relaxed)),
            )]
            .into_iter()
            .collect(),
        )?;
        family(
            &mut enc,
            "tierd_fleet_device_id_collisions",
            "Online statuses from a second machine under a device id already online (boards \
             cloned from one image).",
            MetricType::Counter,
            [(
                Vec::<(&'static str, String)>::new(),
                ConstCounter::new(s.id_collisions.load(Ordering::Relaxed)),
            )]
            .into_iter()
            .collect(),
        )?;

        if let Some(p) = &self.persist {
            store_series(&mut enc, p)?;
        }
        let Ok(fleet) = self.fleet.lock() else {
            return Ok(());
        };
        fleet_series(&mut enc, &fleet, &self.metrics)?;
        let cap = self.metrics.max_device_series;
        let dev = |d: &str, extra: &[(&'static str, &str)]| -> Labels {
            let mut l = vec![("device", d.to_string())];
            l.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
            l
        };
        let mut requests = Vec::new();
        let mut missing = Vec::new();
        let mut joules = Vec::new();
        let mut per_request = Vec::new();
        let mut latency = Vec::new();
        let mut escalation_ratio = Vec::new();
        let mut threshold = Vec::new();
        let mut last_seen = Vec::new();
        let mut cpu = Vec::new();
        let mut temp = Vec::new();
        let mut proposed = Vec::new();
        // Per-device series for the first `cap` devices by id (Prometheus holds a few per
        // device; the fleet-level ones above cover everyone).
        for d in fleet.devices().take(cap) {
            let r = &d.latest;
            let id = d.device_id.as_str();
            for (tier, n) in r.totals.by_tier() {
                requests.push((dev(id, &[("tier", tier.as_str())]), ConstCounter::new(n)));
            }
            missing.push((dev(id, &[]), ConstCounter::new(d.missing_reports)));
            let e = &r.energy;
            let estimated = if e.estimated { "true" } else { "false" };
            joules.push((
                dev(id, &[("meter", &e.meter), ("estimated", estimated)]),
                ConstCounter::new(e.total_joules),
            ));
            if let Some(j) = e.joules_per_inference {
                per_request.push((
                    dev(id, &[("tier", "edge"), ("estimated", estimated)]),
                    ConstGauge::new(j),
                ));
                if let Some(radio) = e.radio_joules_per_escalation {
                    per_request.push((
                        dev(id, &[("tier", "cloud"), ("estimated", estimated)]),
                        ConstGauge::new(j + radio),
                    ));
                }
            }
            for l in &r.latency {
                if l.count == 0 {
                    continue;
                }
                let (kind, name) = l.series.label();
                for (q, us) in [("0.5", l.p50_us), ("0.95", l.p95_us), ("0.99", l.p99_us)] {
                    latency.push((
                        dev(id, &[(kind, name), ("quantile", q)]),
                        ConstGauge::new(us as f64 / 1e6),
                    ));
                }
            }
            if let Some(rate) = r.escalation_rate() {
                escalation_ratio.push((dev(id, &[]), ConstGauge::new(rate)));
            }
            threshold.push((
                dev(id, &[("signal", r.signal.as_str())]),
                ConstGauge::new(widen(r.threshold)),
            ));
            last_seen.push((
                dev(id, &[]),
                ConstGauge::new(d.last_seen_ms as f64 / 1000.0),
            ));
            cpu.push((
                dev(id, &[]),
                // Divided as the f32 it is, so the ratio too is its shortest decimal.
                ConstGauge::new(widen(r.device.cpu_percent / 100.0)),
            ));
            if let Some(t) = r.device.temperature_c {
                temp.push((dev(id, &[]), ConstGauge::new(widen(t))));
            }
            for c in d.calibration.iter().chain(d.models.values()) {
                let insufficient = if c.certificate.insufficient_evidence {
                    "true"
                } else {
                    "false"
                };
                proposed.push((
                    dev(
                        id,
                        &[
                            ("model", crate::fleet::model_name(&c.model)),
                            ("insufficient_evidence", insufficient),
                        ],
                    ),
                    ConstGauge::new(widen(c.certificate.threshold)),
                ));
            }
        }
        family(
            &mut enc,
            "tierd_device_requests",
            "Requests each device answered since it started, by tier (from its latest report).",
            MetricType::Counter,
            requests,
        )?;
        family(
            &mut enc,
            "tierd_device_telemetry_missing_reports",
            "Telemetry reports of the current agent run that never reached this relay.",
            MetricType::Counter,
            missing,
        )?;
        family(
            &mut enc,
            "tierd_device_energy_joules",
            "Joules attributed to the agent since it started (compute + modelled radio).",
            MetricType::Counter,
            joules,
        )?;
        family(
            &mut enc,
            "tierd_device_energy_per_request_joules",
            "Joules per request in the last window: local compute (edge), plus modelled radio (cloud).",
            MetricType::Gauge,
            per_request,
        )?;
        family(
            &mut enc,
            "tierd_device_latency_seconds",
            "Latency quantiles over the device's last telemetry window, per path and stage.",
            MetricType::Gauge,
            latency,
        )?;
        family(
            &mut enc,
            "tierd_device_escalation_ratio",
            "Share of answered requests escalated in the last window.",
            MetricType::Gauge,
            escalation_ratio,
        )?;
        family(
            &mut enc,
            "tierd_device_threshold",
            "Escalation threshold in force on the device.",
            MetricType::Gauge,
            threshold,
        )?;
        family(
            &mut enc,
            "tierd_device_last_seen_timestamp_seconds",
            "When the device's latest report arrived (relay clock).",
            MetricType::Gauge,
            last_seen,
        )?;
        family(
            &mut enc,
            "tierd_device_cpu_ratio",
            "Whole-machine CPU use on the device over its last window, 0-1.",
            MetricType::Gauge,
            cpu,
        )?;
        family(
            &mut enc,
            "tierd_device_proposed_threshold",
            &self.proposed_help,
            MetricType::Gauge,
            proposed,
        )?;
        family(
            &mut enc,
            "tierd_device_temperature_celsius",
            "Hottest temperature sensor on the device.",
            MetricType::Gauge,
            temp,
        )?;
        family(
            &mut enc,
            "tierd_device_online",
            "1 while the device's retained status says online; 0 after a clean stop or its last will.",
            MetricType::Gauge,
            fleet
                .statuses()
                .take(cap)
                .map(|(d, st)| (dev(d, &[]), ConstGauge::new(i64::from(st.online))))
                .collect(),
        )?;
        let t = fleet.totals();
        family(
            &mut enc,
            "tierd_fleet_requests",
            "Requests answered by all devices, by tier (sum of their latest reports).",
            MetricType::Counter,
            t.by_tier()
                .into_iter()
                .map(|(tier, n)| (vec![("tier", tier.to_string())], ConstCounter::new(n)))
                .collect(),
        )?;
        family(
            &mut enc,
            "tierd_fleet_devices",
            "Devices that have reported to this relay.",
            MetricType::Gauge,
            vec![(Vec::new(), ConstGauge::new(fleet.len() as i64))],
        )
    }
}

pub fn router(relay: RelayState, deps: ApiDeps) -> Router {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(FleetCollector {
        fleet: relay.fleet.clone(),
        stats: relay.stats.clone(),
        proposed_help: format!(
            "Threshold the tuner certifies for the device ({} % agreement with the cloud, {} % confidence).",
            percent(deps.target),
            percent(1.0 - deps.delta)
        ),
        metrics: deps.metrics.clone(),
        persist: relay.persist.clone(),
    }));
    let access = Arc::new(deps.access);
    let dashboard = crate::dashboard::router(crate::dashboard::Dashboard {
        fleet: relay.fleet.clone(),
        prices: deps.prices.clone(),
        delta: deps.delta,
        target: deps.target,
        access: access.clone(),
    });
    let state = Arc::new(ApiState {
        fleet: relay.fleet.clone(),
        control: relay.control.clone(),
        relay,
        client: deps.client,
        prices: deps.prices,
        state_dir: deps.state_dir,
        delta: deps.delta,
        registry,
    });
    Router::new()
        .route("/metrics", get(metrics))
        .route("/api/devices", get(devices))
        .route("/api/devices/{id}", get(device))
        .route("/api/devices/{id}/config", get(config_show).put(config_set))
        .route("/api/devices/{id}/config/reset", post(config_reset))
        .route("/api/report", get(report))
        .route(
            "/api/rollouts",
            get(rollouts_list)
                .post(rollout_start)
                .layer(axum::extract::DefaultBodyLimit::max(ROLLOUT_BODY_LIMIT)),
        )
        .route("/api/rollouts/{id}", get(rollout_show))
        .route("/api/rollouts/{id}/{action}", post(rollout_action))
        .route("/api/replica", get(replica))
        .route("/health", get(|| async { Json(json!({ "ok": true })) }))
        .layer(axum::middleware::from_fn_with_state(
            state.relay.clone(),
            writer_only,
        ))
        .with_state(state)
        // The dashboard's pages and login, outside `writer_only`: every replica serves them.
        .merge(dashboard)
        .layer(axum::middleware::from_fn_with_state(
            access,
            crate::http_auth::guard,
        ))
}

/// Changes go to the replica holding the store's lease: on another one a mutating route
/// answers 503 with the writer's API URL (reads are served by every replica).
async fn writer_only(
    State(relay): State<RelayState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let read = matches!(
        *request.method(),
        axum::http::Method::GET | axum::http::Method::HEAD
    );
    if read || relay.is_writer() {
        return next.run(request).await;
    }
    let writer = relay
        .persist
        .as_ref()
        .and_then(|p| p.lease())
        .map(|l| (l.holder, l.api_url));
    let (holder, url) = writer.unwrap_or_default();
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({
            "error": format!(
                "this replica does not write; send changes to the writer {holder:?} at {url}"
            ),
            "writer": holder,
            "writer_url": url,
        })),
    )
        .into_response()
}

/// `GET /api/replica`: this replica's role, the lease, and where it is in the store.
async fn replica(State(state): State<Arc<ApiState>>) -> Response {
    let Some(p) = &state.relay.persist else {
        return json_body(Ok(json!({ "role": "writer", "store": null })));
    };
    let role = if p.is_writer() {
        crate::store::Role::Writer
    } else {
        crate::store::Role::Follower
    };
    let size = p.store.size_bytes().await.ok().flatten();
    json_body(Ok(json!({
        "replica": p.id,
        "role": role,
        "store": p.store.backend(),
        "store_bytes": size,
        "revision": p.cursor(),
        "dirty_rows": p.dirty(),
        "lease": p.lease(),
        "takeovers": p.stats.takeovers.load(Ordering::Relaxed),
    })))
}

/// Largest rollout upload: a 64 MiB model as hex, its manifest and signature.
const ROLLOUT_BODY_LIMIT: usize = 2 * 64 * 1024 * 1024 + 256 * 1024;

/// `POST /api/rollouts`: what `cloud-relay rollout start` sends.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RolloutRequest {
    id: String,
    /// The candidate's manifest text and its `.sig` text.
    manifest: String,
    signature: String,
    /// The ONNX file, hex.
    onnx_hex: String,
    /// Devices in order; empty: every device whose primary model has the candidate's name.
    #[serde(default)]
    devices: Vec<String>,
    #[serde(default)]
    canary: Vec<String>,
    #[serde(default)]
    percent: u8,
    #[serde(default = "default_shadow_rate")]
    shadow_rate: f64,
}

fn default_shadow_rate() -> f64 {
    0.1
}

async fn rollout_start(State(state): State<Arc<ApiState>>, body: axum::body::Bytes) -> Response {
    let req: RolloutRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("rollout request: {e}")),
    };
    if let Err(e) = tierd_protocol::topic::validate_model_name(&req.id) {
        return error(StatusCode::BAD_REQUEST, format!("rollout id: {e}"));
    }
    if req.id.starts_with('.') {
        // It names a folder in the state directory: never `.` or `..`.
        return error(
            StatusCode::BAD_REQUEST,
            format!("rollout id {:?} must not start with '.'", req.id),
        );
    }
    let onnx = match hex::decode(req.onnx_hex.trim()) {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("onnx_hex: {e}")),
    };
    if state
        .relay
        .rollouts()
        .map(|r| r.get(&req.id).is_some())
        .unwrap_or(false)
    {
        return error(
            StatusCode::CONFLICT,
            format!("a rollout named {:?} exists; pick another id", req.id),
        );
    }
    let release = match crate::rollout::store::add_candidate(
        &state.state_dir,
        &req.id,
        &req.manifest,
        &req.signature,
        &onnx,
    ) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let devices = if req.devices.is_empty() {
        let name = release.model.split_once('@').map_or("", |(n, _)| n);
        match state.fleet.lock() {
            Ok(f) => f
                .devices()
                .filter(|d| crate::fleet::model_name(&d.latest.model) == name)
                .map(|d| d.device_id.clone())
                .collect(),
            Err(_) => Vec::new(),
        }
    } else {
        req.devices
    };
    let spec = crate::rollout::Spec {
        id: req.id.clone(),
        candidate: release,
        devices,
        canary: req.canary,
        percent: req.percent,
        shadow_rate: req.shadow_rate,
    };
    let Ok(mut r) = state.relay.rollouts() else {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "rollout state poisoned".into(),
        );
    };
    match r.start(spec, tierd_runtime::unix_ms()) {
        Ok(docs) => {
            state.relay.after_rollout_change(&state.client, &r, &docs);
            tracing::info!(rollout = %req.id, devices = docs.len(), "rollout started");
            json_body(to_json(&r.get(&req.id)))
        }
        Err(e) => error(StatusCode::BAD_REQUEST, e.to_string()),
    }
}

async fn rollouts_list(State(state): State<Arc<ApiState>>) -> Response {
    let Ok(r) = state.relay.rollouts() else {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "rollout state poisoned".into(),
        );
    };
    let list: Vec<Value> = r
        .rollouts
        .iter()
        .map(|(id, ro)| {
            let mut stages = std::collections::BTreeMap::<String, usize>::new();
            for d in ro.devices.values() {
                let key = serde_json::to_value(d.stage)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default();
                *stages.entry(key).or_default() += 1;
            }
            json!({
                "id": id,
                "candidate": ro.spec.candidate.model,
                "state": ro.state,
                "wave": ro.wave + 1,
                "waves": ro.waves.len(),
                "devices": ro.devices.len(),
                "stages": stages,
            })
        })
        .collect();
    Json(json!({ "rollouts": list })).into_response()
}

async fn rollout_show(State(state): State<Arc<ApiState>>, Path(id): Path<String>) -> Response {
    let Ok(r) = state.relay.rollouts() else {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "rollout state poisoned".into(),
        );
    };
    match r.get(&id) {
        Some(ro) => json_body(to_json(ro)),
        None => error(StatusCode::NOT_FOUND, format!("no rollout named {id:?}")),
    }
}

async fn rollout_action(
    State(state): State<Arc<ApiState>>,
    Path((id, action)): Path<(String, String)>,
) -> Response {
    let Ok(mut r) = state.relay.rollouts() else {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "rollout state poisoned".into(),
        );
    };
    let now = tierd_runtime::unix_ms();
    let result = match action.as_str() {
        "pause" => r.pause(&id).map(|()| Vec::new()),
        "resume" => r.resume(&id, now),
        "abort" => r.abort(&id, now),
        other => {
            return error(
                StatusCode::NOT_FOUND,
                format!("unknown rollout action {other:?}: pause, resume or abort"),
            )
        }
    };
    match result {
        Ok(docs) => {
            state.relay.after_rollout_change(&state.client, &r, &docs);
            tracing::info!(rollout = %id, %action, documents = docs.len(), "rollout changed by an operator");
            json_body(to_json(&r.get(&id)))
        }
        Err(crate::rollout::RolloutError::Unknown(id)) => {
            error(StatusCode::NOT_FOUND, format!("no rollout named {id:?}"))
        }
        Err(e) => error(StatusCode::CONFLICT, e.to_string()),
    }
}

fn error(status: StatusCode, message: String) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

/// A JSON response of `body` (through [`to_json`]), or a 500 if it cannot be written.
fn json_body(body: Result<Value, serde_json::Error>) -> Response {
    match body {
        Ok(v) => Json(v).into_response(),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("response could not be encoded: {e}"),
        ),
    }
}

async fn metrics(State(state): State<Arc<ApiState>>) -> Response {
    match tierd_runtime::metrics::render(&state.registry) {
        Ok(out) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static(tierd_runtime::metrics::CONTENT_TYPE),
            )],
            out,
        )
            .into_response(),
        Err(_) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "metrics could not be encoded".into(),
        ),
    }
}

/// `GET /api/devices`: every device's record, every status, the fleet's totals.
fn devices_body(f: &Fleet) -> Result<Value, serde_json::Error> {
    let list: Vec<_> = f.devices().collect();
    let statuses: std::collections::BTreeMap<_, _> = f.statuses().collect();
    Ok(json!({
        "devices": to_json(&list)?,
        "status": to_json(&statuses)?,
        "totals": to_json(&f.totals())?,
    }))
}

/// `GET /api/devices/{id}`: the device's record (or just its id), status and spool stream.
fn device_body(f: &Fleet, id: &str) -> Result<Value, serde_json::Error> {
    let mut body = match f.get(id) {
        Some(d) => to_json(d)?,
        None => json!({ "device_id": id }),
    };
    body["status"] = to_json(&f.status(id))?;
    body["stream"] = to_json(&f.stream(id))?;
    Ok(body)
}

async fn devices(State(state): State<Arc<ApiState>>) -> Response {
    match state.fleet.lock() {
        Ok(f) => json_body(devices_body(&f)),
        Err(_) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "fleet state poisoned".into(),
        ),
    }
}

async fn device(State(state): State<Arc<ApiState>>, Path(id): Path<String>) -> Response {
    match state.fleet.lock() {
        Ok(f) => match (f.get(&id), f.status(&id)) {
            (None, None) => error(
                StatusCode::NOT_FOUND,
                format!("no telemetry or status from device {id:?} yet"),
            ),
            _ => json_body(device_body(&f, &id)),
        },
        Err(_) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "fleet state poisoned".into(),
        ),
    }
}

async fn config_show(State(state): State<Arc<ApiState>>, Path(id): Path<String>) -> Response {
    if let Err(e) = tierd_protocol::topic::validate_device_id(&id) {
        return error(StatusCode::BAD_REQUEST, e.to_string());
    }
    let running = state.fleet.lock().ok().and_then(|f| {
        f.get(&id)
            .map(|d| (d.latest.config_version, d.latest.threshold))
    });
    match state.control.lock() {
        Ok(c) => json_body(to_json(&c.view(&id)).map(|mut body| {
            body["running"] = running.map_or(
                Value::Null,
                |(v, t)| json!({ "config_version": v, "threshold": widen(t) }),
            );
            body
        })),
        Err(_) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "control state poisoned".into(),
        ),
    }
}

/// `?force=true` on `PUT /api/devices/{id}/config`: configure a device this relay has never
/// heard of (before its first connect); otherwise a typo in the id is refused.
#[derive(Debug, Default, serde::Deserialize)]
struct SetParams {
    #[serde(default)]
    force: bool,
}

/// True when the relay knows `id`: a status or telemetry from it, or a config line for it.
fn device_known(state: &ApiState, id: &str) -> bool {
    let seen = state
        .fleet
        .lock()
        .map(|f| f.get(id).is_some() || f.status(id).is_some())
        .unwrap_or(true);
    seen || state
        .control
        .lock()
        .map(|c| c.stored(id).is_some())
        .unwrap_or(true)
}

/// Up to `n` known device ids nearest to `id` (for the "did you mean" of a refused id).
fn similar_devices(state: &ApiState, id: &str, n: usize) -> Vec<String> {
    let Ok(f) = state.fleet.lock() else {
        return Vec::new();
    };
    let mut ids: Vec<(usize, String)> = f
        .statuses()
        .map(|(d, _)| d.clone())
        .chain(f.devices().map(|d| d.device_id.clone()))
        .map(|d| (strsim::levenshtein(id, &d), d))
        .collect();
    ids.sort();
    ids.dedup_by(|a, b| a.1 == b.1);
    ids.into_iter()
        .filter(|(dist, _)| *dist <= id.len().max(3) / 2 + 1)
        .take(n)
        .map(|(_, d)| d)
        .collect()
}

/// `PUT /api/devices/{id}/config` with a JSON object of settings: `{"threshold": 0.95}`;
/// `null` (or `""`) unsets an override. The new document is published at once. A device the
/// relay has never heard of is refused (404) unless `?force=true`.
async fn config_set(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    Query(params): Query<SetParams>,
    body: axum::body::Bytes,
) -> Response {
    if let Err(e) = tierd_protocol::topic::validate_device_id(&id) {
        return error(StatusCode::BAD_REQUEST, e.to_string());
    }
    if !params.force && !device_known(&state, &id) {
        let near = similar_devices(&state, &id, 3);
        let hint = if near.is_empty() {
            String::new()
        } else {
            format!(" (did you mean {}?)", near.join(", "))
        };
        return error(
            StatusCode::NOT_FOUND,
            format!(
                "device {id:?} has never been seen by this relay (no status, telemetry or config \
                 line){hint}; to configure it before its first connect, force it \
                 (`cloud-relay config set --force`, or `?force=true`)"
            ),
        );
    }
    let changes: serde_json::Map<String, serde_json::Value> = match serde_json::from_slice(&body) {
        Ok(m) => m,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "body must be a JSON object of settings, e.g. {{\"threshold\": 0.95}}: {e}"
                ),
            )
        }
    };
    let pairs: Vec<(String, String)> = changes
        .into_iter()
        .map(|(k, v)| {
            let v = match v {
                serde_json::Value::Null => String::new(),
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            };
            (k, v)
        })
        .collect();
    let result = state
        .relay
        .operator_set(
            &state.client,
            &state.state_dir,
            &id,
            &pairs,
            tierd_runtime::unix_ms(),
        )
        .await;
    match result {
        Ok(doc) => {
            tracing::info!(device = %id, version = doc.version, "operator config published");
            json_body(to_json(&doc).map(|doc| json!({ "published": doc })))
        }
        Err(e) => error(StatusCode::BAD_REQUEST, e.to_string()),
    }
}

/// `POST /api/devices/{id}/config/reset`: a new config epoch for the device, its versions
/// started over, and the document published at once (recovers a device whose version line
/// reached its end).
async fn config_reset(State(state): State<Arc<ApiState>>, Path(id): Path<String>) -> Response {
    let result = state
        .relay
        .operator_reset(
            &state.client,
            &state.state_dir,
            &id,
            tierd_runtime::unix_ms(),
        )
        .await;
    match result {
        Ok(doc) => {
            tracing::info!(device = %id, epoch = doc.epoch, version = doc.version, "config reset published");
            json_body(to_json(&doc).map(|doc| json!({ "published": doc })))
        }
        Err(e) => error(StatusCode::BAD_REQUEST, e.to_string()),
    }
}

#[derive(serde::Deserialize)]
struct ReportQuery {
    format: Option<String>,
}

async fn report(State(state): State<Arc<ApiState>>, Query(q): Query<ReportQuery>) -> Response {
    let usages: Vec<DeviceUsage> = match state.fleet.lock() {
        Ok(f) => f.devices().map(|d| usage(d, state.delta)).collect(),
        Err(_) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "fleet state poisoned".into(),
            )
        }
    };
    let r = crate::report::build(&usages, &state.prices);
    match q.format.as_deref() {
        Some("text") => crate::report::render_text(&r).into_response(),
        None | Some("json") => Json(r).into_response(),
        Some(other) => error(
            StatusCode::BAD_REQUEST,
            format!("format {other:?}: use json or text"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::collections::BTreeMap;

    use crate::config::RelayConfig;
    use crate::control::Control;
    use crate::fleet::testing::{online, report};
    use tierd_protocol::Settings;
    use tierd_runtime::mqtt::MqttConfig;

    #[test]
    fn widen_gives_the_f32s_shortest_decimal() {
        assert_eq!(f64::from(0.9_f32), 0.8999999761581421);
        assert_eq!(widen(0.9), 0.9);
        assert_eq!(widen(0.05), 0.05);
        assert_eq!(widen(1.01), 1.01);
        assert_eq!(widen(0.0), 0.0);
        assert_eq!(widen(1e-20), 1e-20);
        assert_eq!(widen(f32::MAX), 3.4028235e38);
        assert!(widen(f32::NAN).is_nan());
        // Read back as f32 it is the same value: nothing but the noise is gone.
        for v in [0.9_f32, 0.1, 0.33333334, 0.999, 12.3, 1.0e-7] {
            assert_eq!(widen(v) as f32, v);
        }
        #[derive(Serialize)]
        struct S {
            t: f32,
            edges: Vec<f32>,
        }
        let v = to_json(&S {
            t: 0.9,
            edges: vec![0.0, 0.85, 0.93],
        })
        .unwrap();
        assert_eq!(v.to_string(), r#"{"edges":[0.0,0.85,0.93],"t":0.9}"#);
        // What `json!` alone would have written.
        assert!(json!(0.9_f32).to_string().starts_with("0.8999999"));
    }

    /// The real API on 127.0.0.1 over a fleet with one device at threshold 0.9 and a
    /// fleet default of 0.9, fetched over HTTP: no f32 shows its binary noise.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn json_and_metrics_show_f32s_as_written() {
        let dir = tempfile::tempdir().unwrap();
        let now = 1_800_000_000_000;
        let boot = now - 5;
        let mut fleet = Fleet::new(8);
        online(&mut fleet, "dev-1", boot);
        let mut r = report("dev-1", boot, 1, 10);
        r.threshold = 0.9;
        r.device.cpu_percent = 12.3;
        r.device.temperature_c = Some(47.1);
        fleet.ingest("dev-1", r, now).unwrap();
        let cfg = RelayConfig::default();
        let defaults = Settings {
            threshold: Some(0.9),
            ..Settings::default()
        };
        let control = Control::new(
            false,
            cfg.push_rules(),
            defaults,
            BTreeMap::new(),
            BTreeMap::new(),
            8,
        );
        let (signer, _) = crate::signing::load_or_create(&dir.path().join("key.pk8")).unwrap();
        let relay = RelayState::new(fleet, control, signer);
        let client =
            tierd_runtime::link::Link::open(MqttConfig::default().options("api-test").unwrap(), 8)
                .publisher();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = router(
            relay,
            ApiDeps {
                client,
                prices: Prices::default(),
                state_dir: dir.path().to_path_buf(),
                delta: 0.05,
                target: 0.99,
                access: crate::http_auth::Access::new("t0ken".into(), &cfg.http, addr),
                metrics: crate::config::MetricsConfig::default(),
            },
        );
        let server = tokio::spawn(async move { axum::serve(listener, app).await });

        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        for path in [
            "/api/devices",
            "/api/devices/dev-1",
            "/api/devices/dev-1/config",
            "/metrics",
        ] {
            let resp = http
                .get(format!("http://{addr}{path}"))
                .bearer_auth("t0ken")
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), StatusCode::OK, "{path}");
            let text = resp.text().await.unwrap();
            for noise in ["0.899999", "12.30000", "47.09999", "0.12300000"] {
                assert!(!text.contains(noise), "{path} shows {noise}:\n{text}");
            }
            if path == "/metrics" {
                assert!(
                    text.contains(
                        r#"tierd_device_threshold{device="dev-1",signal="max_prob"} 0.9"#
                    ),
                    "{text}"
                );
                assert!(text.contains("47.1"), "{text}");
                continue;
            }
            let body: Value = serde_json::from_str(&text).unwrap();
            let threshold = match path {
                "/api/devices" => &body["devices"][0]["latest"]["threshold"],
                "/api/devices/dev-1" => &body["latest"]["threshold"],
                _ => &body["running"]["threshold"],
            };
            assert_eq!(threshold.to_string(), "0.9", "{path}: {text}");
            assert!(text.contains("\"threshold\":0.9"), "{path}: {text}");
            if path.ends_with("/config") {
                assert_eq!(body["defaults"]["threshold"].to_string(), "0.9", "{text}");
            } else {
                assert!(text.contains("\"cpu_percent\":12.3"), "{path}: {text}");
                assert!(text.contains("\"temperature_c\":47.1"), "{path}: {text}");
            }
        }
        server.abort();
    }

    #[test]
    fn devices_fall_in_the_first_group_a_pattern_matches() {
        let groups: std::collections::BTreeMap<String, Vec<String>> = [
            ("lab".to_string(), vec!["lab-01".to_string()]),
            ("orchard".to_string(), vec!["orchard-*".to_string()]),
        ]
        .into();
        assert_eq!(group_of(&groups, "orchard-17"), "orchard");
        assert_eq!(group_of(&groups, "lab-01"), "lab");
        assert_eq!(group_of(&groups, "lab-02"), "other");
        assert_eq!(group_of(&groups, "orchard"), "other");
    }

    #[test]
    fn percentages_read_as_people_write_them() {
        assert_eq!(percent(0.99), "99");
        assert_eq!(percent(1.0 - 0.05), "95");
        assert_eq!(percent(0.995), "99.5");
        assert_eq!(percent(0.999), "99.9");
    }
}
