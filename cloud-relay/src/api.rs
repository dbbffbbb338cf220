//! The relay's HTTP API: `GET /metrics` (fleet and relay metrics, Prometheus text 0.0.4),
//! `GET /api/devices` and `GET /api/devices/{id}` (JSON), `GET|PUT /api/devices/{id}/config`
//! (remote config: show, or set `key=value` overrides), `GET /api/report` (cost report; JSON,
//! or `?format=text`), `GET /health`.
//!
//! Metrics are produced at scrape time by a `prometheus-client` collector over the
//! [`Fleet`](crate::fleet::Fleet),
//! so a device that reports is visible at the next scrape with no per-device registration.

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
use serde_json::json;
use tierd_runtime::link::Publisher;
use tierd_runtime::metrics::{family, Labels};

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
}

#[derive(Debug)]
struct FleetCollector {
    fleet: SharedFleet,
    stats: Arc<RelayStats>,
    /// `tierd_device_proposed_threshold`'s help, which states the configured target.
    proposed_help: String,
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

        let Ok(fleet) = self.fleet.lock() else {
            return Ok(());
        };
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
        for d in fleet.devices() {
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
                ConstGauge::new(f64::from(r.threshold)),
            ));
            last_seen.push((
                dev(id, &[]),
                ConstGauge::new(d.last_seen_ms as f64 / 1000.0),
            ));
            cpu.push((
                dev(id, &[]),
                ConstGauge::new(f64::from(r.device.cpu_percent) / 100.0),
            ));
            if let Some(t) = r.device.temperature_c {
                temp.push((dev(id, &[]), ConstGauge::new(f64::from(t))));
            }
            if let Some(c) = &d.calibration {
                let insufficient = if c.certificate.insufficient_evidence {
                    "true"
                } else {
                    "false"
                };
                proposed.push((
                    dev(id, &[("insufficient_evidence", insufficient)]),
                    ConstGauge::new(f64::from(c.certificate.threshold)),
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
    }));
    let access = deps.access;
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
        .route("/health", get(|| async { Json(json!({ "ok": true })) }))
        .with_state(state)
        .layer(axum::middleware::from_fn_with_state(
            Arc::new(access),
            crate::http_auth::guard,
        ))
}

fn error(status: StatusCode, message: String) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
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

async fn devices(State(state): State<Arc<ApiState>>) -> Response {
    match state.fleet.lock() {
        Ok(f) => {
            let list: Vec<_> = f.devices().collect();
            let statuses: std::collections::BTreeMap<_, _> = f.statuses().collect();
            Json(json!({ "devices": list, "status": statuses, "totals": f.totals() }))
                .into_response()
        }
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
            (record, status) => {
                let mut body = record.map_or_else(|| json!({ "device_id": id }), |d| json!(d));
                body["status"] = json!(status);
                body["stream"] = json!(f.stream(&id));
                Json(body).into_response()
            }
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
        Ok(c) => {
            let mut body = json!(c.view(&id));
            body["running"] =
                json!(running.map(|(v, t)| json!({ "config_version": v, "threshold": t })));
            Json(body).into_response()
        }
        Err(_) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "control state poisoned".into(),
        ),
    }
}

/// `PUT /api/devices/{id}/config` with a JSON object of settings: `{"threshold": 0.95}`;
/// `null` (or `""`) unsets an override. The new document is published at once.
async fn config_set(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Response {
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
    let result = state.relay.operator_set(
        &state.client,
        &state.state_dir,
        &id,
        &pairs,
        tierd_runtime::unix_ms(),
    );
    match result {
        Ok(doc) => {
            tracing::info!(device = %id, version = doc.version, "operator config published");
            Json(json!({ "published": doc })).into_response()
        }
        Err(e) => error(StatusCode::BAD_REQUEST, e.to_string()),
    }
}

/// `POST /api/devices/{id}/config/reset`: a new config epoch for the device, its versions
/// started over, and the document published at once (recovers a device whose version line
/// reached its end).
async fn config_reset(State(state): State<Arc<ApiState>>, Path(id): Path<String>) -> Response {
    let result = state.relay.operator_reset(
        &state.client,
        &state.state_dir,
        &id,
        tierd_runtime::unix_ms(),
    );
    match result {
        Ok(doc) => {
            tracing::info!(device = %id, epoch = doc.epoch, version = doc.version, "config reset published");
            Json(json!({ "published": doc })).into_response()
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
    use super::percent;

    #[test]
    fn percentages_read_as_people_write_them() {
        assert_eq!(percent(0.99), "99");
        assert_eq!(percent(1.0 - 0.05), "95");
        assert_eq!(percent(0.995), "99.5");
        assert_eq!(percent(0.999), "99.9");
    }
}
