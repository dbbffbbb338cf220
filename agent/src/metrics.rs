//! `GET /metrics`: the agent's figures in the Prometheus text format (0.0.4).
//!
//! A `prometheus-client` [`Collector`] reads the [`Recorder`] and the latest telemetry report
//! at scrape time, so the request path records once (into HDR histograms) and nothing is kept
//! twice. Prometheus histogram buckets are read off the HDR histograms, exact to their 1 %
//! precision.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tierd_protocol::LatencySeries;
use tierd_runtime::metrics::{counter, gauge, Labels};
use tokio::sync::watch;

use crate::escalation::MqttStats;
use crate::policy::Policy;
use crate::telemetry::{LatestReport, Recorder};

/// Bucket bounds in seconds: 50 µs (a local forward) to 5 s (a slow escalation).
pub const BUCKETS: [f64; 16] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0,
];

#[derive(Debug)]
struct AgentCollector {
    device_id: String,
    recorder: Arc<Recorder>,
    mqtt: Arc<MqttStats>,
    policy: watch::Receiver<Policy>,
    latest: LatestReport,
    spool: crate::forward::SpoolSink,
}

impl Collector for AgentCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let dev = || vec![("device", self.device_id.clone())];
        let with = |k: &'static str, v: &str| {
            let mut l = dev();
            l.push((k, v.to_string()));
            l
        };
        let t = self.recorder.counters.tiers();
        counter(
            &mut enc,
            "tierd_requests",
            "Inference requests answered, by the tier whose answer was returned.",
            &t.by_tier()
                .map(|(tier, n)| (with("tier", tier.as_str()), n)),
        )?;
        counter(
            &mut enc,
            "tierd_rejected_requests",
            "Requests refused before inference: malformed (bad_request) or queue full (overloaded).",
            &[
                (with("reason", "bad_request"), t.bad_request),
                (with("reason", "overloaded"), t.overloaded),
            ],
        )?;
        let f = self.recorder.counters.fallbacks();
        counter(
            &mut enc,
            "tierd_escalation_fallbacks",
            "Escalations answered by the edge after all, by reason.",
            &[
                (with("reason", "timeout"), f.timeout),
                (with("reason", "disconnected"), f.disconnected),
                (with("reason", "overload"), f.overload),
                (with("reason", "relay_error"), f.relay_error),
                (with("reason", "publish_failed"), f.publish_failed),
            ],
        )?;
        let m = &self.mqtt;
        counter(
            &mut enc,
            "tierd_mqtt_payload_bytes",
            "MQTT payload bytes of escalations, by direction.",
            &[
                (
                    with("direction", "out"),
                    m.bytes_out.load(Ordering::Relaxed),
                ),
                (with("direction", "in"), m.bytes_in.load(Ordering::Relaxed)),
            ],
        )?;

        let mut hist = enc.encode_descriptor(
            "tierd_latency_seconds",
            "Latency per request path (edge, cloud, edge_fallback) and per stage (queue, forward, escalation).",
            None,
            MetricType::Histogram,
        )?;
        for series in LatencySeries::ALL {
            let (kind, name) = series.label();
            let (sum, count, buckets) = self.recorder.with_total(series, |h| {
                let count = h.len();
                let sum = if count == 0 {
                    0.0
                } else {
                    h.mean() * count as f64 / 1e6
                };
                let buckets: Vec<(f64, u64)> = BUCKETS
                    .iter()
                    .map(|&le| (le, h.count_between(0, (le * 1e6) as u64)))
                    .chain(std::iter::once((f64::INFINITY, count)))
                    .collect();
                (sum, count, buckets)
            });
            let labels = with(kind, name);
            hist.encode_family(&labels)?
                .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                    sum, count, &buckets, None,
                )?;
        }

        let policy = *self.policy.borrow();
        gauge(
            &mut enc,
            "tierd_threshold",
            "Escalation threshold in force (escalate when confidence is below it).",
            &[(
                with("signal", policy.signal.as_str()),
                f64::from(policy.threshold),
            )],
        )?;
        gauge(
            &mut enc,
            "tierd_config_version",
            "Version of the remote config document in force (0: agent.toml only).",
            &[(dev(), policy.config_version as f64)],
        )?;
        if let Some(s) = self.spool.stats() {
            gauge(
                &mut enc,
                "tierd_spool_records",
                "Store-and-forward spool: records waiting for the relay's ack (pending), dropped at the size cap, and found corrupt at recovery (both since the spool was created).",
                &[
                    (with("state", "pending"), s.pending_records as f64),
                    (with("state", "dropped"), s.dropped as f64),
                    (with("state", "corrupt"), s.corrupt as f64),
                ],
            )?;
            gauge(
                &mut enc,
                "tierd_spool_bytes",
                "Size of the spool file on disk.",
                &[(dev(), s.file_bytes as f64)],
            )?;
        }

        let latest = self.latest.lock().ok().and_then(|l| l.clone());
        if let Some(r) = latest {
            let e = &r.energy;
            let meter = |l: &mut Labels| {
                l.push(("meter", e.meter.clone()));
                l.push(("estimated", e.estimated.to_string()));
            };
            let mut l = dev();
            meter(&mut l);
            let mut m = enc.encode_descriptor(
                "tierd_energy_joules",
                "Joules attributed to this agent since start (compute + modelled radio), as of the last report.",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(e.total_joules).encode(m.encode_family(&l)?)?;
            let mut per = Vec::new();
            if let Some(j) = e.joules_per_inference {
                per.push((with("tier", "edge"), j));
            }
            if let (Some(j), Some(r)) = (e.joules_per_inference, e.radio_joules_per_escalation) {
                per.push((with("tier", "cloud"), j + r));
            }
            gauge(
                &mut enc,
                "tierd_energy_per_request_joules",
                "Joules per request in the last window: local compute (edge), plus modelled radio (cloud).",
                &per,
            )?;
            let d = &r.device;
            gauge(
                &mut enc,
                "tierd_device_cpu_ratio",
                "Whole-machine CPU use over the last window, 0-1.",
                &[(dev(), f64::from(d.cpu_percent) / 100.0)],
            )?;
            gauge(
                &mut enc,
                "tierd_device_memory_used_bytes",
                "Memory in use on the machine.",
                &[(dev(), d.memory_used_bytes as f64)],
            )?;
            if let Some(c) = d.temperature_c {
                let mut l = dev();
                l.push(("sensor", d.temperature_sensor.clone().unwrap_or_default()));
                gauge(
                    &mut enc,
                    "tierd_device_temperature_celsius",
                    "Hottest temperature sensor on the machine.",
                    &[(l, f64::from(c))],
                )?;
            }
            gauge(
                &mut enc,
                "tierd_telemetry_seq",
                "Sequence number of the last telemetry report.",
                &[(dev(), r.seq as f64)],
            )?;
        }
        Ok(())
    }
}

/// Builds the registry `/metrics` encodes.
pub fn registry(
    device_id: &str,
    recorder: Arc<Recorder>,
    mqtt: Arc<MqttStats>,
    policy: watch::Receiver<Policy>,
    latest: LatestReport,
    spool: crate::forward::SpoolSink,
) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(AgentCollector {
        device_id: device_id.to_string(),
        recorder,
        mqtt,
        policy,
        latest,
        spool,
    }));
    r
}
