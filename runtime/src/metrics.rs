//! Prometheus text exposition shared by both daemons: the `Collector`s in `agent/src/metrics.rs`
//! and `cloud-relay/src/api.rs` describe *what* to export; this module owns *how* a family of
//! const metrics is written and how a registry is rendered.

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// The `Content-Type` of [`render`]'s output (text format 0.0.4).
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

pub type Labels = Vec<(&'static str, String)>;

/// Writes one metric family; an empty `series` writes nothing (not even HELP/TYPE). Counter
/// names go in without `_total`: the encoder appends it.
pub fn family<T: EncodeMetric>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    series: Vec<(Labels, T)>,
) -> std::fmt::Result {
    if series.is_empty() {
        return Ok(());
    }
    let mut m = enc.encode_descriptor(name, help, None, kind)?;
    for (labels, metric) in &series {
        metric.encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

/// A counter family from plain values.
pub fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: &[(Labels, u64)],
) -> std::fmt::Result {
    let series = series
        .iter()
        .map(|(l, v)| (l.clone(), ConstCounter::new(*v)))
        .collect();
    family(enc, name, help, MetricType::Counter, series)
}

/// A gauge family from plain values.
pub fn gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: &[(Labels, f64)],
) -> std::fmt::Result {
    let series = series
        .iter()
        .map(|(l, v)| (l.clone(), ConstGauge::new(*v)))
        .collect();
    family(enc, name, help, MetricType::Gauge, series)
}

/// Renders `registry` as Prometheus text.
pub fn render(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut out = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut out, registry)?;
    Ok(out)
}
